"""
The execution-strategy file: what ``rrto-plan-tasks`` writes and both sides read.

::

    {"format": "rrto-strategy", "version": 1, "theta": 0.8,
     "tasks": {"detect": {"variant": "keypoint_net-w1-d0", "model": "path.variant.pt",
                          "priority": 3, "segments": "block:3", "deadline_ms": 15.0,
                          "period_ms": 20.0, "theta": 0.0}},
     "predicted": {...}}

The robot (``offload_node``'s ``strategy`` parameter) takes its task's
variant, priority, segment granularity and deadline; the server
(``--strategy``) takes the packing threshold ``theta`` (0: one lane) and
each task's own ``theta`` (optional; absent: the server's): two jobs run
side by side only within the smaller of their tasks' thresholds.
``predicted`` is informative (the search's expected miss rates and accuracy).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

FORMAT = 'rrto-strategy'
VERSION = 1


@dataclass(frozen=True)
class TaskStrategy:
    """How one task runs: its variant, server priority, segments and deadline."""

    variant: str
    priority: int
    segments: str
    deadline_ms: float
    period_ms: float
    model: str = ''
    theta: float | None = None      # this task's packing threshold; None: the server's


@dataclass
class Strategy:
    """A strategy for a whole task set."""

    theta: float
    tasks: dict[str, TaskStrategy]
    predicted: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        return {'format': FORMAT, 'version': VERSION, 'theta': self.theta,
                'tasks': {k: asdict(v) for k, v in self.tasks.items()},
                'predicted': self.predicted}

    def save(self, path: str | Path) -> Path:
        """Write the strategy as JSON; return the path."""
        path = Path(path)
        path.write_text(json.dumps(self.to_json(), indent=1, sort_keys=True))
        return path


def _theta(value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 2:
        raise ValueError('theta must be a number in [0, 2]')
    return float(value)


def parse(doc: dict) -> Strategy:
    """Validate a strategy document; raise ValueError naming what is wrong."""
    if not isinstance(doc, dict) or doc.get('format') != FORMAT:
        raise ValueError(f'not an {FORMAT} document')
    if doc.get('version') != VERSION:
        raise ValueError(f'strategy version {doc.get("version")!r} not supported')
    theta = _theta(doc.get('theta'))
    tasks = {}
    for name, entry in dict(doc.get('tasks', {})).items():
        try:
            own = entry.get('theta')
            task = TaskStrategy(str(entry['variant']), int(entry['priority']),
                                str(entry['segments']), float(entry['deadline_ms']),
                                float(entry['period_ms']), str(entry.get('model', '')),
                                None if own is None else _theta(own))
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise ValueError(f'task {name!r}: {type(exc).__name__}: {exc}') from None
        if not (math.isfinite(task.deadline_ms) and 0 < task.deadline_ms <= task.period_ms):
            raise ValueError(f'task {name!r}: need 0 < deadline_ms <= period_ms')
        tasks[str(name)] = task
    if not tasks:
        raise ValueError('a strategy names at least one task')
    return Strategy(theta, tasks, dict(doc.get('predicted', {})))


def load(path: str | Path) -> Strategy:
    """Read and validate a strategy file."""
    try:
        doc = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise ValueError(f'cannot read strategy {path}: {exc}') from None
    return parse(doc)
