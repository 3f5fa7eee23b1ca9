"""
Per-operator compute times of a program on a device, for the hybrid planner.

Each operator is timed on its own (device synchronised before and after), over
several runs, and the median is kept.  On a GPU, a recorded CUDA graph runs
the same kernels without per-operator launch gaps, so planners scale these
times to the measured replay time of the whole program.
"""

from __future__ import annotations

import statistics
import time
from collections import defaultdict
from typing import Sequence

import torch
import torch.fx as fx


class _TimingInterpreter(fx.Interpreter):
    def __init__(self, module: fx.GraphModule, device: torch.device):
        super().__init__(module)
        self.device = device
        self.times: dict[str, list[float]] = defaultdict(list)

    def _sync(self) -> None:
        if self.device.type == 'cuda':
            torch.cuda.synchronize(self.device)

    def run_node(self, node: fx.Node):
        if node.op != 'call_function':
            return super().run_node(node)
        self._sync()
        start = time.perf_counter()
        result = super().run_node(node)
        self._sync()
        self.times[node.name].append((time.perf_counter() - start) * 1e3)
        return result


def profile_module(module: fx.GraphModule, inputs: Sequence[torch.Tensor], device: torch.device,
                   repeats: int = 5, warmup: int = 2) -> dict[str, float]:
    """Return the median milliseconds of every operator node of ``module`` on ``inputs``."""
    if repeats < 1:
        raise ValueError('repeats must be at least 1')
    inputs = [t.to(device) for t in inputs]
    interpreter = _TimingInterpreter(module, device)
    with torch.inference_mode():
        for _ in range(warmup):
            module(*inputs)
        for _ in range(repeats):
            interpreter.run(*inputs)
    return {name: statistics.median(values) for name, values in interpreter.times.items()}
