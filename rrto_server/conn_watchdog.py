"""
Cut a connection off when libzmq holds more of its bytes than one message may have.

libzmq checks ``ZMQ_MAXMSGSIZE`` per message *part*, and keeps every part of a
multipart message in the socket's inbound pipe until the last one arrives;
an unfinished message is neither delivered nor counted against the receive
high-water mark.  So a peer that speaks ZMTP itself could send parts under the
limit and never the last one, and the socket held them all for as long as the
connection stayed open (a11 #1: 1.2 GB from one connection).  A size check on
delivered messages comes too late: the bytes are buffered first.

:class:`ConnectionWatchdog` bounds what each accepted TCP connection makes
libzmq hold, where the bytes are received:

- the socket's monitor reports each accepted connection with its file
  descriptor (``ZMQ_EVENT_ACCEPTED``); the watchdog keeps a duplicate of that
  descriptor, so it always names that connection, even after libzmq closed
  its own and the number was reused;
- the I/O thread receives through the watchdog (:meth:`drain`), which counts the
  message's source descriptor (``ZMQ_SRCFD``, a message property of libzmq
  4.3) and its size on the wire (payload plus each frame's ZMTP header, plus
  CURVE's box when the socket is a CURVE server);
- every ``TICK_S`` the watchdog thread reads, per connection, the bytes the
  kernel received (``TCP_INFO.tcpi_bytes_received``); where they exceed the
  delivered bytes and the heartbeats' base (:mod:`rrto_server.conn_state`) by
  more than ``limit + SLACK_BYTES + AGE_BYTES_PER_S x`` the base's age (at most
  ``MAX_AGE_S``: a credit that grew with age for good let old connections hold
  more, r7 #6's twin) it takes the bytes libzmq has read (less ``FIONREAD``)
  and asks the I/O thread, with a token on :attr:`wake` read before the
  socket, for a proof that the connection had no complete message waiting
  after that moment.  Either the socket was found empty after the token, or,
  per connection, ``QUIET_MESSAGES`` more than there are connections were
  received after the token and since that connection's last message: the
  ROUTER queues its connections fairly (one message from each ready one in
  turn, a newly ready one within libzmq's 100 receives between command
  checks), so a connection with a complete message waiting would have
  delivered it.  A flood on one connection then proves the others sooner, not
  never (a13 #1: a socket that is never empty held the proof off for good).
  A connection still over its allowance then holds that much of an unfinished
  message; it is shut down (``shutdown(2)``), libzmq sees the end of the
  stream and drops the partial message, and the freed heap is handed back to
  the system (``malloc_trim``, 0.25 s and 2 s later).

A peer that sends a routing id the server did not give it (a13 #0: see
:func:`rrto_server.auth.router_socket`) is shut down too, and its messages are
never delivered.

An honest peer holds at most one unfinished message (at most ``limit``), so it
is never cut, however slowly it sends.  A peer sending faster than the watchdog
looks makes the server hold at most its allowance plus what it sends in about
``TICK_S`` (5 MB at 100 MB/s).  The cost on the request path is one
``ZMQ_SRCFD`` lookup and a few additions per message; the system calls (one
per connection) run on the watchdog thread every ``TICK_S``.

A unix socket (``ipc://``) has no count of received bytes.  Its peers are
local processes: the watchdog shuts down, at once, any whose user is neither
the server's nor root (``SO_PEERCRED``); the server's own user can kill it or
write its store anyway, so bounding that user's memory would protect nothing.
``inproc://`` peers are threads of the same process.  Any other transport
cannot be bounded and is refused.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import socket
import struct
import threading
import time
import uuid
from typing import Callable

import zmq

from rrto_server.auth import chose_its_id
from rrto_server.conn_state import Connection
from rrto_server.outbox import readable, receive
from rrto_wire.wire_bytes import CURVE_BOX_BYTES, queued, received, wire_size

log = logging.getLogger('rrto_server.conn_watchdog')

TICK_S = 0.05                # how often the received bytes of each connection are read
PROOF_WAIT_S = 0.5           # how long one tick waits for the proofs it asked for
QUIET_MESSAGES = 264         # 2 x libzmq's inbound_poll_rate (100) + 64, over the connections
TRIM_AFTER_S = (0.25, 2.0)   # malloc_trim this long after a cut (libzmq frees a part at a time)
TRANSPORTS = ('tcp', 'ipc', 'inproc')
_EVENT = struct.Struct('=HI')
_TOKEN = struct.Struct('=Q')
_UCRED = struct.Struct('3i')
_LIBC = ctypes.CDLL(ctypes.util.find_library('c'))


class ConnectionWatchdog:
    """
    Bound what each peer of ``sock`` makes libzmq hold (see the module docstring).

    Create it after the socket's security options and before it binds ``endpoint``;
    register :attr:`sockets` in the I/O thread's poller and receive from ``sock``
    only through :meth:`drain`, after every poll.  ``clock`` gives the connections' ages.
    """

    def __init__(self, sock: zmq.Socket, limit: int, endpoint: str,
                 clock: Callable[[], float] = time.monotonic):
        transport = endpoint.split('://', 1)[0]
        if transport not in TRANSPORTS:
            raise ValueError(f'{endpoint}: the {transport} transport cannot bound what a peer '
                             f'makes the server hold; use one of {", ".join(TRANSPORTS)}')
        self.sock = sock
        self.limit = limit
        self._clock = clock
        self.cuts = 0
        self.refused = 0
        self.most_held = 0       # received and not delivered, most of any connection (a tick)
        self.named = 0           # connections cut for a routing id of their own choosing
        self._curve = bool(sock.getsockopt(zmq.CURVE_SERVER))
        self._box = CURVE_BOX_BYTES if self._curve else 0
        self._uid = os.geteuid()
        self._conns: dict[int, Connection] = {}     # by libzmq's descriptor (I/O thread)
        self._retired: list[Connection] = []        # closed by the watchdog thread
        self._asked = self._pending = self._proven = 0   # tokens
        self._settled = 0                # the newest token the watchdog stopped waiting on
        self._seq = 0                    # messages received (I/O thread)
        self._read = (0, 0)              # the newest token read, and self._seq then
        self._proof = (0, 0)             # the newest token proven empty, and self._seq then
        self._proved = threading.Event()
        self._trims: list[float] = []    # when to hand freed heap back (watchdog thread)
        ctx = sock.context
        address = f'inproc://rrto-watchdog-{uuid.uuid4().hex}'
        sock.monitor(address + '-events', zmq.EVENT_ACCEPTED | zmq.EVENT_DISCONNECTED)
        self.monitor = self._pair(ctx, zmq.RCVHWM, 0)    # never block libzmq on an event
        self.monitor.connect(address + '-events')
        self._waker = self._pair(ctx, zmq.SNDHWM, 0)     # the watchdog thread's end
        self._waker.bind(address + '-wake')
        self.wake = self._pair(ctx, zmq.RCVHWM, 0)
        self.wake.connect(address + '-wake')
        self.sockets = (self.wake, self.monitor)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name='rrto-watchdog', daemon=True)
        self._thread.start()

    @staticmethod
    def _pair(ctx: zmq.Context, option: int, value: int) -> zmq.Socket:
        sock = ctx.socket(zmq.PAIR)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(option, value)
        return sock

    # ------------------------------------------------------------------ I/O thread
    def drain(self, events: dict, most: int | None = None) -> list:
        """
        Receive the messages waiting on the watched socket and count them (I/O thread).

        Call it after every poll with the poll's ``events``; it returns up to ``most``
        messages (all with ``None``), up to the last one ``ZMQ_EVENTS`` shows.  Tokens are read
        before the socket: a receive that then finds it empty proves it was empty after every
        token read, which the watchdog thread waits for before it cuts anyone.  While a proof
        is wanted, it receives past ``most`` until a receive finds the socket empty (libzmq
        holds those messages anyway), for at most ``TICK_S``; a busy socket still proves each
        quiet connection (module docstring).  A connection's own routing id: counted, dropped.
        """
        if self.monitor in events:
            self._events()
        token = self._pending
        if self.wake in events:
            while self.wake.poll(0):
                token = max(token, _TOKEN.unpack(self.wake.recv())[0])
            if token > self._pending:
                self._read = (token, self._seq)
            self._pending = token
        wanted = token > max(self._proven, self._settled)
        batch: list = []
        empty = False
        if self.sock in events or wanted:
            until = time.monotonic() + TICK_S if wanted else 0.0
            while wanted or most is None or len(batch) < most:
                if wanted and len(batch) % 64 == 63 and time.monotonic() > until:
                    break                    # faster than we receive: no proof this time
                try:
                    batch.append(receive(self.sock))
                except zmq.Again:
                    empty = wanted
                    break
                if not (wanted or readable(self.sock)):
                    break                    # the last one, no zmq.Again to end on (issue 11)
        batch = self._count(batch)
        if empty:                            # once counted: the watchdog reads what it delivered
            self._proof = (token, self._seq)
            self._proven = token
            self._proved.set()
        return batch

    def _count(self, batch: list) -> list:
        """Add each message's wire bytes to its connection; return those not dropped."""
        box, curve = self._box, self._curve
        conns = self._conns
        seq = self._seq
        named = False
        for frames in batch:
            seq += 1
            try:
                fd = frames[-1].get(zmq.SRCFD)
            except zmq.ZMQError:
                continue                     # inproc: no descriptor, nothing to bound
            conn = conns.get(fd)
            if conn is None:
                self._events()               # its connection's event came after the poll
                conn = conns.get(fd)
                if conn is None:
                    continue
            conn.delivered += wire_size(frames[1:], box)   # the routing id is not on the wire
            conn.last = seq                  # after it: a rebase that sees it sees the bytes
            if conn.named or chose_its_id(frames[0].bytes, curve):
                conn.named = named = True
        self._seq = seq                      # after every conn.last: read first, it is safe
        if named:
            batch = [frames for frames in batch if not self._named(frames)]
        return batch

    def _named(self, frames: list) -> bool:
        try:
            conn = self._conns.get(frames[-1].get(zmq.SRCFD))
        except zmq.ZMQError:
            return False
        return conn is not None and conn.named

    def _events(self) -> None:
        while True:
            try:
                event = self.monitor.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            kind, fd = _EVENT.unpack_from(event[0])
            old = self._conns.pop(fd, None)
            if old is not None:
                self._retired.append(old)
            if kind == zmq.EVENT_ACCEPTED:
                conn = self._accepted(fd)
                if conn is not None:
                    self._conns[fd] = conn

    def _accepted(self, fd: int) -> Connection | None:
        try:
            sock = socket.socket(fileno=os.dup(fd))
        except OSError:
            return None                      # already closed (its DISCONNECTED follows)
        if sock.family in (socket.AF_INET, socket.AF_INET6):
            return Connection(sock, self._clock())
        try:
            if sock.family == socket.AF_UNIX:
                _, uid, _ = _UCRED.unpack(sock.getsockopt(
                    socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size))
                if uid in (self._uid, 0):
                    return Connection(None, self._clock())
            sock.shutdown(socket.SHUT_RDWR)
            self.refused += 1
            log.warning('refused a %s peer of another user', sock.family.name)
        except OSError:
            pass
        finally:
            sock.close()
        return None

    # ------------------------------------------------------------------ watchdog thread
    def _run(self) -> None:
        while not self._stop.wait(TICK_S):
            try:
                self._tick()
            except Exception:  # noqa: B902 - the watchdog must outlive any one tick
                log.exception('connection watchdog tick failed')

    def _tick(self) -> None:
        self._release()
        for conn in list(self._conns.values()):
            if conn.named and not conn.cut:
                self.named += 1
                self._cut(conn, 0)
        now = self._clock()
        self._rebase(now)
        suspects = self.over_allowance(now)
        if not suspects:
            return
        token = self._ask()                  # no complete message waiting after this moment?
        deadline = time.monotonic() + PROOF_WAIT_S
        try:
            while suspects and not self._stop.is_set():
                proved = self._proved.wait(TICK_S / 5) and self._proven >= token
                waiting = []
                for conn, read, limit in suspects:
                    if not (proved or self._quiet(conn, token)):
                        waiting.append((conn, read, limit))
                    elif read - conn.delivered > limit:
                        self._cut(conn, read - conn.delivered)
                suspects = waiting
                if time.monotonic() > deadline:
                    return                   # busy: look again next time
        finally:       # proved per connection, cut or given up: the I/O thread stops trying
            self._settled = token            # to empty the socket for it (r5 B3)

    def _ask(self) -> int:
        self._asked += 1
        self._proved.clear()
        self._waker.send(_TOKEN.pack(self._asked))
        return self._asked

    def _rebase(self, now: float) -> None:
        """Measure again what heartbeats took of each connection due (:mod:`conn_state`)."""
        due = []
        for conn in list(self._conns.values()):
            if conn.sock is not None and not conn.cut:
                given_up = conn.base.settle(conn, self._proof, PROOF_WAIT_S)
                self._settled = max(self._settled, given_up)    # the I/O thread stops
                if conn.base.due(now):
                    due.append(conn)
        reads = []
        for conn in due:
            try:
                reads.append((conn, received(conn.sock) - queued(conn.sock)))
            except OSError:
                conn.cut = True              # no longer a connected TCP socket
        if reads:
            token = self._ask()              # after the reads: its proof comes after them
            for conn, read in reads:
                conn.base.begin(token, read, now)

    def _quiet(self, conn: Connection, token: int) -> bool:
        """Return True if ``conn`` had no complete message waiting once ``token`` was read."""
        seq = self._seq                      # before conn.last (the I/O thread sets it first)
        read, since = self._read
        if read < token:
            return False
        return seq - max(conn.last, since) >= QUIET_MESSAGES + len(self._conns)

    def _release(self) -> None:
        now = time.monotonic()
        while self._retired:
            conn = self._retired.pop()
            if conn.sock is not None:
                conn.sock.close()
            if conn.cut:
                self._trims = [now + delay for delay in TRIM_AFTER_S]
        if self._trims and self._trims[0] <= now:
            del self._trims[0]
            _LIBC.malloc_trim(0)             # libzmq freed the partial message: return it

    def over_allowance(self, now: float) -> list[tuple[Connection, int, int]]:
        """Return ``(connection, bytes read, allowance)`` of each one over it (watchdog thread)."""
        suspects = []
        most = 0
        for conn in list(self._conns.values()):
            if conn.sock is None or conn.cut:
                continue
            limit = conn.base.allowance(self.limit, now)
            try:
                held = received(conn.sock) - conn.delivered - conn.base.bytes
                most = max(most, held)
                if held <= limit:
                    continue
                read = received(conn.sock) - queued(conn.sock) - conn.base.bytes
            except OSError:
                conn.cut = True              # no longer a connected TCP socket
                continue
            if read - conn.delivered > limit:
                suspects.append((conn, read, limit))
        self.most_held = most
        return suspects

    def _cut(self, conn: Connection, held: int) -> None:
        conn.cut = True
        try:
            conn.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            return
        if conn.named:
            log.warning('cut a connection that chose its own routing id')
            return
        self.cuts += 1
        log.warning('cut a connection holding %d bytes of an unfinished message (limit %d)',
                    held, self.limit)

    # ------------------------------------------------------------------ both
    def snapshot(self) -> dict:
        """Return ``{connections, cut, refused, most_held, named}`` (JSON data for ``stats``)."""
        return {'connections': len(self._conns), 'cut': self.cuts, 'refused': self.refused,
                'most_held': self.most_held, 'named': self.named}

    def close(self) -> None:
        """Stop the watchdog thread; release its sockets and the duplicate descriptors."""
        self._stop.set()
        self._proved.set()
        self._thread.join(timeout=5)
        for conn in self._retired + list(self._conns.values()):
            if conn.sock is not None:
                conn.sock.close()
        self._retired.clear()
        self._conns.clear()
        for sock in (self.monitor, self.wake, self._waker):
            sock.close(linger=0)
