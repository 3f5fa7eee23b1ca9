"""
Fit the simulator's server model to measured runs; measure how far off it is on unseen runs.

The simulator (:mod:`rrto_server.rtsim`) takes each variant's solo profile
from the server and four costs of the server itself that solo calls do not
show: interpreter time per device step (``step_host_ms``) and per request
(``request_host_ms``), the scheduling noise per call (``noise_ms``) and the
slowdown of a packed step (``pack_slowdown``).  :func:`fit` picks them, by
coordinate descent over a grid, so that simulating the measured strategies
reproduces what the real server did: each task's miss rate and its 50th and
99th percentile response time.  :func:`held_out` fits on all runs but one
and predicts the one left out, for every run in turn: the error the search
must expect on a strategy nobody measured.

A measured run is ``(choices, theta, {task: {"miss_rate", "response_ms_p50",
"response_ms_p99"}})``; percentiles may be ``None`` (too few results).
"""

from __future__ import annotations

import dataclasses
import multiprocessing
from typing import Sequence

from rrto_server.rtsim import simulate
from rrto_server.rttasks import TaskSet

GRID = {'step_host_ms': (0.0, 0.02, 0.04, 0.06, 0.08, 0.1, 0.12),
        'request_host_ms': (0.0, 0.15, 0.3, 0.5, 0.7, 1.0),
        'noise_ms': (0.0, 0.2, 0.4, 0.7, 1.0),
        'pack_slowdown': (0.25, 0.5, 1.0, 2.0)}
MIN_RESULTS = 20        # percentiles of fewer results are not compared


def model(ts: TaskSet) -> dict[str, float]:
    """Return the task set's server-model parameters."""
    return {name: getattr(ts, name) for name in GRID}


def with_model(ts: TaskSet, params: dict[str, float]) -> TaskSet:
    """Return ``ts`` with the server-model parameters ``params``."""
    return dataclasses.replace(ts, **params)


def _simulate_run(args) -> dict:
    ts, choices, theta, horizon_ms, seed = args
    return simulate(ts, choices, theta, horizon_ms, seed)


class _Serial:
    @staticmethod
    def map(fn, items) -> list:
        return [fn(item) for item in items]


def _simulate_all(candidates: list[TaskSet], runs: Sequence, horizon_ms: float, seed: int,
                  pool) -> list[list]:
    """Simulate every run under every candidate model (in ``pool`` if given)."""
    args = [(ts, choices, theta, horizon_ms, seed + i) for ts in candidates
            for i, (choices, theta, _) in enumerate(runs)]
    results = (pool or _Serial()).map(_simulate_run, args)
    return [results[k * len(runs):(k + 1) * len(runs)] for k in range(len(candidates))]


def loss(ts: TaskSet, runs: Sequence, simulated: list) -> float:
    """Return the summed per-task disagreement: miss rate, and p50/p99 over the deadline."""
    total = 0.0
    for (_, _, measured), sim in zip(runs, simulated):
        for task in ts.tasks:
            got, want = sim[task.name], measured.get(task.name)
            if want is None:
                continue
            total += abs(got['miss_rate'] - want['miss_rate'])
            if want.get('results', MIN_RESULTS) < MIN_RESULTS:
                continue
            for key in ('response_ms_p50', 'response_ms_p99'):
                if want.get(key) is not None:
                    # a task that got no result at all in simulation was later than anything
                    value = got[key] if got[key] is not None else 2 * task.deadline_ms
                    total += abs(value - want[key]) / task.deadline_ms
    return total


def fit(ts: TaskSet, runs: Sequence, horizon_ms: float = 8000.0, seed: int = 0,
        jobs: int = 1, rounds: int = 2, grid: dict | None = None) -> tuple[TaskSet, dict]:
    """Return ``ts`` with the server model that best reproduces ``runs``, and the fit's record."""
    grid = grid or GRID
    params = model(ts)
    pool = multiprocessing.get_context('fork').Pool(jobs) if jobs > 1 else None
    try:
        best = start = loss(ts, runs, _simulate_all([ts], runs, horizon_ms, seed, pool)[0])
        for _ in range(rounds):
            changed = False
            for name, values in grid.items():
                trials = [dict(params, **{name: v}) for v in values if v != params[name]]
                candidates = [with_model(ts, trial) for trial in trials]
                simulated = _simulate_all(candidates, runs, horizon_ms, seed, pool)
                for trial, candidate, sim in zip(trials, candidates, simulated):
                    score = loss(candidate, runs, sim)
                    if score < best - 1e-9:
                        best, params, changed = score, trial, True
            if not changed:
                break
    finally:
        if pool is not None:
            pool.close()
    return with_model(ts, params), {'params': params, 'loss': best, 'loss_before': start,
                                    'runs': len(runs)}


def errors(ts: TaskSet, runs: Sequence, simulated: list) -> list[dict]:
    """Return one row per (run, task): measured and predicted miss rate and p99."""
    rows = []
    for i, ((_, _, measured), sim) in enumerate(zip(runs, simulated)):
        for task in ts.tasks:
            want = measured.get(task.name)
            if want is None:
                continue
            rows.append({'run': i, 'task': task.name, 'bound': task.miss_bound,
                         'measured': want['miss_rate'], 'predicted': sim[task.name]['miss_rate'],
                         'measured_p99': want.get('response_ms_p99'),
                         'predicted_p99': sim[task.name]['response_ms_p99']})
    return rows


def predict(ts: TaskSet, runs: Sequence, horizon_ms: float = 8000.0, seed: int = 0,
            jobs: int = 1) -> list[dict]:
    """Return :func:`errors` rows of the model ``ts`` on ``runs`` (none of them fitted to)."""
    pool = multiprocessing.get_context('fork').Pool(jobs) if jobs > 1 else None
    try:
        return errors(ts, runs, _simulate_all([ts], runs, horizon_ms, seed, pool)[0])
    finally:
        if pool is not None:
            pool.close()


def held_out(ts: TaskSet, runs: Sequence, horizon_ms: float = 8000.0, seed: int = 0,
             jobs: int = 1, rounds: int = 2, grid: dict | None = None) -> list[dict]:
    """Leave each run out in turn: fit on the rest, predict it; return :func:`errors` rows."""
    rows = []
    for i in range(len(runs)):
        rest = [r for j, r in enumerate(runs) if j != i]
        fitted, _ = fit(ts, rest, horizon_ms, seed, jobs, rounds, grid)
        simulated = _simulate_all([fitted], [runs[i]], horizon_ms, seed, None)[0]
        for row in errors(ts, [runs[i]], simulated):
            rows.append(dict(row, run=i))
    return rows


def margin(rows: Sequence[dict]) -> float:
    """
    Return the share of a bound that the model failed to foresee on held-out tasks it called safe.

    Among held-out (run, task) rows predicted within the task's bound, the
    largest amount by which the measured miss rate exceeded the prediction,
    as a fraction of that task's bound (a model that is off by 0.4 points
    where the bound is 1 % is off by 0.4 of it).  The search keeps every
    task's predicted miss rate at most ``(1 - margin)`` times its bound.
    """
    safe = [r for r in rows if r['predicted'] <= r['bound'] and r['bound'] > 0]
    return max((max(0.0, r['measured'] - r['predicted']) / r['bound'] for r in safe),
               default=0.0)


def summary(rows: Sequence[dict]) -> dict:
    """Return the mean and largest absolute miss-rate error of ``rows``, and the margin."""
    gaps = [abs(r['measured'] - r['predicted']) for r in rows]
    return {'n': len(gaps), 'mae': sum(gaps) / len(gaps) if gaps else None,
            'max': max(gaps, default=None), 'margin': margin(rows)}
