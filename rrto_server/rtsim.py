"""
Discrete-event model of a task set on the real server: robot CPU, CPU workers, GPU lanes.

Each task is a chain of linked sub-tasks, each on its own resource and in
its own order:

1. robot pre-processing on the task's client (one frame at a time; a frame
   still waiting when its deadline has passed is skipped, as the clients do);
2. transfer, then decode on the server's CPU workers (``cpu_workers`` of
   them), taken by urgency (priority, then earliest deadline) like
   ``rrto_server.cpu_workers``; a request already past its server deadline
   is answered ``deadline_missed`` without decoding;
3. GPU segments on lane 0, re-picked after every segment (the preemptive
   policy); with packing, lane 1 runs a less urgent job's segment while the
   two utilisations sum to at most the smaller of the two tasks' thresholds
   (``Choice.theta``; ``None``: the server's ``theta``), and it would fit
   beside a more urgent job waiting for lane 0; both are slowed by
   ``pack_slowdown`` times the other's utilisation; lane 0 waits for lane 1's
   step rather than break the rule; a job whose server deadline passes
   between segments is dropped (never started) or abandoned (started);
4. transfer back and robot post-processing.

The server is one Python process: every device step needs the interpreter
for ``step_host_ms`` (pick, launch, synchronise) and every request for
``request_host_ms`` (parse, decode, reply), one thread at a time.  This is
the host (the GIL) that a fine segmentation and a second lane contend for;
solo profiles contain it, a loaded server queues on it.  Each call also
waits an exponentially distributed ``noise_ms`` (mean) on its way: the
scheduling noise of the robot's and the server's processes, which solo
profiles of a few calls do not see.  These costs and ``pack_slowdown`` are
fitted to measured runs (:mod:`rrto_server.rtcalib`).

The server deadline is the task's deadline less its post-processing, as
the robot sends it.  Execution times vary per job by a log-normal factor
(``jitter``).  :func:`simulate` returns per-task releases, misses and the
50th/99th percentile response times of the frames that got a result.
"""

from __future__ import annotations

import heapq
import itertools
import math
import random
from dataclasses import dataclass, field

from rrto_server.rttasks import Profile, RtTask, TaskSet, TaskVariant


@dataclass(frozen=True)
class Choice:
    """How one task runs: a variant, a server priority (higher first), a granularity."""

    variant: TaskVariant
    priority: int
    granularity: str
    theta: float | None = None      # packing threshold of this task; None: the server's

    @property
    def profile(self) -> Profile:
        return self.variant.profiles[self.granularity]


@dataclass
class _Job:
    task: RtTask
    choice: Choice
    release: float
    deadline: float
    server_deadline: float
    scale: float
    seq: int
    segments: list = field(default_factory=list)
    index: int = 0

    def key(self) -> tuple:
        return (-self.choice.priority, self.server_deadline, self.seq)

    @property
    def util(self) -> float:
        return self.choice.profile.utilisation


class _Sim:
    def __init__(self, ts: TaskSet, choices: dict[str, Choice], theta: float, seed: int):
        self.ts, self.choices, self.theta = ts, choices, theta
        self.rng = random.Random(seed)
        self.events: list = []
        self.seq = itertools.count()
        self.stats = {t.name: {'releases': 0, 'misses': 0} for t in ts.tasks}
        self.response = {t.name: [] for t in ts.tasks}
        self.pending = {t.name: [] for t in ts.tasks}      # releases waiting for the client
        self.client_busy = {t.name: False for t in ts.tasks}
        self.cpu_free = ts.cpu_workers
        self.cpu_queue: list = []
        self.ready: list[_Job] = []
        self.lanes: list = [None, None] if theta > 0 else [None]
        self.at_now: list = []                              # clients freed this instant
        self.host_free = 0.0                                # the interpreter, first come first

    def at(self, t: float, kind: str, payload) -> None:
        heapq.heappush(self.events, (t, next(self.seq), kind, payload))

    def host(self, now: float, ms: float) -> float:
        """Queue ``ms`` of interpreter time; return when it starts."""
        start = max(now, self.host_free)
        self.host_free = start + ms
        return start

    def miss(self, job: _Job) -> None:
        self.stats[job.task.name]['misses'] += 1
        self.client_done(job.task)

    def jitter(self, profile: Profile) -> float:
        return math.exp(self.rng.gauss(0.0, profile.jitter)) if profile.jitter else 1.0

    def fits(self, a: _Job, b: _Job) -> bool:
        limit = min(self.theta if c.theta is None else c.theta for c in (a.choice, b.choice))
        return a.util + b.util <= limit + 1e-9

    # ------------------------------------------------------------------ robot side
    def released(self, now: float, task: RtTask) -> None:
        self.stats[task.name]['releases'] += 1
        self.pending[task.name].append(now)
        self.next_frame(now, task)

    def next_frame(self, now: float, task: RtTask) -> None:
        while not self.client_busy[task.name] and self.pending[task.name]:
            release = self.pending[task.name].pop(0)
            if now >= release + task.deadline_ms:
                self.stats[task.name]['misses'] += 1          # skipped
                continue
            self.client_busy[task.name] = True
            choice = self.choices[task.name]
            scale = self.jitter(choice.profile)
            job = _Job(task, choice, release, release + task.deadline_ms,
                       release + task.deadline_ms - task.post_ms, scale, next(self.seq))
            job.segments = [s * scale for s in choice.profile.segment_ms]
            noise = self.rng.expovariate(1.0 / self.ts.noise_ms) if self.ts.noise_ms else 0.0
            self.at(now + task.pre_ms * scale + choice.profile.overhead_ms / 2 + noise, 'arrive',
                    job)

    def client_done(self, task: RtTask) -> None:
        self.client_busy[task.name] = False
        self.at_now.append(task)

    # ------------------------------------------------------------------ server CPU
    def arrive(self, now: float, job: _Job) -> None:
        heapq.heappush(self.cpu_queue, (job.key(), job))
        self.start_cpu(now)

    def start_cpu(self, now: float) -> None:
        while self.cpu_free and self.cpu_queue:
            _, job = heapq.heappop(self.cpu_queue)
            if now > job.server_deadline:
                self.miss(job)
                continue
            self.cpu_free -= 1
            start = self.host(now, self.ts.request_host_ms)
            self.at(start + job.choice.profile.decode_ms * job.scale, 'decoded', job)

    # ------------------------------------------------------------------ GPU lanes
    def dispatch(self, now: float) -> None:
        for job in [j for j in self.ready if now > j.server_deadline]:
            self.ready.remove(job)
            self.miss(job)
        self.ready.sort(key=_Job.key)
        if self.lanes[0] is None and self.ready:
            job = self.ready[0]
            other = self.lanes[1] if len(self.lanes) > 1 else None
            if other is None or self.fits(job, other):
                self.start(now, 0, job)
        if len(self.lanes) > 1 and self.lanes[1] is None and self.lanes[0] is not None:
            first = self.lanes[0]
            for i, job in enumerate(self.ready):
                if job.key() < first.key() or not self.fits(job, first):
                    continue
                if i and not self.fits(job, self.ready[0]):
                    continue
                self.start(now, 1, job)
                break

    def start(self, now: float, lane: int, job: _Job) -> None:
        self.ready.remove(job)
        self.lanes[lane] = job
        other = self.lanes[1 - lane] if len(self.lanes) > 1 else None
        slow = 1.0 + (self.ts.pack_slowdown * other.util if other is not None else 0.0)
        step = max(job.segments[job.index] * slow, self.ts.step_host_ms)
        self.at(self.host(now, self.ts.step_host_ms) + step, 'segment', (lane, job))

    def segment(self, now: float, lane: int, job: _Job) -> None:
        self.lanes[lane] = None
        job.index += 1
        if job.index < len(job.segments):
            self.ready.append(job)
        else:
            back = job.choice.profile.overhead_ms / 2 + job.task.post_ms * job.scale
            self.at(now + back, 'done', job)

    def done(self, now: float, job: _Job) -> None:
        if now > job.deadline + 1e-9:
            self.stats[job.task.name]['misses'] += 1
        self.response[job.task.name].append(now - job.release)
        self.client_done(job.task)

    def run(self, horizon_ms: float) -> dict:
        for task in self.ts.tasks:
            phase = self.rng.uniform(0.0, task.period_ms)
            for k in range(int((horizon_ms - phase) // task.period_ms) + 1):
                self.at(phase + k * task.period_ms, 'release', task)
        while self.events:
            now, _, kind, payload = heapq.heappop(self.events)
            if kind == 'release':
                self.released(now, payload)
            elif kind == 'arrive':
                self.arrive(now, payload)
            elif kind == 'decoded':
                self.cpu_free += 1
                self.ready.append(payload)
                self.start_cpu(now)
            elif kind == 'segment':
                self.segment(now, *payload)
            else:
                self.done(now, payload)
            while self.at_now:
                self.next_frame(now, self.at_now.pop())
            self.start_cpu(now)
            self.dispatch(now)
        return {name: dict(s, miss_rate=s['misses'] / s['releases'] if s['releases'] else 0.0,
                           **percentiles(self.response[name]))
                for name, s in self.stats.items()}


def percentiles(values: list[float]) -> dict:
    """Return ``response_ms_p50``/``_p99`` as the benchmark takes them (None when empty)."""
    ordered = sorted(values)
    if not ordered:
        return {'response_ms_p50': None, 'response_ms_p99': None}
    return {'response_ms_p50': ordered[len(ordered) // 2],
            'response_ms_p99': ordered[int(0.99 * (len(ordered) - 1))]}


def simulate(ts: TaskSet, choices: dict[str, Choice], theta: float, horizon_ms: float = 5000.0,
             seed: int = 0) -> dict[str, dict]:
    """
    Return ``{task: {releases, misses, miss_rate, response_ms_p50, response_ms_p99}}``.

    ``theta`` is the server's packing threshold (0: one lane); a choice's own
    ``theta`` narrows the pairs that task may be packed in.
    """
    missing = {t.name for t in ts.tasks} - set(choices)
    if missing:
        raise ValueError(f'no choice for tasks {sorted(missing)}')
    return _Sim(ts, choices, theta, seed).run(horizon_ms)
