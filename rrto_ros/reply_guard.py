"""
Stop reading a reply that grows past what its call can get (a13 #2).

libzmq holds every part of a multipart message until the last one arrives and bounds only
each part (``ZMQ_MAXMSGSIZE``, :data:`rrto_wire.limits.MAX_REPLY_PART_BYTES` on every robot
socket), so a server, a fleet replica or a proxy on an unkeyed link made the robot buffer
1.7 GB before :mod:`rrto_ros.reply_check` saw a byte.  The robot knows, before it sends, how
large a legitimate reply can be: the outputs the call expects (their sizes, a data-dependent
size at the bound export proved), else :data:`~rrto_wire.limits.MAX_REPLY_BYTES` for a call
with tensors in its reply, else a header (:func:`reply_limit`).

:class:`ReplyGuard` watches a DEALER's one TCP connection (its descriptor from the socket's
monitor, ``ZMQ_EVENT_CONNECTED``): what libzmq has read from the kernel (``TCP_INFO`` less
``FIONREAD``, :mod:`rrto_wire.wire_bytes`) since the guard's first look at that connection,
less the messages delivered since (as they were on the wire), is what the robot holds and
has not been handed.  It looks every ``CHECK_S`` of a call's wait past the first
(:func:`wait_any`), and every ``CHECK_S`` while no call holds the socket
(:meth:`ReplyGuard.watch_idle`: a server that answered can stream an unfinished message
between calls, a14 #3).  Past the bound (plus the slack and heartbeats the server allows too)
the socket is dropped, which frees what libzmq holds: a waiting call fails with
``bad_reply`` (it runs locally), the next call reconnects.  Bytes are read for at most
``CHECK_S`` before they are looked at: at most the link's bytes of two periods over the
bound (10 MB at 100 MB/s).  A call answered within ``CHECK_S`` costs a sum over its frames; a
longer one a wake and two socket options per ``CHECK_S``, on one duplicate of libzmq's
descriptor per wait (issue 11), not woken by arrivals, whose readiness libzmq's own reader
takes first (r15).  A duplicate is held only while a wait or a look lasts, and let go of once
the monitor reports the connection gone (r5 B4).

The unfinished message may answer any request still owed a reply on that socket, not only
the call that waits: one cancelled, or a hedge's slower copy, answers later (r5 B5).  So the
bound is the largest among the requests sent and not yet answered (:meth:`ReplyGuard.sent`,
:meth:`ReplyGuard.delivered`), the last ``OWED`` of them; dropping the socket forgets them
all.  :func:`wait_any` is the one waiting loop of the client and the hedge.  Between calls the
watcher first receives and discards the complete replies waiting (cancelled calls', a slower
replica's copies: no call waits for them), so only an unfinished message counts as held (r7
#3).

Heartbeats (the server's PONGs) are read and never delivered, so what a connection holds
grows by them for as long as it lives, and the allowance grows with the mark's age
(``AGE_BYTES_PER_S``).  A server can send parts of a message in their place, so that credit
is capped at ``MAX_AGE_S`` of age, and the watcher replaces a connection older than
``RENEW_S`` between calls (a fresh connection, a fresh mark; no call waits on it then): an
honest link is renewed long before its heartbeats outgrow the allowance, and a hostile one
gains at most ``AGE_BYTES_PER_S x MAX_AGE_S`` (300 KB) over the bound, not 3.7 MB a day (r7
#6).  The watch thread holds its owner (client or hedge) weakly: one dropped without
``close()`` is collected, and its thread closes what it left and ends (r7 #7).
"""

from __future__ import annotations

import logging
import os
import select
import socket
import struct
import threading
import time
import weakref
from typing import Any, Callable, Sequence

import zmq

from rrto_ros import reply_check
from rrto_wire import replies
from rrto_wire.errors import ProtocolError
from rrto_wire.limits import MAX_PROBE_BYTES, MAX_REPLY_BYTES, reply_bytes
from rrto_wire.messages import Kind
from rrto_wire.wire_bytes import allowance, CURVE_BOX_BYTES, queued, received, wire_size

log = logging.getLogger(__name__)

CHECK_S = 0.05
CHECK_MS = CHECK_S * 1e3
OWED = 128         # requests remembered without a reply (their bound), per socket: a hedge
#                    replica may have HEDGE_QUEUE = OWED // 2 queued and as many in its server
RENEW_S = 600.0    # a connection older than this is replaced between calls (its heartbeats)
MAX_AGE_S = 4 * RENEW_S    # the heartbeat allowance grows no further (a busy socket not renewed)
_EVENT = struct.Struct('=HI')
_EVENTS = zmq.EVENT_CONNECTED | zmq.EVENT_DISCONNECTED | zmq.EVENT_CLOSED
_TENSOR_REPLIES = {Kind.INFER: MAX_REPLY_BYTES, Kind.OP: MAX_REPLY_BYTES,
                   Kind.PROBE: MAX_PROBE_BYTES}


def connect(sock: zmq.Socket, endpoint: str, guarded: bool = True,
            curve: bool = False) -> ReplyGuard | None:
    """
    Connect ``sock`` to ``endpoint``, with a guard made first (its monitor sees the connection).

    If the connection cannot be made (a malformed endpoint, perhaps from a fleet
    directory), the guard and the socket are closed before the error goes up: a
    caller that retries leaks neither (r5 B6).
    """
    guard = ReplyGuard(sock, curve) if guarded else None
    try:
        sock.connect(endpoint)
    except Exception:
        if guard is not None:
            guard.close(sock)
        sock.close(linger=0)
        raise
    return guard


def reply_limit(kind: Kind, expect: Sequence[reply_check.Leaf] | None) -> int:
    """Return the most bytes on the wire a legitimate reply to this call takes."""
    most = reply_check.most_bytes(expect) if expect is not None else None
    if most is None:
        most = _TENSOR_REPLIES.get(kind, 0)
    return reply_bytes(most)


def reply_id(frame: Any) -> Any:
    """Return the request id a reply header names (None: none readable), of any kind."""
    try:
        return replies.decode_reply(frame, None).id    # an error reply; else its id, peeked
    except ProtocolError as exc:
        return exc.request_id


def wait_any(poller: zmq.Poller, guards: dict[zmq.Socket, 'ReplyGuard'], deadline: float
             ) -> tuple[list[zmq.Socket], dict[zmq.Socket, int]]:
    """
    Wait until a socket of ``poller`` has a message, a reply outgrows its bound, or ``deadline``.

    Every socket of ``poller`` has its guard in ``guards``.  Returns the sockets
    with a message, and the sockets holding more of an unfinished reply than
    any request they owe can get (the bytes held); both are empty once the
    deadline has passed.  A message before the guards' next look is due
    (``CHECK_S`` after a call's request was sent, then ``CHECK_S`` after each
    look) is waited for with one poll and nothing looked at; past it every
    connection is looked at every ``CHECK_S``, however many messages came
    between (:func:`_wait_looking`): a hedge's caller waits again after each
    stale reply, so a replica answering stale replies every 30 ms kept its
    twin's unfinished reply from ever being looked at (r15: 96 MiB over a
    hello's 4 s).
    """
    now = time.monotonic()
    if now >= deadline:
        return [], {}
    due = min([guard._due for guard in guards.values()])
    if now < due:
        ready = [sock for sock, _ in zmq.zmq_poll(poller.sockets,
                                                  int((min(deadline, due) - now) * 1e3))]
        if ready or deadline <= due:
            return ready, {}
    epoll = select.epoll()
    try:
        return _wait_looking(epoll, guards, deadline)
    finally:
        for guard in guards.values():
            guard._rest()          # no duplicate outlives the wait (r5 B4)
        epoll.close()


def _wait_looking(epoll: select.epoll, guards: dict[zmq.Socket, 'ReplyGuard'], deadline: float
                  ) -> tuple[list[zmq.Socket], dict[zmq.Socket, int]]:
    """
    Look at each guard's connection now and every ``CHECK_S`` until a message or the deadline.

    One ``epoll`` takes each socket's and monitor's ``ZMQ_FD`` (their events read
    when it signals, its edge contract): a message ends the wait at once, a
    connection made or lost is taken (and looked at) at once, the duplicate of a
    lost one closed (r5 B4).  A connection's duplicate is kept for the wait, so
    a look is two socket options (issue 11).  The looks are timed, never woken
    by bytes arriving: the kernel reports a descriptor ready as it stands when
    the waiter collects the event, and libzmq's I/O thread, woken by the same
    bytes, has often read them by then, so a wait woken by arrivals slept on
    while a server trickled a reply past its bound (r15: 9 to 22 of 40 paced
    arrivals woke it with the robot's cores busy).
    """
    socks, monitors = {}, {}
    for sock, guard in guards.items():
        sock_fd, monitor_fd = guard._fds
        socks[sock_fd], monitors[monitor_fd] = sock, guard
        epoll.register(sock_fd, select.EPOLLIN)
        epoll.register(monitor_fd, select.EPOLLIN)
    signalled, changed, due = list(guards), list(guards.values()), 0.0
    while True:
        for guard in changed:                 # connections made or lost: taken at once
            guard._take_events()
        now, over = time.monotonic(), {}
        if changed or now >= due:             # before the messages: they cannot put it off
            due = now + CHECK_S
            for sock, guard in guards.items():
                held = guard._over()
                if held is not None:
                    over[sock] = held
                guard._due = due
        ready = [sock for sock in signalled
                 if sock not in over and sock.get(zmq.EVENTS) & zmq.POLLIN]
        if ready or over:
            return ready, over
        if now >= deadline:
            return [], {}
        signalled, changed = [], []
        for fd, _ in epoll.poll(min(deadline, due) - now):
            if fd in socks:
                signalled.append(socks[fd])
            else:
                changed.append(monitors[fd])


class ReplyGuard:
    """The bytes a DEALER's connection has read and not delivered (``curve``: boxed frames)."""

    def __init__(self, sock: zmq.Socket, curve: bool = False,
                 clock: Callable[[], float] = time.monotonic):
        self._sock = sock
        self._clock = clock
        self._box = CURVE_BOX_BYTES if curve else 0
        self._monitor = sock.get_monitor_socket(_EVENTS)
        self._replies = zmq.Poller()            # one per socket, not one built per wait
        self._replies.register(sock, zmq.POLLIN)
        self._fds = (sock.get(zmq.FD), self._monitor.get(zmq.FD))      # a long wait's signals
        self._target: tuple[int, int] | None = None  # libzmq's descriptor and its peer port
        self._conn: socket.socket | None = None  # its duplicate, while a wait or a look lasts
        self._owed: dict[int, tuple] = {}        # request id -> (kind, expect), sent order
        self._mark: tuple[int, float] | None = None  # read at the first look, and when
        self._delivered = 0                      # wire bytes delivered since the mark
        self._closed = threading.Event()
        self._due = 0.0         # when a call's wait looks next (time.monotonic)

    def sent(self, request_id: int, kind: Kind,
             expect: Sequence[reply_check.Leaf] | None) -> None:
        """Note a request sent on the socket: a reply to ``kind`` expecting ``expect`` is owed."""
        self._owed[request_id] = (kind, expect)
        now = time.monotonic()
        if self._due <= now:        # its wait looks CHECK_S from now, then every CHECK_S
            self._due = now + CHECK_S
        if len(self._owed) > OWED:
            del self._owed[next(iter(self._owed))]    # never answered: forget the oldest

    def wait(self, deadline: float) -> tuple[bool, int | None]:
        """Wait for a message on the socket; return (one came, bytes held past the bound)."""
        now = time.monotonic()      # wait_any's first poll made here: fewer steps (issue 11)
        if now < deadline and now < self._due:
            if zmq.zmq_poll(self._replies.sockets, int((min(deadline, self._due) - now) * 1e3)):
                return True, None
            if deadline <= self._due:
                return False, None
        ready, over = wait_any(self._replies, {self._sock: self}, deadline)
        return bool(ready), over.get(self._sock)

    def delivered(self, frames: Sequence, reply_id: int | None = None) -> None:
        """Note a delivered message (the reply to ``reply_id``, if it named a request)."""
        self._owed.pop(reply_id, None)
        self._delivered += wire_size(frames, self._box)

    def held(self) -> int | None:
        """Return the bytes read and not delivered since the first look (None: no connection)."""
        self._take_events()
        try:
            return self._held()
        finally:
            self._rest()

    def _held(self) -> int | None:
        read = self._read()
        if read is None:
            return None
        if self._mark is None:
            self._mark, self._delivered = (read, self._clock()), 0
        return read - self._mark[0] - self._delivered

    def age(self) -> float:
        """Return the seconds since the connection's first look (0.0 before it)."""
        return 0.0 if self._mark is None else self._clock() - self._mark[1]

    def over(self) -> int | None:
        """Return the bytes held past the bound (when no message waits), or None."""
        self._take_events()
        try:
            return self._over()
        finally:
            self._rest()

    def _over(self) -> int | None:
        held = self._held()
        if held is None or held <= allowance(self.bound(), min(self.age(), MAX_AGE_S)):
            return None
        return held

    def bound(self) -> int:
        """Return the most bytes on the wire of one reply to a request the socket owes."""
        return max([reply_limit(*call) for call in self._owed.values()],
                   default=reply_limit(Kind.HELLO, None))    # owed nothing: a header at most

    def watch_idle(self, lock: threading.Lock, drop: Callable[..., None], *args: Any) -> None:
        """
        Look every ``CHECK_S`` while ``lock`` is free (no call holds the socket).

        ``drop``, a method of the socket's owner, is held weakly: the thread ends
        when the owner is collected (closing the socket it left) or the guard closed.
        First the complete messages waiting are received and discarded (no call waits
        for them); then past the bound, or for a connection older than ``RENEW_S``,
        ``drop(*args)`` (called with ``lock`` held) closes the socket.  A call that
        holds ``lock`` looks itself while it waits, from the same mark.
        """
        threading.Thread(target=self._watch_idle, args=(lock, weakref.WeakMethod(drop), args),
                         daemon=True, name='rrto-reply-guard').start()

    def _watch_idle(self, lock: threading.Lock, owner: weakref.WeakMethod, args: tuple) -> None:
        while not self._closed.wait(CHECK_S):
            drop = owner()
            if drop is None:                       # the owner is gone without close():
                self.close(self._sock)             # close the socket it left
                self._sock.close(linger=0)
                return
            if lock.acquire(blocking=False):       # else a call holds the socket: it looks
                try:
                    if not self._closed.is_set():
                        self._look_idle(drop, args)
                finally:
                    lock.release()
            del drop

    def _look_idle(self, drop: Callable[..., None], args: tuple) -> None:
        for _ in range(OWED):                      # replies no call waits for: delivered
            if not self._replies.poll(0):
                break
            try:
                frames = self._sock.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                break
            self.delivered(frames, reply_id(frames[0]))
        held = self.over()
        if held is not None:
            log.warning('%d bytes arrived between calls, more than any request owed '
                        'on the socket can get: dropped the connection', held)
            drop(*args)
        elif self.age() > RENEW_S:                 # its heartbeats count as held: renew it
            log.debug('replacing a connection after %.0f s (a fresh mark)', self.age())
            drop(*args)

    def _take_events(self) -> None:
        """Take the monitor's events: connects and disconnects in order, the descriptor current."""
        while self._monitor.get(zmq.EVENTS) & zmq.POLLIN:     # no exception when none
            event, endpoint = self._monitor.recv_multipart(zmq.NOBLOCK)
            kind, fd = _EVENT.unpack_from(event)
            if kind == zmq.EVENT_CONNECTED or (self._target and self._target[0] == fd):
                self._target = self._mark = None         # a new connection: a new mark
                self._rest()                             # libzmq closes it: so does the guard
            if kind == zmq.EVENT_CONNECTED:
                try:
                    self._target = (fd, int(endpoint.rsplit(b':', 1)[1]))
                except (ValueError, IndexError):
                    pass

    def _read(self) -> int | None:
        """Return what libzmq has read from the current connection (None: no connection)."""
        if self._conn is None and not self._duplicate():
            return None
        try:
            return received(self._conn) - queued(self._conn)
        except OSError:
            self._rest()
            return None                          # closed: the call times out or reconnects

    def _duplicate(self) -> bool:
        """Duplicate libzmq's descriptor of the connection; return False where there is none."""
        if self._target is None:
            return False
        fd, port = self._target
        try:
            dup = os.dup(fd)
        except OSError:
            self._target = None
            return False
        try:
            conn = socket.socket(fileno=dup)
        except OSError:            # no longer a socket: the number was closed and reused
            os.close(dup)
            self._target = None
            return False
        try:       # the number may name another socket by now: it must be this peer's
            if conn.getpeername()[1] == port:
                self._conn = conn
                return True
        except (OSError, IndexError, TypeError):
            pass                                 # closed: the call times out or reconnects
        conn.close()
        return False

    def _rest(self) -> None:
        """Close the duplicate: one kept open would hold the TCP connection (r5 B4)."""
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def close(self, sock: zmq.Socket) -> None:
        """Stop watching ``sock`` (before it is closed)."""
        self._closed.set()
        self._rest()
        try:
            sock.disable_monitor()
        except zmq.ZMQError:
            pass
        self._monitor.close(linger=0)
