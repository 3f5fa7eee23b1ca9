"""
Split execution plans: which rows of which layers run on the robot and on the server.

A :class:`Plan` is one of

* ``local``: everything on the robot;
* ``offload``: everything on the server (one round trip: input up, outputs down);
* ``split``: a layer-boundary split (Neurosurgeon): the robot runs the layers
  before ``cut``, sends the values crossing the cut, the server runs the rest;
* ``hybrid``: the local prefix up to ``cut`` is split by rows: the robot
  computes the top ``ratio`` of the rows of every value crossing the cut, the
  server the rest, from the input rows (with halo) the robot sends first; the
  robot computes its band while the server computes its own, merges both where
  the global operators begin, and runs the rest.  One round trip: the input
  band goes up, the server's band of the crossing values comes down.

:func:`band_program` turns the rows a side must produce into a program of the
uploaded format (slices, explicit border padding, the original operators with
row padding removed), so the server runs its half as a recorded replay and the
robot runs its half with the same operators.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Any, Sequence

from rrto_ros.graph import GraphAnalysis, Interval
from rrto_wire.program import PROGRAM_FORMAT, PROGRAM_VERSION, Program

KINDS = ('local', 'offload', 'split', 'hybrid')


@dataclass(frozen=True)
class Plan:
    """Where each part of one inference runs (see module docstring)."""

    kind: str
    cut: int = 0          # number of prefix nodes (split and hybrid)
    ratio: float = 1.0    # robot's share of the crossing rows (hybrid)

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f'plan kind must be one of {KINDS}, got {self.kind!r}')
        if not 0.0 <= self.ratio <= 1.0:
            raise ValueError(f'plan ratio must be within [0, 1], got {self.ratio}')

    @property
    def name(self) -> str:
        if self.kind in ('local', 'offload'):
            return self.kind
        if self.kind == 'split':
            return f'split@{self.cut}'
        return f'hybrid@{self.cut}:{self.ratio:.2f}'

    def to_json(self) -> dict:
        return {'kind': self.kind, 'cut': self.cut, 'ratio': round(self.ratio, 4)}

    @classmethod
    def from_json(cls, obj: dict) -> 'Plan':
        return cls(obj['kind'], int(obj.get('cut', 0)), float(obj.get('ratio', 1.0)))


def robot_rows(height: int, ratio: float) -> int:
    """Return how many of ``height`` rows the robot computes at ``ratio`` (the top ones)."""
    return min(height, max(0, int(math.floor(ratio * height + 0.5))))


class _Emitter:
    """Builds the node list of a derived program, in the uploaded JSON format."""

    def __init__(self):
        self.nodes: list[dict] = []
        self.names: set[str] = set()

    def fresh(self, base: str) -> str:
        name, i = base, 0
        while name in self.names:
            i += 1
            name = f'{base}_{i}'
        self.names.add(name)
        return name

    def emit(self, name: str, op: str, args: list, kwargs: dict, out: dict | None,
             scope: str = '') -> str:
        self.names.add(name)
        self.nodes.append({'name': name, 'op': op, 'args': args, 'kwargs': kwargs, 'out': out,
                           'scope': scope})
        return name


def _rename(arg: Any, mapping: dict[str, str]) -> Any:
    if isinstance(arg, list):
        return [_rename(a, mapping) for a in arg]
    if isinstance(arg, dict) and 'n' in arg:
        return {'n': mapping.get(arg['n'], arg['n'])}
    return arg


def _spec(dtype: str, shape: Sequence[int]) -> dict:
    return {'dtype': dtype, 'shape': [int(s) for s in shape]}


def _with_rows(spec: dict, axis: int, rows: int) -> dict:
    shape = list(spec['shape'])
    shape[axis] = rows
    return _spec(spec['dtype'], shape)


class _Band:
    """A value available on one side as rows [start, stop) of its full extent."""

    __slots__ = ('name', 'start', 'stop', 'spec', 'axis')

    def __init__(self, name: str, start: int, stop: int, spec: dict, axis: int):
        self.name, self.start, self.stop, self.spec, self.axis = name, start, stop, spec, axis


def _slice(em: _Emitter, band: _Band, start: int, stop: int, base: str) -> _Band:
    """Return ``band`` cut down to rows [start, stop) (no node if it already is)."""
    if (start, stop) == (band.start, band.stop):
        return band
    if not band.start <= start <= stop <= band.stop:
        raise AssertionError(f'rows {start}:{stop} outside the computed band '
                             f'{band.start}:{band.stop} of {band.name}')
    spec = _with_rows(band.spec, band.axis, stop - start)
    name = em.emit(em.fresh(f'{base}__rows'), 'aten.slice.Tensor',
                   [{'n': band.name}, band.axis, start - band.start, stop - band.start], {}, spec)
    return _Band(name, start, stop, spec, band.axis)


def _row_padding(node_args: list, index: int) -> list:
    """Return the padding argument with its row component set to zero."""
    padding = node_args[index] if index < len(node_args) else 0
    cols = padding[1] if isinstance(padding, list) and len(padding) > 1 else (
        padding[0] if isinstance(padding, list) and padding else padding)
    return [0, int(cols)]


def band_program(analysis: GraphAnalysis, cut: int, targets: dict[str, Interval],
                 label: str) -> tuple[dict, dict[str, Interval]]:
    """
    Return a program computing rows ``targets[v]`` of each crossing value ``v``.

    The program's inputs are the rows of the original inputs it needs (in the
    original input order, only those needed), its outputs the target bands in
    the order of ``targets``.  Operators see explicit zero (or -inf, for max
    pooling) padding only at the true image border, so every computed row
    equals the unsplit result.  Also returns the input rows each input band
    covers, ``{input name: (start, stop)}``.
    """
    program = analysis.program
    need = analysis.required(cut, targets)
    spec_of = {n.name: n.out for n in program.nodes}
    spec_of.update({name: spec for name, spec in program.inputs})
    em = _Emitter()
    bands: dict[str, _Band] = {}
    inputs = []
    for name, spec in program.inputs:
        if name in need:
            a, b = need[name]
            axis = analysis.axis[name]
            band_spec = _with_rows(spec.to_json(), axis, b - a)
            inputs.append(dict(name=name, **band_spec))
            em.names.add(name)
            bands[name] = _Band(name, a, b, band_spec, axis)
    used_params: set[str] = set()
    consts: dict[str, str] = {}
    for node in program.nodes[:cut]:
        info = analysis.info[node.name]
        if info.kind == 'noop':
            continue
        if info.kind == 'const':
            em.emit(node.name, node.op, node.args, node.kwargs,
                    node.out.to_json() if node.out else None, node.scope)
            consts[node.name] = node.name
            used_params |= node.refs & set(program.params)
            continue
        if node.name not in need:
            continue
        a, b = need[node.name]
        axis = analysis.axis[node.name]
        out = _with_rows(node.out.to_json(), axis, b - a)
        args, kwargs = copy.deepcopy(node.args), copy.deepcopy(node.kwargs)
        mapping: dict[str, str] = {}
        if info.kind in ('pointwise', 'cat', 'permute'):
            for source in info.spatial_inputs:
                mapping[source] = _slice(em, bands[source], a, b, node.name).name
        elif info.kind == 'upsample':
            source = info.spatial_inputs[0]
            ia, ib = analysis.input_rows(node.name, (a, b))[source]
            mapping[source] = _slice(em, bands[source], ia, ib, node.name).name
            up_rows = (ib - ia) * info.scale
            if args[1] is not None:
                args[1] = [up_rows, args[1][1]]
            full = _with_rows(node.out.to_json(), axis, up_rows)
            up = em.emit(em.fresh(f'{node.name}__up'), node.op, _rename(args, mapping), kwargs,
                         full, node.scope)
            bands[node.name] = _slice(em, _Band(up, ia * info.scale, ib * info.scale, full, axis),
                                      a, b, node.name)
            used_params |= node.refs & set(program.params)
            continue
        elif info.kind == 'window':
            source = info.spatial_inputs[0]
            ra, rb = analysis.input_rows(node.name, (a, b))[source]
            height = analysis.height(source)
            inner = _slice(em, bands[source], max(ra, 0), min(rb, height), node.name)
            top, bottom = max(0, -ra), max(0, rb - height)
            if top or bottom:
                value = {'f': '-inf'} if node.op.startswith('aten.max_pool2d') else 0.0
                padded_spec = _with_rows(inner.spec, axis, rb - ra)
                padded = em.emit(em.fresh(f'{node.name}__pad'), 'aten.constant_pad_nd.default',
                                 [{'n': inner.name}, [0, 0, top, bottom], value], {}, padded_spec)
                inner = _Band(padded, ra, rb, padded_spec, axis)
            mapping[source] = inner.name
            pad_index = 4 if node.op.startswith('aten.conv2d') else 3
            while len(args) <= pad_index:
                args.append(_default_arg(node.op, len(args)))
            args[pad_index] = _row_padding(args, pad_index)
        else:
            raise AssertionError(f'unexpected {info.kind} node {node.name} in a local prefix')
        em.emit(node.name, node.op, _rename(args, mapping), _rename(kwargs, mapping), out,
                node.scope)
        bands[node.name] = _Band(node.name, a, b, out, axis)
        used_params |= node.refs & set(program.params)
    outputs = []
    for value, (a, b) in targets.items():
        outputs.append({'n': _slice(em, bands[value], a, b, f'{value}__out').name})
    doc = {
        'format': PROGRAM_FORMAT, 'version': PROGRAM_VERSION, 'label': label,
        'weights': program.weights_digest if used_params else None,
        'inputs': inputs,
        'in_spec': {'tuple': [{'tuple': ['T'] * len(inputs)}, {'dict': []}]},
        'out_spec': {'tuple': ['T'] * len(outputs)},
        'params': {p: program.params[p] for p in sorted(used_params)},
        'nodes': em.nodes, 'outputs': outputs,
    }
    return doc, {name: need[name] for name, _ in program.inputs if name in need}


def _default_arg(op: str, index: int) -> Any:
    """Return the schema default of a positional argument we need to rewrite."""
    defaults = {'aten.conv2d.default': [None, None, None, [1, 1], [0, 0], [1, 1], 1],
                'aten.max_pool2d.default': [None, None, [], [0, 0], [1, 1], False],
                'aten.avg_pool2d.default': [None, None, [], [0, 0], False, True, None]}
    return defaults[op][index]


def suffix_program(analysis: GraphAnalysis, cut: int, label: str) -> dict:
    """Return a program running nodes ``[cut:]`` from the full crossing values (and outputs)."""
    program = analysis.program
    crossing = analysis.crossing(cut)
    spec_of = {n.name: n.out for n in program.nodes}
    spec_of.update({name: spec for name, spec in program.inputs})
    nodes, used_params = [], set()
    needed = set(program.output_names).union(*(n.refs for n in program.nodes[cut:]))
    for node in program.nodes[:cut]:
        if analysis.info[node.name].kind == 'const' and node.name in needed:
            nodes.append(node)
    nodes += [n for n in program.nodes[cut:]]
    docs = []
    for node in nodes:
        used_params |= node.refs & set(program.params)
        docs.append({'name': node.name, 'op': node.op, 'args': node.args, 'kwargs': node.kwargs,
                     'out': node.out.to_json() if node.out else None, 'scope': node.scope})
    return {
        'format': PROGRAM_FORMAT, 'version': PROGRAM_VERSION, 'label': label,
        'weights': program.weights_digest if used_params else None,
        'inputs': [dict(name=v, **spec_of[v].to_json()) for v in crossing],
        'in_spec': {'tuple': [{'tuple': ['T'] * len(crossing)}, {'dict': []}]},
        'out_spec': program.out_spec,
        'params': {p: program.params[p] for p in sorted(used_params)},
        'nodes': docs, 'outputs': program.outputs,
    }


def hybrid_targets(analysis: GraphAnalysis, cut: int, ratio: float
                   ) -> tuple[dict[str, Interval], dict[str, Interval]]:
    """Return the (robot, server) row intervals of every value crossing ``cut``."""
    robot, server = {}, {}
    for value in analysis.crossing(cut):
        height = analysis.height(value)
        rows = robot_rows(height, ratio)
        robot[value] = (0, rows)
        server[value] = (rows, height)
    return robot, server


def as_program(doc: dict) -> Program:
    """Parse a derived program document (validated like an uploaded one)."""
    return Program(copy.deepcopy(doc))
