"""
Fleet replicas on GPUs, without Ray: CUDA-graph capture inside a replica, directory path cost.

One :class:`~rrto_fleet.replica.Replica` per visible GPU (``cuda:i``, one
shared store), the directory and its ZeroMQ front in this process, and robots
in a child process (``--robot``): one offloads through the directory, one
straight to the holder's endpoint (the single-server path).  For each
architecture it records what the replica captured (``backend``, expected
``cudagraph``), the largest relative error against the robot's CPU result
(strict fp32), and the median and P99 call time of both paths, alternating.

Ray itself is not needed here: the replica is the code a Ray actor runs.

Usage: ``python -m bench.fleet_gpu --archs resnet18 keypoint_net --calls 300 --out OUT.json``
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
from bench.measure import percentile
from rrto_wire import treespec

FP32_TOL = 1e-4     # as test_gpu: strict fp32 differs from the CPU only by reduction order


def _rel_error(actual, expected) -> float:
    """Return max |diff| / max |ref| over every output tensor (as test_gpu states it)."""
    pairs = zip(treespec.flatten(actual)[0], treespec.flatten(expected)[0])
    return max(float((a.float() - e.float()).abs().max() / e.float().abs().max().clamp_min(1e-12))
               for a, e in pairs)


def robot(directory: str, arch: str, calls: int) -> dict:
    """Offload ``arch`` through the directory and straight to its holder; return the timings."""
    from rrto_ros import offload, OffloadResult
    from rrto_ros.preprocess import WithImageInput
    from rrto_ros.zoo import ARCHITECTURES
    torch.manual_seed(0)
    model = WithImageInput(ARCHITECTURES[arch]()).eval()
    frame = torch.randint(0, 255, (1, 224, 224, 3), dtype=torch.uint8)
    with torch.no_grad():
        expected = model(frame)
    via = offload(model, timeout_ms=2000, directory=directory)
    assert via.warmup(frame, timeout_s=300), 'not warmed through the directory'
    holder = via.data.resolver.endpoints('')[0]     # one replica per GPU; one GPU: the holder
    direct = offload(model, server=holder, timeout_ms=2000)
    assert direct.warmup(frame, timeout_s=300), 'not recorded on the replica'
    times = {'directory': [], 'direct': []}
    errors, results = [], []
    for i in range(calls * 2):
        name, om = (('directory', via), ('direct', direct))[i % 2]
        with torch.no_grad():
            out = om(frame)
        results.append(om.last.result == OffloadResult.OFFLOADED)
        times[name].append(om.last.total_ms)
        errors.append(_rel_error(out, expected))
    via.close()
    direct.close()
    row = {'arch': arch, 'calls': calls, 'offloaded': sum(results), 'holder': holder,
           'max_rel_error': max(errors), 'within_fp32_tol': max(errors) <= FP32_TOL}
    for name, values in times.items():
        row[f'{name}_median_ms'] = statistics.median(values[10:])
        row[f'{name}_p99_ms'] = percentile(values[10:], 99)
    row['directory_minus_direct_ms'] = row['directory_median_ms'] - row['direct_median_ms']
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--archs', nargs='+', default=['resnet18'])
    parser.add_argument('--calls', type=int, default=300, help='calls per path (alternating)')
    parser.add_argument('--device', default='cuda', help="'cuda' (one replica per GPU) or 'cpu'")
    parser.add_argument('--out', default=None)
    parser.add_argument('--robot', default=None, metavar='DIRECTORY', help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.robot:
        print(json.dumps(robot(args.robot, args.archs[0], args.calls)))
        return 0
    from rrto_fleet.directory import Directory
    from rrto_fleet.front import Front
    from rrto_fleet.replica import Replica
    from rrto_server.process import child_env
    from rrto_server.server import ServerConfig
    store = tempfile.mkdtemp(prefix='rrto-fleet-gpu-')
    devices = ([f'cuda:{i}' for i in range(torch.cuda.device_count())]
               if args.device == 'cuda' else ['cpu'])
    replicas = [Replica(ServerConfig(bind='tcp://127.0.0.1:0', store=store, device=device))
                for device in devices]
    directory = Directory({f'gpu{i}': r for i, r in enumerate(replicas)})
    directory.poll()
    front = Front(directory, 'tcp://127.0.0.1:*').start()
    rows = []
    try:
        for arch in args.archs:
            started = time.monotonic()
            child = subprocess.run(
                [sys.executable, '-m', 'bench.fleet_gpu', '--robot', front.endpoint,
                 '--archs', arch, '--calls', str(args.calls)],
                env=child_env(), capture_output=True, text=True, timeout=400)
            if child.returncode != 0:
                rows.append({'arch': arch, 'error': child.stderr[-2000:]})
                continue
            row = json.loads(child.stdout.strip().splitlines()[-1])
            row['seconds'] = round(time.monotonic() - started, 1)
            row['backends'] = sorted({r['backend'] for rep in replicas
                                      for r in rep.server.snapshot()['replays']})
            row['holders'] = directory.snapshot()['models']
            row['devices'] = [str(r.server.device) for r in replicas]
            rows.append(row)
            print(json.dumps(row), flush=True)
    finally:
        front.close()
        for replica in replicas:
            replica.close()
    if args.out:
        write_results(args.out, 'python -m bench.fleet_gpu', argv, rows)
    return 0 if all('error' not in r for r in rows) else 1


if __name__ == '__main__':
    sys.exit(main())
