"""
One accepted connection as the connection watchdog sees it, and what its heartbeats took.

:mod:`rrto_server.conn_watchdog` counts what libzmq read from a connection and
did not deliver.  A peer's heartbeats (ZMTP PINGs: 9 bytes each, 42 with
CURVE; our robots send two a second, ``rrto_ros.client``; the server sets no
heartbeat of its own) are read and never delivered, so they count as held, for
as long as the connection lives.  The allowance credited them
``AGE_BYTES_PER_S`` for each second of the connection's age, without end, so
an old connection could hold that much more of an unfinished message (3.7 MB
after 8 h: r7 #6's server twin).

By the bytes alone, a peer that delivers nothing and sends PINGs cannot be
told from one that sends, at the same pace, the parts of a message it never
finishes: one of them must be cut.  So the credit stops at ``MAX_AGE_S`` (at
most 307 KB over ``limit`` + slack), counted from the connection's *base*:
bytes that heartbeats took, at most, by the time ``since``.  Every
``REBASE_S`` the watchdog measures the base again (:class:`Base`): it reads
what libzmq has read (``read``), then asks the I/O thread for a proof that
the socket was empty after that (no complete message waiting, the token of
the watchdog's cut), and waits for the connection's next message delivered
after the proof.  The message partial at the reading, if any, was then not
complete at the proof, so it is that message or came before it: delivered by
now.  So ``read`` less everything delivered by now is at most what heartbeats
took by the reading, and a larger value than the base becomes the base.  No
unfinished message is ever counted as heartbeats; a connection that delivers
something every ``REBASE_S`` keeps a base a few messages behind its
heartbeats, and is never cut for them however long it lives.  One that
delivers nothing for hours is cut once its heartbeats pass the allowance:
84 bytes a second (a CURVE robot) take 5.3 h to pass a 1 MiB limit's, 9 days
a 64 MiB one's; the robot renews a connection idle for 600 s long before
(``rrto_ros.reply_guard.RENEW_S``).
"""

from __future__ import annotations

import socket
import time
from typing import Any

from rrto_wire.wire_bytes import allowance

MAX_AGE_S = 2400.0       # heartbeats are credited for this long at most (307 KB)
REBASE_S = 600.0         # a connection's base is measured again this often


class Base:
    """What heartbeats took of a connection's bytes by ``since`` (``bytes``, at most)."""

    __slots__ = ('bytes', 'since', 'looked', 'pending')

    def __init__(self, born: float):
        self.bytes = 0
        self.since = born
        self.looked = born       # when the last measurement began
        self.pending: tuple | None = None    # (token, read, asked at, messages at the proof)

    def allowance(self, limit: int, now: float) -> int:
        """Return the bytes the connection may hold over its base at ``now``."""
        return allowance(limit, min(now - self.since, MAX_AGE_S))

    def due(self, now: float) -> bool:
        """Return True if a measurement should begin at ``now``."""
        return now - self.looked > REBASE_S

    def begin(self, token: int, read: int, now: float) -> None:
        """Begin a measurement: libzmq had read ``read`` bytes before ``token`` was sent."""
        self.pending = (token, read, time.monotonic(), None)
        self.looked = now

    def settle(self, conn: Any, proof: tuple[int, int], wait_s: float) -> int:
        """
        Take a measurement under way a step on; return a token given up on, else 0.

        ``proof`` is the newest token proven by an empty socket and the messages
        received by then; ``conn`` has ``last`` (the number of its last message)
        and ``delivered`` (its wire bytes), set by the I/O thread in that order.
        """
        if self.pending is None:
            return 0
        token, read, asked, after = self.pending
        proven, seq = proof
        if after is None and proven >= token:
            self.pending = (token, read, asked, seq)
        elif after is None and time.monotonic() - asked > wait_s:
            self.pending = None          # a busy socket: no proof this time
            return token
        elif after is not None and conn.last > after:     # its next message came:
            base = read - conn.delivered                   # read after ``last``
            if base > self.bytes:
                self.bytes, self.since = base, self.looked
            self.pending = None
        return 0


class Connection:
    """One accepted connection: its duplicate descriptor and the bytes delivered from it."""

    __slots__ = ('sock', 'delivered', 'base', 'last', 'named', 'cut')

    def __init__(self, sock: socket.socket | None, born: float):
        self.sock = sock             # None: a unix socket of a trusted user (not watched)
        self.delivered = 0
        self.base = Base(born)
        self.last = 0                # the number of its last message among all received
        self.named = False           # it sent a routing id the server did not give it
        self.cut = False
