"""
Search execution strategies for a task set (RT-mDL's optimiser): NSGA-II over a proxy.

Decision per task: its variant, its priority (one order of all tasks) and
its segment granularity; for the server: the packing threshold theta (the
scheduler has one).  Objectives: maximise weighted accuracy, minimise
storage after layer sharing.  Constraints: every task's miss rate within its
bound, storage within the budget.  Miss rates: where packing is off and the
response-time test proves every deadline (device times inflated to their
99th percentile), zero without asking anyone; otherwise the learned proxy
(:mod:`rrto_server.rtproxy`).  The highest-accuracy feasible strategy on the
Pareto front that the simulator confirms is the answer.

``rrto-plan-tasks tasks.yaml -o strategy.json [--measured runs.json]``
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

from rrto_server import rtplan, rtproxy, rttasks
from rrto_server.rtsim import Choice, simulate
from rrto_server.rttasks import TaskSet
from rrto_wire import strategy as strategy_format

P99 = 2.326             # standard normal 99th percentile, for log-normal jitter


def decode(ts: TaskSet, x) -> tuple[dict[str, Choice], float]:
    """Map a point of [0, 1)^(3n+1) to a strategy (random-key priorities)."""
    n = len(ts.tasks)
    keys = [x[3 * i + 1] for i in range(n)]
    rank = {i: r for r, i in enumerate(sorted(range(n), key=lambda i: (keys[i], i)))}
    choices = {}
    for i, task in enumerate(ts.tasks):
        grans = task.granularities
        choices[task.name] = Choice(task.variants[_pick(x[3 * i], len(task.variants))],
                                    rank[i], grans[_pick(x[3 * i + 2], len(grans))])
    return choices, ts.thetas[_pick(x[3 * n], len(ts.thetas))]


def _pick(value: float, count: int) -> int:
    return min(count - 1, max(0, int(value * count)))


def weighted_accuracy(ts: TaskSet, choices: dict[str, Choice]) -> float:
    """Return the weight-averaged accuracy of the chosen variants."""
    total = sum(t.weight for t in ts.tasks)
    return sum(t.weight * choices[t.name].variant.accuracy for t in ts.tasks) / total


def storage_mb(ts: TaskSet, choices: dict[str, Choice]) -> float:
    """Return the chosen variants' storage with shared layers counted once."""
    return ts.storage_bytes([c.variant for c in choices.values()]) / 1e6


def proven(ts: TaskSet, choices: dict[str, Choice], theta: float) -> bool:
    """Return True when the response-time test proves every deadline (single lane only)."""
    if theta > 0:
        return False
    inflate = math.exp(P99 * max(c.profile.jitter for c in choices.values()))
    return all(r <= 1.0 for r in rtproxy.rta_ratios(ts, choices, inflate).values())


class Evaluator:
    """Miss rates per strategy: the response-time proof, else the proxy; cached."""

    def __init__(self, ts: TaskSet, proxy: rtproxy.Proxy):
        self.ts, self.proxy = ts, proxy
        self.cache: dict = {}
        self.proofs = 0

    def __call__(self, choices: dict[str, Choice], theta: float) -> dict[str, float]:
        key = (theta,) + tuple((c.variant.name, c.priority, c.granularity)
                               for c in choices.values())
        if key not in self.cache:
            if proven(self.ts, choices, theta):
                self.proofs += 1
                self.cache[key] = {t.name: 0.0 for t in self.ts.tasks}
            else:
                self.cache[key] = self.proxy.predict(self.ts, choices, theta)
        return self.cache[key]


def search(ts: TaskSet, proxy: rtproxy.Proxy, pop: int = 40, generations: int = 40,
           seed: int = 0, verify_ms: float = 20000.0) -> dict:
    """Run NSGA-II; return the chosen strategy, its prediction and the search's figures."""
    import numpy as np
    from pymoo.algorithms.moo.nsga2 import NSGA2
    from pymoo.core.problem import ElementwiseProblem
    from pymoo.optimize import minimize

    evaluate = Evaluator(ts, proxy)
    n = len(ts.tasks)

    class Problem(ElementwiseProblem):
        def __init__(self):
            super().__init__(n_var=3 * n + 1, n_obj=2, n_ieq_constr=n + 1, xl=0.0,
                             xu=1.0 - 1e-9)

        def _evaluate(self, x, out, *args, **kwargs):
            choices, theta = decode(ts, x)
            miss = evaluate(choices, theta)
            out['F'] = [-weighted_accuracy(ts, choices), storage_mb(ts, choices)]
            out['G'] = [miss[t.name] - t.miss_bound for t in ts.tasks] + \
                [storage_mb(ts, choices) - ts.storage_mb]

    start = time.perf_counter()
    result = minimize(Problem(), NSGA2(pop_size=pop), ('n_gen', generations), seed=seed,
                      verbose=False)
    search_s = time.perf_counter() - start
    front = [] if result.X is None else list(np.atleast_2d(result.X))
    candidates = sorted((decode(ts, x) for x in front),
                        key=lambda s: (-weighted_accuracy(ts, s[0]), storage_mb(ts, s[0])))
    start = time.perf_counter()
    chosen, simulated = None, None
    for choices, theta in candidates:
        simulated = simulate(ts, choices, theta, verify_ms, seed=seed + 7)
        if all(simulated[t.name]['miss_rate'] <= t.miss_bound for t in ts.tasks):
            chosen = (choices, theta)
            break
    verify_s = time.perf_counter() - start
    if chosen is None:
        raise ValueError(f'no strategy meets every miss bound ({len(candidates)} on the '
                         'feasible front, none confirmed by simulation)')
    choices, theta = chosen
    return {'choices': choices, 'theta': theta, 'search_s': search_s, 'verify_s': verify_s,
            'evaluations': len(evaluate.cache), 'proofs': evaluate.proofs,
            'front': len(candidates), 'predicted': evaluate(choices, theta),
            'simulated': {k: v['miss_rate'] for k, v in simulated.items()}}


# ---------------------------------------------------------------------------- baselines
def rate_monotonic(ts: TaskSet, pick, granularity: str, theta: float
                   ) -> tuple[dict[str, Choice], float]:
    """Return ``pick(task)``'s variant per task with rate-monotonic priorities."""
    order = sorted(ts.tasks, key=lambda t: (-t.period_ms, t.name))      # lowest first
    return ({t.name: Choice(pick(t), order.index(t), _granularity(t, granularity))
             for t in ts.tasks}, theta)


def _granularity(task, wanted: str) -> str:
    return wanted if wanted in task.granularities else task.granularities[0]


def largest(task):
    """Return the task's largest variant: the most weight bytes (the full network)."""
    return max(task.variants, key=lambda v: (v.storage_bytes, v.name))


def smallest(task):
    """Return the task's variant with the least device time."""
    return min(task.variants, key=lambda v: min(p.gpu_ms for p in v.profiles.values()))


def with_rtplan(ts: TaskSet, granularity: str, theta: float) -> tuple[dict[str, Choice], float]:
    """Return the strategy today's ``rtplan`` picks (its latency: the p99 end-to-end chain)."""
    tasks, lookup = [], {}
    for t in ts.tasks:
        g = _granularity(t, granularity)
        variants = []
        for v in t.variants:
            p = v.profiles[g]
            chain = (p.gpu_ms * math.exp(P99 * p.jitter) + p.decode_ms + p.overhead_ms
                     + t.pre_ms + t.post_ms)
            variants.append(rtplan.Variant(v.name, chain, v.accuracy, v.storage_bytes / 1e6,
                                           segment_ms=p.block_ms))
            lookup[(t.name, v.name)] = v
        tasks.append(rtplan.Task(t.name, t.period_ms, t.deadline_ms, tuple(variants), t.weight))
    result = rtplan.plan(tasks, ts.storage_mb)
    return ({t.name: Choice(lookup[(t.name, result.variants[t.name].name)],
                            result.priorities[t.name], _granularity(t, granularity))
             for t in ts.tasks}, theta)


# ---------------------------------------------------------------------------- files
def to_strategy(ts: TaskSet, choices: dict[str, Choice], theta: float,
                predicted: dict | None = None) -> strategy_format.Strategy:
    """Return the strategy file's contents for ``choices``."""
    return strategy_format.Strategy(theta, {
        t.name: strategy_format.TaskStrategy(
            choices[t.name].variant.name, choices[t.name].priority, choices[t.name].granularity,
            t.deadline_ms, t.period_ms, choices[t.name].variant.file) for t in ts.tasks},
        predicted or {})


def from_strategy(ts: TaskSet, doc: dict) -> tuple[dict[str, Choice], float]:
    """Return the choices a strategy document makes for ``ts``."""
    plan = strategy_format.parse(doc)
    choices = {}
    for t in ts.tasks:
        entry = plan.tasks[t.name]
        variant = next(v for v in t.variants if v.name == entry.variant)
        choices[t.name] = Choice(variant, entry.priority, entry.segments)
    return choices, plan.theta


def measured_runs(ts: TaskSet, path: str | Path) -> list[tuple[dict, float, dict]]:
    """Read measured runs: a JSON list of ``{"strategy": {...}, "miss": {task: rate}}``."""
    runs = []
    for run in json.loads(Path(path).read_text()):
        choices, theta = from_strategy(ts, run['strategy'])
        runs.append((choices, theta, {k: float(v) for k, v in run['miss'].items()}))
    return runs


def build_proxy(ts: TaskSet, samples: int, horizon_ms: float, seed: int,
                measured: list | None = None) -> rtproxy.Proxy:
    """Train the proxy on simulated strategies, calibrated on ``measured`` runs if given."""
    proxy = rtproxy.Proxy(seed=seed)
    proxy.simulate_samples(ts, samples, horizon_ms, seed)
    return proxy.calibrate(ts, measured) if measured else proxy.fit()


def main(argv: list[str] | None = None) -> int:
    """Search a task set and write a strategy file."""
    parser = argparse.ArgumentParser(prog='rrto-plan-tasks', description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('tasks', help='task-set YAML (or JSON)')
    parser.add_argument('-o', '--out', default='strategy.json', help='strategy file to write')
    parser.add_argument('--measured', help='measured runs to calibrate the proxy with (JSON)')
    parser.add_argument('--samples', type=int, default=300, help='simulated training strategies')
    parser.add_argument('--horizon-ms', type=float, default=4000.0, help='simulated time each')
    parser.add_argument('--pop', type=int, default=40)
    parser.add_argument('--generations', type=int, default=40)
    parser.add_argument('--seed', type=int, default=0)
    args = parser.parse_args(argv)
    try:
        ts = rttasks.load(args.tasks)
        measured = measured_runs(ts, args.measured) if args.measured else None
        start = time.perf_counter()
        proxy = build_proxy(ts, args.samples, args.horizon_ms, args.seed, measured)
        train_s = time.perf_counter() - start
        found = search(ts, proxy, args.pop, args.generations, args.seed)
    except (OSError, ValueError, KeyError, StopIteration) as exc:
        print(f'rrto-plan-tasks: {exc}', file=sys.stderr)
        return 2
    predicted = {'miss_rate': found['predicted'], 'simulated_miss_rate': found['simulated'],
                 'accuracy': weighted_accuracy(ts, found['choices']),
                 'storage_mb': storage_mb(ts, found['choices']), 'proxy_train_s': train_s,
                 'search_s': found['search_s'], 'evaluations': found['evaluations']}
    to_strategy(ts, found['choices'], found['theta'], predicted).save(args.out)
    print(json.dumps({'out': args.out, 'theta': found['theta'], **predicted}, indent=1))
    return 0


if __name__ == '__main__':
    sys.exit(main())
