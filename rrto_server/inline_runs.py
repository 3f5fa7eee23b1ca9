"""
Run a job's step on the calling thread instead of handing it to a lane's thread.

The I/O thread serves a short request on an idle device itself (two thread
switches less a request), and, under the preemptive policy, the most urgent
request at the next segment boundary: :meth:`InlineRuns.run_inline`.  The
express path (:mod:`rrto_server.express`) takes lane 0 with
:meth:`InlineRuns.take_idle` and runs its one step without the scheduler's
layers.  :class:`InlineRuns` is a part of
:class:`~rrto_server.scheduler.Scheduler`, under the scheduler's lock and with its
state (``_ready``, ``lanes``, ``_inline``, ``_outwaited``, ``_stop``); it is kept
apart only for the scheduler module's size.
"""

from __future__ import annotations

from rrto_server.lanes import RUN, Job, Lane


class InlineRuns:
    """The scheduler's inline runs (see the module docstring); a base of ``Scheduler``."""

    def run_inline(self, job: Job, wait_s: float = 0.0) -> bool:
        """
        Run ``job``'s first step on lane 0 in the calling thread if the device is idle.

        Idle means nothing queued and no lane busy: then no job is more urgent, and
        skipping the hand-off to a lane thread saves two thread switches per request.
        A job with more steps is queued after its first one and continues on the
        lane thread, so preemption at segment boundaries is unchanged.

        Under the preemptive policy, a job more urgent than every job queued or
        running also runs here when the lanes are busy: they finish their current
        steps and start no other, and the job runs as soon as they have, if that
        takes at most ``wait_s`` (a preemption at the segment boundary, without the
        hand-off to a lane thread; counted as one).  Returns False (and does
        nothing) otherwise; submit the job then.
        """
        lane = self.lanes[0]
        with self._lock:        # the condition's lock, without its Python __enter__/__exit__
            if self._stop or self._inline is not None:
                return False
            now = self.clock()
            self._mark_overdue(job, now)     # a missed deadline overtakes nothing
            busy = False
            for other in self.lanes:
                if other.job is not None:
                    busy = True
            if busy or self._ready:
                if not self._overtakes(job, wait_s):
                    return False
                job.ready_at, job.contended = self.clock(), busy
                self._inline = job
                try:
                    if not self._wait_for_lanes(job, job.ready_at + wait_s):
                        return False
                finally:
                    self._inline = None
                    self._cond.notify_all()
            else:
                job.ready_at, job.contended = now, False
            job.seq = next(self._seq)
            self._start(lane, job)
        self._run_step(lane, job, not self.preemptive)
        return True

    def take_idle(self, job: Job) -> Lane | None:
        """
        Give lane 0 to ``job`` now if the device is idle; return the lane, or None.

        Idle as for :meth:`run_inline` (whose first step this is, without the step):
        the caller runs ``job``'s one step on its own thread, with the lane's stream
        current, waits for the stream, and calls :meth:`step_ended` (the express
        path, :meth:`rrto_server.express_job.ExpressJob.serve`).  None: nothing was done.
        """
        lane = self.lanes[0]
        with self._lock:
            if self._stop or self._inline is not None or self._ready:
                return None
            for other in self.lanes:
                if other.job is not None:
                    return None
            # _mark_overdue and _start of a job that arrives on an idle device (nothing
            # queued: no preemption to count, not contended), on one clock read
            now = job.ready_at = lane.since = self.clock()
            if job.late == RUN and now > job.deadline:
                job.overdue = True
            if job.started is None:
                job.started = now
            job.contended, job.seq, lane.job = False, next(self._seq), job
        return lane

    def _steps_now(self) -> tuple:
        # (under the lock) which steps the lanes are running: (job, start) per lane
        return tuple((id(lane.job), lane.since) for lane in self.lanes if lane.job is not None)

    def _overtakes(self, job: Job, wait_s: float) -> bool:
        # (under the lock) whether ``job`` may wait for the lanes' steps to run inline; never
        # again for the steps a wait already ran out on (a recording, a long segment)
        if not self.preemptive or wait_s <= 0 or self._outwaited == self._steps_now():
            return False
        urgency = job.urgency()[:2]
        others = self._ready + [other.job for other in self.lanes if other.job is not None]
        return all(urgency < other.urgency()[:2] for other in others)

    def _wait_for_lanes(self, job: Job, until: float) -> bool:
        # (under the lock, lanes reserved) wait until every lane's step has ended; False if
        # that takes past ``until``, or a job as urgent as ``job`` arrives meanwhile
        urgency = job.urgency()[:2]
        while any(other.job is not None for other in self.lanes):
            remaining = until - self.clock()
            if remaining <= 0:
                self._outwaited = self._steps_now()
                return False
            if self._stop or any(other.urgency()[:2] <= urgency for other in self._ready):
                return False
            self._cond.wait(remaining)
        return True
