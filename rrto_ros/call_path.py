"""
One call of an offloaded model: choose how to serve it, serve it, record how.

:meth:`CallPath.run` asks the :class:`~rrto_ros.preparer.Preparer` whether
the call's input signature is ready, chooses the plan for the current link
estimate (local, offload, split, hybrid), sends the request
(:class:`RemoteCall`, the one INFER of a call) and falls back to the local
model when the server is unreachable, too slow, still preparing or answers
with an error (with the engine's ``fallback='skip'``: returns no outputs and
computes nothing instead).
An error that means the server lost the replay sends the signature back to
the preparer; an error that will not go away marks it failed.  Every call
returns its outputs and a :class:`~rrto_ros.records.CallRecord`.
"""

from __future__ import annotations

import logging
import time
from typing import Any, TYPE_CHECKING

import torch

from rrto_ros import reply_check
from rrto_ros.client import RemoteError, ServerUnavailable
from rrto_ros.naive import run_naive
from rrto_ros.plan_table import PlanSelector
from rrto_ros.preparer import PrepState, Target
from rrto_ros.records import CallRecord, OffloadResult
from rrto_ros.split import Plan
from rrto_wire import treespec
from rrto_wire.errors import ErrorCode, ProtocolError
from rrto_wire.tensors import signature_key

if TYPE_CHECKING:   # rrto_ros.partition imports torch's tracer: loaded when a model needs it
    from rrto_ros.partition import Partition

log = logging.getLogger('rrto_ros.call_path')

REPREPARE = {ErrorCode.NOT_RECORDED.value, ErrorCode.UNKNOWN_MODEL.value,
             ErrorCode.BLOB_CORRUPT.value}      # a quarantined blob: upload it again
GIVE_UP = {ErrorCode.SIGNATURE.value, ErrorCode.BAD_REQUEST.value, ErrorCode.RECORD_FAILED.value,
           ErrorCode.UPLOAD_DISABLED.value, ErrorCode.VERSION.value, ErrorCode.TOO_LARGE.value,
           ErrorCode.UNSAFE_PROGRAM.value, ErrorCode.FORBIDDEN.value,
           ErrorCode.UNAUTHORIZED.value}
OFFLOAD = Plan('offload')


class CallPath:
    """
    Serve calls of one :class:`~rrto_ros.engine.OffloadedModel` (one at a time).

    Reads the model's public state (``mode``, ``local``, ``data``, ``keys``,
    ``timeout_ms``, ``codec``, ``chooser``, ``link``, ``preparer``) and adds
    to its ``counters``.
    """

    def __init__(self, model: Any):
        self.model = model
        self.selector: PlanSelector | None = None   # the selector that chose this call's plan
        self._one: dict[tuple, Target] = {}     # (dtype, shape) -> target of f(tensor) calls
        self._leaves: tuple = (None, ())        # the last artifact called, its outputs

    def run(self, args: tuple, kwargs: dict) -> tuple[Any, CallRecord]:
        """Serve one call; return its outputs and record (plan feedback observed)."""
        self.selector = None
        outputs, record = self._serve(args, kwargs)
        if self.selector is not None:
            if record.result in (OffloadResult.OFFLOADED, OffloadResult.LOCAL):
                # the table's prediction of what ran, at the price held before this call
                predicted = self.selector.predicted_ms(record.plan)
                record.predicted_ms = 0.0 if predicted is None else predicted
            # an offloaded call's robot compute prices the robot
            robot = record.robot_compute_ms if record.result == OffloadResult.OFFLOADED else None
            self.selector.observe(record.plan, record.total_ms, robot)
        return outputs, record

    def _serve(self, args: tuple, kwargs: dict) -> tuple[Any, CallRecord]:
        m = self.model
        start = time.perf_counter()
        m.counters['calls'] += 1
        if m.mode == 'local':
            return self._local(args, kwargs, start, OffloadResult.LOCAL, 'local', 'mode is local',
                               transient=False)
        flat, target = self._target(args, kwargs)
        if target.state != PrepState.READY:
            reason = target.error or 'server is preparing this input signature'
            return self._local(args, kwargs, start, OffloadResult.LOCAL, 'local', reason,
                               transient=target.state != PrepState.FAILED)
        if target.partition is not None:
            stale = m.preparer.stale(target)    # weights changed since the server got them
            if stale:
                return self._local(args, kwargs, start, OffloadResult.LOCAL, 'local', stale)
            return self._partitioned(target.partition, args, kwargs)
        if target.selector is None or m.link is None or m.mode == 'naive':
            plan = OFFLOAD                      # _choose's answer, without its call
        else:
            plan = self._choose(target)
        if plan.kind == 'local':
            return self._local(args, kwargs, start, OffloadResult.LOCAL, 'local',
                               f'plan table chose local at {self._bandwidth():g} Mbit/s',
                               transient=False)
        if not m.data.available:
            return self._local(args, kwargs, start, OffloadResult.LOCAL_FALLBACK, plan.name,
                               'server unreachable; reconnecting')
        overlap = plan.kind == 'offload' and m.mode != 'naive'
        stale = '' if overlap else m.preparer.stale(target)
        if stale:
            return self._local(args, kwargs, start, OffloadResult.LOCAL, 'local', stale)
        before = dict(m.data.counters)
        remote = RemoteCall(m, target.replay)
        if self._leaves[0] is not target.artifact:      # what the call's outputs must be
            self._leaves = (target.artifact, reply_check.expected(target.artifact))
        leaves = self._leaves[1]
        try:
            if overlap:
                # the weights are checked while the server works (a call's only robot work
                # that grows with the model: cold, ~1 us a tensor); the robot's thread sends,
                # so nothing changes them in between; changed: the reply is dropped unread
                remote.expect = leaves
                remote([t if t.is_cpu else t.cpu() for t in flat])
                stale = m.preparer.stale(target)
                if stale:
                    remote.cancel()
                    outputs, record = self._local(args, kwargs, start, OffloadResult.LOCAL,
                                                  'local', stale)
                    _add_traffic(record, m.data.counters, before)
                    return outputs, record
                outputs = remote.result()
            elif m.mode == 'naive':
                remote.start_ms = time.perf_counter()
                outputs = run_naive(m.data, target.artifact, flat, m.timeout_ms)
                remote.done_ms = time.perf_counter()
            else:
                runtime, replay = target.plans[plan.name]
                remote.replay = replay
                remote.expect = reply_check.expected_program(runtime.server_digest,
                                                             runtime.server_doc)
                outputs = runtime.run([_cpu(t) for t in flat], remote)
                remote.robot_ms = runtime.last_robot_ms
            result = _rebuild(outputs, flat, target, leaves)
        except ServerUnavailable as exc:
            outputs, record = self._local(args, kwargs, start, OffloadResult.LOCAL_FALLBACK,
                                          plan.name, str(exc))
            _add_traffic(record, m.data.counters, before)   # what went out before it failed
            return outputs, record
        except RemoteError as exc:
            self._on_remote_error(target, exc)
            outputs, record = self._local(args, kwargs, start, OffloadResult.LOCAL_FALLBACK,
                                          plan.name, str(exc))
            _add_traffic(record, m.data.counters, before)
            record.deadline_missed = exc.code == ErrorCode.DEADLINE.value
            return outputs, record
        m.counters['offloaded'] += 1
        return result, remote.record('offload' if plan is OFFLOAD else plan.name, start, before,
                                     target, m.link[0] if m.link else 0.0)

    def _target(self, args: tuple, kwargs: dict) -> tuple[list, Target]:
        """Return the call's input tensors and their target (the preparer's, kept per shape)."""
        one = args[0] if len(args) == 1 and not kwargs else None
        if isinstance(one, torch.Tensor):       # the common f(tensor): no walk, no lock
            key = (one.dtype, one.shape)
            target = self._one.get(key)
            if target is None or target.state != PrepState.READY:
                target = self._one[key] = self.model.preparer.target(
                    *treespec.flatten((args, kwargs)))
            return [one], target
        flat, in_spec = treespec.flatten((args, kwargs))
        return flat, self.model.preparer.target(flat, in_spec)

    def _local(self, args: tuple, kwargs: dict, start: float, result: OffloadResult,
               plan: str, reason: str, transient: bool = True) -> tuple[Any, CallRecord]:
        if self.model.fallback == 'skip' and transient:
            # the server cannot serve it for now: no robot compute, no outputs (the engine's
            # fallback); a local plan, mode or a model the server refused still runs here
            self.model.counters['skipped'] += 1
            return None, CallRecord(OffloadResult.SKIPPED, plan,
                                    total_ms=(time.perf_counter() - start) * 1e3,
                                    bandwidth_mbps=self._bandwidth(), reason=reason)
        local_start = time.perf_counter()
        outputs = self.model.local.run(args, kwargs)
        now = time.perf_counter()
        self.model.counters['fallbacks' if result == OffloadResult.LOCAL_FALLBACK
                            else 'local'] += 1
        record = CallRecord(result, plan, total_ms=(now - start) * 1e3,
                            robot_compute_ms=(now - local_start) * 1e3,
                            bandwidth_mbps=self._bandwidth(), reason=reason)
        return outputs, record

    def _partitioned(self, partition: Partition, args: tuple,
                     kwargs: dict) -> tuple[Any, CallRecord]:
        outputs, fields = partition.run(args, kwargs, self._bandwidth())
        result = OffloadResult(fields.pop('result'))
        key = 'fallbacks' if result == OffloadResult.LOCAL_FALLBACK else result.value
        self.model.counters[key] += 1
        return outputs, CallRecord(result, **fields)

    def _bandwidth(self) -> float:
        return self.model.link[0] if self.model.link else 0.0

    def _choose(self, target: Target) -> Plan:
        m = self.model
        if target.selector is None or m.link is None or m.mode == 'naive':
            return OFFLOAD
        before = target.selector.switches
        self.selector = target.selector
        plan = target.selector.choose(*m.link)
        m.counters['plan_switches'] += target.selector.switches - before
        if plan.kind in ('split', 'hybrid') and plan.name not in target.plans:
            return OFFLOAD  # that plan could not be prepared; offload is always there
        return plan

    def _on_remote_error(self, target: Target, exc: RemoteError) -> None:
        if exc.code in REPREPARE:
            self.model.preparer.reprepare(target)
        elif exc.code in GIVE_UP:
            log.error('server rejected %s: %s; running locally from now on',
                      self.model.local.label, exc)
            self.model.preparer.give_up(target, str(exc))


class RemoteCall:
    """The server half of one call: sends, waits, and turns the reply into a CallRecord."""

    def __init__(self, model: Any, replay: str | None):
        self.model = model
        self.replay = replay
        self.reply: Any = None               # the reply's header as decoded (replies.InferOk)
        self.start_ms = self.done_ms = 0.0
        self.codec = ''
        self.robot_ms: float | None = None   # measured robot compute, when it overlaps the remote
        self.expect: tuple | None = None     # the outputs the reply must hold (reply_check)
        self._pending = None

    def __call__(self, tensors: list[torch.Tensor]) -> 'RemoteCall':
        """Send the INFER of ``tensors`` (the codec chosen per call when ``codec='auto'``)."""
        m = self.model
        self.codec = m.chooser.choose(tensors) if m.chooser is not None else m.codec
        self.start_ms = time.perf_counter()
        self._pending = m.data.start_infer(self.replay, tensors, timeout_ms=m.timeout_ms,
                                           codec=self.codec, expect=self.expect, **m.keys)
        return self

    def result(self) -> list[torch.Tensor]:
        """Wait for the reply; return the output tensors."""
        self.reply, outputs = self._pending.take()
        self.done_ms = time.perf_counter()
        return outputs

    def cancel(self) -> None:
        """Abandon the request in flight (its late reply is dropped)."""
        if self._pending is not None:
            self._pending.cancel()

    def record(self, plan: str, start: float, before: dict, target: Target,
               bandwidth: float) -> CallRecord:
        """Return the call's record: the reply's server timing and the client's counters."""
        counters = self.model.data.counters
        total_ms = (time.perf_counter() - start) * 1e3
        remote_ms = (self.done_ms - self.start_ms) * 1e3
        timing = getattr(self.reply, 'timing', None)    # None: no reply taken (naive mode)
        server_ms = self.reply.server_ms if self.reply is not None else 0.0
        missed = timing is not None and timing.deadline_missed
        # request sent -> reply taken, less the server's time: under a hybrid plan the robot
        # computes in between, and a reply that came first waited for it (an upper bound)
        network_ms = max(0.0, remote_ms - server_ms)
        robot_ms = self.robot_ms if self.robot_ms is not None else max(0.0, total_ms - remote_ms)
        record = CallRecord(
            OffloadResult.OFFLOADED, plan, total_ms=total_ms,
            network_ms=network_ms, server_ms=server_ms,
            server_queue_ms=timing.queue_ms if timing is not None else 0.0,
            server_compute_ms=timing.compute_ms if timing is not None else 0.0,
            robot_compute_ms=robot_ms,
            round_trips=counters['round_trips'] - before['round_trips'],
            bytes_sent=counters['bytes_sent'] - before['bytes_sent'],
            bytes_received=counters['bytes_received'] - before['bytes_received'],
            bandwidth_mbps=bandwidth, signature=signature_key(target.artifact.signature),
            deadline_missed=missed,
            preemptions=timing.preemptions if timing is not None else 0,
            reason='deadline missed on the server (late policy run)' if missed else '',
            codec=self.codec)
        chooser = self.model.chooser
        if chooser is not None and self.codec:
            chooser.observe(record.bytes_sent + record.bytes_received, record.network_ms)
        return record


def _add_traffic(record: CallRecord, counters: dict, before: dict) -> None:
    """Set a record's requests (answered or timed out) and bytes from the client's counters."""
    record.round_trips = (counters['round_trips'] - before['round_trips']
                          + counters['timeouts'] - before['timeouts'])
    record.bytes_sent = counters['bytes_sent'] - before['bytes_sent']
    record.bytes_received = counters['bytes_received'] - before['bytes_received']


def _rebuild(outputs: list, flat: list, target: Target, leaves: tuple) -> Any:
    """
    Return the call's outputs in the model's structure, or raise ``bad_reply``.

    The final outputs of every plan (a hybrid's merge included) must match the
    robot's own export (``leaves``, :func:`reply_check.expected`): no wrong
    result is ever labelled offloaded.
    """
    try:
        reply_check.check_outputs(outputs, leaves)
        first = flat[0] if flat else None
        if not (isinstance(first, torch.Tensor) and first.is_cpu):  # _to_device_of's answer
            outputs = _to_device_of(outputs, flat)
        spec = target.artifact.out_spec
        if spec == 'T' and len(outputs) == 1:     # one tensor: unflatten's answer, no call
            return outputs[0]
        return treespec.unflatten(outputs, spec)
    except ProtocolError as exc:
        raise RemoteError(exc.code.value, exc.message) from None
    except (ValueError, TypeError) as exc:
        raise RemoteError(ErrorCode.BAD_REPLY.value, f'outputs do not rebuild: {exc}') from None


def _cpu(tensor: torch.Tensor) -> torch.Tensor:
    return tensor if tensor.is_cpu else tensor.cpu()


def _to_device_of(outputs: list, flat: list) -> list:
    for first in flat:      # the first input tensor's device
        if isinstance(first, torch.Tensor):
            return outputs if first.is_cpu else [o.to(first.device) for o in outputs]
    return outputs
