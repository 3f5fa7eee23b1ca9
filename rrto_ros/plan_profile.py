"""
Measurements the planner makes itself: operator profiles, the robot's byte costs, contention.

Everything here runs on the robot (or on a machine capped like it):

* :func:`robot_profile` and :func:`server_profile`: per-operator milliseconds
  on each side, scaled to the measured local call and the measured replay;
* :func:`io_costs`: the robot's wall milliseconds per MB sent and received
  through the client (serialisation, copies, the socket's I/O thread), from
  the process CPU time of probe requests with and without a payload, times
  :func:`cpu_slowdown` (wall over CPU time of the robot's own compute: 4 on a
  robot capped to a quarter of a core);
* :func:`contention`: how much of a transfer's CPU cost lands on compute that
  runs at the same time (1: one shared core, 0: a core of its own);
* :func:`measure_plans`: the robot's side of split and hybrid plans, round by
  round beside the robot's own local compute (:data:`REFERENCE`): each side
  is its paired ratio to that reference times the reference's median, so a
  slow phase of the robot's core during the rounds slows both alike (every
  reference call is also recorded on a :class:`~rrto_ros.plan_speed.RobotClock`);
* :func:`measure_end_to_end`: plans timed end to end through a real
  :class:`~rrto_ros.engine.OffloadedModel`, one call each per round, with the
  server's compute time each call reported and the round it ran in
  (:class:`Timed`), and the robot's own compute timed in the same rounds
  (:data:`REFERENCE`): :func:`phase_free` removes a slow robot phase from a
  robot-bound plan's times with it.
"""

from __future__ import annotations

import random
import statistics
import time
from typing import NamedTuple, Sequence

import torch

from rrto_ros.client import RrtoClient
from rrto_ros.engine import OffloadedModel
from rrto_ros.records import OffloadResult
from rrto_ros.hybrid import PlanRuntime
from rrto_ros.local_model import TorchModule
from rrto_ros.plan_speed import RobotClock
from rrto_ros.plan_table import PlanTable
from rrto_ros.split import Plan
from rrto_wire.op_timing import operator_times
from rrto_wire.messages import Kind

PROBE_BYTES = 1 << 20


REFERENCE = '~robot'   # samples of the robot's own compute (the local model, run directly)


class Timed(NamedTuple):
    """One call: its total, the server's compute time it reported (0: none), its round."""

    total_ms: float
    server_ms: float = 0.0
    round: int = -1      # -1: not known (then a sample's position is its round)


class RobotSides(NamedTuple):
    """The robot's side of each split or hybrid plan, and the local reference beside them."""

    ms: dict[str, float]     # plan name -> ms, at the reference's median speed
    reference_ms: float      # the robot's local compute, median over the same rounds


def by_round(timed: Sequence[Timed]) -> dict[int, Timed]:
    """Return samples keyed by their round (their position where the round is not known)."""
    return {t.round if t.round >= 0 else i: t for i, t in enumerate(timed)}


def paired_ratio(a: Sequence[Timed], b: Sequence[Timed]) -> float | None:
    """Return the median over shared rounds of a's total over b's (None: no round shared)."""
    ra, rb = by_round(a), by_round(b)
    ratios = [ra[r].total_ms / rb[r].total_ms for r in ra if r in rb and rb[r].total_ms > 0]
    return statistics.median(ratios) if ratios else None


def phase_free(timed: Sequence[Timed], reference: Sequence[Timed],
               level_ms: float) -> list[Timed]:
    """
    Return a robot-bound plan's samples as if the robot had run at ``level_ms`` per reference.

    Each sample is scaled by ``level_ms`` over the reference call of its round
    (the robot's own compute, run directly): a round where the robot's core was
    slow slows both, and the ratio keeps only what the plan adds.  Samples of a
    round without a reference call are kept as measured.
    """
    ref = by_round(reference)
    return [t._replace(total_ms=t.total_ms * level_ms / ref[r].total_ms)
            if r in ref and ref[r].total_ms > 0 else t for r, t in by_round(timed).items()]


def example_input(shape: tuple[int, ...], image: bool) -> torch.Tensor:
    """Return a deterministic example input (uint8 frame for image input, else normal floats)."""
    generator = torch.Generator().manual_seed(0)
    if image:
        return torch.randint(0, 256, shape, dtype=torch.uint8, generator=generator)
    return torch.randn(shape, generator=generator)


def dispatch_ms(repeats: int = 5, ops: int = 64) -> float:
    """Return the fixed cost of one operator in a graph module here (a tiny tensor's relu)."""
    graph = torch.fx.Graph()
    value = graph.placeholder('x')
    for _ in range(ops):
        value = graph.call_function(torch.ops.aten.relu.default, (value,))
    graph.output(value)
    module = torch.fx.GraphModule(torch.nn.Module(), graph)
    x = torch.zeros(1)
    times = []
    with torch.inference_mode():
        for _ in range(repeats + 2):
            start = time.perf_counter()
            module(x)
            times.append((time.perf_counter() - start) * 1e3 / ops)
    return statistics.median(times[2:])


def local_ms(model: TorchModule, x: torch.Tensor, repeats: int) -> tuple[float, float]:
    """Return the median wall ms of a local call and the wall/CPU time ratio over them."""
    walls, cpus = [], []
    for i in range(repeats + 2):
        wall, cpu = time.perf_counter(), time.process_time()
        model.run((x,), {})
        if i >= 2:
            walls.append((time.perf_counter() - wall) * 1e3)
            cpus.append((time.process_time() - cpu) * 1e3)
    return statistics.median(walls), max(1.0, sum(walls) / max(1e-9, sum(cpus)))


def robot_profile(program, weights: dict, model: TorchModule, x: torch.Tensor,
                  repeats: int) -> dict[str, float]:
    """Return per-operator ms on this machine, scaled to the measured local call time."""
    cpu = torch.device('cpu')
    per_op = operator_times(program.module(weights, cpu), [x], cpu, repeats)
    scale = local_ms(model, x, 2 * repeats)[0] / max(1e-9, sum(per_op.values()))
    return {k: v * scale for k, v in per_op.items()}


def cpu_slowdown(model: TorchModule, x: torch.Tensor, repeats: int = 3) -> float:
    """Return wall time over CPU time of the robot's compute (about 1/share under a CPU cap)."""
    return local_ms(model, x, repeats)[1]


def io_costs(endpoint: str, slowdown: float, repeats: int = 5,
             nbytes: int = PROBE_BYTES) -> tuple[float, float]:
    """
    Return the robot's wall ms per MB (sent, received) through the client.

    Probe requests with ``nbytes`` up (then down) are compared with empty ones
    by the process's CPU time, so the link's speed does not enter; times
    ``slowdown``, the robot's wall/CPU ratio.
    """
    client = RrtoClient(endpoint, call_timeout_ms=30000, name='plan-io')
    payload = torch.zeros(nbytes, dtype=torch.uint8)
    cases = {'empty': ({}, []), 'up': ({}, [payload]), 'down': ({'reply_bytes': nbytes}, [])}
    cpu: dict[str, list[float]] = {name: [] for name in cases}
    try:
        for i in range(repeats + 1):
            for name, (fields, tensors) in cases.items():
                start = time.process_time()
                client.call(Kind.PROBE, fields, tensors)
                if i:
                    cpu[name].append((time.process_time() - start) * 1e3)
    finally:
        client.close()
    empty = statistics.median(cpu['empty'])
    per_mb = 1e6 / nbytes * slowdown
    return (max(0.0, statistics.median(cpu['up']) - empty) * per_mb,
            max(0.0, statistics.median(cpu['down']) - empty) * per_mb)


def contention(endpoint: str, model: TorchModule, x: torch.Tensor, send_ms_per_mb: float,
               repeats: int = 3, nbytes: int = PROBE_BYTES) -> float:
    """
    Return the share of a transfer's robot cost that slows compute running beside it.

    The local model runs alone, then while a probe with ``nbytes`` is sent;
    the slowdown over the transfer's own cost (``send_ms_per_mb``) is the
    contention, 0 (a core of its own) to 1 (one shared core).
    """
    send_ms = nbytes * 1e-6 * send_ms_per_mb
    if send_ms < 0.05:
        return 1.0   # too cheap to measure, and too cheap to matter
    client = RrtoClient(endpoint, call_timeout_ms=30000, name='plan-contention')
    payload = torch.zeros(nbytes, dtype=torch.uint8)
    alone, beside = [], []
    try:
        for _ in range(repeats):
            start = time.perf_counter()
            model.run((x,), {})
            alone.append((time.perf_counter() - start) * 1e3)
            pending = client.start(Kind.PROBE, {}, [payload])
            start = time.perf_counter()
            model.run((x,), {})
            beside.append((time.perf_counter() - start) * 1e3)
            pending.result()
    finally:
        client.close()
    slowed = statistics.median(beside) - statistics.median(alone)
    return min(1.0, max(0.0, slowed / send_ms))


def measure_plans(model: TorchModule, program, analysis, weights: dict, x: torch.Tensor,
                  plans, repeats: int, clock: RobotClock | None = None) -> RobotSides:
    """
    Time the robot's side of every split or hybrid plan here, beside the local model.

    One call of each plan's robot side and one local call (the reference) per
    round, in a fresh order each round; a plan's time is its median ratio to
    the reference of the same round, times the reference's median: local and
    every plan's side are measured at one robot speed (in session 3 the
    ResNet-18 robot ran 51 to 137 ms for the same local call, minutes apart).
    Reference calls are recorded on ``clock`` (the robot's speed over the solve).
    """
    clock = clock or RobotClock(lambda: model.run((x,), {}))
    calls = {REFERENCE: clock.time}
    for plan in plans:
        if plan.kind in ('split', 'hybrid') and plan.name not in calls:
            runtime = PlanRuntime(program, analysis, weights, plan)
            calls[plan.name] = runtime.robot_side([x], weights)
    times: dict[str, list[Timed]] = {name: [] for name in calls}
    order = list(calls)
    shuffle = random.Random(0).shuffle
    for i in range(repeats + 1):   # the first round warms up
        shuffle(order)
        for name in order:
            if name == REFERENCE:
                ms = clock.time(record=bool(i))
            else:
                start = time.perf_counter()
                calls[name]()
                ms = (time.perf_counter() - start) * 1e3
            if i:
                times[name].append(Timed(ms, round=i))
    reference = times.pop(REFERENCE)
    level = statistics.median(t.total_ms for t in reference)
    return RobotSides({name: paired_ratio(timed, reference) * level
                       for name, timed in times.items()}, level)


def server_profile(endpoint: str, model: TorchModule, x: torch.Tensor, digest: str,
                   repeats: int) -> tuple[dict[str, float], float, str]:
    """
    Return per-operator ms (scaled to the replay), per-call overhead ms and the device.

    ``digest`` is the model's program digest for ``x`` (``model.artifact(...).model``).
    The overhead is total minus server compute of offloaded calls at the current link.
    """
    with OffloadedModel(model, endpoint, timeout_ms=30000) as om:
        if not om.warmup(x):
            raise RuntimeError(f'server {endpoint} could not record the model')
        records = []
        for _ in range(max(10, repeats * 4)):
            om(x)
            if om.last.result == OffloadResult.OFFLOADED:
                records.append(om.last)
    if not records:
        raise RuntimeError('no call was offloaded while profiling the server')
    client = RrtoClient(endpoint, call_timeout_ms=120000)
    try:
        reply, _ = client.call(Kind.PROFILE, {'model': digest, 'repeats': repeats})
    finally:
        client.close()
    per_op = reply['profile']
    replay_ms = statistics.median(r.server_compute_ms for r in records)
    scale = replay_ms / max(1e-9, sum(per_op.values()))
    overhead = statistics.median(r.total_ms - r.server_compute_ms for r in records)
    return {k: v * scale for k, v in per_op.items()}, overhead, reply.get('device', '')


def measure_end_to_end(model: TorchModule, endpoint: str, table: PlanTable, x: torch.Tensor,
                       plans: Sequence[Plan], rounds: int, first_round: int = 0,
                       clock: RobotClock | None = None) -> dict[str, list[Timed]]:
    """
    Time every plan end to end through an OffloadedModel at the current link (per call).

    ``table`` must be solved for ``model``; its grid is replaced by one point
    per plan, chosen in turn, one call each per round in a shuffled order (drift
    and what ran just before hit all alike).  Each round also times the local
    model run directly, under :data:`REFERENCE`: the robot's speed in that
    round (recorded on ``clock`` too).  Rounds are numbered from ``first_round``.
    """
    clock = clock or RobotClock(lambda: model.run((x,), {}))
    entries = [{'bandwidth_mbps': float(2 ** i), 'rtt_ms': 0.0, 'plan': plan.to_json()}
               for i, plan in enumerate(plans)]
    probe = PlanTable(table.program, table.label, table.inputs, entries, {}, {})
    times: dict[str, list[Timed]] = {plan.name: [] for plan in plans}
    times[REFERENCE] = []
    with OffloadedModel(model, endpoint, timeout_ms=60000, plan_table=probe, switch_after=1,
                        plan_feedback=False, link=(1.0, 0.0)) as om:
        if not om.warmup(x, timeout_s=600):
            raise RuntimeError(f'server {endpoint} could not prepare the plans')
        order: list[tuple[int, Plan | None]] = [*enumerate(plans), (-1, None)]
        shuffle = random.Random(0).shuffle   # a fresh order every round: no position bias
        for i in range(rounds + 1):
            shuffle(order)
            for index, plan in order:
                if plan is None:
                    ms = clock.time(record=bool(i))
                    if i:
                        times[REFERENCE].append(Timed(ms, round=first_round + i - 1))
                    continue
                om.set_link(float(2 ** index), 0.0)
                om(x)
                if i and om.last.plan == plan.name and not om.last.fallback:
                    times[plan.name].append(Timed(om.last.total_ms, om.last.server_compute_ms,
                                                  first_round + i - 1))
    return {name: ts for name, ts in times.items() if ts}
