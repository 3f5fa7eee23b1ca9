"""
What a ZeroMQ peer's messages cost on the wire, and what the kernel received of them.

libzmq checks ``ZMQ_MAXMSGSIZE`` per message *part*, and keeps every part of a
multipart message until the last one arrives: a size check on a delivered
message comes after the bytes were buffered.  Both sides therefore bound what
a peer makes them hold where the bytes arrive: the bytes the kernel received
on a TCP connection (``TCP_INFO.tcpi_bytes_received``, less what still waits
in its queue, ``FIONREAD``) against the messages delivered from it, counted as
they were on the wire.  The server's :mod:`rrto_server.conn_watchdog` and the
robot's :mod:`rrto_ros.reply_guard` share these numbers.
"""

from __future__ import annotations

import fcntl
import socket
import struct
import termios
from typing import Any, Sequence

SLACK_BYTES = 256 << 10      # handshake, frame headers of a partial message, one socket read
AGE_BYTES_PER_S = 128        # heartbeats: a CURVE PING is 42 bytes (the robot sends 2 a second)
CURVE_BOX_BYTES = 33         # a CURVE MESSAGE: command name 8, nonce 8, MAC 16, flags 1
_TCPI_BYTES_RECEIVED = 128   # offset of tcpi_bytes_received (u64) in struct tcp_info (4.1+)


def received(sock: socket.socket) -> int:
    """Return the bytes the kernel has received on the TCP connection ``sock``."""
    info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 256)
    return struct.unpack_from('=Q', info, _TCPI_BYTES_RECEIVED)[0]


def queued(sock: socket.socket) -> int:
    """Return the bytes received on ``sock`` that its reader (libzmq) has not read yet."""
    data = fcntl.ioctl(sock.fileno(), termios.FIONREAD, b'\0\0\0\0')
    return struct.unpack('i', data)[0]


def wire_size(frames: Sequence[Any], box: int) -> int:
    """
    Return the bytes ``frames`` took on the wire (ZMTP 3 framing).

    ``box`` is ``CURVE_BOX_BYTES`` on a CURVE connection (each frame goes in a
    MESSAGE box), else 0.  A frame's header is 2 bytes under 256, else 9.
    """
    wire = 0
    for frame in frames:
        n = len(frame) + box
        wire += n + (2 if n < 256 else 9)
    return wire


def allowance(limit: int, age_s: float) -> int:
    """Return the bytes a connection may hold unread: one ``limit`` message, slack, heartbeats."""
    return int(limit + SLACK_BYTES + AGE_BYTES_PER_S * age_s)
