"""
The uploaded model format: an ATen operator graph as JSON plus a raw weights blob.

Why not upload a torch.export archive: ``torch.export.load`` unpickles parts of
the archive, and symbolic shapes in its JSON go through ``sympy`` parsing.
A server must never do either with bytes from the network.  This format is
loaded by parsing JSON and resolving operator names through
:mod:`rrto_wire.ops`; weights are raw little-endian tensor bytes behind a JSON
index.  Both blobs are content-addressed: the program names its weights blob by
SHA-256, so a model re-exported for a new input signature re-uploads only the
small graph.

Program JSON::

    {"format": "rrto-program", "version": 1, "label": str, "weights": sha256 | null,
     (version 2: "weights": [{"blob": sha256, "prefix": str}, ...], see below)
     "inputs": [{"name", "dtype", "shape"}], "in_spec": treespec, "out_spec": treespec,
     "params": {placeholder_name: weights_key},
     "nodes": [{"name", "op", "args", "kwargs", "out": {"dtype", "shape"} | null, "scope"}],
     "outputs": [arg, ...]}

Arguments are JSON values; ``{"n": name}`` refers to an input, a parameter or an
earlier node; ``{"dtype"|"device"|"memory_format"|"layout"|"f": ...}`` tag
torch enums and non-finite floats.

Version 2 shards the weights per layer (:func:`shard_weights`): one blob per
module, holding its tensors under their local names (``weight``, ``bias``,
``running_mean``...), named in the program with the module's path as
``prefix``.  A layer that several programs share (the unchanged layers of
model variants) is then one blob in the content-addressed store, whatever
path it has in each.  Version 1 programs (one blob) are read as before; a
server that knows only version 1 refuses version 2 by its version number.
"""

from __future__ import annotations

import hashlib
import json
import math
import struct
from dataclasses import dataclass, field
from typing import Annotated, Any, Callable, Iterable, Sequence

import msgspec
import torch
import torch.fx as fx

from rrto_wire import ops, treespec
from rrto_wire.dtypes import dtype_name, torch_dtype
from rrto_wire.errors import ErrorCode, ProtocolError
from rrto_wire.tensors import TensorSpec, tensor_from_buffer

PROGRAM_FORMAT = 'rrto-program'
PROGRAM_VERSION = 1
SHARDED_VERSION = 2             # "weights" is a list of per-layer shards
MAX_SHARDS = 4096
MAX_NODES = 65536               # operators per program (large detectors have a few thousand)
WEIGHTS_MAGIC = b'RRTOWTS1'
_ALIGN = 64
_ENUM_TAGS = {'dtype': torch.dtype, 'memory_format': torch.memory_format, 'layout': torch.layout}
# the enum values a program may name besides wire dtypes: dense (strided) layouts only (a
# sparse layout reaches constructors that trust their indices)
_ENUM_NAMES = {'layout': frozenset({'strided'}),
               'memory_format': frozenset({'contiguous_format', 'channels_last',
                                           'preserve_format'})}


def sha256(data: bytes | memoryview) -> str:
    """Return the hex SHA-256 of a blob: the key of the content-addressed store."""
    return hashlib.sha256(data).hexdigest()


def _bad(message: str) -> ProtocolError:
    return ProtocolError(ErrorCode.BAD_REQUEST, f'invalid program: {message}')


_NonNegative = Annotated[int, msgspec.Meta(ge=0)]


class _WeightEntry(TensorSpec, frozen=True):
    """One tensor of a weights blob's index: its spec, name and place in the blob."""

    key: str
    offset: _NonNegative
    size: _NonNegative = msgspec.field(name='nbytes')    # TensorSpec.nbytes is its spec's


class _WeightsIndex(msgspec.Struct, frozen=True):
    tensors: list[_WeightEntry]


def _decode_json(data: bytes, what: str, schema: Any = Any) -> Any:
    """
    Decode JSON from the network strictly (msgspec): one error code for any malformation.

    Unlike ``json.loads``, msgspec refuses lone UTF-16 surrogates (escapes D800-DFFF),
    which no reply could encode again, and non-JSON literals (``NaN``).
    """
    try:
        return msgspec.json.decode(data, type=schema)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise _bad(f'{what} is not valid: {exc}') from None
    except RecursionError:
        raise _bad(f'{what} nests too deeply') from None


# ----------------------------------------------------------------------------- weights blob

def pack_weights(tensors: dict[str, torch.Tensor]) -> bytes:
    """Serialise named tensors deterministically (sorted keys, aligned raw bytes)."""
    index, chunks, offset = [], [], 0
    for key in sorted(tensors):
        tensor = tensors[key].detach().cpu().contiguous()
        raw = tensor.view(torch.int16) if tensor.dtype == torch.bfloat16 else tensor
        data = raw.numpy().tobytes() if tensor.numel() else b''
        pad = (-offset) % _ALIGN
        chunks.append(b'\0' * pad + data)
        offset += pad
        index.append({'key': key, 'dtype': dtype_name(tensor.dtype), 'shape': list(tensor.shape),
                      'offset': offset, 'nbytes': len(data)})
        offset += len(data)
    header = json.dumps({'tensors': index}, sort_keys=True, separators=(',', ':')).encode()
    prefix = WEIGHTS_MAGIC + struct.pack('<Q', len(header)) + header
    prefix += b'\0' * ((-len(prefix)) % _ALIGN)
    return prefix + b''.join(chunks)


def unpack_weights(blob: bytes | bytearray | memoryview) -> dict[str, torch.Tensor]:
    """Parse a weights blob into tensors that view (not copy) ``blob``."""
    view = memoryview(blob)
    if len(view) < 16 or bytes(view[:8]) != WEIGHTS_MAGIC:
        raise _bad('weights blob has no RRTOWTS1 magic')
    (hlen,) = struct.unpack('<Q', view[8:16])
    if hlen > len(view) - 16:
        raise _bad('weights header runs past the blob')
    index = _decode_json(bytes(view[16:16 + hlen]), 'weights header', _WeightsIndex).tensors
    base = 16 + hlen + ((-(16 + hlen)) % _ALIGN)
    tensors = {}
    for entry in index:
        start = base + entry.offset
        if entry.size != entry.nbytes or start + entry.size > len(view):
            raise _bad(f'weight {entry.key[:80]!r} does not fit the blob')
        tensors[entry.key] = tensor_from_buffer(view[start:start + entry.size], entry)
    return tensors


def shard_weights(tensors: dict[str, torch.Tensor]) -> list[tuple[str, bytes]]:
    """Return ``(prefix, blob)`` per module: tensors grouped by their key's module path."""
    modules: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        prefix, _, local = key.rpartition('.')
        modules.setdefault(prefix + '.' if prefix else '', {})[local] = tensor
    return [(prefix, pack_weights(modules[prefix])) for prefix in sorted(modules)]


def _shards(value: Any) -> list[tuple[str, str]]:
    """Validate a version-2 ``weights`` field; return ``(digest, prefix)`` pairs."""
    if not isinstance(value, list) or len(value) > MAX_SHARDS:
        raise _bad(f'weights must be a list of at most {MAX_SHARDS} shards')
    shards = []
    for item in value:
        if not isinstance(item, dict) or set(item) != {'blob', 'prefix'}:
            raise _bad('a weights shard is {"blob": sha256, "prefix": str}')
        blob, prefix = item['blob'], item['prefix']
        if not (isinstance(blob, str) and len(blob) == 64
                and all(c in '0123456789abcdef' for c in blob)):
            raise _bad(f'shard blob {blob!r} is not a sha256 digest')
        if not isinstance(prefix, str) or len(prefix) > 1024:
            raise _bad('shard prefix must be a string of at most 1024 characters')
        shards.append((blob, prefix))
    return shards


def unpack_shards(blobs: Sequence[tuple[bytes | bytearray | memoryview, str]]
                  ) -> dict[str, torch.Tensor]:
    """Parse ``(blob, prefix)`` shards into one dict of tensors named ``prefix + key``."""
    tensors: dict[str, torch.Tensor] = {}
    for blob, prefix in blobs:
        for key, tensor in unpack_weights(blob).items():
            if prefix + key in tensors:
                raise _bad(f'weight {prefix + key!r} is in two shards')
            tensors[prefix + key] = tensor
    return tensors


# ----------------------------------------------------------------------------- arguments

def encode_arg(arg: Any) -> Any:
    """Encode one fx node argument as JSON (see module docstring)."""
    if isinstance(arg, fx.Node):
        return {'n': arg.name}
    if isinstance(arg, float) and not math.isfinite(arg):
        return {'f': repr(arg)}
    if arg is None or isinstance(arg, (bool, int, float, str)):
        return arg
    if isinstance(arg, (list, tuple)):
        return [encode_arg(a) for a in arg]
    if isinstance(arg, torch.device):
        return {'device': str(arg)}
    for tag, kind in _ENUM_TAGS.items():
        if isinstance(arg, kind):
            return {tag: str(arg).replace('torch.', '')}
    raise ValueError(f'cannot serialise argument {arg!r} of type {type(arg).__name__}')


def refs_in(obj: Any) -> Iterable[str]:
    """Yield the value names an encoded argument refers to."""
    if isinstance(obj, list):
        for item in obj:
            yield from refs_in(item)
    elif isinstance(obj, dict):
        if 'n' in obj:
            if not isinstance(obj['n'], str):
                raise _bad('a reference {"n": name} names a value by a string')
            yield obj['n']
        else:
            for value in obj.values():
                yield from refs_in(value)


def decode_arg(obj: Any, lookup: Callable[[str], Any], device: torch.device) -> Any:
    """Decode an encoded argument; ``lookup`` maps a value name to an fx node."""
    if isinstance(obj, list):
        return [decode_arg(item, lookup, device) for item in obj]
    if not isinstance(obj, dict):
        return obj
    if len(obj) != 1:
        raise _bad(f'argument object {obj!r} must have exactly one tag')
    (tag, value), = obj.items()
    if tag == 'n':
        return lookup(value)
    if tag == 'f':
        if value not in ('inf', '-inf', 'nan'):
            raise _bad(f'bad float literal {value!r}')
        return float(value)
    if tag == 'device':
        return device
    if tag == 'dtype':
        try:
            return torch_dtype(value)
        except ProtocolError:
            raise _bad(f'unknown dtype {str(value)[:40]!r}') from None
    if tag in _ENUM_NAMES:
        if value not in _ENUM_NAMES[tag]:
            raise _bad(f'unknown {tag} {str(value)[:40]!r} (allowed: {sorted(_ENUM_NAMES[tag])})')
        return getattr(torch, value)
    raise _bad(f'unknown argument tag {tag!r}')


# ----------------------------------------------------------------------------- program

@dataclass
class ProgramNode:
    """One operator call of a program, with its target resolved through the allowlist."""

    name: str
    op: str
    fn: Callable
    args: list
    kwargs: dict
    out: TensorSpec | None
    scope: str
    refs: frozenset[str] = field(init=False)     # the value names it uses (computed once)

    def __post_init__(self) -> None:
        self.refs = frozenset(refs_in(self.args)) | frozenset(
            refs_in(list(self.kwargs.values())))


class Program:
    """A parsed and validated program; builds fx modules for the whole graph or a node range."""

    def __init__(self, doc: dict):
        if not isinstance(doc, dict) or doc.get('format') != PROGRAM_FORMAT:
            raise _bad(f"not an {PROGRAM_FORMAT} document")
        version = doc.get('version')
        if version not in (PROGRAM_VERSION, SHARDED_VERSION):
            raise _bad(f'program version {version!r} not supported')
        try:
            self.label = str(doc.get('label', 'model'))
            if version == SHARDED_VERSION:
                self.weights_digest = None
                self.weight_shards = _shards(doc.get('weights'))
            else:
                self.weights_digest = doc.get('weights')
                self.weight_shards = [(self.weights_digest, '')] if self.weights_digest else []
            self.inputs = [(i['name'], TensorSpec.from_json(i)) for i in doc['inputs']]
            self.in_spec = doc['in_spec']
            self.out_spec = doc['out_spec']
            self.params = dict(doc.get('params', {}))
            if len(doc['nodes']) > MAX_NODES:
                raise _bad(f'{len(doc["nodes"])} nodes; at most {MAX_NODES}')
            self.nodes = [self._parse_node(n) for n in doc['nodes']]
            self.outputs = list(doc['outputs'])
        except ProtocolError:
            raise
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise _bad(f'{type(exc).__name__}: {exc}') from None
        self._check_references()
        self._check_writes()

    @staticmethod
    def _parse_node(node: dict) -> ProgramNode:
        out = node.get('out')
        fn = ops.resolve(node['op'])
        return ProgramNode(
            name=str(node['name']), op=node['op'], fn=fn,
            args=node.get('args', []),
            kwargs=ops.check_call(fn, node.get('args', []), node.get('kwargs', {})),
            out=TensorSpec.from_json(out) if out is not None else None,
            scope=str(node.get('scope', '')))

    def _check_references(self) -> None:
        defined = {name for name, _ in self.inputs} | set(self.params)
        if len(defined) != len(self.inputs) + len(self.params):
            raise _bad('input and parameter names overlap')
        for node in self.nodes:
            missing = node.refs - defined
            if missing:
                raise _bad(f'node {node.name!r} uses undefined values {sorted(missing)}')
            if node.name in defined:
                raise _bad(f'value {node.name!r} defined twice')
            defined.add(node.name)
        missing = set(refs_in(self.outputs)) - defined
        if missing:
            raise _bad(f'outputs use undefined values {sorted(missing)}')
        try:
            leaves = treespec.count_leaves(self.out_spec)
        except (AttributeError, TypeError, ValueError):
            raise _bad('out_spec is not a tree spec') from None
        if leaves != len(self.outputs):
            raise _bad('out_spec does not match the number of outputs')

    def _check_writes(self) -> None:
        """
        Refuse nodes that write into shared state: an input, a weight or a view of one.

        Weights are shared by every request (and, on one server, every client), so an
        in-place operator on one would change later results while they are still
        reported as offloaded.  Views are followed through the schemas' alias
        annotations: ``view(w)`` aliases ``w``, and so does anything viewing it.
        """
        shared = {name for name, _ in self.inputs} | set(self.params)
        for node in self.nodes:
            written = set(refs_in(ops.writes(node.fn, node.args, node.kwargs)))
            if written & shared:
                raise ProtocolError(
                    ErrorCode.UNSAFE_PROGRAM,
                    f'invalid program: node {node.name[:80]!r} ({node.op}) writes into '
                    f'{sorted(written & shared)[0][:80]!r}, an input or weight (or a view of one)')
            if set(refs_in(ops.aliases(node.fn, node.args, node.kwargs))) & shared:
                shared.add(node.name)

    @classmethod
    def parse(cls, blob: bytes | memoryview) -> 'Program':
        doc = _decode_json(bytes(blob), 'program JSON')
        try:
            return cls(doc)
        except RecursionError:
            raise _bad('arguments nest too deeply') from None

    @property
    def signature(self) -> tuple[TensorSpec, ...]:
        """Return the input signature the program was traced with."""
        return tuple(spec for _, spec in self.inputs)

    @property
    def input_names(self) -> list[str]:
        return [name for name, _ in self.inputs]

    @property
    def output_names(self) -> list[str]:
        return [o['n'] if isinstance(o, dict) and 'n' in o else None for o in self.outputs]

    def module(self, weights: dict[str, torch.Tensor], device: torch.device,
               start: int = 0, stop: int | None = None,
               inputs: Sequence[str] | None = None,
               outputs: Sequence[Any] | None = None) -> fx.GraphModule:
        """
        Build an fx module running nodes ``[start, stop)``.

        The module takes the named ``inputs`` positionally (default: the program's
        inputs) and returns a tuple of ``outputs`` (default: the program's outputs).
        Parameters are looked up in ``weights`` and must already be on ``device``.
        """
        stop = len(self.nodes) if stop is None else stop
        inputs = self.input_names if inputs is None else list(inputs)
        outputs = self.outputs if outputs is None else [{'n': n} for n in outputs]
        root = torch.nn.Module()
        graph = fx.Graph()
        env: dict[str, fx.Node] = {name: graph.placeholder(_ident(name)) for name in inputs}

        def lookup(name: str) -> fx.Node:
            if name in env:
                return env[name]
            if name in self.params:
                key = self.params[name]
                if key not in weights:
                    raise _bad(f'weights blob lacks {key!r}')
                attr = f'w{len(root._buffers)}'
                root.register_buffer(attr, weights[key])
                env[name] = graph.get_attr(attr)
                return env[name]
            raise _bad(f'value {name!r} is not available in nodes [{start}, {stop})')

        for node in self.nodes[start:stop]:
            args = decode_arg(node.args, lookup, device)
            kwargs = {k: decode_arg(v, lookup, device) for k, v in node.kwargs.items()}
            if (ops.creates_tensors(node.fn) and kwargs.get('device') is None
                    and not _device_positional(node.fn, args)):
                kwargs['device'] = device
            env[node.name] = graph.create_node('call_function', node.fn, tuple(args), kwargs,
                                               name=_ident(node.name))
        graph.output(tuple(decode_arg(o, lookup, device) for o in outputs))
        return fx.GraphModule(root, graph, class_name=_ident(self.label))

    def live_ranges(self, bounds: Sequence[int]) -> list[tuple[list[str], list[str]]]:
        """For segments split at ``bounds``, return each one's (live-in, live-out) names."""
        edges = [0] + list(bounds) + [len(self.nodes)]
        last_use: dict[str, int] = {}         # one pass: linear in the program's size
        for index, node in enumerate(self.nodes):
            for name in node.refs:
                last_use[name] = index
        for name in refs_in(self.outputs):
            last_use[name] = len(self.nodes)
        result = []
        for a, b in zip(edges, edges[1:]):
            inside = {n.name for n in self.nodes[a:b]}
            used_in = set().union(*(n.refs for n in self.nodes[a:b])) if b > a else set()
            live_in = sorted(used_in - inside - set(self.params))
            live_out = [n.name for n in self.nodes[a:b] if last_use.get(n.name, -1) >= b]
            result.append((live_in, live_out))
        return result


def _device_positional(fn: Callable, args: list) -> bool:
    """Return True if ``args`` give ``fn``'s device argument (``aten.to.device``)."""
    names = [a.name for a in fn._schema.arguments]
    return names.index('device') < len(args)


def _ident(name: str) -> str:
    cleaned = ''.join(c if c.isalnum() else '_' for c in name)
    return cleaned if cleaned and not cleaned[0].isdigit() else f'_{cleaned}'


# ----------------------------------------------------------------------------- writer (robot)

def _out_meta(node: fx.Node) -> dict | None:
    val = node.meta.get('val')
    if isinstance(val, torch.Tensor):
        return {'dtype': dtype_name(val.dtype), 'shape': [int(s) for s in val.shape]}
    return None


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
    nodes, outputs = [], []
    for node in graph.nodes:
        if node.op == 'call_function':
            _refuse_state_mutation(node, placeholders)
            op = ops.name_of(node.target)
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
    return json.dumps(doc, sort_keys=True, separators=(',', ':')).encode(), weights_blob
