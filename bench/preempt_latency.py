r"""
Preemption latency: how long an urgent request waits for a running inference.

For each zoo architecture (the *preempted* network, recorded with each given
segment granularity) a low-priority client runs it back to back while a
high-priority client sends a small network periodically, at a rate unrelated
to the low one's period.  The server measures, for each high-priority request
that found the low-priority inference on the device (and nothing more urgent
queued), the time from its arrival at the scheduler to the start of its first
segment: the preemption latency.  Reported per (architecture, granularity):
its distribution, the longest solo segment of the preempted network, the
share of samples within one segment, and the low network's latency against
its solo time (the cost of waiting for every segment).

Examples::

    python -m bench.preempt_latency --duration 10                  # CPU, this machine
    python -m bench.preempt_latency --device cuda --duration 10 \\
        --granularity whole block:3 ops:8 --out preempt_h100.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

from bench.sched_mix import (TaskSpec, start_server, _clean, _gpu_name, export,
                             prepare, run_clients, server_stats)
from rrto_wire.summary import percentile

SHAPES = {
    'cpu': {'resnet18': (1, 3, 224, 224), 'mobilenet': (1, 3, 160, 160),
            'keypoint_net': (1, 3, 96, 128)},
    'cuda': {'resnet18': (8, 3, 224, 224), 'mobilenet': (8, 3, 224, 224),
             'keypoint_net': (8, 3, 256, 320)},
}
PROBE_SHAPE = (1, 3, 64, 64)
TARGET_MS = 1.0
SLACK_MS = 0.1          # scheduling overhead allowed on top of one segment


def measure(endpoint: str, arch: str, shape: tuple, granularity: str, args,
            artifacts: dict) -> dict:
    """Run one (architecture, granularity) pair; return its figures."""
    low = TaskSpec(f'low/{arch}/{granularity}', arch, shape, 0, 0.0, None, granularity)
    high = TaskSpec(f'high/{arch}/{granularity}', 'keypoint_net', PROBE_SHAPE, 1,
                    args.rate, None, 'whole')
    for spec in (low, high):
        key = (spec.arch, spec.shape)
        if key not in artifacts:
            artifacts[key] = export(spec)
    replays = {spec.name: prepare(endpoint, spec, artifacts[(spec.arch, spec.shape)])
               for spec in (low, high)}
    releases = run_clients([low, high], endpoint, replays, args.duration, args.clients)
    stats = server_stats(endpoint)
    info = next(r for r in stats['replays'] if r['replay'] == replays[low.name])
    max_segment = max(info['segment_ms'])
    preempt = stats['tasks'][high.name]['preempt_ms']
    low_latency = [(r['end'] - r['send']) * 1e3 for r in releases[low.name]
                   if r['outcome'] == 'ok']
    within = None
    if preempt.get('n'):
        # the server keeps percentiles; "within one segment" is judged on p99 and max
        within = {'p99': preempt['p99'] <= max_segment + SLACK_MS,
                  'max': preempt['max'] <= max_segment + SLACK_MS}
    return {'arch': arch, 'shape': list(shape), 'granularity': granularity,
            'segments': info['segments'], 'max_segment_ms': max_segment,
            'solo_ms': sum(info['segment_ms']), 'preempt_ms': preempt,
            'within_one_segment': within,
            'meets_target': bool(preempt.get('n')) and preempt['p99'] <= TARGET_MS,
            'low_latency_ms_p50': percentile(low_latency, 50),
            'low_inferences': len(low_latency)}


def table(rows: list[dict]) -> str:
    """Return a markdown table, one row per (architecture, granularity)."""
    lines = ['| arch | granularity | segments | longest segment ms | preempt p50 / p99 / max ms '
             '(n) | within 1 segment (p99, max) | p99 < 1 ms | low p50 ms vs solo |',
             '|---' * 8 + '|']
    for r in rows:
        p = r['preempt_ms']
        pre = (f"{p['p50']:.3f} / {p['p99']:.3f} / {p['max']:.3f} ({p['n']})"
               if p.get('n') else 'no samples')
        within = r['within_one_segment']
        within_txt = '-' if within is None else f"{within['p99']}, {within['max']}"
        low = r['low_latency_ms_p50']
        low_txt = '-' if low is None else f"{low:.2f} vs {r['solo_ms']:.2f}"
        lines.append(f"| {r['arch']} {tuple(r['shape'])} | {r['granularity']} | "
                     f"{r['segments']} | {r['max_segment_ms']:.3f} | {pre} | {within_txt} | "
                     f"{r['meets_target']} | {low_txt} |")
    return '\n'.join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog='bench.preempt_latency', description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--device', default='cpu')
    parser.add_argument('--arch', nargs='+', default=['resnet18', 'mobilenet', 'keypoint_net'])
    parser.add_argument('--granularity', nargs='+', default=['block:3', 'ops:8'])
    parser.add_argument('--batch', type=int, help='override the batch size of every network')
    parser.add_argument('--duration', type=float, default=10.0, help='seconds per pair')
    parser.add_argument('--rate', type=float, default=47.0,
                        help='high-priority requests per second (default: %(default)s)')
    parser.add_argument('--clients', choices=('processes', 'threads'), default='processes')
    parser.add_argument('--out', help='write the results as JSON here')
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    """Run the benchmark; print a table and return (and optionally save) the results."""
    args = parse_args(argv)
    shapes = SHAPES['cuda' if args.device.startswith('cuda') else 'cpu']
    rows = []
    with tempfile.TemporaryDirectory(prefix='rrto-preempt-') as tmp:
        store = Path(tmp) / 'store'
        store.mkdir()
        server = start_server(store, args.device, 'preemptive', 0.0)
        artifacts: dict = {}
        try:
            for arch in args.arch:
                shape = shapes[arch]
                if args.batch:
                    shape = (args.batch,) + tuple(shape[1:])
                for granularity in args.granularity:
                    rows.append(measure(server.endpoint, arch, shape, granularity, args,
                                        artifacts))
        finally:
            server.stop()
    results = _clean({'meta': {
        'command': ' '.join(['python -m bench.preempt_latency'] + (argv or sys.argv[1:])),
        'date': time.strftime('%Y-%m-%d %H:%M:%S %Z'), 'host': platform.node(),
        'cpus': os.cpu_count(), 'device': args.device, 'gpu': _gpu_name(args.device),
        'server_command': ' '.join(server.command), 'target_ms': TARGET_MS},
        'rows': rows})
    print(table(results['rows']))
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1))
    return results


if __name__ == '__main__':
    main()
