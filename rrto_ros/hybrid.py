"""
Run one inference under a split or hybrid plan: robot and server compute at the same time.

:class:`PlanRuntime` holds what a plan needs on the robot (its band and the
rest of the network as fx modules) and the program the server must record.
:meth:`PlanRuntime.run` sends the server its input first, computes the
robot's share while the server computes its own, waits for the server's
tensors, merges, and finishes: one request and one reply per inference.
The server call is injected (:class:`Remote`), so tests run the very same
code with the server half executed in-process.
"""

from __future__ import annotations

import json
import time
from typing import Callable, Protocol, Sequence

import torch

from rrto_ros.graph import GraphAnalysis
from rrto_ros.split import Plan, as_program, band_program, hybrid_targets, suffix_program
from rrto_wire.program import Program, sha256


class Pending(Protocol):
    def result(self) -> list[torch.Tensor]:
        """Return the server's output tensors (raise on failure or timeout)."""

    def cancel(self) -> None:
        """Abandon the request (the robot's part failed)."""


Remote = Callable[[list[torch.Tensor]], Pending]


class _Done:
    def __init__(self, outputs: list[torch.Tensor]):
        self.outputs = outputs

    def result(self) -> list[torch.Tensor]:
        return self.outputs

    def cancel(self) -> None:
        pass


def in_process(module: torch.nn.Module) -> Remote:
    """Return a Remote that runs the server's program in this process (tests, planning)."""
    def start(tensors: list[torch.Tensor]) -> Pending:
        with torch.inference_mode():
            return _Done(list(module(*tensors)))
    return start


class PlanRuntime:
    """A split or hybrid plan made executable for one model and input signature."""

    def __init__(self, program: Program, analysis: GraphAnalysis,
                 weights: dict[str, torch.Tensor], plan: Plan, label: str = 'model'):
        if plan.kind not in ('split', 'hybrid'):
            raise ValueError(f'{plan.kind} plans run without a PlanRuntime')
        if plan.cut not in analysis.cut_candidates():
            raise ValueError(f'cut {plan.cut} is not after a local prefix with row-split outputs')
        self.plan = plan
        self.crossing = analysis.crossing(plan.cut)
        self.axis = {v: analysis.axis[v] for v in self.crossing}
        self.input_index = {name: i for i, (name, _) in enumerate(program.inputs)}
        self.input_axis = {name: analysis.axis[name] for name, _ in program.inputs}
        suffix_doc = suffix_program(analysis, plan.cut, f'{label}-suffix@{plan.cut}')
        self.robot: _Part | None = None
        self.suffix = None
        self.server_doc: dict | None = None
        self.server_rows: dict = {}
        if plan.kind == 'split':
            full = {v: (0, analysis.height(v)) for v in self.crossing}
            self.robot = self._part(band_program(analysis, plan.cut, full, f'{label}-prefix'),
                                    weights)
            self.server_doc = suffix_doc
            self.robot_targets, self.server_targets = full, {}
        else:
            targets = hybrid_targets(analysis, plan.cut, plan.ratio)
            self.robot_targets, self.server_targets = targets
            robot_t = {v: iv for v, iv in self.robot_targets.items() if iv[1] > iv[0]}
            server_t = {v: iv for v, iv in self.server_targets.items() if iv[1] > iv[0]}
            if robot_t:
                self.robot = self._part(band_program(analysis, plan.cut, robot_t,
                                                     f'{label}-robot'), weights)
            if server_t:
                self.server_doc, self.server_rows = band_program(
                    analysis, plan.cut, server_t, f'{label}-server@{plan.cut}:{plan.ratio:.3f}')
            self.suffix = as_program(suffix_doc).module(weights, torch.device('cpu'))
            self.robot_order, self.server_order = list(robot_t), list(server_t)
        self.server_blob = json.dumps(self.server_doc, sort_keys=True,
                                      separators=(',', ':')).encode() if self.server_doc else None
        self.server_digest = sha256(self.server_blob) if self.server_blob else None
        self.last_robot_ms = 0.0   # the robot's own compute in the last run (ms)

    def _part(self, built: tuple[dict, dict], weights: dict) -> '_Part':
        doc, rows = built
        return _Part(as_program(doc).module(weights, torch.device('cpu')),
                     [(self.input_index[n], self.input_axis[n], a, b)
                      for n, (a, b) in rows.items()])

    def server_inputs(self, flat: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Return the tensors the server's program takes, cut from the call's inputs."""
        return _cut(flat, [(self.input_index[n], self.input_axis[n], a, b)
                           for n, (a, b) in self.server_rows.items()])

    def run(self, flat: Sequence[torch.Tensor], remote: Remote) -> list[torch.Tensor]:
        """Run one inference; return the model's flat outputs."""
        with torch.inference_mode():
            start = time.perf_counter()
            if self.plan.kind == 'split':
                crossing = self.robot.run(flat)
                self.last_robot_ms = (time.perf_counter() - start) * 1e3
                return list(remote(crossing).result())
            pending = remote(self.server_inputs(flat)) if self.server_doc else None
            try:
                robot = dict(zip(self.robot_order, self.robot.run(flat))) if self.robot else {}
            except BaseException:
                if pending is not None:
                    pending.cancel()
                raise
            robot_ms = (time.perf_counter() - start) * 1e3
            server = dict(zip(self.server_order, pending.result())) if pending else {}
            start = time.perf_counter()
            merged = []
            for value in self.crossing:
                parts = [p for p in (robot.get(value), server.get(value)) if p is not None]
                merged.append(parts[0] if len(parts) == 1 else torch.cat(parts, self.axis[value]))
            outputs = list(self.suffix(*merged))
            self.last_robot_ms = robot_ms + (time.perf_counter() - start) * 1e3
            return outputs

    def robot_side(self, flat: Sequence[torch.Tensor], weights: dict) -> Callable[[], None]:
        """
        Return a call that runs the robot's side of one inference under this plan.

        The server's tensors are computed once here and handed back at once by
        every call, so a call does only the robot's slicing, band, merge and
        rest of the network.
        """
        outputs: list = []
        if self.server_doc is not None:
            module = as_program(self.server_doc).module(weights, torch.device('cpu'))
            inputs = (self.robot.run(flat) if self.plan.kind == 'split'
                      else self.server_inputs(flat))
            with torch.inference_mode():
                outputs = list(module(*inputs))
        return lambda: self.run(flat, lambda tensors: _Done(outputs))


class _Part:
    """The robot's fx module for a derived program, fed with rows cut from the call's inputs."""

    def __init__(self, module: torch.nn.Module, slices: list[tuple[int, int, int, int]]):
        self.module = module
        self.slices = slices

    def run(self, flat: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        return list(self.module(*_cut(flat, self.slices)))


def _cut(flat: Sequence[torch.Tensor], slices: list[tuple[int, int, int, int]]) -> list:
    """Return rows [start, stop) along ``axis`` of each selected input (contiguous)."""
    return [flat[i].narrow(axis, a, b - a).contiguous() for i, axis, a, b in slices]
