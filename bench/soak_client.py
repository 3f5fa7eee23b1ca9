"""
One light robot for ``bench.soak``: infer requests in a loop, local fallback, exact checks.

It imports ZeroMQ and numpy only (64 of them must fit a 2-core machine) and
speaks the wire protocol directly: one ``infer`` header plus one raw float32
frame up, one output frame down.  The model is ``relu(x * w + b)``
elementwise, so the local result is bit-identical to the server's.  Every
request ends in exactly one of: ``ok`` (checked equal), ``wrong``, an error
reply (then computed locally), or a timeout (the socket is closed, Lazy
Pirate style, and the result computed locally).  A reply for another request
id is counted as ``duplicate`` (already answered) or ``stale``.  Counters are
rewritten to ``--out`` every second, so a client killed with SIGKILL leaves
what it had counted.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import time

import numpy as np
import zmq

from rrto_wire.curve import ClientKeys
from rrto_wire.limits import PROTOCOL_VERSION


def local(x: np.ndarray, w: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Return the tiny model's output computed on the robot."""
    return np.maximum(x * w + b, np.float32(0))


class Robot:
    """One client process's connection, counters and loop."""

    def __init__(self, args: argparse.Namespace):
        self.args = args
        model = np.load(args.model)
        self.w, self.b = model['w'], model['b']
        self.keys = (ClientKeys.load(args.server_key, args.client_key)
                     if args.client_key else None)
        self.ctx = zmq.Context()
        self.sock = None
        self.next_id = int.from_bytes(os.urandom(4), 'little') << 20
        self.answered: set[int] = set()
        self.counts = {'requests': 0, 'ok': 0, 'wrong': 0, 'timeouts': 0, 'fallbacks': 0,
                       'duplicates': 0, 'stale': 0, 'deadline_met': 0, 'errors': {}}
        self.latencies: list[float] = []
        self.stop = False

    def _socket(self) -> zmq.Socket:
        if self.sock is None:
            sock = self.ctx.socket(zmq.DEALER)
            sock.setsockopt(zmq.LINGER, 0)
            if self.keys is not None:
                self.keys.apply(sock)
            sock.connect(self.args.endpoint)
            self.sock = sock
        return self.sock

    def _drop_socket(self) -> None:
        if self.sock is not None:
            self.sock.close(linger=0)
            self.sock = None

    def one(self, replay: str, x: np.ndarray) -> None:
        self.next_id += 1
        rid = self.next_id
        header = {'v': PROTOCOL_VERSION, 'kind': 'infer', 'id': rid, 'replay': replay,
                  'priority': self.args.priority, 'deadline_ms': self.args.deadline_ms,
                  'task': f'p{self.args.priority}',
                  'tensors': [{'dtype': 'float32', 'shape': list(x.shape), 'codec': 'raw'}]}
        sock = self._socket()
        start = time.perf_counter()
        self.counts['requests'] += 1
        sock.send_multipart([json.dumps(header).encode(), x.tobytes()], copy=False)
        deadline = start + self.args.timeout_ms / 1e3
        while True:
            left = deadline - time.perf_counter()
            if left <= 0 or not sock.poll(left * 1e3):
                self.counts['timeouts'] += 1
                self._drop_socket()
                return self._fallback(x)
            frames = sock.recv_multipart()
            reply = json.loads(frames[0])
            if reply.get('id') != rid:
                self.counts['duplicates' if reply.get('id') in self.answered else 'stale'] += 1
                continue
            break
        self.answered.add(rid)
        elapsed_ms = (time.perf_counter() - start) * 1e3
        if reply.get('kind') != 'ok':
            code = str(reply.get('code'))
            self.counts['errors'][code] = self.counts['errors'].get(code, 0) + 1
            return self._fallback(x)
        y = np.frombuffer(frames[1], dtype=np.float32)
        if np.array_equal(y, local(x, self.w, self.b)):
            self.counts['ok'] += 1
            self.latencies.append(elapsed_ms)
            self.counts['deadline_met'] += elapsed_ms <= self.args.deadline_ms
        else:
            self.counts['wrong'] += 1

    def _fallback(self, x: np.ndarray) -> None:
        local(x, self.w, self.b)
        self.counts['fallbacks'] += 1

    def save(self) -> None:
        lat = np.array(self.latencies) if self.latencies else np.zeros(1)
        data = dict(self.counts, priority=self.args.priority, pid=os.getpid(),
                    p50_ms=float(np.percentile(lat, 50)), p99_ms=float(np.percentile(lat, 99)),
                    latencies_ms=[round(v, 3) for v in self.latencies[-2000:]])
        tmp = f'{self.args.out}.tmp'
        with open(tmp, 'w') as f:
            json.dump(data, f)
        os.replace(tmp, self.args.out)

    def run(self) -> None:
        rng = np.random.default_rng(os.getpid())
        replay = open(self.args.replay_file).read().strip()
        end = time.monotonic() + self.args.seconds
        saved = time.monotonic()
        while not self.stop and time.monotonic() < end:
            self.one(replay, rng.standard_normal(self.w.shape, dtype=np.float32))
            if time.monotonic() - saved > 1.0:
                self.save()
                saved = time.monotonic()
            time.sleep(self.args.think_ms / 1e3)
        self.save()
        self._drop_socket()
        self.ctx.term()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[1])
    parser.add_argument('--endpoint', required=True)
    parser.add_argument('--replay-file', required=True)
    parser.add_argument('--model', required=True, help='.npz with w and b')
    parser.add_argument('--priority', type=int, default=0)
    parser.add_argument('--deadline-ms', type=float, default=250.0)
    parser.add_argument('--timeout-ms', type=float, default=1000.0)
    parser.add_argument('--think-ms', type=float, default=20.0)
    parser.add_argument('--seconds', type=float, default=60.0)
    parser.add_argument('--server-key')
    parser.add_argument('--client-key')
    parser.add_argument('--out', required=True)
    robot = Robot(parser.parse_args(argv))

    def stop(*_):
        robot.stop = True
    signal.signal(signal.SIGTERM, stop)
    robot.run()


if __name__ == '__main__':
    main()
