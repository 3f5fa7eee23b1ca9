"""
Plan tables: the best plan per (bandwidth, RTT) grid point, precomputed and saved as JSON.

A table is solved once per model and input signature (``rrto-plan``) and
loaded by the offload node.  At run time :class:`PlanSelector` looks up the
plan for the current link estimate and switches only after the table has
asked for the same new plan on ``switch_after`` consecutive inferences, so a
noisy estimate does not flap between plans; a switch always happens between
two inferences.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

from rrto_ros.split import Plan

TABLE_FORMAT = 'rrto-plan-table'
TABLE_VERSION = 1


@dataclass
class PlanTable:
    """A solved grid of plans for one model program (identified by its digest)."""

    model: str
    label: str
    signature: str
    entries: list[dict]
    profiles: dict
    power: dict
    solve_s: float = 0.0
    created: str = ''
    machine: str = ''

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
        """Return the distinct plans the table can choose."""
        seen: dict[str, Plan] = {}
        for entry in self.entries:
            plan = Plan.from_json(entry['plan'])
            seen.setdefault(plan.name, plan)
        return list(seen.values())

    def to_json(self) -> dict:
        return {'format': TABLE_FORMAT, 'version': TABLE_VERSION, 'model': self.model,
                'label': self.label, 'signature': self.signature, 'created': self.created,
                'machine': self.machine, 'solve_s': self.solve_s, 'power': self.power,
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
            raise ValueError(f'{path}: plan table version {doc.get("version")!r} not supported')
        try:
            table = cls(doc['model'], doc.get('label', ''), doc['signature'], list(doc['grid']),
                        doc.get('profiles', {}), doc.get('power', {}), doc.get('solve_s', 0.0),
                        doc.get('created', ''), doc.get('machine', ''))
            table.plans()  # parses (and so validates) every plan
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f'{path}: malformed plan table ({exc})') from None
        if not table.entries:
            raise ValueError(f'{path}: plan table has no grid entries')
        return table


class PlanSelector:
    """Choose a table's plan for each inference, switching only after agreement."""

    def __init__(self, table: PlanTable, switch_after: int = 2):
        if switch_after < 1:
            raise ValueError('switch_after must be at least 1')
        self.table = table
        self.switch_after = switch_after
        self.current: Plan | None = None
        self._candidate: Plan | None = None
        self._votes = 0
        self.switches = 0

    def choose(self, bandwidth_mbps: float, rtt_ms: float) -> Plan:
        """Return the plan for the next inference given the current link estimate."""
        wanted, _ = self.table.lookup(bandwidth_mbps, rtt_ms)
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
