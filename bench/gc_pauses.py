"""
The garbage collector's pauses on both sides of one offloaded model, with and without freezing.

Each run is a fresh pair of processes: a server (CPU, :class:`~rrto_server.server.Server`
in the run's process, as ``python -m rrto_server`` runs it) and a robot child that
offloads a zoo model (``WithImageInput``, a 224x224x3 uint8 frame), records it,
makes ``--warm`` untimed calls and then two timed phases: ``steady``, ``--calls``
calls; ``loading``, calls while the ``--others`` are prepared one after another on
a thread of the robot (exported there, recorded by the server) and kept open, as
a robot that starts a second model does.  Per phase and side: collections per
generation, their total and longest milliseconds (the server's from its
``stats`` ``gc`` and ``gc_pauses`` before and after, the robot's from its own
``gc.callbacks``) and the calls' wall times.  Then one full collection is timed
on each side (``robot_full_ms``, ``server_full_ms``: what a generation-2
collection costs there now) with the tracked and frozen object counts, and the
server's :mod:`rrto_wire.heap` settles (``server_heap``).

Variants, alternated round by round: ``on`` (this tree, freezing on: the
default), ``off`` (this tree with ``RRTO_GC_FREEZE=0``), ``old`` (the tree at
``--old-root``: the code before :mod:`rrto_wire.heap`).

Usage: ``python -m bench.gc_pauses --variants old on --rounds 3 --old-root DIR --out FILE``
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


class Pauses:
    """Time this process's collections per generation while ``on`` is set."""

    def __init__(self):
        self.on = False
        self.gc = {g: [0, 0.0, 0.0] for g in range(3)}
        self._start = 0.0

    def __call__(self, phase: str, info: dict) -> None:
        now = time.perf_counter()
        if phase == 'start':
            self._start = now
        elif self.on:
            entry = self.gc[info['generation']]
            ms = (now - self._start) * 1e3
            entry[0] += 1
            entry[1] += ms
            entry[2] = max(entry[2], ms)

    def table(self) -> dict:
        return {str(g): {'collections': n, 'total_ms': t, 'longest_ms': m}
                for g, (n, t, m) in self.gc.items()}


def _delta(after: dict, before: dict) -> dict:
    """Return the server's collections between two stats replies (longest: of those >= 1 ms)."""
    seen = {p['start'] for p in before.get('gc_pauses') or []}
    new = [p for p in after.get('gc_pauses') or [] if p['start'] not in seen]
    return {g: {'collections': a['collections'] - before['gc'][g]['collections'],
                'total_ms': a['total_ms'] - before['gc'][g]['total_ms'],
                'longest_ms': max([p['ms'] for p in new if str(p['generation']) == g],
                                  default=0.0)}
            for g, a in after['gc'].items()}


def robot(endpoint: str, model_name: str, others: list[str], calls: int, warm: int) -> dict:
    """
    Offload ``model_name`` to ``endpoint`` from this process; return the row of its calls.

    ``steady``: ``calls`` calls; ``loading`` (with ``others``): calls while the
    ``others`` are prepared one after another on a thread (the robot exports
    them, the server records them) and kept open.  Then one full collection is
    timed here (``robot_full_ms``).
    """
    import contextlib
    import threading

    import torch

    from bench.overhead import MODELS
    from rrto_ros import offload
    from rrto_ros.client import RrtoClient
    from rrto_ros.preprocess import WithImageInput
    torch.manual_seed(0)
    model = WithImageInput(MODELS[model_name]().eval()).eval()
    seconds = [WithImageInput(MODELS[o]().eval()).eval() for o in others]
    frame = torch.randint(0, 256, (1, 224, 224, 3), dtype=torch.uint8)
    row = {'model': model_name, 'others': others}
    admin = RrtoClient(endpoint, call_timeout_ms=60000)
    with offload(model, server=endpoint, timeout_ms=20000) as om, \
            contextlib.ExitStack() as kept:
        started = time.perf_counter()
        assert om.warmup(frame), 'server did not record the model'
        row['prepare_s'] = time.perf_counter() - started
        for _ in range(warm):
            om(frame)
        walls: list[float] = []
        row['steady'] = _phase(om, frame, admin, walls, lambda: len(walls) >= calls)
        if seconds:
            ready = threading.Event()

            def prepare_others() -> None:
                for second in seconds:
                    kept.enter_context(offload(second, server=endpoint,
                                               timeout_ms=20000)).warmup(frame)
                ready.set()

            thread = threading.Thread(target=prepare_others)
            thread.start()
            row['loading'] = _phase(om, frame, admin, [], ready.is_set)
            thread.join()
        row['robot_full_ms'] = _full_ms()
        row['server_heap'] = admin.stats().get('heap')
    admin.close()
    row.update(robot_tracked=len(gc.get_objects()), robot_frozen=gc.get_freeze_count())
    return row


def _full_ms() -> float:
    """Time one full collection of this process."""
    start = time.perf_counter()
    gc.collect()
    return (time.perf_counter() - start) * 1e3


def probe(args: argparse.Namespace) -> dict:
    """Serve from this process (CPU) to a robot child; time a full collection on both sides."""
    from rrto_server.options import ServerConfig
    from rrto_server.server import Server
    with tempfile.TemporaryDirectory() as store:
        server = Server(ServerConfig(bind='tcp://127.0.0.1:0', store=store, device='cpu'))
        server.start()
        try:
            out = subprocess.run(
                [sys.executable, '-m', 'bench.gc_pauses', '--robot', server.endpoint,
                 '--model', args.model, '--others', *args.others, '--calls', str(args.calls),
                 '--warm', str(args.warm)], capture_output=True, text=True)
            if out.returncode:
                raise RuntimeError(f'robot failed: {out.stderr[-3000:]}')
            row = json.loads(out.stdout.strip().splitlines()[-1])
            row['server_full_ms'] = _full_ms()
            row['server_tracked'] = len(gc.get_objects())
            row['server_frozen'] = gc.get_freeze_count()
        finally:
            server.close()
    row['loadavg'] = os.getloadavg()[0]
    return row


def _phase(om, frame, admin, walls: list, done) -> dict:
    """Call ``om`` until ``done()``; return both sides' collections and the calls' times."""
    pauses = Pauses()
    gc.callbacks.append(pauses)
    before = admin.stats()
    pauses.on = True
    while not done():
        start = time.perf_counter()
        om(frame)
        walls.append((time.perf_counter() - start) * 1e3)
        assert om.last.result.value == 'offloaded', om.last.reason
    pauses.on = False
    gc.callbacks.remove(pauses)
    after = admin.stats()
    walls = sorted(walls)
    return {'calls': len(walls), 'wall_ms_p50': statistics.median(walls),
            'wall_ms_p99': walls[min(len(walls) - 1, int(0.99 * len(walls)))],
            'wall_ms_max': walls[-1], 'server_gc': _delta(after, before),
            'robot_gc': pauses.table()}


def run(variant: str, args: argparse.Namespace) -> dict:
    """Run one variant in a child process; return its row."""
    root = Path(args.old_root) if variant == 'old' else ROOT
    env = dict(os.environ, PYTHONPATH=str(root), RRTO_GC_FREEZE='0' if variant == 'off' else '1')
    out = subprocess.run(
        [sys.executable, '-m', 'bench.gc_pauses', '--probe', '--model', args.model,
         '--others', *args.others, '--calls', str(args.calls), '--warm', str(args.warm)],
        cwd=root, env=env, capture_output=True, text=True)
    if out.returncode:
        raise RuntimeError(f'{variant} failed: {out.stderr[-3000:]}')
    row = json.loads(out.stdout.strip().splitlines()[-1])
    row['variant'] = variant
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--model', default='resnet18')
    parser.add_argument('--others', nargs='*', default=['mobilenet', 'keypoint_net'],
                        help='the models prepared, one after another, while --model is called')
    parser.add_argument('--calls', type=int, default=500)
    parser.add_argument('--warm', type=int, default=10)
    parser.add_argument('--rounds', type=int, default=2)
    parser.add_argument('--variants', nargs='+', default=['off', 'on'],
                        choices=('old', 'off', 'on'))
    parser.add_argument('--old-root', help="a checkout of the code before rrto_wire.heap ('old')")
    parser.add_argument('--out', default='')
    parser.add_argument('--probe', action='store_true', help=argparse.SUPPRESS)
    parser.add_argument('--robot', metavar='ENDPOINT', help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.robot:
        row = robot(args.robot, args.model, args.others, args.calls, args.warm)
        print(json.dumps(row), flush=True)
        return 0
    if args.probe:
        print(json.dumps(probe(args)), flush=True)
        return 0
    rows = []
    for _ in range(args.rounds):
        for variant in args.variants:
            row = run(variant, args)
            print(json.dumps(row), flush=True)
            rows.append(row)
    if args.out:
        from bench.machine import write_results
        write_results(args.out, 'python -m bench.gc_pauses', argv, rows)
    return 0


if __name__ == '__main__':
    raise SystemExit(main())
