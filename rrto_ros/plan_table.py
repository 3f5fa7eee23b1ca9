"""
Plan tables: the best plan per (bandwidth, RTT) grid point, precomputed and saved as JSON.

A table is solved once per exported program and input signature
(``rrto-plan``) and is valid only for them: :func:`bind_table` exports the
model for the table's input signature and raises :class:`PlanTableMismatch`
when the program differs (a wrapper, another network, other weights, another
frame size).  The program is compared without its label, so wrapping the
same network under another name keeps its table.

At run time :class:`PlanSelector` looks up the plan for the current link
estimate, lets :class:`~rrto_ros.plan_feedback.PlanFeedback` replace a plan
that measures worse than a baseline, and switches only after the same new
plan was asked for on ``switch_after`` consecutive inferences, so a noisy
estimate does not flap between plans; a switch always happens between two
inferences.  With feedback, the table's decisions follow the robot's speed
measured in use (:class:`~rrto_ros.plan_feedback.RobotPrice`): each entry is
re-decided with its robot work priced at that speed before the measured
comparison of plans has its say.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from rrto_ros.plan_feedback import decide, parsed_plans, PlanFeedback, repriced
from rrto_ros.split import Plan
from rrto_wire import treespec
from rrto_wire.program import sha256
from rrto_wire.dtypes import torch_dtype
from rrto_wire.tensors import signature_key, TensorSpec

TABLE_FORMAT = 'rrto-plan-table'
TABLE_VERSION = 2
ROBOT_SHARE = 0.25   # a split's or hybrid's robot compute that prices the robot: of local's


class PlanTableMismatch(ValueError):
    """A plan table was solved for another program or input signature than the model's."""


def program_key(artifact: Any) -> str:
    """Return the digest of an artifact's program without its label (the model file's digest)."""
    if artifact.program is None:
        return artifact.model
    doc = {k: v for k, v in artifact.program.items() if k != 'label'}
    return sha256(json.dumps(doc, sort_keys=True, separators=(',', ':')).encode())


@dataclass
class PlanTable:
    """A solved grid of plans for one program (label-free digest) and input signature."""

    program: str
    label: str
    inputs: list[dict]
    entries: list[dict]
    profiles: dict
    power: dict
    solve_s: float = 0.0
    created: str = ''
    machine: str = ''
    margin: float = 0.05
    calibration: dict = field(default_factory=dict)

    @property
    def signature(self) -> str:
        return signature_key([TensorSpec.from_json(spec) for spec in self.inputs])

    def lookup(self, bandwidth_mbps: float, rtt_ms: float) -> tuple[Plan, dict]:
        """Return the plan of the grid point nearest to the link (log bandwidth, then RTT)."""
        if not self.entries:
            raise ValueError('plan table has no entries')
        bandwidth_mbps = max(bandwidth_mbps, 1e-3)

        def distance(entry: dict) -> tuple[float, float]:
            return (abs(entry['rtt_ms'] - rtt_ms),
                    abs(math.log(entry['bandwidth_mbps']) - math.log(bandwidth_mbps)))

        rtt = min(self.entries, key=distance)['rtt_ms']
        same_rtt = [e for e in self.entries if e['rtt_ms'] == rtt]
        target = math.log(bandwidth_mbps)
        entry = min(same_rtt, key=lambda e: abs(math.log(e['bandwidth_mbps']) - target))
        return Plan.from_json(entry['plan']), entry

    def plans(self) -> list[Plan]:
        """Return the distinct plans the table can choose, its baselines included."""
        seen: dict[str, Plan] = {}
        for entry in self.entries:
            plan = Plan.from_json(entry['plan'])
            seen.setdefault(plan.name, plan)
            for plan, _ in baselines(entry):
                seen.setdefault(plan.name, plan)
        return list(seen.values())

    def example(self) -> tuple[list[torch.Tensor], Any]:
        """Return zero inputs of the table's signature, flat, with their treespec."""
        tensors = tuple(torch.zeros(spec['shape'], dtype=torch_dtype(spec['dtype']))
                        for spec in self.inputs)
        return treespec.flatten((tensors, {}))

    def to_json(self) -> dict:
        return {'format': TABLE_FORMAT, 'version': TABLE_VERSION, 'program': self.program,
                'label': self.label, 'inputs': self.inputs, 'signature': self.signature,
                'created': self.created, 'machine': self.machine, 'solve_s': self.solve_s,
                'margin': self.margin, 'calibration': self.calibration, 'power': self.power,
                'profiles': self.profiles, 'grid': self.entries}

    def save(self, path: str | Path) -> None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(self.to_json(), indent=1) + '\n')

    @classmethod
    def load(cls, path: str | Path) -> 'PlanTable':
        """Read a table; raise ValueError naming the file and the problem if it is not one."""
        try:
            doc = json.loads(Path(path).read_text())
        except (OSError, ValueError) as exc:
            raise ValueError(f'cannot read plan table {path}: {exc}') from None
        if not isinstance(doc, dict) or doc.get('format') != TABLE_FORMAT:
            raise ValueError(f'{path} is not an {TABLE_FORMAT} file')
        if doc.get('version') != TABLE_VERSION:
            raise ValueError(f'{path}: plan table version {doc.get("version")!r} not supported '
                             f'(this is version {TABLE_VERSION}: solve it again with rrto-plan)')
        try:
            table = cls(doc['program'], doc.get('label', ''), list(doc['inputs']),
                        list(doc['grid']), doc.get('profiles', {}), doc.get('power', {}),
                        doc.get('solve_s', 0.0), doc.get('created', ''), doc.get('machine', ''),
                        float(doc.get('margin', 0.05)), doc.get('calibration', {}))
            table.signature  # parses (and so validates) the input specs
            table.plans()    # and every plan
        except Exception as exc:  # noqa: B902 - any parse failure is a malformed table
            raise ValueError(f'{path}: malformed plan table ({exc})') from None
        if not table.entries:
            raise ValueError(f'{path}: plan table has no grid entries')
        return table


def baselines(entry: dict) -> list[tuple[Plan, float | None]]:
    """Return a grid entry's baseline plans with their predicted ms (local and offload if none)."""
    given = entry.get('baselines')
    if not given:
        return [(Plan('local'), None), (Plan('offload'), None)]
    found: dict[str, tuple[Plan, float | None]] = {}
    for item in given.values():
        plan = Plan.from_json(item['plan'])
        found.setdefault(plan.name, (plan, item.get('predicted', {}).get('latency_ms')))
    return list(found.values())


def bind_table(table: PlanTable | None, model: Any) -> PlanTable | None:
    """
    Check that ``table`` was solved for ``model`` (a LocalModel); return it, or raise.

    The model is exported for the table's input signature and its program,
    without the label, must be the one the table was solved for.
    """
    if table is None:
        return None
    flat, spec = table.example()
    artifact = model.artifact(flat, spec)
    key = program_key(artifact)
    if key != table.program:
        raise PlanTableMismatch(
            f'plan table {table.label!r} ({table.signature}) was solved for program '
            f'{table.program[:12]}, but {model.label!r} exports program {key[:12]} for that '
            'input: solve a table for this model (rrto-plan) or pass plan_table=None')
    return table


class PlanSelector:
    """Choose a table's plan for each inference, switching only after agreement."""

    def __init__(self, table: PlanTable, switch_after: int = 2,
                 feedback: PlanFeedback | None = None):
        if switch_after < 1:
            raise ValueError('switch_after must be at least 1')
        self.table = table
        self.switch_after = switch_after
        self.feedback = feedback
        self.current: Plan | None = None
        self._candidate: Plan | None = None
        self._votes = 0
        self._bin: tuple[float, float] | None = None
        self._entry: dict | None = None
        self.switches = 0
        self.margins = {**table.calibration.get('margins', {})}
        # a link estimate outlives many calls: its entry is looked up and the entry's plans
        # parsed once, not per call (per call, cold after the model's compute, that cost a
        # local plan 50-70 us: issue 13); a table is not changed once a selector uses it
        self._link: tuple[float, float] | None = None
        self._view: _EntryView | None = None     # what the entry in use gives, read once
        self._redecided: tuple[_EntryView, float, tuple] | None = None   # its view, factor

    def decision(self, entry: dict) -> tuple[Plan, float | None, list]:
        """
        Return an entry's plan, its predicted ms and its baselines with theirs.

        As solved, or re-decided at the robot's speed measured in use
        (:func:`~rrto_ros.plan_feedback.decide`) once local calls measured it
        further from the table's price than the table's margin (its measured
        prediction error): within that, the price stands.
        """
        view = self._view_of(entry)
        price = self.feedback.price if self.feedback is not None else None
        factor = price.factor() if price is not None else None
        if factor is None or abs(factor - 1) <= self.table.margin or view.parsed is None:
            return view.solved
        if (self._redecided is None or self._redecided[0] is not view
                or self._redecided[1] != factor):   # a steady factor: no local call since
            self._redecided = (view, factor, decide(entry, factor, self.table.margin,
                                                    self.margins, view.parsed))
        return self._redecided[2]

    def _view_of(self, entry: dict) -> _EntryView:
        if self._view is None or self._view.entry is not entry:
            self._view = _EntryView(entry)
        return self._view

    def choose(self, bandwidth_mbps: float, rtt_ms: float) -> Plan:
        """Return the plan for the next inference given the current link estimate."""
        if (bandwidth_mbps, rtt_ms) != self._link:
            _, entry = self.table.lookup(bandwidth_mbps, rtt_ms)
            self._link = (bandwidth_mbps, rtt_ms)
            self._bin, self._entry = (entry['rtt_ms'], entry['bandwidth_mbps']), entry
        wanted, predicted, options = self.decision(self._entry)
        if self.feedback is not None:
            wanted, explore = self.feedback.choose(self._bin, wanted, predicted, options)
            if explore:   # one call under a baseline: no switch, no vote
                return wanted
        if self.current is None:
            self.current = wanted
            return wanted
        if wanted == self.current:
            self._candidate, self._votes = None, 0
            return self.current
        if wanted == self._candidate:
            self._votes += 1
        else:
            self._candidate, self._votes = wanted, 1
        if self._votes >= self.switch_after:
            self.current, self._candidate, self._votes = wanted, None, 0
            self.switches += 1
        return self.current

    def predicted_ms(self, plan: str) -> float | None:
        """
        Return the latency the table predicts now for ``plan`` (its name) on the chosen link.

        The entry's prediction of that plan (its own plan's or a baseline's),
        its robot work repriced at the robot's price held now
        (:func:`~rrto_ros.plan_feedback.repriced`; as solved before a call timed
        the robot, or without feedback).  Read before :meth:`observe` records a
        call, it is that call's prediction, made from the calls before it only.
        None: no link chosen yet, or the entry does not predict that plan.
        """
        if self._entry is None:
            return None
        predicted = self._view_of(self._entry).predictions().get(plan)
        if predicted is None:
            return None
        price = self.feedback.price if self.feedback is not None else None
        factor = price.factor() if price is not None else None
        return float(predicted['latency_ms']) if factor is None else repriced(predicted, factor)

    def observe(self, plan: str, total_ms: float, robot_ms: float | None = None) -> None:
        """
        Record the measured latency of the call just made under ``plan`` (its name).

        ``robot_ms``: the robot's own compute an offloaded call under a split or
        hybrid plan timed (the prefix; the band and the rest).  It prices the
        robot as a local call's total does, over that plan's robot compute in
        the entry, where that is at least ``ROBOT_SHARE`` of local's: a plan in
        use keeps the price current without exploring local (on the H200 host
        a price from three local explorations read 0.92 while the robot ran
        1.45x its table's price, KeypointNet in session 14).
        """
        if self.feedback is not None and self._bin is not None:
            self.feedback.observe(self._bin, plan, total_ms)
            price = self.feedback.price
            if price is not None:
                view = self._view_of(self._entry)
                if plan == 'local':
                    price.observe(total_ms, view.local_ms)
                elif robot_ms is not None:
                    price.observe(robot_ms, view.robot_ms(plan, self.table.profiles))


class _EntryView:
    """What a selector reads from one grid entry, derived once (a table does not change)."""

    __slots__ = ('entry', 'solved', 'local_ms', 'parsed', '_robot', '_predictions')

    def __init__(self, entry: dict):
        self.entry = entry
        options = baselines(entry)
        # the decision as solved: plan, its predicted ms, the baselines with theirs
        self.solved = (Plan.from_json(entry['plan']),
                       entry.get('predicted', {}).get('latency_ms'), options)
        self.local_ms = dict(options).get(Plan('local'))   # what the solve priced local at
        self.parsed = parsed_plans(entry) if entry.get('baselines') else None
        self._robot: dict[str, float | None] | None = None
        self._predictions: dict[str, dict] | None = None

    def predictions(self) -> dict[str, dict]:
        """Return the entry's prediction (an Estimate as JSON) of each plan, by name."""
        if self._predictions is None:
            items = [(self.entry['plan'], self.entry.get('predicted'))]
            items += [(item['plan'], item.get('predicted'))
                      for item in self.entry.get('baselines', {}).values()]
            self._predictions = {}
            for obj, predicted in items:
                name = Plan.from_json(obj).name
                if predicted and 'latency_ms' in predicted:
                    self._predictions.setdefault(name, predicted)
        return self._predictions

    def robot_ms(self, plan: str, profiles: dict) -> float | None:
        """
        Return the robot compute the entry priced ``plan`` (a split or hybrid) at.

        The prediction's robot time less its byte costs (``profiles``' ms per MB
        sent and received): what the call times on the robot; a hybrid's with the
        calibration's correction of its robot band, as the latency it prices holds
        it (H200, session 15: U-Net's robot-bound hybrids, corrected by -6 to -10 ms,
        priced against the uncorrected compute read about 1.0 while their calls ran
        up to 1.16 times the corrected band: predicted 5-20 % too fast).  None: not in the
        entry, or under ``ROBOT_SHARE`` of local's (a fixed cost per call, not
        the robot's speed, would set its price).
        """
        if self._robot is None:
            up, down = profiles.get('up_ms_per_mb', 0.0), profiles.get('down_ms_per_mb', 0.0)
            self._robot = {}
            items = [(self.entry['plan'], self.entry.get('predicted', {}))]
            items += [(item['plan'], item['predicted'])
                      for item in self.entry.get('baselines', {}).values()]
            for obj, predicted in items:
                name = Plan.from_json(obj).name
                if name in self._robot or name.partition('@')[0] not in ('split', 'hybrid'):
                    continue
                ms = (predicted.get('robot_compute_ms', 0.0)
                      + predicted.get('robot_correction_ms', 0.0) - 1e-6 * (
                          predicted.get('bytes_up', 0.0) * up
                          + predicted.get('bytes_down', 0.0) * down))
                self._robot[name] = (ms if self.local_ms and ms >= ROBOT_SHARE * self.local_ms
                                     else None)
        return self._robot.get(plan)
