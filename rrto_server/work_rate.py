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

* **FLOPs per second**: square ``mm`` products, for every FLOP but those of
  a convolution with few channels (:data:`FEW_CHANNELS`: one channel,
  depthwise, transposed), which take the *slowest* of three such kernels'
  rate (a14 #4: a 1-channel 31x31 convolution ran 88x over its charge at
  ``mm``'s rate.  On a 2-core VM at load 7, 2026-12-01: ``mm`` 1.2-2.2e10
  FLOPs/s; 1-channel 31x31 1.1-2.7e8, transposed 1-channel 31x31 1.6-6.7e8,
  depthwise 15x15 1.2e9, depthwise 7x7 2-4e10; convolutions of 16-512
  channels 3e10-1.7e11 at load 3).  The three kernels add 0.5-0.8 s to the
  measurement there (the first ``cost`` of the process, 2 s, is paid here
  instead of by the first dynamic call);
* **per dtype** (:data:`DTYPES`): those kernels run in float32; in each other
  floating dtype ``mm`` and a 16-channel 3x3 convolution are timed too, and a
  product in that dtype is priced at the float32 rate times the slower one's
  ratio to float32 (never above 1). a15 #4: on a CPU, float16 convolutions ran
  ~200x below float32's rate per FLOP, float64 ~5x; one float16 node priced at
  ``mm``'s rate ran 51x a 0.5 s budget.  A product in a dtype not measured
  (integers, complex, float8) is refused in a dynamic program, as is one whose
  autocast dtype (the recorded precision's) is not;
* **elements per second**: the *slowest* of the kinds of element work the
  cost model counts one unit each (a streaming add, a reduction over an
  ``expand()``ed view, a transcendental, a scan, a gather of random rows:
  the gather, ~30x slower per unit than the add there); the operators slower
  still per element count more units each (:data:`ELEMENT_FACTORS`).

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
import math
import statistics
import threading
import time
from typing import Callable

import torch

from rrto_wire import ops_cost
from rrto_wire.errors import ErrorCode, ProtocolError

log = logging.getLogger('rrto_server.work_rate')

SIZES = (1 << 20, 1 << 22)     # elements per kernel call (each kernel shapes its tensors)
REPEATS = 3
# (FLOPs/s, elements/s) never assumed above these (a12's constants)
CEILING = {'cpu': (1e11, 1e11), 'cuda': (1e14, 1e14)}
FLOOR = 1e6             # a clock that says less (a broken timer) is not a rate
DTYPES = (torch.float16, torch.bfloat16, torch.float64)    # timed besides float32


A = torch.ops.aten
# convolutions whose weight has fewer channels than this on either side (per group: 1-channel,
# depthwise, few-channel transposed) run far below a GEMM's rate: the slow convolutions' rate
FEW_CHANNELS = 16
CONVOLUTIONS = ops_cost.CONVOLUTIONS
# element operators slower per element than every kernel measured, by their measured ratio to
# their charge, rounded up (a14 #4, its x04_rates.py on a 2-core VM, 2026-12-01: a norm, p = 3.3
# 6.6x, a float64 cumprod 3.0x, a sort 2.6x)
ELEMENT_FACTORS = {A.norm: 8, A.linalg_vector_norm: 8, A.cumprod: 4, A.sort: 4, A.topk: 4}


@dataclasses.dataclass(frozen=True)
class WorkRate:
    """A device's measured FLOPs and elements per second, and each kernel's figure."""

    flops_per_s: float
    elements_per_s: float
    conv_flops_per_s: float       # the slowest convolution's (few channels)
    kernels: dict = dataclasses.field(default_factory=dict)
    # per dtype but float32: the slower of mm and a convolution, FLOPs/s (unlisted: refused)
    dtype_flops: dict = dataclasses.field(default_factory=dict)

    def max_work(self, seconds: float) -> int:
        """Return the work (elements, FLOPs at their rate) of ``seconds``."""
        return int(seconds * self.elements_per_s)

    def seconds(self, work: int) -> float:
        """Return the seconds ``work`` takes at these rates (:meth:`max_work`'s inverse)."""
        return work / self.elements_per_s

    def work(self, fn, args: tuple, flops: int, elements: int,
             autocast: torch.dtype | None = None) -> int:
        """
        Return the work of ``fn`` on ``args`` that does ``flops`` and touches ``elements``.

        Each FLOP counts for the elements' rate over its kernel's rate: a
        convolution with few channels (:data:`FEW_CHANNELS`) at the slow
        convolutions' rate, any other at ``mm``'s, each scaled by its dtype's
        (:meth:`dtype_ratio`: the first tensor argument's, and ``autocast``
        where a precision sets one); an element of an operator in
        :data:`ELEMENT_FACTORS` counts that many times.
        """
        packet = getattr(fn, 'overloadpacket', fn)
        rate = self.flops_per_s
        weight = args[1] if len(args) > 1 else None       # a weight passed by name: slow
        if packet in CONVOLUTIONS and not (isinstance(weight, torch.Tensor) and weight.dim() > 1
                                           and min(weight.shape[:2]) >= FEW_CHANNELS):
            rate = self.conv_flops_per_s
        if flops:
            first = next((a for a in torch.utils._pytree.tree_leaves(args)
                          if isinstance(a, torch.Tensor)), None)
            for dtype in {getattr(first, 'dtype', torch.float32), autocast or torch.float32}:
                rate *= self.dtype_ratio(dtype, fn)
        return int(elements * ELEMENT_FACTORS.get(packet, 1) + flops * self.elements_per_s / rate)

    def dtype_ratio(self, dtype: torch.dtype, fn=None) -> float:
        """Return ``dtype``'s products' rate over float32's (at most 1); refuse one unmeasured."""
        if dtype == torch.float32:
            return 1.0
        found = self.dtype_flops.get(dtype)
        if found is None:
            raise ProtocolError(ErrorCode.UNSAFE_PROGRAM,
                                f'{str(fn)[:80]} computes products in {dtype}, whose rate on this '
                                'device is not measured: a program whose sizes depend on the '
                                'data cannot be priced with it')
        return min(1.0, found / self.flops_per_s)


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
    """Time each kernel on ``device``: FLOPs at mm's and the slowest convolution's rates."""
    kernels = {name: _rate(kernel, device) for name, kernel in _KERNELS.items()}
    ceiling = CEILING.get(device.type, CEILING['cpu'])
    elements = min(v for name, v in kernels.items() if name not in FLOP_KERNELS)
    flops = min(ceiling[0], max(FLOOR, kernels['mm']))
    convs = min(kernels[name] for name in FLOP_KERNELS if name != 'mm')
    dtype_flops = {}
    for dtype in DTYPES:
        timed = [_rate(kernel(dtype), device) for kernel in (_mm_in, _wide_convolution)]
        name = str(dtype).removeprefix('torch.')
        kernels.update({f'mm_{name}': timed[0], f'conv_{name}': timed[1]})
        dtype_flops[dtype] = min(flops, max(FLOOR, min(timed)))
    return WorkRate(flops, min(ceiling[1], max(FLOOR, elements)),
                    min(flops, max(FLOOR, convs)), kernels, dtype_flops)


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


# each: size -> (a call, the units ops_cost.cost counts for it); size is a numel
def _mm(size: int, device: torch.device, dtype: torch.dtype = torch.float32):
    side = int(size ** 0.5) // 4
    a = torch.randn(side, side, device=device).to(dtype)
    return (lambda: torch.mm(a, a)), 2 * side ** 3 * 1.0


def _mm_in(dtype: torch.dtype):
    """Return the ``mm`` kernel in ``dtype``."""
    return lambda size, device: _mm(size, device, dtype)


def _wide_convolution(dtype: torch.dtype):
    """Return a 16 -> 16 channel 3x3 convolution in ``dtype`` (a float16 one: ~1e9 FLOPs/s)."""
    def make(size: int, device: torch.device):
        side = math.isqrt(size) // 16     # 64, 128: 20-80 ms each at 1e9 FLOPs/s
        x = torch.randn(1, 16, side, side, device=device).to(dtype)
        w = torch.randn(16, 16, 3, 3, device=device).to(dtype)
        args = (x, w, None, [1, 1], [1, 1], [1, 1], False, [0, 0], 1)
        flops = ops_cost.cost(A.convolution.default, args, {}, device)[1]
        return (lambda: A.convolution.default(*args)), float(flops)
    return make


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


def _convolution(channels: int, kernel: int, transposed: bool = False):
    """Return a kernel: ``channels`` channels convolved each alone (1: one, else depthwise)."""
    def make(size: int, device: torch.device):
        side = math.isqrt(size) // 32     # 32, 64: 5-70 ms each at 1e8-1e9 FLOPs/s
        x = torch.randn(1, channels, side, side, device=device)
        w = torch.randn(channels, 1, kernel, kernel, device=device)
        args = (x, w, None, [1, 1], [kernel // 2] * 2, [1, 1], transposed, [0, 0], channels)
        flops = ops_cost.cost(A.convolution.default, args, {}, device)[1]
        return (lambda: A.convolution.default(*args)), float(flops)
    return make


# FLOPs: mm and the slow convolutions (a14 #4: 10-150x below mm's rate per FLOP on a 2-core VM)
# (a large kernel is the slow case: a depthwise 7x7 ran at mm's rate, a 15x15 one 20x below)
FLOP_KERNELS = {'mm': _mm, 'conv_1ch': _convolution(1, 31),
                'conv_depthwise': _convolution(16, 15),
                'conv_transposed': _convolution(1, 31, transposed=True)}
_KERNELS = {**FLOP_KERNELS, 'add': _add, 'reduce_view': _reduce_view, 'exp': _exp,
            'gather': _gather, 'cumsum': _cumsum}
