"""
Torchvision detectors through partitioned offload; whole-model architectures in one round trip.

Needs torchvision (the GPU host has it).  A ``rrto_server`` child process
serves on ``--device``; the robot is this process on the host CPU.  Per
detector (random weights, ``weights=None, weights_backbone=None``): the
partition (subgraphs, FLOPs on the server by ``FlopCounterMode``), round
trips per call, outputs against local execution on the CPU (same boxes,
scores and labels, in the same order?), and the latency of the partitioned
call against the whole model on the host CPU and eager on the server's GPU.
Per whole-model architecture: one call offloaded in one round trip, not
partitioned, outputs against local.  Results are written after each model,
so a run cut short keeps what it measured.

    python -m bench.detectors --device cuda --part detectors --out detectors.json
    python -m bench.detectors --device cuda --part whole --out whole.json
    python -m bench.detectors --device cuda --part all --out-dir OUT --budget-s 170
    python -m bench.detectors --part breaks --out breaks.json

``--part all`` runs one child process (with its own server) per detector and
two for the whole models at once, so that exporting and compiling overlap
(see :func:`fan_out`), and writes ``detectors.json``, ``whole.json`` and
``detectors.log`` into ``--out-dir``.  ``--part breaks --out breaks.json``
asks dynamo where and why it breaks each detector's graphs under the
partition's settings (:func:`graph_breaks`; no server).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import fcntl
import json
import logging
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import torch

from bench.machine import write_results
from rrto_ros import offload, partition
from rrto_ros.partition import DYNAMO_CONFIG
from rrto_ros.partition_report import graph_breaks as explain_breaks
from rrto_server.process import ServerProcess
from rrto_wire import treespec

DETECTORS = ['ssdlite320_mobilenet_v3_large', 'fasterrcnn_mobilenet_v3_large_320_fpn',
             'retinanet_resnet50_fpn', 'keypointrcnn_resnet50_fpn']
# the thirteen architectures of issue 12 that offload whole, with their input shapes
WHOLE = {'resnet50': (1, 3, 224, 224), 'mobilenet_v3_large': (1, 3, 224, 224),
         'efficientnet_b0': (1, 3, 224, 224), 'convnext_tiny': (1, 3, 224, 224),
         'regnet_y_400mf': (1, 3, 224, 224), 'shufflenet_v2_x1_0': (1, 3, 224, 224),
         'densenet121': (1, 3, 224, 224), 'squeezenet1_1': (1, 3, 224, 224),
         'vit_b_16': (1, 3, 224, 224), 'swin_t': (1, 3, 224, 224),
         'deeplabv3_mobilenet_v3_large': (1, 3, 224, 224),
         'lraspp_mobilenet_v3_large': (1, 3, 224, 224), 'r3d_18': (1, 3, 8, 112, 112)}
# torchvision's detectors resize inside; these keep that resize at the input size
RESIZED = ('fasterrcnn', 'retinanet', 'keypointrcnn', 'maskrcnn')


def build(name: str, size: int) -> torch.nn.Module:
    """Return a torchvision model with random (seeded) weights, in eval mode."""
    import torchvision
    torch.manual_seed(0)
    config: dict[str, Any] = {'weights': None}
    if name in DETECTORS or name.startswith(('deeplab', 'lraspp')):
        config['weights_backbone'] = None
    if name.startswith(RESIZED):
        config.update(min_size=size, max_size=size)
    return torchvision.models.get_model(name, **config).eval()


def _timed(fn: Callable[[], Any], iters: int, sync: bool = False) -> tuple[float, Any]:
    """Return the median wall time of ``iters`` calls (ms) after one warm call, and an output."""
    out = fn()
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        out = fn()
        if sync:
            torch.cuda.synchronize()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times), out


def _local(model: torch.nn.Module, inputs: tuple) -> Any:
    with torch.inference_mode():
        return model(*inputs)


def compare(actual: Any, expected: Any) -> dict:
    """
    Return how far ``actual`` is from ``expected``, output by output.

    ``identical``: every output ``torch.equal``; ``exact_integers``: every integer
    or bool output (labels) equal, which with equal shapes means the same
    detections in the same order; ``max_abs_diff`` and ``max_rel_diff`` over
    the floating outputs (relative to the largest magnitude of that output).
    """
    got = [t.cpu() for t in treespec.flatten(actual)[0]]
    want = [t.cpu() for t in treespec.flatten(expected)[0]]
    same_shapes = len(got) == len(want) and all(a.shape == b.shape for a, b in zip(got, want))
    pairs = [(a, b) for a, b in zip(got, want) if a.shape == b.shape and a.numel()]
    diff = max((float((a.double() - b.double()).abs().max()) for a, b in pairs), default=0.0)
    rel = max((float((a.double() - b.double()).abs().max() / max(b.double().abs().max(), 1e-12))
               for a, b in pairs if b.is_floating_point()), default=0.0)
    integers = [(a, b) for a, b in zip(got, want) if not b.is_floating_point()]
    return {'identical': same_shapes and all(torch.equal(a, b) for a, b in zip(got, want)),
            'same_shapes': same_shapes, 'max_abs_diff': diff, 'max_rel_diff': rel,
            'exact_integers': same_shapes and all(torch.equal(a, b) for a, b in integers),
            'shapes': [list(a.shape) for a in got], 'local_shapes': [list(b.shape) for b in want]}


def _median(records: list, key: str) -> float:
    return statistics.median(getattr(r, key) for r in records)


class Turn:
    """Prepare in parallel, time one at a time: a barrier over ready files, then a file lock."""

    def __init__(self, directory: str | None, peers: int, wait_s: float):
        self.directory, self.peers = directory, peers
        self.until = time.monotonic() + wait_s
        self._lock = None

    def ready(self, name: str) -> None:
        """Say this process has prepared; wait for the others (at most ``wait_s`` from start)."""
        if self.directory is None:
            return
        Path(self.directory, f'{name}.ready').touch()
        while (len(list(Path(self.directory).glob('*.ready'))) < self.peers
               and time.monotonic() < self.until):
            time.sleep(0.2)

    def __enter__(self) -> 'Turn':
        if self.directory is not None:
            self._lock = open(Path(self.directory, 'timing.lock'), 'w')
            fcntl.flock(self._lock, fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._lock is not None:
            fcntl.flock(self._lock, fcntl.LOCK_UN)
            self._lock.close()


def detector_row(name: str, endpoint: str, size: int, iters: int, device: str,
                 turn: Turn, dynamic: bool = True, chain: bool = True) -> dict:
    """
    Measure one detector: partition, round trips, equality, latency against local and GPU.

    ``dynamic`` False partitions as before dynamic programs (session 3): every
    operator with a data-dependent output size breaks the graph, so RoIAlign
    and its per-level ``torch.where`` run on the robot.  ``chain`` False
    partitions as before chained programs (session 4): one round trip per
    remote subgraph (:mod:`rrto_ros.partition_chain`).
    """
    partition.CHAIN = chain
    torch.compiler.reset()
    model = build(name, size)
    image = torch.rand(3, size, size, generator=torch.Generator().manual_seed(1))
    inputs = ([image],)
    expected = _local(model, inputs)
    row: dict[str, Any] = {'model': name, 'input': [3, size, size], 'dynamic': dynamic,
                           'chain': chain}
    with _capture_dynamic(dynamic), offload(model, server=endpoint, timeout_ms=60000,
                                            record_timeout_ms=240000) as om:
        start = time.perf_counter()
        row['ready'] = om.warmup(*inputs, timeout_s=240)
        row['prepare_s'] = time.perf_counter() - start
        out = om(*inputs)   # the first call after preparation
        turn.ready(name)
        with turn:
            row['local_cpu_ms'], _ = _timed(lambda: _local(model, inputs), iters)
            records = []
            for _ in range(iters):
                out = om(*inputs)
                records.append(om.last)
            if device.startswith('cuda'):
                gpu = copy.deepcopy(model).to(device)
                on_gpu = ([image.to(device)],)
                row['gpu_eager_ms'], eager = _timed(lambda: _local(gpu, on_gpu), iters, sync=True)
                row['vs_gpu_eager'] = compare(out, eager)
        row['partition'] = om.partition.describe() if om.partition else None
        row.update({
            'results': [r.result.value for r in records],
            'reasons': sorted({r.reason for r in records if r.reason}),
            'round_trips': [r.round_trips for r in records],
            'remote_subgraphs': [r.remote_subgraphs for r in records],
            'local_subgraphs': [r.local_subgraphs for r in records],
            'eager_subgraphs': [r.eager_subgraphs for r in records],
            'offloaded_ms': _median(records, 'total_ms'),
            'robot_ms': _median(records, 'robot_compute_ms'),
            'network_ms': _median(records, 'network_ms'),
            'server_ms': _median(records, 'server_ms'),
            'server_compute_ms': _median(records, 'server_compute_ms'),
            'bytes_sent': records[-1].bytes_sent, 'bytes_received': records[-1].bytes_received,
            'vs_local': compare(out, expected), 'stats': om.stats()})
    row['speedup_vs_local_cpu'] = row['local_cpu_ms'] / row['offloaded_ms']
    return row


@contextlib.contextmanager
def _capture_dynamic(on: bool):
    """Partition with data-dependent operators inside graphs (``on``) or breaking them."""
    saved = DYNAMO_CONFIG['capture_dynamic_output_shape_ops']
    DYNAMO_CONFIG['capture_dynamic_output_shape_ops'] = on
    try:
        yield
    finally:
        DYNAMO_CONFIG['capture_dynamic_output_shape_ops'] = saved


def graph_breaks(name: str, size: int) -> dict:
    """Return where and why dynamo breaks a detector's graphs under the partition's settings."""
    model = build(name, size)
    image = torch.rand(3, size, size, generator=torch.Generator().manual_seed(1))
    return {'model': name, 'input': [3, size, size],
            **explain_breaks(model, ([image],), DYNAMO_CONFIG)}


def whole_row(name: str, endpoint: str) -> dict:
    """Offload one whole-model architecture: one round trip, not partitioned, equal to local."""
    model = build(name, 0)
    x = torch.rand(*WHOLE[name], generator=torch.Generator().manual_seed(1))
    expected = _local(model, (x,))
    with offload(model, server=endpoint, timeout_ms=60000, record_timeout_ms=240000) as om:
        start = time.perf_counter()
        ready = om.warmup(x, timeout_s=240)
        prepare_s = time.perf_counter() - start
        out = om(x)
        record = om.last
        return {'model': name, 'input': list(x.shape), 'ready': ready, 'prepare_s': prepare_s,
                'result': record.result.value, 'plan': record.plan, 'reason': record.reason,
                'round_trips': record.round_trips, 'partitioned': om.partition is not None,
                'offloaded_ms': record.total_ms, 'vs_local': compare(out, expected)}


def fan_out(args: argparse.Namespace) -> None:
    """
    Run one child per detector and two for the whole models at once; merge their results.

    Detector children prepare at once, then time one at a time; every child
    keeps one torch thread count (all cores) throughout, since dynamo guards
    on it (a change recompiles every graph); the whole-model children
    (correctness only) run at nice 19 on two threads beside them.  Children still running
    after ``--budget-s`` are killed; what they wrote stays.
    """
    whole = list(WHOLE)
    groups = [('detectors', [d]) for d in DETECTORS]
    if not args.skip_whole:
        groups += [('whole', whole[:7]), ('whole', whole[7:])]
    cores = len(os.sched_getaffinity(0))
    started = time.monotonic()
    with tempfile.TemporaryDirectory() as sync, \
            open(Path(args.out_dir, 'detectors.log'), 'w') as log:
        children = []
        for i, (part, models) in enumerate(groups):
            command = [sys.executable, '-m', 'bench.detectors', '--part', part, '--models',
                       *models, '--device', args.device, '--size', str(args.size),
                       '--iters', str(args.iters), '--out', str(Path(sync, f'{i}.json')),
                       '--sync', sync, '--peers', str(len(DETECTORS)),
                       '--threads', str(cores if part == 'detectors' else 2),
                       '--budget-s', str(args.budget_s - 45)] + (
                           ['--static-too'] if args.static_too else []) + (
                           ['--unchained-too'] if args.unchained_too else [])
            nice = (lambda: os.nice(19)) if part != 'detectors' else None
            children.append(subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT,
                                             preexec_fn=nice))
        for child in children:
            try:
                child.wait(timeout=max(1.0, args.budget_s - (time.monotonic() - started)))
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait()
        _shorten(Path(args.out_dir, 'detectors.log'))
        for part in ('detectors', 'whole'):
            rows = []
            for i, (kind, _) in enumerate(groups):
                path = Path(sync, f'{i}.json')
                if kind == part and path.exists():
                    rows += json.loads(path.read_text())['results']
            write_results(str(Path(args.out_dir, f'{part}.json')), 'python -m bench.detectors',
                          None, rows)


def _shorten(log: Path) -> None:
    """Drop the graphs ``torch.export`` prints when it fails (the expected failure here)."""
    lines = log.read_text(errors='replace').splitlines()
    kept = [line[:400] for line in lines if line.strip() and not line.startswith('    ')
            and 'def forward(' not in line]
    log.write_text('\n'.join(kept) + '\n')


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    parser.add_argument('--part', choices=('detectors', 'whole', 'breaks', 'all'),
                        default='detectors',
                        help='breaks: where dynamo breaks the detectors (no server); all: one '
                        'child process per detector, two for the whole models')
    parser.add_argument('--models', nargs='*', help='default: all of the part')
    parser.add_argument('--device', default='cuda', help="the server's device")
    parser.add_argument('--size', type=int, default=320, help='detector input height and width')
    parser.add_argument('--iters', type=int, default=3)
    parser.add_argument('--threads', type=int, default=0, help='robot torch threads (0: default)')
    parser.add_argument('--budget-s', type=float, default=1e9,
                        help='start no model after this many seconds')
    parser.add_argument('--static-too', action='store_true',
                        help='R-CNNs also partitioned as before dynamic programs (every '
                        'data-dependent operator breaking the graph), side by side')
    parser.add_argument('--unchained-too', action='store_true',
                        help='each detector also partitioned without chained programs (one '
                        'round trip per remote subgraph), side by side')
    parser.add_argument('--skip-whole', action='store_true',
                        help='--part all: the detectors only, not the whole-model children')
    parser.add_argument('--sync', help='directory shared by sibling processes (--part all)')
    parser.add_argument('--peers', type=int, default=1)
    parser.add_argument('--out', help='result file (one part)')
    parser.add_argument('--out-dir', help='result and log directory (--part all)')
    args = parser.parse_args(argv)
    if args.part == 'all':
        fan_out(args)
        return
    if args.threads:
        torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.WARNING, format='%(name)s: %(message)s')
    logging.getLogger('rrto_ros.partition').setLevel(logging.INFO)   # what was chained
    turn = Turn(args.sync, args.peers, max(0.0, args.budget_s - 30))
    names = args.models or (list(WHOLE) if args.part == 'whole' else DETECTORS)
    if args.part == 'breaks':
        rows = [graph_breaks(name, args.size) for name in names]
        write_results(args.out, 'python -m bench.detectors', argv, rows)
        return
    started = time.monotonic()
    rows: list[dict] = []
    with tempfile.TemporaryDirectory() as store:
        server = ServerProcess(store, device=args.device).start()
        try:
            for name in names:
                if time.monotonic() - started > args.budget_s:
                    rows.append({'model': name, 'skipped': 'time budget spent'})
                    continue
                # R-CNNs (RoIAlign) also as before dynamic programs, side by side
                modes = [(True, True)] + ([(False, True)] if args.part == 'detectors' and
                                          args.static_too and 'rcnn' in name else []) + (
                    [(True, False)] if args.unchained_too else [])
                for dynamic, chain in modes:
                    try:
                        row = (detector_row(name, server.endpoint, args.size, args.iters,
                                            args.device, turn, dynamic, chain)
                               if args.part == 'detectors' else whole_row(name, server.endpoint))
                    except Exception as exc:  # noqa: B902 - one model's failure is a result
                        row = {'model': name, 'error': f'{type(exc).__name__}: {exc}'}
                    rows.append(row)
                    print(name, {k: v for k, v in row.items()
                                 if k not in ('partition', 'stats')}, flush=True)
                    write_results(args.out, 'python -m bench.detectors', argv, rows)
        finally:
            server.stop()
    write_results(args.out, 'python -m bench.detectors', argv, rows)


if __name__ == '__main__':
    main()
