r"""
Are a hybrid run's same-plan gaps chance?  Runner effects and the rules' false-over rates.

Reads ``bench.hybrid`` result files (per-round samples) and, over the calls that
ran ``local``:

1. fits each call's log latency on its round, its runner and the plan of the call
   just before it (least squares): a runner effect is a runner instance slower
   than ``local`` in the same rounds after the same kind of call;
2. counts the twins' sign: ``local_twin`` over ``local`` per point;
3. a null model: where all five local-plan runners (the two local twins, the best
   split, both table runners) ran ``local``, the runners of a round are
   exchangeable; rounds drawn from those (roles shuffled) and judged by the
   per-point, paired and by-plan rules give the chance that a table runner
   identical to the baselines is called over, per number of rounds.

Each call's place and the runner before it come from the file (``rounds_after``)
or, for runs made before ``run_interleaved`` kept them, from the design
(``MODES`` shuffled by ``Random(0)``, :func:`~bench.measure.balanced_orders`, the
first row the number of points measured before in the same process; runs with
``--same-plan-rounds`` always kept them).

    python -m bench.hybrid_noise docs/results/hybrid_240_keypoint_14rounds_s12.json \
        docs/results/hybrid_240_keypoint_alone_s13.json --rounds 14,28,56,112

``--in-use`` instead splits the correction-on runner's in-use prediction error
per point into the robot price's part and the rest (:func:`in_use_parts`).
"""

from __future__ import annotations

import argparse
import collections
import json
import math
import random
import statistics
import sys
from pathlib import Path

import numpy as np

from bench.hybrid import MODES, TABLE_RUNNERS
from bench.measure import balanced_orders

LOCAL_RUNNERS = ('local', 'local_twin', 'best_split') + TABLE_RUNNERS


def _plan(point: dict) -> str | None:
    plans = point.get('plans') or {}
    return next(iter(plans)) if len(plans) == 1 else None


def _first_rows(data: dict) -> dict[str, int]:
    """Return per model the design row of its first point (its process's earlier points)."""
    cores = data['meta'].get('per_model_cores') or {}
    done: collections.Counter = collections.Counter()
    first = {}
    for model in data['models']:
        process = json.dumps(cores.get(model['model'], {}).get('robot_cpus'))
        first[model['model']] = done[process]
        done[process] += len(model['rows'])
    return first


def calls_of(data: dict, source: str = '') -> list[dict]:
    """Return every timed call of a result: its round, runner, plan, latency and predecessor."""
    names = list(MODES)
    random.Random(0).shuffle(names)
    orders = balanced_orders(len(MODES))
    firsts = _first_rows(data)
    calls = []
    for model in data['models']:
        for index, row in enumerate(model['rows']):
            if not all(row.get(n, {}).get('rounds_ms') for n in MODES):
                continue
            plans = {n: _plan(row[n]) for n in MODES}
            rounds = len(row['local']['rounds_ms'])
            after = {n: row[n].get('rounds_after') for n in MODES}
            if None in after.values():      # an older run: the design says
                after = {n: [] for n in MODES}
                previous = MODES[-1]        # the last warm-up call
                for k in range(rounds):
                    for i in orders[(firsts[model['model']] + index + k) % len(orders)]:
                        after[names[i]].append(previous)
                        previous = names[i]
            for name in MODES:
                for k, ms in enumerate(row[name]['rounds_ms']):
                    before = after[name][k]
                    calls.append({'key': (source, model['model'], index, k), 'runner': name,
                                  'plan': plans[name], 'ms': ms,
                                  'after': plans.get(before) if before else None})
    return calls


def _kind(plan: str | None) -> str:
    return 'none' if plan is None else plan.split('@')[0]


def effects(calls: list[dict]) -> dict:
    """
    Fit log latency of the local-plan calls on round, runner and the kind of call before.

    Returns per runner and per predecessor kind the effect (fraction, against
    ``local`` and against a local call before) and its standard error, and the
    residual spread per call.
    """
    local = [c for c in calls if c['plan'] == 'local' and c['runner'] in LOCAL_RUNNERS]
    keys = sorted({c['key'] for c in local})
    column = {key: i for i, key in enumerate(keys)}
    runners = [n for n in LOCAL_RUNNERS[1:] if any(c['runner'] == n for c in local)]
    kinds = sorted({_kind(c['after']) for c in local} - {'local'})
    terms = [('runner', n) for n in runners] + [('after', k) for k in kinds]
    x = np.zeros((len(local), len(keys) + len(terms)))
    y = np.array([math.log(c['ms']) for c in local])
    for j, c in enumerate(local):
        x[j, column[c['key']]] = 1.0
        if c['runner'] in runners:
            x[j, len(keys) + runners.index(c['runner'])] = 1.0
        if _kind(c['after']) in kinds:
            x[j, len(keys) + len(runners) + kinds.index(_kind(c['after']))] = 1.0
    beta = np.linalg.lstsq(x, y, rcond=None)[0]
    residual = y - x @ beta
    dof = max(1, len(y) - np.linalg.matrix_rank(x))
    cov = residual @ residual / dof * np.linalg.pinv(x.T @ x)
    out = {'calls': len(local), 'spread': math.sqrt(residual @ residual / dof)}
    for i, term in enumerate(terms):
        j = len(keys) + i
        out[f'{term[0]} {term[1]}'] = (math.expm1(beta[j]), math.sqrt(cov[j, j]))
    return out


def local_rounds(calls: list[dict], names=LOCAL_RUNNERS) -> list[list[float]]:
    """Return the rounds where every one of ``names`` ran local, scaled by their point's median."""
    by_round: dict[tuple, dict] = collections.defaultdict(dict)
    for c in calls:
        if c['runner'] in names:
            by_round[c['key']][c['runner']] = c
    points: dict[tuple, list] = collections.defaultdict(list)
    for key, row in by_round.items():
        if len(row) == len(names) and all(c['plan'] == 'local' for c in row.values()):
            points[key[:3]].append([row[n]['ms'] for n in names])
    rounds = []
    for values in points.values():
        level = statistics.median(v for r in values for v in r)
        rounds += [[v / level for v in r] for r in values]
    return rounds


def _gap(a: float, b: float) -> float:
    return max(a, b) / min(a, b) - 1


def false_over(rounds: list[list[float]], count: int, trials: int, seed: int = 0) -> dict:
    """
    Return how often each rule calls a table runner identical to the baselines over.

    ``rounds``: rows of the five local-plan runners (:data:`LOCAL_RUNNERS`);
    ``count`` rounds are drawn per trial, the roles shuffled in each.
    """
    rng = random.Random(seed)
    over = collections.Counter()
    for _ in range(trials):
        sample = []
        for _ in range(count):
            row = list(rng.choice(rounds))
            rng.shuffle(row)
            sample.append(dict(zip(LOCAL_RUNNERS, row)))
        med = {n: statistics.median(s[n] for s in sample) for n in LOCAL_RUNNERS}
        best = min(med['local'], med['best_split'])
        point_floor = max(0.03, _gap(med['local'], med['local_twin']))
        over['point'] += med['hybrid'] / best - 1 > point_floor
        twin = statistics.median(s['local_twin'] / s['local'] for s in sample)
        floor = max(0.03, _gap(twin, 1.0))
        paired = max(statistics.median(s['hybrid'] / s[b] for s in sample)
                     for b in ('local', 'best_split'))
        over['paired'] += paired - 1 > floor
        by_plan = statistics.median(
            s['hybrid'] / statistics.fmean((s['local'], s['local_twin'], s['best_split']))
            for s in sample)
        over['plan'] += by_plan - 1 > floor
    return {rule: over[rule] / trials for rule in ('point', 'paired', 'plan')}


def twin_signs(calls: list[dict]) -> tuple[int, int]:
    """Return at how many local points ``local_twin`` was slower and faster than ``local``."""
    pairs: dict[tuple, dict] = collections.defaultdict(dict)
    for c in calls:
        if c['runner'] in ('local', 'local_twin') and c['plan'] == 'local':
            pairs[c['key'][:3]].setdefault(c['key'][3], {})[c['runner']] = c['ms']
    medians = [statistics.median(math.log(r['local_twin'] / r['local'])
                                 for r in point.values() if len(r) == 2)
               for point in pairs.values()]
    return sum(m > 0 for m in medians), sum(m < 0 for m in medians)


def in_use_parts(data: dict) -> list[dict]:
    """
    Split the correction-on runner's in-use prediction error, point by point, into its parts.

    ``error``: the recorded in-use prediction (the table re-decided at the robot
    price held before the point's rounds) against the point's median.  ``level``:
    the robot's level in the point's own rounds, the two local runners' median
    over the local prediction (the quantity the price measures);
    ``at_level``: the prediction repriced at that level instead, so ``robot`` =
    ``error`` - ``at_level`` is the part the price missed the robot by (moved
    after it was measured, or measured on too few calls).  The repricing is exact
    for ``local``, for ``offload`` (its robot work is byte costs: unchanged) and
    for a hybrid the recorded numbers show robot-bound (its in-use prediction is
    the price times the offline one: its band binds at 1 and at the price, and at
    any level above the lesser of the two); elsewhere None.  ``server``: for
    ``offload``, the server compute its replies reported (median) less the
    calibration's for it, over the median.  ``hybrid_priced``: for a robot-bound
    hybrid, the prediction at the robot priced by a hybrid's own robot time, the
    ``hybrid`` runner's mean robot CPU ms in the same rounds (same plan, other
    calls) over the calibration's robot ms for the plan; a proxy of pricing from
    the plan's calls (CPU time, not the robot compute a call times; the results
    kept no per-call robot compute before ``rounds_robot_ms``).
    """
    parts = []
    for model in data['models']:
        calibration = model.get('calibration', {})
        robot_ms = calibration.get('measured_robot_ms', {})
        server_ms = calibration.get('server_compute_ms', {})
        for row in model['rows']:
            c = row['corrected']
            if 'in_use_predicted_ms' not in c:
                continue
            plan, f = c['plan'], c.get('robot_factor')
            offline, in_use, median = c['predicted_ms'], c['in_use_predicted_ms'], c['median_ms']
            level = statistics.median(row['local']['rounds_ms'] + row['local_twin']['rounds_ms']
                                      ) / row['local']['predicted_ms']
            bound = (plan.startswith('hybrid') and f is not None
                     and abs(in_use - f * offline) <= 0.005 * offline)
            at = {'local': level * offline, 'offload': in_use}.get(plan)
            if bound and level >= min(1.0, f):
                at = level * offline
            part = {'model': model['model'], 'bandwidth_mbps': row['bandwidth_mbps'],
                    'rtt_ms': row['rtt_ms'], 'plan': plan, 'price': f, 'level': level,
                    'offline': offline / median - 1, 'error': in_use / median - 1,
                    'at_level': None if at is None else at / median - 1,
                    'server': None, 'hybrid_priced': None}
            part['robot'] = None if at is None else part['error'] - part['at_level']
            measured, priced = c.get('server_compute_ms'), server_ms.get(plan, {})
            if plan == 'offload' and measured and priced.get('measured_ms'):
                part['server'] = (measured - priced['measured_ms']) / median
            h = row['hybrid']
            if bound and h['plan'] == plan and robot_ms.get(plan):
                g = h['robot_cpu_ms'] / robot_ms[plan]
                if g >= min(1.0, f):
                    part['hybrid_priced'] = g * offline / median - 1
            parts.append(part)
    return parts


def _pct(value: float | None) -> str:
    return '   n/a' if value is None else f'{value * 100:+6.1f}'


def _ratio(value: float | None) -> str:
    return '  n/a' if value is None else f'{value:5.3f}'


def _median_abs(values) -> str:
    values = [abs(v) for v in values if v is not None]
    return f'{statistics.median(values) * 100:.1f} % ({len(values)})' if values else 'n/a'


def print_in_use(parts: list[dict]) -> None:
    """Print :func:`in_use_parts` per point and each network's median absolute errors."""
    print('in-use prediction error of the correction-on runner (% of the median):')
    print('  net          link      plan            price level  offline in use at-level '
          ' robot server hybrid-priced')
    for p in parts:
        print(f"  {p['model']:12s} {p['bandwidth_mbps']:4g}/{p['rtt_ms']:<4g} {p['plan']:15s} "
              f"{_ratio(p['price'])} {p['level']:5.3f} {_pct(p['offline'])}  "
              f"{_pct(p['error'])} {_pct(p['at_level'])} {_pct(p['robot'])} "
              f"{_pct(p['server'])} {_pct(p['hybrid_priced'])}")
    for model in dict.fromkeys(p['model'] for p in parts):
        mine = [p for p in parts if p['model'] == model]
        print(f"  {model}: median |error| offline {_median_abs(p['offline'] for p in mine)}, "
              f"in use {_median_abs(p['error'] for p in mine)}, at the rounds' level "
              f"{_median_abs(p['at_level'] for p in mine)}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog='python -m bench.hybrid_noise', description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('results', nargs='+', help='bench.hybrid result JSON files')
    parser.add_argument('--rounds', default='7,14,28,56,112', help='rounds per point to judge')
    parser.add_argument('--trials', type=int, default=2000)
    parser.add_argument('--in-use', action='store_true',
                        help="only the in-use prediction error's parts (in_use_parts)")
    args = parser.parse_args(argv)
    if args.in_use:
        for path in args.results:
            print(Path(path).name)
            print_in_use(in_use_parts(json.loads(Path(path).read_text())))
        return 0
    calls = []
    for path in args.results:
        calls += calls_of(json.loads(Path(path).read_text()), Path(path).name)
    fit = effects(calls)
    print(f"{fit.pop('calls')} local-plan calls; residual spread {fit.pop('spread') * 100:.1f} %"
          ' (log s.d.); effects against `local` and against a local call before:')
    for name, (value, error) in fit.items():
        print(f'  {name:18s} {value * 100:+6.2f} % (s.e. {error * 100:.2f})')
    slower, faster = twin_signs(calls)
    print(f'local_twin over local: slower at {slower} points, faster at {faster}')
    rounds = local_rounds(calls)
    if not rounds:
        print('no point where all five local-plan runners ran local: no null model')
        return 0
    print(f'null model from {len(rounds)} rounds: chance a table runner identical to the '
          'baselines is called over at one point')
    for count in (int(v) for v in args.rounds.split(',') if v):
        p = false_over(rounds, count, args.trials)
        print(f"  {count:4d} rounds: per point {p['point']:.3f}, paired {p['paired']:.3f}, "
              f"by plan {p['plan']:.3f}")
    return 0


if __name__ == '__main__':
    sys.exit(main())
