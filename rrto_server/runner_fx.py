"""
Runners over a per-execution value map: fx modules (CPU replay, eager) and frozen TorchScript.

On CUDA, TF32 is a process-wide switch; :class:`Tf32Gate` lets segments that
want the same setting run together and makes a segment that wants the other
setting wait until they have launched, so two lanes never race on it.
"""

from __future__ import annotations

import contextlib
import threading
from typing import Sequence

import torch
import torch.fx as fx

from rrto_server.replay_key import PRECISIONS
from rrto_server.runner import Execution
from rrto_server.transfers import stage, to_host
from rrto_wire.ops_dynamic import check_output, varies
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

    def run_segment(self, ex: Execution, k: int) -> None:
        ins, outs = self.live[k]
        if k == 0 and self.device.type == 'cuda':
            stream = torch.cuda.current_stream(self.device)
            for name in self.input_names:           # staged on a CPU worker's copy stream
                ex.env[name].record_stream(stream)
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
    mode: each operator's output size is checked on meta tensors before it is
    allocated, against ``max_bytes`` (the sandbox's memory budget per call),
    since its sizes at run time may exceed those of the sandbox's trial.
    """

    backend = 'eager-dynamic'
    can_express = False

    def __init__(self, *args, max_bytes: int):
        super().__init__(*args)
        # a later segment's inputs are values of the earlier ones: their sizes may vary
        self.modules = [_SizeChecked(module, max_bytes, inputs_vary=k > 0)
                        for k, module in enumerate(self.modules)]


class _SizeChecked:
    """
    An fx module run node by node, each size that depends on the data checked first.

    A node downstream of a data-dependent operator (``nonzero``...) may have other
    sizes than in the sandbox's trial; each such node's output size is
    computed on meta tensors (:func:`check_output`) before it runs, once per
    distinct set of argument sizes (remembered: meta shape functions cost
    more than most operators).  The other nodes have the trial's sizes.
    """

    CHECKED_SIZES = 4096     # argument size sets remembered per module

    def __init__(self, module: fx.GraphModule, max_bytes: int, inputs_vary: bool):
        self.module = module
        self.max_bytes = max_bytes
        self.checked: set = set()
        self.varying: set[str] = set()       # nodes whose sizes may follow the data
        for node in module.graph.nodes:
            if (node.op == 'placeholder' and inputs_vary) or (
                    node.op == 'call_function' and (varies(node.target) or any(
                        n.name in self.varying for n in node.all_input_nodes))):
                self.varying.add(node.name)

    def __call__(self, *inputs: torch.Tensor):
        return _CheckedInterpreter(self).run(*inputs)

    def check(self, node: fx.Node, args: tuple, kwargs: dict) -> None:
        """Refuse ``node`` if its output at these argument sizes exceeds ``max_bytes``."""
        if node.name not in self.varying:
            return
        key = (node.name,) + tuple(
            tuple(leaf.shape) if isinstance(leaf, torch.Tensor) else leaf
            for leaf in torch.utils._pytree.tree_leaves((args, kwargs)))
        if key in self.checked:
            return
        check_output(node.target, args, kwargs, self.max_bytes)
        if len(self.checked) >= self.CHECKED_SIZES:
            self.checked.clear()
        self.checked.add(key)


class _CheckedInterpreter(fx.Interpreter):
    def __init__(self, checked: _SizeChecked):
        super().__init__(checked.module, garbage_collect_values=True)
        self.checked = checked

    def run_node(self, node: fx.Node):
        if node.op != 'call_function':
            return super().run_node(node)
        args, kwargs = self.fetch_args_kwargs_from_env(node)
        self.checked.check(node, args, kwargs)
        return node.target(*args, **kwargs)


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
