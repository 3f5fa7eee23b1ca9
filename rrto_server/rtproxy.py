"""
A learned miss-rate proxy: a random forest trained on the simulator, calibrated on runs.

Simulating a strategy takes tens of milliseconds; the search evaluates
thousands.  The proxy predicts each task's miss rate from features of the
strategy that the scheduler's behaviour depends on: the task's own chain
(robot, decode, transfer, device time, longest segment, jitter), the device
and CPU load of the more urgent tasks, the blocking by less urgent segments,
the server's interpreter time (its own steps, everyone's), the
response-time bound, and whether packing can pair it with the others.

:meth:`Proxy.fit` trains on simulated strategies (:mod:`rrto_server.rtsim`);
:meth:`Proxy.calibrate` refits with measured runs added at a higher sample
weight, so where the server departs from the model the measurements win.
"""

from __future__ import annotations

import math
import multiprocessing
import random
from typing import Sequence

from rrto_server.rtplan import response_time
from rrto_server.rtsim import Choice, simulate
from rrto_server.rttasks import TaskSet

RTA_CAP = 10.0          # response-time bound / budget, capped (unbounded -> cap)


def budget_ms(task, choice: Choice) -> float:
    """Return the device-side budget: deadline less robot, transfer and decode time."""
    p = choice.profile
    return task.deadline_ms - task.pre_ms - task.post_ms - p.overhead_ms - p.decode_ms


def host_ms(ts: TaskSet, choice: Choice) -> float:
    """Return one job's interpreter time on the server (its steps and its request)."""
    return len(choice.profile.segment_ms) * ts.step_host_ms + ts.request_host_ms


def theta_of(choice: Choice, theta: float) -> float:
    """Return the packing threshold in force for a task (its own, else the server's)."""
    return theta if choice.theta is None else choice.theta


def rta_ratios(ts: TaskSet, choices: dict[str, Choice], inflate: float = 1.0,
               noise_ms: float = 0.0) -> dict[str, float]:
    """
    Return each task's response-time bound over its device budget (single lane).

    Device time of more urgent tasks interferes as usual; the interpreter is
    first come first served, so every other task's host time interferes too,
    whatever its priority.  ``noise_ms`` is taken off every budget.
    """
    out = {}
    for task in ts.tasks:
        c = choices[task.name]
        higher = [(choices[o.name].profile.gpu_ms * inflate, o.period_ms) for o in ts.tasks
                  if choices[o.name].priority > c.priority]
        higher += [(host_ms(ts, choices[o.name]), o.period_ms) for o in ts.tasks
                   if o is not task and choices[o.name].priority <= c.priority]
        lower = [choices[o.name].profile.block_ms * inflate for o in ts.tasks
                 if choices[o.name].priority < c.priority]
        budget = budget_ms(task, c) - noise_ms
        if budget <= 0:
            out[task.name] = RTA_CAP
            continue
        own = c.profile.gpu_ms * inflate + host_ms(ts, c)
        r = response_time(own, budget, max(lower, default=0.0), higher)
        out[task.name] = min(RTA_CAP, r / budget) if math.isfinite(r) else RTA_CAP
    return out


def features(ts: TaskSet, choices: dict[str, Choice], theta: float) -> list[list[float]]:
    """Return one feature row per task (in task-set order)."""
    rta = rta_ratios(ts, choices)
    host_util = sum(host_ms(ts, choices[o.name]) / o.period_ms for o in ts.tasks)
    rows = []
    for task in ts.tasks:
        c = choices[task.name]
        p = c.profile
        hp = [o for o in ts.tasks if choices[o.name].priority > c.priority]
        lp = [o for o in ts.tasks if choices[o.name].priority < c.priority]
        hp_util = sum(choices[o.name].profile.gpu_ms / o.period_ms for o in hp)
        total_util = sum(choices[o.name].profile.gpu_ms / o.period_ms for o in ts.tasks)
        cpu_util = sum(choices[o.name].profile.decode_ms / o.period_ms
                       for o in ts.tasks) / ts.cpu_workers
        blocking = max((choices[o.name].profile.block_ms for o in lp), default=0.0)
        own_theta = theta_of(c, theta)
        pairable = sum(1 for o in ts.tasks if o is not task and
                       p.utilisation + choices[o.name].profile.utilisation
                       <= min(own_theta, theta_of(choices[o.name], theta)))
        slack = budget_ms(task, c) - p.gpu_ms
        rows.append([p.gpu_ms, p.block_ms, p.utilisation, p.jitter, p.decode_ms, p.overhead_ms,
                     task.period_ms, task.deadline_ms, task.pre_ms + task.post_ms, slack,
                     slack / task.deadline_ms, len(hp) / len(ts.tasks), hp_util, total_util,
                     cpu_util, blocking, rta[task.name], own_theta, pairable / len(ts.tasks),
                     (p.gpu_ms + blocking) / max(1e-6, budget_ms(task, c)),
                     len(p.segment_ms), host_ms(ts, c), host_util,
                     (slack - host_ms(ts, c)) / task.deadline_ms])
    return rows


def random_choices(ts: TaskSet, rng: random.Random) -> tuple[dict[str, Choice], float]:
    """Return a uniformly random strategy: variants, priorities, granularities, thetas."""
    order = list(range(len(ts.tasks)))
    rng.shuffle(order)
    choices = {t.name: Choice(rng.choice(t.variants), order[i], rng.choice(t.granularities),
                              rng.choice(ts.thetas))
               for i, t in enumerate(ts.tasks)}
    return choices, server_theta(choices)


def server_theta(choices: dict[str, Choice]) -> float:
    """Return the server's threshold for per-task thresholds: the largest (0: one lane)."""
    return max((c.theta or 0.0) for c in choices.values())


class Proxy:
    """Random-forest regression of a task's miss rate from strategy features."""

    def __init__(self, trees: int = 60, seed: int = 0):
        from sklearn.ensemble import RandomForestRegressor
        self.model = RandomForestRegressor(n_estimators=trees, min_samples_leaf=2,
                                           random_state=seed, n_jobs=1)
        self.x: list = []
        self.y: list = []
        self.w: list = []

    def add(self, ts: TaskSet, choices: dict[str, Choice], theta: float,
            miss: dict[str, float], weight: float = 1.0) -> None:
        """Add one strategy's per-task miss rates (tasks missing from ``miss``: none)."""
        for task, row in zip(ts.tasks, features(ts, choices, theta)):
            if miss.get(task.name) is None:
                continue
            self.x.append(row)
            self.y.append(float(miss[task.name]))
            self.w.append(weight)

    def simulate_samples(self, ts: TaskSet, samples: int, horizon_ms: float, seed: int = 0,
                         jobs: int = 1) -> None:
        """Simulate ``samples`` random strategies (in ``jobs`` processes) and add them."""
        rng = random.Random(seed)
        strategies = [random_choices(ts, rng) for _ in range(samples)]
        args = [(ts, c, theta, horizon_ms, seed + i) for i, (c, theta) in enumerate(strategies)]
        if jobs > 1:
            with multiprocessing.get_context('fork').Pool(jobs) as pool:
                results = pool.starmap(simulate, args)
        else:
            results = [simulate(*a) for a in args]
        for (choices, theta), result in zip(strategies, results):
            self.add(ts, choices, theta, {k: v['miss_rate'] for k, v in result.items()})

    def fit(self) -> 'Proxy':
        """Fit the forest on every row added so far."""
        self.model.fit(self.x, self.y, sample_weight=self.w)
        return self

    def calibrate(self, ts: TaskSet, runs: Sequence[tuple[dict, float, dict]],
                  weight: float = 20.0) -> 'Proxy':
        """Refit with measured runs ``(choices, theta, {task: miss_rate})`` weighted up."""
        for choices, theta, miss in runs:
            self.add(ts, choices, theta, miss, weight)
        return self.fit()

    def predict(self, ts: TaskSet, choices: dict[str, Choice], theta: float
                ) -> dict[str, float]:
        """Return the predicted miss rate per task."""
        values = self.model.predict(features(ts, choices, theta))
        return {t.name: float(min(1.0, max(0.0, v))) for t, v in zip(ts.tasks, values)}


def error(proxy: Proxy, ts: TaskSet, runs: Sequence[tuple[dict, float, dict]]) -> dict:
    """Return the proxy's mean and largest absolute error on measured ``runs``."""
    errors = []
    for choices, theta, miss in runs:
        predicted = proxy.predict(ts, choices, theta)
        errors += [abs(predicted[k] - miss[k]) for k in miss]
    return {'n': len(errors), 'mae': sum(errors) / len(errors) if errors else math.nan,
            'max': max(errors, default=math.nan)}
