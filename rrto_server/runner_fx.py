"""
Runners over a per-execution value map: fx modules (CPU replay, eager) and frozen TorchScript.

On CUDA, TF32 is a process-wide switch; :class:`Tf32Gate` lets segments that
want the same setting run together and makes a segment that wants the other
setting wait until they have launched, so two lanes never race on it.
"""

from __future__ import annotations

import contextlib
import math
import threading
import time
from typing import Sequence

import torch

from rrto_server.replay_key import PRECISIONS
from rrto_server.runner import Execution
from rrto_server.runner_budget import (STOP_FACTOR, Budget, CallState, CheckedInterpreter,
                                       SizeChecked, check_names, storage_bytes)
from rrto_server.transfers import stage, to_host
from rrto_server.work_rate import WorkRate, rate as measured_rate
from rrto_wire.errors import ErrorCode, ProtocolError
from rrto_wire.program_chain import GuardFailed, skipped
from rrto_wire.tensors import Signature, tensor_from_buffer


class Tf32Gate:
    """The process-wide TF32 flags, shared by segments that agree on them."""

    def __init__(self):
        self._cond = threading.Condition()
        self._tf32: bool | None = None
        self._active = 0

    @contextlib.contextmanager
    def hold(self, tf32: bool):
        """Run the block with TF32 ``tf32``; wait while segments wanting the other run."""
        with self._cond:
            while self._active and self._tf32 != tf32:
                self._cond.wait()
            if self._tf32 != tf32:
                torch.backends.cuda.matmul.allow_tf32 = tf32
                torch.backends.cudnn.allow_tf32 = tf32
                self._tf32 = tf32
            self._active += 1
        try:
            yield
        finally:
            with self._cond:
                self._active -= 1
                if not self._active:
                    self._cond.notify_all()

    @property
    def active(self) -> int:
        """Return how many blocks hold the gate now."""
        return self._active


TF32 = Tf32Gate()


class FxRunner:
    """Segments as callables over a per-execution value map (CPU and eager modes)."""

    backend = 'fx'
    # every input of the recorded signature costs the same: fixed sizes, no data-dependent
    # work (Server._inline_ok runs a short one on the I/O thread)
    fixed_cost = True

    def __init__(self, modules, live, input_names, output_names, device, precision, out_dtypes):
        self.modules = modules
        self.live = live
        self.input_names = input_names
        self.output_names = output_names
        self.device = device
        self.precision = precision
        self.out_dtypes = out_dtypes
        self.num_segments = len(modules)

    def precision_context(self):
        """Apply the recorded precision: autocast dtype, and TF32 only when asked for."""
        if self.precision == 'fp32' and self.device.type != 'cuda':
            return contextlib.nullcontext()   # nothing to switch: skip two context managers
        return self._precision_context()

    @contextlib.contextmanager
    def _precision_context(self):
        dtype = PRECISIONS[self.precision]
        autocast = (torch.autocast(self.device.type, enabled=False) if dtype is None else
                    torch.autocast(self.device.type, dtype=dtype, cache_enabled=False))
        if self.device.type != 'cuda':
            with autocast:
                yield
            return
        with TF32.hold(self.precision == 'tf32'), autocast:
            yield

    express_outputs: list[torch.Tensor] | None = None   # new output tensors every run

    @property
    def can_express(self) -> bool:
        """Return True when :meth:`express` may run: one segment on the CPU."""
        return self.device.type == 'cpu' and self.num_segments == 1

    def express(self, buffers: Sequence, signature: Signature) -> list[torch.Tensor]:
        """Run the one segment on request buffers already checked against ``signature``."""
        ins, outs = self.live[0]
        env = {name: tensor_from_buffer(buffer, spec)
               for name, buffer, spec in zip(self.input_names, buffers, signature)}
        with torch.inference_mode(), self.precision_context():
            env.update(zip(outs, self.modules[0](*[env[n] for n in ins])))
        return to_host([env[n] for n in self.output_names], self.out_dtypes)

    def begin(self, ex: Execution, inputs: Sequence[torch.Tensor]) -> None:
        ex.env = dict(zip(self.input_names, stage(inputs, self.device)))

    def _inputs_used_here(self, ex: Execution, k: int) -> None:
        """Before the first segment: the staged inputs are used on this lane's stream."""
        if k == 0 and self.device.type == 'cuda':
            stream = torch.cuda.current_stream(self.device)
            for name in self.input_names:           # staged on a CPU worker's copy stream
                ex.env[name].record_stream(stream)

    def run_segment(self, ex: Execution, k: int) -> None:
        ins, outs = self.live[k]
        self._inputs_used_here(ex, k)
        with torch.inference_mode(), self.precision_context():
            results = self.modules[k](*[ex.env[n] for n in ins])
        ex.env.update(zip(outs, results))

    def collect(self, ex: Execution) -> list[torch.Tensor]:
        # ex.env stays alive until host_outputs/release: the lane has not yet waited for
        # the last segment, and freeing a tensor another stream still reads is a race
        return [ex.env[n] for n in self.output_names]

    def to_host(self, ex: Execution) -> list[torch.Tensor]:
        return to_host(ex.outputs, self.out_dtypes)

    def release(self, ex: Execution) -> None:
        ex.env = {}
        ex.saved = None


class DynamicRunner(FxRunner):
    """
    A program whose sizes depend on the data, run op by op and never recorded.

    A CUDA graph replays fixed shapes, so a dynamic program
    (:mod:`rrto_wire.ops_dynamic`) runs eagerly on every device and every
    mode.  Every operator is sized on meta tensors before it runs
    (:func:`~rrto_wire.ops_cost.cost`), since its sizes at run time may
    exceed those of the sandbox's trial, and refused (``unsafe_program``) if
    the bytes the execution then holds would exceed ``max_bytes`` (the
    sandbox's ``--program-max-mb``: the values alive at that point, freed as
    fx frees them, plus its output) or the work of the execution so far
    would exceed ``max_work`` (from ``--program-max-s``): the elements its
    operators read and write plus its FLOPs, each at the device's measured
    rates (``rate``, :meth:`rrto_server.work_rate.WorkRate.work`; None: this
    process's), and a call past
    :data:`~rrto_server.runner_budget.STOP_FACTOR` times the seconds of
    ``max_work`` stops before its next operator, whatever the model says (a14
    #4); a node priced over the whole budget is refused before it runs.  Its
    cost follows the data (``fixed_cost`` False): not on the I/O thread.

    A chained program (:mod:`rrto_wire.program_chain`) stops where a guard
    fails: the outputs computed so far come back, each later one as zeros of
    its declared shape ``out_shapes``, counted in the call's bytes (a14 #2;
    empty: :func:`rrto_wire.program_chain.check_skippable`).  Every call's
    outputs are held to ``max_bytes``, and so is each node's result after it
    runs (a15 #2: should its cost have missed an allocation).

    The call's budget so far lives in a
    :class:`~rrto_server.runner_budget.CallState` of the execution, never
    among its values, whose names are the peer's (a15 #3: an input named
    like a runner's key set its work so far); value names are refused unless
    short and identifier-like (:data:`rrto_server.runner_budget.NAME`).
    """

    backend = 'eager-dynamic'
    can_express = False
    fixed_cost = False

    def __init__(self, *args, max_bytes: int, max_work: int, out_shapes: list | None = None,
                 rate: WorkRate | None = None):
        super().__init__(*args)
        check_names([*self.input_names, *self.output_names,
                     *(name for ins, outs in self.live for name in (*ins, *outs))])
        rate = measured_rate(self.device) if rate is None else rate
        self.max_bytes = max_bytes
        self.max_work = max_work
        self.max_run_s = STOP_FACTOR * rate.seconds(max_work)
        self.out_shapes = out_shapes
        # the request's inputs: sized by the signature, not by the call (like the weights)
        self.inputs = frozenset(self.input_names)
        # a later segment's inputs are values of the earlier ones: their sizes may vary
        self.modules = [SizeChecked(module, self.device, k > 0, rate, self._autocast)
                        for k, module in enumerate(self.modules)]

    @property
    def _autocast(self) -> torch.dtype | None:
        """Return the dtype autocast runs matrix products in (the recorded precision's)."""
        return PRECISIONS[self.precision] if self.precision in PRECISIONS else None

    def begin(self, ex: Execution, inputs: Sequence[torch.Tensor]) -> None:
        super().begin(ex, inputs)
        ex.call_state = CallState()

    def run_segment(self, ex: Execution, k: int) -> None:
        state: CallState = ex.call_state
        if state.stopped:
            return
        ins, outs = self.live[k]
        self._inputs_used_here(ex, k)
        started = time.perf_counter()
        budget = Budget(self.max_bytes, self.max_work, state.spent,
                        started + self.max_run_s - state.elapsed)
        budget.held = storage_bytes(value for name, value in ex.env.items()   # kept for later
                                    if name not in ins and name not in self.inputs)
        interpreter = CheckedInterpreter(self.modules[k], budget, [
            n in self.inputs for n in ins])
        try:
            with torch.inference_mode(), self.precision_context():
                try:
                    results = interpreter.run(*[ex.env[n] for n in ins])
                except GuardFailed:          # the outputs computed before the guard stand
                    results, state.stopped = interpreter.computed(), True
        finally:
            state.spent = budget.work
            state.elapsed += time.perf_counter() - started
        ex.env.update((name, value) for name, value in zip(outs, results)
                      if value is not None)

    def _reply_bytes(self, outputs) -> int:
        """
        Return the bytes ``outputs`` hold on the device and in the reply.

        The reply holds each output whole, contiguous and in its out dtype
        (:func:`~rrto_server.transfers.to_host`): an output that is not already
        so is copied, and an ``expand()``ed view of one element is its numel
        there (a16 #7), whatever its storage.
        """
        return storage_bytes(outputs) + sum(
            t.numel() * dtype.itemsize for t, dtype in zip(outputs, self.out_dtypes)
            if isinstance(t, torch.Tensor) and (t.dtype != dtype or not t.is_contiguous()))

    def collect(self, ex: Execution) -> list[torch.Tensor]:
        if not ex.call_state.stopped:
            outputs = super().collect(ex)
            held = self._reply_bytes(outputs)
            if held > self.max_bytes:        # a missed allocation, or a view to be copied
                raise ProtocolError(ErrorCode.UNSAFE_PROGRAM, f'this call\'s outputs hold '
                                    f'{held} bytes with their reply: over the {self.max_bytes} '
                                    'one call may hold (--program-max-mb)')
            return outputs
        missing = {name: (shape, dtype) for name, shape, dtype in zip(
            self.output_names, self.out_shapes, self.out_dtypes) if name not in ex.env}
        nbytes = sum(math.prod(shape) * dtype.itemsize for shape, dtype in missing.values())
        held = self._reply_bytes([ex.env[name] if name in ex.env else None
                                  for name in self.output_names])
        if held + nbytes > self.max_bytes:     # never, for a program parsed (a14 #2)
            raise ProtocolError(ErrorCode.UNSAFE_PROGRAM, f'the outputs a failed guard skipped '
                                f'would allocate {nbytes} bytes with {held} held: over the '
                                f'{self.max_bytes} one call may hold (--program-max-mb)')
        return [ex.env[name] if name in ex.env else skipped(*missing[name], self.device)
                for name in self.output_names]


class FrozenRunner(FxRunner):
    """CPU replay: each segment a frozen TorchScript trace of its ATen graph."""

    backend = 'frozen'

    def __init__(self, *args, example: Sequence[torch.Tensor]):
        super().__init__(*args)
        env = dict(zip(self.input_names, example))
        frozen = []
        with torch.inference_mode(False), torch.no_grad():
            for module, (ins, outs) in zip(self.modules, self.live):
                values = [env[n] for n in ins]
                traced = torch.jit.trace(module, tuple(values), check_trace=False, strict=False)
                frozen.append(torch.jit.freeze(traced.eval()))
                env.update(zip(outs, module(*values)))
        self.modules = frozen
