"""
Who may talk to the server, and what each key may do.

Transport: every server socket is a ZeroMQ CURVE server whose handshakes go
through pyzmq's ZAP authenticator (``zmq.auth.thread.ThreadAuthenticator``)
configured with the allow-listed client public keys.  Authentication is on
whenever the server binds anything but loopback (or ipc/inproc); plain TCP on
another address needs the explicit ``insecure`` flag and logs a warning.

Key directory (``rrto-keys`` creates it, see :mod:`rrto_server.keys`)::

    server.key / server.key_secret   the server's key pair (robots get server.key)
    clients/NAME.key                 an allow-listed client public key
    clients/NAME.json                its grant: {"role", "max_priority",
                                     "store_bytes", "max_in_flight",
                                     "max_replays", "replay_bytes"}

Revoking a key is deleting ``clients/NAME.key``: a watcher thread re-reads the
folder within ``WATCH_INTERVAL_S``, re-configures the authenticator (new
handshakes fail) and :meth:`KeyRing.peer` refuses the key's requests on
connections that were already open (``unauthorized``).

Roles, each including the one before: ``infer`` runs models already in the
store (record, infer, probe, its own stats); ``upload`` also adds models;
``admin`` sees every model's stats and may evict models.  A request kind not
listed needs ``admin``.  A grant also caps the priority a key's requests run at
and bounds its stored bytes, its in-flight requests and the replays it makes
the server keep (:mod:`rrto_server.replay_cache`).

Routing ids (a13 #0).  A ROUTER routes each reply by its connection's routing
id; libzmq takes the one a peer sends (ZMTP metadata ``Identity``) and gives
a peer that sends none ``0x00`` + a 32-bit counter.  It never checks those
automatic ids against the ones peers claimed: a collision aborts the process
(``zmq_assert`` in ``add_out_pipe``, libzmq 4.3.5), and the counter starts at
libc's ``rand()``, which nothing seeds, so its values were known in advance.
``ROUTER_HANDOVER`` would also give a claimed id's replies to the claimant.
So :func:`router_socket` seeds ``rand()`` from the system's entropy before it
makes a ROUTER (and no socket sets handover: a claim of an id in use is
ignored).  With keys, the ZAP handler names every connection itself: a ZAP
reply's metadata may carry ``Identity``, which libzmq parses after the peer's
CURVE INITIATE and so replaces the peer's id with ``ASSIGNED`` + 8 random
bytes (:func:`assigned_id`), a form libzmq never makes.  When the reply comes
before libzmq parsed the INITIATE (about one connection in three on a loaded
2-core machine) the peer keeps its own id or gets an automatic one, so a
claim stands only if it wins that race.  :func:`chose_its_id` tells a routing id the server
did not give, neither assigned nor of libzmq's form (the connection watchdog
cuts such a peer).  A claim of libzmq's form (``0x00`` + 4 bytes) cannot be
told from an automatic id: without keys (loopback or ``--insecure``,
everyone an admin) it needs a guess of the seeded counter, about 2^32 / claims
connections, and with keys also a won race.
"""

from __future__ import annotations

import ctypes
import ipaddress
import json
import logging
import os
import struct
import threading
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import zmq
import zmq.auth
from zmq.auth.base import VERSION as ZAP_VERSION
from zmq.auth.thread import ThreadAuthenticator

from rrto_wire.errors import ErrorCode, ProtocolError

log = logging.getLogger('rrto_server.auth')

ASSIGNED = b'\x01'         # a routing id the ZAP handler gave: this byte and 8 random ones
ROLES = ('infer', 'upload', 'admin')
_RANK = {role: rank for rank, role in enumerate(ROLES)}     # Grant.allows's order
WATCH_INTERVAL_S = 1.0
SERVER_KEY = 'server'
CLIENTS = 'clients'
# the least role each request kind needs
KIND_ROLES = {'hello': 'infer', 'missing': 'infer', 'put': 'upload', 'record': 'infer',
              'infer': 'infer', 'op': 'infer', 'release': 'infer', 'stats': 'infer',
              'profile': 'infer', 'probe': 'infer', 'evict': 'admin'}


@dataclass(frozen=True)
class Grant:
    """What one key may do."""

    role: str = 'infer'
    max_priority: int = 10
    store_bytes: int = 1 << 30
    max_in_flight: int = 16
    max_replays: int = 16
    replay_bytes: int = 4 << 30

    @classmethod
    def from_json(cls, obj: object) -> 'Grant':
        if not isinstance(obj, dict) or set(obj) - set(cls.__dataclass_fields__):
            raise ValueError(f'a grant is an object with keys {sorted(cls.__dataclass_fields__)}')
        grant = cls(**obj)
        if grant.role not in ROLES:
            raise ValueError(f'role must be one of {ROLES}')
        for name in ('max_priority', 'store_bytes', 'max_in_flight', 'max_replays',
                     'replay_bytes'):
            if type(getattr(grant, name)) is not int or getattr(grant, name) < 0:
                raise ValueError(f'{name} must be a non-negative integer')
        return grant

    def allows(self, role: str) -> bool:
        return ROLES.index(self.role) >= ROLES.index(role)


@dataclass(frozen=True)
class Peer:
    """An authenticated client: its key's file name (never the key itself) and its grant."""

    name: str
    grant: Grant
    user_id: str = field(default='', repr=False)


# a server without CURVE (loopback, or started insecure) serves everyone as this peer
ANONYMOUS = Peer('anonymous', Grant('admin', max_priority=2 ** 62, store_bytes=2 ** 62,
                                    max_in_flight=2 ** 31, max_replays=2 ** 31,
                                    replay_bytes=2 ** 62))


def router_socket(context: zmq.Context) -> zmq.Socket:
    """Make a ROUTER whose automatic routing ids nobody can know in advance (see above)."""
    ctypes.CDLL(None).srand(int.from_bytes(os.urandom(4), 'little'))
    return context.socket(zmq.ROUTER)


def assigned_id() -> bytes:
    """Return a routing id for the ZAP handler to give: random, not a sequence to run ahead of."""
    return ASSIGNED + os.urandom(8)


def chose_its_id(routing_id: bytes, curve: bool) -> bool:
    """Return True unless ``routing_id`` is libzmq's or (``curve``) the ZAP handler's form."""
    if curve and len(routing_id) == 9 and routing_id[0] == ASSIGNED[0]:
        return False
    return len(routing_id) != 5 or routing_id[0] != 0


class _NamingAuthenticator(ThreadAuthenticator):
    """pyzmq's ZAP handler, naming each connection it allows (its reply's ``Identity``)."""

    def _send_zap_reply(self, request_id: bytes, status_code: bytes, status_text: bytes,
                        user_id: str = 'anonymous') -> None:
        # pyzmq's own sends empty metadata; ZMTP metadata: name length, name, value length, value
        metadata = b''
        if status_code == b'200':
            name = assigned_id()
            metadata = b'\x08Identity' + struct.pack('>I', len(name)) + name
        else:
            user_id = ''
        if isinstance(user_id, str):
            user_id = user_id.encode(self.encoding)
        self.zap_socket.send_multipart([ZAP_VERSION, request_id, status_code, status_text,
                                        user_id, metadata])


def needs_curve(endpoint: str) -> bool:
    """Return True unless ``endpoint`` is reachable from this host only."""
    parts = urlsplit(endpoint)
    if parts.scheme in ('ipc', 'inproc'):
        return False
    host = (parts.hostname or '').strip('[]')
    if host == 'localhost':
        return False
    try:
        return not ipaddress.ip_address(host).is_loopback
    except ValueError:
        return True             # an interface name or '*': every address of the host


class KeyRing:
    """The allow-listed client keys of a key directory, re-read when it changes."""

    def __init__(self, keys_dir: str | os.PathLike):
        self.dir = Path(keys_dir)
        self.clients = self.dir / CLIENTS
        self.clients.mkdir(parents=True, exist_ok=True)
        public, secret = zmq.auth.load_certificate(self.dir / f'{SERVER_KEY}.key_secret')
        if secret is None:
            raise ValueError(f'{self.dir / SERVER_KEY}.key_secret holds no secret key')
        self.server_public, self._server_secret = public, secret
        self._peers: dict[str, Peer] = {}
        self._seen: object = None
        self._lock = threading.Lock()
        self.reload()

    def _state(self) -> object:
        return sorted((p.name, p.stat().st_mtime_ns) for p in self.clients.iterdir())

    def reload(self) -> bool:
        """Re-read the folder if it changed; return True when it did."""
        state = self._state()
        if state == self._seen:
            return False
        peers = {}
        for key_file in sorted(self.clients.glob('*.key')):
            try:
                public, _ = zmq.auth.load_certificate(key_file)
                grant_file = key_file.with_suffix('.json')
                grant = (Grant.from_json(json.loads(grant_file.read_text()))
                         if grant_file.exists() else Grant())
            except (OSError, ValueError, TypeError) as exc:
                log.error('ignoring client key %s: %s', key_file.name, exc)
                continue
            user_id = public.decode('ascii')
            peers[user_id] = Peer(key_file.stem, grant, user_id)
        with self._lock:
            self._peers, self._seen = peers, state
        log.info('client keys: %d allowed (%s)', len(peers),
                 ', '.join(sorted(p.name for p in peers.values())) or 'none')
        return True

    def peer(self, user_id: str | None) -> Peer:
        """Return the peer a message's ``User-Id`` names; raise ``unauthorized`` if revoked."""
        with self._lock:
            peer = self._peers.get(user_id or '')
        if peer is None:
            raise ProtocolError(ErrorCode.UNAUTHORIZED,
                                'this key is not (or no longer) allowed on this server')
        return peer

    def sender(self, frame: zmq.Frame) -> Peer:
        """Return the peer whose key sent the message ``frame`` belongs to (its ``User-Id``)."""
        try:
            user_id = frame.get('User-Id')
        except zmq.ZMQError:
            user_id = None
        return self.peer(user_id)

    def secure(self, sock: zmq.Socket) -> None:
        """Make ``sock`` a CURVE server with this key pair (call before ``bind``)."""
        sock.curve_secretkey = self._server_secret
        sock.curve_publickey = self.server_public
        sock.curve_server = True

    def __len__(self) -> int:
        return len(self._peers)


class CurveGate:
    """A running ZAP authenticator fed by a :class:`KeyRing`, and the thread that watches it."""

    def __init__(self, context: zmq.Context, keyring: KeyRing):
        self.keyring = keyring
        self.auth = _NamingAuthenticator(context, log=logging.getLogger('rrto_server.zap'))
        logging.getLogger('rrto_server.zap').setLevel(logging.WARNING)   # it logs client keys
        self.auth.start()
        self._configure()
        self._stop = threading.Event()
        self._watcher = threading.Thread(target=self._watch, name='rrto-keys', daemon=True)
        self._watcher.start()

    def _configure(self) -> None:
        self.auth.configure_curve(domain='*', location=str(self.keyring.clients))

    def _watch(self) -> None:
        while not self._stop.wait(WATCH_INTERVAL_S):
            try:
                if self.keyring.reload():
                    self._configure()
            except OSError as exc:
                log.error('reading client keys failed: %s', exc)

    def close(self) -> None:
        self._stop.set()
        self._watcher.join(timeout=5)
        self.auth.stop()


class Policy:
    """Per-request checks: role, priority ceiling, in-flight quota."""

    def __init__(self):
        self._in_flight: dict[str, int] = {}
        self._lock = threading.Lock()
        self.clamped = 0

    def authorize(self, peer: Peer, kind: str, priority: int | None = None) -> int | None:
        """
        Raise ``forbidden`` unless ``peer``'s role allows ``kind``; return the priority to use.

        A ``priority`` above the key's ceiling is lowered to the ceiling (a robot
        asking too much is still served, at its ceiling).
        """
        role = KIND_ROLES.get(kind, 'admin')
        if not peer.grant.allows(role):
            raise ProtocolError(ErrorCode.FORBIDDEN,
                                f"key {peer.name!r} has role '{peer.grant.role}'; "
                                f"'{kind}' needs '{role}'")
        if priority is not None and priority > peer.grant.max_priority:
            self.clamped += 1
            return peer.grant.max_priority
        return priority

    def begin(self, peer: Peer) -> None:
        """Count one more request of ``peer`` in flight; raise ``overloaded`` past its quota."""
        with self._lock:
            count = self._in_flight.get(peer.name, 0)
            if count >= peer.grant.max_in_flight:
                raise ProtocolError(
                    ErrorCode.OVERLOADED,
                    f'key {peer.name!r} already has {count} requests in flight (its quota)')
            self._in_flight[peer.name] = count + 1

    def admit(self, peer: Peer, kind: str, priority: int | None = None) -> int | None:
        """
        Admit one request of ``peer``: return the priority it runs at, or raise.

        Raises ``forbidden`` unless ``peer``'s role allows ``kind``, and
        ``overloaded`` past the key's in-flight quota (else it is counted in
        flight until :meth:`end`).  A ``priority`` above the key's ceiling is
        lowered to the ceiling (a robot asking too much is still served, at its
        ceiling).  :meth:`authorize` then :meth:`begin` in one call (the server's, a
        request; issue 11): the role, the ceiling, the quota.
        """
        grant = peer.grant
        role = KIND_ROLES.get(kind, 'admin')
        if _RANK[grant.role] < _RANK[role]:         # Grant.allows, without its call
            raise ProtocolError(ErrorCode.FORBIDDEN,
                                f"key {peer.name!r} has role '{grant.role}'; "
                                f"'{kind}' needs '{role}'")
        if priority is not None and priority > grant.max_priority:
            self.clamped += 1
            priority = grant.max_priority
        with self._lock:
            count = self._in_flight.get(peer.name, 0)
            if count >= grant.max_in_flight:
                raise ProtocolError(
                    ErrorCode.OVERLOADED,
                    f'key {peer.name!r} already has {count} requests in flight (its quota)')
            self._in_flight[peer.name] = count + 1
        return priority

    def end(self, peer: Peer) -> None:
        """Count one request of ``peer`` answered."""
        with self._lock:
            count = self._in_flight.get(peer.name, 0) - 1
            if count > 0:
                self._in_flight[peer.name] = count
            else:
                self._in_flight.pop(peer.name, None)

    def in_flight(self, peer: Peer) -> int:
        with self._lock:
            return self._in_flight.get(peer.name, 0)
