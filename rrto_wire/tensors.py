"""
Tensor specs and the bytes of one tensor frame.

A :class:`TensorSpec` (dtype and shape) is both the wire form of a tensor's
description and the unit of an input :data:`Signature`.  Shapes are bounded
by the schema (rank, each dimension), so a declared size can be computed and
checked before anything is allocated.
"""

from __future__ import annotations

import ctypes
import functools
import math
from typing import Annotated, Any, Iterable, Sequence

import msgspec
import numpy
import torch

from rrto_wire import dtypes
from rrto_wire.dtypes import DTypeName
from rrto_wire.errors import ErrorCode, ProtocolError, clip
from rrto_wire.limits import MAX_DIM, MAX_RANK

Dim = Annotated[int, msgspec.Meta(ge=0, le=MAX_DIM)]
Shape = Annotated[tuple[Dim, ...], msgspec.Meta(max_length=MAX_RANK)]


class TensorSpec(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Shape and dtype of one tensor; a tuple of these is an input signature."""

    dtype: DTypeName
    shape: Shape

    @classmethod
    def of(cls, tensor: torch.Tensor) -> 'TensorSpec':
        """Return the spec of a tensor (ProtocolError if its dtype has no wire name)."""
        return cls(dtypes.dtype_name(tensor.dtype), tuple(int(s) for s in tensor.shape))

    @property
    def nbytes(self) -> int:
        """Return the size of the tensor's raw bytes."""
        return math.prod(self.shape) * dtypes.itemsize(self.dtype)

    @classmethod
    def from_json(cls, obj: Any) -> 'TensorSpec':
        """Build a spec from JSON data with ``dtype`` and ``shape`` (other keys ignored)."""
        if not isinstance(obj, dict):
            raise ProtocolError(ErrorCode.BAD_REQUEST, 'tensor spec must be an object')
        try:
            return msgspec.convert({'dtype': obj.get('dtype'), 'shape': obj.get('shape')}, cls)
        except msgspec.ValidationError as exc:
            raise ProtocolError(ErrorCode.BAD_REQUEST,
                                f'bad tensor spec: {clip(exc)}') from None

    def to_json(self) -> dict:
        """Return the spec as plain JSON data."""
        return {'dtype': self.dtype, 'shape': list(self.shape)}

    def __str__(self) -> str:
        """Return e.g. ``uint8[1,224,224,3]``."""
        return f"{self.dtype}[{','.join(map(str, self.shape))}]"


Signature = tuple[TensorSpec, ...]


def signature_of(tensors: Iterable[torch.Tensor]) -> Signature:
    """Return the input signature (dtypes and shapes) of a flat tensor list."""
    return tuple(TensorSpec.of(t) for t in tensors)


def signature_key(signature: Sequence[TensorSpec]) -> str:
    """Return a short canonical string for a signature, e.g. ``uint8[1,224,224,3]``."""
    return _signature_key(tuple(signature))


@functools.lru_cache(maxsize=1024)      # every offloaded call's record names its signature
def _signature_key(signature: Signature) -> str:
    return ';'.join(str(spec) for spec in signature)


def tensor_frame(tensor: torch.Tensor) -> memoryview:
    """
    Return a zero-copy buffer over a CPU tensor's bytes (copies only if not contiguous).

    A contiguous CPU tensor's memory is viewed as it is (the view holds the
    tensor, so the memory lives as long as the frame), not through
    ``tensor.numpy()``: run after a wait of milliseconds (a robot's between
    frames, or for a reply), that conversion was the costliest step of
    encoding a request (issue 11).
    """
    if (tensor.layout is torch.strided and tensor.is_cpu and tensor.is_contiguous()
            and not tensor.is_conj() and not tensor.is_neg()):
        size = tensor.nbytes
        if size == 0:
            return memoryview(b'')
        view = _bytes_type(size).from_address(tensor.data_ptr())
        view.tensor = tensor        # ctypes keeps no reference to the memory's owner
        return memoryview(view).cast('B')
    if tensor.requires_grad:
        tensor = tensor.detach()
    if not tensor.is_cpu:
        tensor = tensor.cpu()
    tensor = tensor.contiguous()
    if tensor.numel() == 0:
        return memoryview(b'')
    if tensor.dtype == torch.bfloat16:
        tensor = tensor.view(torch.int16)
    return memoryview(tensor.numpy()).cast('B')     # C-contiguous: any rank casts to bytes


@functools.lru_cache(maxsize=64)        # a frame's size: a few per model
def _bytes_type(size: int) -> type:
    return ctypes.c_char * size


# the numpy dtype each wire dtype's bytes are viewed as (bfloat16 as int16)
NUMPY_VIEW = {name: torch.empty(0, dtype=entry.view).numpy().dtype
              for name, entry in dtypes.DTYPES.items()}


def tensor_from_buffer(buf: memoryview, spec: TensorSpec) -> torch.Tensor:
    """View a buffer of exactly ``spec.nbytes`` bytes as a tensor without copying."""
    entry = dtypes.DTYPES[spec.dtype]
    if len(buf) == 0:                       # exactly spec.nbytes long: no elements
        return torch.empty(spec.shape, dtype=entry.torch)
    # through numpy: half the cost of torch.frombuffer and a torch reshape (every request
    # and every reply decodes its tensors here)
    tensor = torch.from_numpy(numpy.frombuffer(buf, NUMPY_VIEW[spec.dtype]).reshape(spec.shape))
    if entry.view != entry.torch:
        tensor = tensor.view(entry.torch)
    return tensor
