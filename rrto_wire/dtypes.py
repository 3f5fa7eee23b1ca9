"""The one table of tensor element types the wire carries, and their other names."""

from __future__ import annotations

from typing import Literal, NamedTuple

import torch

from rrto_wire.errors import ErrorCode, ProtocolError


class DType(NamedTuple):
    """One wire dtype: its torch dtype, the dtype its bytes are viewed as, its ONNX name."""

    torch: torch.dtype
    view: torch.dtype           # bfloat16 travels as int16 (numpy has no bfloat16)
    itemsize: int
    onnx: str | None


DTYPES: dict[str, DType] = {
    'float32': DType(torch.float32, torch.float32, 4, 'tensor(float)'),
    'float16': DType(torch.float16, torch.float16, 2, 'tensor(float16)'),
    'bfloat16': DType(torch.bfloat16, torch.int16, 2, None),
    'float64': DType(torch.float64, torch.float64, 8, 'tensor(double)'),
    'uint8': DType(torch.uint8, torch.uint8, 1, 'tensor(uint8)'),
    'int8': DType(torch.int8, torch.int8, 1, 'tensor(int8)'),
    'int16': DType(torch.int16, torch.int16, 2, 'tensor(int16)'),
    'int32': DType(torch.int32, torch.int32, 4, 'tensor(int32)'),
    'int64': DType(torch.int64, torch.int64, 8, 'tensor(int64)'),
    'bool': DType(torch.bool, torch.bool, 1, 'tensor(bool)'),
}
DTypeName = Literal['float32', 'float16', 'bfloat16', 'float64', 'uint8', 'int8', 'int16',
                    'int32', 'int64', 'bool']
_NAME_OF = {entry.torch: name for name, entry in DTYPES.items()}
_NAME_OF_ONNX = {entry.onnx: name for name, entry in DTYPES.items() if entry.onnx}


def dtype_name(dtype: torch.dtype) -> str:
    """Return the wire name of a torch dtype, or raise ProtocolError if unsupported."""
    try:
        return _NAME_OF[dtype]
    except KeyError:
        raise ProtocolError(ErrorCode.BAD_REQUEST, f'unsupported dtype {dtype}') from None


def torch_dtype(name: str) -> torch.dtype:
    """Return the torch dtype for a wire name, or raise ProtocolError."""
    try:
        return DTYPES[name].torch
    except (KeyError, TypeError):
        raise ProtocolError(ErrorCode.BAD_REQUEST, f'unsupported dtype {name!r}') from None


def itemsize(name: str) -> int:
    """Return the bytes per element of a wire dtype name."""
    return DTYPES[name].itemsize


def from_onnx(type_name: str) -> str | None:
    """Return the wire name of an ONNX tensor type such as ``tensor(float)`` (None: none)."""
    return _NAME_OF_ONNX.get(type_name)
