"""
Task sets for the strategy search: what runs, how often, and what each variant costs.

A task-set file (YAML or JSON)::

    storage_mb: 120                  # the server's storage budget (after layer sharing)
    cpu_workers: 4                   # the server's --cpu-workers
    thetas: [0.0, 0.6, 0.8, 1.0]     # packing thresholds the search may pick
    pack_slowdown: 0.5               # a packed step runs (1 + this * other's u) longer
    step_host_ms: 0.05               # interpreter time per device step (server model)
    request_host_ms: 0.2             # interpreter time per request (server model)
    noise_ms: 0.3                    # mean exponential delay per call (server model)
    tasks:
      - name: detect
        period_ms: 20
        deadline_ms: 15              # relative, release to post-processed result
        miss_bound: 0.01             # allowed deadline miss rate
        weight: 1.0                  # weight of its accuracy
        pre_ms: 1.0                  # robot CPU before sending (pre-processing)
        post_ms: 0.5                 # robot CPU after the reply
        variants:
          - name: keypoint_net-w1-d0
            accuracy: 0.96           # measured on the held-out split
            file: variants/keypoint_net-w1-d0.variant.pt
            shards: {<sha256>: bytes, ...}     # its weight shards (storage after sharing)
            profiles:                # per segment granularity, measured on the server
              whole: {segment_ms: [2.1], utilisation: 0.4, decode_ms: 0.2,
                      overhead_ms: 0.9, jitter: 0.08}
              block:3: {...}

``overhead_ms`` is the rest of a solo call (transfer, I/O thread, copy-back)
beyond decode and device time; ``jitter`` is the log-normal sigma of a job's
execution time.  ``pack_slowdown``, ``step_host_ms``, ``request_host_ms`` and
``noise_ms`` describe the server itself (see :mod:`rrto_server.rtsim`); they are fitted
to measured runs by :mod:`rrto_server.rtcalib`.  All values are checked on
load.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class Profile:
    """One variant recorded at one segment granularity."""

    segment_ms: tuple[float, ...]
    utilisation: float = 1.0
    decode_ms: float = 0.0
    overhead_ms: float = 0.0
    jitter: float = 0.0

    @property
    def gpu_ms(self) -> float:
        return sum(self.segment_ms)

    @property
    def block_ms(self) -> float:
        return max(self.segment_ms)


@dataclass(frozen=True)
class TaskVariant:
    """A candidate network for a task: measured accuracy, shards, profiles."""

    name: str
    accuracy: float
    profiles: dict
    shards: dict = field(default_factory=dict)
    file: str = ''

    @property
    def storage_bytes(self) -> int:
        return sum(self.shards.values())


@dataclass(frozen=True)
class RtTask:
    """
    A periodic perception task: robot CPU before and after, server CPU and GPU between.

    The robot side is one client: it handles one frame at a time (pre-processing,
    the call, post-processing), as ``offload_node`` does.
    """

    name: str
    period_ms: float
    deadline_ms: float
    miss_bound: float
    variants: tuple[TaskVariant, ...]
    weight: float = 1.0
    pre_ms: float = 0.0
    post_ms: float = 0.0

    @property
    def granularities(self) -> list[str]:
        return sorted(set.intersection(*(set(v.profiles) for v in self.variants)))


@dataclass
class TaskSet:
    """Tasks plus the server's budget and packing thresholds."""

    tasks: list[RtTask]
    storage_mb: float = math.inf
    cpu_workers: int = 2
    thetas: tuple[float, ...] = (0.0,)
    pack_slowdown: float = 0.5
    step_host_ms: float = 0.0
    request_host_ms: float = 0.0
    noise_ms: float = 0.0

    def storage_bytes(self, variants: list[TaskVariant]) -> int:
        """Return the bytes of ``variants`` with shared shards counted once."""
        shards: dict = {}
        for v in variants:
            shards.update(v.shards)
        return sum(shards.values())


def _num(item: dict, key: str, low: float, high: float = math.inf, default=None) -> float:
    value = item.get(key, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)) \
            or not low <= value <= high:
        raise ValueError(f'{key} must be a number in [{low}, {high}], got {value!r}')
    return float(value)


def _profile(doc: dict) -> Profile:
    segments = doc.get('segment_ms')
    if not isinstance(segments, list) or not segments:
        raise ValueError('a profile needs a non-empty segment_ms list')
    return Profile(tuple(_num({'s': s}, 's', 0.0) for s in segments),
                   _num(doc, 'utilisation', 0.0, 1.0, 1.0), _num(doc, 'decode_ms', 0.0, 1e4, 0.0),
                   _num(doc, 'overhead_ms', 0.0, 1e4, 0.0), _num(doc, 'jitter', 0.0, 2.0, 0.0))


def _variant(doc: dict) -> TaskVariant:
    profiles = doc.get('profiles')
    if not isinstance(profiles, dict) or not profiles:
        raise ValueError(f'variant {doc.get("name")!r} has no profiles')
    shards = {str(k): int(v) for k, v in dict(doc.get('shards', {})).items()}
    return TaskVariant(str(doc['name']), _num(doc, 'accuracy', 0.0, 1.0),
                       {str(g): _profile(p) for g, p in profiles.items()}, shards,
                       str(doc.get('file', '')))


def _task(doc: dict) -> RtTask:
    period = _num(doc, 'period_ms', 1e-3)
    task = RtTask(str(doc['name']), period, _num(doc, 'deadline_ms', 1e-3, period, period),
                  _num(doc, 'miss_bound', 0.0, 1.0), tuple(_variant(v) for v in doc['variants']),
                  _num(doc, 'weight', 0.0, 1e6, 1.0), _num(doc, 'pre_ms', 0.0, 1e4, 0.0),
                  _num(doc, 'post_ms', 0.0, 1e4, 0.0))
    if not task.variants:
        raise ValueError(f'task {task.name!r} has no variants')
    if not task.granularities:
        raise ValueError(f'task {task.name!r}: no granularity is profiled for every variant')
    return task


def parse(doc: dict) -> TaskSet:
    """Build a task set from a parsed document; raise ValueError naming what is wrong."""
    try:
        tasks = [_task(t) for t in doc['tasks']]
        names = [t.name for t in tasks]
        if len(set(names)) != len(names) or not names:
            raise ValueError('task names must be unique and at least one task given')
        thetas = tuple(_num({'t': t}, 't', 0.0, 2.0) for t in doc.get('thetas', [0.0]))
        return TaskSet(tasks, _num(doc, 'storage_mb', 0.0, math.inf, math.inf),
                       int(_num(doc, 'cpu_workers', 1, 256, 2)), thetas or (0.0,),
                       _num(doc, 'pack_slowdown', 0.0, 10.0, 0.5),
                       _num(doc, 'step_host_ms', 0.0, 100.0, 0.0),
                       _num(doc, 'request_host_ms', 0.0, 100.0, 0.0),
                       _num(doc, 'noise_ms', 0.0, 100.0, 0.0))
    except (KeyError, TypeError, AttributeError) as exc:
        raise ValueError(f'bad task set: {type(exc).__name__}: {exc}') from None


def load(path: str | Path) -> TaskSet:
    """Read a task-set file (``.yaml``/``.yml`` or JSON)."""
    text = Path(path).read_text()
    if str(path).endswith(('.yaml', '.yml')):
        import yaml
        doc = yaml.safe_load(text)
    else:
        doc = json.loads(text)
    if not isinstance(doc, dict):
        raise ValueError(f'{path}: a task set is a mapping')
    return parse(doc)
