"""
One rrto_server replica: a :class:`~rrto_server.server.Server` in this process.

The replica binds its own ZeroMQ endpoint (any free port on the configured
host), serves robots directly, and gives the directory three things: where it
is (:meth:`Replica.info`), a way to record a stored model ahead of a robot's
first request (:meth:`Replica.warm`, an ordinary ``record`` request to its own
socket, so it takes the server's own path) and what it holds and serves
(:meth:`Replica.load`).  Eviction is the server's replay cache: least recently
used first, bounded by count and device bytes (``--max-replays``,
``--max-replay-mb``); the directory sees it in :meth:`Replica.load`.
"""

from __future__ import annotations

import dataclasses
import itertools
import os
import time
import uuid

import zmq

from rrto_fleet.directory import ReplicaDown, WarmError
from rrto_server.server import Server, ServerConfig
from rrto_wire import messages, replies
from rrto_wire.curve import ClientKeys
from rrto_wire import protocol as wire
from rrto_wire.errors import ProtocolError

WARM_TIMEOUT_S = 120.0


def replica_bind(bind: str) -> str:
    """Return ``bind`` with its port replaced by a wildcard (each replica its own port)."""
    scheme, sep, rest = bind.partition('://')
    if scheme != 'tcp' or not sep:
        raise ValueError(f'a replica binds a tcp:// endpoint, not {bind!r}')
    host = rest.rsplit(':', 1)[0] if ':' in rest else rest
    return f'tcp://{host}:*'


def advertised(endpoint: str, host: str) -> str:
    """Return the endpoint robots connect to: a wildcard bind address replaced by ``host``."""
    bound_host, _, port = endpoint.rpartition(':')
    if bound_host in ('tcp://0.0.0.0', 'tcp://*', 'tcp://[::]'):
        return f'tcp://{host}:{port}'
    return endpoint


class Replica:
    """One server on its own endpoint (see the module docstring)."""

    def __init__(self, config: ServerConfig, host: str = '127.0.0.1',
                 keys: ClientKeys | None = None):
        config = dataclasses.replace(config, bind=replica_bind(config.bind))
        self.server = Server(config)
        keyring = self.server.guard.keyring
        if keys is not None and keyring is not None:
            try:        # it records every robot's warms: the directory bounds each robot's
                self.server.control.deputise(keyring.peer(keys.public.decode()).name)
            except ProtocolError:
                pass    # not allowed here: its warms are refused 'unauthorized'
        self.server.start()
        self.endpoint = advertised(self.server.endpoint, host)
        self.instance = uuid.uuid4().hex
        self.started = time.time()
        self._ids = itertools.count(1)
        self._keys = keys      # CURVE: the fleet's client key, allowed by this server
        self._closed = False

    def info(self) -> dict:
        """Return the endpoint, the device and this instance's id (new after a restart)."""
        return {'endpoint': self.endpoint, 'device': str(self.server.device),
                'instance': self.instance, 'pid': os.getpid(), 'started': self.started}

    def warm(self, model: str, signature: list, options: dict,
             timeout_s: float = WARM_TIMEOUT_S) -> dict:
        """Record a stored model for one signature; return the record reply (``replay`` key)."""
        if self._closed:
            raise ReplicaDown(f'replica {self.endpoint} is closed')
        sock = zmq.Context.instance().socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        if self._keys is not None:
            self._keys.apply(sock)
        sock.connect(self.server.endpoint.replace('tcp://0.0.0.0', 'tcp://127.0.0.1'))
        try:
            request_id = next(self._ids)
            sock.send_multipart(wire.encode({'kind': 'record', 'id': request_id, 'model': model,
                                             'signature': signature, 'options': options}))
            if not sock.poll(timeout_s * 1e3):
                raise WarmError('timeout', f'no record reply within {timeout_s:g} s')
            reply = replies.decode_reply(sock.recv_multipart()[0], messages.Kind.RECORD)
        except ProtocolError as exc:
            raise WarmError('bad_reply', exc.message[:200]) from None
        finally:
            sock.close(linger=0)
        if isinstance(reply, replies.Error):
            raise WarmError(reply.code, reply.message[:200])
        return {'replay': reply.replay, 'nbytes': reply.nbytes, 'record_ms': reply.record_ms}

    def load(self) -> dict:
        """Return this instance's id, inferences served per model and the replays it holds."""
        if self._closed:
            raise ReplicaDown(f'replica {self.endpoint} is closed')
        models = self.server.stats.snapshot()['models']
        return {'instance': self.instance, 'endpoint': self.endpoint,
                'infers': {digest: c['infers'] for digest, c in models.items()},
                'replays': [replay.key for replay in self.server.replays.items()],
                'replay_bytes': self.server.replays.nbytes}

    def close(self) -> None:
        """Stop serving and release the socket and the device (once)."""
        if self._closed:
            return
        self._closed = True
        self.server.close()
