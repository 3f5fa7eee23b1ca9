"""
The process's long-lived heap, kept out of the garbage collector's full collections.

A full (generation-2) collection traverses every tracked object of the process
while holding the GIL: every thread stops, the one receiving an urgent frame
included.  With torch, an exported model and a recorded replay that is 150 ms
on the 2-core VM (320,000 objects on the robot, 2026-12-01), and it comes when
the allocations of a model load, an export or a recording have filled the
oldest generation, i.e. while other models are being served.

:func:`settle` is called right after long-lived state was built: the server
after start-up, after loading a model and after recording a replay; the robot
after a model (or a partition's subgraphs) was prepared.  It collects first,
so the garbage that building left is freed, not frozen, then ``gc.freeze()``
moves every survivor to the permanent generation, which no collection
traverses.  Later collections traverse only what was made since.

What gets frozen is everything alive at that instant: the long-lived state just
built, and the requests in flight then (a few objects each; they are freed by
reference counting when done, frozen or not).  Nothing is frozen per request:
frozen objects are never collected, so a cycle frozen and then let go stays
until the heap is unfrozen.  Hence :func:`dropped`: the code that lets go of
long-lived state (a replay or model evicted, a server or an offloaded model
closed) calls it, and the next :func:`settle` unfreezes first
(``gc.unfreeze()``), so its collection traverses the whole heap once and frees
those cycles (a replay refers to its recording's objects and they to it), then
freezes again.  That one collection is the full pause once more, but at a
settle (a load, a record, an admin's eviction), never at a random request.  An
object dropped while something still holds it (the scheduler keeps each lane's
last job, a request in flight keeps its replay) survives that settle and is
frozen again; it stays watched, and the next settles unfreeze too (at most
``PENDING_SETTLES``), so its cycles go at the first settle after its holder
let go.  Until then it costs memory, never a pause.  A recording starts with a
settle when something was dropped, so an evicted replay that nothing holds
any more gives its memory back before the next replay is made.

A peer chooses when replays are dropped (each recording past its replay quota
evicts one of its own), so an unfreeze at every drop let one key stop every
thread of the server for a full collection per recording (a16 #4: 230 ms
each; another client's ``hello`` p99 11 -> 236 ms).  So a settle unfreezes
only when the dropped state is worth it (:func:`due`): at least
:data:`UNFREEZE_BYTES` dropped since the last unfreeze (a drop that names its
bytes; one that does not, such as an admin's eviction or a server's close,
counts as all of them), or :data:`UNFREEZE_S` seconds since the last unfreeze.
What a dropped replay holds then waits at most that long or that many bytes.

Freezing is the process's decision, not a library's: it changes when the
host's own cycles are collected.  The processes this project starts turn it on
(:func:`enable`: ``python -m rrto_server``, the server and offload nodes);
elsewhere (a script calling ``offload()``, a test) settles do nothing unless
``RRTO_GC_FREEZE=1`` is in the environment; ``RRTO_GC_FREEZE=0`` turns it off
everywhere (the collector's behaviour before this module, for measurements).

Collection thresholds are left as Python sets them (700, 10, 10): a steady
stream of requests causes few young collections (3000 loopback calls of a tiny
model: 4 on the server, none on the robot; 300 of resnet18: the same; 2-core
VM, 2026-12-01, ``bench.gc_pauses``), so there is nothing to tune there.
"""

from __future__ import annotations

import gc
import logging
import math
import os
import threading
import time
import weakref

log = logging.getLogger('rrto_wire.heap')

ENV = 'RRTO_GC_FREEZE'
# a dropped object still alive at a settle (a request or the scheduler's last job holds it)
# makes this many later settles unfreeze at most (then it is taken to be held for good)
PENDING_SETTLES = 4
UNFREEZE_BYTES = 256 << 20      # dropped bytes that make the next settle unfreeze (a16 #4)
UNFREEZE_S = 60.0               # else at most one unfreeze this often

_lock = threading.Lock()            # one settle at a time
_pending_lock = threading.Lock()    # never held during a collection (finalisers may drop)
_pending: list[list] = []           # [weak reference, settles left, bytes] of dropped objects
_process = {'enabled': False}      # set by the process's entry point (enable)
_state = {'settles': 0, 'unfreezes': 0, 'collected': 0, 'frozen': 0, 'last_ms': 0.0,
          'longest_ms': 0.0, 'last': '', 'stale': False, 'dropped_bytes': 0.0,
          'unfrozen_at': None}


def enable() -> None:
    """Turn settling on for this process (its entry point calls this; see the module docstring)."""
    _process['enabled'] = True


def enabled() -> bool:
    """Return True when settles freeze: ``RRTO_GC_FREEZE`` (1 or 0), else :func:`enable`."""
    value = os.environ.get(ENV, '').strip()
    return value == '1' if value in ('0', '1') else _process['enabled']


def dropped(*objects, nbytes: int | None = None) -> None:
    """
    Say that long-lived state of ``nbytes`` was let go: a :func:`due` settle unfreezes first.

    ``nbytes`` None (not known, or the drop must go now: an admin's eviction, a
    server's close) makes the next settle unfreeze.  ``objects`` (a replay, a
    model, a server) are watched: while one is still alive at an unfreezing
    settle (something else held it then), later settles count it again, at most
    ``PENDING_SETTLES`` unfreezing ones, so its cycles go once the holder lets go.
    """
    weight = math.inf if nbytes is None else max(0, nbytes)
    with _pending_lock:
        _state['stale'] = True
        _state['dropped_bytes'] += weight
        for obj in objects:
            try:
                _pending.append([weakref.ref(obj), PENDING_SETTLES, weight])
            except TypeError:       # not weakly referable: one unfreeze is all it gets
                pass


def due(now: float | None = None) -> bool:
    """Return True if the next settle unfreezes: dropped state worth a full collection."""
    now = time.monotonic() if now is None else now
    with _pending_lock:
        return _state['stale'] and (
            _state['dropped_bytes'] >= UNFREEZE_BYTES or _state['unfrozen_at'] is None
            or now - _state['unfrozen_at'] >= UNFREEZE_S)


def stale() -> bool:
    """Return True when something was dropped since the last unfreeze."""
    return _state['stale']


def settle(reason: str) -> float | None:
    """
    Collect, then freeze what survives (see the module docstring); return the milliseconds.

    Returns None (and does nothing) when freezing is off.  Blocks every thread for
    the collection: call it where long-lived state was just built, never per request.
    """
    if not enabled():
        return None
    with _lock:
        start = time.perf_counter()
        unfreeze = due()
        if unfreeze:
            with _pending_lock:
                _state.update(stale=False, dropped_bytes=0.0, unfrozen_at=time.monotonic())
                watched = _pending[:]
                del _pending[:]
            gc.unfreeze()
        collected = gc.collect()
        gc.freeze()
        if unfreeze:
            alive = [[ref, left - 1, weight] for ref, left, weight in watched
                     if left > 1 and ref() is not None]
            with _pending_lock:
                _pending.extend(alive)
                _state['stale'] = _state['stale'] or bool(alive)
                _state['dropped_bytes'] += sum(weight for _, _, weight in alive)
        ms = (time.perf_counter() - start) * 1e3
        _state.update(settles=_state['settles'] + 1, unfreezes=_state['unfreezes'] + unfreeze,
                      collected=_state['collected'] + collected,
                      frozen=gc.get_freeze_count(), last_ms=ms,
                      longest_ms=max(_state['longest_ms'], ms), last=reason)
    log.debug('heap settled after %s: %d objects collected, %d frozen, %.1f ms%s', reason,
              collected, _state['frozen'], ms, ' (unfrozen first)' if unfreeze else '')
    return ms


def snapshot() -> dict:
    """Return the settles so far: counts, objects collected and frozen, their times."""
    with _pending_lock:
        data = dict(_state)
    del data['dropped_bytes'], data['unfrozen_at']   # other keys' drops: not in a key's stats
    data['watched'] = len(_pending)
    data['frozen_now'] = gc.get_freeze_count()
    data['enabled'] = enabled()
    return data
