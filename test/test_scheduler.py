"""The scheduler alone, with jobs whose steps the test releases one by one."""

import random
import threading
import time

import pytest
from rrto_testing import assert_packing_invariant

from rrto_wire.errors import ErrorCode, ProtocolError
from rrto_server.lanes import Job, make_lanes
from rrto_server.scheduler import FIFO, PREEMPTIVE, PRIORITY, Scheduler


class Stepper(Job):
    """A job of ``steps`` steps; each step waits for a permit unless ``free``."""

    def __init__(self, events: list, name: str, steps: int = 1, free: bool = True, **keys):
        super().__init__(task=name, **keys)
        self.events, self.name, self.remaining = events, name, steps
        self.permits = threading.Semaphore(10_000 if free else 0)
        self.in_step = threading.Event()
        self.answers: list = []
        self.answered = threading.Event()
        self.released = False

    def step(self) -> bool:
        self.events.append(('start', self.name))
        self.in_step.set()
        assert self.permits.acquire(timeout=10), f'{self.name}: step never released'
        self.in_step.clear()
        self.remaining -= 1
        self.events.append(('end', self.name))
        return self.remaining == 0

    def allow(self, steps: int = 1) -> None:
        for _ in range(steps):
            self.permits.release()

    def complete(self) -> None:
        self.answers.append('ok')
        self.answered.set()

    def fail(self, error: ProtocolError) -> None:
        self.answers.append(error)
        self.answered.set()

    def release(self) -> None:
        self.released = True


@pytest.fixture
def make_scheduler():
    made = []

    def make(*args, **kwargs) -> Scheduler:
        scheduler = Scheduler(*args, **kwargs)
        made.append(scheduler)
        return scheduler

    yield make
    for scheduler in made:
        scheduler.close()


def _wait(predicate, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, 'condition not reached in time'
        time.sleep(0.001)


def _starts(events: list) -> list:
    return [name for kind, name in events if kind == 'start']


@pytest.mark.parametrize('policy', [PREEMPTIVE, PRIORITY, FIFO])
def test_queued_jobs_run_in_policy_order(make_scheduler, policy):
    events: list = []
    scheduler = make_scheduler(policy)
    blocker = Stepper(events, 'blocker', free=False)
    scheduler.submit(blocker)
    _wait(blocker.in_step.is_set)
    now = time.perf_counter()
    rng = random.Random(6)
    jobs = [Stepper(events, f'j{i}', priority=rng.randint(-2, 3),
                    deadline=now + rng.choice([5.0, 6.0, 7.0, float('inf')]))
            for i in range(12)]
    for job in jobs:
        scheduler.submit(job)
    blocker.allow()
    for job in jobs:
        assert job.answered.wait(10)
    if policy == FIFO:
        expected = [job.name for job in jobs]
    else:
        expected = [job.name for job in sorted(jobs, key=lambda j: (-j.priority, j.deadline,
                                                                    j.seq))]
    assert _starts(events)[1:] == expected
    assert all(job.answers == ['ok'] for job in jobs + [blocker])


def test_preemptive_policy_switches_at_the_next_segment_boundary(make_scheduler):
    events: list = []
    scheduler = make_scheduler(PREEMPTIVE)
    low = Stepper(events, 'low', steps=4, free=False, priority=0)
    high = Stepper(events, 'high', steps=2, priority=5)
    scheduler.submit(low)
    low.allow(1)
    _wait(lambda: low.steps_done == 1 and low.in_step.is_set())
    scheduler.submit(high)                          # arrives during low's second segment
    assert high.contended
    low.allow(3)
    assert high.answered.wait(10) and low.answered.wait(10)
    assert events == [('start', 'low'), ('end', 'low'), ('start', 'low'), ('end', 'low'),
                      ('start', 'high'), ('end', 'high'), ('start', 'high'), ('end', 'high'),
                      ('start', 'low'), ('end', 'low'), ('start', 'low'), ('end', 'low')]
    assert low.preemptions == 1 and high.preemptions == 0
    assert 0 <= high.preempt_s < 10
    snap = scheduler.snapshot()
    assert snap['preemptions'] == 1 and snap['preempt_ms']['n'] == 1


def test_priority_policy_finishes_the_running_job_first(make_scheduler):
    events: list = []
    scheduler = make_scheduler(PRIORITY)
    low = Stepper(events, 'low', steps=3, free=False, priority=0)
    high = Stepper(events, 'high', priority=5)
    scheduler.submit(low)
    _wait(low.in_step.is_set)
    scheduler.submit(high)
    low.allow(3)
    assert high.answered.wait(10) and low.answered.wait(10)
    assert _starts(events) == ['low', 'low', 'low', 'high']
    assert low.preemptions == 0 and high.contended


def test_expired_request_is_answered_while_the_device_is_busy(make_scheduler):
    events: list = []
    scheduler = make_scheduler(PREEMPTIVE)
    blocker = Stepper(events, 'blocker', free=False)
    scheduler.submit(blocker)
    _wait(blocker.in_step.is_set)
    soon = time.perf_counter() + 0.05
    dropped = Stepper(events, 'dropped', deadline=soon, late='drop')
    late = Stepper(events, 'late', deadline=soon, late='run')
    scheduler.submit(dropped)
    scheduler.submit(late)
    assert dropped.answered.wait(5)
    assert blocker.in_step.is_set() and not late.answered.is_set()  # the lane is still busy
    (error,) = dropped.answers
    assert error.code == ErrorCode.DEADLINE and 'before the request could start' in error.message
    assert dropped.outcome == 'expired' and dropped.released and dropped.started is None
    blocker.allow()
    assert late.answered.wait(5)
    assert late.answers == ['ok'] and late.late_finish
    snap = scheduler.snapshot()
    assert snap['expired'] == 1 and snap['completed'] == 2


def test_started_job_past_its_deadline_is_abandoned_between_segments(make_scheduler):
    events: list = []
    scheduler = make_scheduler(PREEMPTIVE)
    job = Stepper(events, 'slow', steps=3, free=False, deadline=time.perf_counter() + 0.05)
    scheduler.submit(job)
    job.allow()
    _wait(lambda: job.steps_done == 1)
    time.sleep(0.06)
    job.allow()                 # the second step ends past the deadline
    assert job.answered.wait(5)
    (error,) = job.answers
    assert error.code == ErrorCode.DEADLINE and 'abandoned' in error.message
    assert job.outcome == 'abandoned' and job.released and job.steps_done == 2


def _packing_scheduler(make_scheduler, theta=0.8):
    return make_scheduler(PREEMPTIVE, theta=theta, lanes=make_lanes(None, 2), trace=256)


def test_lower_priority_job_packs_only_when_utilisations_fit(make_scheduler):
    events: list = []
    scheduler = _packing_scheduler(make_scheduler)
    main = Stepper(events, 'main', steps=2, free=False, priority=2, utilisation=0.5)
    big = Stepper(events, 'big', priority=1, utilisation=0.6)
    small = Stepper(events, 'small', priority=0, utilisation=0.3)
    scheduler.submit(main)
    _wait(main.in_step.is_set)
    scheduler.submit(big)       # 0.5 + 0.6 > 0.8: must wait although more urgent than small
    scheduler.submit(small)     # 0.5 + 0.3 <= 0.8: runs beside main on lane 1
    assert small.answered.wait(5)
    assert not big.answered.is_set() and main.in_step.is_set()
    main.allow(2)
    assert big.answered.wait(5) and main.answered.wait(5)
    assert small.packed_steps == 1 and big.packed_steps == 0
    trace = scheduler.snapshot()['trace']
    assert_packing_invariant(trace, 0.8)
    assert any(e['lane'] == 1 and e['task'] == 'small' for e in trace)


def test_a_task_with_its_own_theta_packs_only_within_it(make_scheduler):
    events: list = []
    scheduler = make_scheduler(PREEMPTIVE, theta=0.8, lanes=make_lanes(None, 2), trace=256,
                               task_theta={'alone': 0.0, 'tight': 0.5})
    main = Stepper(events, 'main', free=False, priority=2, utilisation=0.3)
    alone = Stepper(events, 'alone', priority=1, utilisation=0.1)     # 0.4 <= 0.8, but theta 0
    tight = Stepper(events, 'tight', priority=0, utilisation=0.3)     # 0.6 > its own 0.5
    other = Stepper(events, 'other', priority=0, utilisation=0.4)     # 0.7 <= the server's 0.8
    scheduler.submit(main)
    _wait(main.in_step.is_set)
    for job in (alone, tight, other):
        scheduler.submit(job)
    assert other.answered.wait(5)
    time.sleep(0.05)
    assert not alone.answered.is_set() and not tight.answered.is_set()
    main.allow()
    assert alone.answered.wait(5) and tight.answered.wait(5)
    assert (alone.packed_steps, tight.packed_steps, other.packed_steps) == (0, 0, 1)
    assert scheduler.snapshot()['task_theta'] == {'alone': 0.0, 'tight': 0.5}
    with pytest.raises(ValueError, match='theta'):
        Scheduler(PREEMPTIVE, theta=0.8, task_theta={'x': -0.1})


def test_urgent_arrival_waits_for_a_packed_step_that_it_does_not_fit(make_scheduler):
    events: list = []
    scheduler = _packing_scheduler(make_scheduler)
    main = Stepper(events, 'main', free=False, priority=2, utilisation=0.5)
    packed = Stepper(events, 'packed', free=False, priority=0, utilisation=0.3)
    urgent = Stepper(events, 'urgent', priority=9, utilisation=0.6)
    scheduler.submit(main)
    _wait(main.in_step.is_set)
    scheduler.submit(packed)
    _wait(packed.in_step.is_set)
    scheduler.submit(urgent)
    main.allow()
    assert main.answered.wait(5)
    time.sleep(0.05)
    assert not urgent.answered.is_set()     # 0.6 + 0.3 > 0.8: lane 0 waits for lane 1's step
    packed.allow()
    assert urgent.answered.wait(5) and packed.answered.wait(5)
    assert events.index(('start', 'urgent')) > events.index(('end', 'packed'))
    assert_packing_invariant(scheduler.snapshot()['trace'], 0.8)


def test_jobs_sharing_buffers_never_run_side_by_side(make_scheduler):
    events: list = []
    scheduler = _packing_scheduler(make_scheduler, theta=2.0)
    first = Stepper(events, 'first', free=False, priority=1, utilisation=0.1, resource='r')
    second = Stepper(events, 'second', priority=0, utilisation=0.1, resource='r')
    other = Stepper(events, 'other', priority=0, utilisation=0.1, resource='s')
    scheduler.submit(first)
    _wait(first.in_step.is_set)
    scheduler.submit(second)
    scheduler.submit(other)
    assert other.answered.wait(5)
    time.sleep(0.05)
    assert not second.answered.is_set()
    first.allow()
    assert second.answered.wait(5)
    assert events.index(('start', 'second')) > events.index(('end', 'first'))


def test_unprofiled_jobs_never_pack(make_scheduler):
    events: list = []
    scheduler = _packing_scheduler(make_scheduler, theta=2.0)
    main = Stepper(events, 'main', free=False, priority=1, utilisation=0.1)
    unknown = Stepper(events, 'unknown', priority=0)        # utilisation defaults to exclusive
    scheduler.submit(main)
    _wait(main.in_step.is_set)
    scheduler.submit(unknown)
    time.sleep(0.05)
    assert not unknown.answered.is_set()
    main.allow()
    assert unknown.answered.wait(5) and unknown.packed_steps == 0


def test_failing_step_is_answered_and_the_lane_keeps_serving(make_scheduler):
    class Broken(Stepper):
        def step(self):
            raise RuntimeError('kernel exploded')

    events: list = []
    scheduler = make_scheduler(PREEMPTIVE)
    broken, after = Broken(events, 'broken'), Stepper(events, 'after')
    scheduler.submit(broken)
    scheduler.submit(after)
    assert broken.answered.wait(5) and after.answered.wait(5)
    (error,) = broken.answers
    assert error.code == ErrorCode.INTERNAL and 'kernel exploded' in error.message
    assert broken.released and after.answers == ['ok']


def test_close_fails_queued_jobs_exactly_once(make_scheduler):
    events: list = []
    scheduler = make_scheduler(PREEMPTIVE)
    blocker = Stepper(events, 'blocker', free=False)
    scheduler.submit(blocker)
    _wait(blocker.in_step.is_set)
    queued = [Stepper(events, f'q{i}') for i in range(3)]
    for job in queued:
        scheduler.submit(job)
    threading.Timer(0.05, blocker.allow).start()
    scheduler.close()
    late = Stepper(events, 'after-close')
    scheduler.submit(late)
    for job in queued + [late]:
        assert len(job.answers) == 1 and job.answers[0].code == ErrorCode.OVERLOADED
    assert blocker.answers == ['ok']


def test_invalid_configuration_is_refused():
    with pytest.raises(ValueError, match='policy'):
        Scheduler('edf')
    with pytest.raises(ValueError, match='theta'):
        Scheduler(PREEMPTIVE, theta=-1)


def test_close_during_a_multi_step_job_fails_it_once(make_scheduler):
    events: list = []
    scheduler = make_scheduler(PREEMPTIVE)
    job = Stepper(events, 'long', steps=3, free=False)
    scheduler.submit(job)
    _wait(job.in_step.is_set)
    threading.Timer(0.05, job.allow).start()
    scheduler.close()
    assert job.answered.wait(5)
    (error,) = job.answers
    assert error.code == ErrorCode.OVERLOADED and job.released
