"""
Choose a model variant and a priority per task (RT-mDL's offline optimiser, small).

Input: tasks with a period, a deadline (at most the period) and candidate
variants of their network (e.g. resnet18 vs mobilenet, fp32 vs fp16, two
input sizes), each with its measured execution time on the server, the
longest segment it is recorded with (the non-preemptible unit), an accuracy
and a storage size.  Output: one variant and one priority per task such that

1. as few tasks as possible can miss a deadline (response-time analysis),
2. then the weighted accuracy is as high as possible,
3. then the storage is as small as possible,

with the chosen variants' total size within a storage budget.

Schedulability is the response-time test of fixed-priority scheduling with
preemption at segment boundaries (the scheduler's ``preemptive`` policy):

    R_i = B_i + C_i + sum_{j in hp(i)} ceil(R_i / T_j) * C_j,   R_i <= D_i

where the blocking ``B_i`` is the longest segment of any lower-priority task
(it may have just started one when task i arrives).  The test is sufficient
for deadlines no longer than periods.  Priorities come from Audsley's
optimal priority assignment over this test (lowest level first); a task that
fits no remaining level is counted as a miss and given the lowest one.
Variant combinations are searched exhaustively up to ``max_combinations``,
greedily beyond.  :func:`simulate` replays a plan through a discrete-event
model of the same scheduler to count misses over a horizon.

``python -m rrto_server.rtplan tasks.json --storage-mb 200`` prints a plan.
"""

from __future__ import annotations

import argparse
import heapq
import itertools
import json
import math
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

EPS = 1e-9


@dataclass(frozen=True)
class Variant:
    """One way to run a task's network on the server."""

    name: str
    latency_ms: float           # worst-case (or high-percentile) execution time
    accuracy: float
    size_mb: float
    segment_ms: float | None = None     # longest segment; None: unsegmented (= latency)

    @property
    def block_ms(self) -> float:
        return self.latency_ms if self.segment_ms is None else min(self.segment_ms,
                                                                   self.latency_ms)


@dataclass(frozen=True)
class Task:
    """A periodic perception task with candidate variants."""

    name: str
    period_ms: float
    deadline_ms: float
    variants: tuple[Variant, ...]
    weight: float = 1.0         # importance of its accuracy

    def __post_init__(self):
        if not self.variants:
            raise ValueError(f'task {self.name!r} has no variants')
        if not 0 < self.deadline_ms <= self.period_ms:
            raise ValueError(f'task {self.name!r}: need 0 < deadline_ms <= period_ms')


@dataclass
class Plan:
    """A variant and a priority per task, with what the analysis says about it."""

    variants: dict[str, Variant]
    priorities: dict[str, int]          # higher runs first, as in the INFER header
    response_ms: dict[str, float]       # bound on the response time (inf: unbounded)
    misses: list[str] = field(default_factory=list)
    accuracy: float = 0.0
    storage_mb: float = 0.0

    def to_json(self) -> dict:
        data = asdict(self)
        data['response_ms'] = {k: (None if math.isinf(v) else v)
                               for k, v in self.response_ms.items()}
        return data


def response_time(c: float, d: float, blocking: float, higher: Sequence[tuple[float, float]]
                  ) -> float:
    """Return the response-time bound of a task (C, D) under ``higher`` (C, T) pairs."""
    r = blocking + c + sum(cj for cj, _ in higher)
    while r <= d + EPS:
        nxt = blocking + c + sum(math.ceil(r / tj - EPS) * cj for cj, tj in higher)
        if nxt <= r + EPS:
            return nxt
        r = nxt
    return math.inf


def assign_priorities(tasks: Sequence[Task], choice: dict[str, Variant]
                      ) -> tuple[dict[str, int], dict[str, float], list[str]]:
    """Return priorities (higher first), response-time bounds and unschedulable tasks."""
    unassigned = list(tasks)
    lower_block = 0.0               # longest segment among tasks already given lower levels
    order: list[Task] = []          # lowest priority first
    response: dict[str, float] = {}
    misses: list[str] = []
    while unassigned:
        candidates = []
        for task in unassigned:
            v = choice[task.name]
            higher = [(choice[o.name].latency_ms, o.period_ms) for o in unassigned
                      if o is not task]
            r = response_time(v.latency_ms, task.deadline_ms, lower_block, higher)
            if r <= task.deadline_ms + EPS:
                candidates.append((task.deadline_ms, -v.block_ms, task.name, task, r))
        if candidates:
            # among the tasks that fit the lowest level, prefer the loosest deadline
            _, _, _, task, r = max(candidates, key=lambda c: c[:3])
        else:
            task = max(unassigned, key=lambda t: (t.deadline_ms / t.weight, t.name))
            r = math.inf
            misses.append(task.name)
        unassigned.remove(task)
        order.append(task)
        response[task.name] = r
        lower_block = max(lower_block, choice[task.name].block_ms)
    priorities = {task.name: level for level, task in enumerate(order)}
    return priorities, response, misses


def _evaluate(tasks: Sequence[Task], choice: dict[str, Variant]) -> Plan:
    priorities, response, misses = assign_priorities(tasks, choice)
    return Plan(dict(choice), priorities, response, misses,
                accuracy=sum(t.weight * choice[t.name].accuracy for t in tasks),
                storage_mb=sum(v.size_mb for v in choice.values()))


def _rank(plan: Plan) -> tuple:
    return (len(plan.misses), -plan.accuracy, plan.storage_mb)


def plan(tasks: Sequence[Task], storage_mb: float = math.inf,
         max_combinations: int = 20000) -> Plan:
    """Return the best variants and priorities for ``tasks``; raise ValueError if none fit."""
    names = [t.name for t in tasks]
    if len(set(names)) != len(names):
        raise ValueError('task names must be unique')
    if sum(min(v.size_mb for v in t.variants) for t in tasks) > storage_mb + EPS:
        raise ValueError(f'even the smallest variants exceed the storage budget of '
                         f'{storage_mb} MB')
    combinations = math.prod(len(t.variants) for t in tasks)
    if combinations <= max_combinations:
        best = None
        for picked in itertools.product(*(t.variants for t in tasks)):
            if sum(v.size_mb for v in picked) > storage_mb + EPS:
                continue
            candidate = _evaluate(tasks, dict(zip(names, picked)))
            if best is None or _rank(candidate) < _rank(best):
                best = candidate
        return best
    return _greedy(tasks, storage_mb)


def _greedy(tasks: Sequence[Task], storage_mb: float) -> Plan:
    """Start from the fastest variants that fit; take single-task swaps while they improve."""
    choice = {}
    for task in tasks:
        choice[task.name] = min(task.variants, key=lambda v: (v.latency_ms, v.size_mb))
    while sum(v.size_mb for v in choice.values()) > storage_mb + EPS:
        task = max(tasks, key=lambda t: choice[t.name].size_mb
                   - min(v.size_mb for v in t.variants))
        choice[task.name] = min(task.variants, key=lambda v: v.size_mb)
    best = _evaluate(tasks, choice)
    improved = True
    while improved:
        improved = False
        for task in tasks:
            for variant in task.variants:
                trial = dict(best.variants)
                trial[task.name] = variant
                if sum(v.size_mb for v in trial.values()) > storage_mb + EPS:
                    continue
                candidate = _evaluate(tasks, trial)
                if _rank(candidate) < _rank(best):
                    best, improved = candidate, True
    return best


def simulate(tasks: Sequence[Task], result: Plan, horizon_ms: float | None = None,
             segments: dict[str, Sequence[float]] | None = None) -> dict[str, dict]:
    """
    Run a plan through a model of the preemptive scheduler; count misses per task.

    Every task releases at time 0 and then periodically (the critical instant);
    each job is a chain of segments (``segments[name]``, default: the variant's
    latency cut into ``block_ms`` pieces); after every segment the most urgent
    released job (priority, then earliest deadline) runs next.  Late jobs run
    to completion.  Returns ``{task: {'jobs', 'misses', 'max_response_ms'}}``.
    """
    by_name = {t.name: t for t in tasks}
    horizon = horizon_ms or 10 * max(t.period_ms for t in tasks)
    pieces = {}
    for name, variant in result.variants.items():
        if segments and name in segments:
            pieces[name] = list(segments[name])
        else:
            count = max(1, math.ceil(variant.latency_ms / variant.block_ms - EPS))
            pieces[name] = [variant.latency_ms / count] * count
    releases = [(0.0, name, 0) for name in by_name]
    heapq.heapify(releases)
    ready: list = []
    stats = {name: {'jobs': 0, 'misses': 0, 'max_response_ms': 0.0} for name in by_name}
    now = 0.0
    while releases or ready:
        while releases and releases[0][0] <= now + EPS:
            release, name, k = heapq.heappop(releases)
            task = by_name[name]
            heapq.heappush(ready, (-result.priorities[name], release + task.deadline_ms, k,
                                   name, release, 0))
            if release + task.period_ms < horizon:
                heapq.heappush(releases, (release + task.period_ms, name, k + 1))
        if not ready:
            now = releases[0][0]
            continue
        prio, deadline, k, name, release, index = heapq.heappop(ready)
        now += pieces[name][index]
        if index + 1 < len(pieces[name]):
            heapq.heappush(ready, (prio, deadline, k, name, release, index + 1))
            continue
        entry = stats[name]
        entry['jobs'] += 1
        entry['misses'] += int(now > deadline + EPS)
        entry['max_response_ms'] = max(entry['max_response_ms'], now - release)
    return stats


def load_tasks(doc: list) -> list[Task]:
    """Build tasks from JSON: ``[{name, period_ms, deadline_ms, weight?, variants: [...]}]``."""
    tasks = []
    for item in doc:
        variants = tuple(Variant(**v) for v in item['variants'])
        tasks.append(Task(item['name'], float(item['period_ms']),
                          float(item.get('deadline_ms', item['period_ms'])), variants,
                          float(item.get('weight', 1.0))))
    return tasks


def main(argv: list[str] | None = None) -> int:
    """Print the plan for a JSON task file."""
    parser = argparse.ArgumentParser(prog='rrto_server.rtplan', description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('tasks', help='JSON file with the tasks and their variants')
    parser.add_argument('--storage-mb', type=float, default=math.inf)
    args = parser.parse_args(argv)
    try:
        tasks = load_tasks(json.loads(Path(args.tasks).read_text()))
        result = plan(tasks, args.storage_mb)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        print(f'rtplan: {exc}', file=sys.stderr)
        return 2
    print(json.dumps({'plan': result.to_json(), 'simulated': simulate(tasks, result)},
                     indent=1))
    return 0


if __name__ == '__main__':
    sys.exit(main())
