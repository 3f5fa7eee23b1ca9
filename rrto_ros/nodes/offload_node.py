"""
``offload_node``: camera frames in, model outputs and ``/rrto/latency`` out.

Subscribes to ``sensor_msgs/Image`` (sensor-data QoS), keeps only the newest
frame while an inference runs (older ones are counted as dropped), converts it
to a uint8 NHWC tensor without cv_bridge, and runs it through the offload
engine; normalisation is part of the offloaded model, so frames cross the link
as uint8.  Each output tensor is published as ``std_msgs/Float32MultiArray`` on
``<output_prefix>/<name>``; each inference's timing as
``diagnostic_msgs/DiagnosticStatus`` on ``/rrto/latency``; node health on
``/diagnostics``.  The blocking call runs on the node's own inference thread,
so frames, the bandwidth estimate, parameter changes and lifecycle
transitions are handled while it waits, and nothing of the executor is in
flight when the node stops.

A lifecycle node: configure checks the parameters together and loads the
model; activate connects to the server, starts preparing it for the frame
size the node will send (so the first frame is offloaded as soon as the
server has recorded) and subscribes; deactivate unsubscribes and closes the
connection.
"""

from __future__ import annotations

import math
import sys
import threading
import time

from diagnostic_msgs.msg import DiagnosticStatus
import torch
from sensor_msgs.msg import Image

from rrto_ros import latency, variant_files
from rrto_ros.engine import offload
from rrto_ros.image import ImageConverter
from rrto_ros.latest import LatestSlot
from rrto_ros.local_model import TorchModule, load_local_model
from rrto_ros.nodes import messages as m
from rrto_ros.nodes import spin
from rrto_ros.nodes.diagnostics import Diagnostics, Health
from rrto_ros.nodes.managed import ManagedNode
from rrto_ros.nodes.params import client_keys, fail
from rrto_ros.outputs import output_names
from rrto_ros.plan_table import PlanTableMismatch
from rrto_ros.preprocess import WithImageInput
from rrto_wire import heap
from rrto_wire import strategy as strategy_file
from rrto_wire import treespec

from rrto_ros.nodes.offload_params import PARAMS, resolve_table, timeout_value


class OffloadNode(ManagedNode):
    """Run a model on every newest camera frame, offloaded when the server can take it."""

    NODE_NAME = 'offload_node'

    def __init__(self, **kwargs):
        self.engine = self.local = self.converter = self.plan = None
        self.variant = ''
        self._latency_pub = self.diagnostics = None
        self._subscriptions: list = []
        self._worker = None
        self._wake = threading.Event()    # a frame is waiting
        self._stop = threading.Event()    # the inference thread must end
        super().__init__(self.NODE_NAME, PARAMS, self._on_param_change, **kwargs)
        self.slot = LatestSlot()
        self.link = {'uplink_mbps': math.nan, 'rtt_ms': math.nan}
        self.counts = {'rejected': 0, 'errors': 0}
        self._period = {'fallbacks': 0, 'errors': 0, 'rejected': 0}   # since last /diagnostics
        self._count_lock = threading.Lock()   # the worker counts, the diagnostics timer reads
        self._last_reason = ''
        self._names: list[str] = []
        self._spec = None
        self._outputs: dict = {}
        self._prefix = self.params['output_prefix'].rstrip('/')

    def _configure(self) -> None:
        p = self.params
        resize = (p['resize_height'], p['resize_width'])
        if (0 in resize) and resize != (0, 0):
            raise fail('resize_height' if resize[0] == 0 else 'resize_width',
                       'set both resize_height and resize_width, or neither')
        self.converter = ImageConverter(p['channel_order'], resize if resize[0] else None)
        client_keys(p['server_key'], p['client_key'])   # checked here, loaded by the engine
        self.plan = self._strategy()
        self.variant = self.plan.variant if self.plan else ''
        self.local = self._model(self.plan)
        self._latency_pub = self.create_lifecycle_publisher(DiagnosticStatus, m.LATENCY_TOPIC,
                                                            m.LATENCY_QOS)
        self.diagnostics = Diagnostics(self, p['diagnostics_period_s'])
        self.diagnostics.add(self.params['task'] or self.local.label, self._health)

    def _activate(self) -> str:
        p = self.params
        plan = self.plan
        try:
            engine = offload(
                self.local, server=p['server'], timeout_ms=timeout_value(p['timeout_ms']),
                mode=p['mode'], precision=p['precision'],
                priority=plan.priority if plan else p['priority'],
                segments=plan.segments if plan else 'whole',
                deadline_ms=(plan.deadline_ms if plan else p['deadline_ms']) or None,
                task=p['task'], codec=p['codec'],
                late=None if p['late'] == 'server' else p['late'],
                connect_timeout_ms=p['connect_timeout_ms'],
                server_key=p['server_key'] or None, client_key=p['client_key'] or None,
                plan_table=resolve_table(p['plan_table']) or None,
                switch_after=p['switch_after'], directory=p['directory'],
                export_cache=p['export_cache'] or None, fallback=p['fallback'])
        except PlanTableMismatch as exc:   # solved for another program or input signature
            raise fail('plan_table', str(exc)) from None

        self.engine, self.task = engine, engine.keys['task']
        if self.converter.resize is not None and p['mode'] != 'local':
            # prepare the server for the frames to come now, not on the first frame
            height, width = self.converter.resize
            engine.warmup(torch.zeros(1, height, width, self.converter.channels,
                                      dtype=torch.uint8), timeout_s=0.0)
        self._subscriptions = [
            self.create_subscription(Image, p['input_topic'], self.on_image, m.IMAGE_QOS),
            self.create_subscription(DiagnosticStatus, m.BANDWIDTH_TOPIC, self._on_bandwidth,
                                     m.STATUS_QOS)]
        self.diagnostics.start()
        self._stop.clear()
        self._worker = threading.Thread(target=self._infer_loop, name='offload_node-infer',
                                        daemon=True)
        self._worker.start()
        timeout = (f'{p["timeout_ms"]:g} ms' if p['timeout_ms'] else
                   f'auto, {engine.timeout_ms:g} ms until the server has measured')
        return (f'offloading {engine.local.label} to {p["server"]} ({p["mode"]}, '
                f'timeout {timeout}) for frames on {p["input_topic"]}')

    def _deactivate(self) -> None:
        for subscription in self._subscriptions:
            self.destroy_subscription(subscription)
        self._subscriptions = []
        if self.diagnostics is not None:
            self.diagnostics.stop()
        if self._worker is not None:
            self._stop.set()
            self._wake.set()
            self._worker.join()   # the inference in flight ends within its timeout
            self._worker = None
        if self.engine is not None:
            self.engine.close()
            self.engine = None

    def _cleanup(self) -> None:
        if self._latency_pub is not None:
            self.destroy_lifecycle_publisher(self._latency_pub)
            self.diagnostics.destroy()
        self._latency_pub = self.diagnostics = self.local = self.converter = None

    def _strategy(self) -> strategy_file.TaskStrategy | None:
        p = self.params
        if not p['strategy']:
            return None
        tasks = strategy_file.load(p['strategy']).tasks
        if p['task'] not in tasks:
            raise fail('task', f'strategy {p["strategy"]} has no task {p["task"]!r} '
                               f'(it has {sorted(tasks)})')
        return tasks[p['task']]

    def _model(self, plan: strategy_file.TaskStrategy | None):
        p = self.params
        try:
            local = (variant_files.load_module(plan.model) if plan and plan.model
                     else load_local_model(p['model']))
        except Exception as exc:  # noqa: B902 - any load failure is a bad 'model' value
            raise fail('model', f'cannot load {p["model"]!r}: {exc}') from None
        if not p['normalize']:
            return local
        channels = 1 if p['channel_order'] == 'mono' else 3
        for name in ('mean', 'std'):
            if len(p[name]) != channels:
                raise fail(name, f'needs {channels} values for channel_order '
                                 f'{p["channel_order"]!r}, got {len(p[name])}')
        module = getattr(local, 'module', None)
        if not isinstance(local, TorchModule) or module is None:
            raise fail('normalize', f'{p["model"]!r} is not a torch model; set normalize:=false '
                                    'and give it NHWC frames as they come')
        wrapped = WithImageInput(module, p['mean'], p['std'], value_scale=p['input_scale'])
        kind = (variant_files.ShardedModule if isinstance(local, variant_files.ShardedModule)
                else TorchModule)
        return kind(wrapped, label=local.label)

    # ------------------------------------------------------------------ callbacks
    def _on_param_change(self, name: str, value) -> None:
        engine = self.engine
        if engine is None:
            return   # not active: activate reads the parameter
        if name == 'timeout_ms':
            engine.set_timeout(timeout_value(value))
            self.get_logger().info(f'timeout_ms is now {value:g}' if value else
                                   f'timeout_ms is now auto ({engine.timeout_ms:g} ms)')
        elif name == 'plan_table':
            engine.set_plan_table(resolve_table(value) or None)
            self.get_logger().info(f'plan table is now {value or "(none: whole-model offload)"}; '
                                   'its plans are prepared in the background')

    def on_image(self, msg: Image) -> None:
        """Take one camera frame (the subscription callback): the newest waiting frame wins."""
        self.slot.put(msg)
        self._wake.set()

    def _on_bandwidth(self, msg: DiagnosticStatus) -> None:
        if msg.hardware_id != self.params['server']:
            return   # a monitor of another server
        values = dict(m.values_of(msg))
        for key in self.link:
            try:
                self.link[key] = float(values.get(key, 'nan'))
            except ValueError:
                self.link[key] = math.nan
        up, rtt = self.link['uplink_mbps'], self.link['rtt_ms']
        engine = self.engine
        if engine is not None and values.get('health') != 'down' and up > 0 and rtt >= 0 \
                and math.isfinite(up + rtt):
            engine.set_link(up, rtt)   # a plan table, if any, follows from the next call

    def _infer_loop(self) -> None:
        while True:
            self._wake.wait()
            self._wake.clear()
            if self._stop.is_set():
                return
            taken, msg = self.slot.take()
            if not taken:
                continue
            try:
                self._run(msg)
            except Exception as exc:  # noqa: B902 - one bad frame must not stop the node
                self._count('errors')
                self.get_logger().error(f'inference failed: {type(exc).__name__}: {exc}',
                                        throttle_duration_sec=5.0)
            if self.slot:
                self._wake.set()   # a newer frame arrived meanwhile

    def _run(self, msg: Image) -> None:
        start = time.perf_counter()
        try:
            frame = self.converter(msg.height, msg.width, msg.encoding, msg.step, msg.data,
                                   bool(msg.is_bigendian))
        except ValueError as exc:
            self._count('rejected')
            self.get_logger().error(f'frame rejected: {exc}', throttle_duration_sec=5.0)
            return
        preprocess_ms = (time.perf_counter() - start) * 1e3
        outputs = self.engine(frame)
        record = self.engine.last
        if outputs is not None:   # None: skipped (fallback 'skip'), nothing to publish
            self._publish_outputs(outputs)
        stamp = msg.header.stamp
        stamp_ns = stamp.sec * 10**9 + stamp.nanosec
        age_ms = ((self.get_clock().now().nanoseconds - stamp_ns) / 1e6 if stamp_ns
                  else math.nan)
        if record.fallback:
            self._count('fallbacks')
        if record.reason:
            self._last_reason = record.reason
        values = latency.record_values(
            record, task=self.task, server=self.params['server'],
            stamp=latency.stamp_text(stamp.sec, stamp.nanosec), preprocess_ms=preprocess_ms,
            age_ms=age_ms, rtt_ms=self.link['rtt_ms'], frames_dropped=self.slot.dropped,
            variant=self.variant)
        self._latency_pub.publish(m.status(
            self.task, m.WARN if record.fallback else m.OK, latency.summary_line(record),
            values, hardware_id=self.params['server']))

    def _count(self, what: str) -> None:
        with self._count_lock:
            self._period[what] += 1
            if what in self.counts:
                self.counts[what] += 1

    def _publish_outputs(self, outputs) -> None:
        leaves, spec = treespec.flatten(outputs)
        if spec != self._spec:
            self._spec, self._names = spec, output_names(spec)
            for name in self._names:
                if name not in self._outputs:
                    self._outputs[name] = self.create_publisher(
                        m.Float32MultiArray, f'{self._prefix}/{name}', m.OUTPUT_QOS)
            self.get_logger().info('publishing outputs on ' + ', '.join(
                self._outputs[n].topic_name for n in self._names))
        for name, leaf in zip(self._names, leaves):
            self._outputs[name].publish(m.float_array(leaf))

    def _health(self) -> Health:
        engine = self.engine
        stats = engine.stats()
        with self._count_lock:
            period, self._period = self._period, {k: 0 for k in self._period}
        available = engine.data.available
        if period['errors']:
            level, message = m.ERROR, f'{period["errors"]} inferences failed'
        elif not available:
            level, message = m.WARN, 'server unreachable: running locally'
        elif period['fallbacks'] or period['rejected']:
            level, message = m.WARN, (f'{period["fallbacks"]} fallbacks, '
                                      f'{period["rejected"]} frames rejected')
        else:
            level, message = m.OK, 'ok'
        values = [('server', self.params['server']), ('model', self.params['model']),
                  ('task', self.task), ('mode', self.params['mode']),
                  ('plan_table', self.params['plan_table']),
                  ('timeout_ms', engine.timeout_ms), ('server_available', available),
                  ('frames_received', self.slot.received), ('frames_dropped', self.slot.dropped),
                  ('frames_rejected', self.counts['rejected']),
                  ('errors', self.counts['errors']), ('last_reason', self._last_reason)]
        values += sorted(stats.items())
        return Health(level, message, values, self.params['server'])


def main(args=None) -> int:
    """Run the node until Ctrl-C or shutdown; exit 2 on invalid parameters."""
    heap.enable()       # a prepared model's heap is frozen (rrto_wire.heap)
    return spin.run(OffloadNode, args)


if __name__ == '__main__':
    sys.exit(main())
