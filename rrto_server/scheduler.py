"""
Order the server's device work: priorities, deadlines, preemption, packing.

Every unit of device work is a :class:`Job` that advances in steps (one replay
segment, one recording, one naive operator).  Steps run on device *lanes*:
lane 0 on a high-priority CUDA stream and, when packing is on (``theta > 0``),
lane 1 on a low-priority stream; on a CPU server a lane is a thread.  A lane
thread picks a job, runs one step, waits until the device has finished it,
and picks again.

Policies (one code path, chosen by server configuration):

``fifo``
    arrival order; a started job runs to its end.
``priority``
    priority (higher first), then earliest deadline; a started job runs to
    its end (priority without preemption).
``preemptive``
    priority, then earliest deadline, chosen again after every segment: a
    more urgent arrival starts at the next segment boundary and the
    suspended job resumes later from its saved intermediate tensors.

Packing (RT-mDL's rule): lane 1 runs a step of a job less urgent than lane 0's
job only while their profiled utilisations sum to at most ``theta``, and only
if the pair would also fit with any more urgent job that is about to take
lane 0.  No lane ever starts a step whose pair with the other lane's running
step exceeds ``theta`` (lane 0 waits for lane 1's step instead), so the rule
holds at every instant.  A task may have its own threshold (``task_theta``,
from the strategy file): a pair of jobs packs only within the smaller of the
two tasks' thresholds, so a task with threshold 0 never shares the device.
Jobs that share device buffers (executions of one CUDA-graph replay) never
run side by side.

Deadlines: a ``late='drop'`` job whose deadline passes before it starts is
answered with ``deadline_missed`` as soon as the deadline passes (a reaper
thread wakes for the earliest one, even while every lane is busy), and a
started one whose deadline passes while it waits between two segments is
abandoned the same way; a ``late='run'`` job runs anyway and is flagged late, and
once queued past its deadline it orders as a job without one (``Job.overdue``), so
a deadline claimed already missed never outranks work that can meet its own.
"""

from __future__ import annotations

import bisect
import collections
import itertools
import logging
import math
import threading
import time
from typing import Callable, Sequence

from rrto_server.inline_runs import InlineRuns
from rrto_server.lanes import DROP, RUN, Job, Lane, make_lanes
from rrto_wire.errors import ErrorCode, ProtocolError, detached
from rrto_wire.summary import summarise

log = logging.getLogger('rrto_server.scheduler')

FIFO, PRIORITY, PREEMPTIVE = 'fifo', 'priority', 'preemptive'
POLICIES = (FIFO, PRIORITY, PREEMPTIVE)


class Scheduler(InlineRuns):
    """Lane threads serving jobs under one policy (see the module docstring)."""

    def __init__(self, policy: str = PREEMPTIVE, theta: float = 0.0, device=None,
                 lanes: Sequence[Lane] | None = None, trace: int = 0,
                 clock: Callable[[], float] = time.perf_counter, name: str = 'rrto-gpu',
                 task_theta: dict[str, float] | None = None):
        if policy not in POLICIES:
            raise ValueError(f'policy must be one of {POLICIES}, got {policy!r}')
        if not theta >= 0 or not all(t >= 0 for t in (task_theta or {}).values()):
            raise ValueError('theta must be >= 0 (0 turns packing off)')
        self.policy = policy
        self.preemptive = policy == PREEMPTIVE       # (InlineRuns)
        self.theta = float(theta)
        self.task_theta = {str(k): float(v) for k, v in (task_theta or {}).items()}
        self.lanes = list(lanes) if lanes is not None else make_lanes(device,
                                                                      2 if theta > 0 else 1)
        self.clock = clock
        self.epoch = clock()
        self._key = (lambda job: (job.seq,)) if policy == FIFO else Job.urgency
        self._ready: list[Job] = []
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)      # lanes wait here
        self._reaper_wake = threading.Condition(self._lock)
        self._seq = itertools.count(1)
        self._stop = False
        # the job run_inline waits to run once the lanes' steps end (none starts another)
        self._inline: Job | None = None
        self._outwaited: tuple | None = None     # the steps the last such wait ran out on
        self.counters = collections.Counter(steps=0, preemptions=0, packed_steps=0, completed=0,
                                            expired=0, abandoned=0, failed=0)
        self._preempt_ms: collections.deque = collections.deque(maxlen=4096)
        self.trace: collections.deque | None = collections.deque(maxlen=trace) if trace else None
        self._threads = [threading.Thread(target=self._lane_loop, args=(lane,),
                                          name=f'{name}-lane{lane.index}', daemon=True)
                         for lane in self.lanes]
        self._threads.append(threading.Thread(target=self._reaper_loop, name=f'{name}-reaper',
                                              daemon=True))
        for thread in self._threads:
            thread.start()

    # ------------------------------------------------------------------ public
    def submit(self, job: Job) -> None:
        """Queue a job; it is answered exactly once (result, error, or deadline_missed)."""
        with self._cond:
            if self._stop:
                dropped = [(job, 'failed', ProtocolError(ErrorCode.OVERLOADED,
                                                         'server is shutting down'))]
            else:
                job.seq = next(self._seq)
                job.ready_at = self.clock()
                self._mark_overdue(job, job.ready_at)
                # a preemption case: a less urgent job holds a lane and nothing queued or
                # running is more urgent than this one (so its wait is the preemption delay)
                urgency = job.urgency()
                running = [lane.job.urgency() for lane in self.lanes if lane.job is not None]
                ahead = self._ready if self._inline is None else self._ready + [self._inline]
                job.contended = (any(u > urgency for u in running)
                                 and not any(u < urgency for u in running)
                                 and not any(j.urgency() < urgency for j in ahead))
                bisect.insort(self._ready, job, key=self._key)
                dropped = self._purge(job.ready_at)
                self._cond.notify_all()
                self._reaper_wake.notify()
        self._deliver(dropped)

    def pending(self) -> int:
        with self._cond:
            return len(self._ready)

    def running(self) -> list[dict]:
        """Return what each busy lane is running now (for tests, benchmarks and stats)."""
        with self._cond:
            return [{'lane': lane.index, 'task': lane.job.task, 'priority': lane.job.priority,
                     'steps_done': lane.job.steps_done} for lane in self.lanes if lane.job]

    def snapshot(self) -> dict:
        """Return policy, counters, preemption latency and (if enabled) the trace, JSON-ready."""
        with self._cond:
            data = {'policy': self.policy, 'theta': self.theta, 'task_theta': self.task_theta,
                    'lanes': len(self.lanes),
                    'pending': len(self._ready), **self.counters,
                    'preempt_ms': summarise(self._preempt_ms)}
            if self.trace is not None:     # its times are ms after ``epoch`` (the clock's)
                data['epoch'] = self.epoch
                data['trace'] = [dict(zip(('lane', 'task', 'job', 'start_ms', 'end_ms', 'util'),
                                          entry)) for entry in self.trace]
        return data

    def close(self, timeout: float = 5.0) -> None:
        """Stop the lanes after their current step; fail every job still queued."""
        with self._cond:
            self._stop = True
            self._cond.notify_all()
            self._reaper_wake.notify()
        for thread in self._threads:
            thread.join(timeout)
        with self._cond:
            pending, self._ready = self._ready, []
        self._deliver([(job, 'failed', ProtocolError(ErrorCode.OVERLOADED,
                                                     'server is shutting down'))
                       for job in pending])

    # ------------------------------------------------------------------ choosing (under lock)
    @staticmethod
    def _mark_overdue(job: Job, now: float) -> None:
        # before it enters the queue: a job's sort key never changes while it is queued
        if job.late == RUN and now > job.deadline:
            job.overdue = True

    def _fits(self, a: Job, b: Job) -> bool:
        if a.resource is not None and a.resource == b.resource:
            return False
        limit = min(self.task_theta.get(job.task, self.theta) for job in (a, b))
        return a.utilisation + b.utilisation <= limit + 1e-9

    def _pick(self, lane: Lane) -> Job | None:
        # a lane is busy while run_inline uses it, and reserved while run_inline waits for it
        if not self._ready or lane.job is not None or self._inline is not None:
            return None
        if lane.index == 0:
            head = self._ready[0]
            others = [other.job for other in self.lanes[1:] if other.job is not None]
            # never skip the most urgent job: wait for the other lane's step instead
            return head if all(self._fits(head, other) for other in others) else None
        primary = self.lanes[0].job
        if primary is None:
            return None         # an idle lane 0 takes the head itself
        key = self._key(primary)
        urgent = [job for job in self._ready if self._key(job) < key]
        for job in self._ready:
            if self._key(job) < key:
                continue        # more urgent than lane 0's job: it takes lane 0 next
            if self._fits(job, primary) and all(self._fits(job, u) for u in urgent):
                return job
        return None

    def _purge(self, now: float) -> list[tuple[Job, str, ProtocolError]]:
        dropped = []
        for job in [j for j in self._ready if j.late == DROP and now > j.deadline]:
            self._ready.remove(job)
            job.finished = now
            late_ms = (now - job.deadline) * 1e3
            if job.started is None:
                job.outcome = 'expired'
                message = (f'task {job.task!r}: deadline passed {late_ms:.1f} ms before the '
                           f'request could start (waited {(now - job.received) * 1e3:.1f} ms; '
                           f"late policy 'drop')")
            else:
                job.outcome = 'abandoned'
                total = job.total_steps
                message = (f'task {job.task!r}: deadline passed after {job.steps_done}'
                           f'{"" if total is None else f" of {total}"} segments; abandoned '
                           f"{late_ms:.1f} ms late (late policy 'drop')")
            self.counters[job.outcome] += 1
            dropped.append((job, job.outcome, ProtocolError(ErrorCode.DEADLINE, message)))
        return dropped

    def _wait_for_work(self, lane: Lane) -> tuple[Job | None, list]:
        while not self._stop:
            now = self.clock()
            dropped = self._purge(now)
            if dropped:
                self._cond.notify_all()
                return None, dropped
            job = self._pick(lane)
            if job is not None:
                self._ready.remove(job)
                self._start(lane, job)
                return job, []
            self._cond.wait()
        return None, []

    def _start(self, lane: Lane, job: Job) -> None:
        # (under the lock) ``job`` takes ``lane`` now
        last = lane.last
        if last is not None and last is not job and last.finished is None and last in self._ready:
            last.preemptions += 1
            self.counters['preemptions'] += 1
        lane.job, lane.since = job, self.clock()
        if job.started is None:
            job.started = lane.since
            if job.preempt_s is not None:
                self._preempt_ms.append(job.preempt_s * 1e3)

    def _reaper_loop(self) -> None:
        while True:
            with self._cond:
                if self._stop:
                    return
                now = self.clock()
                dropped = self._purge(now)
                if not dropped:
                    # queued jobs, and running ones that may come back unfinished; a running
                    # job already past its deadline is purged by its lane at the next pick
                    deadlines = [j.deadline for j in self._ready if j.late == DROP]
                    deadlines += [lane.job.deadline for lane in self.lanes if lane.job
                                  and lane.job.late == DROP and lane.job.deadline > now]
                    earliest = min(deadlines, default=math.inf)
                    self._reaper_wake.wait(None if math.isinf(earliest)
                                           else max(0.0, earliest - now) + 1e-4)
                    continue
                self._cond.notify_all()
            self._deliver(dropped)

    # ------------------------------------------------------------------ lanes
    def _lane_loop(self, lane: Lane) -> None:
        to_end = self.policy != PREEMPTIVE
        while True:
            with self._cond:
                job, dropped = self._wait_for_work(lane)
                if job is None and not dropped:
                    return
            self._deliver(dropped)
            if job is not None:
                self._run_step(lane, job, to_end)

    def _run_step(self, lane: Lane, job: Job, to_end: bool) -> None:
        error = None
        try:
            done = lane.run(job, to_end)
        except ProtocolError as exc:     # kept past this block: without its frames (a16 #3)
            done, error = True, detached(exc)
        except Exception as exc:  # a bug in one job must not stop the lane
            log.exception('job of task %r failed', job.task)
            done, error = True, ProtocolError(ErrorCode.INTERNAL, f'{type(exc).__name__}: {exc}')
        done, error = self.step_ended(lane, job, done, error)
        if error is not None:
            self._deliver([(job, 'failed', error)])
        elif done:
            try:
                job.complete()
            except Exception:  # answering one job must not stop the lane
                log.exception('completing job of task %r raised', job.task)

    def step_ended(self, lane: Lane, job: Job, done: bool, error: ProtocolError | None,
                   end: float | None = None) -> tuple[bool, ProtocolError | None]:
        """Note the end of ``job``'s step on ``lane``, at ``end`` or now; return (done, error)."""
        end = self.clock() if end is None else end
        with self._lock:        # the condition's lock (notify_all below holds it)
            job.compute_s += end - lane.since
            self.counters['steps'] += 1
            if lane.index > 0:
                self.counters['packed_steps'] += 1
                job.packed_steps += 1
            if self.trace is not None:
                self.trace.append((lane.index, job.task, job.seq, (lane.since - self.epoch) * 1e3,
                                   (end - self.epoch) * 1e3,
                                   None if math.isinf(job.utilisation) else job.utilisation))
            lane.job, lane.last = None, job
            if not done and self._stop:     # closed mid-job: nobody will resume it
                done = True
                error = ProtocolError(ErrorCode.OVERLOADED, 'server is shutting down')
            if done:
                job.finished = end
                job.outcome = 'failed' if error else 'completed'
                self.counters[job.outcome] += 1
            else:
                self._mark_overdue(job, end)
                bisect.insort(self._ready, job, key=self._key)
            if self._ready or self._inline is not None:    # a lane may pick, run_inline go on
                self._cond.notify_all()
        return done, error

    @staticmethod
    def _deliver(dropped: list[tuple[Job, str, ProtocolError]]) -> None:
        for job, outcome, error in dropped:
            job.outcome = outcome
            try:
                job.release()
                job.fail(error)
            except Exception:  # answering one job must not stop the caller
                log.exception('failing job of task %r raised', job.task)
