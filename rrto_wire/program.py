"""
The uploaded model format: an ATen operator graph as JSON plus a raw weights blob.

Why not upload a torch.export archive: ``torch.export.load`` unpickles parts of
the archive, and symbolic shapes in its JSON go through ``sympy`` parsing.
A server must never do either with bytes from the network.  This format is
loaded by parsing JSON and resolving operator names through
:mod:`rrto_wire.ops`; weights are raw little-endian tensor bytes behind a JSON
index (:mod:`rrto_wire.weights`); the robot writes programs with
:mod:`rrto_wire.program_writer`.  Both blobs are content-addressed: the program
names its weights blob by SHA-256, so a model re-exported for a new input
signature re-uploads only the small graph.

Program JSON::

    {"format": "rrto-program", "version": 1, "label": str, "weights": sha256 | null,
     (version 2: "weights": [{"blob": sha256, "prefix": str}, ...], see below)
     "inputs": [{"name", "dtype", "shape"}], "in_spec": treespec, "out_spec": treespec,
     "params": {placeholder_name: weights_key},
     "nodes": [{"name", "op", "args", "kwargs", "out": {"dtype", "shape"} | null, "scope"}],
     "outputs": [arg, ...], "dynamic": bool (optional, see rrto_wire.ops_dynamic)}

In a dynamic program a node's ``out`` may list in ``"dims"`` the dimensions
whose size depends on the data (written as 0 in ``shape``).

Arguments are JSON values; ``{"n": name}`` refers to an input, a parameter or an
earlier node; ``{"dtype"|"device"|"memory_format"|"layout"|"f": ...}`` tag
torch enums and non-finite floats.  A ``{"device": ...}`` tag always means the
server's own device, and a ``Device`` argument takes only that tag (or null):
a program cannot name ``cpu``, ``meta`` or another GPU (a15 #8).  The label is
a string of at most :data:`MAX_LABEL_CHARS` characters (a15 #7: it is listed
in every stats reply).

Version 2 shards the weights per layer (:func:`rrto_wire.weights.shard_weights`): one blob per
module, holding its tensors under their local names (``weight``, ``bias``,
``running_mean``...), named in the program with the module's path as
``prefix``.  A layer that several programs share (the unchanged layers of
model variants) is then one blob in the content-addressed store, whatever
path it has in each.  Version 1 programs (one blob) are read as before; a
server that knows only version 1 refuses version 2 by its version number.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Sequence

import torch
import torch.fx as fx

from rrto_wire import ops, ops_dynamic, program_chain, program_shapes, treespec
from rrto_wire.dtypes import torch_dtype
from rrto_wire.errors import decode_program_json, ErrorCode, invalid_program, ProtocolError
from rrto_wire.tensors import TensorSpec

PROGRAM_FORMAT = 'rrto-program'
PROGRAM_VERSION = 1
SHARDED_VERSION = 2             # "weights" is a list of per-layer shards
MAX_SHARDS = 4096
MAX_NODES = 65536               # operators per program (large detectors have a few thousand)
MAX_LABEL_CHARS = 256           # a model's label: every stats reply listing it shows it (a15 #7)
_ENUM_TAGS = {'dtype': torch.dtype, 'memory_format': torch.memory_format, 'layout': torch.layout}
# the enum values a program may name besides wire dtypes: dense (strided) layouts only (a
# sparse layout reaches constructors that trust their indices)
_ENUM_NAMES = {'layout': frozenset({'strided'}),
               'memory_format': frozenset({'contiguous_format', 'channels_last',
                                           'preserve_format'})}


def sha256(data: bytes | memoryview) -> str:
    """Return the hex SHA-256 of a blob: the key of the content-addressed store."""
    return hashlib.sha256(data).hexdigest()


def _shards(value: Any) -> list[tuple[str, str]]:
    """Validate a version-2 ``weights`` field; return ``(digest, prefix)`` pairs."""
    if not isinstance(value, list) or len(value) > MAX_SHARDS:
        raise invalid_program(f'weights must be a list of at most {MAX_SHARDS} shards')
    shards = []
    for item in value:
        if not isinstance(item, dict) or set(item) != {'blob', 'prefix'}:
            raise invalid_program('a weights shard is {"blob": sha256, "prefix": str}')
        blob, prefix = item['blob'], item['prefix']
        if not (isinstance(blob, str) and len(blob) == 64
                and all(c in '0123456789abcdef' for c in blob)):
            raise invalid_program(f'shard blob {blob!r} is not a sha256 digest')
        if not isinstance(prefix, str) or len(prefix) > 1024:
            raise invalid_program('shard prefix must be a string of at most 1024 characters')
        shards.append((blob, prefix))
    return shards


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
                raise invalid_program('a reference {"n": name} names a value by a string')
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
        raise invalid_program(f'argument object {obj!r} must have exactly one tag')
    (tag, value), = obj.items()
    if tag == 'n':
        return lookup(value)
    if tag == 'f':
        if value not in ('inf', '-inf', 'nan'):
            raise invalid_program(f'bad float literal {value!r}')
        return float(value)
    if tag == 'device':
        return device
    if tag == 'dtype':
        try:
            return torch_dtype(value)
        except ProtocolError:
            raise invalid_program(f'unknown dtype {str(value)[:40]!r}') from None
    if tag in _ENUM_NAMES:
        if value not in _ENUM_NAMES[tag]:
            raise invalid_program(f'unknown {tag} {str(value)[:40]!r} '
                                  f'(allowed: {sorted(_ENUM_NAMES[tag])})')
        return getattr(torch, value)
    raise invalid_program(f'unknown argument tag {tag!r}')


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
            raise invalid_program(f"not an {PROGRAM_FORMAT} document")
        version = doc.get('version')
        if version not in (PROGRAM_VERSION, SHARDED_VERSION):
            raise invalid_program(f'program version {version!r} not supported')
        try:
            self.label = _label(doc.get('label', 'model'))
            self.dynamic = doc.get('dynamic', False)     # sizes depend on the data
            if self.dynamic not in (True, False):
                raise invalid_program('"dynamic" must be true or false')
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
                raise invalid_program(f'{len(doc["nodes"])} nodes; at most {MAX_NODES}')
            self.nodes = [self._parse_node(n, self.dynamic) for n in doc['nodes']]
            self.outputs = list(doc['outputs'])
        except ProtocolError:
            raise
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise invalid_program(f'{type(exc).__name__}: {exc}') from None
        self._check_references()
        self._check_writes()
        self._shapes_fit: set = set()      # weights' shapes the meta pass accepted
        if self.dynamic:
            ops_dynamic.check_sizes(self.nodes, refs_in)
            program_chain.check_skippable(self.nodes, filter(None, self.output_names))

    @staticmethod
    def _parse_node(node: dict, dynamic: bool) -> ProgramNode:
        out = node.get('out')
        fn = (ops_dynamic if dynamic else ops).resolve(node['op'])
        if out is not None:
            _check_dims(str(node['name']), out)
        return ProgramNode(
            name=str(node['name']), op=node['op'], fn=fn,
            args=node.get('args', []),
            kwargs=ops.check_call(fn, node.get('args', []), node.get('kwargs', {}), dynamic),
            out=TensorSpec.from_json(out) if out is not None else None,
            scope=str(node.get('scope', '')))

    def _check_references(self) -> None:
        defined = {name for name, _ in self.inputs} | set(self.params)
        if len(defined) != len(self.inputs) + len(self.params):
            raise invalid_program('input and parameter names overlap')
        for node in self.nodes:
            missing = node.refs - defined
            if missing:
                raise invalid_program(
                    f'node {node.name!r} uses undefined values {sorted(missing)}')
            if node.name in defined:
                raise invalid_program(f'value {node.name!r} defined twice')
            defined.add(node.name)
        missing = set(refs_in(self.outputs)) - defined
        if missing:
            raise invalid_program(f'outputs use undefined values {sorted(missing)}')
        try:
            leaves = treespec.count_leaves(self.out_spec)
        except (AttributeError, TypeError, ValueError):
            raise invalid_program('out_spec is not a tree spec') from None
        if leaves != len(self.outputs):
            raise invalid_program('out_spec does not match the number of outputs')

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
        doc = decode_program_json(bytes(blob), 'program JSON')
        try:
            return cls(doc)
        except RecursionError:
            raise invalid_program('arguments nest too deeply') from None

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

    def output_specs(self) -> list[TensorSpec]:
        """Return each output's declared spec (a data-dependent size as 0; an input: its own)."""
        specs = {n.name: n.out for n in self.nodes}
        specs.update(dict(self.inputs))
        found = [specs.get(name) for name in self.output_names]
        if None in found:
            name = self.output_names[found.index(None)]
            raise invalid_program(f'output {name!r} is not a tensor')
        return found

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
        shapes = tuple((k, tuple(w.shape), w.dtype) for k, w in weights.items())
        if not self.dynamic and shapes not in self._shapes_fit:   # a15 #1's class
            program_shapes.check(self, weights, decode_arg)
            self._shapes_fit.add(shapes)
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
                    raise invalid_program(f'weights blob lacks {key!r}')
                attr = f'w{len(root._buffers)}'
                root.register_buffer(attr, weights[key])
                env[name] = graph.get_attr(attr)
                return env[name]
            raise invalid_program(f'value {name!r} is not available in nodes [{start}, {stop})')

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


def _label(value: Any) -> str:
    """Return a program's label: a string of at most :data:`MAX_LABEL_CHARS` characters."""
    if not isinstance(value, str) or len(value) > MAX_LABEL_CHARS:
        raise invalid_program(f'"label" must be a string of at most {MAX_LABEL_CHARS} characters '
                              f'(it is listed in stats replies), got '
                              f'{len(value) if isinstance(value, str) else type(value).__name__}')
    return value


def _device_positional(fn: Callable, args: list) -> bool:
    """Return True if ``args`` give ``fn``'s device argument (``aten.to.device``)."""
    names = [a.name for a in fn._schema.arguments]
    return names.index('device') < len(args)


def _check_dims(name: str, out: dict) -> None:
    """Refuse ``out`` unless each data-dependent dimension it lists is written as 0 (a14 #2)."""
    dims, shape = out.get('dims', []), out.get('shape')
    if not isinstance(dims, list) or not isinstance(shape, list) or any(
            type(d) is not int or not 0 <= d < len(shape) or shape[d] != 0 for d in dims):
        raise invalid_program(f'node {name[:80]!r}: each of its "dims" (data-dependent '
                              'dimensions) must index its "shape" and be written there as 0')


def _ident(name: str) -> str:
    cleaned = ''.join(c if c.isalnum() else '_' for c in name)
    return cleaned if cleaned and not cleaned[0].isdigit() else f'_{cleaned}'
