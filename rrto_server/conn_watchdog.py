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
  delivered bytes by more than ``limit + SLACK_BYTES + AGE_BYTES_PER_S x age``
  it takes the bytes libzmq has read (minus the kernel's queue, ``FIONREAD``)
  and asks the I/O thread for a proof that the socket was empty since (a token
  on :attr:`wake`, read before the socket: a receive that then finds the socket
  empty shows that every message complete by then has been delivered; while a
  proof is wanted, :meth:`drain` receives until the socket is empty, so a peer
  keeping it busy cannot hold proofs off).  A connection still over its allowance then holds that
  much of an unfinished message; it is shut down (``shutdown(2)``), libzmq
  sees the end of the stream and drops the partial message, and the freed
  heap is handed back to the system (``malloc_trim``, 0.25 s and 2 s later).

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
import fcntl
import logging
import os
import socket
import struct
import termios
import threading
import time
import uuid

import zmq

log = logging.getLogger('rrto_server.conn_watchdog')

TICK_S = 0.05                # how often the received bytes of each connection are read
SLACK_BYTES = 256 << 10      # handshake, frame headers of a partial message, one socket read
AGE_BYTES_PER_S = 128        # heartbeats: a CURVE PING is 42 bytes (the robot sends 2 a second)
CURVE_BOX_BYTES = 33         # a CURVE MESSAGE: command name 8, nonce 8, MAC 16, flags 1
TRIM_AFTER_S = (0.25, 2.0)   # malloc_trim this long after a cut (libzmq frees a part at a time)
TRANSPORTS = ('tcp', 'ipc', 'inproc')
_EVENT = struct.Struct('=HI')
_TOKEN = struct.Struct('=Q')
_TCPI_BYTES_RECEIVED = 128   # offset of tcpi_bytes_received (u64) in struct tcp_info (4.1+)
_UCRED = struct.Struct('3i')
_LIBC = ctypes.CDLL(ctypes.util.find_library('c'))


class _Connection:
    """One accepted connection: its duplicate descriptor and the bytes delivered from it."""

    __slots__ = ('sock', 'born', 'delivered', 'cut')

    def __init__(self, sock: socket.socket | None):
        self.sock = sock             # None: a unix socket of a trusted user (not watched)
        self.born = time.monotonic()
        self.delivered = 0
        self.cut = False

    def received(self) -> int:
        """Return the bytes the kernel has received on this connection."""
        info = self.sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 256)
        return struct.unpack_from('=Q', info, _TCPI_BYTES_RECEIVED)[0]

    def queued(self) -> int:
        """Return the bytes received that libzmq has not read yet."""
        data = fcntl.ioctl(self.sock.fileno(), termios.FIONREAD, b'\0\0\0\0')
        return struct.unpack('i', data)[0]


class ConnectionWatchdog:
    """
    Bound what each peer of ``sock`` makes libzmq hold (see the module docstring).

    Create it after the socket's security options and before it binds ``endpoint``;
    register :attr:`sockets` in the I/O thread's poller and receive from ``sock``
    only through :meth:`drain`, after every poll.
    """

    def __init__(self, sock: zmq.Socket, limit: int, endpoint: str):
        transport = endpoint.split('://', 1)[0]
        if transport not in TRANSPORTS:
            raise ValueError(f'{endpoint}: the {transport} transport cannot bound what a peer '
                             f'makes the server hold; use one of {", ".join(TRANSPORTS)}')
        self.sock = sock
        self.limit = limit
        self.cuts = 0
        self.refused = 0
        self.most_held = 0       # received and not delivered, most of any connection (a tick)
        self._box = CURVE_BOX_BYTES if sock.getsockopt(zmq.CURVE_SERVER) else 0
        self._uid = os.geteuid()
        self._conns: dict[int, _Connection] = {}     # by libzmq's descriptor (I/O thread)
        self._retired: list[_Connection] = []        # closed by the watchdog thread
        self._asked = self._pending = self._proven = 0   # tokens
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
        messages (all with ``None``).  Tokens are read before the socket: a receive that
        then finds the socket empty proves it was empty after every token read, which is
        what the watchdog thread waits for before it cuts anyone.  While a proof is
        wanted, it receives past ``most`` until the socket is empty, so a peer that keeps
        the socket busy cannot hold proofs off (libzmq holds those messages either way),
        for at most ``TICK_S``: a peer sending faster than this thread receives delays
        the proof, and what it makes this thread hold stays bounded.
        """
        if self.monitor in events:
            self._events()
        token = self._pending
        if self.wake in events:
            while self.wake.poll(0):
                token = max(token, _TOKEN.unpack(self.wake.recv())[0])
            self._pending = token
        wanted = token > self._proven
        batch: list = []
        if self.sock in events or wanted:
            until = time.monotonic() + TICK_S if wanted else 0.0
            while wanted or most is None or len(batch) < most:
                if wanted and len(batch) % 64 == 63 and time.monotonic() > until:
                    break                    # faster than we receive: no proof this time
                try:
                    batch.append(self.sock.recv_multipart(zmq.NOBLOCK, copy=False))
                except zmq.Again:
                    if wanted:
                        self._proven = token
                        self._proved.set()
                    break
        self._count(batch)
        return batch

    def _count(self, batch: list) -> None:
        """Add the wire bytes of each message to its connection's delivered bytes."""
        box = self._box
        conns = self._conns
        for frames in batch:
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
            wire = 0
            for frame in frames[1:]:         # the routing id is not on the wire
                n = len(frame) + box
                wire += n + (2 if n < 256 else 9)
            conn.delivered += wire

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

    def _accepted(self, fd: int) -> _Connection | None:
        try:
            sock = socket.socket(fileno=os.dup(fd))
        except OSError:
            return None                      # already closed (its DISCONNECTED follows)
        if sock.family in (socket.AF_INET, socket.AF_INET6):
            return _Connection(sock)
        try:
            if sock.family == socket.AF_UNIX:
                _, uid, _ = _UCRED.unpack(sock.getsockopt(
                    socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size))
                if uid in (self._uid, 0):
                    return _Connection(None)
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
        suspects = self.over_allowance(time.monotonic())
        if not suspects:
            return
        self._asked += 1                     # is the socket empty after this moment?
        self._proved.clear()
        self._waker.send(_TOKEN.pack(self._asked))
        if not self._proved.wait(TICK_S) or self._proven < self._asked:
            return                           # busy: look again next time
        for conn, read, allowance in suspects:
            held = read - conn.delivered
            if held > allowance:
                self._cut(conn, held)

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

    def over_allowance(self, now: float) -> list[tuple[_Connection, int, int]]:
        """Return ``(connection, bytes read, allowance)`` of each one over it (watchdog thread)."""
        suspects = []
        most = 0
        for conn in list(self._conns.values()):
            if conn.sock is None or conn.cut:
                continue
            allowance = int(self.limit + SLACK_BYTES + AGE_BYTES_PER_S * (now - conn.born))
            try:
                held = conn.received() - conn.delivered
                most = max(most, held)
                if held <= allowance:
                    continue
                read = conn.received() - conn.queued()
            except OSError:
                conn.cut = True              # no longer a connected TCP socket
                continue
            if read - conn.delivered > allowance:
                suspects.append((conn, read, allowance))
        self.most_held = most
        return suspects

    def _cut(self, conn: _Connection, held: int) -> None:
        conn.cut = True
        try:
            conn.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            return
        self.cuts += 1
        log.warning('cut a connection holding %d bytes of an unfinished message (limit %d)',
                    held, self.limit)

    # ------------------------------------------------------------------ both
    def snapshot(self) -> dict:
        """Return ``{connections, cut, refused, most_held}`` (JSON data for ``stats``)."""
        return {'connections': len(self._conns), 'cut': self.cuts, 'refused': self.refused,
                'most_held': self.most_held}

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
