"""
Requests as scheduler jobs: inference, naive operators (recordings: :mod:`rrto_server.recording`).

An inference passes through three phases on three kinds of thread:

1. CPU worker (:meth:`InferJob.prepare`): drop it at once if its deadline has
   already passed, decode the tensor frames (codecs included), check the
   signature and stage the inputs on the device; then hand it to the
   scheduler.
2. Device lane (:meth:`InferJob.step`): one replay segment per step.
3. CPU worker (:meth:`InferJob._reply`): copy the outputs back, encode and
   send the reply; when the lane already copied them back (small outputs, see
   :mod:`rrto_server.runner_cudagraph`) the lane encodes and sends it itself.

The I/O thread validates the header, looks the replay up and queues phase 1,
or runs phase 1 itself for small raw frames that start as views (all three
phases when the device is idle; see :mod:`rrto_server.server`).  Every
request ends in exactly one reply, and in exactly one per-task outcome
(:mod:`rrto_server.taskstats`).
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from typing import Any, Callable

import torch

from rrto_server.cpu_workers import CpuWorkers
from rrto_server.models import ModelRegistry
from rrto_server.naive import NaiveSessions
from rrto_server.replay import Replay
from rrto_server.replay_cache import ReplayCache
from rrto_server.requests import Request
from rrto_server.lanes import DROP, EXCLUSIVE, Job
from rrto_server.scheduler import Scheduler
from rrto_server.stats import ServerStats
from rrto_server.taskstats import TaskStats
from rrto_wire import protocol as wire
from rrto_wire.errors import ErrorCode, ProtocolError, clip
from rrto_wire.messages import Scheduled

log = logging.getLogger('rrto_server.jobs')


@dataclass
class Services:
    """What jobs work with: the server's collaborators, never the server itself."""

    device: torch.device
    stats: ServerStats
    tasks: TaskStats
    registry: ModelRegistry
    replays: ReplayCache
    naive: NaiveSessions
    scheduler: Scheduler
    cpu: CpuWorkers
    on_io_thread: Callable[[], bool]
    cpu_backend: str
    profile_utilisation: bool
    max_decoded_bytes: int


def job_keys(header: Scheduled, received: float, task_late: dict | None = None,
             late_default: str = DROP) -> dict:
    """
    Return the Job keyword arguments of a request's (already validated) scheduling fields.

    ``priority`` is an integer (higher runs first); ``deadline_ms`` is relative
    to the server's arrival time; ``late`` ('drop' or 'run') overrides the
    server's per-task setting, which overrides the server default.
    """
    late = header.late
    if late is None:
        late = (task_late or {}).get(header.task, late_default)
    deadline = received + header.deadline_ms / 1e3 if header.deadline_ms else math.inf
    return {'priority': header.priority, 'deadline': deadline, 'task': header.task,
            'late': late, 'received': received}


def replay_info(replay: Replay, recorded: bool) -> dict[str, Any]:
    """Return the fields of a record reply (and of a replay in ``stats``)."""
    return {'replay': replay.key, 'recorded': recorded, 'record_ms': replay.record_ms,
            'segments': replay.num_segments, 'backend': replay.backend, 'nbytes': replay.nbytes,
            'label': replay.model.label, 'utilisation': replay.utilisation,
            'segment_ms': [round(ms, 4) for ms in replay.segment_ms]}


class InferJob(Job):
    """One INFER request through its CPU, device and CPU phases."""

    def __init__(self, services: Services, request: Request, replay: Replay, frames: list,
                 client: str | None = None, **keys):
        utilisation = EXCLUSIVE if replay.utilisation is None else replay.utilisation
        super().__init__(**keys, utilisation=utilisation,
                         resource=replay.key if replay.shares_buffers else None)
        self.services, self.request, self.replay, self.frames = services, request, replay, frames
        self.client = client        # the key that sent it (per-task counters), if keys are used
        self.execution = None
        self.inline = False     # served start to end on the I/O thread (see Server._on_infer)

    @property
    def total_steps(self) -> int:
        return self.replay.num_segments

    # ---------------------------------------------------------------- phase 1 (CPU worker)
    def prepare(self, submit: bool = True) -> bool:
        """
        Decode and stage the inputs, then queue the job (unless not ``submit``).

        Returns False when the request was answered with an error instead.
        """
        if self._expired():
            return False
        try:
            tensors = wire.decode_tensors(self.request.header.tensors, self.frames,
                                          self.services.max_decoded_bytes)
            self.frames = None
            self.execution = self.replay.start(tensors)
        except ProtocolError as exc:
            self.outcome = 'failed'
            self._reply_error(exc)
            return False
        except Exception as exc:  # e.g. out of device memory while staging: answer, go on
            log.exception('preparing an inference failed')
            self.outcome = 'failed'
            self._reply_error(ProtocolError(ErrorCode.INTERNAL, f'{type(exc).__name__}: {exc}'))
            return False
        self.services.stats.count(self.replay.model.digest, 'infers')
        if submit:
            self.services.scheduler.submit(self)
        return True

    def _expired(self) -> bool:
        """Answer 'deadline' and return True if the deadline passed before the start ('drop')."""
        now = time.perf_counter()
        if self.late == DROP and now > self.deadline:
            self.outcome = 'expired'
            self._reply_error(ProtocolError(
                ErrorCode.DEADLINE,
                f'task {self.task!r}: deadline passed {(now - self.deadline) * 1e3:.1f} ms '
                f"before the request could start (still decoding; late policy 'drop')"))
            return True
        return False

    # ---------------------------------------------------------------- phase 2 (device lane)
    def step(self) -> bool:
        # on the I/O thread (the idle fast path) the outputs are copied back in the step that
        # finishes them, large ones too: nothing waits for the lane, one synchronisation less
        self.execution.copy_on_lane = self.inline and self.services.on_io_thread()
        try:
            return self.execution.step()
        except ProtocolError:
            raise
        except Exception as exc:
            raise self._failed_on_input(exc) from None

    def _failed_on_input(self, exc: Exception) -> ProtocolError:
        # the uploaded program raised on this input (a size it computes is negative, an
        # allocation too large): the client's model fails here as it would locally, which is
        # not a server error
        log.info('replay %s failed on its input: %s', self.replay.key, clip(exc))
        return ProtocolError(ErrorCode.EXEC_FAILED,
                             f'the model failed on this input: {type(exc).__name__}: {clip(exc)}')

    def release(self) -> None:
        if self.execution is not None:
            self.execution.release()

    def complete(self) -> None:
        # answered by the thread that finished the job when the reply needs no copy: the I/O
        # thread of an idle device, or a lane whose last step already copied the outputs
        # into page-locked buffers (small ones, see rrto_server.runner_cudagraph); the hand-off
        # to a CPU worker cost the urgent task of bench.sched_mix 0.07 ms at p50 (H200)
        if (self.inline and self.services.on_io_thread()) or self.execution.on_host:
            self._reply()
        else:
            self.services.cpu.submit(self.urgency(), self._reply)

    def fail(self, error: ProtocolError) -> None:
        if self.inline and self.services.on_io_thread():
            self._reply_error(error)
        else:
            self.services.cpu.submit(self.urgency(), lambda: self._reply_error(error))

    # ---------------------------------------------------------------- phase 3 (CPU worker)
    def timing(self) -> dict:
        """Return the reply's ``timing`` field (milliseconds and counts)."""
        # (on the request path, before the reply: read each attribute once, call nothing)
        received, started, ready_at, finished = (self.received, self.started, self.ready_at,
                                                 self.finished)
        return {'queue_ms': 0.0 if started is None else (started - received) * 1e3,
                'compute_ms': self.compute_s * 1e3,
                'prepare_ms': 0.0 if ready_at is None else (ready_at - received) * 1e3,
                'segments': self.replay.runner.num_segments,
                'preemptions': self.preemptions, 'packed_steps': self.packed_steps,
                'deadline_missed': ((finished is not None and finished > self.deadline)
                                    or self.outcome in ('expired', 'abandoned'))}

    def _reply(self) -> None:
        execution = self.execution
        try:
            outputs = execution.host_outputs()
        except Exception as exc:  # a failed copy-back is this request's error, nobody else's
            log.exception('copying outputs back failed')
            execution.release_buffers()
            self.outcome = 'failed'
            self._reply_error(ProtocolError(ErrorCode.EXEC_FAILED, f'{type(exc).__name__}: {exc}'))
            return
        execution.outputs = None
        self.replay.served(self.compute_s)     # the replay's cost now (Server._inline_ok)
        self._count()
        # sent from page-locked buffers: they go back to the replay once ZeroMQ is done
        self.request.ok(outputs, on_sent=execution.release_buffers, timing=self.timing())

    def _reply_error(self, error: ProtocolError) -> None:
        self.services.stats.count(self.replay.model.digest, 'errors')
        self._count()
        self.request.error(error)

    def _count(self, answered: float | None = None) -> None:
        # ``answered``: when the reply was stamped, if counted after it was sent
        outcome = self.outcome or 'failed'
        self.services.tasks.ended(
            self.task, outcome, (answered or time.perf_counter()) - self.received,
            client=self.client, late=outcome == 'completed' and self.late_finish,
            queue_s=self.queue_s, preempt_s=self.preempt_s, preemptions=self.preemptions)


class OpJob(Job):
    """One naive-mode operator (the baseline); runs alone."""

    def __init__(self, services: Services, request: Request, session: str, tensors):
        keys = job_keys(request.header, request.received)
        keys.update(late='run', task=keys['task'] or '(naive)')
        super().__init__(**keys, utilisation=EXCLUSIVE)
        self.services, self.request, self.session, self.tensors = \
            services, request, session, tensors
        self.fetched: list = []

    def step(self) -> bool:
        self.fetched = self.services.naive.run(self.session, self.request.header, self.tensors)
        self.services.stats.count(self.request.header.model, 'ops')
        return True

    def complete(self) -> None:
        self.request.ok(self.fetched, timing={
            'queue_ms': (self.queue_s or 0.0) * 1e3, 'compute_ms': self.compute_s * 1e3})

    def fail(self, error: ProtocolError) -> None:
        self.request.error(error)
