"""
The link emulator's proxy: a shaping TCP proxy on loopback (forwarding only).

The robot connects to the emulator instead of the server; every byte is
forwarded through two shaped directions, ``up`` (robot -> server) and
``down``.  Each direction models, independently and configurably per run:

* **bandwidth**: a token bucket filled at the direction's rate, which may vary
  over time (a constant, synthetic steps, or a measured trace replayed from
  ``bench.traces``); its depth is ``burst_ms`` of data at the current rate (at
  least two packets), so a message sent after an idle period gains at most
  that much.  A rate of zero is an outage: the stream stalls until it returns.
* **one-way delay** (``delay_ms``, half the RTT) and **jitter**: each piece of
  data arrives after ``delay_ms`` plus a uniform draw in ``+-jitter_ms``
  (netem's default distribution), never before the piece sent ahead of it on
  the same connection (TCP delivers in order).
* **loss** as stalls: TCP never loses bytes, so a lost packet shows as its
  connection stalling for a retransmission timeout (``stall_ms``, default
  Linux's minimum RTO of 200 ms).  Each 1448-byte packet is lost with
  probability ``loss``; the data behind it on that connection waits.

The link is shared: all connections through one emulator draw on the same
two buckets, as all of a robot's flows share one radio.  Departure times are
computed from the rate schedule, not from when a thread woke up, and the
forwarder reads ``READ_AHEAD_S`` ahead of the link, so scheduling lateness
does not cost link capacity.  Data is written at its due time, never before:
each writer sleeps until shortly before and polls the clock for the rest
(``SPIN_S``; writers also ask Linux for 1 ns timer slack), so a message's
last piece leaves within microseconds of when the link delivers it.  And the
link's time starts when data reached the emulator's socket (the kernel's
receive stamp, on Linux), not when the reading thread woke up to read it.

The forwarding itself is kept off the link's clock where it can be: data
already waiting is read through (each read keeps its own stamp) before one
write; data due when it is read, with nothing ahead of it, is written by the
reading thread at once, not handed to the writer (a thread wake-up); and the
writer takes its next piece before it sleeps, so a due time is followed by
the write and nothing else.  None of this changes a due time.
"""

from __future__ import annotations

import collections
import ctypes
import select
import socket
import struct
import sys
import threading
import time
from typing import Any

from bench.link_config import PRESETS, LinkConfig
from bench.link_shaper import Shaper

PIECE_BYTES = 16384          # the forwarder's scheduling quantum
READ_AHEAD_S = 0.02
RECV_BYTES = 65536
DRAIN_READS = 8              # reads of data already waiting, forwarded together (one write)
HISTORY = 10000              # scheduled delays kept per direction
SPIN_S = 3e-4                # a writer's last stretch before a due time: poll, don't sleep
PR_SET_TIMERSLACK = 29
SO_TIMESTAMPNS = 35 if sys.platform.startswith('linux') else None   # not in Python's socket
STAMP_SPACE = socket.CMSG_SPACE(16) if hasattr(socket, 'CMSG_SPACE') else 0
MAX_BACKDATE_S = 1e-3        # a kernel stamp further back than this is not trusted (clock step)


def precise_timers() -> None:
    """Ask Linux to wake this thread's sleeps on time (timer slack 1 ns, not 50 us); else no-op."""
    try:
        ctypes.CDLL(None).prctl(PR_SET_TIMERSLACK, 1, 0, 0, 0)
    except (OSError, AttributeError):
        pass


def stamp_arrivals(sock: socket.socket) -> bool:
    """Ask the kernel to stamp when data reaches ``sock`` (Linux); return whether it will."""
    if SO_TIMESTAMPNS is None or not STAMP_SPACE:
        return False
    try:
        sock.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
    except OSError:
        return False
    return True


def arrival_time(ancillary: list, realtime: float, now: float) -> float:
    """
    Return when data read at ``now`` (monotonic) reached the socket: its kernel stamp, or ``now``.

    ``ancillary`` is ``recvmsg``'s; the stamp (wall clock, of the last packet
    read) is moved to the monotonic clock with ``realtime``, read just before
    ``now`` (so it lands late, never early), and kept within
    ``MAX_BACKDATE_S`` of ``now`` in case the wall clock was stepped.  The
    link's time then starts when the data arrived, not when the reading
    thread woke up.
    """
    for level, kind, value in ancillary:
        if level == socket.SOL_SOCKET and kind == SO_TIMESTAMPNS and len(value) >= 16:
            seconds, nanoseconds = struct.unpack('qq', value[:16])
            stamped = seconds + nanoseconds * 1e-9 - (realtime - now)
            return min(now, max(stamped, now - MAX_BACKDATE_S))
    return now


def receive(sock: socket.socket, stamped: bool, flags: int = 0) -> tuple[bytes, float]:
    """
    Return the next data on ``sock`` (blocking) and when it arrived (monotonic).

    With ``stamped`` (``stamp_arrivals`` said yes) that is the kernel's stamp
    (``arrival_time``), else when the read returned.  ``flags`` go to the
    read (``socket.MSG_DONTWAIT``: raise ``BlockingIOError`` when none waits).
    """
    if not stamped:
        return sock.recv(RECV_BYTES, flags), time.monotonic()
    data, ancillary, _, _ = sock.recvmsg(RECV_BYTES, STAMP_SPACE, flags)
    realtime = time.time()
    return data, arrival_time(ancillary, realtime, time.monotonic())


def send_pieces(sock: socket.socket, pieces: list) -> None:
    """Write ``pieces`` (bytes-like, in order) to ``sock``: one call where the kernel takes all."""
    if len(pieces) == 1:
        sock.sendall(pieces[0])
        return
    sent = sock.sendmsg(pieces)
    if sent < sum(len(piece) for piece in pieces):
        sock.sendall(b''.join(pieces)[sent:])


def sleep_until(due: float, spin_s: float = SPIN_S) -> float:
    """
    Return at ``due`` (``time.monotonic``) or just after it, never before; return the time.

    Sleeps until ``spin_s`` before, then polls the clock: a sleep alone
    wakes tens to hundreds of microseconds late.  Each turn of the loop
    releases the GIL (a zero-timeout ``select``), so the other forwarding
    threads run meanwhile; it does not give the CPU away (``sched_yield``
    would, to any busy process on the core, for milliseconds).
    """
    while True:
        now = time.monotonic()
        left = due - now
        if left <= 0:
            return now
        if left > spin_s:
            time.sleep(left - spin_s)
        else:
            select.select([], [], [], 0)


class _Pipe:
    """
    One direction of one connection: a reader paced by the shaper, a timed writer.

    Data already due when it is read (no delay, tokens in the bucket) and
    with nothing ahead of it goes out from the reading thread at once, not
    through a hand-off to the writer (a thread wake-up: ~0.05-0.1 ms); the
    ``sending`` flag keeps the two threads' writes in order.
    """

    def __init__(self, conn: '_Connection', src: socket.socket, dst: socket.socket, which: str):
        self.conn, self.src, self.dst, self.which = conn, src, dst, which
        self.queue: collections.deque = collections.deque()
        self.cond = threading.Condition()
        self.sending = False        # a thread is writing pieces it took; the other waits
        self.last_delivery = 0.0
        self.stamped = stamp_arrivals(src)
        self.threads = [threading.Thread(target=self._read, daemon=True,
                                         name=f'linkemu-{which}-read'),
                        threading.Thread(target=self._write, daemon=True,
                                         name=f'linkemu-{which}-write')]

    def start(self) -> None:
        for thread in self.threads:
            thread.start()

    def _push_eof(self, due: float) -> None:
        with self.cond:
            self.last_delivery = max(due, self.last_delivery)
            self.queue.append((self.last_delivery, None))
            self.cond.notify()

    def _forward(self, pieces: list[tuple[float, float, memoryview]]) -> None:
        """
        Schedule ``pieces`` (due, arrived, data); write those due now here if none wait.

        The pieces due by now, with no piece queued and no write in flight,
        leave at once in one write; the rest go to the writer as before.
        """
        dues = []
        with self.cond:
            for due, _, _ in pieces:
                self.last_delivery = max(due, self.last_delivery)
                dues.append(self.last_delivery)
            now = time.monotonic()
            ready = 0               # pieces this thread writes itself: a prefix (dues ascend)
            if not self.queue and not self.sending:
                while ready < len(dues) and dues[ready] <= now:
                    ready += 1
                self.sending = ready > 0
            for due, (_, _, data) in zip(dues[ready:], pieces[ready:]):
                self.queue.append((due, data))
            if ready < len(dues):
                self.cond.notify()
        emu = self.conn.emulator
        for i, (due, (_, arrived, _)) in enumerate(zip(dues, pieces)):
            if i < ready:
                emu.note_lateness(self.which, now - due)
            emu.note_delay(self.which, due - arrived)
        if ready:
            emu.note_io(self.which, writes=1, direct=ready)
            try:
                send_pieces(self.dst, [data for _, _, data in pieces[:ready]])
            finally:
                with self.cond:
                    self.sending = False
                    if self.queue:
                        self.cond.notify()

    def _read(self) -> None:
        emu = self.conn.emulator
        try:
            while not self.conn.closed:
                shaper = emu.shaper(self.which)
                ahead = shaper.busy_until() - time.monotonic() - READ_AHEAD_S
                if ahead > 0:
                    time.sleep(min(ahead, 0.05))
                    continue
                data, now = receive(self.src, self.stamped)
                pieces, reads = [], 1
                while data:
                    shaper = emu.shaper(self.which)   # the link may have changed during recv
                    view = memoryview(data)
                    sizes = [PIECE_BYTES] * (len(data) // PIECE_BYTES)
                    if len(data) % PIECE_BYTES:
                        sizes.append(len(data) % PIECE_BYTES)
                    for i, due in enumerate(shaper.dues(now, sizes)):
                        pieces.append((due, now, view[i * PIECE_BYTES:(i + 1) * PIECE_BYTES]))
                    # more already waiting (the read filled its buffer): read it before writing,
                    # each read with its own stamp, as far ahead of the link as ever
                    if (len(data) < RECV_BYTES or reads == DRAIN_READS
                            or shaper.busy_until() - time.monotonic() > READ_AHEAD_S):
                        break
                    try:
                        data, now = receive(self.src, self.stamped, socket.MSG_DONTWAIT)
                    except BlockingIOError:
                        break
                    reads += 1
                emu.note_io(self.which, reads=reads)
                if pieces:
                    self._forward(pieces)
                if not data:
                    shaper = emu.shaper(self.which)
                    self._push_eof(now + shaper.direction.delay_ms / 1e3)
                    return
        except OSError:
            self.conn.close()

    def _write(self) -> None:
        """
        Write each queued piece at its due time, never before.

        The writer takes the next piece before it sleeps (``sending`` keeps
        the reader from writing past it), so once the piece is due the only
        work left before the write is the write; pieces that came due
        meanwhile go with it.
        """
        precise_timers()
        emu = self.conn.emulator
        try:
            while True:
                with self.cond:
                    while (not self.queue or self.sending) and not self.conn.closed:
                        self.cond.wait(0.2)
                    if self.conn.closed:
                        return
                    due, data = self.queue.popleft()
                    # poll only for the last piece queued: a message's end is what its receiver
                    # waits for; a piece with more behind it only needs to leave before them
                    spin_s = 0.0 if self.queue else SPIN_S
                    self.sending = data is not None
                now = sleep_until(due, spin_s)
                if data is None:
                    self.dst.shutdown(socket.SHUT_WR)
                    self.conn.half_closed()
                    return
                emu.note_lateness(self.which, now - due)
                chunks = [data]
                queue = self.queue       # only this thread takes from it: no lock to look
                while queue and queue[0][0] <= now and queue[0][1] is not None:
                    due, data = queue.popleft()                  # due by now, never early
                    emu.note_lateness(self.which, now - due)
                    chunks.append(data)
                try:
                    send_pieces(self.dst, chunks)
                finally:
                    with self.cond:
                        self.sending = False
                emu.note_io(self.which, writes=1)
        except OSError:
            self.conn.close()


class _Connection:
    def __init__(self, emulator: 'LinkEmulator', client: socket.socket, server: socket.socket):
        self.emulator = emulator
        self.sockets = (client, server)
        self.closed = False
        self._halves = 0
        self._lock = threading.Lock()
        self.pipes = [_Pipe(self, client, server, 'up'), _Pipe(self, server, client, 'down')]

    def start(self) -> None:
        for pipe in self.pipes:
            pipe.start()

    def half_closed(self) -> None:
        with self._lock:
            self._halves += 1
            done = self._halves == 2
        if done:
            self.close()

    def close(self) -> None:
        with self._lock:
            if self.closed:
                return
            self.closed = True
        for sock in self.sockets:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            sock.close()
        for pipe in self.pipes:
            with pipe.cond:
                pipe.cond.notify_all()
        self.emulator.forget(self)


class LinkEmulator:
    """A shaping TCP proxy from ``listen`` to ``upstream`` (see the module docstring)."""

    def __init__(self, upstream: tuple[str, int], link: LinkConfig = PRESETS['unlimited'],
                 listen: tuple[str, int] = ('127.0.0.1', 0), seed: int = 0):
        self.upstream = upstream
        self.seed = seed
        self._shapers: dict[str, Shaper] = {}
        self._conn_lock = threading.Lock()
        self._io_lock = threading.Lock()
        self._connections: set[_Connection] = set()
        self._closed = threading.Event()
        self._delays: dict[str, collections.deque] = {}
        self._lateness: dict[str, collections.deque] = {}
        self.set_link(link)
        self._listener = socket.create_server(listen, reuse_port=False)
        self._listener.settimeout(0.2)
        self.port = self._listener.getsockname()[1]
        self._acceptor = threading.Thread(target=self._accept, daemon=True,
                                          name='linkemu-accept')
        self._acceptor.start()

    def set_link(self, link: LinkConfig) -> None:
        """Apply ``link`` from now on: its schedules start now; data in flight keeps its times."""
        now = time.monotonic()
        self.link = link
        self._shapers = {'up': Shaper(link.up, now, self.seed),
                         'down': Shaper(link.down, now, self.seed + 1)}
        self._delays = {k: collections.deque(maxlen=HISTORY) for k in self._shapers}
        self._lateness = {k: collections.deque(maxlen=HISTORY) for k in self._shapers}
        self._io = {k: [0, 0, 0] for k in self._shapers}      # reads, writes, direct pieces

    def shaper(self, which: str) -> Shaper:
        return self._shapers[which]

    def note_delay(self, which: str, seconds: float) -> None:
        """Record the delay one piece was scheduled for, arrival to due delivery (forwarder)."""
        self._delays[which].append(seconds * 1e3)

    def note_lateness(self, which: str, seconds: float) -> None:
        """Record how late one piece was written after its due time (forwarder)."""
        self._lateness[which].append(seconds * 1e3)

    def note_io(self, which: str, reads: int = 0, writes: int = 0, direct: int = 0) -> None:
        """Count a forwarder's reads, writes and pieces written directly (see ``stats``)."""
        with self._io_lock:
            counts = self._io[which]
            counts[0] += reads
            counts[1] += writes
            counts[2] += direct

    def scheduled_delays_ms(self, which: str) -> list[float]:
        """
        Return, in order, each data piece's scheduled delay in ``which`` since ``set_link``.

        Arrival at the emulator to its due delivery time: bandwidth queueing,
        one-way delay, jitter and loss stalls as the emulator decided them,
        free of the noise of when threads actually woke (the last
        ``HISTORY`` pieces).
        """
        return list(self._delays[which])

    def write_lateness_ms(self, which: str) -> list[float]:
        """
        Return how late each data piece in ``which`` was written after its due time.

        Never negative (nothing leaves before the link would deliver it); the
        rest is scheduler noise, a few microseconds where a writer polls.
        """
        return list(self._lateness[which])

    def stats(self) -> dict:
        """
        Return bytes, loss stalls, reads and writes per direction since the last ``set_link``.

        ``up_reads``/``up_writes`` count the forwarder's socket calls;
        ``up_direct`` the pieces due when they were read and written by the
        reading thread itself, without a hand-off to the writer (likewise down).
        """
        return {'link': self.link.name, 'connections': len(self._connections),
                **{f'{k}_bytes': s.bytes for k, s in self._shapers.items()},
                **{f'{k}_losses': s.losses for k, s in self._shapers.items()},
                **{f'{k}_{n}': count for k, io in self._io.items()
                   for n, count in zip(('reads', 'writes', 'direct'), io)}}

    def _accept(self) -> None:
        while not self._closed.is_set():
            try:
                client, _ = self._listener.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            try:
                server = socket.create_connection(self.upstream, timeout=5)
            except OSError:
                client.close()
                continue
            for sock in (client, server):
                sock.settimeout(None)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            conn = _Connection(self, client, server)
            with self._conn_lock:
                self._connections.add(conn)
            conn.start()

    def forget(self, conn: _Connection) -> None:
        """Drop a closed connection from those ``close`` closes (the connection calls it)."""
        with self._conn_lock:
            self._connections.discard(conn)

    def close(self) -> None:
        """Stop accepting and close every connection."""
        self._closed.set()
        self._listener.close()
        self._acceptor.join(timeout=2)
        with self._conn_lock:
            connections = list(self._connections)
        for conn in connections:
            conn.close()

    def __enter__(self) -> 'LinkEmulator':
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
