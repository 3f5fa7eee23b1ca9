"""
Which operators of a program are spatially local, and which input rows each output row needs.

Hybrid-Parallel splits *local* operators by image rows between robot and
server.  An operator is local when every output row depends on a bounded
band of input rows: convolutions and poolings (a window), elementwise
operators and batch norm in eval mode (the same row), nearest upsampling by
an integer factor, concatenation along channels, and permutes that keep track
of where the row axis went.  Everything else (linear, global pooling,
flatten, reshape, softmax, attention, and any operator not listed here) is
*global*: unknown is global, never guessed local.

The analysis runs on an :class:`rrto_wire.program.Program`, the ATen graph
the robot uploads, so the band programs built from it (:mod:`rrto_ros.split`)
are programs of the same format.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

from rrto_wire.program import Program, ProgramNode

Interval = tuple[int, int]  # rows [start, stop)

ELEMENTWISE = frozenset({
    'relu', 'relu_', 'hardtanh', 'hardtanh_', 'sigmoid', 'tanh', 'silu', 'gelu', 'leaky_relu',
    'elu', 'hardswish', 'hardsigmoid', 'clamp', 'clamp_min', 'clamp_max', 'add', 'sub', 'mul',
    'div', 'neg', 'abs', 'exp', 'log', 'sqrt', 'rsqrt', 'pow', 'to', '_to_copy', 'clone',
    'contiguous', 'alias', 'dropout', 'batch_norm', 'type_as', 'mish', 'softplus',
})
WINDOWED = frozenset({'conv2d', 'max_pool2d', 'avg_pool2d'})
NO_OUTPUT = frozenset({'_assert_tensor_metadata'})


@dataclass
class NodeInfo:
    """How one node relates its output rows to its inputs' rows."""

    # pointwise | window | upsample | permute | cat | noop | const | global
    kind: str
    reason: str = ''            # why a node is global
    window: tuple[int, int, int, int] = (1, 1, 0, 1)  # kernel, stride, padding, dilation (rows)
    scale: int = 1              # integer nearest-upsampling factor (rows)
    spatial_inputs: list[str] = field(default_factory=list)

    @property
    def local(self) -> bool:
        return self.kind != 'global'


def _op_name(node: ProgramNode) -> str:
    return node.op.split('.')[1] if node.op.startswith('aten.') else node.op


def _refs(arg: Any) -> list[str]:
    if isinstance(arg, dict) and 'n' in arg:
        return [arg['n']]
    if isinstance(arg, list):
        return [r for item in arg for r in _refs(item)]
    return []


def _pair(value: Any, default: int) -> int:
    """Return the row component of an int or [rows, cols] argument."""
    if isinstance(value, list):
        return int(value[0]) if value else default
    return int(value) if isinstance(value, int) else default


def _arg(node: ProgramNode, index: int, name: str, default: Any) -> Any:
    if index < len(node.args):
        return node.args[index]
    return node.kwargs.get(name, default)


class GraphAnalysis:
    """Row-locality of every node of a program, and interval arithmetic over it."""

    def __init__(self, program: Program, param_shapes: dict[str, Sequence[int]]):
        self.program = program
        self.index = {n.name: i for i, n in enumerate(program.nodes)}
        self.shapes: dict[str, tuple[int, ...]] = {n: s.shape for n, s in program.inputs}
        for placeholder, key in program.params.items():
            self.shapes[placeholder] = tuple(param_shapes[key])
        for node in program.nodes:
            if node.out is not None:
                self.shapes[node.name] = node.out.shape
        self.axis: dict[str, int | None] = {name: None for name in self.shapes}
        self.info: dict[str, NodeInfo] = {}
        self.dynamic = {name for name, _ in program.inputs}  # values that depend on the inputs
        self._infer_input_axes()
        for node in program.nodes:
            self.info[node.name] = self._classify(node)

    # ------------------------------------------------------------------ classification
    def _infer_input_axes(self) -> None:
        """Find each 4-D input's row axis from its first windowed consumer (through permutes)."""
        for name, spec in self.program.inputs:
            if len(spec.shape) == 4:
                axis = self._axis_from_consumers(name, depth=0)
                self.axis[name] = axis

    def _axis_from_consumers(self, value: str, depth: int) -> int | None:
        if depth > 8:
            return None
        for node in self.program.nodes:
            if value not in _refs(node.args) and value not in _refs(list(node.kwargs.values())):
                continue
            op = _op_name(node)
            if op in WINDOWED or op == 'upsample_nearest2d':
                return 2 if _refs(node.args[:1]) == [value] else None
            if op == 'permute':
                inner = self._axis_from_consumers(node.name, depth + 1)
                return None if inner is None else int(node.args[1][inner])
            if op in ELEMENTWISE and node.out is not None and len(node.out.shape) == 4:
                return self._axis_from_consumers(node.name, depth + 1)
        return None

    def _spatial(self, names: list[str]) -> list[str]:
        return [n for n in names if self.axis.get(n) is not None]

    def _global(self, node: ProgramNode, reason: str) -> NodeInfo:
        return NodeInfo('global', reason=reason)

    def _classify(self, node: ProgramNode) -> NodeInfo:
        op = _op_name(node)
        refs = _refs(node.args) + _refs(list(node.kwargs.values()))
        spatial = self._spatial(refs)
        if any(self.info.get(r) is not None and not self.info[r].local for r in refs):
            return self._global(node, 'depends on a global operator')
        if op in NO_OUTPUT:
            return NodeInfo('noop', spatial_inputs=spatial)
        if not self.dynamic.intersection(refs):
            return NodeInfo('const')  # parameters only: computed in full on both sides
        self.dynamic.add(node.name)
        if not spatial:
            return self._global(node, 'input without a known row axis')
        if node.out is None:
            return self._global(node, f'{node.op} does not return one tensor')
        if op == 'permute':
            (source,) = spatial
            dims = [int(d) for d in node.args[1]]
            self.axis[node.name] = dims.index(self.axis[source])
            return NodeInfo('permute', spatial_inputs=spatial)
        if op in WINDOWED or op == 'upsample_nearest2d':
            return self._windowed(node, op, spatial)
        if op == 'cat':
            return self._cat(node, spatial)
        if op in ELEMENTWISE:
            return self._pointwise(node, op, spatial)
        return self._global(node, f'{node.op} is not a known local operator')

    def _windowed(self, node: ProgramNode, op: str, spatial: list[str]) -> NodeInfo:
        source = _refs(node.args[:1])
        if spatial != source or self.axis[source[0]] != 2 or len(node.out.shape) != 4:
            return self._global(node, f'{node.op} on a non-NCHW or extra spatial input')
        self.axis[node.name] = 2
        if op == 'upsample_nearest2d':
            in_h, out_h = self.shapes[source[0]][2], node.out.shape[2]
            if in_h == 0 or out_h % in_h:
                return self._global(node, 'nearest upsampling by a non-integer row factor')
            return NodeInfo('upsample', scale=out_h // in_h, spatial_inputs=spatial)
        if op == 'conv2d':
            kernel = self.shapes[_refs(node.args[1:2])[0]][2]
            stride = _pair(_arg(node, 3, 'stride', [1, 1]), 1)
            padding = _arg(node, 4, 'padding', [0, 0])
            if isinstance(padding, str):
                return self._global(node, f'conv2d padding={padding!r}')
            dilation = _pair(_arg(node, 5, 'dilation', [1, 1]), 1)
            return NodeInfo('window', window=(kernel, stride, _pair(padding, 0), dilation),
                            spatial_inputs=spatial)
        kernel = _pair(node.args[1], 1)
        stride = _pair(_arg(node, 2, 'stride', []), kernel) or kernel
        padding = _pair(_arg(node, 3, 'padding', 0), 0)
        if op == 'max_pool2d':
            dilation = _pair(_arg(node, 4, 'dilation', 1), 1)
            if _arg(node, 5, 'ceil_mode', False):
                return self._global(node, 'max_pool2d with ceil_mode')
        else:
            dilation = 1
            if _arg(node, 4, 'ceil_mode', False) or (
                    padding and not _arg(node, 5, 'count_include_pad', True)) or (
                    _arg(node, 6, 'divisor_override', None) is not None):
                return self._global(node, 'avg_pool2d with ceil_mode or padding-aware divisor')
        return NodeInfo('window', window=(kernel, stride, padding, dilation),
                        spatial_inputs=spatial)

    def _cat(self, node: ProgramNode, spatial: list[str]) -> NodeInfo:
        tensors = _refs(node.args[0])
        dim = int(_arg(node, 1, 'dim', 0))
        axes = {self.axis.get(t) for t in tensors}
        if len(axes) != 1 or None in axes:
            return self._global(node, 'cat of non-spatial tensors')
        axis = axes.pop()
        rank = len(node.out.shape)
        if dim % rank == axis or len({self.shapes[t][axis] for t in tensors}) != 1:
            return self._global(node, 'cat along the row axis')
        self.axis[node.name] = axis
        return NodeInfo('cat', spatial_inputs=tensors)

    def _pointwise(self, node: ProgramNode, op: str, spatial: list[str]) -> NodeInfo:
        if op == 'batch_norm' and _arg(node, 5, 'training', False):
            return self._global(node, 'batch_norm in training mode')
        if op == 'dropout' and _arg(node, 2, 'train', False):
            return self._global(node, 'dropout in training mode')
        axes = {self.axis[s] for s in spatial}
        heights = {self.shapes[s][self.axis[s]] for s in spatial}
        if len(axes) != 1 or len(heights) != 1:
            return self._global(node, 'elementwise over differently laid-out tensors')
        axis, height = axes.pop(), heights.pop()
        out = node.out.shape
        if len(out) <= axis or out[axis] != height:
            return self._global(node, 'elementwise operator changes the row extent')
        for ref in set(_refs(node.args) + _refs(list(node.kwargs.values()))) - set(spatial):
            shape = self.shapes.get(ref, ())
            aligned = axis - (len(out) - len(shape))
            if 0 <= aligned < len(shape) and shape[aligned] != 1:
                return self._global(node, f'{ref} varies along rows but is not row-split')
        self.axis[node.name] = axis
        return NodeInfo('pointwise', spatial_inputs=spatial)

    # ------------------------------------------------------------------ cuts and intervals
    def height(self, value: str) -> int:
        return self.shapes[value][self.axis[value]]

    def crossing(self, cut: int) -> list[str]:
        """Return the inputs and prefix values that nodes from ``cut`` on, or the outputs, use."""
        nodes = self.program.nodes
        later = set(self.program.output_names).union(*(n.refs for n in nodes[cut:]))
        defined = [name for name, _ in self.program.inputs]
        defined += [n.name for n in nodes[:cut] if n.out is not None]
        return [value for value in defined if value in later]

    def cut_candidates(self) -> list[int]:
        """Return every cut whose prefix is all local and whose crossing values are row-split."""
        cuts = []
        for cut in range(1, len(self.program.nodes) + 1):
            if not self.info[self.program.nodes[cut - 1].name].local:
                break
            crossing = self.crossing(cut)
            if crossing and all(self.axis.get(v) is not None for v in crossing):
                cuts.append(cut)
        return cuts

    def input_rows(self, node_name: str, out_rows: Interval) -> dict[str, Interval]:
        """Return the (unclipped) rows of each spatial input that ``out_rows`` of a node needs."""
        info = self.info[node_name]
        a, b = out_rows
        if info.kind == 'window':
            k, s, p, d = info.window
            needed = (a * s - p, (b - 1) * s - p + d * (k - 1) + 1)
        elif info.kind == 'upsample':
            needed = (a // info.scale, (b - 1) // info.scale + 1)
        else:
            needed = (a, b)
        return {source: needed for source in info.spatial_inputs}

    def required(self, cut: int, targets: dict[str, Interval]) -> dict[str, Interval]:
        """Return, for every value of the prefix, the rows needed to produce ``targets``."""
        need: dict[str, Interval] = {v: iv for v, iv in targets.items() if iv[1] > iv[0]}
        for node in reversed(self.program.nodes[:cut]):
            info = self.info[node.name]
            if info.kind == 'noop':
                continue
            rows = need.get(node.name)
            if rows is None:
                continue
            for source, (a, b) in self.input_rows(node.name, rows).items():
                a, b = max(a, 0), min(b, self.height(source))
                if source in need:
                    a, b = min(a, need[source][0]), max(b, need[source][1])
                need[source] = (a, b)
        return need

    def receptive_field(self, cut: int, value: str) -> tuple[int, int]:
        """Return (input rows one middle output row needs, total row stride) of a value."""
        height = self.height(value)
        middle = height // 2
        need = self.required(cut, {value: (middle, middle + 1)})
        for name, _ in self.program.inputs:
            if name in need:
                a, b = need[name]
                return b - a, max(1, self.height(name) // max(1, height))
        return 1, 1
