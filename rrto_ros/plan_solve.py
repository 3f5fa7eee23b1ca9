"""
Solve a plan table: profile, calibrate on measurements, search, decide with a measured margin.

:func:`solve` is the whole pipeline ``rrto-plan`` and ``bench.hybrid`` share:

1. export the model for the example input; profile every operator on the
   robot and (given a server) on the server; measure the robot's byte costs,
   its wall/CPU ratio and compute/transfer contention
   (:mod:`rrto_ros.plan_profile`);
2. search every grid point (:func:`~rrto_ros.planner.optimise`) and reuse
   plans across points (:func:`consolidate`);
3. time the robot's side of every split and hybrid candidate
   (:meth:`~rrto_ros.hybrid.PlanRuntime.robot_side`: its band, slices, merge
   and the rest of the network, as run) round by round beside the local model
   (:func:`~rrto_ros.plan_profile.measure_plans`): the model uses each
   side's ratio to local in the same round instead of the operator profile's
   shares, which miss the halo's and padding's real cost; local and every
   plan's robot side are priced at one robot speed: the level of a
   :class:`~rrto_ros.plan_speed.RobotClock` that recorded every reference
   call of the solve (these rounds, the end-to-end rounds below, one before
   profiling) and one every second after them until the calls span
   ``robot_span_s`` (on the H200 host the robot's core ran at two speeds
   1.4x apart in spells of up to tens of seconds, and a solve priced at the
   spell its calibration saw missed by 31-44 %);
4. with a server: time every candidate plan and every baseline end to end at
   the calibration link (``calibration_link``: the link while solving, by
   default a fast one), with the local model run directly in every round (the
   robot's speed in that round), record the model's error on each and the
   server's compute time each call reported; the measured server time
   replaces the server profile's for that plan (so a gap is put on the side
   that grew: in session 2 offload measured 17-32 % above the model in six of
   eight solves, and the totals alone could not say why), and the rest
   corrects a plan where its prediction lies outside the middle half of its
   measurements.  A robot-bound plan (local; a hybrid whose band binds) is
   calibrated on its times relative to the robot's speed in the same round
   (:func:`~rrto_ros.plan_profile.phase_free`): in session 3 ResNet-18's
   local calls ran 130-137 ms during calibration, 51-88 ms on the grid, and
   the corrected model chose a split that was up to 71 % slower.  The
   decision margin of a plan timed end to end is the corrected model's error
   on that plan's ratio to the best measured baseline, round by round, on
   rounds the correction did not see (a paired bootstrap:
   :func:`~rrto_ros.plan_calibrate.paired_errors`), within ``MARGIN_BOUNDS``;
   the table's margin (plans not timed) is the 75th percentile of those: the
   margin guards a comparison, and drift common to a round does not change
   it.  Without a server the margin stays at its default;
5. re-decide every grid point (:func:`refine`).
"""

from __future__ import annotations

import datetime
import platform
import statistics
from dataclasses import dataclass, field

import torch

from rrto_ros import plan_profile as measure
from rrto_ros.graph import GraphAnalysis
from rrto_ros.local_model import TorchModule
from rrto_ros.plan_calibrate import DEFAULT_MARGIN, Calibrated, calibrate_plans
from rrto_ros.plan_speed import RobotClock
from rrto_ros.plan_table import PlanTable, program_key
from rrto_ros.planner import CostModel, Link, Power, Profiles, Solution, optimise
from rrto_ros.split import Plan, as_program
from rrto_wire import treespec

UNLIMITED = Link(1e6, 0.0)
ROBOT_SPAN_S = 20.0   # the robot's reference calls span at least this long (see RobotClock)


@dataclass
class Solved:
    """A solved table and what went into it."""

    table: PlanTable
    cost: CostModel
    solutions: list[Solution]           # per grid point, as searched (baselines inside)
    errors: dict[str, float] = field(default_factory=dict)   # plan -> (predicted-measured)/m
    measured_ms: dict[str, float] = field(default_factory=dict)


def prepare(model: TorchModule, x: torch.Tensor) -> tuple:
    """Return (artifact, program, weights, analysis) of ``model`` for input ``x``."""
    flat, spec = treespec.flatten(((x,), {}))
    artifact = model.artifact(flat, spec)
    program = as_program(artifact.program)
    weights = artifact.weights()
    return artifact, program, weights, GraphAnalysis(
        program, {k: v.shape for k, v in weights.items()})


def profile(model: TorchModule, x: torch.Tensor, prepared: tuple, endpoint: str | None,
            repeats: int, server_speedup: float = 8.0,
            link: Link = UNLIMITED) -> tuple[Profiles, dict]:
    """
    Measure everything the cost model needs; return the profiles and a JSON summary.

    ``link`` is the link while measuring: its modelled RTT and transfer time
    are not part of the per-call overhead.
    """
    artifact, program, weights, _ = prepared
    robot = measure.robot_profile(program, weights, model, x, repeats)
    threads = torch.get_num_threads()
    if endpoint is None:
        server = {k: v / server_speedup for k, v in robot.items()}
        profiles = Profiles(robot, server, 0.5, measure.dispatch_ms(), threads,
                            f'estimated: robot time / {server_speedup:g}')
        return profiles, {'server': profiles.server_device}
    server, overhead, device = measure.server_profile(endpoint, model, x, artifact.model,
                                                      repeats)
    slowdown = measure.cpu_slowdown(model, x)
    up, down = measure.io_costs(endpoint, slowdown, repeats)
    share = measure.contention(endpoint, model, x, up)
    cost = CostModel(prepared[3], Profiles(robot, server, 0.0, 0.0, 0, '', up, down))
    in_io, out_io = cost.io_ms(cost.in_bytes, cost.out_bytes)
    on_link = (link.rtt_ms + link.transfer_ms(cost.in_bytes, link.up)
               + link.transfer_ms(cost.out_bytes, link.bandwidth_mbps))
    fixed = max(0.0, overhead - in_io - out_io - on_link)
    profiles = Profiles(robot, server, fixed, measure.dispatch_ms(), threads,
                        f'measured on {endpoint} ({device})', up, down, share)
    return profiles, {'server': profiles.server_device, 'cpu_slowdown': slowdown,
                      'offload_overhead_ms': overhead}


def solve(model: TorchModule, x: torch.Tensor, links: list[Link], endpoint: str | None = None,
          repeats: int = 5, server_speedup: float = 8.0, objective: str = 'latency',
          power: Power = Power(), rounds: int = 8,
          calibration_link: Link = UNLIMITED, robot_span_s: float = ROBOT_SPAN_S) -> Solved:
    """Profile, calibrate, search and decide (see the module docstring)."""
    clock = RobotClock(lambda: model.run((x,), {}))
    clock.time(record=False)   # warms the model up
    clock.time()
    prepared = prepare(model, x)
    artifact, program, weights, analysis = prepared
    profiles, summary = profile(model, x, prepared, endpoint, repeats, server_speedup,
                                calibration_link)
    cost = CostModel(analysis, profiles, power)
    solutions = [optimise(cost, link, objective=objective, margin=0.0) for link in links]
    candidates = consolidate(cost, solutions)
    table = PlanTable(program_key(artifact), model.label,
                      [spec.to_json() for spec in artifact.signature], [], {}, vars(power))
    plans = _distinct([s.plan for s in candidates]
                      + [p for s in solutions for p, _ in s.baselines.values()])
    calibrated = Calibrated()
    samples: dict[str, list[measure.Timed]] = {}
    margin, margins = DEFAULT_MARGIN, {}
    robot = measure.measure_plans(model, program, analysis, weights, x, plans, 2 * repeats,
                                  clock)
    ratios = {name: ms / robot.reference_ms for name, ms in robot.ms.items()}
    baselines = {p.name for s in solutions for p, _ in s.baselines.values()}
    if endpoint is not None:
        samples = measure.measure_end_to_end(model, endpoint, table, x, plans, rounds,
                                             clock=clock)
    clock.spread(robot_span_s)
    level = clock.level()
    robot_side = _price_robot(cost, ratios, level)
    if endpoint is not None:
        calibrated = calibrate_plans(cost, plans, samples, calibration_link, level, baselines)
        margin, margins = calibrated.margin(), calibrated.margins()
    decided = refine(cost, candidates, robot_side, margin, margins)
    for _ in range(2 if endpoint is not None else 0):
        # corrections move the baselines: a split the model then prefers may not have been
        # timed end to end yet (in session 2 split@1 got chosen that way, uncorrected while
        # offload carried +6 ms); time it beside local and offload, calibrate, decide again
        new = _distinct([s.plan for s in decided if s.plan.name not in samples])
        if not new:
            break
        more = measure.measure_plans(model, program, analysis, weights, x, new, 2 * repeats,
                                     clock)
        ratios.update({name: ms / more.reference_ms for name, ms in more.ms.items()})
        anchors = [p for p in plans if p.kind in ('local', 'offload')]
        first = 1 + max(t.round for timed in samples.values() for t in timed)
        for name, timed in measure.measure_end_to_end(model, endpoint, table, x,
                                                      new + anchors, rounds, first,
                                                      clock).items():
            samples.setdefault(name, []).extend(timed)
        plans = _distinct(plans + new)
        level = clock.level()
        robot_side = _price_robot(cost, ratios, level)
        calibrated = calibrate_plans(cost, plans, samples, calibration_link, level, baselines)
        margin, margins = calibrated.margin(), calibrated.margins()
        decided = refine(cost, candidates, robot_side, margin, margins)
    errors = calibrated.errors
    measured = {name: statistics.median(t.total_ms for t in timed)
                for name, timed in calibrated.samples.items()}
    table.entries = [s.to_json() for s in decided]
    table.solve_s = sum(s.solve_s for s in solutions)
    table.margin = margin
    table.created = datetime.datetime.now().isoformat(timespec='seconds')
    table.machine = f'{platform.node()} {platform.machine()}'
    table.profiles = {'robot_ms': profiles.robot_ms, 'server_ms': profiles.server_ms,
                      'call_overhead_ms': profiles.call_overhead_ms,
                      'robot_op_ms': profiles.robot_op_ms, 'robot_threads': profiles.robot_threads,
                      'up_ms_per_mb': profiles.up_ms_per_mb,
                      'down_ms_per_mb': profiles.down_ms_per_mb,
                      'contention': profiles.contention, **summary}
    table.calibration = {'link': {'bandwidth_mbps': calibration_link.bandwidth_mbps,
                                  'rtt_ms': calibration_link.rtt_ms},
                         'measured_ms': measured, 'errors': errors,
                         'held_out_errors': calibrated.held_out,
                         'paired_errors': calibrated.paired, 'margins': margins,
                         'paired_with': calibrated.reference,
                         'robot_reference_ms': level, 'robot_clock': clock.summary(),
                         'phase_free': calibrated.phase_free,
                         'server_compute_ms': calibrated.server_side,
                         'samples': {name: [list(t) for t in timed]
                                     for name, timed in samples.items()},
                         'measured_robot_ms': robot_side, 'corrections_ms': cost.corrections}
    return Solved(table, cost, solutions, errors, measured)


def _price_robot(cost: CostModel, ratios: dict[str, float], level: float) -> dict[str, float]:
    """Price local at ``level`` ms and each plan's robot side at its ratio to local; return it."""
    cost.scale_robot(level)
    robot_side = {name: ratio * level for name, ratio in ratios.items()}
    cost.measured_robot_ms.update(robot_side)
    return robot_side


def _distinct(plans: list[Plan]) -> list[Plan]:
    seen: dict[str, Plan] = {}
    for plan in plans:
        seen.setdefault(plan.name, plan)
    return sorted(seen.values(), key=lambda p: p.name)


def refine(model: CostModel, solutions: list[Solution], measured_robot_ms: dict[str, float],
           margin: float = 0.05, margins: dict[str, float] | None = None) -> list[Solution]:
    """
    Re-decide every grid point with the robot side of candidate plans measured, not modelled.

    ``measured_robot_ms`` maps plan names to the robot's measured time under the
    plan (:meth:`rrto_ros.hybrid.PlanRuntime.robot_ms`).  A split or hybrid plan
    stays only where, with that measurement, it still beats the best baseline by
    its margin (``margins[plan]``, its own measured error, else ``margin``);
    elsewhere the best baseline is used.
    """
    model.measured_robot_ms.update(measured_robot_ms)
    plans = {s.plan.name: s.plan for s in solutions if s.plan.kind in ('split', 'hybrid')}
    refined = []
    for s in solutions:
        baselines = model.baselines(s.link)
        best_plan, best = min(baselines.values(), key=lambda pe: (pe[1].latency_ms, pe[0].name))
        baseline_ms = best.latency_ms
        for plan in plans.values():
            estimate = model.estimate(plan, s.link)
            threshold = (1 - (margins or {}).get(plan.name, margin)) * baseline_ms
            if estimate.latency_ms <= min(threshold, best.latency_ms):
                best_plan, best = plan, estimate
        refined.append(Solution(s.link, best_plan, best, baselines, s.solve_s, s.evaluations))
    return refined


def consolidate(model: CostModel, solutions: list[Solution], tolerance: float = 0.02
                ) -> list[Solution]:
    """
    Reuse plans across grid points: fewer distinct plans to upload and record.

    At every point, the plan used is the one (among all plans chosen anywhere in
    the table, most popular first) predicted within ``tolerance`` of that
    point's optimum; the optimum itself if none is.
    """
    counts: dict[str, int] = {}
    plans: dict[str, Plan] = {}
    for s in solutions:
        counts[s.plan.name] = counts.get(s.plan.name, 0) + 1
        plans[s.plan.name] = s.plan
    ranked = sorted(plans.values(), key=lambda p: -counts[p.name])
    result = []
    for s in solutions:
        best = s.estimate.latency_ms
        for plan in ranked:
            est = model.estimate(plan, s.link)
            if est.latency_ms <= best * (1 + tolerance):
                result.append(Solution(s.link, plan, est, s.baselines, s.solve_s, s.evaluations))
                break
        else:
            result.append(s)
    return result
