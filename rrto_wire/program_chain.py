"""
Chained programs: several captured graphs in one request, each after a guard on sizes.

A partitioned model (:mod:`rrto_ros.partition`) runs its captured graphs one
round trip each, because Python between them branches on sizes the server
computed (torchvision's ``batched_nms``: ``if boxes.numel() > 4000``).  When
the graphs' inputs are the earlier graphs' outputs, the robot may ask for
the next graph speculatively: one program runs link 0, then, if its
**guard** holds on the sizes link 0 produced, link 1, and so on.  The guard
is a conjunction of comparisons of one size with a constant, the shapes
dynamo specialised the next graph for (``size(boxes, 0) == 1000``):

    rrto.guard([s0, s1, ...], [["eq", 1000], ["ge", 1], ...])

with each ``s`` the result of a ``sym_size``/``sym_numel`` node
(:func:`rrto_wire.ops_dynamic.check_sizes` refuses anything else), at most
:data:`MAX_TERMS` terms, a relation from :data:`RELATIONS` and an integer
constant: evaluating it costs a few comparisons.  A guard that fails raises
:class:`GuardFailed`: the server stops the program there
(:class:`rrto_server.runner_fx.DynamicRunner`) and returns the outputs
computed so far, each later one as zeros of its declared shape, whose
guarded dimensions are 0 (empty).  The robot evaluates the same guard on
what comes back and uses a later link's outputs only if it held, and only
if its own Python then calls that graph on exactly those tensors; a wrong
guess costs the round trip the guess would have saved, never a wrong
result.  :func:`compose` writes such a program from the links' own
programs (:mod:`rrto_wire.program_writer`).
"""

from __future__ import annotations

import json
import operator
from dataclasses import dataclass
from typing import Any, Sequence

import torch

from rrto_wire.errors import invalid_program

GUARD = 'rrto.guard'
MAX_TERMS = 256             # comparisons in one guard
RELATIONS = {'eq': operator.eq, 'ne': operator.ne, 'lt': operator.lt, 'le': operator.le,
             'gt': operator.gt, 'ge': operator.ge}
_LIMIT = 1 << 62            # constants: sizes, nothing near an overflow


class GuardFailed(Exception):
    """A chained program's guard did not hold: the links after it do not run."""


def guard(sizes: list, tests: list) -> None:
    """Raise :class:`GuardFailed` unless every ``sizes[i]`` relates to ``tests[i]`` as named."""
    for size, (relation, constant) in zip(sizes, tests):
        if not RELATIONS[relation](size, constant):
            raise GuardFailed(f'size {size} is not {relation} {constant}')


def check_guard(args: Any) -> None:
    """Refuse a guard node's arguments unless they are ``[refs, [[relation, int], ...]]``."""
    if not (isinstance(args, list) and len(args) == 2 and isinstance(args[0], list)
            and isinstance(args[1], list)):
        raise invalid_program(f'{GUARD} takes [sizes, tests]')
    sizes, tests = args
    if len(sizes) != len(tests) or len(tests) > MAX_TERMS:
        raise invalid_program(f'{GUARD}: as many sizes as tests, at most {MAX_TERMS}')
    for size in sizes:
        if not (isinstance(size, dict) and set(size) == {'n'}):
            raise invalid_program(f'{GUARD}: each size is a reference to a size node')
    for test in tests:
        if not (isinstance(test, list) and len(test) == 2 and test[0] in RELATIONS
                and type(test[1]) is int and -_LIMIT <= test[1] <= _LIMIT):
            raise invalid_program(f'{GUARD}: each test is [relation, integer], relation one of '
                                  f'{sorted(RELATIONS)}')


@dataclass
class Link:
    """One graph of a chain: its program, its weights, where its inputs come from, its guard."""

    doc: dict                           # the link's own program (a parsed program JSON)
    weights: dict[str, torch.Tensor]    # its parameters by weights key
    # per input: ('in', j) the chain's input j, or ('out', link, k) an earlier link's output k
    sources: list[tuple]
    # checked before it runs: (link, output, dim or None for numel, relation, constant)
    tests: list[tuple]


def compose(links: Sequence[Link], label: str) -> tuple[bytes, bytes]:
    """
    Write one dynamic program running ``links`` in order, each after its guard.

    Its inputs are link 0's, its outputs every link's outputs in order.  Each
    link's values are renamed ``c<i>_<name>``; an output of link ``i >= 1``
    lists dimension 0 as data-dependent (``"dims"``, at most its size): it
    comes back empty when a guard before it fails.  Returns the program JSON
    and the weights blob (every link's parameters, keys ``c<i>.<key>``).
    """
    from rrto_wire.program import PROGRAM_FORMAT, PROGRAM_VERSION, sha256
    from rrto_wire.weights import pack_weights
    nodes: list[dict] = []
    outputs: list[list[Any]] = []          # per link: its encoded outputs, renamed
    weights: dict[str, torch.Tensor] = {}
    params: dict[str, str] = {}
    first = links[0].doc
    for i, link in enumerate(links):
        doc = link.doc
        names: dict[str, Any] = {}
        for (name, source) in zip((x['name'] for x in doc['inputs']), link.sources):
            if source[0] == 'in':
                names[name] = {'n': f'c0_{first["inputs"][source[1]]["name"]}'}
            else:
                names[name] = outputs[source[1]][source[2]]
        for placeholder, key in doc.get('params', {}).items():
            names[placeholder] = {'n': f'c{i}_{placeholder}'}
            params[f'c{i}_{placeholder}'] = f'c{i}.{key}'
            weights[f'c{i}.{key}'] = link.weights[key]
        if link.tests:
            nodes += _guard_nodes(i, link.tests, outputs)
        guarded = {o['n'] for o in doc['outputs'] if isinstance(o, dict) and 'n' in o} \
            if i else set()
        for node in doc['nodes']:
            renamed = f'c{i}_{node["name"]}'
            nodes.append(dict(node, name=renamed, args=_renamed(node['args'], names),
                              kwargs=_renamed(node['kwargs'], names),
                              out=_out(node.get('out'), i, renamed, node['name'] in guarded)))
            names[node['name']] = {'n': renamed}
        outputs.append(_renamed(doc['outputs'], names))
    flat = [o for per_link in outputs for o in per_link]
    blob = pack_weights(weights) if weights else b''
    program = {
        'format': PROGRAM_FORMAT, 'version': PROGRAM_VERSION, 'label': label,
        'weights': sha256(blob) if weights else None,
        'inputs': [dict(x, name=f'c0_{x["name"]}') for x in first['inputs']],
        'in_spec': first['in_spec'], 'out_spec': {'tuple': ['T'] * len(flat)},
        'params': params, 'nodes': nodes, 'outputs': flat, 'dynamic': True}
    return json.dumps(program, sort_keys=True, separators=(',', ':')).encode(), blob


def _guard_nodes(i: int, tests: list[tuple], outputs: list[list[Any]]) -> list[dict]:
    nodes, sizes, checks = [], [], []
    for t, (link, k, dim, relation, constant) in enumerate(tests):
        name = f'g{i}_{t}'
        value = outputs[link][k]
        nodes.append({'name': name, 'op': 'aten.sym_numel.default' if dim is None
                      else 'aten.sym_size.int', 'args': [value] if dim is None
                      else [value, dim], 'kwargs': {}, 'out': None, 'scope': ''})
        sizes.append({'n': name})
        checks.append([relation, int(constant)])
    nodes.append({'name': f'g{i}', 'op': GUARD, 'args': [sizes, checks], 'kwargs': {},
                  'out': None, 'scope': ''})
    return nodes


def _renamed(arg: Any, names: dict[str, Any]) -> Any:
    if isinstance(arg, list):
        return [_renamed(a, names) for a in arg]
    if isinstance(arg, dict):
        if set(arg) == {'n'}:
            return names[arg['n']]
        return {k: _renamed(v, names) for k, v in arg.items()}
    return arg


def _out(out: dict | None, i: int, name: str, guarded: bool) -> dict | None:
    """A node's output metadata in the chain: its symbols per link, dim 0 free if guarded."""
    if out is None:
        return None
    out = dict(out, shape=list(out['shape']))
    dims = list(out.get('dims', ()))
    sym = [None if s is None else f'c{i}:{s}' for s in out.get('sym', [None] * len(dims))]
    most = list(out.get('max', [None] * len(dims)))
    if guarded and out['shape'] and 0 not in dims:
        dims, sym, most = [0] + dims, [f'{name}:0'] + sym, [out['shape'][0]] + most
        out['shape'][0] = 0
    if dims:
        out.update(dims=dims, sym=sym, max=most)
    return out


def skipped(spec_shape: Sequence[int], dtype: torch.dtype,
            device: torch.device | str = 'cpu') -> torch.Tensor:
    """Return what a chained program returns for an output its failed guard skipped."""
    return torch.zeros(tuple(spec_shape), dtype=dtype, device=device)
