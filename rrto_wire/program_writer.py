"""
Write the program format (:mod:`rrto_wire.program`) from an exported ATen graph: the robot's side.

:func:`from_exported` takes a ``torch.export`` program, :func:`write` any
ATen-level fx graph (the split and hybrid plans' band programs).  Both refuse
graphs that write into a parameter, buffer or input and operators outside the
server's allowlist, so what the robot uploads is what the server will load.
"""

from __future__ import annotations

import json
from typing import Any, Sequence

import torch
import torch.fx as fx

from torch.fx.experimental.symbolic_shapes import free_unbacked_symbols

from rrto_wire import ops, ops_dynamic
from rrto_wire.dtypes import dtype_name
from rrto_wire.program import encode_arg, PROGRAM_FORMAT, PROGRAM_VERSION, sha256, SHARDED_VERSION
from rrto_wire.weights import pack_weights, shard_weights


def _out_meta(node: fx.Node) -> dict | None:
    val = node.meta.get('val')
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
    """Raise ValueError if ``node`` writes into a parameter, buffer or input in place."""
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
          label: str = 'model', scope_prefix: str = '', sharded: bool = False
          ) -> tuple[bytes, bytes | list[bytes]]:
    """Serialise an ATen-level fx graph whose placeholders are ``inputs`` and ``params``."""
    if sharded:
        shards = shard_weights(weights)
        weights_field = [{'blob': sha256(blob), 'prefix': prefix} for prefix, blob in shards]
        weights_blob = [blob for _, blob in shards]
    else:
        weights_blob = pack_weights(weights) if weights else b''
        weights_field = sha256(weights_blob) if weights else None
    placeholders = {n.name: n for n in graph.nodes if n.op == 'placeholder'}
    dynamic = is_dynamic(graph)
    nodes, outputs = [], []
    for node in graph.nodes:
        if node.op == 'call_function':
            _refuse_state_mutation(node, placeholders)
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
        'label': label, 'weights': weights_field,
        'inputs': [dict(name=n, **_out_meta(placeholders[n])) for n in inputs],
        'in_spec': in_spec, 'out_spec': out_spec, 'params': dict(params),
        'nodes': nodes, 'outputs': outputs,
    }
    if dynamic:
        doc['dynamic'] = True
    return json.dumps(doc, sort_keys=True, separators=(',', ':')).encode(), weights_blob
