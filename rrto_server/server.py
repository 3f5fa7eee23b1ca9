"""
The ZeroMQ ROUTER loop: receive, validate, dispatch, reply.

One I/O thread owns the ROUTER socket.  Cheap requests (hello, missing, probe,
stats) are answered inline; uploads go to a control thread (disk I/O);
recordings and naive operators go to the device
:class:`~rrto_server.scheduler.Scheduler`; inferences go first to the CPU
workers (decode, staging), then to the scheduler, then back to the CPU
workers (copy-back, encode; see :mod:`rrto_server.jobs`).  Worker threads
hand their replies back to the I/O thread through an inproc PUSH/PULL pair,
because a ZeroMQ socket must only ever be used by one thread.

Every request gets exactly one reply: a result or an error naming the
problem.  A bad request never stops the loop.
"""

from __future__ import annotations

import concurrent.futures
import logging
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import torch
import zmq

from rrto_wire import protocol as wire
from rrto_server.cpu_workers import CpuWorkers
from rrto_server.jobs import InferJob, OpJob, ProfileJob, RecordJob, job_keys
from rrto_server.models import ModelRegistry
from rrto_server.naive import NaiveSessions
from rrto_wire.protocol import ErrorCode, ProtocolError
from rrto_server.replay import RecordOptions, Replay, ReplayCache, replay_key
from rrto_server.scheduler import DROP, LATE_POLICIES, POLICIES, PREEMPTIVE, Scheduler
from rrto_server.stats import ServerStats
from rrto_server.store import BlobStore, check_digest
from rrto_server.taskstats import TaskStats

log = logging.getLogger('rrto_server')

HARD_LIMIT_FACTOR = 4


@dataclass
class ServerConfig:
    """Everything ``python -m rrto_server`` can set."""

    bind: str = 'tcp://127.0.0.1:5555'
    store: str = 'rrto_store'
    device: str = 'auto'
    allow_upload: bool = True
    max_message_bytes: int = wire.DEFAULT_MAX_MESSAGE_BYTES
    max_replays: int = 32
    max_replay_bytes: int = 8 << 30
    max_models: int = 16
    cpu_backend: str = 'fx'
    naive_ttl_s: float = 60.0
    sched_policy: str = PREEMPTIVE        # fifo | priority | preemptive
    pack_theta: float | None = None       # packing threshold; None: 1.0 on CUDA, off on CPU
    profile_util: bool | None = None      # profile utilisation; None: when packing is on
    late_policy: str = DROP               # default for requests that do not say (drop | run)
    task_late: dict = field(default_factory=dict)   # per-task late policy
    cpu_workers: int = 2
    inline_max_ms: float = 5.0            # serve on the I/O thread when idle, segments <= this
    threads: int = 0                      # torch intra-op threads, process-wide (0: default)
    sched_trace: int = 0                  # keep the last N device steps (stats 'trace')
    extra: dict = field(default_factory=dict)

    def resolved_theta(self, device: torch.device) -> float:
        if self.pack_theta is None:
            return 1.0 if device.type == 'cuda' else 0.0
        return float(self.pack_theta)

    def check(self) -> None:
        """Raise ValueError naming the first invalid scheduling option."""
        if self.sched_policy not in POLICIES:
            raise ValueError(f'sched_policy must be one of {POLICIES}')
        if self.pack_theta is not None and not 0 <= self.pack_theta <= 2:
            raise ValueError('pack_theta must be between 0 (off) and 2')
        for task, late in {'(default)': self.late_policy, **self.task_late}.items():
            if late not in LATE_POLICIES:
                raise ValueError(f'late policy of task {task!r} must be one of {LATE_POLICIES}')
        if self.cpu_workers < 1:
            raise ValueError('cpu_workers must be at least 1')
        if self.threads < 0:
            raise ValueError('threads must be >= 0 (0: torch default)')

    def resolved_device(self) -> torch.device:
        if self.device == 'auto':
            return torch.device('cuda' if torch.cuda.is_available() else 'cpu')
        device = torch.device(self.device)
        if device.type == 'cuda' and not torch.cuda.is_available():
            raise ValueError(f'device {self.device!r} requested but CUDA is not available')
        return device


class _Request:
    """What a worker needs to answer one request."""

    __slots__ = ('envelope', 'header', 'received', 'size')

    def __init__(self, envelope: list, header: dict, received: float, size: int):
        self.envelope = envelope
        self.header = header
        self.received = received
        self.size = size

    @property
    def id(self) -> Any:
        return self.header.get('id')


class Server:
    """An rrto_server instance; ``serve_forever`` runs its loop in the calling thread."""

    def __init__(self, config: ServerConfig, context: zmq.Context | None = None):
        config.check()
        self.config = config
        if config.threads:
            torch.set_num_threads(config.threads)
        self.device = config.resolved_device()
        self.store = BlobStore(config.store)
        self.registry = ModelRegistry(self.store, config.max_models)
        self.replays = ReplayCache(config.max_replays, config.max_replay_bytes)
        self.naive = NaiveSessions(self.registry, self.device, config.naive_ttl_s)
        self.stats = ServerStats()
        self.tasks = TaskStats()
        self._ctx = context or zmq.Context()
        self._own_ctx = context is None
        self.router = self._ctx.socket(zmq.ROUTER)
        self.router.copy_threshold = wire.COPY_THRESHOLD
        self.router.setsockopt(zmq.LINGER, 0)
        self.router.setsockopt(zmq.MAXMSGSIZE, config.max_message_bytes * HARD_LIMIT_FACTOR)
        self.router.setsockopt(zmq.ROUTER_HANDOVER, 1)
        self.router.bind(config.bind)
        self.endpoint = self.router.getsockopt_string(zmq.LAST_ENDPOINT)
        self._outbox_addr = f'inproc://rrto-outbox-{uuid.uuid4().hex}'
        self._outbox = self._ctx.socket(zmq.PULL)
        self._outbox.bind(self._outbox_addr)
        self._pushers = threading.local()
        self._pusher_sockets: list[zmq.Socket] = []
        self._pusher_lock = threading.Lock()
        self._io_thread: int | None = None
        self._stop = threading.Event()
        self._records_in_flight: dict[str, list[_Request]] = {}
        self._records_lock = threading.Lock()
        self.control = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix='rrto-control')
        theta = config.resolved_theta(self.device)
        self.profile_utilisation = (theta > 0 if config.profile_util is None
                                    else config.profile_util)
        self.cpu = CpuWorkers(config.cpu_workers)
        self.scheduler = Scheduler(config.sched_policy, theta, self.device,
                                   trace=config.sched_trace)
        log.info('rrto_server listening on %s (device %s, store %s, uploads %s, scheduler %s, '
                 'packing %s)', self.endpoint, self.device, self.store.root,
                 'on' if config.allow_upload else 'off', config.sched_policy,
                 f'theta={theta:g}' if theta > 0 else 'off')

    # ------------------------------------------------------------------ loop
    def serve_forever(self) -> None:
        """Serve until :meth:`stop` is called."""
        self._io_thread = threading.get_ident()
        poller = zmq.Poller()
        poller.register(self.router, zmq.POLLIN)
        poller.register(self._outbox, zmq.POLLIN)
        while not self._stop.is_set():
            events = dict(poller.poll(100))
            if self._outbox in events:
                self._flush_outbox()
            if self.router in events:
                for _ in range(64):
                    try:
                        frames = self.router.recv_multipart(zmq.NOBLOCK, copy=False)
                    except zmq.Again:
                        break
                    self._on_message(frames)
        self._flush_outbox()

    def start(self) -> threading.Thread:
        """Serve in a background thread (tests, the ROS server node); return the thread."""
        thread = threading.Thread(target=self.serve_forever, name='rrto-io', daemon=True)
        thread.start()
        return thread

    def stop(self) -> None:
        self._stop.set()

    def close(self) -> None:
        """Stop serving and release sockets, threads and the device."""
        self.stop()
        self.scheduler.close()
        self.cpu.close()
        self.control.shutdown(wait=True, cancel_futures=True)
        time.sleep(0.15)
        with self._pusher_lock:
            for sock in self._pusher_sockets:
                sock.close(linger=0)
        self._outbox.close(linger=0)
        self.router.close(linger=0)
        if self._own_ctx:
            self._ctx.term()

    # ------------------------------------------------------------------ replies
    def _pusher(self) -> zmq.Socket:
        sock = getattr(self._pushers, 'sock', None)
        if sock is None:
            sock = self._ctx.socket(zmq.PUSH)
            sock.copy_threshold = wire.COPY_THRESHOLD
            sock.setsockopt(zmq.LINGER, 0)
            sock.connect(self._outbox_addr)
            self._pushers.sock = sock
            with self._pusher_lock:
                self._pusher_sockets.append(sock)
        return sock

    def _send(self, request: _Request, header: dict, tensors=()) -> None:
        header.setdefault('server_ms', (time.perf_counter() - request.received) * 1e3)
        frames = request.envelope + wire.encode(header, tensors)
        self.stats.reply(header, wire.message_size(frames[len(request.envelope):]))
        if threading.get_ident() == self._io_thread:
            self.router.send_multipart(frames, copy=False)
        else:
            self._pusher().send_multipart(frames, copy=False)

    def _flush_outbox(self) -> None:
        while True:
            try:
                frames = self._outbox.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            self.router.send_multipart(frames, copy=False)

    def _ok(self, request: _Request, tensors=(), **fields) -> None:
        self._send(request, wire.ok_header(request.id, **fields), tensors)

    def _error(self, request: _Request, error: ProtocolError) -> None:
        log.info(
            'error reply to %s: %s (%s)',
            request.header.get('kind'),
            error.message,
            error.code.value)
        self._send(request, wire.error_header(request.id, error.code, error.message))

    # ------------------------------------------------------------------ dispatch
    def _on_message(self, frames: list) -> None:
        received = time.perf_counter()
        if len(frames) > 2 and len(frames[1].buffer) == 0:
            envelope, body = list(frames[:2]), frames[2:]   # REQ-style envelope
        else:
            envelope, body = list(frames[:1]), frames[1:]
        size = wire.message_size(body)
        request = _Request(envelope, {}, received, size)
        try:
            if not body:
                raise ProtocolError(ErrorCode.BAD_REQUEST, 'empty message')
            request.header = wire.decode_header(body[0])
            self.stats.request(request.header, size)
            if size > self.config.max_message_bytes:
                raise ProtocolError(
                    ErrorCode.TOO_LARGE,
                    f'message of {size} bytes exceeds {self.config.max_message_bytes}')
            if request.header['kind'] not in wire.REQUEST_KINDS:
                raise ProtocolError(ErrorCode.BAD_REQUEST,
                                    f"'{request.header['kind'].value}' is a reply kind")
            handler = getattr(self, f'_on_{request.header["kind"].value}')
            handler(request, body[1:])
        except ProtocolError as exc:
            self._error(request, exc)
        except Exception as exc:  # never let one request stop the loop
            log.exception('internal error handling a request')
            self._error(request, ProtocolError(ErrorCode.INTERNAL, f'{type(exc).__name__}: {exc}'))

    def _on_hello(self, request: _Request, frames: list) -> None:
        self._ok(
            request,
            server='rrto_server',
            protocol=wire.PROTOCOL_VERSION,
            device=str(
                self.device),
            upload=self.config.allow_upload,
            max_message_bytes=self.config.max_message_bytes,
            chunk_bytes=wire.UPLOAD_CHUNK_BYTES)

    def _on_missing(self, request: _Request, frames: list) -> None:
        digests = request.header.get('digests')
        if not isinstance(digests, list) or len(digests) > 64:
            raise ProtocolError(ErrorCode.BAD_REQUEST,
                                "'digests' must be a list of at most 64 digests")
        self._ok(request, missing=self.store.missing([check_digest(d) for d in digests]))

    def _on_put(self, request: _Request, frames: list) -> None:
        if not self.config.allow_upload:
            raise ProtocolError(
                ErrorCode.UPLOAD_DISABLED,
                'this server was started with --no-upload; it serves only stored models')
        header = request.header
        (chunk,) = wire.decode_tensors(header, frames) if len(frames) == 1 else (None,)
        if chunk is None or chunk.dtype != torch.uint8 or chunk.dim() != 1:
            raise ProtocolError(ErrorCode.BAD_REQUEST, 'put carries exactly one uint8 chunk')

        def write() -> None:
            try:
                complete = self.store.put_chunk(header.get('digest'), header.get('blob_kind'),
                                                header.get('upload'), header.get('offset'),
                                                header.get('total'), memoryview(chunk.numpy()))
                if complete:
                    self.stats.count(header['digest'], 'uploads')
                self._ok(request, complete=complete)
            except ProtocolError as exc:
                self._error(request, exc)
            except OSError as exc:
                self._error(
                    request,
                    ProtocolError(
                        ErrorCode.INTERNAL,
                        f'store write failed: {exc}'))

        self.control.submit(write)

    def _on_record(self, request: _Request, frames: list) -> None:
        header = request.header
        digest = check_digest(header.get('model'))
        signature = wire.signature_from_json(header.get('signature'))
        options = RecordOptions.from_json(header.get('options'))
        key = replay_key(digest, signature, options)
        replay = self.replays.get(key)
        if replay is not None:
            self._ok(request, **_replay_info(replay, recorded=False))
            return
        with self._records_lock:
            waiting = self._records_in_flight.setdefault(key, [])
            waiting.append(request)
            if len(waiting) > 1:
                return  # the same recording is already queued; answer all when it ends
        try:
            job = RecordJob(self, key, digest, signature, options, header, request.received)
        except ProtocolError as exc:
            self._finish_record(key, None, exc)
            return
        self.scheduler.submit(job)

    def _on_infer(self, request: _Request, frames: list) -> None:
        # the I/O thread only validates and routes; decoding happens on a CPU worker
        header = request.header
        keys = job_keys(header, request.received, self.config.task_late,
                        self.config.late_policy)
        replay = self.replays.get(header.get('replay'))
        if replay is None:
            raise ProtocolError(
                ErrorCode.NOT_RECORDED,
                f'replay {str(header.get("replay"))[:40]!r} is not recorded here; record it')
        job = InferJob(self, request, replay, frames, **keys)
        self.tasks.arrived(job.task, job.priority)
        if self._inline_ok(replay, header) and self.scheduler.pending() == 0:
            # fast path: an idle device, raw frames and short segments are served on this
            # thread end to end (decode is zero-copy, the step is short)
            job.inline = True
            if job.prepare(submit=False) and not self.scheduler.run_inline(job):
                job.inline = False
                self.scheduler.submit(job)
            return
        self.cpu.submit(job.urgency(), job.prepare)

    def _inline_ok(self, replay: Replay, header: dict) -> bool:
        if not replay.segment_ms or max(replay.segment_ms) > self.config.inline_max_ms:
            return False
        return all(d.get('codec', 'raw') == 'raw' for d in header.get('tensors', ())
                   if isinstance(d, dict))

    def on_io_thread(self) -> bool:
        """Return True when called from the thread that serves the socket."""
        return threading.get_ident() == self._io_thread

    def _on_op(self, request: _Request, frames: list) -> None:
        tensors = wire.decode_tensors(request.header, frames)
        session = f'{bytes(request.envelope[0].buffer).hex()}:{request.header.get("session")}'
        self.scheduler.submit(OpJob(self, request, session, tensors))

    def _on_release(self, request: _Request, frames: list) -> None:
        self.naive.release(
            f'{bytes(request.envelope[0].buffer).hex()}:{request.header.get("session")}')
        self._ok(request)

    def _on_profile(self, request: _Request, frames: list) -> None:
        header = request.header
        digest = check_digest(header.get('model'))
        repeats = header.get('repeats', 5)
        if not isinstance(repeats, int) or not 1 <= repeats <= 100:
            raise ProtocolError(ErrorCode.BAD_REQUEST, "'repeats' must be an integer in 1..100")
        self.scheduler.submit(ProfileJob(self, request, digest, repeats))

    def _on_probe(self, request: _Request, frames: list) -> None:
        # answered inline by the I/O thread: a probe measures the link, never the device queue
        reply_bytes = request.header.get('reply_bytes', 0)
        if not isinstance(reply_bytes, int) or isinstance(reply_bytes, bool) or reply_bytes < 0:
            raise ProtocolError(ErrorCode.BAD_REQUEST,
                                "'reply_bytes' must be a non-negative integer")
        if reply_bytes > min(wire.MAX_PROBE_BYTES, self.config.max_message_bytes):
            raise ProtocolError(
                ErrorCode.TOO_LARGE,
                f'probe reply of {reply_bytes} bytes exceeds '
                f'{min(wire.MAX_PROBE_BYTES, self.config.max_message_bytes)}')
        payload = wire.decode_tensors(request.header, frames)
        if len(payload) > 1 or any(t.dtype != torch.uint8 or t.dim() != 1 for t in payload):
            raise ProtocolError(ErrorCode.BAD_REQUEST,
                                'a probe carries at most one 1-D uint8 payload')
        tensors = [torch.zeros(reply_bytes, dtype=torch.uint8)] if reply_bytes else []
        self._ok(request, tensors, received_bytes=request.size)

    def _on_stats(self, request: _Request, frames: list) -> None:
        self._ok(request, stats=self.snapshot())

    def snapshot(self) -> dict:
        """Return the server's counters as plain JSON data."""
        data = self.stats.snapshot()
        for model in self.registry.loaded():
            data['models'].setdefault(model.digest, {}).setdefault('label', model.label)
        data['replays'] = [dict(_replay_info(r, recorded=False), runs=r.runs)
                           for r in self.replays.items()]
        data['replay_bytes'] = self.replays.nbytes
        data['evictions'] = self.replays.evictions
        data['scheduler'] = self.scheduler.snapshot()
        data['scheduler']['cpu_pending'] = self.cpu.pending()
        data['tasks'] = self.tasks.snapshot()
        data['naive_sessions'] = len(self.naive)
        data['device'] = str(self.device)
        return data

    # ------------------------------------------------------------------ record completion
    def _finish_record(self, key: str, replay: Replay | None, error: ProtocolError | None) -> None:
        with self._records_lock:
            waiting = self._records_in_flight.pop(key, [])
        for request in waiting:
            if error is not None:
                self._error(request, error)
            else:
                self._ok(request, **_replay_info(replay, recorded=True))


def _replay_info(replay: Replay, recorded: bool) -> dict:
    return {'replay': replay.key, 'recorded': recorded, 'record_ms': replay.record_ms,
            'segments': replay.num_segments, 'backend': replay.backend, 'nbytes': replay.nbytes,
            'label': replay.model.label, 'utilisation': replay.utilisation,
            'segment_ms': [round(ms, 4) for ms in replay.segment_ms]}
