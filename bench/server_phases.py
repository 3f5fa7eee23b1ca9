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
import time

import torch

PHASES = [   # (module, owner, function, label), in request order
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
    ('rrto_server.server', 'Server', '_express', '_express (inline limit, accept)'),
    ('rrto_server.express', 'ExpressPlan', 'accept', 'express accept (frame checks)'),
    ('rrto_server.jobs', 'ExpressJob', '__init__', 'ExpressJob()'),
    ('rrto_server.taskstats', 'TaskStats', 'arrived', 'tasks.arrived'),
    ('rrto_server.scheduler', 'Scheduler', '_start', 'scheduler._start'),
    ('rrto_server.scheduler', 'Scheduler', '_run_step', 'scheduler._run_step'),
    ('rrto_server.jobs', 'ExpressJob', 'step', 'express step'),
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
    ('rrto_server.jobs', 'ExpressJob', 'complete', 'express complete (encode + send)'),
    ('rrto_server.runner', 'Execution', 'host_outputs', 'host_outputs (large copy-back)'),
    ('rrto_server.requests', 'Request', 'ok', 'ok (encode + send)'),
    ('rrto_server.requests', 'Request', 'ok_raw', 'ok_raw (express: header + send)'),
    ('rrto_wire.protocol', None, 'encode', 'encode'),
    ('rrto_wire.protocol', None, 'encode_raw', 'encode_raw'),
    ('rrto_server.requests', 'ReplySender', 'send', 'sender.send'),
]
CLIENT_PHASES = [   # the robot's side of one call (in the client process)
    ('rrto_ros.call_path', 'CallPath', 'run', 'call (everything)'),
    ('rrto_ros.client', 'RrtoClient', 'start', 'start (encode + send)'),
    ('rrto_wire.protocol', None, 'encode', 'encode'),
    ('rrto_ros.client', 'PendingReply', 'result', 'result (wait + decode)'),
    ('rrto_wire.replies', None, 'decode_reply', 'decode_reply'),
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog='bench.server_phases', description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    parser.add_argument('--archs', nargs='+', default=['keypoint_net', 'mobilenet'])
    parser.add_argument('--calls', type=int, default=400)
    parser.add_argument('--out', help='write the results as JSON here')
    parser.add_argument('--client', nargs=3, metavar=('ENDPOINT', 'ARCH', 'CALLS'),
                        help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.client:
        client(args.client[0], args.client[1], int(args.client[2]))
        return 0
    from bench.machine import write_results
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
