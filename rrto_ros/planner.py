"""
Bandwidth-aware plans: a cost model for a contended robot CPU, and differential evolution.

:class:`CostModel` predicts the latency (and the robot's energy) of any
:class:`~rrto_ros.split.Plan` on a :class:`Link` from measured per-operator
profiles of both sides: a band of rows costs its share of each operator's
time, transfers cost RTT plus bytes over bandwidth.  Sending and receiving
also cost the robot's CPU (serialisation, copies, the socket's I/O thread:
``Profiles.up_ms_per_mb``/``down_ms_per_mb``, measured on the robot), and on
a weak robot that CPU is the one computing: in a hybrid plan the robot's
band overlaps the server's round trip, but is slowed by ``contention`` times
the transfer's CPU cost (1: one core shared, 0: the transfer runs on a core
of its own; measured, see :mod:`rrto_ros.plan_profile`).  Plans measured end
to end get a per-plan correction (:meth:`CostModel.calibrate`): the server's
compute time each call reported replaces the server profile's share for that
plan (so the side that grew is known), and what remains is corrected on the
side that bound the measurement (in a hybrid plan the robot's band or the
server's round trip), so a link where the other side binds keeps the model's
own prediction.

:func:`optimise` searches cut points and split ratios (in steps of
``RATIO_STEP``) with ``scipy.optimize.differential_evolution`` (seeded, ties
broken by plan name, so the same profiles give the same plan), seeded with
local-only, full offload and every single layer split (Neurosurgeon), and
returns the best of the search and those baselines, so it can never return a
plan worse than them under its own model.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field

import numpy as np

from rrto_ros.graph import GraphAnalysis, Interval
from rrto_ros.split import Plan, hybrid_targets
from rrto_wire.dtypes import DTYPES


@dataclass(frozen=True)
class Link:
    """A robot-server link: bandwidth (Mbit/s, both directions unless uplink given) and RTT."""

    bandwidth_mbps: float
    rtt_ms: float
    uplink_mbps: float | None = None

    @property
    def up(self) -> float:
        return self.uplink_mbps or self.bandwidth_mbps

    def transfer_ms(self, nbytes: float, mbps: float) -> float:
        return nbytes * 8e-3 / mbps


@dataclass(frozen=True)
class Power:
    """Robot power coefficients for energy per inference."""

    compute_w: float = 7.5          # CPU busy with inference
    radio_w_per_mbps: float = 0.02  # radio power per Mbit/s of traffic: J per Mbit sent/received
    idle_w: float = 2.0             # baseline while waiting


@dataclass
class Estimate:
    """A plan's predicted cost on a link."""

    latency_ms: float
    energy_j: float
    robot_compute_ms: float
    server_compute_ms: float
    bytes_up: float
    bytes_down: float
    busy_ms: float = 0.0     # hybrid: the robot's band, with the transfer's CPU cost on it
    remote_ms: float = 0.0   # hybrid: the server's round trip for its band
    robot_correction_ms: float = 0.0   # hybrid: the calibration's correction in busy_ms


RATIO_STEP = 0.05


@dataclass
class Profiles:
    """Measured per-operator milliseconds on each side, and the robot's cost of a round trip."""

    robot_ms: dict[str, float]
    server_ms: dict[str, float]
    call_overhead_ms: float = 0.5   # one round trip beyond server compute and byte costs
    robot_op_ms: float = 0.0        # fixed cost of one operator on the robot (Python dispatch)
    robot_threads: int = 0
    server_device: str = ''
    up_ms_per_mb: float = 0.0       # robot wall ms per MB sent (serialise, copy, socket)
    down_ms_per_mb: float = 0.0     # robot wall ms per MB received
    contention: float = 1.0         # share of the transfer's robot CPU that slows its compute


class CostModel:
    """Latency and energy of plans for one program, from per-operator profiles."""

    def __init__(self, analysis: GraphAnalysis, profiles: Profiles, power: Power = Power()):
        self.analysis = analysis
        self.profiles = profiles
        self.power = power
        program = analysis.program
        self.nodes = program.nodes
        self.nbytes = {name: _nbytes(spec.dtype, spec.shape) for name, spec in program.inputs}
        self.nbytes.update({n.name: _nbytes(n.out.dtype, n.out.shape)
                            for n in program.nodes if n.out is not None})
        self.out_bytes = sum(self.nbytes.get(name, 0) for name in program.output_names)
        self.in_bytes = sum(self.nbytes[name] for name, _ in program.inputs)
        self.cuts = analysis.cut_candidates()
        self.measured_robot_ms: dict[str, float] = {}   # plan name -> robot side, measured
        self.measured_server_ms: dict[str, float] = {}  # plan name -> server compute, measured
        self.corrections: dict[str, float] = {}         # plan name -> measured - predicted ms
        self.correction_sides: dict[str, str] = {}      # hybrid plan -> 'robot' or 'remote'
        self._bands: dict[tuple, tuple[float, float]] = {}

    # ------------------------------------------------------------------ compute pieces
    def _time(self, side: dict[str, float], nodes) -> float:
        return sum(side.get(n.name, 0.0) for n in nodes)

    def _band(self, cut: int, targets: dict[str, Interval], side: dict[str, float],
              fixed: float = 0.0) -> tuple[float, float]:
        """
        Return (compute ms, input bytes) of computing ``targets`` from the program inputs.

        A band of rows costs its share of each operator's time, but never less than
        ``fixed`` per operator, plus ``fixed`` for the row slice in front of it.
        """
        key = (cut, id(side), tuple(sorted(targets.items())))
        if key not in self._bands:
            live = {v: iv for v, iv in targets.items() if iv[1] > iv[0]}
            need = self.analysis.required(cut, live) if live else {}
            ms = 0.0
            for node in self.nodes[:cut]:
                info = self.analysis.info[node.name]
                if info.kind == 'const':
                    ms += side.get(node.name, 0.0)
                elif node.name in need:
                    a, b = need[node.name]
                    share = (b - a) / max(1, self.analysis.height(node.name))
                    full = side.get(node.name, 0.0)
                    ms += fixed + max(0.0, full - fixed) * share + fixed
            in_bytes = sum(self.nbytes[name] * (need[name][1] - need[name][0])
                           / max(1, self.analysis.height(name))
                           for name, _ in self.analysis.program.inputs if name in need)
            self._bands[key] = (ms, in_bytes)
        return self._bands[key]

    def _crossing_bytes(self, targets: dict[str, Interval]) -> float:
        return sum(self.nbytes[v] * (b - a) / max(1, self.analysis.height(v))
                   for v, (a, b) in targets.items())

    # ------------------------------------------------------------------ estimates
    def io_ms(self, up: float, down: float) -> tuple[float, float]:
        """Return the robot's wall ms to send ``up`` and receive ``down`` bytes."""
        p = self.profiles
        return up * 1e-6 * p.up_ms_per_mb, down * 1e-6 * p.down_ms_per_mb

    def _remote(self, link: Link, up: float, down: float, server_ms: float) -> float:
        """Return ms from sending ``up`` bytes to holding ``down`` bytes of reply (robot idle)."""
        send, recv = self.io_ms(up, down)
        return (link.rtt_ms + self.profiles.call_overhead_ms + send + recv + server_ms
                + link.transfer_ms(up, link.up) + link.transfer_ms(down, link.bandwidth_mbps))

    def estimate(self, plan: Plan, link: Link) -> Estimate:
        """Predict ``plan`` on ``link`` (with its measured correction, if any)."""
        correction = self.corrections.get(plan.name, 0.0)
        if plan.kind == 'hybrid':
            return self._estimate(plan, link, correction)
        est = self._estimate(plan, link)
        est.latency_ms = max(0.0, est.latency_ms + correction)
        return est

    def calibrate(self, plan: Plan, link: Link, measured_ms: list[float],
                  server_ms: list[float] = ()) -> float:
        """
        Correct ``plan`` by its end-to-end measurements on ``link``; return the model error.

        The error is the uncorrected model's, relative to the median.  ``server_ms``
        are the server's compute times the same calls reported: their median
        replaces the server profile's time for this plan on every link (it is
        measured, not inferred from a total).  The rest of the gap moves the
        prediction to the median only where it lies outside the middle half of
        the measurements: a gap the measurements' own spread explains is noise,
        and correcting by it adds noise.  In a hybrid plan that rest goes to the
        side that is the longer one on ``link`` (robot band or server round
        trip), not to every link's total.
        """
        for corrected in (self.corrections, self.correction_sides, self.measured_server_ms):
            corrected.pop(plan.name, None)
        modelled = self._estimate(plan, link).latency_ms
        if len(server_ms) and plan.kind != 'local':
            self.measured_server_ms[plan.name] = float(np.median(server_ms))
        predicted = self._estimate(plan, link).latency_ms
        low, median, high = np.percentile(measured_ms, [25, 50, 75])
        if not low <= predicted <= high:
            self.corrections[plan.name] = float(median) - predicted
            if plan.kind == 'hybrid':
                self.correction_sides[plan.name] = ('robot' if self.robot_bound(plan, link)
                                                    else 'remote')
        return (modelled - float(median)) / float(median)

    def robot_bound(self, plan: Plan, link: Link) -> bool:
        """Say whether ``plan`` is all robot time on ``link``: local, a hybrid whose band binds."""
        if plan.kind != 'hybrid':
            return plan.kind == 'local'
        est = self._estimate(plan, link)
        return est.busy_ms >= est.remote_ms

    def scale_robot(self, local_ms: float) -> None:
        """Scale the robot's operator profile so that local inference takes ``local_ms``."""
        robot = self.profiles.robot_ms
        factor = local_ms / max(1e-9, self._time(robot, self.nodes))
        self.profiles.robot_ms = {name: ms * factor for name, ms in robot.items()}
        self._bands.clear()

    def _estimate(self, plan: Plan, link: Link, correction: float = 0.0) -> Estimate:
        robot, server = self.profiles.robot_ms, self.profiles.server_ms
        if plan.kind == 'local':
            r = self._time(robot, self.nodes)
            return self._finish(r, r, 0.0, 0.0, 0.0)
        s = self.measured_server_ms.get(plan.name)
        if plan.kind == 'offload':
            s = self._time(server, self.nodes) if s is None else s
            t = self._remote(link, self.in_bytes, self.out_bytes, s)
            return self._finish(t, sum(self.io_ms(self.in_bytes, self.out_bytes)), s,
                                self.in_bytes, self.out_bytes)
        crossing = self.analysis.crossing(plan.cut)
        suffix = self.nodes[plan.cut:]
        if plan.kind == 'split':
            r = self.measured_robot_ms.get(plan.name, self._time(robot, self.nodes[:plan.cut]))
            s = self._time(server, suffix) if s is None else s
            up = self._crossing_bytes({v: (0, self.analysis.height(v)) for v in crossing})
            t = r + self._remote(link, up, self.out_bytes, s)
            return self._finish(t, r + sum(self.io_ms(up, self.out_bytes)), s, up,
                                self.out_bytes)
        robot_t, server_t = hybrid_targets(self.analysis, plan.cut, plan.ratio)
        fixed = self.profiles.robot_op_ms
        r_band, _ = self._band(plan.cut, robot_t, robot, fixed)
        s_band, up = self._band(plan.cut, server_t, server)
        s_band = s_band if s is None else s
        down = self._crossing_bytes(server_t)
        # the rest runs as a graph module on the robot, after one merge per crossing value
        r_suffix = self._time(robot, suffix) + fixed * (len(suffix) + len(crossing))
        measured = self.measured_robot_ms.get(plan.name)
        if measured is not None:   # the robot's band and rest, timed on the robot: keep the split
            share = r_band / max(1e-9, r_band + r_suffix)
            r_band, r_suffix = measured * share, measured * (1 - share)
        if not (up or down or s_band):
            return self._finish(max(0.0, r_band + r_suffix + correction), r_band + r_suffix,
                                0.0, 0.0, 0.0)
        # the robot's CPU sends the server's rows and takes its reply while computing its band
        send, recv = self.io_ms(up, down)
        busy = r_band + self.profiles.contention * (send + recv)
        remote = self._remote(link, up, down, s_band)
        robot_correction = 0.0
        if self.correction_sides.get(plan.name) == 'remote':
            remote = max(0.0, remote + correction)
        else:
            corrected = max(0.0, busy + correction)
            busy, robot_correction = corrected, corrected - busy
        t = max(busy, remote) + r_suffix
        est = self._finish(t, r_band + r_suffix + send + recv, s_band, up, down)
        est.busy_ms, est.remote_ms = busy, remote
        est.robot_correction_ms = robot_correction
        return est

    def _finish(self, latency: float, robot_ms: float, server_ms: float, up: float,
                down: float) -> Estimate:
        p = self.power
        energy = (p.compute_w * robot_ms / 1e3 + p.radio_w_per_mbps * (up + down) * 8e-6
                  + p.idle_w * latency / 1e3)
        return Estimate(latency, energy, robot_ms, server_ms, up, down)

    # ------------------------------------------------------------------ baselines
    def baselines(self, link: Link) -> dict[str, tuple[Plan, Estimate]]:
        """Return local-only, full offload and the best single layer split on ``link``."""
        local, offload = Plan('local'), Plan('offload')
        splits = [Plan('split', c) for c in self.cuts]
        best_split = min(splits + [local, offload],
                         key=lambda p: (self.estimate(p, link).latency_ms, p.name))
        return {name: (plan, self.estimate(plan, link))
                for name, plan in (('local', local), ('offload', offload),
                                   ('best_split', best_split))}


def _nbytes(dtype: str, shape) -> float:
    return float(math.prod(shape)) * (DTYPES[dtype].itemsize if dtype in DTYPES else 4)


@dataclass
class Solution:
    """The chosen plan at one link, with its prediction, the baselines and the solve time."""

    link: Link
    plan: Plan
    estimate: Estimate
    baselines: dict[str, tuple[Plan, Estimate]]
    solve_s: float
    evaluations: int = 0
    trace: list = field(default_factory=list)

    def to_json(self) -> dict:
        return {
            'bandwidth_mbps': self.link.bandwidth_mbps, 'rtt_ms': self.link.rtt_ms,
            'plan': self.plan.to_json(), 'plan_name': self.plan.name,
            'predicted': asdict(self.estimate),
            'baselines': {k: {'plan': p.to_json(), 'predicted': asdict(e)}
                          for k, (p, e) in self.baselines.items()},
            'solve_s': self.solve_s, 'evaluations': self.evaluations,
        }


def _decode(model: CostModel, x: np.ndarray) -> Plan:
    cut = model.cuts[min(len(model.cuts) - 1, int(x[0]))]
    if x[2] >= 0.5:
        return Plan('split', cut)
    ratio = round(round(float(x[1]) / RATIO_STEP) * RATIO_STEP, 4)
    robot, _ = hybrid_targets(model.analysis, cut, ratio)
    if all(b == model.analysis.height(v) for v, (_, b) in robot.items()):
        return Plan('local')  # the robot computes every row: that is local execution
    return Plan('hybrid', cut, ratio)


def optimise(model: CostModel, link: Link, objective: str = 'latency', maxiter: int = 40,
             popsize: int = 12, seed: int = 0, margin: float = 0.05) -> Solution:
    """
    Search split points and ratios by differential evolution; never worse than baselines.

    A searched plan is chosen only if predicted ``margin`` (relative) better than
    the best baseline; the margin is the model's measured prediction error
    (:func:`rrto_ros.plan_solve.solve`), so a gain within it is not trusted.
    """
    from scipy.optimize import differential_evolution

    if objective not in ('latency', 'energy'):
        raise ValueError("objective must be 'latency' or 'energy'")
    started = time.perf_counter()
    baselines = model.baselines(link)

    def cost(plan: Plan) -> float:
        est = model.estimate(plan, link)
        return est.latency_ms if objective == 'latency' else est.energy_j

    evaluations = 0

    def f(x: np.ndarray) -> float:
        nonlocal evaluations
        evaluations += 1
        return cost(_decode(model, x))

    candidates = [p for p, _ in baselines.values()]
    if model.cuts:
        n = len(model.cuts)
        seeds = [[n - 0.5, 1.0, 0.0], [n - 0.5, 0.0, 0.0], [n - 0.5, 0.5, 0.0]]
        best = baselines['best_split'][0]
        if best.kind == 'split':
            seeds.append([model.cuts.index(best.cut) + 0.5, 1.0, 1.0])
        rng = np.random.default_rng(seed)
        size = max(popsize * 3, len(seeds) + 5)
        extra = size - len(seeds)
        init = np.vstack([np.array(seeds), np.column_stack(
            [rng.uniform(0, n, extra), rng.uniform(0, 1, extra), rng.uniform(0, 1, extra)])])
        result = differential_evolution(f, [(0, n - 1e-9), (0, 1), (0, 1)], init=init,
                                        maxiter=maxiter, seed=seed, tol=1e-7, polish=False)
        found = _decode(model, result.x)
        if cost(found) <= (1 - margin) * min(cost(p) for p in candidates):
            candidates.append(found)
    plan = min(candidates, key=lambda p: (cost(p), p.name))
    return Solution(link, plan, model.estimate(plan, link), baselines,
                    time.perf_counter() - started, evaluations)
