"""
The ZeroMQ ROUTER loop: receive, decode, dispatch.

One I/O thread owns the ROUTER socket.  Every message becomes a
:class:`~rrto_server.requests.Request`, which answers exactly once; its header
is decoded by :func:`rrto_wire.messages.decode_request` and dispatched through
:attr:`Server.handlers` (kind -> handler).  Cheap requests (hello, missing,
probe, stats) are answered inline; uploads, recordings' first trial, profiles
and evictions go to the control thread (:mod:`rrto_server.control_requests`);
recordings and naive operators go to the device
:class:`~rrto_server.scheduler.Scheduler`; inferences go first to the CPU
workers (decode, staging), then to the scheduler, then back to the CPU
workers (copy-back, encode; see :mod:`rrto_server.jobs`).  Small raw-frame
inferences skip the workers: on an idle device (or, under preemption, for the
most urgent request at the next segment boundary) this thread serves them end
to end (the common case on the express path, :mod:`rrto_server.express`),
otherwise it decodes them (zero-copy views) and queues them itself.

The server's own ZeroMQ context reads the connections on ``IO_THREADS`` libzmq
threads, so one peer's multi-megabyte batch does not hold up another peer's frames
before this thread sees them.

Limits on the socket itself (libzmq, before Python sees a byte):
``ZMQ_MAXMSGSIZE`` is the server's message limit, checked by libzmq per
message part: a peer that sends a larger part is disconnected without a reply.
A complete message whose parts together exceed it gets ``too_large``; a peer
holding more of an unfinished one is cut off (:mod:`rrto_server.conn_watchdog`).
Each peer's send queue holds at most ``max_queued_replies`` replies
(``ZMQ_SNDHWM``) and ``SNDBUF_BYTES`` of kernel buffer, and at most
``max_peer_reply_bytes`` of large (zero-copy) replies are in flight per peer;
replies beyond that are dropped and counted (``stats`` ``dropped_replies``),
so a peer that never reads cannot make the server hold its replies: at most
``max_queued_replies`` x ``COPY_THRESHOLD`` + ``max_peer_reply_bytes`` per peer
(and ``requests.TOTAL_PEER_BUDGETS`` such budgets for all peers together).
"""

from __future__ import annotations

import gc
import logging
import threading
import time
from typing import Callable

import torch
import zmq

from rrto_server.auth import router_socket
from rrto_server.conn_watchdog import ConnectionWatchdog
from rrto_server.control_requests import ControlRequests
from rrto_server.cpu_workers import CpuWorkers
from rrto_server.guard import Guard
from rrto_server.express_job import ExpressJob
from rrto_server.jobs import InferJob, OpJob, Services, job_keys, replay_info
from rrto_server.models import ModelRegistry
from rrto_server.naive import NaiveSessions
from rrto_server.options import ServerConfig
from rrto_server.sandbox import Sandbox
from rrto_server.replay import Replay
from rrto_server.replay_cache import ReplayCache
from rrto_server.requests import OpenRequests, ReplySender, Request
from rrto_server.scheduler import Scheduler
from rrto_server.stats import OTHER_MODEL, ServerStats, bounded
from rrto_server.store import BlobStore
from rrto_server.taskstats import TaskStats
from rrto_wire import heap, limits, messages
from rrto_wire import protocol as wire
from rrto_wire.errors import ErrorCode, ProtocolError
from rrto_wire.messages import KIND_OF, Kind

log = logging.getLogger('rrto_server')

SNDBUF_BYTES = 4 << 20      # kernel send buffer per connection (explicit: no autotuning)
# libzmq I/O threads of the server's own context; each accepted connection is read by one of
# them, so a peer streaming a multi-megabyte batch does not hold up another peer's frames (one
# thread alternated between the batch's large reads and an urgent frame's small ones)
IO_THREADS = 4
BATCH = 64                  # messages received per poll wake-up before replies are flushed
# an idle device serves a request on the I/O thread only if its inputs are at most this big
# (as large as a CUDA-graph replay stages inside its graph: one memcpy, no copy stream)
INLINE_MAX_INPUT_BYTES = 4 << 20
# under preemption, an express request more urgent than all the device's work waits this
# long at most on the I/O thread for the lanes' current segments to end, then runs there
INLINE_WAIT_S = 0.001


class Server:
    """An rrto_server instance; ``serve_forever`` runs its loop in the calling thread."""

    def __init__(self, config: ServerConfig, context: zmq.Context | None = None):
        config.check()
        self.config = config
        if config.threads:
            torch.set_num_threads(config.threads)
        self.device = config.resolved_device()
        self.store = BlobStore(config.store, max_store_bytes=config.max_store_bytes)
        self.registry = ModelRegistry(
            self.store, config.max_models,
            Sandbox(self.store.root, config.program_max_bytes, config.program_max_s, self.device))
        self.replays = ReplayCache(config.max_replays, config.max_replay_bytes)
        self.naive = NaiveSessions(self.registry, self.device, config.naive_ttl_s,
                                   config.program_max_bytes)
        self.stats = ServerStats()
        self.tasks = TaskStats()
        self.open_requests = OpenRequests()
        self.context = context or zmq.Context(io_threads=IO_THREADS)
        self._own_ctx = context is None
        self.guard = Guard(self.context, config.bind, config.keys, config.insecure,
                           config.admission_capacity)
        try:
            self.router = self._router(config)
        except Exception:
            self.guard.close()
            if self._own_ctx:
                self.context.term()
            raise
        self.endpoint = self.router.getsockopt_string(zmq.LAST_ENDPOINT)
        self._authenticating = self.guard.authenticating     # (keys: from start to close)
        self._max_bytes = config.max_message_bytes
        self.replies = ReplySender(self.context, self.router, self.stats,
                                   config.max_peer_reply_bytes)
        self._stopping = False      # set by stop(), from any thread
        self._loop_done = threading.Event()
        self._serving = False
        theta = config.resolved_theta(self.device)
        self.profile_utilisation = (theta > 0 if config.profile_util is None
                                    else config.profile_util)
        self.cpu = CpuWorkers(config.cpu_workers)
        self.scheduler = Scheduler(config.sched_policy, theta, self.device,
                                   trace=config.sched_trace, task_theta=config.task_theta)
        self.services = Services(
            device=self.device, stats=self.stats, tasks=self.tasks, registry=self.registry,
            replays=self.replays, naive=self.naive, scheduler=self.scheduler, cpu=self.cpu,
            on_io_thread=self.replies.on_io_thread, cpu_backend=config.cpu_backend,
            profile_utilisation=self.profile_utilisation,
            max_decoded_bytes=config.max_message_bytes)
        self.control = ControlRequests(config, self.guard, self.store, self.registry,
                                       self.replays, self.scheduler, self.services, self.stats)
        self.handlers: dict[Kind, Callable[[Request, list], None]] = {
            Kind.HELLO: self._on_hello, Kind.MISSING: self._on_missing,
            Kind.PUT: self.control.on_put, Kind.RECORD: self.control.on_record,
            Kind.INFER: self._on_infer, Kind.OP: self._on_op, Kind.RELEASE: self._on_release,
            Kind.STATS: self._on_stats, Kind.PROFILE: self.control.on_profile,
            Kind.PROBE: self._on_probe, Kind.EVICT: self.control.on_evict}
        log.info('rrto_server listening on %s (device %s, store %s, uploads %s, scheduler %s, '
                 'packing %s)', self.endpoint, self.device, self.store.root,
                 'on' if config.allow_upload else 'off', config.sched_policy,
                 f'theta={theta:g}' if theta > 0 else 'off')
        gc.callbacks.append(self.stats.collection)      # its pauses; removed by close()
        heap.settle('server start-up')      # torch and the server: out of full collections

    def _router(self, config: ServerConfig) -> zmq.Socket:
        router = router_socket(self.context)     # unknowable automatic ids (a13 #0)
        router.copy_threshold = limits.COPY_THRESHOLD
        router.setsockopt(zmq.LINGER, 0)
        router.setsockopt(zmq.MAXMSGSIZE, config.max_message_bytes)
        router.setsockopt(zmq.SNDHWM, config.max_queued_replies)
        router.setsockopt(zmq.SNDBUF, SNDBUF_BYTES)
        router.setsockopt(zmq.ROUTER_MANDATORY, 1)   # a full queue raises: count, not block
        watchdog = None
        try:
            self.guard.secure(router)
            self.watchdog = watchdog = ConnectionWatchdog(router, config.max_message_bytes,
                                                          config.bind)
            router.bind(config.bind)
        except Exception:                   # e.g. the port is taken: leave nothing running
            if watchdog is not None:
                watchdog.close()
            router.close(linger=0)
            raise
        return router

    # ------------------------------------------------------------------ loop
    def serve_forever(self) -> None:
        """Serve until :meth:`stop` is called."""
        self.replies.io_thread = threading.get_ident()
        self._serving = True
        poller = zmq.Poller()
        for sock in self.watchdog.sockets:      # its connection events and proof requests
            poller.register(sock, zmq.POLLIN)
        poller.register(self.router, zmq.POLLIN)
        poller.register(self.replies.outbox, zmq.POLLIN)
        sockets, outbox, guard = poller.sockets, self.replies.outbox, self.guard
        try:
            while not self._stopping:
                events = dict(zmq.zmq_poll(sockets, 100))     # Poller.poll's, without its call
                ready = time.perf_counter()     # a receipt: flush, receive, count are server time
                if outbox in events:
                    self.replies.flush()
                batch = self.watchdog.drain(events, BATCH)      # receives from the router
                first = batch[0] if batch and self.router in events else None
                # highest first; most wake-ups find one message (order's, without its calls)
                for frames, backlog in ((batch[0], 0),) if len(batch) == 1 else guard.order(batch):
                    guard.backlog = backlog                   # admission's measure
                    self.on_message(frames, ready if frames is first else None)
            self.replies.flush()
        finally:
            self._loop_done.set()

    def start(self) -> threading.Thread:
        """Serve in a background thread (tests, the ROS server node); return the thread."""
        self._serving = True
        thread = threading.Thread(target=self.serve_forever, name='rrto-io', daemon=True)
        thread.start()
        return thread

    def stop(self) -> None:
        self._stopping = True       # read by the loop after every poll (100 ms at most)

    def close(self) -> None:
        """Stop serving and release sockets, threads and the device."""
        # every thread that can reply stops first; the I/O loop then sends what they left
        self.scheduler.close()
        self.cpu.close()
        self.control.close()
        self.stop()
        if self._serving:
            self._loop_done.wait()
        self.replies.close()
        self.watchdog.close()
        if self.stats.collection in gc.callbacks:
            gc.callbacks.remove(self.stats.collection)
        heap.dropped(self)      # its frozen cycles go at the process's next settles
        self.router.close(linger=0)
        self.guard.close()
        if self._own_ctx:
            self.context.term()

    # ------------------------------------------------------------------ dispatch
    def on_message(self, frames: list, received: float | None = None) -> None:
        """Wrap a message in a Request, decode, dispatch it (I/O thread; received: its poll)."""
        received = time.perf_counter() if received is None else received
        if len(frames) > 2 and len(frames[1]) == 0:     # a received part's len: its bytes
            envelope, body = frames[:2], frames[2:]     # REQ-style envelope
        else:
            envelope, body = frames[:1], frames[1:]
        size = sum(map(len, body))      # received parts (zmq.Frame): len() is their bytes
        request = Request(envelope, received, size, self.replies, self.open_requests,
                          self.stats)
        try:
            if not body:
                raise ProtocolError(ErrorCode.BAD_REQUEST, 'empty message')
            request.header = header = messages.decode_request(body[0])
            request.kind = kind = header.__struct_config__.tag
            self.stats.request(kind, size)
            request.client, priority, request.answered = self.guard.admit(
                frames[0], kind, getattr(header, 'priority', None))
            if priority is not None:
                header.priority = priority
            if size > self._max_bytes:
                raise ProtocolError(ErrorCode.TOO_LARGE,
                                    f'message of {size} bytes exceeds {self._max_bytes}')
            self.handlers[KIND_OF[kind]](request, body[1:])
        except ProtocolError as exc:
            if request.header is None:
                self.stats.request('?', size)
            request.error(exc, exc.request_id)
        except Exception as exc:  # a server bug: answer it, log it, keep serving
            request.fail(exc)

    def _on_hello(self, request: Request, frames: list) -> None:
        request.ok(server='rrto_server', protocol=limits.PROTOCOL_VERSION,
                   device=str(self.device), upload=self.config.allow_upload,
                   max_message_bytes=self.config.max_message_bytes,
                   chunk_bytes=limits.UPLOAD_CHUNK_BYTES)

    def _on_missing(self, request: Request, frames: list) -> None:
        request.ok(missing=self.store.missing(request.header.digests))

    def _on_infer(self, request: Request, frames: list) -> None:
        # the I/O thread only validates and routes; decoding happens on a CPU worker
        header, config = request.header, self.config
        replay = self.replays.get(header.replay)
        if replay is None:
            raise ProtocolError(ErrorCode.NOT_RECORDED,
                                f'replay {header.replay[:40]!r} is not recorded here; record it')
        client = request.client.name if self._authenticating else None
        plan, buffers = replay.express, None      # the express path (rrto_server.express):
        longest = replay.longest_segment_ms     # _inline_ok's test, without its call
        if (plan is not None and plan.nbytes <= min(INLINE_MAX_INPUT_BYTES, self._max_bytes)
                and replay.runner.fixed_cost and longest is not None
                and longest <= config.inline_max_ms):
            buffers = plan.accept(header.tensors, frames)   # exactly the recorded raw inputs
        if buffers is not None:
            if ExpressJob(self.services, request, replay, buffers, client, config.task_late,
                          config.late_policy).serve(INLINE_WAIT_S):
                return      # served on this thread (counted after its reply), or answered
        elif wire.decoded_size(header.tensors) > self._max_bytes:
            raise ProtocolError(ErrorCode.TOO_LARGE,
                                f'inputs decode to more than {self._max_bytes} bytes')
        keys = job_keys(header, request.received, config.task_late, config.late_policy)
        job = InferJob(self.services, request, replay, frames, client, **keys)  # a busy device
        self.tasks.arrived(job.task, job.priority, client)
        small = self._small_raw(header)
        if small and self._inline_ok(replay) and self.scheduler.pending() == 0:
            # fast path: an idle device, raw frames and short segments are served on this
            # thread end to end (decode is zero-copy, the step is short)
            job.inline = True
            if job.prepare(submit=False) and not self.scheduler.run_inline(job):
                job.inline = False
                self.scheduler.submit(job)
        elif small and not replay.copies_on_start:
            job.prepare()       # views of the frames: cheaper here than a hand-off to a worker
        else:
            self.cpu.submit(job.urgency(), job.prepare)

    @staticmethod
    def _small_raw(header: messages.Infer) -> bool:
        # a bulk batch or a codec is decoded and staged by a CPU worker: on this thread it
        # would hold up the receipt of every request behind it, urgent ones included
        if wire.decoded_size(header.tensors) > INLINE_MAX_INPUT_BYTES:
            return False
        return all(d.codec == 'raw' for d in header.tensors)

    def _inline_ok(self, replay: Replay) -> bool:
        # the time of earlier runs says what this one takes only for a runner whose cost is
        # the same for every input (fixed sizes); a dynamic program's data set its sizes
        longest = replay.longest_segment_ms
        return (replay.runner.fixed_cost and longest is not None
                and longest <= self.config.inline_max_ms)

    def _session(self, request: Request) -> str:
        return f'{request.peer.hex()}:{request.header.session}'

    def _on_op(self, request: Request, frames: list) -> None:
        if not self.config.allow_naive:
            raise ProtocolError(ErrorCode.FORBIDDEN,
                                'per-operator (naive) mode is off on this server')
        tensors = wire.decode_tensors(request.header.tensors, frames,
                                      self.config.max_message_bytes)
        job = OpJob(self.services, request, self._session(request), tensors)
        self.control.vet_then_op(request, lambda: self.scheduler.submit(job))

    def _on_release(self, request: Request, frames: list) -> None:
        self.naive.release(self._session(request))
        request.ok()

    def _on_probe(self, request: Request, frames: list) -> None:
        # answered inline by the I/O thread: a probe measures the link, never the device queue
        reply_bytes = request.header.reply_bytes
        cap = min(limits.MAX_PROBE_BYTES, self.config.max_message_bytes)
        if reply_bytes > cap:
            raise ProtocolError(ErrorCode.TOO_LARGE,
                                f'probe reply of {reply_bytes} bytes exceeds {cap}')
        if len(request.header.tensors) > 1 or any(      # checked before any frame is decoded
                d.dtype != 'uint8' or len(d.shape) != 1 for d in request.header.tensors):
            raise ProtocolError(ErrorCode.BAD_REQUEST,
                                'a probe carries at most one 1-D uint8 payload')
        wire.decode_tensors(request.header.tensors, frames, cap)  # checks the frames
        tensors = [torch.zeros(reply_bytes, dtype=torch.uint8)] if reply_bytes else []
        request.ok(tensors, received_bytes=request.size)

    def _on_stats(self, request: Request, frames: list) -> None:
        peer = request.client     # an admin (or anyone on an open server) sees every task
        request.ok(stats=self.snapshot(lambda digest: self.guard.sees(peer, self.store.owners(
            digest)), None if self.guard.sees(peer, []) else peer.name))

    def snapshot(self, visible: Callable[[str], bool] = lambda digest: True,
                 client: str | None = None) -> dict:
        """
        Return the counters as JSON data (models ``visible``), bounded to one reply header.

        ``client``: a key, shown only its own tasks; None (an admin, an open server): every
        task name's totals, and each key's tasks (``tasks_by_key``) when keys are used.
        """
        data = self.stats.snapshot()
        for model in self.registry.loaded():
            data['models'].setdefault(model.digest, {}).setdefault('label', model.label)
        data['models'] = {d: m for d, m in data['models'].items()     # OTHER_MODEL: admins
                          if (client is None if d == OTHER_MODEL else visible(d))}
        data['replays'] = [dict(replay_info(r, recorded=False), runs=r.runs)
                           for r in self.replays.items() if visible(r.model.digest)]
        data['guard'] = self.guard.snapshot()
        data['transport'] = self.watchdog.snapshot()
        data['store'] = {'bytes': self.store.nbytes, 'evictions': self.store.evictions,
                         'quarantined': self.store.quarantined}
        data['replay_bytes'] = self.replays.nbytes
        data['evictions'] = self.replays.evictions
        data['scheduler'] = self.scheduler.snapshot()
        data['scheduler']['cpu_pending'] = self.cpu.pending()
        if client is not None:
            data['tasks'] = self.tasks.snapshot(client)
            data['scheduler'].pop('trace', None)        # it names every client's tasks
            data['scheduler'].pop('epoch', None)
            data.pop('gc_pauses', None)      # when, on the server's clock (as the trace)
        else:
            data['tasks'] = self.tasks.totals()
            if self.guard.authenticating:
                data['tasks_by_key'] = self.tasks.by_key()
        data['naive_sessions'] = len(self.naive)
        data['device'] = str(self.device)
        data['open_requests'] = len(self.open_requests)
        data['double_answers'] = self.open_requests.double_answers
        return bounded(data)
