"""
Loopback overhead of one offloaded call beyond the server's own compute (CPU server).

A ``python -m rrto_server`` process on 127.0.0.1 (CPU device) serves a model
taking a 224x224x3 uint8 camera frame (normalisation on the server).  The
robot side calls it ``--calls`` times after recording.  Per call:

* ``overhead_ms = client total - server compute`` (what offloading adds: framing,
  two loopback transfers of the frame and the outputs, the server's queueing
  and thread hand-offs); target: median <= 0.3 ms;
* ``server_overhead_ms = server receipt-to-reply - server compute``;
* ``robot_cpu_ms``: the calling thread's CPU time per call (``time.thread_time``),
  i.e. the robot's own Python and socket calls, without its waiting;
* ``zmq_echo_ms``: the floor under all of that, a bare pyzmq DEALER/ROUTER round
  trip between two processes carrying the same bytes up and down (no framing,
  no torch), so ``overhead_ms - zmq_echo_ms`` is what rrto_ros itself adds.
  One echo follows every offloaded call, so both see the same load on a shared
  machine (an echo measured after all the calls saw another load).

Usage: ``python -m bench.overhead --out docs/results/overhead_cpu.json``
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time

import torch

from bench.machine import write_results
from bench.measure import offloaded_calls
from rrto_server.process import ServerProcess, child_env, free_port
from rrto_ros.preprocess import WithImageInput
from rrto_ros.zoo import ARCHITECTURES
from rrto_wire.summary import percentile


class Tiny(torch.nn.Module):
    """A 3x3 convolution and a global pool: near-zero compute, same 150 KB input."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 3, stride=4)

    def forward(self, x):
        return self.conv(x).mean(dim=(2, 3))


MODELS = {'tiny': Tiny, **ARCHITECTURES}


def measure(name: str, endpoint: str, calls: int) -> dict:
    torch.manual_seed(0)
    model = WithImageInput(MODELS[name]().eval()).eval()
    frame = torch.randint(0, 256, (1, 224, 224, 3), dtype=torch.uint8)
    cpu_ms: list[float] = []
    with Echo(f'tcp://127.0.0.1:{free_port()}') as echo:
        records = offloaded_calls(model, frame, endpoint, calls, warm=10, cpu_ms=cpu_ms,
                                  between=echo.round_trip)
    overhead = [r.total_ms - r.server_compute_ms for r in records]
    server_overhead = [r.server_ms - r.server_compute_ms for r in records]
    return {
        'model': name, 'input': 'uint8[1,224,224,3]', 'calls': calls,
        'bytes_sent': records[-1].bytes_sent, 'bytes_received': records[-1].bytes_received,
        'total_ms_median': statistics.median(r.total_ms for r in records),
        'server_compute_ms_median': statistics.median(r.server_compute_ms for r in records),
        'overhead_ms_median': statistics.median(overhead),
        'overhead_ms_p90': percentile(overhead, 90),
        'server_overhead_ms_median': statistics.median(server_overhead),
        'network_ms_median': statistics.median(r.network_ms for r in records),
        'robot_cpu_ms_median': statistics.median(cpu_ms),
        'round_trips_per_call': statistics.mean(r.round_trips for r in records),
        'zmq_echo_ms_median': statistics.median(echo.times_ms),
        'overhead_beyond_echo_ms': statistics.median(overhead) - statistics.median(echo.times_ms),
    }


def echo_server(endpoint: str) -> None:
    """Answer every request with as many bytes as its last frame asks for (the floor)."""
    import zmq
    sock = zmq.Context.instance().socket(zmq.ROUTER)
    sock.bind(endpoint)
    while True:
        frames = sock.recv_multipart(copy=False)
        size = int(frames[-1].bytes)
        sock.send_multipart([frames[0], b'{"kind":"ok"}', bytes(size)], copy=False)


class Echo:
    """A bare pyzmq round trip to an echo child process (:func:`echo_server`), timed."""

    def __init__(self, endpoint: str):
        import zmq
        self._proc = subprocess.Popen(
            [sys.executable, '-m', 'bench.overhead', '--echo-server', endpoint], env=child_env())
        self._sock = zmq.Context.instance().socket(zmq.DEALER)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.connect(endpoint)
        self._payload = b''
        self.times_ms: list[float] = []

    def round_trip(self, record) -> None:
        """Carry ``record``'s bytes up and down once; time it (after an untimed first one)."""
        if len(self._payload) != record.bytes_sent:
            self._payload = bytes(record.bytes_sent)
        frames = [b'{"kind":"infer"}', self._payload, str(record.bytes_received).encode()]
        if not self.times_ms:   # the child's imports take long on a busy machine
            self._echo(frames, 60000)
        start = time.perf_counter()
        self._echo(frames, 10000)
        self.times_ms.append((time.perf_counter() - start) * 1e3)

    def _echo(self, frames: list, timeout_ms: int) -> None:
        self._sock.send_multipart(frames)
        if not self._sock.poll(timeout_ms):
            raise RuntimeError('echo server did not answer')
        self._sock.recv_multipart(copy=False)

    def __enter__(self) -> 'Echo':
        return self

    def __exit__(self, *exc) -> None:
        self._sock.close(0)
        self._proc.kill()
        self._proc.wait()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--out', default='docs/results/overhead_cpu.json')
    parser.add_argument('--calls', type=int, default=300)
    parser.add_argument('--models', nargs='+', default=['tiny', 'resnet18'],
                        choices=sorted(MODELS))
    parser.add_argument('--port', type=int, default=5577)
    parser.add_argument('--server-args', default='',
                        help='extra rrto_server options, e.g. "--inline-max-ms 0"')
    parser.add_argument('--echo-server', metavar='ENDPOINT', help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.echo_server:
        echo_server(args.echo_server)
    endpoint = f'tcp://127.0.0.1:{args.port}'
    with tempfile.TemporaryDirectory() as store:
        server = ServerProcess(store, args.port, *args.server_args.split()).start()
        try:
            rows = []
            for name in args.models:
                row = measure(name, endpoint, args.calls)
                print(json.dumps(row), flush=True)
                rows.append(row)
        finally:
            server.stop()
    write_results(args.out, 'python -m bench.overhead', argv, rows)
    return 0


if __name__ == '__main__':
    raise SystemExit(main())
