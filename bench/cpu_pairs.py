r"""
Find the CPUs that slow each other: hyperthreads of one host core that a VM does not show.

A virtual machine may list 16 cores without SMT while the host runs pairs of
them as the two hardware threads of one physical core: a robot pinned to one
of them then computes up to ~1.4x slower whenever anything busy runs on the
other.  On the H200 host (2026-12-01) the local runners of one grid point ran
at two speeds (ResNet-18 ~56 and ~77 ms, Tiny-YOLO ~17 and ~25 ms, U-Net ~80
and ~115 ms) while the sysfs topology showed no siblings at all.

:func:`probe` measures it: one spinning process per CPU, each pinned and
idle until asked, and this process timing a single-threaded matrix product on
a target CPU alone and beside each other CPU spinning in turn.
:func:`pairs` reads the pattern off two targets (``i`` with ``i + n/2``, or
``2k`` with ``2k + 1``) and returns every CPU's group, the shape
:func:`bench.hybrid_cores.physical_cores` returns from sysfs, so
``bench.hybrid_cores --probe-pairs`` can give a robot a core whose twin is
not busy.

    python -m bench.cpu_pairs [--cpus 0-15] [--out pairs.json]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import statistics
import sys
import time

from bench.cpulimit import parse_cores

SLOWER = 1.2          # a CPU whose spinning makes the target this much slower shares its core


def _spin(cpu: int, go, ready) -> None:
    import torch
    os.sched_setaffinity(0, [cpu])
    torch.set_num_threads(1)
    a = torch.randn(128, 128)
    ready.set()
    while True:
        go.wait()
        while go.is_set():
            a @ a


def _rate(window_s: float, windows: int = 3) -> float:
    import torch
    a = torch.randn(128, 128)
    rates = []
    for _ in range(windows):
        count, start = 0, time.perf_counter()
        while time.perf_counter() - start < window_s:
            for _ in range(10):
                a @ a
            count += 10
        rates.append(count / (time.perf_counter() - start))
    return statistics.median(rates)


def probe(cpus: list[int], targets: list[int], window_s: float = 0.04) -> dict[int, dict]:
    """Return per target CPU how much slower it computes while each other CPU spins."""
    import torch
    torch.set_num_threads(1)
    ctx = mp.get_context('spawn')
    events = {cpu: ctx.Event() for cpu in cpus}
    ready = {cpu: ctx.Event() for cpu in cpus}
    workers = [ctx.Process(target=_spin, args=(cpu, events[cpu], ready[cpu]), daemon=True)
               for cpu in cpus]
    for worker in workers:
        worker.start()
    before = os.sched_getaffinity(0)
    result = {}
    try:
        for cpu in cpus:
            if not ready[cpu].wait(60):
                raise RuntimeError(f'the spinner on CPU {cpu} did not start')
        for target in targets:
            os.sched_setaffinity(0, [target])
            alone = _rate(window_s)
            slow = {}
            for other in (c for c in cpus if c != target):
                events[other].set()
                time.sleep(0.02)
                slow[other] = alone / _rate(window_s)
                events[other].clear()
            result[target] = slow
    finally:
        os.sched_setaffinity(0, before)
        for worker in workers:
            worker.terminate()
    return result


def partner(slowdowns: dict[int, float], threshold: float = SLOWER) -> int | None:
    """Return the CPU that slows the target most, if by at least ``threshold``."""
    cpu = max(slowdowns, key=slowdowns.get)
    return cpu if slowdowns[cpu] >= threshold else None


def pairs(cpus: list[int], measured: dict[int, dict]) -> list[tuple[int, ...]]:
    """
    Return every CPU's group (``(cpu,)`` alone, ``(a, b)`` for a pair), read off the targets.

    Two patterns are recognised: ``i`` with ``i + n/2`` and ``2k`` with
    ``2k + 1`` (``n`` CPUs in order).  Every measured target must fit the
    pattern; otherwise, or where no target has a partner, every CPU stands alone.
    """
    ordered = sorted(cpus)
    half = len(ordered) // 2
    found = {t: partner(s) for t, s in measured.items()}
    patterns = {'half': lambda i: (i + half) % (2 * half), 'adjacent': lambda i: i ^ 1}
    for shape in patterns.values():
        if len(ordered) % 2 == 0 and found and all(
                p is not None and p == ordered[shape(ordered.index(t))]
                for t, p in found.items()):
            groups = {tuple(sorted((ordered[i], ordered[shape(i)])))
                      for i in range(len(ordered))}
            return sorted(groups)
    return [(cpu,) for cpu in ordered]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--cpus', type=parse_cores, default=sorted(os.sched_getaffinity(0)))
    parser.add_argument('--out', help='write the slowdowns and the groups as JSON here')
    args = parser.parse_args(argv)
    found = measure_pairs(args.cpus)
    if args.out:
        with open(args.out, 'w') as f:
            json.dump(found, f, indent=1)
    print(' '.join(','.join(map(str, group)) for group in found['groups']))
    return 0


def measure_pairs(cpus: list[int]) -> dict:
    """Probe the first two CPUs against every other; return the slowdowns and the groups."""
    measured = probe(cpus, sorted(cpus)[:2])
    return {'slowdowns': {str(t): {str(c): round(v, 3) for c, v in s.items()}
                          for t, s in measured.items()},
            'groups': pairs(cpus, measured)}


if __name__ == '__main__':
    sys.exit(main())
