"""
The request path against its physical floor, per model, side by side in one run.

For each model (``bench.gpu_models``: the zoo, plus torchvision's on a host
that has it), batch 1, a uint8 camera frame, strict fp32:

* ``graph_ms``: the bare CUDA-graph replay of the model (pure torch, input
  already on the device), replay + synchronise;
* ``graph_io_ms``: the same plus the copy from a page-locked host frame and
  the copy of the outputs into page-locked host buffers: the least a GPU
  server can spend per request (the "bare replay" of the floors below);
* ``replay_ms``: the project's own :class:`~rrto_server.replay.Replay`
  (``start(...).run()``: staging, replay, copy-back), in this process, and
  ``express_ms`` its express path's run (``rrto_server.express``);
* ``echo``: a bare pyzmq DEALER/ROUTER round trip to another process carrying
  the request's and the reply's bytes;
* ``wall``: the robot's call as it sees it (``rrto_ros.offload``, raw codec)
  against a ``python -m rrto_server`` process on loopback, with the reply's
  ``server_ms`` (receipt to reply), ``queue_ms`` (on an idle server) and
  ``compute_ms``; ``rel_error`` compares one offloaded output with the local one;
* ``minimal``: the same frame through :mod:`bench.gpu_minimal`, the
  least Python a server can be (recv, memcpy, replay, synchronise, send; no
  checks), its client wall time and its own receipt-to-reply time;
* ``bare_client``: the project robot's own request sent by a bare DEALER
  socket to the project's server (:class:`bench.gpu_minimal.BareClient`), so
  ``robot_beyond_bare_client_ms = wall p50 - bare_client p50`` is the robot's
  call path and ``bare_client_beyond_minimal_ms`` the server's and its
  socket's cost beyond the minimal server, both end to end.

Rounds run in blocks, ``BLOCK`` on the project's server, then as many on the
minimal server, an echo in every round, so drift hits them alike; within a
block the robot and the bare client swap ends every other round, so each has
the same predecessors.  Not one call each per round: the two servers are two
processes on one GPU, and a request that finds the GPU last used by the other
process waits for the GPU to switch contexts (0.15-0.17 ms a request on an
H200, 2026-12-02), which a server alone on its GPU never pays; the first
``SETTLE`` rounds of each block are left out of the medians, and the project's
server's time for the first request after a switch is reported apart
(``server_after_switch_ms``, ``gpu_switch_ms``).  Derived per model:
``server_beyond_bare_ms = server p50 - graph_io`` (goal <= 0.10),
``wall_beyond_echo_ms = wall p50 - graph_io - echo p50`` (goal <= 0.15), the same two
for the minimal server (``minimal_server_beyond_bare_ms``,
``minimal_wall_beyond_echo_ms``: what Python itself costs) and
``server_beyond_minimal_ms`` (the project's Python beyond that),
``wall_p99_over_p50`` (goal <= 1.5) and, for outputs of 1 MB or more,
``output_speed_vs_echo = echo p50 / (wall p50 - graph_io)`` (goal >= 0.8).
With ``--py-spy BINARY`` the server is also sampled (native frames, per
thread) for a few seconds of calls per model, after the timed calls.

Usage: ``python -m bench.gpu_floor --device cuda --out docs/results/gpu_floor_h200.json``
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import statistics
import subprocess
import sys
import tempfile
import time

import torch

from bench import gpu_models
from bench.gpu_minimal import BareClient, Minimal, captured_header, serve
from bench.measure import percentile, timed_ms
from rrto_wire import treespec

ECHO_HEADER = b'{"kind":"ok"}'
BLOCK = 20      # rounds on one server before the other's block
SETTLE = 2      # rounds of a block not in the medians: the GPU's switch of processes


@contextlib.contextmanager
def strict_fp32():
    matmul = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        with torch.backends.cudnn.flags(enabled=True, benchmark=False, deterministic=False,
                                        allow_tf32=False):
            yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = matmul


def bare(model: torch.nn.Module, frame: torch.Tensor, device: torch.device,
         iters: int) -> dict:
    """Time the bare graph replay (and with page-locked copies); eager on a CPU device."""
    if device.type != 'cuda':
        with torch.inference_mode():
            times = timed_ms(lambda: model(frame), iters, warmup=3)
        p50 = statistics.median(times)
        return {'graph_ms': p50, 'graph_io_ms': p50, 'graph_io_p99_ms': percentile(times, 99)}
    model = model.to(device)
    host_in = torch.empty_like(frame).pin_memory()
    host_in.copy_(frame)
    static_in = host_in.to(device)
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.inference_mode(), strict_fp32():
        with torch.cuda.stream(side):
            for _ in range(3):
                model(static_in)
        torch.cuda.current_stream(device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_out = treespec.flatten(model(static_in))[0]
    host_out = [torch.empty(t.shape, dtype=t.dtype, pin_memory=True) for t in static_out]
    stream = torch.cuda.current_stream(device)

    def replay():
        graph.replay()
        stream.synchronize()

    def replay_io():
        static_in.copy_(host_in, non_blocking=True)
        graph.replay()
        for host, out in zip(host_out, static_out):
            host.copy_(out, non_blocking=True)
        stream.synchronize()

    graph_times = timed_ms(replay, iters)
    io_times = timed_ms(replay_io, iters)
    model.cpu()
    return {'graph_ms': statistics.median(graph_times),
            'graph_io_ms': statistics.median(io_times),
            'graph_io_p99_ms': percentile(io_times, 99),
            'output_bytes': sum(t.nbytes for t in host_out)}


def project_replay(model: torch.nn.Module, frame: torch.Tensor, device: torch.device,
                   iters: int) -> dict:
    """
    Return median ms of the project's Replay in this process.

    ``replay_ms``: the general path (staging, replay, copy-back); ``express_ms``:
    the express path's run (memcpy into staging, one graph with its copies, one
    synchronisation; None without one).
    """
    from rrto_ros.local_model import TorchModule
    from rrto_server.models import ModelRegistry
    from rrto_server.sandbox import FREE
    from rrto_server.replay import Replay
    from rrto_server.store import BlobStore
    from rrto_wire.messages import RecordOptions
    from rrto_wire.tensors import signature_of
    flat, spec = treespec.flatten(((frame,), {}))
    artifact = TorchModule(model).artifact(flat, spec)
    with tempfile.TemporaryDirectory() as store:
        blobs = BlobStore(store)
        for digest, (kind, data) in artifact.blobs.items():
            blobs.put(digest, kind, data)
        loaded = ModelRegistry(blobs).get(artifact.model, FREE)
        replay = Replay(loaded, signature_of([frame]), RecordOptions(), device)
        times = timed_ms(lambda: replay.start([frame]).run(), iters, warmup=5)
        express = None
        if replay.express is not None:
            buffers = [memoryview(frame.contiguous().numpy()).cast('B')]
            synchronize = (torch.cuda.current_stream(device).synchronize
                           if device.type == 'cuda' else lambda: None)

            def express_call():
                replay.express.run(buffers)
                synchronize()    # as the lane does after the step
            express = statistics.median(timed_ms(express_call, iters, warmup=5))
    return {'replay_ms': statistics.median(times), 'express_ms': express}


# ---------------------------------------------------------------------- the echo floor
def echo_server(endpoint: str) -> None:
    """Answer every request with as many bytes as its last frame asks for (child process)."""
    import zmq
    sock = zmq.Context.instance().socket(zmq.ROUTER)
    sock.bind(endpoint)
    replies: dict[int, bytes] = {}
    while True:
        frames = sock.recv_multipart(copy=False)
        size = int(frames[-1].bytes)
        if size not in replies:
            replies[size] = b'\1' * size
        sock.send_multipart([frames[0], ECHO_HEADER, replies[size]], copy=False)


class Echo:
    """The robot's side of the echo floor: one DEALER socket to an echo server process."""

    def __init__(self):
        from rrto_server.process import child_env, free_port
        self.port = free_port()
        self.proc = subprocess.Popen([sys.executable, '-m', 'bench.gpu_floor', '--echo-server',
                                      f'tcp://127.0.0.1:{self.port}'], env=child_env())
        self.sock = None
        self.connect(self.port)
        self.payloads: dict[int, bytes] = {}

    def connect(self, port: int) -> None:
        """Talk to the echo server through ``port`` (its own, or a link emulator's)."""
        import zmq
        if self.sock is not None:
            self.sock.close(0)
        self.sock = zmq.Context.instance().socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(f'tcp://127.0.0.1:{port}')

    def round_trip(self, sent: int, received: int) -> float:
        """Return the ms of one round trip of ``sent`` bytes up and ``received`` down."""
        if sent not in self.payloads:
            self.payloads[sent] = b'\2' * max(0, sent - 64)
        start = time.perf_counter()
        self.sock.send_multipart([b'{"kind":"infer","id":1}', self.payloads[sent],
                                  str(received).encode()])
        if not self.sock.poll(30000):
            raise RuntimeError('echo server did not answer')
        self.sock.recv_multipart(copy=False)
        return (time.perf_counter() - start) * 1e3

    def close(self) -> None:
        self.sock.close(0)
        self.proc.kill()
        self.proc.wait()


# ---------------------------------------------------------------------- py-spy
def summarise_raw(path: str, top: int = 20) -> dict:
    """Reduce py-spy's raw (collapsed) stacks to per-thread shares and top frames."""
    threads: collections.Counter = collections.Counter()
    leaves: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    inclusive: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    total = 0
    with open(path) as f:
        for line in f:
            stack, _, count = line.rstrip('\n').rpartition(' ')
            if not stack or not count.isdigit():
                continue
            frames = stack.split(';')
            thread = next((fr for fr in frames if fr.startswith('thread')), 'thread ?')
            frames = [fr for fr in frames if not fr.startswith(('thread', 'process'))]
            n = int(count)
            total += n
            threads[thread] += n
            if frames:
                leaves[thread][frames[-1]] += n
            for frame in set(frames):   # Python frames of the request path, not bootstraps
                if '.py:' in frame and 'threading.py' not in frame:
                    inclusive[thread][frame] += n
    return {'samples': total,
            'threads': {t: {'share': n / total if total else 0.0,
                            'self': [[fr, c] for fr, c in leaves[t].most_common(top)],
                            'inclusive': [[fr, c] for fr, c in inclusive[t].most_common(top)]}
                        for t, n in threads.most_common()}}


def sample_server(py_spy: str, pid: int, seconds: float, call) -> dict:
    """Run ``call`` in a loop while py-spy samples the server; return the summary or an error."""
    with tempfile.NamedTemporaryFile(suffix='.txt', delete=False) as out:
        path = out.name
    proc = subprocess.Popen([py_spy, 'record', '--pid', str(pid), '--native', '--threads',
                             '--rate', '1000', '--format', 'raw',
                             '--duration', str(int(seconds)), '--output', path],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    calls = 0
    while proc.poll() is None:
        call()
        calls += 1
    log = proc.stdout.read()[-600:]
    if proc.returncode != 0:
        return {'error': f'py-spy exited {proc.returncode}: {log}'}
    summary = summarise_raw(path)
    summary['calls'] = calls
    return summary


# ---------------------------------------------------------------------- one model
def measure(name: str, endpoint: str, echo: Echo, device: torch.device, calls: int,
            py_spy: str | None, server_pid: int | None) -> dict:
    """Measure one model: bare replay, then echo and offloaded calls alternating."""
    from rrto_ros import OffloadResult, offload
    model, frame = gpu_models.build(name)
    row = {'model': name, 'input': f'uint8{list(frame.shape)}', 'input_bytes': frame.nbytes}
    row.update(bare(model, frame, device, iters=max(100, calls)))
    row.update(project_replay(model, frame, device, iters=max(50, calls // 2)))
    walls, echoes, server, queue, compute, outside, network = [], [], [], [], [], [], []
    minimal_wall, minimal_server, bare_wall, bare_server = [], [], [], []
    minimal_echoes = []
    minimal = Minimal(name, str(device))
    with contextlib.ExitStack() as stack, \
            offload(model, server=endpoint, timeout_ms=30000, codec='raw') as om:
        stack.callback(minimal.close)
        if not om.warmup(frame):
            raise RuntimeError(f'{name}: the server did not record the model')
        # offloaded output equals local output: the timings below are of right answers
        with torch.inference_mode():
            local = treespec.flatten(model(frame))[0]
        remote = treespec.flatten(om(frame))[0]
        row['rel_error'] = rel_error(remote, local)
        bare_client = BareClient(endpoint, captured_header(lambda: om(frame)), frame)
        stack.callback(bare_client.close)
        replies = bare_client.round_trip()[2]
        row['bare_client_rel_error'] = rel_error(_tensors(replies, local), local)
        # the floor answers right too, or its time means nothing
        replies = minimal.round_trip(frame)[2]
        row['minimal_rel_error'] = rel_error(_tensors(replies, local), local)

        def robot():
            start = time.perf_counter()
            om(frame)
            wall = (time.perf_counter() - start) * 1e3
            if om.last.result != OffloadResult.OFFLOADED:
                raise RuntimeError(f'{name}: call not offloaded: {om.last.reason}')
            return wall, om.last

        last = {}
        after_switch = []

        def project_round(i: int, keep: bool, first: bool) -> None:
            # the robot and the bare client swap ends every other round (robot first, bare
            # client last; then bare client first, robot last): each follows itself in half
            # the rounds and the echo in the other half, the same predecessors for both
            robot_first = i % 2 == 0
            if robot_first:
                last['wall'], last['record'] = robot()
            else:
                last['bare'] = bare_client.round_trip()[:2]
            if first:       # the first request after the minimal server's block
                after_switch.append(last['record'].server_ms if robot_first
                                    else last['bare'][1])
            record = last['record']
            echo_ms = echo.round_trip(record.bytes_sent, record.bytes_received)
            if robot_first:
                last['bare'] = bare_client.round_trip()[:2]
            else:
                last['wall'], last['record'] = robot()
            if keep:
                record = last['record']
                bare_wall.append(last['bare'][0])
                bare_server.append(last['bare'][1])
                walls.append(last['wall'])
                echoes.append(echo_ms)
                server.append(record.server_ms)
                queue.append(record.server_queue_ms)
                compute.append(record.server_compute_ms)
                network.append(record.network_ms)
                outside.append(record.total_ms - record.network_ms - record.server_ms)

        def minimal_round(keep: bool) -> None:
            echo_ms = echo.round_trip(last['record'].bytes_sent,
                                      last['record'].bytes_received)
            floor = minimal.round_trip(frame)[:2]
            if keep:
                minimal_echoes.append(echo_ms)
                minimal_wall.append(floor[0])
                minimal_server.append(floor[1])

        # blocks of rounds on one server, then on the other: a request that finds the GPU
        # last used by another process waits for the GPU's switch between the two
        # processes' contexts (0.15-0.17 ms per request on an H200, session 13), which a
        # server alone on its GPU never pays; the first SETTLE rounds of each block are
        # timed apart (``server_after_switch_ms``), not in the medians
        rounds = 0
        warm = 20
        while len(walls) < calls:
            size = min(BLOCK, calls - len(walls) + SETTLE) if not warm else warm
            for k in range(size):
                project_round(rounds, keep=not warm and k >= SETTLE,
                              first=not warm and k == 0)
                rounds += 1
            for k in range(size):
                minimal_round(keep=not warm and k >= SETTLE)
            warm = 0
        record = last['record']
        row.update(bytes_sent=record.bytes_sent, bytes_received=record.bytes_received)
        if py_spy and server_pid:
            row['py_spy'] = sample_server(py_spy, server_pid, 3, lambda: om(frame))
    bare_ms = row['graph_io_ms']
    row.update(
        calls=calls,
        echo_ms=statistics.median(echoes), echo_p99_ms=percentile(echoes, 99),
        wall_ms=statistics.median(walls), wall_p99_ms=percentile(walls, 99),
        server_ms=statistics.median(server), server_p99_ms=percentile(server, 99),
        queue_ms=statistics.median(queue), compute_ms=statistics.median(compute))
    row['server_beyond_bare_ms'] = row['server_ms'] - bare_ms
    row['wall_beyond_echo_ms'] = row['wall_ms'] - bare_ms - row['echo_ms']
    row['wall_p99_over_p50'] = row['wall_p99_ms'] / row['wall_ms']
    row.update(bare_client_wall_ms=statistics.median(bare_wall),
               bare_client_server_ms=statistics.median(bare_server))
    row['robot_beyond_bare_client_ms'] = row['wall_ms'] - row['bare_client_wall_ms']
    # where the robot's extra time is: its own work before the send and after the reply,
    # its wait beyond the server's time (sent -> reply decoded, less server_ms) against the
    # bare client's, and the server's time for its request against the bare client's
    row.update(robot_outside_remote_ms=statistics.median(outside),
               robot_network_ms=statistics.median(network),
               bare_client_network_ms=statistics.median(
                   [w - s for w, s in zip(bare_wall, bare_server)]))
    row['robot_server_beyond_bare_client_ms'] = row['server_ms'] - row['bare_client_server_ms']
    row['bare_client_beyond_minimal_ms'] = row['bare_client_wall_ms'] - statistics.median(
        minimal_wall)
    row.update(minimal_wall_ms=statistics.median(minimal_wall),
               minimal_wall_p99_ms=percentile(minimal_wall, 99),
               minimal_server_ms=statistics.median(minimal_server))
    row['minimal_server_beyond_bare_ms'] = row['minimal_server_ms'] - bare_ms
    row['minimal_echo_ms'] = statistics.median(minimal_echoes)
    row['minimal_wall_beyond_echo_ms'] = (row['minimal_wall_ms'] - bare_ms
                                          - row['minimal_echo_ms'])
    # the project's server's time for the first request after the minimal server's
    # block, beyond its median: what one GPU switch between processes costs
    row['server_after_switch_ms'] = statistics.median(after_switch)
    row['gpu_switch_ms'] = row['server_after_switch_ms'] - statistics.median(
        server + bare_server)
    row['server_beyond_minimal_ms'] = row['server_ms'] - row['minimal_server_ms']
    if row['bytes_received'] >= 1 << 20:
        row['output_speed_vs_echo'] = row['echo_ms'] / max(1e-9, row['wall_ms'] - bare_ms)
    return row


def _tensors(frames: list, like: list) -> list[torch.Tensor]:
    return [torch.frombuffer(bytearray(f.buffer), dtype=x.dtype).reshape(x.shape)
            for f, x in zip(frames, like)]


def rel_error(outputs: list, references: list) -> float:
    return max(float((r.float() - x.float()).norm() / x.float().norm())
               for r, x in zip(outputs, references))


def print_row(row: dict) -> None:
    extra = (f", output speed {row['output_speed_vs_echo']:.2f} x echo"
             if 'output_speed_vs_echo' in row else '')
    if row.get('express_ms') is not None:
        extra += f", express run {row['express_ms']:.3f}"
    extra += (f" | bare client: wall {row['bare_client_wall_ms']:.3f} robot beyond it "
              f"{row['robot_beyond_bare_client_ms']:.3f} (outside the request "
              f"{row['robot_outside_remote_ms']:.3f}, wait-server {row['robot_network_ms']:.3f}"
              f" vs {row['bare_client_network_ms']:.3f}, server "
              f"{row['robot_server_beyond_bare_client_ms']:+.3f})")
    if 'minimal_wall_ms' in row:
        extra += (f" | minimal: wall {row['minimal_wall_ms']:.3f} server "
                  f"{row['minimal_server_ms']:.3f} server-bare "
                  f"{row['minimal_server_beyond_bare_ms']:.3f} wall-bare-echo "
                  f"{row['minimal_wall_beyond_echo_ms']:.3f} rel_err "
                  f"{row['minimal_rel_error']:.1e} | after a GPU switch of processes "
                  f"{row['gpu_switch_ms']:+.3f}")
    print(f"{row['model']:26s} graph {row['graph_ms']:.3f} graph+io {row['graph_io_ms']:.3f} "
          f"replay {row['replay_ms']:.3f} | echo {row['echo_ms']:.3f} | wall "
          f"{row['wall_ms']:.3f} (p99 {row['wall_p99_ms']:.3f}) server {row['server_ms']:.3f} "
          f"queue {row['queue_ms']:.3f} compute {row['compute_ms']:.3f} | server-bare "
          f"{row['server_beyond_bare_ms']:.3f} wall-bare-echo {row['wall_beyond_echo_ms']:.3f}"
          f" rel_err {row['rel_error']:.1e}{extra}", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog='bench.gpu_floor', description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    parser.add_argument('--models', nargs='+', help='default: every model available here')
    parser.add_argument('--calls', type=int, default=300)
    parser.add_argument('--server-args', default='', help='extra rrto_server options')
    parser.add_argument('--py-spy', metavar='BINARY', help='sample the server with py-spy')
    parser.add_argument('--out', help='write the results as JSON here')
    parser.add_argument('--echo-server', metavar='ENDPOINT', help=argparse.SUPPRESS)
    parser.add_argument('--minimal-server', nargs=3, metavar=('ENDPOINT', 'MODEL', 'DEVICE'),
                        help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.minimal_server:
        serve(*args.minimal_server)
        return 0
    if args.echo_server:
        echo_server(args.echo_server)
        return 0
    from bench.machine import write_results
    from rrto_server.process import ServerProcess
    device = torch.device(args.device)
    torch.set_num_threads(min(torch.get_num_threads(), 4))
    rows = []
    echo = Echo()
    with tempfile.TemporaryDirectory() as store:
        server = ServerProcess(store, None, *args.server_args.split(),
                               device=args.device).start()
        try:
            for name in args.models or gpu_models.available():
                try:
                    row = measure(name, server.endpoint, echo, device, args.calls, args.py_spy,
                                  server.proc.pid)
                except Exception as exc:   # one model failing must not lose the others
                    print(f'{name}: FAILED {type(exc).__name__}: {exc}', flush=True)
                    rows.append({'model': name, 'error': f'{type(exc).__name__}: {exc}'})
                    continue
                print_row(row)
                rows.append(row)
                if args.out:   # after every model: a run cut short keeps what it measured
                    write_results(args.out, 'python -m bench.gpu_floor', argv, rows)
        finally:
            server.stop()
            echo.close()
    return 0


if __name__ == '__main__':
    raise SystemExit(main())
