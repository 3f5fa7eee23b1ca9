"""
Time every operator of a program module: the hybrid planner's profiles on both sides.

The robot profiles its own half with it (``rrto-plan``) and the server answers
``profile`` requests with it, so both measure the same way: each operator timed
on its own, the device synchronised around it.
"""

from __future__ import annotations

import statistics
import time
from collections import defaultdict
from typing import Sequence

import torch
import torch.fx as fx


def _sync(device: torch.device) -> None:
    if device.type == 'cuda':
        torch.cuda.current_stream(device).synchronize()


class _TimingInterpreter(fx.Interpreter):
    def __init__(self, module: fx.GraphModule, device: torch.device):
        super().__init__(module)
        self.device = device
        self.times: dict[str, list[float]] = defaultdict(list)

    def run_node(self, node: fx.Node):
        if node.op != 'call_function':
            return super().run_node(node)
        _sync(self.device)
        start = time.perf_counter()
        result = super().run_node(node)
        _sync(self.device)
        self.times[node.name].append((time.perf_counter() - start) * 1e3)
        return result


class OperatorTimer:
    """One call of a module at a time, warm-up or timed (the server's profile job steps)."""

    def __init__(self, module: fx.GraphModule, inputs: Sequence[torch.Tensor],
                 device: torch.device):
        self.module = module
        self.inputs = [t.to(device) for t in inputs]
        self.interpreter = _TimingInterpreter(module, device)

    def warm(self) -> None:
        """Run the module once, untimed."""
        with torch.inference_mode():
            self.module(*self.inputs)

    def time(self) -> None:
        """Run the module once, timing every operator node."""
        with torch.inference_mode():
            self.interpreter.run(*self.inputs)

    def medians(self) -> dict[str, float]:
        """Return the median milliseconds of every operator node over the timed calls."""
        return {name: statistics.median(values)
                for name, values in self.interpreter.times.items()}


def operator_times(module: fx.GraphModule, inputs: Sequence[torch.Tensor], device: torch.device,
                   repeats: int = 5, warmup: int = 2) -> dict[str, float]:
    """
    Return the median milliseconds of every operator node of ``module`` on ``inputs``.

    On a GPU a recorded CUDA graph runs the same kernels without per-operator
    launch gaps, so planners scale these times to the measured replay time.
    """
    if repeats < 1:
        raise ValueError('repeats must be at least 1')
    timer = OperatorTimer(module, inputs, device)
    for _ in range(warmup):
        timer.warm()
    for _ in range(repeats):
        timer.time()
    return timer.medians()
