"""
The fleet directory: which replicas hold which model warm, and how busy they are.

The directory keeps, per model digest, the input signatures and record
options robots asked for and the replicas that have them recorded (holders).
:meth:`Directory.warm` records a model on enough replicas before a robot's
first request; :meth:`Directory.resolve` lists a model's live holders with
their load.  :meth:`Directory.poll` asks every replica what it serves and
holds: a replica that does not answer loses its models at once, a restarted
one (new instance id) starts empty, a replay the server's LRU evicted is no
longer listed.  :meth:`Directory.scale` then gives a model another replica
when its load per holder rises above :attr:`Policy.scale_up` (inferences per
second), takes one away when the others could carry it below
:attr:`Policy.scale_down`, and re-places models that fell below their minimum.

The directory acts for the key that asks (a10's finding 4; see
docs/security.md): every spec is *claimed* by the keys that warmed it, a key
holds at most its own limit of live claims (its grant's ``max_replays``, the
same number the server keeps for it), all keys together at most
:attr:`Policy.max_claims` (the replays the server keeps for the fleet key the
replicas record with, so that no claimed replay is pushed out by that key's
quota), and a claim expires :attr:`Policy.claim_ttl_s` after that key's last
warm of it; a spec nobody claims any more is no longer recorded on new
replicas.  Only an admin key
raises a model's kept minimum of replicas; another key's ``replicas`` places
at most :data:`ROBOT_REPLICAS` holders for that warm (a duplicated request's
two) and is not kept.

The directory reaches replicas through :class:`Port` objects: a
:class:`~rrto_fleet.replica.Replica` in this process, or a Ray actor handle
wrapped by :mod:`rrto_fleet.ray_fleet`.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Protocol

from rrto_wire.fleet import Holder

log = logging.getLogger('rrto_fleet.directory')

RATE_SMOOTHING = 0.5      # weight of the newest window in a replica's per-model rate
ROBOT_REPLICAS = 2        # holders a non-admin key's warm may ask for (duplicated requests)


class ReplicaDown(Exception):
    """A replica did not answer the directory (dead, restarting or stalled)."""


class WarmError(Exception):
    """A replica's server refused to record a model (``code`` as in its error reply)."""

    def __init__(self, code: str, message: str):
        super().__init__(f'{code}: {message}')
        self.code = code
        self.message = message


class Port(Protocol):
    """What the directory needs from one replica (raising ReplicaDown when it is gone)."""

    def warm(self, model: str, signature: list, options: dict) -> dict:
        """Record a stored model; return ``{'replay': key, ...}`` or raise WarmError."""

    def load(self) -> dict:
        """Return ``instance``, ``endpoint``, ``infers`` per model and held ``replays``."""


@dataclass
class Policy:
    """When a model gains or loses a replica."""

    scale_up: float = 200.0     # inferences/s per holder above which a model gains one
    scale_down: float = 50.0    # inferences/s per holder, one fewer, below which it loses one
    cooldown_s: float = 2.0     # between two changes of one model's replica count
    claim_ttl_s: float = 3600.0  # a key's claim on a spec lasts this long after its last warm
    max_claims: int = 2 ** 31   # specs claimed by all keys together (the fleet key's max_replays)


@dataclass(frozen=True)
class Caller:
    """The key a warm is made for: its name, how many specs it may claim, its role."""

    name: str = 'anonymous'
    max_specs: int = 2 ** 31
    admin: bool = True      # an unkeyed directory serves everyone as admin (as the server)


@dataclass
class _Replica:
    name: str
    port: Port
    endpoint: str = ''
    instance: str = ''
    alive: bool = False
    polled: float = 0.0
    counts: dict = field(default_factory=dict)      # model -> inferences served so far
    rates: dict = field(default_factory=dict)       # model -> inferences/s, smoothed

    @property
    def load(self) -> float:
        return sum(self.rates.values())


@dataclass
class _Model:
    specs: dict = field(default_factory=dict)       # key -> (signature, options)
    claims: dict = field(default_factory=dict)      # key -> {caller name: last warm}
    replays: dict = field(default_factory=dict)     # key -> replay id (the same everywhere)
    holders: dict = field(default_factory=dict)     # replica name -> {replay key: added at}
    minimum: int = 1
    changed: float = float('-inf')
    failed: float = float('-inf')                   # last placement that failed
    lock: threading.Lock = field(default_factory=threading.Lock)   # one placement at a time


class Directory:
    """Model digest -> warm replicas, with load-driven scaling (see the module docstring)."""

    def __init__(self, ports: dict[str, Port], policy: Policy | None = None,
                 clock: Callable[[], float] = time.monotonic):
        self.policy = policy or Policy()
        self._clock = clock
        self._lock = threading.Lock()
        self._replicas = {name: _Replica(name, port) for name, port in ports.items()}
        self._models: dict[str, _Model] = {}

    # ------------------------------------------------------------------ robots
    def resolve(self, model: str) -> list[Holder]:
        """Return the live replicas holding ``model`` warm (every live one if ``model`` is '')."""
        with self._lock:
            if not model:
                names = [r.name for r in self._replicas.values() if r.alive]
            else:
                entry = self._models.get(model)
                names = list(entry.holders) if entry is not None else []
            return [Holder(self._replicas[n].endpoint, round(self._replicas[n].load, 3))
                    for n in sorted(names) if self._replicas[n].alive]

    def warm(self, model: str, signature: list, options: dict, replicas: int = 1,
             caller: Caller = Caller()) -> tuple[list[Holder], str]:
        """
        Record ``model`` for this signature on ``replicas`` replicas; return holders, replay.

        Raises WarmError ``forbidden`` when ``caller`` already claims its limit of
        live specs (other than this one), ``overloaded`` when all keys together do.
        """
        key = json.dumps([signature, options], sort_keys=True)
        with self._lock:
            self._expire()
            entry = self._models.get(model)
            claimed = entry is not None and caller.name in entry.claims.get(key, {})
            if not claimed and self._claims_of(caller.name) >= caller.max_specs:
                raise WarmError('forbidden', f'key {caller.name!r} already claims '
                                f'{caller.max_specs} model signatures (its max_replays); '
                                f'claims expire {self.policy.claim_ttl_s:g} s after their '
                                f'last warm')
            fresh = entry is None or key not in entry.claims
            total = sum(len(e.claims) for e in self._models.values())
            if fresh and total >= self.policy.max_claims:
                raise WarmError('overloaded', f'the fleet keeps {total} claimed model signatures, '
                                f'its limit; claims expire {self.policy.claim_ttl_s:g} s after '
                                f'their last warm')
            entry = self._models.setdefault(model, _Model())
            entry.specs.setdefault(key, (signature, options))
            entry.claims.setdefault(key, {})[caller.name] = self._clock()
            if caller.admin:
                entry.minimum = max(entry.minimum, replicas)
            goal = max(entry.minimum, replicas if caller.admin else min(replicas, ROBOT_REPLICAS))
        with entry.lock:
            failure, tried = None, set(self._holders(entry))
            for name in tried:
                failure = self._place(model, entry, name, [key]) or failure
            while len(self._holders(entry)) < goal:
                name = self._candidate(entry, tried)
                if name is None:
                    break
                tried.add(name)
                failure = self._place(model, entry, name, list(entry.specs)) or failure
            holders = self.resolve(model)
            if not holders and failure is not None:
                with self._lock:
                    entry.specs.pop(key, None)
                    entry.claims.pop(key, None)
                    if not entry.specs:
                        self._models.pop(model, None)
                raise failure
        return holders, entry.replays.get(key, '')

    # ------------------------------------------------------------------ replicas
    def poll(self) -> None:
        """Ask every replica for its load; follow deaths, restarts and evictions."""
        for replica in list(self._replicas.values()):
            asked = self._clock()
            try:
                load = replica.port.load()
            except ReplicaDown as exc:
                self._down(replica, str(exc))
                continue
            self._observe(replica, load, asked)

    def scale(self) -> None:
        """Give models replicas when their load rises or they lost one; take some when it falls."""
        policy = self.policy
        with self._lock:
            self._expire()
        for model, entry in list(self._models.items()):
            with entry.lock:
                holders = self._holders(entry)
                total = self._rate(model, holders)
                now = self._clock()
                settled = now - entry.changed >= policy.cooldown_s
                retry = now - entry.failed >= policy.cooldown_s
                short = len(holders) < entry.minimum and retry
                grow = short or (settled and holders and total / len(holders) > policy.scale_up)
                if grow:
                    name = self._candidate(entry)
                    if name is not None:
                        log.info('model %s: %.0f/s on %d replicas, adding %s', model[:12], total,
                                 len(holders), name)
                        if self._place(model, entry, name, list(entry.specs)) is not None:
                            entry.failed = now    # retried after the cooldown, not every poll
                        entry.changed = now
                elif (settled and len(holders) > entry.minimum
                      and total / (len(holders) - 1) < policy.scale_down):
                    with self._lock:
                        idlest = min(holders, key=lambda n: self._replicas[n].rates.get(model, 0))
                        del entry.holders[idlest]
                    log.info('model %s: %.0f/s, dropping %s', model[:12], total, idlest)
                    entry.changed = now

    def snapshot(self) -> dict:
        """Return replicas (endpoint, alive, load) and models (holder endpoints) as JSON data."""
        with self._lock:
            return {
                'replicas': {r.name: {'endpoint': r.endpoint, 'alive': r.alive,
                                      'instance': r.instance, 'load': round(r.load, 3)}
                             for r in self._replicas.values()},
                'models': {m: {'holders': sorted(self._replicas[n].endpoint for n in e.holders),
                               'minimum': e.minimum, 'specs': len(e.specs)}
                           for m, e in self._models.items()}}

    # ------------------------------------------------------------------ internals
    def _claims_of(self, name: str) -> int:
        """Return how many specs the key ``name`` claims (the directory lock held)."""
        return sum(name in owners for e in self._models.values() for owners in e.claims.values())

    def _expire(self) -> None:
        """Drop claims past their time and specs nobody claims (the directory lock held)."""
        oldest = self._clock() - self.policy.claim_ttl_s
        for model, entry in list(self._models.items()):
            for key, owners in list(entry.claims.items()):
                for name in [n for n, last in owners.items() if last < oldest]:
                    del owners[name]
                if not owners:
                    del entry.claims[key]
                    entry.specs.pop(key, None)
                    entry.replays.pop(key, None)
            if not entry.specs and not entry.lock.locked():
                del self._models[model]

    def _holders(self, entry: _Model) -> list[str]:
        with self._lock:
            return [n for n in entry.holders if self._replicas[n].alive]

    def _candidate(self, entry: _Model, exclude: set = frozenset()) -> str | None:
        """Return the least loaded live replica not holding the model (fewest models first)."""
        with self._lock:
            held = {name: sum(name in e.holders for e in self._models.values())
                    for name in self._replicas}
            free = [r for r in self._replicas.values()
                    if r.alive and r.name not in entry.holders and r.name not in exclude]
            if not free:
                return None
            return min(free, key=lambda r: (r.load, held[r.name], r.name)).name

    def _rate(self, model: str, holders: list[str]) -> float:
        with self._lock:
            return sum(self._replicas[n].rates.get(model, 0.0) for n in holders)

    def _place(self, model: str, entry: _Model, name: str, keys: list[str]) -> Exception | None:
        """Record the specs ``keys`` of ``model`` on one replica; return the failure, if any."""
        replica = self._replicas[name]
        for key in keys:
            signature, options = entry.specs[key]
            try:
                reply = replica.port.warm(model, signature, options)
            except ReplicaDown as exc:
                self._down(replica, str(exc))
                return exc
            except WarmError as exc:
                log.warning('replica %s cannot record %s: %s', name, model[:12], exc)
                return exc
            with self._lock:
                entry.holders.setdefault(name, {})[reply['replay']] = self._clock()
                entry.replays[key] = reply['replay']
        return None

    def _down(self, replica: _Replica, reason: str) -> None:
        with self._lock:
            if replica.alive:
                log.warning('replica %s (%s) is down: %s', replica.name, replica.endpoint, reason)
            replica.alive = False
            for entry in self._models.values():
                entry.holders.pop(replica.name, None)

    def _observe(self, replica: _Replica, load: dict, asked: float) -> None:
        now = self._clock()
        counts = load['infers']
        with self._lock:
            if not replica.alive or load['instance'] != replica.instance:
                # new or restarted: an empty replica (its recorded replays died with it)
                if replica.instance:
                    log.info('replica %s is back at %s', replica.name, load['endpoint'])
                replica.instance, replica.endpoint = load['instance'], load['endpoint']
                replica.alive, replica.counts, replica.rates = True, counts, {}
                replica.polled = now
                for entry in self._models.values():
                    entry.holders.pop(replica.name, None)
                return
            elapsed = max(now - replica.polled, 1e-6)
            for model in set(counts) | set(replica.rates):
                fresh = (counts.get(model, 0) - replica.counts.get(model, 0)) / elapsed
                old = replica.rates.get(model, fresh)
                replica.rates[model] = RATE_SMOOTHING * fresh + (1 - RATE_SMOOTHING) * old
            replica.counts, replica.polled = counts, now
            held = set(load['replays'])
            for entry in self._models.values():
                keys = entry.holders.get(replica.name)
                if keys is None:
                    continue
                for key in [k for k, added in keys.items() if k not in held and added < asked]:
                    del keys[key]   # evicted by the replica's LRU
                if not keys:
                    del entry.holders[replica.name]
