"""
Check an inference reply against what the robot's own export says it holds.

A reply comes from the network: a server bug, a compromised fleet replica or a
man in the middle on an unkeyed link can send any tensors.  The robot knows
each output's dtype and shape from its own export: a program names every
output's spec, an ONNX model declares its outputs (symbolic dimensions are
bound from the call's inputs, so a batch dimension must be the request's).
:func:`expected` computes that once per model and signature;
:func:`decode_bound` refuses a reply whose frame descriptors differ before any
frame is decoded and returns the bytes the expected tensors need, which bounds
decompression; :func:`check_outputs` checks decoded tensors (a split, hybrid
or naive call's final outputs).  Either raises :class:`ProtocolError`
``bad_reply``: the call falls back to the local model, never OFFLOADED.

A dynamic program's output may have sizes that depend on the data
(:class:`Free`): the program writer names each such size by its symbolic
expression from export (``u0``, ``4*u0``) and the upper bound export proved
for it (``u0 <= 16``, the numel of a ``nonzero``'s input).  Every size of one
expression must be equal in a reply (boxes ``[n, 4]`` and scores ``[n]``), at
most its bound, and the decoding bound is the expected tensors at those
bounds; only a size export left unbounded falls back to the caller's general
bound.
"""

from __future__ import annotations

import functools
import math
from typing import Any, NamedTuple, Sequence

import torch
from cachetools import LRUCache

from rrto_wire import dtypes, treespec
from rrto_wire import protocol as wire
from rrto_wire.errors import ErrorCode, ProtocolError
from rrto_wire.messages import Frame


class Free(NamedTuple):
    """A size that depends on the data: equal ``symbol``, equal size; at most ``most``."""

    symbol: str | None      # None: a size no other size is known to equal
    most: int | None        # None: no bound known before the call


# one output: (dtype or None, shape with None for a dimension not known, or None: any rank)
Leaf = tuple[str | None, tuple[int | Free | None, ...] | None]

_CACHE: LRUCache = LRUCache(maxsize=256)


def expected(artifact: Any) -> tuple[Leaf, ...]:
    """Return the outputs a reply for ``artifact`` (one model, one signature) must hold."""
    key = (artifact.model, tuple(artifact.signature))     # TensorSpecs hash: no string built
    leaves = _CACHE.get(key)
    if leaves is None:
        count = treespec.count_leaves(artifact.out_spec)
        if artifact.program is not None:
            leaves = program_outputs(artifact.program)
        else:
            leaves = _onnx_outputs(artifact, count)
        _CACHE[key] = leaves
    return leaves


def expected_program(digest: str | None, doc: dict | None) -> tuple[Leaf, ...] | None:
    """Return the outputs of the program ``doc`` (a plan's server part); None: no program."""
    if doc is None:
        return None
    leaves = _CACHE.get(digest)
    if leaves is None:
        leaves = _CACHE[digest] = program_outputs(doc)
    return leaves


def program_outputs(doc: dict) -> tuple[Leaf, ...]:
    """Return the outputs of a program document (a parameter's spec is not in it: unknown)."""
    specs = {i['name']: (i['dtype'], tuple(i['shape'])) for i in doc['inputs']}
    for node in doc['nodes']:
        out = node.get('out')
        if out is not None:   # "dims": sizes that depend on the data (rrto_wire.ops_dynamic)
            shape: list[int | Free | None] = list(out['shape'])
            dims = out.get('dims', ())
            for i, sym, most in zip(dims, out.get('sym', [None] * len(dims)),
                                    out.get('max', [None] * len(dims))):
                shape[i] = Free(sym, most)
            specs[node['name']] = (out['dtype'], tuple(shape))
    unknown = (None, None)
    return tuple(specs.get(o['n'], unknown) if isinstance(o, dict) and 'n' in o else unknown
                 for o in doc['outputs'])


def _onnx_outputs(artifact: Any, count: int) -> tuple[Leaf, ...]:
    """Return an ONNX model's declared outputs (only their count if it does not parse)."""
    import onnx
    from onnx.helper import tensor_dtype_to_np_dtype
    data = next(blob for kind, blob in artifact.blobs.values() if kind == 'onnx')
    try:
        graph = onnx.load_from_string(data).graph
    except Exception:   # protobuf raises its own error types; the robot ran it with onnxruntime
        return ((None, None),) * count
    fixed = {i.name for i in graph.initializer}
    bound: dict[str, int] = {}      # symbolic dimension -> its size in this call's inputs
    inputs = [i for i in graph.input if i.name not in fixed]
    for value, spec in zip(inputs, artifact.signature):
        for dim, size in zip(value.type.tensor_type.shape.dim, spec.shape):
            if dim.dim_param:
                bound.setdefault(dim.dim_param, size)
    leaves = []
    for value in graph.output:
        tensor = value.type.tensor_type
        dtype = tensor_dtype_to_np_dtype(tensor.elem_type).name if tensor.elem_type else None
        shape = None
        if tensor.HasField('shape'):
            shape = tuple(d.dim_value if d.HasField('dim_value')
                          else bound.get(d.dim_param) for d in tensor.shape.dim)
        leaves.append((dtype, shape))
    return tuple(leaves) if len(leaves) == count else ((None, None),) * count


def decode_bound(descriptors: Sequence[Any], leaves: Sequence[Leaf] | None,
                 default: int) -> int:
    """
    Raise ``bad_reply`` unless the descriptors match; return the decoding bound in bytes.

    ``default`` when nothing is expected (``leaves`` None) or an output's size
    has no bound before the call (an ONNX output whose dimension depends on
    values, a program's size export left unbounded); a program's
    data-dependent size counts at the bound export proved for it.
    """
    if leaves is None:
        return default
    leaves = tuple(leaves)
    exact, bound = _compiled(leaves)
    got = tuple([(d.dtype, d.shape) for d in descriptors])
    if got != exact:
        _check(got, leaves)
    return default if bound is None else bound


def decode_outputs(descriptors: Sequence[Any], frames: Sequence[Any],
                   leaves: Sequence[Leaf] | None, default: int) -> list[torch.Tensor]:
    """
    Return a reply's tensors: :func:`decode_bound`, then decode within that bound.

    Raises ``bad_reply`` or the decoding's error like those two.  A reply whose
    frames are exactly the raw outputs the export promises (every dtype and size
    known) is compared once with the descriptors made for ``leaves``, and each
    frame's length with its size, before its bytes are viewed.
    """
    if leaves is not None:
        raw = _raw(leaves if type(leaves) is tuple else tuple(leaves))
        if raw is not None and descriptors == raw[0] and len(frames) == len(raw[1]):
            tensors = wire.view_raw(descriptors, frames, raw[1])
            if tensors is not None:
                return tensors
    return wire.decode_tensors(descriptors, frames, decode_bound(descriptors, leaves, default))


@functools.lru_cache(maxsize=256)
def _raw(leaves: tuple[Leaf, ...]) -> tuple[list[Frame], tuple[int, ...]] | None:
    """Return the raw frame descriptors and sizes ``leaves`` allow exactly (None: not known)."""
    exact = _compiled(leaves)[0]
    if exact is None:
        return None
    frames = [Frame(dtype, tuple(shape)) for dtype, shape in exact]
    return frames, tuple(f.nbytes for f in frames)


def most_bytes(leaves: Sequence[Leaf]) -> int | None:
    """Return the bytes the expected outputs decode to at most; None: no bound before the call."""
    return _compiled(tuple(leaves))[1]


def check_outputs(outputs: Sequence[Any], leaves: Sequence[Leaf]) -> None:
    """Raise ``bad_reply`` unless the decoded ``outputs`` match the expected leaves."""
    leaves = leaves if type(leaves) is tuple else tuple(leaves)
    exact = _torch_exact(leaves)    # one comparison when every dtype and size is known
    if exact is not None and tuple([(t.dtype, t.shape) if isinstance(t, torch.Tensor) else None
                                    for t in outputs]) == exact:
        return
    if not all(isinstance(t, torch.Tensor) for t in outputs):
        raise _bad('an output is not a tensor')
    got = tuple([(dtypes.dtype_name(t.dtype), t.shape) for t in outputs])
    if got != _compiled(leaves)[0]:
        _check(got, leaves)


@functools.lru_cache(maxsize=256)
def _torch_exact(leaves: tuple[Leaf, ...]) -> tuple | None:
    """Return the exact outputs ``leaves`` allow as (torch dtype, shape); None: not known."""
    exact = _compiled(leaves)[0]
    if exact is None or not all(dtype in dtypes.DTYPES for dtype, _ in exact):
        return None
    return tuple((dtypes.DTYPES[dtype].torch, tuple(shape)) for dtype, shape in exact)


@functools.lru_cache(maxsize=256)       # every reply is checked against the same few leaves
def _compiled(leaves: tuple[Leaf, ...]) -> tuple[tuple | None, int | None]:
    """
    Return the outputs ``leaves`` allow, exactly, and their decoding bound in bytes.

    The first is None unless every dtype and size is known (then a reply
    matching it passes :func:`_check` without walking it); the second is
    None unless every size is known or bounded.
    """
    exact = tuple(leaves) if all(
        dtype is not None and shape is not None and all(type(d) is int for d in shape)
        for dtype, shape in leaves) else None
    if not all(_bounded(leaf) for leaf in leaves):
        return exact, None
    return exact, sum(math.prod(d.most if isinstance(d, Free) else d for d in shape)
                      * dtypes.itemsize(dtype) for dtype, shape in leaves)


def _bounded(leaf: Leaf) -> bool:
    dtype, shape = leaf
    return dtype is not None and shape is not None and all(
        d.most is not None if isinstance(d, Free) else d is not None for d in shape)


def _check(got: list[tuple[str, tuple[int, ...]]], leaves: Sequence[Leaf]) -> None:
    if len(got) != len(leaves):
        raise _bad(f'reply holds {len(got)} outputs, the model has {len(leaves)}')
    sizes: dict[str, tuple[int, int]] = {}      # symbol -> (its size, the output giving it)
    for index, ((dtype, shape), (want_dtype, want_shape)) in enumerate(zip(got, leaves)):
        if want_dtype is not None and dtype != want_dtype:
            raise _bad(f'output {index} is {dtype}, the model gives {want_dtype}')
        if want_shape is None:
            continue
        if len(shape) != len(want_shape) or any(
                not isinstance(w, Free) and w is not None and s != w
                for s, w in zip(shape, want_shape)):
            raise _bad(f'output {index} has shape {list(shape)}, the model gives '
                       f'{[_show(w) for w in want_shape]}')
        for size, want in zip(shape, want_shape):
            if isinstance(want, Free):
                _check_free(index, size, want, sizes)


def _check_free(index: int, size: int, want: Free, sizes: dict[str, tuple[int, int]]) -> None:
    """Raise ``bad_reply`` if a data-dependent size is over its bound or unlike its equals."""
    if want.most is not None and size > want.most:
        raise _bad(f'output {index} has a size {size} ({want.symbol}), '
                   f'the model gives at most {want.most}')
    if want.symbol is None:
        return
    first = sizes.setdefault(want.symbol, (size, index))
    if first[0] != size:
        raise _bad(f'output {index} has a size {size} ({want.symbol}) '
                   f'where output {first[1]} has {first[0]}: one size in the model')


def _show(want: int | Free | None) -> int | str:
    if isinstance(want, Free):
        return want.symbol or '?'
    return want if want is not None else '?'


def _bad(message: str) -> ProtocolError:
    return ProtocolError(ErrorCode.BAD_REPLY, message)
