"""
Per-tensor frame codecs: raw bytes, or lossless lz4 / zstd compression.

A codec only changes how one tensor's bytes travel; the descriptor in the
header still names the tensor's true dtype and shape, so the receiver knows
exactly how many bytes decoding must produce and rejects anything else.
"""

from __future__ import annotations

import math

import torch

RAW = 'raw'
LZ4 = 'lz4'
ZSTD = 'zstd'
LOSSLESS = (RAW, LZ4, ZSTD)
MAX_DECODED_BYTES = 256 << 20


def _raw_bytes(tensor: torch.Tensor) -> memoryview:
    from rrto_server.protocol import tensor_frame
    return tensor_frame(tensor)


def encode(codec: str, tensor: torch.Tensor) -> tuple[str, bytes | None]:
    """Encode one tensor; return the codec used and the frame (None means raw bytes)."""
    if codec == RAW or tensor.numel() == 0:
        return RAW, None
    raw = _raw_bytes(tensor)
    if codec == LZ4:
        import lz4.block
        return LZ4, lz4.block.compress(raw, store_size=False)
    if codec == ZSTD:
        import zstandard
        return ZSTD, zstandard.ZstdCompressor(level=1).compress(raw)
    raise ValueError(f'unknown codec {codec!r}; choose one of {LOSSLESS}')


def decode(codec: str, buf: memoryview, dtype: str, shape: tuple[int, ...], index: int):
    """Decode one frame into a tensor of ``dtype``/``shape`` or raise ProtocolError."""
    from rrto_server.protocol import ErrorCode, ProtocolError, TensorSpec, tensor_from_buffer

    spec = TensorSpec(dtype, shape)
    nbytes = spec.nbytes
    if nbytes > MAX_DECODED_BYTES:
        raise ProtocolError(ErrorCode.TOO_LARGE, f'tensor {index} decodes to {nbytes} bytes')
    try:
        if codec == LZ4:
            import lz4.block
            data = lz4.block.decompress(buf, uncompressed_size=nbytes)
        elif codec == ZSTD:
            import zstandard
            data = zstandard.ZstdDecompressor().decompress(buf, max_output_size=nbytes)
        else:
            raise ProtocolError(
                ErrorCode.BAD_REQUEST,
                f'tensor {index} has unknown codec {codec!r}')
    except ProtocolError:
        raise
    except Exception as exc:  # the libraries raise their own error types
        raise ProtocolError(ErrorCode.BAD_REQUEST,
                            f'tensor {index} does not decode as {codec}: {exc}')
    if len(data) != nbytes:
        raise ProtocolError(
            ErrorCode.BAD_REQUEST,
            f'tensor {index} decodes to {len(data)} bytes, {spec} needs {nbytes}')
    return tensor_from_buffer(memoryview(bytearray(data)), spec)


def ratio(tensor: torch.Tensor, codec: str) -> float:
    """Return encoded size / raw size for one tensor under a codec."""
    raw = max(1, tensor.numel() * tensor.element_size())
    used, frame = encode(codec, tensor)
    return (raw if frame is None else len(frame)) / raw if raw else math.nan
