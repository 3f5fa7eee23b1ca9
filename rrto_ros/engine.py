"""
One model's execution on the robot: offloaded when it can be, local when it must be.

``offload(model, server=..., timeout_ms=...)`` returns an :class:`OffloadedModel`,
a callable with the model's own signature.  For each new input signature it
prepares the server in the background (export, upload only what the store
lacks, record); until that is done, and whenever the server is unreachable,
slow or failing, calls run locally and say so in their :class:`CallRecord`.
After recording, one call is one request and one reply carrying only the
input and output tensors.

With a plan table (:mod:`rrto_ros.plan_table`) each call runs under the plan
chosen for the current link estimate (:meth:`OffloadedModel.set_link`):
local, full offload, a layer split, or a hybrid row split in which robot and
server compute at the same time.  Plans change only between calls, and a
plan that measures worse than a baseline is replaced
(:mod:`rrto_ros.plan_feedback`; ``plan_feedback=False`` turns that off).
"""

from __future__ import annotations

import enum
import logging
import queue
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from rrto_ros.client import RemoteError, RrtoClient, ServerUnavailable
from rrto_ros.codec_choice import CANDIDATES as AUTO_CODECS
from rrto_ros.codec_choice import check_codec, CodecChooser
from rrto_ros.graph import GraphAnalysis
from rrto_ros.hybrid import PlanRuntime
from rrto_ros.local_model import Artifact, LocalModel, load_local_model
from rrto_ros.naive import run_naive
from rrto_ros.partition import is_data_dependent, Partition
from rrto_ros.plan_feedback import PlanFeedback
from rrto_ros.plan_table import bind_table, PlanSelector, PlanTable, program_key
from rrto_ros.split import Plan, as_program
from rrto_wire import codecs, treespec
from rrto_wire.curve import ClientKeys
from rrto_wire.program import unpack_weights
from rrto_wire.errors import ErrorCode
from rrto_wire.messages import Kind
from rrto_wire.tensors import signature_key

log = logging.getLogger('rrto_ros.engine')

MODES = ('replay', 'eager', 'naive', 'local')
_REPREPARE = {ErrorCode.NOT_RECORDED.value, ErrorCode.UNKNOWN_MODEL.value,
              ErrorCode.BLOB_CORRUPT.value}      # a quarantined blob: upload it again
_GIVE_UP = {ErrorCode.SIGNATURE.value, ErrorCode.BAD_REQUEST.value, ErrorCode.RECORD_FAILED.value,
            ErrorCode.UPLOAD_DISABLED.value, ErrorCode.VERSION.value, ErrorCode.TOO_LARGE.value,
            ErrorCode.UNSAFE_PROGRAM.value, ErrorCode.FORBIDDEN.value,
            ErrorCode.UNAUTHORIZED.value}
OFFLOAD = Plan('offload')
AUTO_TIMEOUT = 'auto'
AUTO_FLOOR_MS = 200.0   # an 'auto' budget before the server has measured, and its least value
AUTO_FACTOR = 10.0      # an 'auto' budget: this many times the server's measured inference
AUTO_CEILING_MS = 2000.0    # ... but never more: a stopping node waits for a call in flight


class OffloadResult(str, enum.Enum):
    """How one call was served."""

    OFFLOADED = 'offloaded'            # the server took part (offload, split or hybrid plan)
    LOCAL = 'local'                    # ran on the robot by plan, or while the server prepares
    LOCAL_FALLBACK = 'local_fallback'  # the server failed or was too slow; ran on the robot


@dataclass
class CallRecord:
    """Timing breakdown of one call (milliseconds), as /rrto/latency publishes it."""

    result: OffloadResult
    plan: str
    total_ms: float = 0.0
    network_ms: float = 0.0
    server_ms: float = 0.0              # request receipt to reply, on the server
    server_queue_ms: float = 0.0
    server_compute_ms: float = 0.0
    robot_compute_ms: float = 0.0
    round_trips: int = 0
    bytes_sent: int = 0
    bytes_received: int = 0
    bandwidth_mbps: float = 0.0         # the link estimate the plan was chosen for (0: none)
    codec: str = ''                     # input codec of the request ('' when nothing was sent)
    reason: str = ''
    signature: str = ''
    deadline_missed: bool = False   # later than deadline_ms end to end, or dropped by the server
    preemptions: int = 0            # times the server suspended it for more urgent work
    remote_subgraphs: int = 0       # partitioned model: subgraphs the server ran in this call
    local_subgraphs: int = 0        # partitioned model: captured subgraphs the robot ran
    stamp: float = field(default_factory=time.time)

    @property
    def fallback(self) -> bool:
        return self.result == OffloadResult.LOCAL_FALLBACK

    def to_dict(self) -> dict:
        data = asdict(self)
        data['result'] = self.result.value
        return data


class _Target:
    """Server-side state for one input signature."""

    def __init__(self, example: tuple):
        self.state = 'new'          # new -> preparing -> ready | failed
        self.example = example
        self.artifact: Artifact | None = None
        self.replay: str | None = None
        self.server_ms = 0.0        # the server's own inference time, measured when recording
        self.error = ''
        self.ready = threading.Event()
        self.selector: PlanSelector | None = None
        self.plans: dict[str, tuple[PlanRuntime, str]] = {}  # plan name -> (runtime, replay)
        self.partition: Partition | None = None   # set when the model cannot be exported whole


class OffloadedModel:
    """A model whose calls run on rrto_server when possible (see module docstring)."""

    def __init__(self, model: Any, server: str = 'tcp://127.0.0.1:5555',
                 timeout_ms: float | str = 200.0,
                 *, mode: str = 'replay', precision: str = 'fp32', segments: str = 'whole',
                 codec: str = codecs.RAW, priority: int = 0, deadline_ms: float | None = None,
                 task: str = '', late: str | None = None, connect_timeout_ms: float = 1000.0,
                 upload_timeout_ms: float = 60000.0, record_timeout_ms: float = 120000.0,
                 plan_table: str | Path | PlanTable | None = None, switch_after: int = 2,
                 link: tuple[float, float] | None = None, plan_feedback: bool = True,
                 server_key: str | None = None, client_key: str | None = None):
        if mode not in MODES:
            raise ValueError(f'mode must be one of {MODES}, got {mode!r}')
        if late not in (None, 'drop', 'run'):
            raise ValueError(f"late must be 'drop', 'run' or None, got {late!r}")
        self.local: LocalModel = load_local_model(model)
        self.server = server
        self.auto_timeout = False
        self.timeout_ms = AUTO_FLOOR_MS
        self.mode = mode
        self.options = {'precision': precision, 'mode': 'eager' if mode == 'eager' else 'replay',
                        'segments': segments}
        self.codec = codecs.RAW
        self._chooser: CodecChooser | None = None
        self.link: tuple[float, float] | None = None
        self.set_codec(codec)
        self.keys = {'priority': priority, 'deadline_ms': deadline_ms,
                     'task': task or self.local.label, 'late': late}
        self.upload_timeout_ms = upload_timeout_ms
        self.record_timeout_ms = record_timeout_ms
        self.switch_after = switch_after
        self.plan_feedback = plan_feedback
        self.table = bind_table(_load_table(plan_table), self.local)
        self.link = None
        if link is not None:
            self.set_link(*link)
        name = self.keys['task']
        curve = ClientKeys.load(server_key, client_key) if client_key or server_key else None
        self._targets: dict[str, _Target] = {}
        self._targets_lock = threading.Lock()
        self.data = RrtoClient(server, connect_timeout_ms=connect_timeout_ms,
                               call_timeout_ms=AUTO_FLOOR_MS, name=f'{name}-data', keys=curve)
        self.set_timeout(timeout_ms)
        self.control = RrtoClient(server, connect_timeout_ms=connect_timeout_ms,
                                  call_timeout_ms=record_timeout_ms, name=f'{name}-control',
                                  keys=curve)
        self._jobs: queue.Queue = queue.Queue()
        self._closed = threading.Event()
        self._preparer = threading.Thread(target=self._prepare_loop, name=f'{name}-prepare',
                                          daemon=True)
        self._preparer.start()
        self._call_lock = threading.Lock()
        self._selector: PlanSelector | None = None   # the selector that chose this call's plan
        self.counters = {'calls': 0, 'offloaded': 0, 'local': 0, 'fallbacks': 0, 'uploads': 0,
                         'records': 0, 'prepare_errors': 0, 'plan_switches': 0}
        self.last: CallRecord | None = None
        self.partition: Partition | None = None   # shared by the signatures that need it
        self.listeners: list[Callable[[CallRecord], None]] = []

    # ------------------------------------------------------------------ public API
    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        with self._call_lock:
            self._selector = None
            outputs, record = self._call(args, kwargs)
            if self._selector is not None:
                self._selector.observe(record.plan, record.total_ms)
        deadline_ms = self.keys['deadline_ms']
        if deadline_ms is not None and record.total_ms > deadline_ms:
            record.deadline_missed = True
        self.last = record
        for listener in self.listeners:
            listener(record)
        return outputs

    def warmup(self, *args: Any, timeout_s: float = 120.0, **kwargs: Any) -> bool:
        """Prepare the server for these inputs' signature (and plans); return True once ready."""
        flat, in_spec = treespec.flatten((args, kwargs))
        target = self._target(flat, in_spec)
        target.ready.wait(timeout_s)
        return target.state == 'ready'

    def stats(self) -> dict:
        """Return counters: calls, round_trips, uploads, records, fallbacks, bytes_sent, ..."""
        data = dict(self.counters)
        for key in ('round_trips', 'bytes_sent', 'bytes_received', 'timeouts', 'reconnects',
                    'errors'):
            data[key] = self.data.counters[key] + self.control.counters[key]
        data['infer_round_trips'] = self.data.counters['round_trips']
        for key, value in (self.partition.stats() if self.partition else {}).items():
            data[key] = data.get(key, 0) + value
        return data

    def set_timeout(self, timeout_ms: float | str) -> None:
        """
        Change the per-call timeout (takes effect from the next call).

        ``'auto'``: :data:`AUTO_FLOOR_MS`, or :data:`AUTO_FACTOR` times the
        server's own inference time measured when it recorded, if that is longer
        (at most :data:`AUTO_CEILING_MS`).
        """
        self.auto_timeout = timeout_ms == AUTO_TIMEOUT
        if self.auto_timeout:
            measured = max([0.0] + [t.server_ms for t in list(self._targets.values())])
            timeout_ms = min(AUTO_CEILING_MS, max(AUTO_FLOOR_MS, AUTO_FACTOR * measured))
        elif isinstance(timeout_ms, str) or not timeout_ms > 0:
            raise ValueError(f"timeout_ms must be positive or 'auto', got {timeout_ms!r}")
        self.timeout_ms = float(timeout_ms)
        self.data.call_timeout_ms = float(timeout_ms)

    def set_link(self, bandwidth_mbps: float, rtt_ms: float) -> None:
        """Tell the model the current link estimate; the next call's plan and codec follow it."""
        if not bandwidth_mbps > 0 or not rtt_ms >= 0:
            raise ValueError('bandwidth must be positive and RTT non-negative')
        self.link = (float(bandwidth_mbps), float(rtt_ms))
        if self._chooser is not None:
            self._chooser.set_bandwidth(self.link[0])

    def set_codec(self, codec: str) -> None:
        """
        Send inputs with ``codec`` from the next call on.

        ``raw``, ``lz4``, ``zstd``, ``jpeg``/``jpeg:Q`` (lossy, uint8 HWC images
        only), or ``auto`` / ``auto_lossy`` to choose per call by the link
        estimate (see :mod:`rrto_ros.codec_choice`).
        """
        check_codec(codec)
        self.codec = codec
        self._chooser = CodecChooser(codec) if codec in AUTO_CODECS else None
        if self._chooser is not None and self.link is not None:
            self._chooser.set_bandwidth(self.link[0])

    def set_plan_table(self, table: str | Path | PlanTable | None) -> None:
        """
        Use another plan table (or none: plain offload); prepared in the background.

        Raises :class:`~rrto_ros.plan_table.PlanTableMismatch` if the table was
        solved for another program or input signature.
        """
        loaded = bind_table(_load_table(table), self.local)
        with self._targets_lock:
            self.table = loaded
            for target in self._targets.values():
                target.selector, target.plans = None, {}
                if target.state == 'ready':
                    target.state = 'preparing'
                    target.ready.clear()
                    self._jobs.put(target)

    def close(self) -> None:
        self._closed.set()
        self._jobs.put(None)
        self._preparer.join(timeout=5)
        if self.partition is not None:
            self.partition.close()
        self.data.close()
        self.control.close()

    def __enter__(self) -> 'OffloadedModel':
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # ------------------------------------------------------------------ one call
    def _call(self, args: tuple, kwargs: dict) -> tuple[Any, CallRecord]:
        start = time.perf_counter()
        self.counters['calls'] += 1
        if self.mode == 'local':
            return self._run_local(args, kwargs, start, OffloadResult.LOCAL, 'local',
                                   'mode is local')
        flat, in_spec = treespec.flatten((args, kwargs))
        target = self._target(flat, in_spec)
        if target.state != 'ready':
            reason = target.error or 'server is preparing this input signature'
            return self._run_local(args, kwargs, start, OffloadResult.LOCAL, 'local', reason)
        if target.partition is not None:
            return self._run_partitioned(target.partition, args, kwargs)
        plan = self._choose(target)
        if plan.kind == 'local':
            return self._run_local(args, kwargs, start, OffloadResult.LOCAL, 'local',
                                   f'plan table chose local at {self._bandwidth():g} Mbit/s')
        if not self.data.available:
            return self._run_local(args, kwargs, start, OffloadResult.LOCAL_FALLBACK, plan.name,
                                   'server unreachable; reconnecting')
        before = dict(self.data.counters)
        remote = _Remote(self, target.replay)
        try:
            if self.mode == 'naive':
                remote.start_ms = time.perf_counter()
                outputs = run_naive(self.data, target.artifact, flat, self.timeout_ms)
                remote.done_ms = time.perf_counter()
            elif plan.kind == 'offload':
                outputs = remote([_cpu(t) for t in flat]).result()
            else:
                runtime, replay = target.plans[plan.name]
                remote.replay = replay
                outputs = runtime.run([_cpu(t) for t in flat], remote)
                remote.robot_ms = runtime.last_robot_ms
        except ServerUnavailable as exc:
            outputs, record = self._run_local(args, kwargs, start, OffloadResult.LOCAL_FALLBACK,
                                              plan.name, str(exc))
            _add_traffic(record, self.data.counters, before)   # what went out before it failed
            return outputs, record
        except RemoteError as exc:
            self._on_remote_error(target, exc)
            outputs, record = self._run_local(args, kwargs, start, OffloadResult.LOCAL_FALLBACK,
                                              plan.name, str(exc))
            _add_traffic(record, self.data.counters, before)
            record.deadline_missed = exc.code == ErrorCode.DEADLINE.value
            return outputs, record
        result = treespec.unflatten(_to_device_of(outputs, flat), target.artifact.out_spec)
        self.counters['offloaded'] += 1
        return result, remote.record(plan.name, start, before, target, self._bandwidth())

    def _run_local(self, args: tuple, kwargs: dict, start: float, result: OffloadResult,
                   plan: str, reason: str) -> tuple[Any, CallRecord]:
        local_start = time.perf_counter()
        outputs = self.local.run(args, kwargs)
        now = time.perf_counter()
        self.counters['fallbacks' if result == OffloadResult.LOCAL_FALLBACK else 'local'] += 1
        record = CallRecord(result, plan, total_ms=(now - start) * 1e3,
                            robot_compute_ms=(now - local_start) * 1e3,
                            bandwidth_mbps=self._bandwidth(), reason=reason)
        return outputs, record

    def _run_partitioned(self, partition: Partition, args: tuple,
                         kwargs: dict) -> tuple[Any, CallRecord]:
        outputs, fields = partition.run(args, kwargs, self._bandwidth())
        result = OffloadResult(fields.pop('result'))
        self.counters['fallbacks' if result == OffloadResult.LOCAL_FALLBACK else result.value] += 1
        return outputs, CallRecord(result, **fields)

    def _bandwidth(self) -> float:
        return self.link[0] if self.link else 0.0

    def _choose(self, target: _Target) -> Plan:
        if target.selector is None or self.link is None or self.mode == 'naive':
            return OFFLOAD
        before = target.selector.switches
        self._selector = target.selector
        plan = target.selector.choose(*self.link)
        self.counters['plan_switches'] += target.selector.switches - before
        if plan.kind in ('split', 'hybrid') and plan.name not in target.plans:
            return OFFLOAD  # that plan could not be prepared; offload is always there
        return plan

    def _on_remote_error(self, target: _Target, exc: RemoteError) -> None:
        if exc.code in _REPREPARE:
            with self._targets_lock:
                target.state, target.replay, target.plans = 'preparing', None, {}
                target.ready.clear()
            self._jobs.put(target)
        elif exc.code in _GIVE_UP:
            log.error('server rejected %s: %s; running locally from now on', self.local.label, exc)
            target.state, target.error = 'failed', str(exc)

    # ------------------------------------------------------------------ preparation
    def _target(self, flat: list, in_spec: Any) -> _Target:
        key = (tuple((t.dtype, t.shape) for t in flat), repr(in_spec))
        with self._targets_lock:
            target = self._targets.get(key)
            if target is None:
                example = ([t.detach().cpu().clone() for t in flat], in_spec)
                target = self._targets[key] = _Target(example)
            if target.state == 'new' and self.mode != 'local':
                target.state = 'preparing'
                self._jobs.put(target)
        return target

    def _prepare_loop(self) -> None:
        while not self._closed.is_set():
            target = self._jobs.get()
            if target is None:
                return
            if target.state not in ('new', 'preparing'):
                continue
            target.state = 'preparing'
            try:
                self._prepare(target)
                target.state, target.error = 'ready', ''
            except ServerUnavailable as exc:
                target.error = f'server unreachable: {exc}'
                # try again once the server answers; close() must not wait for that
                while not self.control.wait_available(timeout_s=0.2):
                    if self._closed.is_set():
                        return
                self._jobs.put(target)
                continue
            except Exception as exc:  # noqa: B902 - any failure here means: run locally
                self.counters['prepare_errors'] += 1
                log.error('cannot offload %s: %s; it runs locally', self.local.label, exc)
                target.state, target.error = 'failed', f'cannot offload: {exc}'
            target.ready.set()

    def _prepare(self, target: _Target) -> None:
        if target.partition is not None:
            return
        if target.artifact is None:
            flat, in_spec = target.example
            try:
                target.artifact = self.local.artifact(flat, in_spec)
            except Exception as exc:  # noqa: B902 - data-dependent: partitioned, else re-raised
                if not is_data_dependent(exc):
                    raise
                self._prepare_partition(target)
                return
        artifact = target.artifact
        self.control.hello()
        self.counters['uploads'] += self.control.upload(artifact.blobs,
                                                        timeout_ms=self.upload_timeout_ms)
        if self.mode == 'naive':
            return
        try:
            reply = self._record(artifact.model, artifact.signature)
        except RemoteError as exc:
            if exc.code != ErrorCode.BLOB_CORRUPT.value:
                raise
            # the server found a stored blob damaged and quarantined it: upload it again, once
            self.counters['uploads'] += self.control.upload(artifact.blobs,
                                                            timeout_ms=self.upload_timeout_ms)
            reply = self._record(artifact.model, artifact.signature)
        target.replay, target.server_ms = reply['replay'], sum(reply.get('segment_ms') or [0.0])
        if self.auto_timeout:
            self.set_timeout(AUTO_TIMEOUT)
        how = f'in {reply["record_ms"]:.0f} ms' if reply.get('recorded') else 'already stored'
        log.info('%s: the server has recorded its replay (%s; one inference takes %.1f ms '
                 'there); offloading with a %g ms timeout', self.local.label, how,
                 target.server_ms, self.timeout_ms)
        table = self.table
        if table is not None and not target.plans:
            self._prepare_plans(target, table)

    def _prepare_partition(self, target: _Target) -> None:
        log.info('%s cannot be exported whole (data-dependent operators): partitioning it',
                 self.local.label)
        self.partition = self.partition or Partition(self)
        args, kwargs = treespec.unflatten(list(target.example[0]), target.example[1])
        self.partition.prepare(args, kwargs, self.record_timeout_ms / 1e3)
        target.partition = self.partition

    def _record(self, model: str, signature) -> dict:
        reply = self.control.record(model, signature, self.options,
                                    timeout_ms=self.record_timeout_ms)
        self.counters['records'] += int(bool(reply.get('recorded')))
        return reply

    def _prepare_plans(self, target: _Target, table: PlanTable) -> None:
        artifact = target.artifact
        if program_key(artifact) != table.program:   # another input signature than the table's
            log.info('plan table of %s is for %s, not %s: whole inferences offload',
                     self.local.label, table.signature, signature_key(artifact.signature))
            return
        program = as_program(artifact.program)
        weights_blob = [d for kind, d in artifact.blobs.values() if kind == 'weights']
        weights = unpack_weights(bytearray(weights_blob[0])) if weights_blob else {}
        analysis = GraphAnalysis(program, {k: v.shape for k, v in weights.items()})
        for plan in table.plans():
            if plan.kind not in ('split', 'hybrid'):
                continue
            try:
                runtime = PlanRuntime(program, analysis, weights, plan, self.local.label)
                if runtime.server_blob is not None:
                    self.counters['uploads'] += self.control.upload(
                        {runtime.server_digest: ('program', runtime.server_blob)},
                        timeout_ms=self.upload_timeout_ms)
                    replay = self._record(runtime.server_digest,
                                          as_program(runtime.server_doc).signature)['replay']
                else:
                    replay = ''
                target.plans[plan.name] = (runtime, replay)
            except (RemoteError, ValueError) as exc:
                log.error('plan %s of %s cannot run: %s; it will be replaced by full offload',
                          plan.name, self.local.label, exc)
        target.selector = PlanSelector(table, self.switch_after,
                                       PlanFeedback() if self.plan_feedback else None)


class _Remote:
    """The server half of one call: sends, waits, and turns the reply into a CallRecord."""

    def __init__(self, model: OffloadedModel, replay: str | None):
        self.model = model
        self.replay = replay
        self.reply: dict = {}
        self.start_ms = self.done_ms = 0.0
        self.codec = ''
        self.robot_ms: float | None = None   # measured robot compute, when it overlaps the remote
        self._pending = None

    def __call__(self, tensors: list[torch.Tensor]) -> '_Remote':
        m = self.model
        fields = {'replay': self.replay}
        fields.update({k: v for k, v in m.keys.items() if v is not None})
        self.codec = m._chooser.choose(tensors) if m._chooser is not None else m.codec
        self.start_ms = time.perf_counter()
        self._pending = m.data.start(Kind.INFER, fields, tensors, timeout_ms=m.timeout_ms,
                                     codec=self.codec)
        return self

    def result(self) -> list[torch.Tensor]:
        self.reply, outputs = self._pending.result()
        self.done_ms = time.perf_counter()
        return outputs

    def cancel(self) -> None:
        if self._pending is not None:
            self._pending.cancel()

    def record(self, plan: str, start: float, before: dict, target: _Target,
               bandwidth: float) -> CallRecord:
        counters = self.model.data.counters
        total_ms = (time.perf_counter() - start) * 1e3
        remote_ms = (self.done_ms - self.start_ms) * 1e3
        timing = self.reply.get('timing', {})
        server_ms = self.reply.get('server_ms', 0.0)
        missed = bool(timing.get('deadline_missed', False))
        # request sent -> reply taken, less the server's time: under a hybrid plan the robot
        # computes in between, and a reply that came first waited for it (an upper bound)
        network_ms = max(0.0, remote_ms - server_ms)
        robot_ms = self.robot_ms if self.robot_ms is not None else max(0.0, total_ms - remote_ms)
        record = CallRecord(
            OffloadResult.OFFLOADED, plan, total_ms=total_ms,
            network_ms=network_ms, server_ms=server_ms,
            server_queue_ms=timing.get('queue_ms', 0.0),
            server_compute_ms=timing.get('compute_ms', 0.0),
            robot_compute_ms=robot_ms, bandwidth_mbps=bandwidth,
            signature=signature_key(target.artifact.signature),
            deadline_missed=missed, preemptions=int(timing.get('preemptions', 0)),
            reason='deadline missed on the server (late policy run)' if missed else '',
            codec=self.codec)
        _add_traffic(record, counters, before)
        chooser = self.model._chooser
        if chooser is not None and self.codec:
            chooser.observe(record.bytes_sent + record.bytes_received, record.network_ms)
        return record


def _add_traffic(record: CallRecord, counters: dict, before: dict) -> None:
    """Set a record's requests (answered or timed out) and bytes from the client's counters."""
    record.round_trips = (counters['round_trips'] - before['round_trips']
                          + counters['timeouts'] - before['timeouts'])
    record.bytes_sent = counters['bytes_sent'] - before['bytes_sent']
    record.bytes_received = counters['bytes_received'] - before['bytes_received']


def _load_table(table: str | Path | PlanTable | None) -> PlanTable | None:
    if table is None or table == '':
        return None
    return table if isinstance(table, PlanTable) else PlanTable.load(table)


def _cpu(tensor: torch.Tensor) -> torch.Tensor:
    return tensor if tensor.device.type == 'cpu' else tensor.cpu()


def _to_device_of(outputs: list, flat: list) -> list:
    device = next((t.device for t in flat if isinstance(t, torch.Tensor)), None)
    if device is None or device.type == 'cpu':
        return outputs
    return [o.to(device) for o in outputs]


def offload(model: Any, server: str = 'tcp://127.0.0.1:5555', timeout_ms: float | str = 200.0,
            **options: Any) -> OffloadedModel:
    """
    Return a callable that runs ``model`` on rrto_server, with the same outputs as locally.

    ``model`` is an ``nn.Module``, a ``.pt2``/TorchScript/ONNX file, or
    ``python:module:factory``.  ``options`` are those of :class:`OffloadedModel`
    (``mode``, ``precision``, ``segments``, ``codec``, ``priority``,
    ``deadline_ms``, ``task``, ``late``, ``connect_timeout_ms``, ``plan_table``,
    ``switch_after``, ``link``, ``plan_feedback``, ``server_key``, ``client_key``,
    ...).  ``server_key`` (the server's public ``.key`` file) and ``client_key``
    (this robot's ``.key_secret``) make every connection CURVE-authenticated and
    encrypted; the client then talks only to the server holding that key.
    ``timeout_ms='auto'`` adapts the budget to what the server measured when it
    recorded (see :meth:`OffloadedModel.set_timeout`).
    ``deadline_ms`` is the call's budget: the server drops a request it cannot
    start in time (``late='drop'``, answered at once, then computed locally) or
    runs it late (``late='run'``); either way ``last.deadline_missed`` says so.
    """
    return OffloadedModel(model, server, timeout_ms, **options)
