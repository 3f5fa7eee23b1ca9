"""
Search execution strategies for a task set (RT-mDL's optimiser): NSGA-II over a proxy.

Decision per task: its variant, its priority (one order of all tasks), its
segment granularity and its packing threshold theta (two jobs run side by
side only within the smaller of their tasks' thresholds; the server's is the
largest, 0 for one lane).  Objectives: maximise weighted accuracy, minimise
storage after layer sharing.  Constraints: every task's miss rate within
``(1 - margin)`` times its bound, storage within the budget.  Miss rates: where
packing is off and the response-time test proves every deadline (device
times at their 99th percentile, the interpreter time of every other task,
the calls' noise at its 99th percentile), zero without asking anyone;
otherwise the learned proxy (:mod:`rrto_server.rtproxy`).  The strategies on
the Pareto front are simulated and the proxy learns from them before the
next round; the most accurate simulated strategy whose every task stays
within ``(1 - margin)`` times its bound is the answer, the next few are kept
for when a measured confirmation run refutes it.  ``margin`` is
the share of a bound that the calibrated model failed to foresee on held-out
measured runs (:func:`rrto_server.rtcalib.margin`).

``rrto-plan-tasks tasks.yaml -o strategy.json [--measured runs.json --held-out]``
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import sys
import time
from pathlib import Path

from rrto_server import rtcalib, rtplan, rtproxy, rttasks
from rrto_server.rtsim import Choice, simulate
from rrto_server.rttasks import TaskSet
from rrto_wire import strategy as strategy_format

P99 = 2.326             # standard normal 99th percentile, for log-normal jitter
NOISE_P99 = math.log(100.0)     # 99th percentile of an exponential, in means


GENES = 4              # per task: variant, priority key, granularity, theta


def decode(ts: TaskSet, x) -> tuple[dict[str, Choice], float]:
    """Map a point of [0, 1)^(4n) to a strategy (random-key priorities) and the server theta."""
    n = len(ts.tasks)
    keys = [x[GENES * i + 1] for i in range(n)]
    rank = {i: r for r, i in enumerate(sorted(range(n), key=lambda i: (keys[i], i)))}
    choices = {}
    for i, task in enumerate(ts.tasks):
        grans, at = task.granularities, GENES * i
        choices[task.name] = Choice(task.variants[_pick(x[at], len(task.variants))],
                                    rank[i], grans[_pick(x[at + 2], len(grans))],
                                    ts.thetas[_pick(x[at + 3], len(ts.thetas))])
    return choices, rtproxy.server_theta(choices)


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
    noise = NOISE_P99 * ts.noise_ms
    return all(r <= 1.0 for r in rtproxy.rta_ratios(ts, choices, inflate, noise).values())


class Evaluator:
    """Miss rates per strategy: the response-time proof, else the proxy; cached."""

    def __init__(self, ts: TaskSet, proxy: rtproxy.Proxy):
        self.ts, self.proxy = ts, proxy
        self.cache: dict = {}
        self.proofs = 0

    def __call__(self, choices: dict[str, Choice], theta: float) -> dict[str, float]:
        key = (theta,) + tuple((c.variant.name, c.priority, c.granularity, c.theta)
                               for c in choices.values())
        if key not in self.cache:
            if proven(self.ts, choices, theta):
                self.proofs += 1
                self.cache[key] = {t.name: 0.0 for t in self.ts.tasks}
            else:
                self.cache[key] = self.proxy.predict(self.ts, choices, theta)
        return self.cache[key]


def search(ts: TaskSet, proxy: rtproxy.Proxy, pop: int = 40, generations: int = 40,
           seed: int = 0, verify_ms: float = 20000.0, margin: float = 0.0,
           keep: int = 3, jobs: int = 1, rounds: int = 3) -> dict:
    """
    Run NSGA-II on the proxy, simulate its front, learn from it; return the best confirmed.

    Each of ``rounds`` runs NSGA-II with the proxy's miss rates, simulates
    the strategies on its feasible front and adds them to the proxy's
    training set, so the next round's proxy is right where the search looks.
    Of every strategy simulated, the most accurate (then smallest) that keeps
    each task within ``(1 - margin)`` times its bound is the answer;
    ``alternatives`` holds up to ``keep`` more, in the same order: the bench
    measures the choice before committing it and moves on to these when the
    server refutes it.
    """
    evaluate = Evaluator(ts, proxy)
    simulated: dict = {}
    search_s = verify_s = 0.0
    front_sizes = []
    for r in range(rounds):
        start = time.perf_counter()
        front = _nsga2(ts, evaluate, pop, generations, seed + r, margin)
        search_s += time.perf_counter() - start
        start = time.perf_counter()
        fresh = {_key(c, th): (c, th) for c, th in front if _key(c, th) not in simulated}
        front_sizes.append(len(front))
        args = [(ts, c, th, verify_ms, seed + 7) for c, th in fresh.values()]
        if jobs > 1 and len(args) > 1:
            with multiprocessing.get_context('fork').Pool(jobs) as pool:
                results = pool.starmap(simulate, args)
        else:
            results = [simulate(*a) for a in args]
        for (key, (choices, theta)), result in zip(fresh.items(), results):
            simulated[key] = (choices, theta, result)
            proxy.add(ts, choices, theta, {k: v['miss_rate'] for k, v in result.items()})
        verify_s += time.perf_counter() - start
        if r + 1 < rounds and fresh:
            proxy.fit()
            evaluate.cache.clear()
    confirmed = sorted(((c, th, sim) for c, th, sim in simulated.values()
                        if all(sim[t.name]['miss_rate'] <= (1 - margin) * t.miss_bound
                               for t in ts.tasks)),
                       key=lambda s: (-weighted_accuracy(ts, s[0]), storage_mb(ts, s[0])))
    if not confirmed:
        raise ValueError(f'no strategy meets every miss bound with margin {margin:g} '
                         f'({len(simulated)} simulated from the feasible fronts, none '
                         'confirmed)')
    choices, theta, result = confirmed[0]
    return {'choices': choices, 'theta': theta, 'search_s': search_s, 'verify_s': verify_s,
            'evaluations': len(evaluate.cache), 'proofs': evaluate.proofs,
            'front': front_sizes, 'simulated_strategies': len(simulated), 'margin': margin,
            'predicted': evaluate(choices, theta),
            'simulated': {k: v['miss_rate'] for k, v in result.items()},
            'alternatives': [(c, th) for c, th, _ in confirmed[1:keep + 1]]}


def _key(choices: dict[str, Choice], theta: float) -> tuple:
    return (theta,) + tuple((k, c.variant.name, c.priority, c.granularity, c.theta)
                            for k, c in sorted(choices.items()))


def _nsga2(ts: TaskSet, evaluate: Evaluator, pop: int, generations: int, seed: int,
           margin: float) -> list[tuple[dict[str, Choice], float]]:
    """
    Return the feasible Pareto front NSGA-II finds on the proxy, most accurate first.

    When the proxy finds nothing feasible, return the half of the final
    population closest to feasible instead: simulating those teaches the
    proxy where it was too pessimistic.
    """
    import numpy as np
    from pymoo.algorithms.moo.nsga2 import NSGA2
    from pymoo.core.problem import ElementwiseProblem
    from pymoo.optimize import minimize

    n = len(ts.tasks)

    class Problem(ElementwiseProblem):
        def __init__(self):
            super().__init__(n_var=GENES * n, n_obj=2, n_ieq_constr=n + 1, xl=0.0,
                             xu=1.0 - 1e-9)

        def _evaluate(self, x, out, *args, **kwargs):
            choices, theta = decode(ts, x)
            miss = evaluate(choices, theta)
            out['F'] = [-weighted_accuracy(ts, choices), storage_mb(ts, choices)]
            out['G'] = [miss[t.name] - (1 - margin) * t.miss_bound for t in ts.tasks] + \
                [storage_mb(ts, choices) - ts.storage_mb]

    result = minimize(Problem(), NSGA2(pop_size=pop), ('n_gen', generations), seed=seed,
                      verbose=False)
    if result.X is not None:
        front = [decode(ts, x) for x in np.atleast_2d(result.X)]
    else:       # nothing feasible on the proxy: hand on the least violating half to simulate
        order = np.argsort(result.pop.get('CV').ravel())[:max(1, pop // 2)]
        front = [decode(ts, x) for x in result.pop.get('X')[order]]
    return sorted(front, key=lambda s: (-weighted_accuracy(ts, s[0]), storage_mb(ts, s[0])))


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
            t.deadline_ms, t.period_ms, choices[t.name].variant.file, choices[t.name].theta)
        for t in ts.tasks},
        predicted or {})


def from_strategy(ts: TaskSet, doc: dict) -> tuple[dict[str, Choice], float]:
    """Return the choices a strategy document makes for ``ts``."""
    plan = strategy_format.parse(doc)
    choices = {}
    for t in ts.tasks:
        entry = plan.tasks[t.name]
        variant = next(v for v in t.variants if v.name == entry.variant)
        choices[t.name] = Choice(variant, entry.priority, entry.segments, entry.theta)
    return choices, plan.theta


def measured_runs(ts: TaskSet, path: str | Path) -> list[tuple[dict, float, dict]]:
    """
    Read measured runs for :mod:`rrto_server.rtcalib`.

    A JSON list of ``{"strategy": {...}, "tasks": {task: {"miss_rate",
    "response_ms_p50", "response_ms_p99", "results"}}}`` (percentiles and the
    count of results optional), as ``bench.rtmdl`` writes them.
    """
    runs = []
    for run in json.loads(Path(path).read_text()):
        choices, theta = from_strategy(ts, run['strategy'])
        runs.append((choices, theta, {k: measured_task(v) for k, v in run['tasks'].items()}))
    return runs


def measured_task(doc: dict) -> dict:
    """Return one task's measured figures, checked."""
    out = {'miss_rate': float(doc['miss_rate'])}
    for key in ('response_ms_p50', 'response_ms_p99', 'results'):
        if doc.get(key) is not None:
            out[key] = float(doc[key])
    return out


def miss_rates(runs: list) -> list[tuple[dict, float, dict]]:
    """Return ``runs`` with only each task's miss rate (what the proxy is calibrated with)."""
    return [(c, th, {k: v['miss_rate'] for k, v in m.items()}) for c, th, m in runs]


def build_proxy(ts: TaskSet, samples: int, horizon_ms: float, seed: int,
                measured: list | None = None, jobs: int = 1) -> rtproxy.Proxy:
    """Train the proxy on simulated strategies, calibrated on ``measured`` runs if given."""
    proxy = rtproxy.Proxy(seed=seed)
    proxy.simulate_samples(ts, samples, horizon_ms, seed, jobs)
    return proxy.calibrate(ts, miss_rates(measured)) if measured else proxy.fit()


def main(argv: list[str] | None = None) -> int:
    """Search a task set and write a strategy file."""
    parser = argparse.ArgumentParser(prog='rrto-plan-tasks', description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('tasks', help='task-set YAML (or JSON)')
    parser.add_argument('-o', '--out', default='strategy.json', help='strategy file to write')
    parser.add_argument('--measured', help='measured runs (JSON): the server model is fitted '
                        'to them and the proxy calibrated with them')
    parser.add_argument('--margin', type=float, default=0.0,
                        help='keep every predicted miss rate within (1 - this) x its bound')
    parser.add_argument('--held-out', action='store_true',
                        help='take the margin from leave-one-run-out on --measured')
    parser.add_argument('--samples', type=int, default=300, help='simulated training strategies')
    parser.add_argument('--horizon-ms', type=float, default=4000.0, help='simulated time each')
    parser.add_argument('--pop', type=int, default=40)
    parser.add_argument('--generations', type=int, default=40)
    parser.add_argument('--jobs', type=int, default=1, help='processes simulating')
    parser.add_argument('--seed', type=int, default=0)
    args = parser.parse_args(argv)
    try:
        ts = rttasks.load(args.tasks)
        measured = measured_runs(ts, args.measured) if args.measured else None
        margin, fitted = args.margin, {}
        if measured:
            if args.held_out:
                margin = rtcalib.margin(rtcalib.held_out(ts, measured, args.horizon_ms,
                                                         args.seed, args.jobs))
            ts, fitted = rtcalib.fit(ts, measured, args.horizon_ms, args.seed, args.jobs)
        start = time.perf_counter()
        proxy = build_proxy(ts, args.samples, args.horizon_ms, args.seed, measured, args.jobs)
        train_s = time.perf_counter() - start
        found = search(ts, proxy, args.pop, args.generations, args.seed, margin=margin,
                       jobs=args.jobs)
    except (OSError, ValueError, KeyError, StopIteration) as exc:
        print(f'rrto-plan-tasks: {exc}', file=sys.stderr)
        return 2
    predicted = {'miss_rate': found['predicted'], 'simulated_miss_rate': found['simulated'],
                 'accuracy': weighted_accuracy(ts, found['choices']),
                 'storage_mb': storage_mb(ts, found['choices']), 'proxy_train_s': train_s,
                 'search_s': found['search_s'], 'evaluations': found['evaluations'],
                 'margin': margin, 'server_model': fitted.get('params', rtcalib.model(ts))}
    to_strategy(ts, found['choices'], found['theta'], predicted).save(args.out)
    print(json.dumps({'out': args.out, 'theta': found['theta'], **predicted}, indent=1))
    return 0


if __name__ == '__main__':
    sys.exit(main())
