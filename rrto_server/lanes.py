"""
The units of device work and where their steps run: :class:`Job` and :class:`Lane`.

A job advances in steps (one replay segment, one recording, one naive
operator) and carries what the scheduler orders it by (priority, deadline,
arrival) and what the server reports about it (queue time, preemptions).
A lane runs one step at a time on a CUDA stream or a plain thread.  The
order in which lanes take jobs is :mod:`rrto_server.scheduler`'s business.
"""

from __future__ import annotations

import math
import threading
import time

from rrto_wire.errors import ProtocolError

DROP, RUN = 'drop', 'run'
LATE_POLICIES = (DROP, RUN)
EXCLUSIVE = math.inf   # utilisation of a job that must run alone (unprofiled, recordings)

_THREAD = threading.local()    # the lane stream each thread has made its current stream


class Job:
    """A unit of device work; subclasses implement :meth:`step`, :meth:`complete`, :meth:`fail`."""

    # what every job starts with, set on the job once it changes (one job per request: its
    # construction is on the request path, issue 11)
    seq = 0
    ready_at: float | None = None   # handed to the scheduler
    started: float | None = None    # first step began
    finished: float | None = None
    outcome: str | None = None      # completed | expired | abandoned | failed
    compute_s = 0.0
    steps_done = 0
    preemptions = 0
    packed_steps = 0
    contended = False               # arrived as the most urgent, a less urgent one running
    overdue = False                 # late='run' and queued past its deadline (scheduler)

    def __init__(self, priority: int = 0, deadline: float = math.inf, task: str = '',
                 late: str = DROP, received: float | None = None,
                 utilisation: float = EXCLUSIVE, resource: object = None):
        self.priority = int(priority)
        self.deadline = float(deadline)
        self.task = task
        self.late = late
        self.received = time.perf_counter() if received is None else received
        self.utilisation = utilisation
        self.resource = resource            # jobs with the same resource never co-run

    def urgency(self) -> tuple:
        """
        Return the sort key of the priority policies: priority desc, deadline asc, arrival.

        A job queued past its deadline with ``late='run'`` orders as one without a
        deadline: a deadline already missed must not outrank work that can still meet
        its own (a11 #5: ``deadline_ms=0.001, late='run'`` was first in its band).
        """
        return (-self.priority, math.inf if self.overdue else self.deadline, self.seq)

    @property
    def late_finish(self) -> bool:
        """Return True when the job completed after its deadline."""
        return self.finished is not None and self.finished > self.deadline

    @property
    def queue_s(self) -> float | None:
        """Return server arrival to first step, or None if it never started."""
        return None if self.started is None else self.started - self.received

    @property
    def preempt_s(self) -> float | None:
        """Return ready-for-device to first step when the job arrived under contention."""
        if self.started is None or not self.contended or self.ready_at is None:
            return None
        return self.started - self.ready_at

    @property
    def total_steps(self) -> int | None:
        """Return the number of steps the job needs, when known."""
        return None

    def step(self) -> bool:
        """Advance by one unit; return True when the job is finished."""
        raise NotImplementedError

    def complete(self) -> None:
        """Deliver the result (called once, after the last step)."""

    def fail(self, error: ProtocolError) -> None:
        """Deliver an error instead of a result (called at most once)."""

    def release(self) -> None:
        """Drop device state of a job that will not finish (abandoned, failed, shut down)."""


class Lane:
    """
    Where steps run: a CUDA stream of a given priority, or a plain thread on the CPU.

    :meth:`run` returns only when the device has finished the step, so the
    scheduler never has more than one step per lane in flight: that is what
    bounds the preemption latency by one segment.
    """

    def __init__(self, index: int, device=None, stream_priority: int = 0):
        self.index = index
        self.stream = None
        if device is not None and getattr(device, 'type', None) == 'cuda':
            import torch
            self.stream = torch.cuda.Stream(device, priority=stream_priority)
        self.job: Job | None = None
        self.since = 0.0
        self.last: Job | None = None

    def run(self, job: Job, to_end: bool) -> bool:
        """Run one step of ``job`` (all remaining steps if ``to_end``); return True if done."""
        stream = self.stream
        if stream is not None and getattr(_THREAD, 'stream', None) is not stream:
            self.make_current()
        try:
            while True:
                done = job.step()
                job.steps_done += 1
                if done or not to_end:
                    return done
        finally:
            if stream is not None:
                stream.synchronize()

    def make_current(self) -> None:
        """Make the lane's CUDA stream the calling thread's current stream (and keep it so)."""
        # a lane's thread (and the I/O thread, which runs lane 0's steps when the device is
        # idle) keeps the lane's stream current instead of entering and leaving a stream
        # context every step; the server's other stream switches are contexts, which
        # restore it
        stream = self.stream
        if getattr(_THREAD, 'stream', None) is not stream:
            import torch
            torch.cuda.set_stream(stream)
            _THREAD.stream = stream


def make_lanes(device, count: int) -> list[Lane]:
    """Return lane 0 (highest stream priority) and, if ``count`` is 2, lane 1 (lowest)."""
    if count not in (1, 2):
        raise ValueError('a scheduler has one or two lanes')
    return [Lane(0, device, stream_priority=-100), Lane(1, device, stream_priority=0)][:count]
