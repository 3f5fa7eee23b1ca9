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

import cachetools
import torch
import torch.fx as fx

from rrto_server.replay_key import PRECISIONS
from rrto_server.runner import Execution
from rrto_server.transfers import stage, to_host
from rrto_server.work_rate import WorkRate, rate as measured_rate
from rrto_wire.errors import ErrorCode, ProtocolError
from rrto_wire.ops_dynamic import cost, costs_nothing, varies
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


_SPENT = ' spent'       # ex.env key of the work done so far (never a value's name)
_ELAPSED = ' elapsed'   # ex.env key: seconds its segments ran so far
_STOPPED = ' stopped'   # ex.env key: a chained program's guard failed, nothing more runs
_STOP_FACTOR = 4.0      # x its budget's seconds: later load may slow an admitted call so much


class DynamicRunner(FxRunner):
    """
    A program whose sizes depend on the data, run op by op and never recorded.

    A CUDA graph replays fixed shapes, so a dynamic program
    (:mod:`rrto_wire.ops_dynamic`) runs eagerly on every device and every
    mode.  Every operator is sized on meta tensors before it runs
    (:func:`~rrto_wire.ops_dynamic.cost`), since its sizes at run time may
    exceed those of the sandbox's trial, and refused (``unsafe_program``) if
    the bytes the execution then holds would exceed ``max_bytes`` (the
    sandbox's ``--program-max-mb``: the values alive at that point, freed as
    fx frees them, plus its output) or the work of the execution so far
    would exceed ``max_work`` (from ``--program-max-s``): the elements its
    operators read and write plus its FLOPs, each at the device's measured
    rates (``rate``, :meth:`rrto_server.work_rate.WorkRate.work`; None: this
    process's), and a call past :data:`_STOP_FACTOR` times the seconds of
    ``max_work`` stops before its next operator, whatever the model says (a14
    #4).  Its cost follows the data (``fixed_cost`` False): not on the I/O thread.

    A chained program (:mod:`rrto_wire.program_chain`) stops where a guard
    fails: the outputs computed so far come back, each later one as zeros of
    its declared shape ``out_shapes``, counted in the call's bytes (a14 #2;
    empty: :func:`rrto_wire.program_chain.check_skippable`).
    """

    backend = 'eager-dynamic'
    can_express = False
    fixed_cost = False

    def __init__(self, *args, max_bytes: int, max_work: int, out_shapes: list | None = None,
                 rate: WorkRate | None = None):
        super().__init__(*args)
        rate = measured_rate(self.device) if rate is None else rate
        self.max_bytes = max_bytes
        self.max_work = max_work
        self.max_run_s = _STOP_FACTOR * rate.seconds(max_work)
        self.out_shapes = out_shapes
        # the request's inputs: sized by the signature, not by the call (like the weights)
        self.inputs = frozenset(self.input_names) | {_SPENT, _STOPPED, _ELAPSED}
        # a later segment's inputs are values of the earlier ones: their sizes may vary
        self.modules = [_SizeChecked(module, self.device, k > 0, rate)
                        for k, module in enumerate(self.modules)]

    def run_segment(self, ex: Execution, k: int) -> None:
        if ex.env.get(_STOPPED):
            return
        ins, outs = self.live[k]
        self._inputs_used_here(ex, k)
        started = time.perf_counter()
        budget = _Budget(self.max_bytes, self.max_work, ex.env.get(_SPENT, 0),
                         started + self.max_run_s - ex.env.get(_ELAPSED, 0.0))
        budget.held = _nbytes(value for name, value in ex.env.items()   # kept for later
                              if name not in ins and name not in self.inputs)
        interpreter = _CheckedInterpreter(self.modules[k], budget, [
            n in self.inputs for n in ins])
        with torch.inference_mode(), self.precision_context():
            try:
                results = interpreter.run(*[ex.env[n] for n in ins])
            except GuardFailed:          # the outputs computed before the guard stand
                results, ex.env[_STOPPED] = interpreter.computed(), True
        ex.env.update((name, value) for name, value in zip(outs, results)
                      if value is not None)
        ex.env[_SPENT] = budget.work
        ex.env[_ELAPSED] = ex.env.get(_ELAPSED, 0.0) + time.perf_counter() - started

    def collect(self, ex: Execution) -> list[torch.Tensor]:
        if not ex.env.get(_STOPPED):
            return super().collect(ex)
        missing = {name: (shape, dtype) for name, shape, dtype in zip(
            self.output_names, self.out_shapes, self.out_dtypes) if name not in ex.env}
        nbytes = sum(math.prod(shape) * dtype.itemsize for shape, dtype in missing.values())
        held = _nbytes(ex.env[name] for name in self.output_names if name in ex.env)
        if held + nbytes > self.max_bytes:     # never, for a program parsed (a14 #2)
            raise ProtocolError(ErrorCode.UNSAFE_PROGRAM, f'the outputs a failed guard skipped '
                                f'would allocate {nbytes} bytes with {held} held: over the '
                                f'{self.max_bytes} one call may hold (--program-max-mb)')
        return [ex.env[name] if name in ex.env else skipped(*missing[name], self.device)
                for name in self.output_names]


def _nbytes(values) -> int:
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
                for t in torch.utils._pytree.tree_leaves(list(values))
                if isinstance(t, torch.Tensor)}
    return sum(storages.values())


class _Budget:
    """What one execution holds (bytes of live storages) and has done (work), against caps."""

    def __init__(self, max_bytes: int, max_work: int, work: int, stop_at: float):
        self.max_bytes = max_bytes
        self.max_work = max_work
        self.work = work
        self.stop_at = stop_at          # perf_counter() past which no operator starts
        self.held = 0                   # bytes of values outside the interpreter
        self.live: dict[int, list] = {}     # storage -> [bytes, values holding it]
        self.live_bytes = 0             # the sum of their bytes
        self.of: dict[fx.Node, list[int]] = {}
        self.fixed: set[int] = set()    # the weights' storages (not the call's)

    def charge(self, node: fx.Node, nbytes: int, work: int) -> None:
        """Refuse ``node`` if its bytes or work would exceed what the call may have."""
        if time.perf_counter() > self.stop_at:
            raise ProtocolError(ErrorCode.UNSAFE_PROGRAM, f'this call ran {_STOP_FACTOR:g} x '
                                f'the seconds its budget (--program-max-s) is worth: stopped '
                                f'before {str(node.target)[:80]}')
        held = self.held + self.live_bytes
        if held + nbytes > self.max_bytes:
            raise ProtocolError(
                ErrorCode.UNSAFE_PROGRAM,
                f'{str(node.target)[:80]} would allocate {nbytes} bytes at this input with '
                f'{held} held: over the {self.max_bytes} one call may hold (--program-max-mb)')
        if self.work + work > self.max_work:
            raise ProtocolError(
                ErrorCode.UNSAFE_PROGRAM,
                f'{str(node.target)[:80]} would bring the work of this call at this input to '
                f'{self.work + work:.3g} (elements read and written, FLOPs at the measured '
                f'rates): over the {self.max_work:.3g} one call may do (--program-max-s)')
        self.work += work

    def hold(self, node: fx.Node, value, fixed: bool = False) -> None:
        """Count the storages ``node``'s value holds (new ones at their size)."""
        keys = []
        for t in torch.utils._pytree.tree_leaves(value):
            if not isinstance(t, torch.Tensor):
                continue
            storage = t.untyped_storage()
            key = storage.data_ptr()
            if fixed:
                self.fixed.add(key)
            elif key not in self.fixed and key not in keys:
                keys.append(key)
                entry = self.live.get(key)
                if entry is None:
                    entry = self.live[key] = [storage.nbytes(), 0]
                    self.live_bytes += entry[0]
                entry[1] += 1
        self.of[node] = keys

    def release(self, node: fx.Node) -> None:
        """``node``'s value is freed: drop each storage no other live value holds."""
        for key in self.of.pop(node, ()):
            entry = self.live[key]
            entry[1] -= 1
            if not entry[1]:
                del self.live[key]
                self.live_bytes -= entry[0]


class _SizeChecked:
    """
    An fx module whose operators are sized before they run (:class:`DynamicRunner`).

    Each node's cost (bytes, work) is computed on meta tensors once per
    distinct set of argument sizes, remembered (meta shape functions cost
    more than most operators): for a node whose sizes cannot follow the data
    (nothing upstream is data-dependent) the trial's, once; for the others
    per argument size set, the last :attr:`CHECKED_SIZES` kept.
    """

    CHECKED_SIZES = 4096     # argument size sets remembered per module

    def __init__(self, module: fx.GraphModule, device: torch.device, inputs_vary: bool,
                 rate: WorkRate):
        self.module = module
        self.device = device
        self.rate = rate
        self.costs: dict = {}             # a fixed-size node's cost
        self.varying_costs = cachetools.LRUCache(self.CHECKED_SIZES)
        self.lock = threading.Lock()
        self.varying: set[str] = set()       # nodes whose sizes may follow the data
        for node in module.graph.nodes:
            if (node.op == 'placeholder' and inputs_vary) or (
                    node.op == 'call_function' and (varies(node.target) or any(
                        n.name in self.varying for n in node.all_input_nodes))):
                self.varying.add(node.name)
        self.free = {node.name for node in module.graph.nodes       # sizes, views: no check
                     if node.op == 'call_function' and costs_nothing(node.target)}

    def cost(self, node: fx.Node, args: tuple, kwargs: dict) -> tuple[int, int]:
        """Return (bytes, work) of ``node`` at these argument sizes."""
        if node.name in self.free:
            return 0, 0
        if node.name not in self.varying:
            key, costs = node.name, self.costs
        else:
            key, costs = (node.name,) + tuple(
                tuple(leaf.shape) if isinstance(leaf, torch.Tensor) else leaf
                for leaf in torch.utils._pytree.tree_leaves((args, kwargs))), self.varying_costs
        with self.lock:          # lanes share it; an LRU reorders on reads
            found = costs.get(key)
        if found is None:
            nbytes, flops, elements = cost(node.target, args, kwargs, self.device)
            found = nbytes, self.rate.work(node.target, args, flops, elements)
            with self.lock:
                costs[key] = found
        return found


class _CheckedInterpreter(fx.Interpreter):
    def __init__(self, checked: _SizeChecked, budget: _Budget, request_inputs: list[bool]):
        super().__init__(checked.module, garbage_collect_values=True)
        self.checked = checked
        self.budget = budget
        self.request_inputs = iter(request_inputs)     # per placeholder, in order

    def run_node(self, node: fx.Node):
        if node.op == 'call_function':
            args, kwargs = self.fetch_args_kwargs_from_env(node)
            self.budget.charge(node, *self.checked.cost(node, args, kwargs))
            result = node.target(*args, **kwargs)
        else:
            result = super().run_node(node)
        if node.op != 'output':     # weights and the request's inputs are not the call's
            self.budget.hold(node, result, fixed=node.op == 'get_attr' or (
                node.op == 'placeholder' and next(self.request_inputs)))
        for gone in self.user_to_last_uses.get(node, ()):
            self.budget.release(gone)
        return result

    def computed(self) -> list:
        """Return the module's outputs computed so far (None for the others)."""
        output = next(n for n in reversed(self.module.graph.nodes) if n.op == 'output')
        return [self.env.get(value) if isinstance(value, fx.Node) else value
                for value in output.args[0]]


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
