"""
How much work this process's device does per second: measured once, on the slow side.

A dynamic program's budget per call is ``--program-max-s`` seconds of work
(:class:`~rrto_server.runner_fx.DynamicRunner`); work is what
:func:`rrto_wire.ops_dynamic.cost` counts: elements read and written, and
FLOPs of matrix products and convolutions.  The seconds become work at this
device's rates, not at a constant (a12's ``1e11``/s was about 3x a loaded
2-core VM: a13 #5), measured the first time a dynamic program is recorded
and cached for the process: 4 runs of each kernel at each of two
:data:`SIZES` (1.3-2.4 s on a 2-core VM at load 9-11, 2026-12-01).

* **FLOPs per second**: square ``mm`` products;
* **elements per second**: the *slowest* of the kinds of element work the
  cost model counts one unit each (a streaming add, a reduction over an
  ``expand()``ed view, a transcendental, a scan, a gather of random rows:
  the gather, ~30x slower per unit than the add there).

Why the slow side: a rate measured too high admits calls that take longer
than ``--program-max-s`` (the bound weakens); one too low refuses calls that
would have fitted (the bound holds).  So each kernel's figure is a median,
not a best run; elements take the slowest kernel's rate; a machine busy
when it is measured gives lower rates (safe), while load that comes later
is not seen (the bound is then loose by that load's factor).  Neither rate
may exceed :data:`CEILING` (the constants used before).
"""

from __future__ import annotations

import dataclasses
import logging
import statistics
import threading
import time
from typing import Callable

import torch

log = logging.getLogger('rrto_server.work_rate')

SIZES = (1 << 20, 1 << 22)     # elements per kernel call (each kernel shapes its tensors)
REPEATS = 3
# (FLOPs/s, elements/s) never assumed above these (a12's constants)
CEILING = {'cpu': (1e11, 1e11), 'cuda': (1e14, 1e14)}
FLOOR = 1e6             # a clock that says less (a broken timer) is not a rate


@dataclasses.dataclass(frozen=True)
class WorkRate:
    """A device's measured FLOPs and elements per second, and each kernel's figure."""

    flops_per_s: float
    elements_per_s: float
    kernels: dict = dataclasses.field(default_factory=dict)

    def max_work(self, seconds: float) -> int:
        """Return the work (elements, FLOPs weighted by :attr:`work_per_flop`) of ``seconds``."""
        return int(seconds * self.elements_per_s)

    @property
    def work_per_flop(self) -> float:
        """Return the work one FLOP counts for (elements' rate over FLOPs' rate)."""
        return self.elements_per_s / self.flops_per_s


MEASURED: dict[str, WorkRate] = {}     # per device type, for the life of the process
_LOCK = threading.Lock()


def rate(device: torch.device) -> WorkRate:
    """Return ``device``'s work rate, measuring it on the first call of the process."""
    with _LOCK:
        found = MEASURED.get(device.type)
        if found is None:
            started = time.perf_counter()
            found = MEASURED[device.type] = measure(device)
            log.info('work rate of %s measured in %.1f s: %.3g FLOPs/s, %.3g elements/s (%s)',
                     device.type, time.perf_counter() - started, found.flops_per_s,
                     found.elements_per_s, ', '.join(f'{name} {value:.3g}'
                                                     for name, value in found.kernels.items()))
        return found


def measure(device: torch.device) -> WorkRate:
    """Time each kernel on ``device``; FLOPs at the ``mm`` rate, elements at the slowest."""
    kernels = {name: _rate(kernel, device) for name, kernel in _KERNELS.items()}
    ceiling = CEILING.get(device.type, CEILING['cpu'])
    elements = min(v for name, v in kernels.items() if name != 'mm')
    return WorkRate(min(ceiling[0], max(FLOOR, kernels['mm'])),
                    min(ceiling[1], max(FLOOR, elements)), kernels)


def _rate(kernel: Callable, device: torch.device) -> float:
    """
    Return ``kernel``'s units per second: what a larger call costs more than a smaller one.

    The difference of the median times at the two :data:`SIZES` leaves out
    what every call costs whatever its size (a launch, a thread pool's
    wake-up: ~16-40 ms per parallel call on a loaded 2-core VM), which the
    work model does not count per element.  It is at most twice the larger
    size's plain rate (which counts that cost too, so it is low), so one
    slow run of the smaller size cannot inflate it.
    """
    measured = []
    for size in SIZES:
        run, units = kernel(size, device)
        run()                                      # first-call allocations, lazy init
        measured.append((units, statistics.median(_timed(run, device)
                                                  for _ in range(REPEATS))))
    (small, small_s), (large, large_s) = measured
    plain = large / max(large_s, 1e-9)
    return min(2 * plain, (large - small) / (large_s - small_s)) if large_s > small_s else plain


def _timed(run: Callable, device: torch.device) -> float:
    # on CUDA this thread's stream only: another lane may be capturing a graph meanwhile
    stream = torch.cuda.current_stream(device) if device.type == 'cuda' else None
    if stream is not None:
        stream.synchronize()
    start = time.perf_counter()
    run()
    if stream is not None:
        stream.synchronize()
    return time.perf_counter() - start


# each: size -> (a call, the units ops_dynamic.cost counts for it); size is a numel
def _mm(size: int, device: torch.device):
    side = int(size ** 0.5) // 4
    a = torch.randn(side, side, device=device)
    return (lambda: torch.mm(a, a)), 2 * side ** 3 * 1.0


def _add(size: int, device: torch.device):
    a, b = torch.randn(size, device=device), torch.randn(size, device=device)
    return (lambda: torch.add(a, b)), 3.0 * size          # two read, one written


def _reduce_view(size: int, device: torch.device):
    view = torch.ones(1, device=device).expand(size)
    return (lambda: view.sum()), size + 1.0


def _exp(size: int, device: torch.device):
    a = torch.randn(size, device=device)
    return (lambda: torch.exp(a)), 2.0 * size


def _gather(size: int, device: torch.device):
    rows = size // 16                 # a box's 4 coordinates per row: ~30x add's time per unit
    source = torch.randn(rows, 4, device=device)
    index = torch.randint(0, rows, (rows,), device=device)
    return (lambda: source[index]), rows * 9.0           # read 4 + 1, written 4


def _cumsum(size: int, device: torch.device):
    a = torch.randn(size, device=device)
    return (lambda: torch.cumsum(a, 0)), 2.0 * size


_KERNELS = {'mm': _mm, 'add': _add, 'reduce_view': _reduce_view, 'exp': _exp,
            'gather': _gather, 'cumsum': _cumsum}
