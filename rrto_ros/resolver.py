"""
Robot side of fleet mode: find replicas through the directory, then talk to them directly.

:class:`Resolver` asks the fleet directory (:mod:`rrto_wire.fleet`, over
ZeroMQ) which replicas hold a model warm, caches the answer, refreshes it in
the background and forgets a replica as soon as a call to it fails.
:class:`FleetClient` has the methods of :class:`~rrto_ros.client.RrtoClient`
that :class:`~rrto_ros.engine.OffloadedModel` uses and routes each request to
one replica's own RrtoClient: ``record`` has the directory warm the model
(its replicas record it, the reply names the replay), inferences go to a
replica holding the model, anything else to any replica (uploads land in
the replicas' shared store).  With ``duplicate`` an inference is sent to two
replicas and the first good reply wins (:mod:`rrto_ros.hedge`).

Each robot prefers the replicas in its own rotation of the sorted list (a
random offset), so robots spread evenly over a model's holders.
"""

from __future__ import annotations

import itertools
import logging
import random
import threading
import time
from typing import Any, Callable, Sequence

import torch
import zmq

from rrto_ros.client import PendingReply, RemoteError, RrtoClient, ServerUnavailable
from rrto_ros.hedge import COUNTERS, Hedge
from rrto_wire import codecs, fleet
from rrto_wire.curve import ClientKeys
from rrto_wire.messages import Kind
from rrto_wire.tensors import TensorSpec

log = logging.getLogger('rrto_ros.resolver')

REFRESH_S = 1.0
DIRECTORY_TIMEOUT_MS = 1000.0
AVAILABLE_POLL_S = 0.05


class Resolver:
    """The directory's answers, cached per model (see the module docstring)."""

    def __init__(self, directory: str, timeout_ms: float = DIRECTORY_TIMEOUT_MS,
                 refresh_s: float = REFRESH_S, context: zmq.Context | None = None,
                 keys: ClientKeys | None = None):
        self.directory = directory
        self.keys = keys
        self.timeout_ms = timeout_ms
        self.refresh_s = refresh_s
        self.seed = random.randrange(1 << 16)
        self._ctx = context or zmq.Context.instance()
        self._sock: zmq.Socket | None = None
        self._lock = threading.Lock()           # the directory socket
        self._ids = itertools.count(1)
        self._cache: dict[str, list[str]] = {}  # model ('' = any replica) -> endpoints
        self._replays: dict[str, str] = {}      # replay key -> model
        self._reachable = threading.Event()
        self._reachable.set()
        self._wake = threading.Event()
        self._closed = threading.Event()
        self._refresher = threading.Thread(target=self._refresh_loop, name='rrto-resolver',
                                           daemon=True)
        self._refresher.start()

    @property
    def available(self) -> bool:
        """Return False while the directory did not answer its last request."""
        return self._reachable.is_set()

    def wait_available(self, timeout_s: float) -> bool:
        return self._reachable.wait(timeout_s)

    def cached(self, model: str) -> list[str] | None:
        """Return the cached replicas of ``model`` without asking (None: never resolved)."""
        return self._cache.get(model)

    def endpoints(self, model: str) -> list[str]:
        """Return the replicas holding ``model`` ('' = every replica), in this robot's order."""
        cached = self._cache.get(model)
        if cached is None:
            cached = self._store(model, self._endpoints_of(self.ask('resolve', model=model)))
        return cached

    def warm(self, model: str, signature: list, options: dict, replicas: int,
             timeout_ms: float) -> str:
        """Have the directory record ``model`` on ``replicas`` replicas; return the replay id."""
        reply = self.ask('warm', timeout_ms, model=model, signature=signature,
                         options=options, replicas=replicas)
        self._store(model, [holder.endpoint for holder in reply.endpoints])
        if not reply.endpoints or not reply.replay:
            raise ServerUnavailable(f'no replica could record {model[:12]}')
        self._replays[reply.replay] = model
        return reply.replay

    def model_of(self, replay: str) -> str:
        return self._replays.get(replay, '')

    def forget(self, endpoint: str) -> None:
        """Drop a replica that failed a call from every cached answer; refresh soon."""
        for model, endpoints in list(self._cache.items()):
            if endpoint in endpoints:
                self._cache[model] = [e for e in endpoints if e != endpoint]
        self._wake.set()

    def refresh(self) -> None:
        """Ask the directory again soon (in the background)."""
        self._wake.set()

    def close(self) -> None:
        self._closed.set()
        self._wake.set()
        self._refresher.join(timeout=5)
        with self._lock:
            if self._sock is not None:
                self._sock.close(linger=0)
                self._sock = None

    def ask(self, kind: str, timeout_ms: float | None = None, **fields) -> fleet.Reply:
        """Send one directory request; return its ok reply (Lazy Pirate: one try, then drop)."""
        timeout_ms = self.timeout_ms if timeout_ms is None else timeout_ms
        with self._lock:
            if self._closed.is_set():
                raise ServerUnavailable('resolver is closed')
            if self._sock is None:
                self._sock = self._ctx.socket(zmq.DEALER)
                self._sock.setsockopt(zmq.LINGER, 0)
                self._sock.setsockopt(zmq.MAXMSGSIZE, fleet.MAX_MESSAGE_BYTES)   # a part
                if self.keys is not None:
                    self.keys.apply(self._sock)
                self._sock.connect(self.directory)
            request_id = next(self._ids)
            request = fleet.Request(fleet.DIRECTORY_VERSION, kind, request_id, **fields)
            self._sock.send(fleet.encode(request))
            deadline = time.monotonic() + timeout_ms / 1e3
            reply = None
            while reply is None and self._sock.poll(
                    max(0.0, deadline - time.monotonic()) * 1e3):
                try:
                    reply = fleet.decode_reply(self._sock.recv())
                except fleet.DirectoryError as exc:
                    log.warning('dropping a bad directory reply: %s', exc)
                if reply is not None and reply.id != request_id:
                    reply = None   # a late answer to an earlier request
            if reply is None:
                self._sock.close(linger=0)   # a late reply must not answer a later request
                self._sock = None
                self._reachable.clear()
                raise ServerUnavailable(f'directory {self.directory} did not answer')
        self._reachable.set()
        if reply.kind == 'error':
            raise RemoteError(reply.code, reply.message)
        return reply

    @staticmethod
    def _endpoints_of(reply: fleet.Reply) -> list[str]:
        return [holder.endpoint for holder in reply.endpoints]

    def _store(self, model: str, endpoints: list[str]) -> list[str]:
        ordered = sorted(endpoints)
        if ordered:
            shift = self.seed % len(ordered)
            ordered = ordered[shift:] + ordered[:shift]
        self._cache[model] = ordered
        return ordered

    def _refresh_loop(self) -> None:
        while not self._closed.is_set():
            self._wake.wait(self.refresh_s)
            self._wake.clear()
            try:
                if not self._reachable.is_set():
                    self.ask('hello')
                for model in list(self._cache):
                    if self._closed.is_set():
                        return
                    self._store(model, self._endpoints_of(self.ask('resolve', model=model)))
            except (ServerUnavailable, RemoteError) as exc:
                log.debug('directory refresh failed: %s', exc)


class FleetClient:
    """An RrtoClient look-alike that routes each request to a replica (module docstring)."""

    def __init__(self, resolver: Resolver, *, connect_timeout_ms: float = 1000.0,
                 call_timeout_ms: float = 1000.0, duplicate: bool = False, replicas: int = 1,
                 context: zmq.Context | None = None, name: str = 'rrto'):
        self.resolver = resolver
        self.replicas = replicas
        self.connect_timeout_ms = connect_timeout_ms
        self._call_timeout_ms = call_timeout_ms
        self.duplicate = duplicate
        self.name = name
        self._ctx = context or zmq.Context.instance()
        self._clients: dict[str, RrtoClient] = {}
        self._hedge = Hedge(self._ctx, resolver.keys) if duplicate else None
        self.server_info: dict = {}

    @property
    def call_timeout_ms(self) -> float:
        return self._call_timeout_ms

    @call_timeout_ms.setter
    def call_timeout_ms(self, value: float) -> None:
        self._call_timeout_ms = value
        for client in list(self._clients.values()):
            client.call_timeout_ms = value

    @property
    def counters(self) -> dict:
        """Return each counter summed over the per-replica clients and the hedged calls."""
        sources = list(self._clients.values()) + ([self._hedge] if self._hedge else [])
        return {key: sum(s.counters[key] for s in sources) for key in COUNTERS}

    @property
    def available(self) -> bool:
        return self.resolver.available or any(c.available for c in self._clients.values())

    def wait_available(self, timeout_s: float) -> bool:
        """Wait until the directory answers and some replica may (one up, or one not yet tried)."""
        deadline = time.monotonic() + timeout_s
        while not self._reachable():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            time.sleep(min(AVAILABLE_POLL_S, remaining))
        return True

    def _reachable(self) -> bool:
        if not self.resolver.available:
            return False
        known = self.resolver.cached('') or list(self._clients)
        return not known or any(e not in self._clients or self._clients[e].available
                                for e in known)

    def close(self) -> None:
        for client in list(self._clients.values()):
            client.close()
        if self._hedge is not None:
            self._hedge.close()
        self.resolver.close()

    # ------------------------------------------------------------------ routing
    def _client(self, endpoint: str) -> RrtoClient:
        client = self._clients.get(endpoint)
        if client is None:
            client = self._clients[endpoint] = RrtoClient(
                endpoint, connect_timeout_ms=self.connect_timeout_ms,
                call_timeout_ms=self._call_timeout_ms, context=self._ctx,
                name=f'{self.name}@{endpoint}', keys=self.resolver.keys)
        return client

    def _route(self, model: str) -> list[str]:
        """Return live replicas for ``model`` (any replica if none holds it), preferred first."""
        endpoints = self.resolver.endpoints(model) if model else []
        if not endpoints:
            endpoints = self.resolver.endpoints('')
        live = [e for e in endpoints if self._client(e).available]
        if not live:
            self.resolver.refresh()
            raise ServerUnavailable(f'no reachable replica for {model[:12] or "uploads"}')
        return live

    def start(self, kind: Kind, fields: dict | None = None, tensors: Sequence[torch.Tensor] = (),
              timeout_ms: float | None = None, codec: str = codecs.RAW, expect=None):
        """Send one request to a replica; return a handle whose ``result()`` waits (RrtoClient)."""
        fields = fields or {}
        model = (self.resolver.model_of(fields.get('replay', '')) if kind == Kind.INFER
                 else fields.get('model', ''))
        endpoints = self._route(model)
        timeout_ms = self._call_timeout_ms if timeout_ms is None else timeout_ms
        if self._hedge is not None and kind == Kind.INFER and len(endpoints) > 1:
            return self._hedge.start(endpoints[:2], kind, fields, tensors, timeout_ms, codec,
                                     expect)
        try:
            pending = self._client(endpoints[0]).start(kind, fields, tensors, timeout_ms, codec,
                                                       expect)
        except ServerUnavailable:
            self.resolver.forget(endpoints[0])
            raise
        return _Routed(self, endpoints[0], pending)

    def call(self, kind: Kind, fields: dict | None = None, tensors: Sequence[torch.Tensor] = (),
             timeout_ms: float | None = None, codec: str = codecs.RAW,
             ) -> tuple[dict, list[torch.Tensor]]:
        return self.start(kind, fields, tensors, timeout_ms, codec).result()

    def start_infer(self, replay: str, tensors: Sequence[torch.Tensor],
                    timeout_ms: float | None = None, codec: str = codecs.RAW, expect=None,
                    **keys):
        """Send one INFER of a recorded replay to a replica (as RrtoClient.start_infer)."""
        fields = {'replay': replay}
        fields.update({k: v for k, v in keys.items() if v is not None})
        return self.start(Kind.INFER, fields, tensors, timeout_ms=timeout_ms, codec=codec,
                          expect=expect)

    def hello(self, timeout_ms: float | None = None) -> dict:
        endpoint = self._route('')[0]
        self.server_info = self._client(endpoint).hello(timeout_ms)
        return self.server_info

    def upload(self, blobs: dict[str, tuple[str, bytes]], timeout_ms: float = 30000.0) -> int:
        """Upload what the replicas' shared store lacks, through any replica."""
        return self._client(self._route('')[0]).upload(blobs, timeout_ms)

    def record(self, model: str, signature: Sequence[TensorSpec], options: dict,
               timeout_ms: float = 120000.0) -> dict:
        """Have the directory warm ``model`` on its replicas; return ``{'replay': id}``."""
        replay = self.resolver.warm(model, [s.to_json() for s in signature], options,
                                    self.replicas, timeout_ms)
        return {'replay': replay}

    def stats(self, timeout_ms: float | None = None) -> dict:
        return self._client(self._route('')[0]).stats(timeout_ms)


class _Routed:
    """A request in flight to one replica; a failure there makes the resolver forget it."""

    def __init__(self, fleet_client: FleetClient, endpoint: str, pending: PendingReply):
        self._fleet = fleet_client
        self._endpoint = endpoint
        self._pending = pending

    def result(self) -> tuple[dict, list[torch.Tensor]]:
        return self._wait(self._pending.result)

    def take(self) -> tuple[Any, list[torch.Tensor]]:
        """As :meth:`result`, with the reply's header as decoded."""
        return self._wait(self._pending.take)

    def _wait(self, get: Callable[[], tuple]) -> tuple:
        try:
            return get()
        except ServerUnavailable:
            self._fleet.resolver.forget(self._endpoint)
            raise

    def cancel(self) -> None:
        self._pending.cancel()


def fleet_clients(directory: str, *, name: str, connect_timeout_ms: float,
                  call_timeout_ms: float, record_timeout_ms: float, duplicate: bool = False,
                  keys: ClientKeys | None = None) -> tuple[FleetClient, FleetClient]:
    """
    Return the data and control clients of one model in fleet mode (one shared resolver).

    ``keys`` (CURVE) authenticate the robot to the directory and to every replica:
    they share the fleet's one server key pair and allow-list.
    """
    resolver = Resolver(directory, timeout_ms=connect_timeout_ms, keys=keys)
    replicas = 2 if duplicate else 1   # a duplicated request needs two warm replicas
    data = FleetClient(resolver, connect_timeout_ms=connect_timeout_ms,
                       call_timeout_ms=call_timeout_ms, duplicate=duplicate, replicas=replicas,
                       name=f'{name}-data')
    control = FleetClient(resolver, connect_timeout_ms=connect_timeout_ms,
                          call_timeout_ms=record_timeout_ms, replicas=replicas,
                          name=f'{name}-control')
    return data, control
