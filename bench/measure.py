"""
Measure one benchmark point: run a runner on frames for a time budget, summarise.

Latency is each call's wall time as the robot sees it (``CallRecord.total_ms``);
robot CPU time is the robot process's CPU time (``time.process_time``, all
its threads, the ZeroMQ I/O thread included) across each call; round trips
and bytes come from the client's counters; server compute from the server's
reply.  Outputs are compared with local inference on the same frame.
"""

from __future__ import annotations

import collections
import itertools
import random
import statistics
import time
from typing import Any, Callable, Sequence

import torch

from rrto_ros import OffloadResult
from rrto_wire import treespec
from rrto_wire.summary import percentile


def timed_ms(fn: Callable, iters: int, warmup: int = 20) -> list[float]:
    """Call ``fn`` ``warmup`` times, then return the milliseconds of ``iters`` timed calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return times


def output_error(output: Any, reference: Any) -> tuple[float, float | None]:
    """
    Return (relative L2 error over all outputs, agreement of the first output's argmax).

    Agreement is top-1 equality for ``[N, C]`` outputs and, for ``[N, C, H, W]``
    maps, the fraction of channels whose peak location is the same.
    """
    out, ref = treespec.flatten(output)[0], treespec.flatten(reference)[0]
    diff = sum(float((o.float() - r.float()).pow(2).sum()) for o, r in zip(out, ref))
    norm = sum(float(r.float().pow(2).sum()) for r in ref)
    rel = (diff / norm) ** 0.5 if norm > 0 else float(diff > 0)
    first_out, first_ref = out[0], ref[0]
    agreement = None
    if first_ref.dim() == 2 and first_ref.shape[1] > 1:
        agreement = float((first_out.argmax(1) == first_ref.argmax(1)).float().mean())
    elif first_ref.dim() == 4:
        agreement = float((first_out.flatten(2).argmax(2) == first_ref.flatten(2).argmax(2))
                          .float().mean())
    return rel, agreement


def run_point(runner: Callable, frames: Sequence[torch.Tensor], references: Sequence[Any],
              budget_s: float, min_calls: int, max_calls: int, warmup_calls: int = 1,
              transform: Callable | None = None, timeline: bool = False) -> dict:
    """Call ``runner`` on the frames in turn for ``budget_s`` (within the call bounds)."""
    prepare = transform or (lambda frame: frame)
    for i in range(warmup_calls):
        runner(prepare(frames[i % len(frames)]))
    calls, errors = [], []
    start = time.monotonic()
    while len(calls) < max_calls and (len(calls) < min_calls
                                      or time.monotonic() - start < budget_s):
        index = len(calls) % len(frames)
        began = time.monotonic()
        cpu = time.process_time()
        output = runner(prepare(frames[index]))
        cpu_ms = (time.process_time() - cpu) * 1e3
        record = runner.last
        calls.append((began - start, record, cpu_ms))
        errors.append(output_error(output, references[index]))
    summary = summarise([r for _, r, _ in calls], [c for _, _, c in calls], errors)
    summary['duration_s'] = time.monotonic() - start
    if timeline:
        summary['timeline'] = [{'t_s': round(t, 4), 'total_ms': round(r.total_ms, 3),
                                'codec': r.codec, 'bytes_sent': r.bytes_sent, 'plan': r.plan,
                                'result': r.result.value} for t, r, _ in calls]
    return summary


_FIRST_ROW = itertools.count()     # run_interleaved's next first row of balanced_orders


def balanced_orders(n: int) -> list[list[int]]:
    """
    Return orders of ``n`` items, a Williams design: each item takes each position equally often.

    Each item also directly follows each other item equally often: once in the
    ``n`` rows of an even ``n``, twice in the ``2 n`` rows of an odd ``n``.
    """
    first, low, high = [0], 1, n - 1
    while len(first) < n:
        first.append(low)
        low += 1
        if len(first) < n:
            first.append(high)
            high -= 1
    rows = [[(v + r) % n for v in first] for r in range(n)]
    return rows + [row[::-1] for row in rows] if n % 2 else rows


def whole_designs(rounds: int, n: int) -> int:
    """
    Return ``rounds`` rounded up to whole Williams designs of ``n`` runners.

    Any that many consecutive rows of :func:`balanced_orders` (cyclically) are
    the whole design: every runner follows every other equally often.  A
    runner's call is slower after a call that left the robot's core idle (an
    offload runner's wait: 1-3.5 % on the 2-core VM, 4.7 % in the H200 host's
    hybrid runs), so half a design (7 rounds of 7 runners) gave one runner
    that predecessor 3 times and its twin once.
    """
    size = len(balanced_orders(n))
    return -(-rounds // size) * size


def run_interleaved(runners: dict, frames: Sequence[torch.Tensor], references: Sequence[Any],
                    budget_s: float, min_calls: int, max_calls: int,
                    warmup_calls: int = 2,
                    probes: dict[str, Callable[[], Any]] | None = None) -> dict[str, dict]:
    """
    Measure several runners in turn, one call each per round, over the same time window.

    Slow drift of the machine (load, frequency, throttling) then affects every
    runner alike, so their medians can be compared point by point.  The orders
    within rounds follow a Williams design (:func:`balanced_orders`): over its
    rows every runner takes every position, and follows every other runner,
    equally often, so none always comes after a long network wait or a cold
    cache; each call starts at the next row, so the few rounds of one point do
    not repeat the same rows at every point (a fixed shuffle did: a Tiny-YOLO
    ``local`` runner followed an offload runner in 3 of 7 rounds at every
    point and measured 4-10 % slow there).  Each
    summary has a ``plans`` count of the plans its calls used and ``rounds_ms``, its
    latency in every round (the same index is the same round for every runner, so
    runners can be compared round by round), with ``rounds_pos``, its place in each
    round, and ``rounds_after``, the runner called just before it (None: nothing
    before it here): a call after one that left the robot's core idle is slower
    (+5.2 % after an offload call in the H200 host's hybrid runs, helper h13t), and
    the design's rows are not in the results otherwise.  ``rounds_robot_ms`` and
    ``rounds_server_ms`` are each call's robot compute and the server's compute its
    reply reported (0: none), ``rounds_plans`` each call's plan and
    ``rounds_predicted_ms`` the plan table's prediction of it, made before it ran
    (``CallRecord.predicted_ms``; 0: none), and ``probes`` (runner name -> callable) add
    ``rounds_probe``, what the callable returned just before each of its calls (a
    price the runner holds): a prediction re-made per call can be judged from them.
    """
    previous = None
    for name, runner in runners.items():
        for i in range(warmup_calls):
            runner(frames[i % len(frames)])
            previous = name
    calls = {name: [] for name in runners}
    places = {name: [] for name in runners}
    probed: dict[str, list] = {name: [] for name in probes or {}}
    names = list(runners)
    random.Random(0).shuffle(names)
    orders = balanced_orders(len(names))
    first = next(_FIRST_ROW)
    start = time.monotonic()
    rounds = 0
    while rounds < max_calls and (rounds < min_calls or time.monotonic() - start < budget_s):
        index = rounds % len(frames)
        for place, name in enumerate(names[i] for i in orders[(first + rounds) % len(orders)]):
            runner = runners[name]
            if name in (probes or {}):
                probed[name].append(probes[name]())
            cpu = time.process_time()
            output = runner(frames[index])
            cpu_ms = (time.process_time() - cpu) * 1e3
            calls[name].append((runner.last, cpu_ms, output_error(output, references[index])))
            places[name].append((place, previous))
            previous = name
        rounds += 1
    result = {}
    for name, entries in calls.items():
        summary = summarise([r for r, _, _ in entries], [c for _, c, _ in entries],
                            [e for _, _, e in entries])
        summary['plans'] = dict(collections.Counter(r.plan for r, _, _ in entries))
        summary['rounds_ms'] = [r.total_ms for r, _, _ in entries]   # [i]: round i's call
        summary['rounds_pos'] = [place for place, _ in places[name]]
        summary['rounds_after'] = [before for _, before in places[name]]
        summary['rounds_robot_ms'] = [r.robot_compute_ms for r, _, _ in entries]
        summary['rounds_server_ms'] = [r.server_compute_ms for r, _, _ in entries]
        summary['rounds_plans'] = [r.plan for r, _, _ in entries]
        summary['rounds_predicted_ms'] = [r.predicted_ms for r, _, _ in entries]
        if name in probed:
            summary['rounds_probe'] = probed[name]
        result[name] = summary
    return result


def summarise(records: list, cpu_ms: list[float], errors: list[tuple]) -> dict:
    """Reduce per-call records to the numbers a benchmark point reports."""
    totals = [r.total_ms for r in records]
    offloaded = [r for r in records if r.result == OffloadResult.OFFLOADED]
    server = [r.total_ms - r.network_ms - r.robot_compute_ms for r in offloaded]
    agreements = [a for _, a in errors if a is not None]
    return {
        'n': len(records),
        'offloaded': len(offloaded),
        'fallbacks': sum(r.result == OffloadResult.LOCAL_FALLBACK for r in records),
        'median_ms': statistics.median(totals),
        'p99_ms': percentile(totals, 99),
        'mean_ms': statistics.fmean(totals),
        'min_ms': min(totals),
        'round_trips': statistics.fmean(r.round_trips for r in records),
        'bytes_sent': statistics.fmean(r.bytes_sent for r in records),
        'bytes_received': statistics.fmean(r.bytes_received for r in records),
        'robot_cpu_ms': statistics.fmean(cpu_ms),
        'server_compute_ms': statistics.median(r.server_compute_ms for r in offloaded)
        if any(r.server_compute_ms > 0 for r in offloaded) else None,   # naive: not reported
        'server_ms': statistics.median(server) if server else None,
        'non_server_ms': statistics.median(r.total_ms - s for r, s in zip(offloaded, server))
        if offloaded else None,
        'codecs': dict(collections.Counter(r.codec for r in offloaded)),
        'rel_l2_max': max(e for e, _ in errors),
        'agreement': statistics.fmean(agreements) if agreements else None,
    }


def offloaded_calls(model: torch.nn.Module, frame: torch.Tensor, endpoint: str, calls: int,
                    warm: int = 20, cpu_ms: list | None = None,
                    between: Callable[[Any], None] | None = None, **options) -> list:
    """
    Offload ``model``, record it for ``frame``, and return the call records of ``calls`` calls.

    ``warm`` untimed calls come first; every returned call was offloaded (one that
    was not fails the benchmark, as its timing would be a local run's).  ``cpu_ms``
    (a list) gets each returned call's CPU time on the calling thread
    (``time.thread_time``: the robot's own work, not its waiting); ``between`` is
    called with each returned call's record right after it (a floor measured
    alternately with the calls, as :mod:`bench.overhead`'s echo).
    """
    from rrto_ros import offload
    with offload(model, server=endpoint, timeout_ms=options.pop('timeout_ms', 20000),
                 **options) as om:
        assert om.warmup(frame), 'server did not record the model'
        records = []
        for i in range(calls + warm):
            cpu = time.thread_time()
            om(frame)
            cpu = time.thread_time() - cpu
            assert om.last.result == OffloadResult.OFFLOADED, om.last.reason
            if i >= warm:
                records.append(om.last)
                if cpu_ms is not None:
                    cpu_ms.append(cpu * 1e3)
                if between is not None:
                    between(om.last)
    return records
