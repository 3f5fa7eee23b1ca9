"""
``make demo``: offload a built-in model to a local server and print what it cost.

Starts ``python -m rrto_server`` on loopback (CPU unless CUDA is present),
offloads ResNet-18 with on-server normalisation, feeds it synthetic 224x224
camera frames at a fixed rate for ``--duration`` seconds, checks every
offloaded answer against local inference, and ends with a summary of calls,
round trips, latency percentiles and fallbacks.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import subprocess
import sys
import tempfile
import time

import torch

from rrto_ros import OffloadResult, offload
from rrto_ros.preprocess import WithImageInput
from rrto_ros.zoo import ARCHITECTURES


def percentile(values: list[float], q: float) -> float:
    """Return the nearest-rank q-th percentile of ``values`` (q in 0..100)."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))]


def summary(records: list, stats: dict, mismatches: int) -> str:
    """Format the end-of-run summary."""
    totals = [r.total_ms for r in records]
    offloaded = [r for r in records if r.result == OffloadResult.OFFLOADED]
    lines = [
        f'calls {stats["calls"]}: offloaded {stats["offloaded"]}, local {stats["local"]}, '
        f'fallbacks {stats["fallbacks"]}',
        f'round trips {stats["round_trips"]} in all, {stats["infer_round_trips"]} for inference '
        f'({stats["infer_round_trips"] / max(1, len(offloaded)):.2f} per offloaded call); '
        f'uploads {stats["uploads"]}, records {stats["records"]}',
    ]
    if totals:
        lines.append('latency ms: p50 {:.2f}  p90 {:.2f}  p99 {:.2f}  max {:.2f}'.format(
            percentile(totals, 50), percentile(totals, 90), percentile(totals, 99), max(totals)))
    if offloaded:
        lines.append('offloaded call ms (median): total {:.2f} = network {:.2f} + server queue '
                     '{:.2f} + server compute {:.2f} + robot {:.2f}'.format(
                         statistics.median(r.total_ms for r in offloaded),
                         statistics.median(r.network_ms for r in offloaded),
                         statistics.median(r.server_queue_ms for r in offloaded),
                         statistics.median(r.server_compute_ms for r in offloaded),
                         statistics.median(r.robot_compute_ms for r in offloaded)))
    lines.append(f'answers differing from local inference: {mismatches}')
    return '\n'.join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--duration', type=float, default=20.0, help='seconds to run')
    parser.add_argument('--rate', type=float, default=15.0, help='camera frames per second')
    parser.add_argument('--model', choices=sorted(ARCHITECTURES), default='resnet18')
    parser.add_argument('--port', type=int, default=5555)
    parser.add_argument('--timeout-ms', type=float, default=500.0)
    args = parser.parse_args(argv)
    if args.duration <= 0 or args.rate <= 0:
        parser.error('--duration and --rate must be positive')
    logging.basicConfig(level=logging.WARNING, format='%(levelname)s %(name)s: %(message)s')
    endpoint = f'tcp://127.0.0.1:{args.port}'
    store = tempfile.mkdtemp(prefix='rrto-demo-store-')
    server = subprocess.Popen([sys.executable, '-m', 'rrto_server', '--bind', endpoint,
                               '--store', store, '--log-level', 'WARNING'])
    model = WithImageInput(ARCHITECTURES[args.model]()).eval()
    frames = torch.randint(0, 256, (8, 1, 224, 224, 3), dtype=torch.uint8)
    records, mismatches = [], 0
    try:
        with offload(model, server=endpoint, timeout_ms=args.timeout_ms) as om:
            print(f'rrto demo: {args.model} on {endpoint}, '
                  f'{args.rate:g} Hz for {args.duration:g} s')
            om.warmup(frames[0], timeout_s=120)
            period, start = 1.0 / args.rate, time.monotonic()
            tick = start
            while time.monotonic() - start < args.duration:
                frame = frames[len(records) % len(frames)]
                out = om(frame)
                records.append(om.last)
                if om.last.result == OffloadResult.OFFLOADED:
                    with torch.inference_mode():
                        mismatches += int(not torch.allclose(out, model(frame), rtol=1e-5, atol=0))
                tick += period
                time.sleep(max(0.0, tick - time.monotonic()))
            print(summary(records, om.stats(), mismatches))
    finally:
        server.terminate()
        server.wait(10)
    return 0 if mismatches == 0 else 1


if __name__ == '__main__':
    sys.exit(main())
