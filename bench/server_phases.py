"""
Where a server's time per inference goes: each phase of the request path, timed.

An in-process :class:`~rrto_server.server.Server` (the same code as ``python -m
rrto_server``) has the functions of its request path wrapped with timers; a
client in a separate process offloads each model of ``bench.gpu_models``
(uint8 camera frames, normalisation on the server) ``--calls`` times after recording.  Per
phase: calls and median/p90 ms.  ``server_ms`` (receipt to reply) ends where
``send`` begins, so encoding and sending the reply count in the client's
overhead, not in ``server_ms``.

Usage: ``python -m bench.server_phases --device cuda --calls 400``

``--staging`` instead times the staging memcpy alone (:func:`rrto_server.transfers.copy_frame`
of a 150 KB frame into a page-locked buffer) under each condition the server adds to a tight
loop: a CUDA graph reading the buffer between copies, a frame just received from another
process (first and second copy of it), one or four libzmq I/O threads, and the receiving
thread and libzmq's I/O thread pinned to one core, two cores sharing a cache, or two far
apart (:func:`staging`).  ``--interference`` times an urgent frame's receive and express
step beside a best-effort batch's receive and staging (:func:`interference`).
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import functools
import json
import statistics
import subprocess
import sys
import tempfile
import threading
import time

import torch

PHASES = [   # (module, owner, function, label), in request order
    ('rrto_server.conn_watchdog', 'ConnectionWatchdog', 'drain',
     'watchdog.drain (receive, count)'),
    ('rrto_server.guard', 'Guard', 'order', 'guard.order (priority of a batch)'),
    ('rrto_server.requests', 'ReplySender', 'flush', 'replies.flush (outbox)'),
    ('rrto_server.server', 'Server', 'on_message', 'on_message (everything on receipt)'),
    ('rrto_wire.protocol', None, 'message_size', 'message_size'),
    ('rrto_server.requests', 'Request', '__init__', 'Request()'),
    ('rrto_wire.messages', None, 'decode_request', 'decode_request'),
    ('rrto_server.stats', 'ServerStats', 'request', 'stats.request'),
    ('rrto_server.guard', 'Guard', 'admit', 'guard.admit'),
    ('rrto_server.server', 'Server', '_on_infer', '_on_infer'),
    ('rrto_server.server', None, 'job_keys', 'job_keys'),
    ('rrto_server.replay_cache', 'ReplayCache', 'get', 'replays.get'),
    ('rrto_wire.protocol', None, 'decoded_size', 'decoded_size'),
    ('rrto_server.express', 'ExpressPlan', 'accept', 'express accept (frame checks)'),
    ('rrto_server.express_job', 'ExpressJob', '__init__', 'ExpressJob()'),
    ('rrto_server.express_job', 'ExpressJob', 'serve',
     'express serve (idle device: lane, replay, wait, reply)'),
    ('rrto_server.scheduler', 'Scheduler', 'take_idle', 'scheduler.take_idle'),
    ('rrto_server.express_job', 'ExpressJob', 'reply_parts',
     'express reply built (while the graph runs)'),
    ('rrto_server.scheduler', 'Scheduler', 'step_ended', 'scheduler.step_ended'),
    ('rrto_server.taskstats', 'TaskStats', 'arrived', 'tasks.arrived'),
    ('rrto_server.scheduler', 'Scheduler', '_start', 'scheduler._start'),
    ('rrto_server.scheduler', 'Scheduler', '_run_step', 'scheduler._run_step'),
    ('rrto_server.express_job', 'ExpressJob', 'step', 'express step (a preemption)'),
    ('rrto_server.replay', 'Replay', 'served', 'replay.served'),
    ('rrto_server.jobs', 'InferJob', '_count', 'tasks.ended (_count)'),
    ('rrto_server.jobs', 'InferJob', 'timing', 'timing()'),
    ('rrto_server.requests', 'Request', '_answer', '_answer (stamp, encode, send)'),
    ('rrto_server.jobs', 'InferJob', 'prepare', 'prepare (decode + start)'),
    ('rrto_wire.protocol', None, 'decode_tensors', 'decode_tensors'),
    ('rrto_server.replay', 'Replay', 'start', 'replay.start (stages large inputs)'),
    ('rrto_server.scheduler', 'Scheduler', 'run_inline', 'run_inline'),
    ('rrto_server.scheduler', 'Lane', 'run', 'lane.run (replay + sync)'),
    ('rrto_server.runner_cudagraph', 'CudaGraphRunner', 'run_segment',
     'run_segment (memcpy, replay launch, copy-back launch)'),
    ('rrto_server.express', 'ExpressPlan', 'run', 'express run (memcpy, graph launch)'),
    ('rrto_server.runner_cudagraph', None, 'copy_frame', 'copy_frame (memcpy to staging)'),
    ('rrto_server.jobs', 'InferJob', 'complete', 'complete (copy-back wait, reply)'),
    ('rrto_server.express_job', 'ExpressJob', 'complete', 'express complete (a preemption)'),
    ('rrto_server.runner', 'Execution', 'host_outputs', 'host_outputs (large copy-back)'),
    ('rrto_server.requests', 'Request', 'ok', 'ok (encode + send)'),
    ('rrto_server.requests', 'Request', 'ok_ready', 'ok_ready (express: stamp, encode, send)'),
    ('rrto_wire.protocol', None, 'encode', 'encode'),
    ('rrto_wire.protocol', None, 'encode_raw', 'encode_raw'),
    ('rrto_server.requests', 'ReplySender', 'send', 'sender.send'),
]
CLIENT_PHASES = [   # the robot's side of one call (in the client process)
    ('rrto_ros.call_path', 'CallPath', 'run', 'call (everything)'),
    # the INFER's own steps: start_infer sends from a kept header (issue 11: no start, no
    # encode past a key's first call), take waits and decodes, view_raw views exact outputs;
    # start, result and decode_tensors time the calls around them (hello, record)
    ('rrto_ros.client', 'RrtoClient', 'start_infer', 'start_infer (encode + send)'),
    ('rrto_ros.client', 'RrtoClient', 'start', 'start (encode + send)'),
    ('rrto_wire.protocol', None, 'encode', 'encode'),
    ('rrto_ros.client', 'PendingReply', 'take', 'take (wait + decode)'),
    ('rrto_ros.client', 'PendingReply', 'result', 'result (wait + decode)'),
    ('rrto_wire.replies', None, 'decode_reply', 'decode_reply'),
    ('rrto_wire.protocol', None, 'view_raw', 'view_raw'),
    ('rrto_wire.protocol', None, 'decode_tensors', 'decode_tensors'),
    ('rrto_ros.call_path', 'RemoteCall', 'record', 'record'),
]


def client(endpoint: str, arch: str, calls: int) -> None:
    """Offload ``arch`` and print the call records' medians and client phases as JSON."""
    from bench import gpu_models
    from bench.measure import offloaded_calls
    model, frame = gpu_models.build(arch)
    with instrumented(CLIENT_PHASES) as times:
        records = offloaded_calls(model, frame, endpoint, calls)
    row = {key: statistics.median(getattr(r, key) for r in records)
           for key in ('total_ms', 'server_ms', 'server_queue_ms', 'server_compute_ms',
                       'network_ms')}
    row['client_phases'] = phase_table(times, CLIENT_PHASES, calls)
    print(json.dumps(row), flush=True)


def phase_table(times: dict, phases: list, calls: int) -> dict:
    """Return label -> n, median and p90 ms over the last ``calls`` timings of each phase."""
    table = {}
    for _, _, _, label in phases:
        values = sorted(times.get(label, [])[-calls:])
        if values:
            table[label] = {'n': len(values), 'median_ms': statistics.median(values),
                            'p90_ms': values[int(0.9 * (len(values) - 1))]}
    return table


@contextlib.contextmanager
def instrumented(phases: list):
    """Wrap every phase with a timer while in the block; yield label -> durations (ms)."""
    import importlib
    times: dict[str, list[float]] = collections.defaultdict(list)
    originals = []
    for module_name, owner_name, name, label in phases:
        module = importlib.import_module(module_name)
        owner = getattr(module, owner_name) if owner_name else module
        original = getattr(owner, name)
        originals.append((owner, name, original))

        def timed(*args, _original=original, _label=label, **kwargs):
            start = time.perf_counter()
            try:
                return _original(*args, **kwargs)
            finally:
                times[_label].append((time.perf_counter() - start) * 1e3)
        setattr(owner, name, functools.wraps(original)(timed))
    try:
        yield times
    finally:
        for owner, name, original in originals:
            setattr(owner, name, original)


def measure(arch: str, device: str, calls: int, times: dict) -> dict:
    """Serve one architecture from a fresh in-process server; return its phase table."""
    from rrto_server.options import ServerConfig
    from rrto_server.server import Server
    with tempfile.TemporaryDirectory() as store:
        server = Server(ServerConfig(bind='tcp://127.0.0.1:0', store=store, device=device))
        server.start()
        try:
            times.clear()
            done = subprocess.run([sys.executable, '-m', 'bench.server_phases', '--client',
                                   server.endpoint, arch, str(calls)],
                                  capture_output=True, text=True, timeout=600)
            if done.returncode != 0:
                raise RuntimeError(f'client failed: {done.stderr[-2000:]}')
            row = {'arch': arch, 'calls': calls, **json.loads(done.stdout.splitlines()[-1])}
        finally:
            server.close()
    row['phases'] = phase_table(times, PHASES, calls)
    return row


SENDER = """
import sys, zmq
sock = zmq.Context().socket(zmq.DEALER)
sock.connect(sys.argv[1])
frame = bytes(range(256)) * (int(sys.argv[3]) // 256) + bytes(int(sys.argv[3]) % 256)
for _ in range(int(sys.argv[2])):
    sock.send_multipart([b'', frame], copy=False)
    sock.recv_multipart()
"""


def _cpu_sets() -> dict[str, tuple[int, int]]:
    """Return (receiving thread's CPU, libzmq I/O thread's CPU) for same / near / far cores."""
    import os
    cpus = sorted(os.sched_getaffinity(0))
    a = cpus[1] if len(cpus) > 1 else cpus[0]

    def shared(level: str) -> set[int]:
        path = f'/sys/devices/system/cpu/cpu{a}/{level}'
        try:
            with open(path) as f:
                text = f.read().strip()
        except OSError:
            return {a}
        out = set()
        for part in text.split(','):
            lo, _, hi = part.partition('-')
            out.update(range(int(lo), int(hi or lo) + 1))
        return out
    l3 = shared('cache/index3/shared_cpu_list') & set(cpus)
    siblings = shared('topology/thread_siblings_list')
    near = sorted(l3 - siblings - {a}) or sorted(set(cpus) - {a})
    far = sorted(set(cpus) - l3) or sorted(set(cpus) - {a})
    return {'same core': (a, a), 'near (same L3)': (a, near[0]), 'far': (a, far[-1])}


def _graph_reading(host: torch.Tensor, device: str):
    """Return a function replaying a graph shaped like the express one (reads ``host``)."""
    nbytes = host.numel()
    dev = torch.empty(nbytes, dtype=torch.uint8, device=device)
    out = torch.empty(1000, dtype=torch.float32, pin_memory=True)
    weights = torch.randn(nbytes // 1000, 1000, device=device)
    stream = torch.cuda.Stream(device)
    graph = torch.cuda.CUDAGraph()
    torch.cuda.synchronize()
    with torch.cuda.stream(stream):        # the express graph's shape: in, compute, out
        for _ in range(2):
            dev.copy_(host, non_blocking=True)
        torch.cuda.synchronize()
        with torch.cuda.graph(graph, stream=stream):
            dev.copy_(host, non_blocking=True)
            result = (dev[:nbytes // 1000 * 1000].view(-1, 1000).float() * weights).sum(0)
            out.copy_(result, non_blocking=True)
    graph.replay()
    torch.cuda.synchronize()

    def between() -> None:
        graph.replay()
        stream.synchronize()
    return between


def staging(calls: int, nbytes: int, device: str) -> list[dict]:
    """Time copy_frame into a page-locked buffer under each condition (see the docstring)."""
    import ctypes
    import os
    import numpy
    import zmq
    getcpu = ctypes.CDLL(None).sched_getcpu
    from rrto_server.transfers import byte_view, copy_frame
    cuda = device.startswith('cuda')
    host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=cuda)
    dest = byte_view(host)
    between = _graph_reading(host, device) if cuda else (lambda: None)

    def timed(source) -> float:
        start = time.perf_counter()
        copy_frame(dest, source)
        return (time.perf_counter() - start) * 1e3

    rows = []

    def row(label: str, first: list[float], second: list[float] | None = None,
            moved: int | None = None) -> None:
        entry = {'condition': label, 'median_ms': statistics.median(first),
                 'p90_ms': sorted(first)[int(0.9 * (len(first) - 1))]}
        if second:
            entry['second_copy_median_ms'] = statistics.median(second)
        if moved is not None:
            entry['thread_moved'] = moved / len(first)
        rows.append(entry)
        print(f"  {label:44s} median {entry['median_ms']:.4f} ms  p90 {entry['p90_ms']:.4f}"
              + (f"  second copy {entry['second_copy_median_ms']:.4f}" if second else '')
              + ('' if moved is None else f'  moved {entry["thread_moved"]:.2f}'), flush=True)

    source = numpy.random.default_rng(0).integers(0, 255, nbytes, dtype=numpy.uint8).tobytes()
    row('tight loop (one hot frame)', [timed(source) for _ in range(calls)])
    row('graph replay between copies', [(between(), timed(source))[1] for _ in range(calls)])
    stop = threading.Event()

    def spin() -> None:               # a CPU worker's Python, holding the GIL in turns
        while not stop.is_set():
            sum(range(200))
    spinner = threading.Thread(target=spin, daemon=True)
    spinner.start()
    interval = sys.getswitchinterval()
    try:
        for switch in (interval, 0.0005):
            sys.setswitchinterval(switch)
            row(f'a Python thread spinning beside, switch {switch * 1e3:g} ms',
                [timed(source) for _ in range(calls)])
    finally:
        sys.setswitchinterval(interval)
        stop.set()
        spinner.join()
    affinity = os.sched_getaffinity(0)
    runs = [('received, 4 I/O threads', 4, None), ('received, 1 I/O thread', 1, None)]
    runs += [(f'received, pinned {name}', 1, cpus) for name, cpus in _cpu_sets().items()]
    for label, io_threads, cpus in runs:
        ctx = zmq.Context(io_threads=io_threads)
        if cpus is not None:           # before the first socket starts libzmq's threads
            ctx.set(zmq.THREAD_AFFINITY_CPU_ADD, cpus[1])
        router = ctx.socket(zmq.ROUTER)
        router.bind('tcp://127.0.0.1:0')
        sender = subprocess.Popen([sys.executable, '-c', SENDER,
                                   router.getsockopt_string(zmq.LAST_ENDPOINT),
                                   str(calls), str(nbytes)])
        if cpus is not None:           # after the sender started (it would inherit it)
            os.sched_setaffinity(0, {cpus[0]})
        first, second, moved, cpu = [], [], 0, None
        try:
            for _ in range(calls):
                frames = router.recv_multipart(copy=False)
                now = getcpu()
                moved += cpu is not None and now != cpu
                cpu = now
                first.append(timed(frames[-1].buffer))
                second.append(timed(frames[-1].buffer))
                between()
                router.send_multipart([frames[0], b''])
            sender.wait(60)
        finally:
            sender.kill()
            os.sched_setaffinity(0, affinity)
            router.close(linger=0)
            ctx.term()
        row(label + ('' if cpus is None else f' (thread {cpus[0]}, libzmq {cpus[1]})'),
            first, second, moved)
    return rows


BULK_SENDER = """
import sys, time, zmq
sock = zmq.Context().socket(zmq.DEALER)
sock.connect(sys.argv[1])
frame = bytes(int(sys.argv[2]))
stop = time.monotonic() + float(sys.argv[3])
while time.monotonic() < stop:
    sock.send_multipart([b'', frame], copy=False)
    sock.recv_multipart()
"""
URGENT_SENDER = """
import json, sys, time, zmq
sock = zmq.Context().socket(zmq.DEALER)
sock.connect(sys.argv[1])
frame = bytes(int(sys.argv[2]))
period, stop, rtt = float(sys.argv[3]), time.monotonic() + float(sys.argv[4]), []
while time.monotonic() < stop:
    start = time.monotonic()
    sock.send_multipart([b'', frame], copy=False)
    sock.recv_multipart()
    rtt.append((time.monotonic() - start) * 1e3)
    time.sleep(max(0.0, start + period - time.monotonic()))
print(json.dumps(rtt[5:]))
"""
BULK_BYTES = 32 * 3 * 224 * 224 * 4      # bench.sched_mix's best-effort batch (19 MB)
URGENT_BYTES = 3 * 224 * 224 * 4         # its urgent frame (600 KB)


def _spread(values: list[float]) -> dict:
    values = sorted(values)
    return {'n': len(values), 'median_ms': statistics.median(values),
            'p99_ms': values[int(0.99 * (len(values) - 1))], 'max_ms': values[-1]}


def interference(device: str, seconds: float = 2.0) -> list[dict]:
    """
    Time an urgent frame's path beside a best-effort batch's, one stage at a time.

    Receive: a ROUTER answering every message at once, an urgent sender (600 KB every
    5 ms) alone and beside a sender of 19 MB batches, with 1 and 4 libzmq I/O threads.
    Stage: an express-shaped CUDA graph (600 KB in from page-locked memory, compute,
    out) replayed and waited for every 2 ms, alone and while another thread stages
    19 MB batches with :func:`rrto_server.transfers.stage`, whole and in pieces.
    """
    import zmq
    from rrto_server import transfers
    rows = []
    for io_threads, bulk in ((4, False), (4, True), (1, True)):
        ctx = zmq.Context(io_threads=io_threads)
        router = ctx.socket(zmq.ROUTER)
        router.bind('tcp://127.0.0.1:0')
        endpoint = router.getsockopt_string(zmq.LAST_ENDPOINT)
        senders = [subprocess.Popen([sys.executable, '-c', URGENT_SENDER, endpoint,
                                     str(URGENT_BYTES), '0.005', str(seconds)],
                                    stdout=subprocess.PIPE, text=True)]
        if bulk:
            senders.append(subprocess.Popen([sys.executable, '-c', BULK_SENDER, endpoint,
                                             str(BULK_BYTES), str(seconds + 1.0)]))
        try:
            while senders[0].poll() is None:
                if router.poll(50):
                    frames = router.recv_multipart(copy=False)
                    router.send_multipart([frames[0], b''])
            rtt = json.loads(senders[0].stdout.read())
        finally:
            for sender in senders:
                sender.kill()
            router.close(linger=0)
            ctx.term()
        rows.append({'stage': 'receive', 'io_threads': io_threads, 'bulk': bulk,
                     **_spread(rtt)})
        print(f"  receive: 600 KB round trip, {io_threads} I/O threads, "
              f"{'beside 19 MB batches' if bulk else 'alone'}: {rows[-1]}", flush=True)
    if not device.startswith('cuda'):
        return rows
    host = torch.empty(URGENT_BYTES, dtype=torch.uint8, pin_memory=True)
    step = _graph_reading(host, device)
    batch = torch.randn(32, 3, 224, 224)
    dev = torch.device(device)
    for label, chunk in (('alone', 0), ('whole', BULK_BYTES), ('1 MiB pieces', 1 << 20),
                         ('4 MiB pieces', 4 << 20)):
        stop = threading.Event()

        def stager(chunk=chunk) -> None:
            while not stop.is_set():
                transfers.stage([batch], dev, chunk)
        thread = threading.Thread(target=stager, daemon=True) if chunk != 0 else None
        if thread is not None:
            thread.start()
        times = []
        try:
            end = time.perf_counter() + seconds
            while time.perf_counter() < end:
                start = time.perf_counter()
                step()
                times.append((time.perf_counter() - start) * 1e3)
                time.sleep(0.002)
        finally:
            stop.set()
            if thread is not None:
                thread.join()
        rows.append({'stage': 'express step', 'staging': label, **_spread(times[5:])})
        print(f'  express step, 19 MB staging beside: {label}: {rows[-1]}', flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog='bench.server_phases', description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    parser.add_argument('--archs', nargs='+', default=['keypoint_net', 'mobilenet'])
    parser.add_argument('--calls', type=int, default=400)
    parser.add_argument('--out', help='write the results as JSON here')
    parser.add_argument('--staging', type=int, metavar='BYTES', nargs='?', const=3 * 224 * 224,
                        help='time the staging memcpy of a BYTES frame (default 150528) under '
                             'each condition instead (CUDA)')
    parser.add_argument('--interference', action='store_true',
                        help="time an urgent frame's receive and express step beside a 19 MB "
                             "batch's receive and staging instead (CUDA)")
    parser.add_argument('--client', nargs=3, metavar=('ENDPOINT', 'ARCH', 'CALLS'),
                        help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.client:
        client(args.client[0], args.client[1], int(args.client[2]))
        return 0
    from bench.machine import write_results
    if args.staging or args.interference:
        rows = (staging(args.calls, args.staging, args.device) if args.staging
                else interference(args.device))
        if args.out:
            write_results(args.out, 'python -m bench.server_phases', argv, rows)
        return 0
    rows = []
    for arch in args.archs:
        with instrumented(PHASES) as times:
            row = measure(arch, args.device, args.calls, times)
        print(f"{arch}: total {row['total_ms']:.3f} ms, server {row['server_ms']:.3f} ms, "
              f"queue {row['server_queue_ms']:.3f} ms, compute {row['server_compute_ms']:.3f} ms")
        for side in ('phases', 'client_phases'):
            print(f'  {side}:')
            for label, p in row[side].items():
                print(f"    {label:54s} n={p['n']:4d}  median {p['median_ms']:.4f} ms  "
                      f"p90 {p['p90_ms']:.4f} ms")
        rows.append(row)
    if args.out:
        write_results(args.out, 'python -m bench.server_phases', argv, rows)
    return 0


if __name__ == '__main__':
    raise SystemExit(main())
