"""
Write the program format (:mod:`rrto_wire.program`) from an exported ATen graph: the robot's side.

:func:`from_exported` takes a ``torch.export`` program, :func:`write` any
ATen-level fx graph (the split and hybrid plans' band programs).  Both refuse
graphs that write into a parameter, buffer or input and operators outside the
server's allowlist, so what the robot uploads is what the server will load.
:func:`chain` joins programs into one chained program
(:mod:`rrto_wire.program_chain`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Sequence

import torch
import torch.fx as fx

from torch.fx.experimental.symbolic_shapes import free_unbacked_symbols

from rrto_wire import ops, ops_dynamic, program_chain
from rrto_wire.dtypes import dtype_name
from rrto_wire.program import encode_arg, MAX_LABEL_CHARS, PROGRAM_FORMAT, PROGRAM_VERSION, \
    sha256, SHARDED_VERSION
from rrto_wire.weights import pack_weights, shard_weights


def _out_meta(node: fx.Node) -> dict | None:
    val = node.meta.get('val')
    if isinstance(val, torch.Tensor) and 'dims' in node.meta:
        # a recorded operator's real output, its data-dependent dims named by the recorder
        dims, most = node.meta['dims']
        return {'dtype': dtype_name(val.dtype),
                'shape': [0 if i in dims else int(s) for i, s in enumerate(val.shape)],
                'dims': list(dims), 'sym': [f'{node.name}:{i}' for i in dims], 'max': list(most)}
    if isinstance(val, torch.Tensor):
        # a size that depends on the data is written as 0, its dimension listed in "dims",
        # with its size expression in "sym" (equal expressions: equal sizes) and the upper
        # bound export proved for it in "max" (null: none), for the robot's reply check
        dims = [i for i, s in enumerate(val.shape) if free_unbacked_symbols(s)]
        meta = {'dtype': dtype_name(val.dtype),
                'shape': [0 if i in dims else int(s) for i, s in enumerate(val.shape)]}
        if not dims:
            return meta
        sizes = [val.shape[i].node for i in dims]
        return dict(meta, dims=dims, sym=[str(s.expr) for s in sizes],
                    max=[_upper_bound(s) for s in sizes])
    return None


def _upper_bound(size: Any) -> int | None:
    """Return the largest value export proved a symbolic size can take (None: unbounded)."""
    upper = size.shape_env.bound_sympy(size.expr).upper
    return int(upper) if upper.is_Integer else None


def is_dynamic(graph: fx.Graph) -> bool:
    """Return True if a graph (exported, or captured by dynamo) has unbacked sizes."""
    return any(free_unbacked_symbols(node.meta.get('val', node.meta.get('example_value')))
               for node in graph.nodes)


def _scope(node: fx.Node, prefix: str) -> str:
    stack = node.meta.get('nn_module_stack') or {}
    if not stack:
        return ''
    path = list(stack.values())[-1][0]
    if not isinstance(path, str):
        return ''
    return path[len(prefix):] if prefix and path.startswith(prefix) else path


def from_exported(ep: 'torch.export.ExportedProgram', in_spec: Any, out_spec: Any,
                  label: str = 'model', scope_prefix: str = '', sharded: bool = False
                  ) -> tuple[bytes, bytes | list[bytes]]:
    """
    Serialise an exported program taking/returning flat tensors.

    Returns ``(program_json, weights_blob)``, or with ``sharded`` a version-2
    program and its list of per-layer weight blobs.  Raises ValueError for
    programs that mutate buffers (a model left in training mode) or use
    operators the server would refuse.
    """
    from torch.export.graph_signature import InputKind, OutputKind

    signature = ep.graph_signature
    for spec in signature.output_specs:
        if spec.kind != OutputKind.USER_OUTPUT:
            raise ValueError(f'model mutates {spec.target!r} during inference; call model.eval()')
    params, inputs, weights = {}, [], {}
    for spec in signature.input_specs:
        name = spec.arg.name
        if spec.kind == InputKind.USER_INPUT:
            inputs.append(name)
        elif spec.kind in (InputKind.PARAMETER, InputKind.BUFFER, InputKind.CONSTANT_TENSOR):
            source = ep.state_dict if spec.target in ep.state_dict else ep.constants
            params[name] = spec.target
            weights[spec.target] = source[spec.target]
        else:
            raise ValueError(f'input {name!r} of kind {spec.kind} cannot be offloaded')
    return write(ep.graph, inputs, params, weights, in_spec, out_spec, label, scope_prefix,
                 sharded)


def _refuse_state_mutation(node: fx.Node, placeholders: dict) -> None:
    """
    Raise ValueError if ``node`` writes into a parameter, buffer or input in place.

    ``placeholders`` are those that must not be written.
    """
    schema = getattr(node.target, '_schema', None)
    if schema is None:
        return
    for index, arg in enumerate(schema.arguments):
        if arg.alias_info is None or not arg.alias_info.is_write:
            continue
        value = node.args[index] if index < len(node.args) else node.kwargs.get(arg.name)
        if isinstance(value, fx.Node) and value.name in placeholders:
            raise ValueError(f'model mutates {value.target!r} in place during inference '
                             f'({node.target}); offloaded state would diverge from the robot\'s')


def write(graph: fx.Graph, inputs: Sequence[str], params: dict[str, str],
          weights: dict[str, torch.Tensor], in_spec: Any, out_spec: Any,
          label: str = 'model', scope_prefix: str = '', sharded: bool = False,
          dynamic: bool | None = None, writable: frozenset = frozenset()
          ) -> tuple[bytes, bytes | list[bytes]]:
    """
    Serialise an ATen-level fx graph whose placeholders are ``inputs`` and ``params``.

    ``dynamic`` True writes a dynamic program even without unbacked sizes (a
    chain's segment of recorded operators, its data-dependent dims in the
    nodes' ``meta['dims']``); ``writable`` names inputs it may write into
    in place (a chain link's inputs that are earlier links' values).
    """
    if sharded:
        shards = shard_weights(weights)
        weights_field = [{'blob': sha256(blob), 'prefix': prefix} for prefix, blob in shards]
        weights_blob = [blob for _, blob in shards]
    else:
        weights_blob = pack_weights(weights) if weights else b''
        weights_field = sha256(weights_blob) if weights else None
    placeholders = {n.name: n for n in graph.nodes if n.op == 'placeholder'}
    dynamic = is_dynamic(graph) if dynamic is None else dynamic
    protected = {name: n for name, n in placeholders.items() if name not in writable}
    nodes, outputs = [], []
    for node in graph.nodes:
        if node.op == 'call_function':
            _refuse_state_mutation(node, protected)
            op = (ops_dynamic if dynamic else ops).name_of(node.target)
            nodes.append({'name': node.name, 'op': op, 'args': encode_arg(list(node.args)),
                          'kwargs': {k: encode_arg(v) for k, v in node.kwargs.items()},
                          'out': _out_meta(node), 'scope': _scope(node, scope_prefix)})
        elif node.op == 'output':
            outputs = encode_arg(list(node.args[0]))
        elif node.op != 'placeholder':
            raise ValueError(f'graph node {node.name} ({node.op}) cannot be offloaded')
    doc = {
        'format': PROGRAM_FORMAT, 'version': SHARDED_VERSION if sharded else PROGRAM_VERSION,
        'label': label[:MAX_LABEL_CHARS], 'weights': weights_field,   # the server's bound
        'inputs': [dict(name=n, **_out_meta(placeholders[n])) for n in inputs],
        'in_spec': in_spec, 'out_spec': out_spec, 'params': dict(params),
        'nodes': nodes, 'outputs': outputs,
    }
    if dynamic:
        doc['dynamic'] = True
    return json.dumps(doc, sort_keys=True, separators=(',', ':')).encode(), weights_blob


@dataclass
class Link:
    """One graph of a chain: its program, its weights, where its inputs come from, its guard."""

    doc: dict                           # the link's own program (a parsed program JSON)
    weights: dict[str, torch.Tensor]    # its parameters by weights key
    # per input: ('in', j) the chain's input j, or ('out', link, k) an earlier link's output k
    sources: list[tuple]
    # checked before it runs: (link, output, dim or None for numel, relation, constant)
    tests: list[tuple]


def chain(links: Sequence[Link], label: str) -> tuple[bytes, bytes]:
    """
    Write one dynamic program running ``links`` in order, each after its guard.

    Its inputs are link 0's, its outputs every link's outputs in order.  Each
    link's values are renamed ``c<i>_<name>``; an output of link ``i >= 1``
    lists dimension 0 as data-dependent (``"dims"``, at most its size): it
    comes back empty when a guard before it fails.  Returns the program JSON
    and the weights blob (every link's parameters, keys ``c<i>.<key>``).
    """
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
        'format': PROGRAM_FORMAT, 'version': PROGRAM_VERSION, 'label': label[:MAX_LABEL_CHARS],
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
    nodes.append({'name': f'g{i}', 'op': program_chain.GUARD, 'args': [sizes, checks],
                  'kwargs': {}, 'out': None, 'scope': ''})
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
    """Return a node's output metadata in the chain: symbols per link, dim 0 free if guarded."""
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
