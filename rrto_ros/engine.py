"""
One model's execution on the robot: offloaded when it can be, local when it must be.

``offload(model, server=..., timeout_ms=...)`` returns an :class:`OffloadedModel`,
a callable with the model's own signature.  For each new input signature it
prepares the server in the background (export, upload only what the store
lacks, record); until that is done, and whenever the server is unreachable,
slow or failing, calls run locally and say so in their :class:`CallRecord`.
After recording, one call is one request and one reply carrying only the
input and output tensors.
"""

from __future__ import annotations

import enum
import logging
import queue
import threading
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

import torch

from rrto_ros.client import RemoteError, RrtoClient, ServerUnavailable
from rrto_ros.codec_choice import CANDIDATES as AUTO_CODECS
from rrto_ros.codec_choice import check_codec, CodecChooser
from rrto_ros.local_model import Artifact, LocalModel, load_local_model
from rrto_ros.naive import run_naive
from rrto_server import codecs, treespec
from rrto_server.protocol import ErrorCode, signature_key, signature_of

log = logging.getLogger('rrto_ros.engine')

MODES = ('replay', 'eager', 'naive', 'local')
_REPREPARE = {ErrorCode.NOT_RECORDED.value, ErrorCode.UNKNOWN_MODEL.value}
_GIVE_UP = {ErrorCode.SIGNATURE.value, ErrorCode.BAD_REQUEST.value, ErrorCode.RECORD_FAILED.value,
            ErrorCode.UPLOAD_DISABLED.value, ErrorCode.VERSION.value, ErrorCode.TOO_LARGE.value}


class OffloadResult(str, enum.Enum):
    """How one call was served."""

    OFFLOADED = 'offloaded'            # the server computed it
    LOCAL = 'local'                    # ran on the robot by plan, or while the server prepares
    LOCAL_FALLBACK = 'local_fallback'  # the server failed or was too slow; ran on the robot


@dataclass
class CallRecord:
    """Timing breakdown of one call (milliseconds), as /rrto/latency publishes it."""

    result: OffloadResult
    plan: str
    total_ms: float = 0.0
    network_ms: float = 0.0
    server_queue_ms: float = 0.0
    server_compute_ms: float = 0.0
    robot_compute_ms: float = 0.0
    round_trips: int = 0
    bytes_sent: int = 0
    bytes_received: int = 0
    reason: str = ''
    signature: str = ''
    codec: str = ''
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

    def __init__(self):
        self.state = 'new'          # new -> preparing -> ready | failed
        self.artifact: Artifact | None = None
        self.replay: str | None = None
        self.error = ''
        self.ready = threading.Event()


class OffloadedModel:
    """A model whose calls run on rrto_server when possible (see module docstring)."""

    def __init__(
            self,
            model: Any,
            server: str = 'tcp://127.0.0.1:5555',
            timeout_ms: float = 200.0,
            *,
            mode: str = 'replay',
            precision: str = 'fp32',
            segments: str = 'whole',
            codec: str = codecs.RAW,
            priority: int = 0,
            deadline_ms: float | None = None,
            task: str = '',
            connect_timeout_ms: float = 1000.0,
            upload_timeout_ms: float = 60000.0,
            record_timeout_ms: float = 120000.0):
        if mode not in MODES:
            raise ValueError(f'mode must be one of {MODES}, got {mode!r}')
        if timeout_ms <= 0:
            raise ValueError('timeout_ms must be positive')
        self.local: LocalModel = load_local_model(model)
        self.server = server
        self.timeout_ms = float(timeout_ms)
        self.mode = mode
        self.options = {'precision': precision, 'mode': 'eager' if mode == 'eager' else 'replay',
                        'segments': segments}
        self.codec = codecs.RAW
        self._chooser: CodecChooser | None = None
        self._bandwidth_mbps: float | None = None
        self.set_codec(codec)
        self.keys = {
            'priority': priority,
            'deadline_ms': deadline_ms,
            'task': task or self.local.label}
        self.upload_timeout_ms = upload_timeout_ms
        self.record_timeout_ms = record_timeout_ms
        name = self.keys['task']
        self.data = RrtoClient(server, connect_timeout_ms=connect_timeout_ms,
                               call_timeout_ms=timeout_ms, name=f'{name}-data')
        self.control = RrtoClient(server, connect_timeout_ms=connect_timeout_ms,
                                  call_timeout_ms=record_timeout_ms, name=f'{name}-control')
        self._targets: dict[str, _Target] = {}
        self._targets_lock = threading.Lock()
        self._jobs: queue.Queue = queue.Queue()
        self._closed = threading.Event()
        self._preparer = threading.Thread(
            target=self._prepare_loop,
            name=f'{name}-prepare',
            daemon=True)
        self._preparer.start()
        self._call_lock = threading.Lock()
        self.counters = {'calls': 0, 'offloaded': 0, 'local': 0, 'fallbacks': 0, 'uploads': 0,
                         'records': 0, 'prepare_errors': 0}
        self.last: CallRecord | None = None
        self.listeners: list[Callable[[CallRecord], None]] = []

    # ------------------------------------------------------------------ public API
    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        with self._call_lock:
            outputs, record = self._call(args, kwargs)
        self.last = record
        for listener in self.listeners:
            listener(record)
        return outputs

    def warmup(self, *args: Any, timeout_s: float = 120.0, **kwargs: Any) -> bool:
        """Prepare the server for these inputs' signature; return True once ready."""
        flat, in_spec = treespec.flatten((args, kwargs))
        target = self._target(flat, in_spec)
        target.ready.wait(timeout_s)
        return target.state == 'ready'

    def stats(self) -> dict:
        """Return counters: calls, round_trips, uploads, records, fallbacks, bytes_sent, ..."""
        data = dict(self.counters)
        for key in (
            'round_trips',
            'bytes_sent',
            'bytes_received',
            'timeouts',
            'reconnects',
                'errors'):
            data[key] = self.data.counters[key] + self.control.counters[key]
        data['infer_round_trips'] = self.data.counters['round_trips']
        return data

    def set_timeout(self, timeout_ms: float) -> None:
        if timeout_ms <= 0:
            raise ValueError('timeout_ms must be positive')
        self.timeout_ms = float(timeout_ms)
        self.data.call_timeout_ms = float(timeout_ms)

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
        if self._chooser is not None:
            self._chooser.set_bandwidth(self._bandwidth_mbps)

    def set_bandwidth(self, mbps: float | None) -> None:
        """Tell ``codec='auto'`` the link bandwidth estimate (None: use observed goodput)."""
        if mbps is not None and not mbps > 0:
            raise ValueError('bandwidth must be positive (or None)')
        self._bandwidth_mbps = mbps
        if self._chooser is not None:
            self._chooser.set_bandwidth(mbps)

    def close(self) -> None:
        self._closed.set()
        self._jobs.put(None)
        self._preparer.join(timeout=5)
        self.data.close()
        self.control.close()

    def __enter__(self) -> 'OffloadedModel':
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # ------------------------------------------------------------------ one call
    def _call(self, args: tuple, kwargs: dict) -> tuple[Any, CallRecord]:
        start = time.perf_counter()
        flat, in_spec = treespec.flatten((args, kwargs))
        plan = self.mode if self.mode != 'local' else 'local'
        self.counters['calls'] += 1
        if self.mode == 'local':
            return self._run_local(
                args,
                kwargs,
                start,
                OffloadResult.LOCAL,
                'local',
                'plan is local')
        target = self._target(flat, in_spec)
        if target.state != 'ready':
            reason = target.error or 'server is preparing this input signature'
            return self._run_local(args, kwargs, start, OffloadResult.LOCAL, plan, reason)
        if not self.data.available:
            return self._run_local(args, kwargs, start, OffloadResult.LOCAL_FALLBACK, plan,
                                   'server unreachable; reconnecting')
        before = dict(self.data.counters)
        remote_start = time.perf_counter()
        codec = codecs.RAW
        try:
            if self.mode == 'naive':
                outputs, reply = run_naive(self.data, target.artifact, flat, self.timeout_ms), {}
            else:
                inputs = [_cpu(t) for t in flat]
                chooser = self._chooser
                codec = chooser.choose(inputs) if chooser is not None else self.codec
                outputs, reply = self.data.infer(target.replay, inputs,
                                                 timeout_ms=self.timeout_ms, codec=codec,
                                                 **self.keys)
        except ServerUnavailable as exc:
            return self._run_local(
                args,
                kwargs,
                start,
                OffloadResult.LOCAL_FALLBACK,
                plan,
                str(exc))
        except RemoteError as exc:
            self._on_remote_error(target, exc)
            return self._run_local(
                args,
                kwargs,
                start,
                OffloadResult.LOCAL_FALLBACK,
                plan,
                str(exc))
        remote_ms = (time.perf_counter() - remote_start) * 1e3
        result = treespec.unflatten(_to_device_of(outputs, flat), target.artifact.out_spec)
        self.counters['offloaded'] += 1
        timing = reply.get('timing', {})
        total_ms = (time.perf_counter() - start) * 1e3
        server_ms = reply.get('server_ms', 0.0)
        record = CallRecord(
            OffloadResult.OFFLOADED, plan, total_ms=total_ms,
            network_ms=max(0.0, remote_ms - server_ms),
            server_queue_ms=timing.get('queue_ms', 0.0),
            server_compute_ms=timing.get('compute_ms', 0.0),
            robot_compute_ms=max(0.0, total_ms - remote_ms),
            round_trips=self.data.counters['round_trips'] - before['round_trips'],
            bytes_sent=self.data.counters['bytes_sent'] - before['bytes_sent'],
            bytes_received=self.data.counters['bytes_received'] - before['bytes_received'],
            signature=signature_key(target.artifact.signature), codec=codec)
        if self._chooser is not None:
            self._chooser.observe(record.bytes_sent + record.bytes_received, record.network_ms)
        return result, record

    def _run_local(self, args: tuple, kwargs: dict, start: float, result: OffloadResult, plan: str,
                   reason: str) -> tuple[Any, CallRecord]:
        local_start = time.perf_counter()
        outputs = self.local.run(args, kwargs)
        now = time.perf_counter()
        self.counters['fallbacks' if result == OffloadResult.LOCAL_FALLBACK else 'local'] += 1
        record = CallRecord(
            result,
            plan if result == OffloadResult.LOCAL_FALLBACK else 'local',
            total_ms=(
                now - start) * 1e3,
            robot_compute_ms=(
                now - local_start) * 1e3,
            network_ms=(
                local_start - start) * 1e3,
            reason=reason)
        return outputs, record

    def _on_remote_error(self, target: _Target, exc: RemoteError) -> None:
        if exc.code in _REPREPARE:
            with self._targets_lock:
                target.state, target.replay = 'preparing', None
                target.ready.clear()
            self._jobs.put(target)
        elif exc.code in _GIVE_UP:
            log.error('server rejected %s: %s; running locally from now on', self.local.label, exc)
            target.state, target.error = 'failed', str(exc)

    # ------------------------------------------------------------------ preparation
    def _target(self, flat: list, in_spec: Any) -> _Target:
        key = signature_key(signature_of(flat)) + repr(in_spec)
        with self._targets_lock:
            target = self._targets.get(key)
            if target is None:
                target = self._targets[key] = _Target()
                target.example = ([t.detach().cpu().clone() for t in flat], in_spec)
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
                if self._closed.is_set():
                    return
                self.control.wait_available(timeout_s=3600)
                self._jobs.put(target)  # try again once the server answers
                continue
            except Exception as exc:  # noqa: B902 - any failure here means: run locally
                self.counters['prepare_errors'] += 1
                log.error('cannot offload %s: %s; it runs locally', self.local.label, exc)
                target.state, target.error = 'failed', f'cannot offload: {exc}'
            target.ready.set()

    def _prepare(self, target: _Target) -> None:
        if target.artifact is None:
            flat, in_spec = target.example
            target.artifact = self.local.artifact(flat, in_spec)
        artifact = target.artifact
        self.control.hello()
        self.counters['uploads'] += self.control.upload(
            artifact.blobs, timeout_ms=self.upload_timeout_ms)
        if self.mode == 'naive':
            return
        reply = self.control.record(artifact.model, artifact.signature, self.options,
                                    timeout_ms=self.record_timeout_ms)
        self.counters['records'] += int(bool(reply.get('recorded')))
        target.replay = reply['replay']


def _cpu(tensor: torch.Tensor) -> torch.Tensor:
    return tensor if tensor.device.type == 'cpu' else tensor.cpu()


def _to_device_of(outputs: list, flat: list) -> list:
    device = next((t.device for t in flat if isinstance(t, torch.Tensor)), None)
    if device is None or device.type == 'cpu':
        return outputs
    return [o.to(device) for o in outputs]


def offload(model: Any, server: str = 'tcp://127.0.0.1:5555', timeout_ms: float = 200.0,
            **options: Any) -> OffloadedModel:
    """
    Return a callable that runs ``model`` on rrto_server, with the same outputs as locally.

    ``model`` is an ``nn.Module``, a ``.pt2``/TorchScript/ONNX file, or
    ``python:module:factory``.  ``options`` are those of :class:`OffloadedModel`
    (``mode``, ``precision``, ``segments``, ``codec``, ``priority``,
    ``deadline_ms``, ``task``, ``connect_timeout_ms``, ...).
    """
    return OffloadedModel(model, server, timeout_ms, **options)
