"""
What a peer that never finishes a multipart message makes the server hold (a11 #1), and the cost.

An in-process CPU server on loopback per case; a raw ZMTP 3.0 client (NULL
mechanism, a plain TCP socket: libzmq on the sending side would hold the
partial message itself) sends one header part and then parts flagged MORE,
never the last one, as fast as loopback takes them.  Per case: the parts sent
before the server cut the connection off, the server's peak RSS growth
(sampled while sending) and its growth once the cut settled.  Empty parts in
ZMTP's short form are 2 bytes on the wire but cost libzmq a 64-byte ``msg_t``
each: the worst case per byte.  Then the connection watchdog's own cost: per
message on the I/O thread (:meth:`ConnectionWatchdog.received`) and per period
on its thread (:meth:`ConnectionWatchdog.over_allowance`, 64 connections).

The raw ZMTP helpers are also what ``test/test_security_transport.py`` attacks with.

Usage: ``python -m bench.transport_hold --out docs/results/transport_hold.json``
"""

from __future__ import annotations

import argparse
import ctypes
import json
import socket
import statistics
import struct
import tempfile
import time

import zmq

from bench.machine import write_results

MIB = 1 << 20


def _trim_heap() -> None:
    """Hand freed heap back to the system (glibc), so RSS counts what is still held."""
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):
        pass                                            # not glibc: RSS as it is


def rss_mib() -> float:
    """
    Return this process's resident set size in MiB, after freed heap went back.

    glibc keeps freed 1 MiB blocks in its arenas once its mmap threshold has grown, so
    without the trim RSS also counts memory nobody holds, by an amount that depends on
    what the process allocated before.
    """
    _trim_heap()
    with open('/proc/self/status') as status:
        for line in status:
            if line.startswith('VmRSS:'):
                return int(line.split()[1]) / 1024
    raise RuntimeError('no VmRSS')


def zmtp_connect(endpoint: str) -> socket.socket:
    """Open a raw ZMTP 3.0 connection (NULL mechanism, a DEALER) to a tcp:// endpoint."""
    host, port = endpoint.removeprefix('tcp://').rsplit(':', 1)
    return zmtp_handshake(socket.create_connection((host, int(port)), timeout=10))


def zmtp_handshake(sock: socket.socket, socket_type: bytes = b'DEALER') -> socket.socket:
    """Greet as a ZMTP 3.0 ``socket_type`` with the NULL mechanism on a connected socket."""
    as_server = b'\x01' if socket_type == b'ROUTER' else b'\0'
    sock.sendall(b'\xff' + b'\0' * 8 + b'\x7f' + b'\x03\x00' + b'NULL'.ljust(20, b'\0')
                 + as_server + b'\0' * 31)
    greeting = b''
    while len(greeting) < 64:
        chunk = sock.recv(64 - len(greeting))
        if not chunk:
            raise ConnectionError('closed during the greeting')
        greeting += chunk
    body = b'\x05READY' + b'\x0bSocket-Type' + struct.pack('>I', len(socket_type)) + socket_type
    sock.sendall(b'\x04' + bytes([len(body)]) + body)
    return sock


def part(data: bytes, more: bool = True) -> bytes:
    """Return one ZMTP message frame carrying ``data`` (short form up to 255 bytes)."""
    flags = 0x01 if more else 0
    if len(data) < 256:
        return bytes([flags, len(data)]) + data
    return bytes([flags | 0x02]) + struct.pack('>Q', len(data)) + data


def read_frame(sock: socket.socket) -> tuple[int, bytes]:
    """Read the next frame (flags and body; a command has flag 0x04) from a raw ZMTP connection."""
    def exactly(n: int) -> bytes:
        data = b''
        while len(data) < n:
            chunk = sock.recv(n - len(data))
            if not chunk:
                raise ConnectionError('closed')
            data += chunk
        return data

    flags = exactly(1)[0]
    return flags, exactly(struct.unpack('>Q', exactly(8))[0] if flags & 0x02 else exactly(1)[0])


def read_message(sock: socket.socket) -> list[bytes]:
    """Read the next message's frames from a raw ZMTP connection (commands skipped)."""
    frames = []
    while True:
        flags, body = read_frame(sock)
        if flags & 0x04:
            continue              # a command (the server's READY)
        frames.append(body)
        if not flags & 0x01:
            return frames


def closed_by_peer(sock: socket.socket, timeout_s: float) -> bool:
    """Return True once the peer has closed or reset the connection (False on timeout)."""
    deadline = time.monotonic() + timeout_s
    sock.settimeout(0.2)
    while time.monotonic() < deadline:
        try:
            if sock.recv(1 << 16) == b'':
                return True
        except socket.timeout:
            continue
        except OSError:
            return True
    return False


def hold_parts(endpoint: str, first: bytes, nbytes: int, count: int, pace_s: float = 0.0,
               per_send: int = 1) -> tuple[socket.socket, int, float]:
    """
    Send ``first`` then ``count`` parts of ``nbytes``, all flagged MORE, never the last one.

    ``per_send`` parts go in one ``sendall``, ``pace_s`` apart (0: as fast as
    loopback takes them).  Return the connection, how many parts went out before
    the peer cut it off, and the largest RSS (MiB) seen meanwhile.
    """
    sock = zmtp_connect(endpoint)
    chunk = part(b'\0' * nbytes) * per_send
    sent, peak = 0, rss_mib()
    try:
        sock.sendall(part(first))
        while sent < count:
            sock.sendall(chunk)
            sent += per_send
            peak = max(peak, rss_mib())
            if pace_s:
                time.sleep(pace_s)
    except OSError:
        pass                      # cut off (reset or broken pipe)
    return sock, sent, peak


def attack(limit_mb: float, nbytes: int, count: int, per_send: int) -> dict:
    """Run one case against a fresh in-process server; return its row."""
    from rrto_server.options import ServerConfig
    from rrto_server.server import Server
    from rrto_wire.hello import hello
    with tempfile.TemporaryDirectory() as store:
        server = Server(ServerConfig(bind='tcp://127.0.0.1:0', store=store, device='cpu',
                                     max_message_bytes=int(limit_mb * MIB)))
        server.start()
        try:
            hello(server.endpoint, timeout_ms=10000)
            baseline = rss_mib()
            start = time.monotonic()
            header = json.dumps({'v': 2, 'kind': 'hello', 'id': 1}).encode()
            sock, sent, peak = hold_parts(server.endpoint, header, nbytes, count,
                                          per_send=per_send)
            closed = closed_by_peer(sock, 20.0)
            cut_s = time.monotonic() - start
            time.sleep(3.0)             # the watchdog trims the heap 0.25 s and 2 s after
            sock.close()
            return {'limit_mb': limit_mb, 'part_bytes': nbytes, 'parts_offered': count,
                    'parts_sent': sent, 'wire_mb_sent': round(sent * len(part(b'\0' * nbytes))
                                                              / MIB, 1),
                    'closed': closed, 'cut_after_s': round(cut_s, 2),
                    'peak_growth_mib': round(peak - baseline, 1),
                    'settled_growth_mib': round(rss_mib() - baseline, 1),
                    'others_served': hello(server.endpoint, timeout_ms=10000) is not None,
                    'transport': server.snapshot()['transport']}
        finally:
            server.close()


def costs(calls: int = 20000) -> dict:
    """Return the watchdog's cost per message, per poll and per period (64 connections)."""
    from rrto_server.conn_watchdog import ConnectionWatchdog
    ctx = zmq.Context()
    router = ctx.socket(zmq.ROUTER)
    watchdog = ConnectionWatchdog(router, 64 * MIB, 'tcp://127.0.0.1:0')
    router.bind('tcp://127.0.0.1:0')
    dealers = [ctx.socket(zmq.DEALER) for _ in range(64)]
    try:
        for dealer in dealers:
            dealer.connect(router.last_endpoint.decode())
            dealer.send_multipart([b'h' * 60, b'x' * 150528])     # a camera frame's request
        for _ in dealers:
            router.recv_multipart(copy=False)
        poller = zmq.Poller()
        for sock in watchdog.sockets:
            poller.register(sock, zmq.POLLIN)
        watchdog.drain(dict(poller.poll(1000)))       # every connection known

        def best_us(call, n: int) -> float:
            runs = []
            for _ in range(5):
                start = time.perf_counter()
                for _ in range(n):
                    call()
                runs.append((time.perf_counter() - start) / n * 1e6)
            return round(min(runs), 3)

        def per_message_us(receive, n: int = 2000) -> float:    # n small requests queued
            for _ in range(n):
                dealers[0].send_multipart([b'h' * 60, b'x' * 64])
            time.sleep(0.2)                                  # all in the router's pipe
            got, start = 0, time.perf_counter()
            while got < n:
                got += len(receive())
            return (time.perf_counter() - start) / n * 1e6

        def receive_all() -> list:                     # the I/O loop without a watchdog
            batch = []
            while True:
                try:
                    batch.append(router.recv_multipart(zmq.NOBLOCK, copy=False))
                except zmq.Again:
                    return batch

        ready = {router: zmq.POLLIN}
        plain, watched = [], []
        for _ in range(7):                             # interleaved, best of each
            plain.append(per_message_us(receive_all))
            watched.append(per_message_us(lambda: watchdog.drain(ready)))
        return {'connections': watchdog.snapshot()['connections'],
                'receive_per_message_us': round(min(plain), 3),
                'drain_per_message_us': round(min(watched), 3),
                'per_poll_us': best_us(lambda: watchdog.drain({}, 64), calls),
                'per_period_64_connections_us': round(statistics.median(
                    best_us(lambda: watchdog.over_allowance(time.monotonic()), 1)
                    for _ in range(50)), 1)}
    finally:
        watchdog.close()
        router.close(linger=0)
        for dealer in dealers:
            dealer.close(linger=0)
        ctx.term()


CASES = [(1, MIB - 64, 200, 1), (1, 0, 4_000_000, 10_000), (16, 0, 20_000_000, 10_000)]


def main(argv: list[str] | None = None) -> int:
    """Run every case and the cost measurement; write the results."""
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--out', default='docs/results/transport_hold.json')
    args = parser.parse_args(argv)
    rows = []
    for limit_mb, nbytes, count, per_send in CASES:
        rows.append(attack(limit_mb, nbytes, count, per_send))
        print(json.dumps(rows[-1]), flush=True)
    rows.append(costs())
    print(json.dumps(rows[-1]), flush=True)
    write_results(args.out, 'python -m bench.transport_hold', argv, rows)
    return 0


if __name__ == '__main__':
    raise SystemExit(main())
