"""
A captured graph as the server runs it: tensors in, tensors out, sizes rebuilt on the robot.

A graph dynamo captures before a branch on a size returns that size too (a
``SymBool`` such as ``Eq(4*u3, 0)``, or a ``SymInt``): Python branches on it.
No program returns a size, so :class:`SubgraphModule` returns the graph's
tensor outputs only, and :class:`Outputs` computes the others on the robot
from the sizes of the tensors that came back (``u3`` is the size of
dimension 0 of some output), or says it cannot (the graph then runs locally).
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

from rrto_ros.partition_eager import Op, storage, written


class SubgraphModule(torch.nn.Module):
    """A captured graph with its weights held as buffers; data in, tensor outputs out."""

    def __init__(self, graph: torch.fx.GraphModule, arity: int,
                 weights: dict[int, torch.Tensor]):
        super().__init__()
        self.graph = graph
        self.arity = arity
        self.slots = sorted(weights)
        for k, position in enumerate(self.slots):
            self.register_buffer(f'w{k}', weights[position].detach())

    def forward(self, *inputs: torch.Tensor) -> tuple:
        it = iter(inputs)
        weights = dict(zip(self.slots, self.buffers()))
        args = [weights[i] if i in weights else next(it) for i in range(self.arity)]
        return tuple(o for o in self.graph(*args) if isinstance(o, torch.Tensor))


class Outputs:
    """A captured graph's outputs, rebuilt from its tensor outputs."""

    def __init__(self, graph: torch.fx.GraphModule):
        output = next(n for n in reversed(graph.graph.nodes) if n.op == 'output')
        self.kinds: list[tuple[str, Any]] = []      # ('t', index) | ('s', expr, type) | ('c', v)
        self.sizes: dict = {}                        # size expression -> (tensor, dim)
        tensors = 0
        for arg in output.args[0]:
            value = arg.meta.get('example_value') if isinstance(arg, torch.fx.Node) else arg
            if isinstance(value, torch.Tensor):
                for dim, size in enumerate(value.shape):
                    if isinstance(size, torch.SymInt):
                        self.sizes.setdefault(size.node.expr, (tensors, dim))
                self.kinds.append(('t', tensors))
                tensors += 1
            elif isinstance(value, (torch.SymInt, torch.SymBool)):
                self.kinds.append(('s', value.node.expr, bool if isinstance(
                    value, torch.SymBool) else int))
            else:
                self.kinds.append(('c', value))
        known = {expr: 1 for expr in self.sizes}
        self.ok = all(not kind[1].xreplace(known).free_symbols
                      for kind in self.kinds if kind[0] == 's')

    def complete(self, tensors: tuple) -> tuple:
        """Return the graph's outputs given its tensor outputs (as they came back)."""
        if all(kind[0] == 't' for kind in self.kinds):
            return tuple(tensors)
        values = {expr: tensors[t].shape[d] for expr, (t, d) in self.sizes.items()}
        out = []
        for kind in self.kinds:
            if kind[0] == 't':
                out.append(tensors[kind[1]])
            elif kind[0] == 's':
                out.append(kind[2](kind[1].xreplace(values)))
            else:
                out.append(kind[1])
        return tuple(out)


def counted_call(graph: torch.fx.GraphModule, args: tuple, data: list,
                 wrote: list | None = None) -> tuple:
    """
    Run a captured graph counting its FLOPs; return its outputs, FLOPs and bytes moved.

    ``wrote`` (a list) gets each ATen operator that wrote into an argument's
    memory, by its schema (:class:`WriteWatch`).
    """
    watch = WriteWatch(args) if wrote is not None else contextlib.nullcontext()
    # outside inference mode: the counter's module hooks look for the weights' autograd
    with torch.inference_mode(False), torch.no_grad(), \
            FlopCounterMode(display=False) as counter, watch:
        outputs = graph(*args)
    if wrote is not None:
        wrote += watch.found
    outputs = tuple(o.clone() if isinstance(o, torch.Tensor) and not o.is_inference() else o
                    for o in outputs)      # cloned in inference mode: inference tensors
    tensors = data + [o for o in outputs if isinstance(o, torch.Tensor)]
    return outputs, int(counter.get_total_flops()), sum(t.numel() * t.element_size()
                                                        for t in tensors)


class WriteWatch(TorchDispatchMode):
    """Note each ATen operator whose schema writes into the memory of the given tensors."""

    def __init__(self, tensors: Any):
        super().__init__()
        self.memory = {storage(t) for t in tensors if isinstance(t, torch.Tensor)}
        self.found: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if any(storage(t) in self.memory for t in written(Op(func, args, kwargs, out))):
            self.found.append(str(func))
        return out


def tensors_of(module: torch.nn.Module) -> list[torch.Tensor]:
    """Return every tensor a module holds: parameters, buffers and plain tensor attributes."""
    tensors = list(module.parameters()) + list(module.buffers())
    for sub in module.modules():
        tensors += [v for v in vars(sub).values() if isinstance(v, torch.Tensor)]
    return tensors


# tensor methods that return a view of their input (an in-place write to one writes into it)
_VIEWS = frozenset(('view', 'reshape', 'permute', 'transpose', 'narrow', 'select', 'expand',
                    'squeeze', 'unsqueeze', 'flatten', 't', 'unflatten', 'view_as', 'getitem',
                    '__getitem__', 'unbind', 'split', 'chunk', 'as_strided', 'detach'))


def writes_inputs(graph: torch.fx.GraphModule) -> bool:
    """
    Return True if a captured graph writes in place into one of its inputs (or a view).

    From what the graph says before it runs: an ATen operator's schema
    (``alias_info.is_write``), an ``out=`` or ``inplace=True`` argument, a
    module with ``inplace`` set, a tensor method named with a trailing ``_``.
    What it does when it runs is watched too (:class:`WriteWatch`, on the
    graph's first call).
    """
    of_input: set = set()
    for node in graph.graph.nodes:
        name = node.target if node.op == 'call_method' else getattr(node.target, '__name__', '')
        first = node.args[0] if node.args else None
        if node.op == 'placeholder' or (name in _VIEWS and first in of_input):
            of_input.add(node)
        elif first in of_input and (name == 'setitem' or (
                isinstance(name, str) and name.endswith('_') and not name.endswith('__'))):
            return True
        elif any(a in of_input for a in _written_arguments(graph, node)):
            return True
    return False


def _written_arguments(graph: torch.fx.GraphModule, node: torch.fx.Node) -> list:
    """Return the arguments of one node that it writes into, as far as its call says."""
    out = [node.kwargs.get('out')]
    first = node.args[0] if node.args else node.kwargs.get('input')
    if node.kwargs.get('inplace') is True:
        out.append(first)
    if node.op == 'call_module' and getattr(graph.get_submodule(node.target), 'inplace', False):
        out.append(first)
    schema = getattr(node.target, '_schema', None)      # an OpOverload
    if node.op == 'call_function' and schema is not None:
        for index, arg in enumerate(schema.arguments):
            if arg.alias_info is not None and arg.alias_info.is_write:
                out.append(node.args[index] if index < len(node.args) else
                           node.kwargs.get(arg.name))
    return [a for a in out if isinstance(a, torch.fx.Node)]
