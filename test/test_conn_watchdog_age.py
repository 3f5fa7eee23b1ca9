"""
The server's heartbeat allowance does not grow with a connection's age (r7 #6's server twin).

The connection watchdog (:mod:`rrto_server.conn_watchdog`) counts what libzmq
read from a connection and did not deliver; heartbeats (ZMTP PINGs) are read
and never delivered, so it allowed ``AGE_BYTES_PER_S`` for each second of the
connection's age, without end.  A peer that kept a connection open for hours
could then hold an unfinished message megabytes over the limit (3.7 MB after
8 h).  The watchdog's clock is injected: the tests move a connection's age
forward without waiting, and a raw ZMTP peer (NULL mechanism) sends the PINGs
an honest robot's libzmq would, as fast as the test needs them.
"""

from __future__ import annotations

import socket
import struct
import threading
import time

import pytest
import zmq

from bench.transport_hold import (MIB, closed_by_peer, part, read_frame, read_message,
                                  zmtp_connect)
from rrto_server.conn_watchdog import ConnectionWatchdog

HOUR_S = 3600.0
PING_CONTEXT = b'c' * 16     # the most a PING may carry: 25 bytes on the wire with NULL


class Ahead:
    """A monotonic clock that the test moves forward by ``offset`` seconds."""

    def __init__(self):
        self.offset = 0.0

    def __call__(self) -> float:
        return time.monotonic() + self.offset


class Served:
    """A ROUTER with a watchdog on ``clock``, served on its own thread: each message gets b'ok'."""

    def __init__(self, limit: int, clock: Ahead):
        ctx = zmq.Context.instance()
        self.router = ctx.socket(zmq.ROUTER)
        self.router.setsockopt(zmq.LINGER, 0)
        self.router.setsockopt(zmq.RCVHWM, 0)
        self.watchdog = ConnectionWatchdog(self.router, limit, 'tcp://127.0.0.1:0',
                                           clock=clock)
        self.router.bind('tcp://127.0.0.1:0')
        self.endpoint = self.router.last_endpoint.decode()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        poller = zmq.Poller()
        for sock in self.watchdog.sockets:
            poller.register(sock, zmq.POLLIN)
        poller.register(self.router, zmq.POLLIN)
        while not self._stop.is_set():
            for frames in self.watchdog.drain(dict(poller.poll(20))):
                self.router.send_multipart([frames[0], b'ok'])

    def snapshot(self) -> dict:
        """Return the watchdog's counters."""
        return self.watchdog.snapshot()

    def close(self) -> None:
        """Stop serving; close the watchdog and the socket."""
        self._stop.set()
        self._thread.join(5)
        self.watchdog.close()
        self.router.close(linger=0)


def ping(count: int) -> bytes:
    """Return ``count`` ZMTP PING commands (TTL 0, a 16-byte context): libzmq answers each."""
    body = b'\x04PING' + struct.pack('>H', 0) + PING_CONTEXT
    return (b'\x04' + bytes([len(body)]) + body) * count


def ask(sock: socket.socket) -> None:
    """Send one complete message and read its answer (the server's PONGs skipped)."""
    sock.sendall(part(b'hello', more=False))
    assert read_message(sock) == [b'ok']


def hold(sock: socket.socket, parts: int, nbytes: int = 256 << 10) -> int:
    """Send ``parts`` parts of ``nbytes`` flagged MORE, 20 ms apart; return those sent."""
    sent = 0
    try:
        for _ in range(parts):
            sock.sendall(part(b'\0' * nbytes))
            sent += 1
            time.sleep(0.02)
    except OSError:
        pass                                   # cut off
    return sent


def test_an_old_connection_holds_no_more_of_an_unfinished_message_than_a_young_one():
    # 1 MiB limit: the allowance is 1.25 MiB on a new connection; 8 h on, it was 4.8 MiB,
    # so 4 MiB of a message without its last part stayed in the server.  Both are cut now
    clock = Ahead()
    served = Served(MIB, clock)
    try:
        for age_s in (0.0, 8 * HOUR_S):
            sock = zmtp_connect(served.endpoint)
            try:
                ask(sock)                          # accepted and counted
                clock.offset += age_s
                sent = hold(sock, 16)
                assert closed_by_peer(sock, 10.0), (
                    f'a connection {age_s / HOUR_S:.0f} h old still holds {sent} parts of '
                    f'256 KiB of an unfinished message: {served.snapshot()}')
            finally:
                sock.close()
        assert served.snapshot()['cut'] == 2
    finally:
        served.close()


def test_a_busy_connection_is_not_cut_for_its_heartbeats_however_long_it_lives():
    # 64 KiB limit: 3 h of a CURVE robot's PINGs (84 bytes a second, 907 KB) are far over
    # the allowance with its credit capped (64 KiB + 256 KiB + 307 KB).  A request every
    # 5 min lets the watchdog measure what the PINGs took; the connection is never cut,
    # and it still cannot hold an unfinished message over its allowance
    clock = Ahead()
    served = Served(64 << 10, clock)
    try:
        sock = zmtp_connect(served.endpoint)
        try:
            ask(sock)
            sock.sendall(ping(1))
            assert read_frame(sock) == (0x04, b'\x04PONG' + PING_CONTEXT)   # a heartbeat
            for period in range(1, 37):
                clock.offset += 300.0
                try:
                    sock.sendall(ping(300 * 84 // len(ping(1))))   # 5 min of them
                    time.sleep(0.15)           # the watchdog looks meanwhile
                    ask(sock)
                except (ConnectionError, OSError):
                    pytest.fail(f'a robot cut for its heartbeats after {period * 5} min: '
                                f'{served.snapshot()}')
            snapshot = served.snapshot()
            assert snapshot['cut'] == 0, f'a robot cut for its heartbeats: {snapshot}'
            assert snapshot['most_held'] < (64 << 10) + (256 << 10), snapshot
            sent = hold(sock, 16, 64 << 10)
            assert closed_by_peer(sock, 10.0), (
                f'{sent} parts of 64 KiB of an unfinished message held after 3 h')
        finally:
            sock.close()
    finally:
        served.close()


def test_a_message_partial_while_the_base_is_measured_is_not_taken_for_heartbeats():
    # a peer keeps part of a message waiting whenever the watchdog measures, finishes it
    # just after, and starts the next one at once, larger.  Had the base been what was
    # read and not delivered once a message came, each round would credit the partial
    # and it would grow by that much a round; it is cut once over 64 KiB + 256 KiB + 307 KB
    clock = Ahead()
    served = Served(64 << 10, clock)
    step = 200 << 10
    try:
        sock = zmtp_connect(served.endpoint)
        try:
            ask(sock)
            sock.sendall(part(b'\0' * step))
            rounds = 0
            for rounds in range(1, 9):
                clock.offset += 700.0          # a measurement is due
                time.sleep(0.2)                # it reads, with the partial held
                try:
                    sock.sendall(part(b'', more=False) + part(b'\0' * step * (rounds + 1)))
                except OSError:
                    break
                time.sleep(0.2)
                if served.snapshot()['cut']:
                    break
            assert closed_by_peer(sock, 10.0), f'not cut: {served.snapshot()}'
            assert rounds <= 4, f'{rounds * step} bytes of a partial message held'
        finally:
            sock.close()
    finally:
        served.close()
