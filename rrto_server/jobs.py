"""
Requests as scheduler jobs: inference, recording, naive operators.

An inference passes through three phases on three kinds of thread:

1. CPU worker (:meth:`InferJob.prepare`): drop it at once if its deadline has
   already passed, decode the tensor frames (codecs included), check the
   signature and stage the inputs on the device; then hand it to the
   scheduler.
2. Device lane (:meth:`InferJob.step`): one replay segment per step.
3. CPU worker (:meth:`InferJob._reply`): copy the outputs back, encode and
   send the reply.

The I/O thread only validates the header, looks the replay up and queues
phase 1.  Every request ends in exactly one reply, and in exactly one
per-task outcome (:mod:`rrto_server.taskstats`).
"""

from __future__ import annotations

import logging
import math
import time
from typing import TYPE_CHECKING

from rrto_server import profiling
from rrto_wire.op_timing import operator_times
from rrto_wire import protocol as wire
from rrto_wire.protocol import ErrorCode, ProtocolError
from rrto_server.replay import Replay
from rrto_server.scheduler import DROP, EXCLUSIVE, LATE_POLICIES, Job

if TYPE_CHECKING:
    from rrto_server.server import Server, _Request

log = logging.getLogger('rrto_server.jobs')

MAX_TASK_NAME = 128


def job_keys(header: dict, received: float, task_late: dict | None = None,
             late_default: str = DROP) -> dict:
    """
    Validate a request's scheduling fields and return the Job keyword arguments.

    ``priority`` is any integer (higher runs first); ``deadline_ms`` is relative
    to the server's arrival time; ``late`` ('drop' or 'run') overrides the
    server's per-task setting, which overrides the server default.
    """
    priority = header.get('priority', 0)
    deadline_ms = header.get('deadline_ms')
    task = header.get('task', '')
    late = header.get('late')
    if not isinstance(priority, int) or isinstance(priority, bool):
        raise ProtocolError(ErrorCode.BAD_REQUEST, "'priority' must be an integer")
    if deadline_ms is not None and (not isinstance(deadline_ms, (int, float))
                                    or isinstance(deadline_ms, bool)
                                    or not 0 < deadline_ms < math.inf):
        raise ProtocolError(ErrorCode.BAD_REQUEST, "'deadline_ms' must be a positive number")
    if not isinstance(task, str) or len(task) > MAX_TASK_NAME:
        raise ProtocolError(ErrorCode.BAD_REQUEST,
                            f"'task' must be a string of at most {MAX_TASK_NAME} characters")
    if late is not None and late not in LATE_POLICIES:
        raise ProtocolError(ErrorCode.BAD_REQUEST, f"'late' must be one of {LATE_POLICIES}")
    if late is None:
        late = (task_late or {}).get(task, late_default)
    deadline = received + deadline_ms / 1e3 if deadline_ms else math.inf
    return {'priority': priority, 'deadline': deadline, 'task': task, 'late': late,
            'received': received}


class InferJob(Job):
    """One INFER request through its CPU, device and CPU phases."""

    def __init__(self, server: 'Server', request: '_Request', replay: Replay, frames: list,
                 **keys):
        utilisation = EXCLUSIVE if replay.utilisation is None else replay.utilisation
        super().__init__(**keys, utilisation=utilisation,
                         resource=replay.key if replay.shares_buffers else None)
        self.server, self.request, self.replay, self.frames = server, request, replay, frames
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
        now = time.perf_counter()
        if self.late == DROP and now > self.deadline:
            self.outcome = 'expired'
            self._reply_error(ProtocolError(
                ErrorCode.DEADLINE,
                f'task {self.task!r}: deadline passed {(now - self.deadline) * 1e3:.1f} ms '
                f"before the request could start (still decoding; late policy 'drop')"))
            return False
        try:
            tensors = wire.decode_tensors(self.request.header, self.frames)
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
        self.server.stats.count(self.replay.model.digest, 'infers')
        if submit:
            self.server.scheduler.submit(self)
        return True

    # ---------------------------------------------------------------- phase 2 (device lane)
    def step(self) -> bool:
        return self.execution.step()

    def release(self) -> None:
        if self.execution is not None:
            self.execution.release()

    def complete(self) -> None:
        if self.inline and self.server.on_io_thread():
            self._reply()       # the device was idle and still is ours: no hand-off
        else:
            self.server.cpu.submit(self.urgency(), self._reply)

    def fail(self, error: ProtocolError) -> None:
        if self.inline and self.server.on_io_thread():
            self._reply_error(error)
        else:
            self.server.cpu.submit(self.urgency(), lambda: self._reply_error(error))

    # ---------------------------------------------------------------- phase 3 (CPU worker)
    def timing(self) -> dict:
        """Return the reply's ``timing`` field (milliseconds and counts)."""
        return {'queue_ms': (self.queue_s or 0.0) * 1e3, 'compute_ms': self.compute_s * 1e3,
                'segments': self.replay.num_segments, 'preemptions': self.preemptions,
                'packed_steps': self.packed_steps,
                'deadline_missed': self.late_finish or self.outcome in ('expired', 'abandoned')}

    def _reply(self) -> None:
        try:
            outputs = self.execution.host_outputs()
        except Exception as exc:  # a failed copy-back is this request's error, nobody else's
            log.exception('copying outputs back failed')
            self.outcome = 'failed'
            self._reply_error(ProtocolError(ErrorCode.EXEC_FAILED, f'{type(exc).__name__}: {exc}'))
            return
        self.execution.outputs = None
        self._count()
        self.server._ok(self.request, outputs, timing=self.timing())

    def _reply_error(self, error: ProtocolError) -> None:
        self.server.stats.count(self.replay.model.digest, 'errors')
        self._count()
        self.server._error(self.request, error)

    def _count(self) -> None:
        outcome = self.outcome or 'failed'
        self.server.tasks.ended(
            self.task, outcome, time.perf_counter() - self.received,
            late=outcome == 'completed' and self.late_finish, queue_s=self.queue_s,
            preempt_s=self.preempt_s, preemptions=self.preemptions)


class RecordJob(Job):
    """Record a replay (and profile it) while holding every lane."""

    def __init__(self, server: 'Server', key: str, digest: str, signature, options,
                 header: dict, received: float):
        keys = job_keys(header, received)
        keys.update(late='run', deadline=math.inf, task=keys['task'] or '(record)')
        super().__init__(**keys, utilisation=EXCLUSIVE)
        self.server, self.key, self.digest = server, key, digest
        self.signature, self.options = signature, options
        self.replay: Replay | None = None

    def step(self) -> bool:
        model = self.server.registry.get(self.digest)
        replay = Replay(model, self.signature, self.options, self.server.device,
                        self.server.config.cpu_backend)
        try:
            profiling.profile(replay, utilisation=self.server.profile_utilisation)
        except Exception:  # an unprofiled replay still serves; it just never packs
            log.exception('profiling %s failed', self.key)
        self.replay = replay
        self.server.replays.add(replay)
        self.server.stats.count(self.digest, 'records')
        return True

    def complete(self) -> None:
        self.server._finish_record(self.key, self.replay, None)

    def fail(self, error: ProtocolError) -> None:
        self.server._finish_record(self.key, None, error)


class OpJob(Job):
    """One naive-mode operator (the baseline); runs alone."""

    def __init__(self, server: 'Server', request: '_Request', session: str, tensors):
        keys = job_keys(request.header, request.received)
        keys.update(late='run', task=keys['task'] or '(naive)')
        super().__init__(**keys, utilisation=EXCLUSIVE)
        self.server, self.request, self.session, self.tensors = server, request, session, tensors
        self.fetched: list = []

    def step(self) -> bool:
        self.fetched = self.server.naive.run(self.session, self.request.header, self.tensors)
        self.server.stats.count(str(self.request.header.get('model')), 'ops')
        return True

    def complete(self) -> None:
        self.server._ok(self.request, self.fetched, timing={
            'queue_ms': (self.queue_s or 0.0) * 1e3, 'compute_ms': self.compute_s * 1e3})

    def fail(self, error: ProtocolError) -> None:
        self.server._error(self.request, error)


class ProfileJob(Job):
    """Time every operator of a stored program on the server's device (for the planner)."""

    def __init__(self, server: 'Server', request: '_Request', digest: str, repeats: int):
        keys = job_keys(request.header, request.received)
        keys.update(late='run', task=keys['task'] or '(profile)')
        super().__init__(**keys, utilisation=EXCLUSIVE)
        self.server, self.request, self.digest, self.repeats = server, request, digest, repeats
        self.profile: dict = {}

    def step(self) -> bool:
        model = self.server.registry.get(self.digest)
        if model.program is None:
            raise ProtocolError(ErrorCode.BAD_REQUEST, 'only rrto-program models can be profiled')
        program, device = model.program, self.server.device
        module = program.module(model.weights(device), device)
        inputs = profiling.example_tensors(program.signature)
        self.profile = operator_times(module, inputs, device, self.repeats)
        return True

    def complete(self) -> None:
        self.server._ok(self.request, profile=self.profile, device=str(self.server.device))

    def fail(self, error: ProtocolError) -> None:
        self.server._error(self.request, error)
