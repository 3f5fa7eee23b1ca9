"""
The eager operators between a partitioned model's graphs, recorded as links of a chain.

Dynamo skips a whole frame when a graph break falls inside a loop
(torchvision's ``filter_proposals`` and ``postprocess_detections`` call
``batched_nms`` in a ``for`` over the images): what such a frame computes
between two captured graphs runs as eager ATen operators on the robot, and
the next graph's inputs are none of the previous graph's outputs, so no
guard on sizes can vouch for them (:mod:`rrto_ros.partition_chain`).

While the partition watches one call, :class:`Recorder` (a
``TorchDispatchMode`` whose ``ignore_compile_internals`` lets dynamo go on
compiling and calling its graphs) notes each ATen operator that runs outside
the captured graphs.  :class:`Segment` joins those whose tensor inputs the
chain knows (its inputs, an earlier link's outputs, a module's weights, a
small constant) into one link: an fx graph of the recorded operators with
the Python values (sizes, thresholds, indices Python read) as they were.
After each operator whose output size follows the data (``nonzero``,
``where``, ``unique``, boolean indexing, NMS) comes a guard that its size
is the traced one in each dimension that follows the data (derived from the
operator: :mod:`rrto_ros.partition_sizes`), so every constant after it is
consistent: on other data the server stops there.  Values Python read
(``.item()``) are constants: the robot verifies a later graph's inputs
against those the server used, value by value, before it takes that graph's
outputs (:class:`~rrto_ros.partition_chain.Speculation`), so a constant
that no longer holds costs a round trip, never a wrong result.  In-place writes are
kept only into tensors the chain made itself and that no remote graph reads
or returns afterwards.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_map

from rrto_ros.partition_sizes import varying
from rrto_wire import ops_dynamic, program_chain
from rrto_wire.program_writer import write

log = logging.getLogger('rrto_ros.partition')
aten = torch.ops.aten
MAX_CONSTANT_BYTES = 1 << 16    # a tensor the chain did not make, taken as a constant
# operators that only hand back their input (or a fresh copy of a constant) or read a value
_SKIPPED = frozenset((aten.lift_fresh.default, aten.lift_fresh_copy.default))


@dataclass
class Op:
    """One ATen operator that ran outside the captured graphs: its arguments and outputs."""

    func: Any
    args: tuple
    kwargs: dict
    out: Any
    dims: list | None = field(default=None, compare=False, repr=False)  # varying(), once

    def outputs(self) -> list[torch.Tensor]:
        """Return its tensor outputs, in order."""
        return [t for t in tree_flatten(self.out)[0] if isinstance(t, torch.Tensor)]


class Recorder(TorchDispatchMode):
    """Note each ATen operator run outside the graphs (``paused`` while a graph runs)."""

    def __init__(self, events: list):
        super().__init__()
        self.events = events
        self.paused = 0

    @classmethod
    def ignore_compile_internals(cls) -> bool:
        """Let dynamo compile and run its graphs as without the mode."""
        return True

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if not self.paused and func not in _SKIPPED:
            self.events.append(Op(func, args, kwargs, out))
        return out


def storage(t: torch.Tensor) -> int:
    """Return a key of the memory a tensor (or any view of it) lives in."""
    return t.untyped_storage().data_ptr() or id(t)


def written(op: Op) -> list[torch.Tensor]:
    """Return the tensors an operator writes into in place."""
    out = []
    for index, arg in enumerate(op.func._schema.arguments):
        if arg.alias_info is not None and arg.alias_info.is_write:
            value = op.args[index] if index < len(op.args) else op.kwargs.get(arg.name)
            out += [t for t in tree_flatten(value)[0] if isinstance(t, torch.Tensor)]
    return out


@dataclass
class Segment:
    """
    Consecutive recorded operators the chain can run: one link.

    ``inputs`` are the tensors it takes from the chain (earlier links, the
    chain's inputs), ``constants`` those it holds; ``values`` maps each
    tensor it makes to (op index, position among the op's tensor outputs).
    """

    ops: list[Op] = field(default_factory=list)
    inputs: list[torch.Tensor] = field(default_factory=list)
    constants: list[torch.Tensor] = field(default_factory=list)
    values: dict[int, tuple[int, int]] = field(default_factory=dict)
    tensors: dict[int, torch.Tensor] = field(default_factory=dict)
    exported: list[int] = field(default_factory=list)     # ids of its outputs, in order

    def export(self, tensor: torch.Tensor) -> None:
        """Make one of its tensors an output of the link."""
        if id(tensor) not in self.exported:
            self.exported.append(id(tensor))

    def guarded(self) -> dict[int, list[int]]:
        """Return the ids of the outputs whose size follows the data, each with those dims."""
        return {id(t): dims for op in self.ops for t, dims in zip(op.outputs(), varying(op))
                if dims}

    def module(self) -> 'EagerModule':
        """Return the link as an EagerModule whose guards raise GuardFailed, outputs in order."""
        for key in self.guarded():
            self.export(self.tensors[key])
        return EagerModule(self)


class EagerModule(torch.nn.Module):
    """A segment's operators as an fx graph: run on the robot, written for the server."""

    def __init__(self, segment: Segment):
        super().__init__()
        graph = fx.Graph()
        nodes: dict[int, Any] = {}
        self.arity = len(segment.inputs)
        self.data = list(segment.inputs)        # as traced: a chain link's inputs
        for k, tensor in enumerate(segment.inputs):
            nodes[id(tensor)] = _placeholder(graph, f'x{k}', tensor)
        for k, tensor in enumerate(segment.constants):
            self.register_buffer(f'c{k}', tensor.detach().clone())
            nodes[id(tensor)] = _placeholder(graph, f'c{k}', tensor)
        guarded = segment.guarded()
        for op in segment.ops:
            def node_of(a):
                return nodes[id(a)] if isinstance(a, torch.Tensor) else a
            node = graph.call_function(op.func, tree_map(node_of, op.args),
                                       tree_map(node_of, op.kwargs))
            if isinstance(op.out, torch.Tensor):
                node.meta['val'] = op.out
                made = [(op.out, node)]
            else:
                made = []
                for i, t in enumerate(op.out):
                    item = graph.call_function(_getitem(), (node, i))
                    item.meta['val'] = t
                    made.append((t, item))
            for tensor, made_node in made:
                nodes[id(tensor)] = made_node
                dims = guarded.get(id(tensor), [])
                if dims:    # the size of each dimension that follows the data, as traced
                    bound = max(a.numel() for a in tree_flatten(op.args)[0]
                                if isinstance(a, torch.Tensor))
                    made_node.meta['dims'] = (dims, [max(bound, int(tensor.shape[d]))
                                                     for d in dims])
                    sizes = [graph.call_function(aten.sym_size.int, (made_node, d))
                             for d in dims]
                    graph.call_function(program_chain.guard, (sizes, [
                        ['eq', int(tensor.shape[d])] for d in dims]))
        outputs = [nodes[key] for key in segment.exported]
        # (output index, dimension, traced size): the guards, on the outputs as they come back
        self.tests: list[tuple[int, int, int]] = [
            (k, d, int(segment.tensors[key].shape[d]))
            for k, key in enumerate(segment.exported) for d in guarded.get(key, [])]
        graph.output(tuple(outputs))
        self.graph_module = fx.GraphModule(torch.nn.Module(), graph)
        self.segment_constants = len(segment.constants)

    def forward(self, *inputs: torch.Tensor) -> tuple:
        with torch.inference_mode():
            return tuple(self.graph_module(*inputs, *self.buffers()))

    def program(self, label: str) -> tuple[bytes, dict[str, torch.Tensor]]:
        """Return the link written as a dynamic program, and its constants by key."""
        names = [n.name for n in self.graph_module.graph.nodes if n.op == 'placeholder']
        weights = dict(self.named_buffers())
        params = {names[self.arity + k]: f'c{k}' for k in range(self.segment_constants)}
        data, _ = write(self.graph_module.graph, names[:self.arity], params, weights,
                        None, None, label, dynamic=True,
                        writable=frozenset(names[:self.arity]))
        return data, weights


def _placeholder(graph: fx.Graph, name: str, tensor: torch.Tensor) -> fx.Node:
    node = graph.placeholder(name)
    node.meta['val'] = tensor
    return node


def _getitem() -> Any:
    import operator
    return operator.getitem


def allowed(op: Op) -> bool:
    """Return True if the server runs this operator in a dynamic program."""
    try:
        ops_dynamic.name_of(op.func)
    except ValueError:
        return False
    return True


def grow(head: Any, events: list, start: int, own: dict[int, torch.Tensor], joins: Any,
         is_remote: Any) -> list[tuple[Any, list[tuple]]]:
    """
    Return a chain's kept links grown from ``head`` along ``events`` (numbered from ``start``).

    Whatever raises while a chain is planned or its segments built (an
    operator the recorder saw that no rule here foresaw) leaves that chain
    out, logged, with no links: never the whole partition (r7 #5).
    """
    try:
        builder = Builder(head, own, joins)
        for position, event in enumerate(events, start):
            builder.add(position, event)
        return builder.finish(is_remote)
    except Exception as exc:  # noqa: B902 - one chain left out, never the partition
        log.info('chain%s: not chained, planning it failed (%s: %s)',
                 getattr(head.subgraph, 'index', '?'), type(exc).__name__, exc)
        return []


class Builder:
    """
    Grow one chain from its head along a watched call: graphs and recorded operators.

    ``own`` maps ids of the module's tensors (its weights) to them.  Each
    link is ``[position, link, sources]``: a graph call
    (:class:`~rrto_ros.partition_chain.Call`) or a :class:`Segment`.
    """

    def __init__(self, head: Any, own: dict[int, torch.Tensor], joins: Any):
        self.own = own
        self.joins = joins      # joins(call, sources): may this graph call be a link
        self.known: dict[int, tuple] = {id(t): ('in', j) for j, t in enumerate(head.data)}
        self.known.update({id(t): ('out', 0, k) for k, t in enumerate(head.outputs)})
        self.links: list[list] = [[-1, head, [('in', j) for j in range(len(head.data))]]]
        self.protected = {storage(t) for t in list(head.data) + list(head.outputs)}
        self.owned: set[int] = set()
        self.tainted: set[int] = set()
        self.produced: set[int] = set()
        self.segment: Segment | None = None

    def add(self, position: int, event: Any) -> None:
        """Join one event of the watched call to the chain, or note what it spoilt."""
        if isinstance(event, Op):
            self._op(position, event)
            return
        self.segment = None
        data = list(event.data)
        sources = [self.known.get(id(t)) for t in data]
        if None in sources or any(storage(t) in self.tainted for t in data) or not self.joins(
                event, sources):
            self._taint(event.outputs, [])
            return
        self.links.append([position, event, sources])
        for k, t in enumerate(event.outputs):
            self.known[id(t)] = ('out', len(self.links) - 1, k)
            self.produced.add(id(t))
        if event.subgraph.remote is not None:   # its inputs and outputs: never written later
            self.protected.update(storage(t) for t in data + list(event.outputs))
        else:
            self.owned.update(storage(t) for t in event.outputs)

    def _op(self, position: int, op: Op) -> None:
        outputs = op.outputs()
        if self.segment is None:
            self.segment = Segment()
            self.links.append([position, self.segment, []])
        segment, index = self.segment, len(self.links) - 1
        inputs = [a for a in tree_flatten((op.args, op.kwargs))[0] if isinstance(a, torch.Tensor)]
        writes = written(op)
        if not outputs or not allowed(op) or any(
                storage(w) not in self.owned or storage(w) in self.protected for w in writes):
            self._taint(outputs, writes)
            return
        new_inputs, constants = [], []
        for a in inputs:
            if storage(a) in self.tainted:
                self._taint(outputs, writes)
                return
            if id(a) in segment.tensors or any(a is b for b in new_inputs + constants):
                continue
            source = self.known.get(id(a))
            if source is not None and not (source[0] == 'seg' and source[1] == index):
                new_inputs.append(a)
            elif source is None and id(a) not in self.produced and (
                    self.own.get(id(a)) is a or a.numel() * a.element_size()
                    <= MAX_CONSTANT_BYTES):
                constants.append(a)
            else:
                self._taint(outputs, writes)
                return
        for a in new_inputs:
            segment.inputs.append(a)
            self.links[index][2].append(self.known[id(a)])
        segment.constants += constants
        segment.ops.append(op)
        for k, t in enumerate(outputs):
            segment.values[id(t)] = (len(segment.ops) - 1, k)
            segment.tensors[id(t)] = t
            self.known[id(t)] = ('seg', index, id(t))
            self.produced.add(id(t))
            if storage(t) not in self.protected:
                self.owned.add(storage(t))

    def _taint(self, outputs: Any, writes: list) -> None:
        for t in outputs:
            self.produced.add(id(t))
            self.known.pop(id(t), None)
            self.tainted.add(storage(t))
        self.tainted.update(storage(w) for w in writes)

    def finish(self, is_remote: Any) -> list[tuple[Any, list[tuple]]]:
        """Return the kept links as (link, sources): the head, remote graphs, what they need."""
        links = self.links
        needed: set[int] = set()
        keep = [False] * len(links)
        for n in range(len(links) - 1, -1, -1):
            keep[n] = n == 0 or is_remote(links[n][1]) or n in needed
            if keep[n]:
                needed.update(s[1] for s in links[n][2] if s[0] in ('out', 'seg'))
        for n, (_, link, sources) in enumerate(links):
            if keep[n]:
                for s in sources:
                    if s[0] == 'seg':
                        links[s[1]][1].export(links[s[1]][1].tensors[s[2]])
        modules = {n: links[n][1].module() for n in range(len(links))
                   if keep[n] and isinstance(links[n][1], Segment)}
        index = {old: new for new, old in enumerate(n for n in range(len(links)) if keep[n])}
        out = []
        for n, (_, link, sources) in enumerate(links):
            if not keep[n]:
                continue
            resolved = []
            for s in sources:
                if s[0] == 'seg':
                    s = ('out', s[1], links[s[1]][1].exported.index(s[2]))
                resolved.append(s if s[0] == 'in' else ('out', index[s[1]], s[2]))
            out.append((modules.get(n, link), resolved))
        return out
