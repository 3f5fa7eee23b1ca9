"""
Server-side counters: requests and replies by kind, errors by code, per-model work.

The stats reply is bounded whatever its content (:func:`bounded`): it is one
header, and a header over ``MAX_HEADER_BYTES`` is one the client drops (a15 #7:
a 600,000-character model label made the admin's stats call time out).  Every
string, list and dict of the snapshot is capped, and a snapshot still over the
limit loses the oldest trace steps, other keys' tasks, replays, models and
tasks (each in proportion to its size), and says how many of each it left out
(``truncated``).

Also the garbage collector's pauses (:meth:`ServerStats.collection`, a ``gc.callbacks``
entry the server installs): a collection holds every thread of the process, the
I/O thread's receipt of an urgent frame included, and a full one of a server with
torch loaded took 128-148 ms on a 2-core VM.  The server keeps its long-lived heap out of
them (:mod:`rrto_wire.heap`); ``heap`` in the snapshot says what it froze and when.
"""

from __future__ import annotations

import collections
import copy
import math
import threading
import time

import msgspec

from rrto_wire import heap
from rrto_wire.limits import MAX_HEADER_BYTES, MAX_KEY_CHARS, MAX_NAME_CHARS

PAUSE_MS = 1.0          # collections at least this long are kept with their start time
PAUSES_KEPT = 64
MAX_MODELS = 4096       # per-model counters kept; later digests are counted as OTHER_MODEL
OTHER_MODEL = '(other)'
# the stats reply: one header, with room for the reply's other fields (an id of at most
# MAX_NAME_CHARS characters, the kind, server_ms)
MAX_REPLY_BYTES = MAX_HEADER_BYTES - (16 << 10)
MAX_ITEMS = 8192        # of one list (its last ones: the newest trace steps) or dict (its first)
MAX_LABEL_CHARS = MAX_NAME_CHARS        # a model label, as long as a task name may be
MAX_STRING_CHARS = MAX_KEY_CHARS        # any other string (a replay key names a signature)
ELLIPSIS = '...'
# what a snapshot over MAX_REPLY_BYTES loses, each section in proportion to its size (a list:
# its oldest items; a dict: its last), with room kept for the note of what it lost
TRUNCATED_BYTES = 1024
TRIMMED = (('scheduler', 'trace'), ('tasks_by_key',), ('replays',), ('models',), ('tasks',),
           ('scheduler', 'task_theta'), ('gc_pauses',))
_ENCODER = msgspec.json.Encoder()


def _model_counters() -> dict:
    return {'uploads': 0, 'records': 0, 'infers': 0, 'ops': 0, 'errors': 0}


class ServerStats:
    """Thread-safe counters; :meth:`snapshot` returns a JSON-ready copy."""

    def __init__(self):
        self._lock = threading.Lock()
        self.requests: collections.Counter = collections.Counter()
        self.replies: collections.Counter = collections.Counter()
        self.errors: collections.Counter = collections.Counter()
        self.bytes_in = 0
        self.bytes_out = 0
        self.dropped_replies: collections.Counter = collections.Counter()
        self.models: dict[str, dict] = collections.defaultdict(_model_counters)
        # per generation [collections, total ms, longest ms]; (start, ms, generation) of the
        # last long ones.  Written by the collecting thread without a lock: it may hold this
        # object's lock already when the collection starts.
        self.gc = {generation: [0, 0.0, 0.0] for generation in range(3)}
        self.pauses: collections.deque = collections.deque(maxlen=PAUSES_KEPT)
        self._gc_start = 0.0

    def request(self, kind: str, size: int) -> None:
        with self._lock:
            self.requests[kind] += 1
            self.bytes_in += size

    def dropped(self, reason: str) -> None:
        """Count a reply that was never sent (``slow_peer``: its queue was full)."""
        with self._lock:
            self.dropped_replies[reason] += 1

    def reply(self, header: dict, size: int) -> None:
        with self._lock:
            self.replies[header['kind']] += 1
            self.bytes_out += size
            if header['kind'] == 'error':
                self.errors[header['code']] += 1

    def count(self, digest: str, counter: str, n: int = 1) -> None:
        """Add ``n`` to one per-model counter (past ``MAX_MODELS`` digests, to OTHER_MODEL's)."""
        with self._lock:
            if digest not in self.models and len(self.models) >= MAX_MODELS:
                digest = OTHER_MODEL
            self.models[digest][counter] += n

    def collection(self, phase: str, info: dict) -> None:
        """Time each garbage collection; installed in ``gc.callbacks`` by the server."""
        now = time.perf_counter()
        if phase == 'start':
            self._gc_start = now
            return
        ms = (now - self._gc_start) * 1e3
        entry = self.gc[info['generation']]
        entry[0] += 1
        entry[1] += ms
        entry[2] = max(entry[2], ms)
        if ms >= PAUSE_MS:
            self.pauses.append((self._gc_start, ms, info['generation']))

    def snapshot(self) -> dict:
        """Return the counters as JSON data (``gc_pauses``: start on the perf_counter clock)."""
        settled = heap.snapshot()
        with self._lock:
            return {'requests': dict(self.requests), 'replies': dict(self.replies),
                    'errors': dict(self.errors), 'bytes_in': self.bytes_in,
                    'bytes_out': self.bytes_out,
                    'dropped_replies': dict(self.dropped_replies),
                    'models': copy.deepcopy(dict(self.models)),
                    'gc': {str(g): {'collections': n, 'total_ms': total, 'longest_ms': most}
                           for g, (n, total, most) in self.gc.items()},
                    'gc_pauses': [{'start': start, 'ms': ms, 'generation': g}
                                  for start, ms, g in list(self.pauses)],
                    'heap': settled}


def bounded(data: dict, limit: int = MAX_REPLY_BYTES) -> dict:
    """
    Return the stats snapshot ``data`` capped to encode in at most ``limit`` bytes.

    Labels are clipped at ``MAX_LABEL_CHARS``.  A snapshot with a clipped label or
    over ``limit`` has every other string clipped and every list and dict cut to
    ``MAX_ITEMS``; then, while its JSON is over ``limit``, each section of
    ``TRIMMED`` keeps items in proportion to its share of the bytes that fit.
    ``truncated`` counts what was left out: clipped ``strings``, capped ``items``,
    and the items of each trimmed section.
    """
    cut: collections.Counter = collections.Counter()
    for model in [*data.get('models', {}).values(), *data.get('replays', [])]:
        if isinstance(model, dict) and 'label' in model:
            model['label'] = _capped(model['label'], cut, MAX_LABEL_CHARS)
    size = len(_ENCODER.encode(data))
    if size <= limit and not cut:
        return data     # the common case: one encoding (8000 trace steps, 0.64 MB: 1.3 ms, VM)
    data = _capped(data, cut)       # over the limit: every string, list and dict capped
    if cut:
        data['truncated'] = dict(cut)
    size = len(_ENCODER.encode(data))
    while size > limit:
        parts = {path: len(_ENCODER.encode(_section(data, path)))
                 for path in TRIMMED if _section(data, path)}
        if not parts:
            break
        share = (limit - TRUNCATED_BYTES - (size - sum(parts.values()))) / sum(parts.values())
        keeps = {path: min(len(_section(data, path)), math.ceil(len(_section(data, path)) *
                                                                max(share, 0.0)))
                 for path in parts}     # each keeps its share of the room there is
        if all(keep == len(_section(data, path)) for path, keep in keeps.items()):
            largest = max(parts, key=parts.get)     # rounding kept everything: cut the largest
            keeps[largest] -= max(1, keeps[largest] // 16)
        for path, keep in keeps.items():
            parent, section = _parent(data, path), _section(data, path)
            if isinstance(section, dict):
                parent[path[-1]] = dict(list(section.items())[:keep])
            else:
                parent[path[-1]] = section[len(section) - keep:]
            if keep < len(section):
                cut['.'.join(path)] += len(section) - keep
        data['truncated'] = dict(cut)
        size = len(_ENCODER.encode(data))
    if size > limit:        # only scalars left (cannot be over a header: a safety net)
        data = {k: v for k, v in data.items() if not isinstance(v, (dict, list))}
        data['truncated'] = dict(cut, all=1)
    return data


def _parent(data: dict, path: tuple) -> dict | None:
    for name in path[:-1]:
        data = data.get(name) if isinstance(data, dict) else None
    return data if isinstance(data, dict) else None


def _section(data: dict, path: tuple):
    parent = _parent(data, path)
    section = parent.get(path[-1]) if parent is not None else None
    return section if isinstance(section, (dict, list)) and section else None


def _capped(value, cut: collections.Counter, chars: int = MAX_STRING_CHARS):
    if isinstance(value, str):
        if len(value) <= chars:
            return value
        cut['strings'] += 1
        return value[:chars] + ELLIPSIS
    if isinstance(value, dict):
        if len(value) > MAX_ITEMS:
            cut['items'] += len(value) - MAX_ITEMS
        return {_capped(k, cut) if isinstance(k, str) else k:
                _capped(v, cut, MAX_LABEL_CHARS if k == 'label' else MAX_STRING_CHARS)
                for k, v in list(value.items())[:MAX_ITEMS]}
    if isinstance(value, (list, tuple)):
        if len(value) > MAX_ITEMS:
            cut['items'] += len(value) - MAX_ITEMS
        return [_capped(v, cut) for v in list(value)[-MAX_ITEMS:]]
    return value
