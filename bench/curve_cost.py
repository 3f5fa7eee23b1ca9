"""
What CURVE authentication and encryption cost per call, side by side with plain TCP.

A ROUTER echoes each request (one ``--kb`` frame up, a ``--reply-kb`` frame
down) over two transports in the same process and run: plain TCP and CURVE
with pyzmq's ZAP authenticator (:mod:`rrto_server.auth`), each directly on
loopback and through the link emulator (``bench.linkemu``).  Calls alternate
between the transports in blocks so machine load hits both alike; the figure
of merit is the median per-call difference (goal: < 0.05 ms at 150 KB).

It also measures the floor no ZeroMQ setting can go below: the cipher alone.
libzmq's CURVE seals every message with ``crypto_box`` (XSalsa20-Poly1305 on a
precomputed key) on one side and opens it on the other; the floor is those two
calls on the request and the reply frames, timed through ``ctypes`` on the
libsodium the pyzmq wheel bundles (the library libzmq itself calls).

    python -m bench.curve_cost --calls 400 --kb 150 --out docs/results/curve_cost.json
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import json
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import zmq

from bench.link_config import grid_link
from bench.link_proxy import LinkEmulator
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


def _libsodium() -> tuple[ctypes.CDLL, str]:
    """Return the libsodium libzmq uses (bundled with the pyzmq wheel, else the system's)."""
    bundled = sorted((Path(zmq.__file__).parent.parent / 'pyzmq.libs').glob('libsodium*'))
    name = str(bundled[0]) if bundled else ctypes.util.find_library('sodium')
    if name is None:
        raise RuntimeError('no libsodium found (is libzmq built with tweetnacl?)')
    sodium = ctypes.CDLL(name)
    if sodium.sodium_init() < 0:
        raise RuntimeError('sodium_init failed')
    return sodium, Path(name).name


def cipher_floor(kb: int, reply_kb: int, repeats: int = 400) -> dict:
    """Return the median ms to seal and open one call's frames with crypto_box (afternm)."""
    sodium, library = _libsodium()
    pk, sk, key = (ctypes.create_string_buffer(32) for _ in range(3))
    sodium.crypto_box_keypair(pk, sk)
    sodium.crypto_box_beforenm(key, pk, sk)
    nonce = ctypes.create_string_buffer(24)
    times = []
    for size in (kb * 1000, reply_kb * 1000):
        plain = ctypes.create_string_buffer(np.random.default_rng(1).bytes(size), size)
        box, back = ctypes.create_string_buffer(size + 16), ctypes.create_string_buffer(size)
        samples = []
        for _ in range(repeats):
            start = time.perf_counter()
            sodium.crypto_box_easy_afternm(box, plain, ctypes.c_ulonglong(size), nonce, key)
            if sodium.crypto_box_open_easy_afternm(back, box, ctypes.c_ulonglong(size + 16),
                                                   nonce, key) != 0:
                raise RuntimeError('crypto_box did not open its own box')
            samples.append((time.perf_counter() - start) * 1e3)
        times.append(float(np.median(samples)))
    return {'library': library, 'seal_open_request_ms': times[0],
            'seal_open_reply_ms': times[1], 'per_call_ms': sum(times),
            'request_mb_per_s': 2 * kb * 1000 / (times[0] * 1e-3) / 1e6,
            'aes256gcm_request_ms': _aes_gcm_ms(sodium, kb * 1000, repeats)}


def _aes_gcm_ms(sodium: ctypes.CDLL, size: int, repeats: int) -> float | None:
    """
    Return the median ms to seal and open ``size`` bytes with AES-256-GCM (AES-NI), if any.

    Not what CURVE can use: the reference for an AES-GCM transport (IPsec, kernel TLS).
    """
    if not sodium.crypto_aead_aes256gcm_is_available():
        return None
    key, nonce = ctypes.create_string_buffer(32), ctypes.create_string_buffer(12)
    sodium.crypto_aead_aes256gcm_keygen(key)
    plain = ctypes.create_string_buffer(bytes(size), size)
    box, back = ctypes.create_string_buffer(size + 16), ctypes.create_string_buffer(size)
    box_len, back_len = ctypes.c_ulonglong(), ctypes.c_ulonglong()
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        sodium.crypto_aead_aes256gcm_encrypt(box, ctypes.byref(box_len), plain,
                                             ctypes.c_ulonglong(size), None,
                                             ctypes.c_ulonglong(0), None, nonce, key)
        if sodium.crypto_aead_aes256gcm_decrypt(back, ctypes.byref(back_len), None, box,
                                                box_len, None, ctypes.c_ulonglong(0),
                                                nonce, key) != 0:
            raise RuntimeError('AES-256-GCM did not open its own box')
        samples.append((time.perf_counter() - start) * 1e3)
    return float(np.median(samples))


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
               'zmq': zmq.zmq_version(), 'pyzmq': zmq.__version__, 'curve': zmq.has('curve'),
               'cipher_floor': cipher_floor(args.kb, args.reply_kb),
               'loopback': measure(args.calls, args.kb, args.reply_kb, emulate=False),
               'link_emulator': measure(args.calls, args.kb, args.reply_kb, emulate=True)}
    floor = results['cipher_floor']
    print(f"cipher floor   {floor['per_call_ms']:.3f} ms per call ({floor['library']}: seal + "
          f"open {args.kb} kB {floor['seal_open_request_ms']:.3f} ms, {args.reply_kb} kB "
          f"{floor['seal_open_reply_ms']:.3f} ms; {floor['request_mb_per_s']:.0f} MB/s); "
          f"AES-256-GCM {args.kb} kB {floor['aes256gcm_request_ms'] or float('nan'):.3f} ms")
    for where in ('loopback', 'link_emulator'):
        r = results[where]
        print(f"{where:14s} plain {r['plain']['median_ms']:.3f} ms  curve "
              f"{r['curve']['median_ms']:.3f} ms  (median; curve - plain "
              f"{r['curve_minus_plain_median_ms']:+.3f} ms, x{r['ratio_median']:.2f})")
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1))


if __name__ == '__main__':
    main()
