"""
The weights blob: named tensors as raw little-endian bytes behind a JSON index.

A program (:mod:`rrto_wire.program`) names its weights by the SHA-256 of this
blob (version 1), or of one blob per layer (version 2, :func:`shard_weights`),
so unchanged weights are uploaded and stored once.  Layout: ``RRTOWTS1``, the
index's length (u64 little-endian), the index JSON ``{"tensors": [{"key",
"dtype", "shape", "offset", "nbytes"}]}``, padding to 64 bytes, then each
tensor's bytes at its 64-byte-aligned offset.  :func:`unpack_weights` checks
every entry against the blob before it makes a view, so a hostile index can
neither read past the blob nor make the server allocate.
"""

from __future__ import annotations

import json
import struct
from typing import Annotated, Callable, Sequence

import msgspec
import torch

from rrto_wire.dtypes import dtype_name
from rrto_wire.errors import decode_program_json, invalid_program
from rrto_wire.tensors import TensorSpec, tensor_from_buffer

WEIGHTS_MAGIC = b'RRTOWTS1'
_ALIGN = 64
MAX_TENSORS = 1 << 16     # weights of one program, all shards together

_NonNegative = Annotated[int, msgspec.Meta(ge=0)]


class _WeightEntry(TensorSpec, frozen=True):
    """One tensor of a weights blob's index: its spec, name and place in the blob."""

    key: str
    offset: _NonNegative
    size: _NonNegative = msgspec.field(name='nbytes')    # TensorSpec.nbytes is its spec's


class _WeightsIndex(msgspec.Struct, frozen=True):
    tensors: list[_WeightEntry]


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
        raise invalid_program('weights blob has no RRTOWTS1 magic')
    (hlen,) = struct.unpack('<Q', view[8:16])
    if hlen > len(view) - 16:
        raise invalid_program('weights header runs past the blob')
    index = decode_program_json(bytes(view[16:16 + hlen]), 'weights header', _WeightsIndex).tensors
    base = 16 + hlen + ((-(16 + hlen)) % _ALIGN)
    tensors = {}
    for entry in index:
        start = base + entry.offset
        if entry.size != entry.nbytes or start + entry.size > len(view):
            raise invalid_program(f'weight {entry.key[:80]!r} does not fit the blob')
        tensors[entry.key] = tensor_from_buffer(view[start:start + entry.size], entry)
    return tensors


def shard_weights(tensors: dict[str, torch.Tensor]) -> list[tuple[str, bytes]]:
    """Return ``(prefix, blob)`` per module: tensors grouped by their key's module path."""
    modules: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        prefix, _, local = key.rpartition('.')
        modules.setdefault(prefix + '.' if prefix else '', {})[local] = tensor
    return [(prefix, pack_weights(modules[prefix])) for prefix in sorted(modules)]


def unpack_shards(blobs: Sequence[tuple[bytes | bytearray | memoryview, str]]
                  ) -> dict[str, torch.Tensor]:
    """
    Parse ``(blob, prefix)`` shards into one dict of tensors named ``prefix + key``.

    A blob object listed under several prefixes (identical layers pack into one
    blob) is parsed once: its tensors are shared, never copied per prefix.  At
    most :data:`MAX_TENSORS` names in all.
    """
    tensors: dict[str, torch.Tensor] = {}
    parsed: dict[int, dict[str, torch.Tensor]] = {}
    for blob, prefix in blobs:
        if id(blob) not in parsed:
            parsed[id(blob)] = unpack_weights(blob)
        for key, tensor in parsed[id(blob)].items():
            if prefix + key in tensors:
                raise invalid_program(f'weight {prefix + key!r} is in two shards')
            if len(tensors) >= MAX_TENSORS:
                raise invalid_program(f'more than {MAX_TENSORS} weights in all shards')
            tensors[prefix + key] = tensor
    return tensors


def load_shards(shards: Sequence[tuple[str, str]], read: Callable[[str], bytearray]
                ) -> dict[str, torch.Tensor]:
    """Read each distinct ``digest`` of ``(digest, prefix)`` shards once and unpack them."""
    blobs = {digest: read(digest) for digest in dict.fromkeys(d for d, _ in shards)}
    return unpack_shards([(blobs[digest], prefix) for digest, prefix in shards])


def shared_to(tensors: dict[str, torch.Tensor], device) -> dict[str, torch.Tensor]:
    """Return ``tensors`` on ``device``, one copy of a tensor shared under several names."""
    moved: dict[int, torch.Tensor] = {}
    for tensor in tensors.values():
        if id(tensor) not in moved:
            moved[id(tensor)] = tensor.to(device)
    return {name: moved[id(tensor)] for name, tensor in tensors.items()}


def distinct_nbytes(tensors) -> int:
    """Return the bytes of the distinct tensors among ``tensors`` (shared ones once)."""
    return sum({id(t): t.numel() * t.element_size() for t in tensors}.values())
