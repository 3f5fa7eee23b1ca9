"""
The express path's request as a scheduler job: :class:`ExpressJob`, served in one call.

The common inference (:mod:`rrto_server.express`) is served on the I/O thread:
:meth:`ExpressJob.serve` takes lane 0 of an idle device
(:meth:`~rrto_server.inline_runs.InlineRuns.take_idle`), runs the express
replay, builds the reply while the device runs it, waits for the lane's
stream, sends the reply, hands the lane back and counts the request, without
the layers of the general path (:class:`~rrto_server.jobs.InferJob`, whose
phases and counts it keeps: one reply, one outcome, the same fields).
"""

from __future__ import annotations

import logging
import math
import time

import torch

from rrto_server.jobs import InferJob, Services
from rrto_server.lanes import DROP, EXCLUSIVE
from rrto_server.replay import Replay
from rrto_server.requests import Request
from rrto_wire import protocol as wire
from rrto_wire.errors import ErrorCode, ProtocolError, detached

log = logging.getLogger('rrto_server.jobs')


class ExpressJob(InferJob):
    """
    An INFER on the express path (:mod:`rrto_server.express`), served on the I/O thread.

    Serve it only through :meth:`serve`: on an idle device it takes lane 0 and runs
    its one step itself; otherwise :meth:`~rrto_server.scheduler.Scheduler.run_inline`
    decides (a preemption by the most urgent job at the next segment boundary).
    When that declines, serve the request as an :class:`InferJob`.
    """

    inline = True       # served start to end on the I/O thread
    frames = execution = outputs = None

    def __init__(self, services: Services, request: Request, replay: Replay, buffers: list,
                 client: str | None, task_late: dict | None = None, late_default: str = DROP):
        # Job's fields, as job_keys and Job.__init__ set them, without their calls: one
        # object and one call per request (issue 11)
        header = request.header
        late = header.late
        if late is None:
            late = task_late.get(header.task, late_default) if task_late else late_default
        received = deadline = request.received
        deadline_ms = header.deadline_ms
        self.deadline = deadline + deadline_ms / 1e3 if deadline_ms else math.inf
        self.priority, self.task, self.late, self.received = (header.priority, header.task,
                                                              late, received)
        utilisation = replay.utilisation
        self.utilisation = EXCLUSIVE if utilisation is None else utilisation
        self.resource = replay.key if replay.shares_buffers else None
        self.services, self.request, self.replay, self.client = services, request, replay, client
        self.buffers = buffers      # the request's frames, accepted by replay.express

    def serve(self, wait_s: float) -> bool:
        """
        Answer the request on this thread if the device lets it; return False if not.

        Idle device (nothing queued, no lane busy): lane 0 is taken, the express
        replay launched, the reply's header and body built while the device runs it
        (all but its end times), the lane's stream waited for and the reply sent,
        in this one call: the layers of ``run_inline``, ``Lane.run`` and
        :meth:`complete` without their calls (issue 11).  Otherwise
        ``run_inline(wait_s)`` decides.  A request whose deadline already passed
        ('drop') is answered ``deadline_missed``.  False: nothing was done (serve it
        as an :class:`InferJob`).
        """
        if self.deadline < math.inf and self._expired():
            return True
        scheduler = self.services.scheduler
        lane = scheduler.take_idle(self)
        if lane is None:
            return scheduler.run_inline(self, wait_s)
        stream, error = lane.stream, None
        try:
            if stream is not None:
                lane.make_current()
            self.step()                           # the replay launched
            outputs, self.outputs = self.outputs, None
            reply = self.reply_parts(outputs)     # the device may still be running
        except ProtocolError as exc:     # kept past this block: without its frames (a16 #3)
            error = detached(exc)
        except Exception as exc:  # a bug: answered as the scheduler answers one
            log.exception('job of task %r failed', self.task)
            error = ProtocolError(ErrorCode.INTERNAL, f'{type(exc).__name__}: {exc}')
        finally:
            try:
                if stream is not None:
                    stream.synchronize()     # as Lane.run waits for its step
            except Exception as exc:  # as the scheduler answers a lane's error
                log.exception('job of task %r failed', self.task)
                error = ProtocolError(ErrorCode.INTERNAL, f'{type(exc).__name__}: {exc}')
            end = scheduler.clock()
            self.steps_done += 1
        if error is not None:
            scheduler.step_ended(lane, self, True, error, end)
            self.outcome = 'failed'
            self._reply_error(error)
            return True
        answered = time.perf_counter()
        try:        # the reply first, the lane's bookkeeping and the counts after it
            self._ok(*reply, end - lane.since, end)
        finally:
            scheduler.step_ended(lane, self, True, None, end)
            self._counted(answered)
        return True

    def step(self) -> bool:
        try:
            self.outputs = self.replay.express.run(self.buffers)
        except ProtocolError:
            raise
        except Exception as exc:
            raise self._failed_on_input(exc) from None
        finally:
            self.buffers = None
        return True

    def release(self) -> None:
        self.buffers = self.outputs = None

    def complete(self) -> None:
        outputs, self.outputs = self.outputs, None
        answered = time.perf_counter()
        try:
            self._ok(*self.reply_parts(outputs), self.compute_s, self.finished)
        finally:
            self._counted(answered)

    def reply_parts(self, outputs: list[torch.Tensor]) -> tuple[dict, tuple, int]:
        """
        Return the reply's header, body and body size, but for what the step's end sets.

        That is ``compute_ms``, ``deadline_missed`` and ``server_ms``; :meth:`serve`
        builds the rest while the device runs the graph (its outputs' buffers are
        read only when the reply is sent, after the wait).
        """
        received, started, ready_at = self.received, self.started, self.ready_at
        body, nbytes = self.replay.express.reply(outputs)
        return wire.ok_header(self.request.header.id, timing={
            'queue_ms': (started - received) * 1e3, 'compute_ms': 0.0,
            'prepare_ms': (ready_at - received) * 1e3,
            'segments': self.replay.runner.num_segments, 'preemptions': self.preemptions,
            'packed_steps': self.packed_steps, 'deadline_missed': False}), body, nbytes

    def _ok(self, header: dict, body: tuple, nbytes: int, compute_s: float,
            finished: float) -> None:
        timing = header['timing']
        timing['compute_ms'] = compute_s * 1e3
        timing['deadline_missed'] = finished > self.deadline      # it completed
        plan = self.replay.express
        self.request.ok_ready(header, body, nbytes, plan.sent if plan.body is not None else None)

    def _counted(self, answered: float) -> None:
        # the counters follow the reply: none of them is on the request's path (H200,
        # squeezenet1_1: the served-time median and the task counters took 0.014 ms there)
        self.replay.served(self.compute_s)
        self._count(answered)

    def fail(self, error: ProtocolError) -> None:
        self._reply_error(error)

    def _count(self, answered: float | None = None) -> None:
        # every count of the request, after its answer: its arrival (the general path counts
        # that before queueing) and how it ended in one count, the inference if it ran
        services = self.services
        if self.started is not None:
            services.stats.count(self.replay.model.digest, 'infers')
            self.replay.runs += 1
        outcome = self.outcome or 'failed'
        services.tasks.arrived_and_ended(
            self.task, self.priority, outcome,
            (answered or time.perf_counter()) - self.received, client=self.client,
            late=outcome == 'completed' and self.late_finish, queue_s=self.queue_s,
            preempt_s=self.preempt_s, preemptions=self.preemptions)
