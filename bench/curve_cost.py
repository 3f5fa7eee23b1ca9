"""
What CURVE authentication and encryption cost per call, side by side with plain TCP.

A ROUTER echoes each request (one ``--kb`` frame up, a ``--reply-kb`` frame
down) over two transports in the same process and run: plain TCP and CURVE
with pyzmq's ZAP authenticator (:mod:`rrto_server.auth`), each directly on
loopback and through the link emulator (``bench.linkemu``).  Calls alternate
between the transports in blocks so machine load hits both alike; the figure
of merit is the median per-call difference (goal: < 0.05 ms at 150 KB).

    python -m bench.curve_cost --calls 400 --kb 150 --out docs/results/curve_cost.json
"""

from __future__ import annotations

import argparse
import json
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import zmq

from bench.linkemu import LinkEmulator, grid_link
from rrto_server import keys
from rrto_server.auth import CurveGate, Grant, KeyRing
from rrto_wire.curve import ClientKeys

BLOCK = 20


class Echo:
    """A ROUTER thread answering each message with ``reply`` bytes."""

    def __init__(self, ctx: zmq.Context, reply: bytes, keyring: KeyRing | None):
        self.sock = ctx.socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, 0)
        if keyring is not None:
            keyring.secure(self.sock)
        self.port = self.sock.bind_to_random_port('tcp://127.0.0.1')
        self.reply = reply
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            if self.sock.poll(50):
                ident, _ = self.sock.recv_multipart(copy=False)
                self.sock.send_multipart([ident, self.reply], copy=False)

    def close(self) -> None:
        self._stop.set()
        self.thread.join()
        self.sock.close(linger=0)


def _client(ctx: zmq.Context, port: int, client_keys: ClientKeys | None) -> zmq.Socket:
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    if client_keys is not None:
        client_keys.apply(sock)
    sock.connect(f'tcp://127.0.0.1:{port}')
    return sock


def _call(sock: zmq.Socket, payload: bytes) -> float:
    start = time.perf_counter()
    sock.send(payload, copy=False)
    if not sock.poll(10_000):
        raise RuntimeError('no reply within 10 s')
    sock.recv(copy=False)
    return (time.perf_counter() - start) * 1e3


def measure(calls: int, kb: int, reply_kb: int, emulate: bool) -> dict:
    """Return per-call milliseconds of plain and CURVE transports, measured interleaved."""
    ctx = zmq.Context()
    with tempfile.TemporaryDirectory() as tmp:
        server_dir, robots = Path(tmp) / 'server', Path(tmp) / 'robots'
        keys.create_pair(server_dir, 'server')
        keys.create_pair(robots, 'bench')
        keys.allow(server_dir, robots / 'bench.key', Grant())
        keyring = KeyRing(server_dir)
        gate = CurveGate(ctx, keyring)
        client_keys = ClientKeys.load(server_dir / 'server.key', robots / 'bench.key_secret')
        reply = bytes(reply_kb * 1000)
        echoes = {'plain': Echo(ctx, reply, None), 'curve': Echo(ctx, reply, keyring)}
        emulators, socks = [], {}
        for name, echo in echoes.items():
            port = echo.port
            if emulate:
                emulators.append(LinkEmulator(upstream=('127.0.0.1', port),
                                              link=grid_link(1000, rtt_ms=2.0)))
                port = emulators[-1].port
            socks[name] = _client(ctx, port, client_keys if name == 'curve' else None)
        payload = np.random.default_rng(0).bytes(kb * 1000)
        times = {name: [] for name in socks}
        try:
            for name, sock in socks.items():            # connect, handshake, warm up
                for _ in range(10):
                    _call(sock, payload)
            for _ in range(max(1, calls // BLOCK)):
                for name, sock in socks.items():
                    times[name] += [_call(sock, payload) for _ in range(BLOCK)]
        finally:
            for sock in socks.values():
                sock.close(linger=0)
            for emu in emulators:
                emu.close()
            for echo in echoes.values():
                echo.close()
            gate.close()
            ctx.term()
    result = {name: {'median_ms': float(np.median(t)), 'p90_ms': float(np.percentile(t, 90)),
                     'calls': len(t)} for name, t in times.items()}
    result['curve_minus_plain_median_ms'] = (result['curve']['median_ms']
                                             - result['plain']['median_ms'])
    result['ratio_median'] = result['curve']['median_ms'] / result['plain']['median_ms']
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[1])
    parser.add_argument('--calls', type=int, default=400)
    parser.add_argument('--kb', type=int, default=150, help='request frame (kB)')
    parser.add_argument('--reply-kb', type=int, default=1, help='reply frame (kB)')
    parser.add_argument('--out', help='write the results as JSON here')
    args = parser.parse_args(argv)
    results = {'calls': args.calls, 'kb': args.kb, 'reply_kb': args.reply_kb,
               'loopback': measure(args.calls, args.kb, args.reply_kb, emulate=False),
               'link_emulator': measure(args.calls, args.kb, args.reply_kb, emulate=True)}
    for where in ('loopback', 'link_emulator'):
        r = results[where]
        print(f"{where:14s} plain {r['plain']['median_ms']:.3f} ms  curve "
              f"{r['curve']['median_ms']:.3f} ms  (median; curve - plain "
              f"{r['curve_minus_plain_median_ms']:+.3f} ms, x{r['ratio_median']:.2f})")
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1))


if __name__ == '__main__':
    main()
