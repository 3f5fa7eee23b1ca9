"""
Per-tensor frame codecs: raw bytes, lossless lz4 / zstd, or lossy JPEG for images.

A codec only changes how one tensor's bytes travel; the descriptor in the
header still names the tensor's true dtype and shape, so the receiver knows
exactly how many bytes decoding must produce and rejects anything else.

``jpeg`` (or ``jpeg:Q`` with quality ``Q`` in 1..100, default 90) applies only
to uint8 images in HWC layout (``[..., H, W, C]`` with ``C`` 1 or 3): each of
the leading ``N`` frames becomes one baseline JPEG (Pillow, libjpeg-turbo), and
the wire frame is ``uint32 N``, ``N x uint32 length``, then the ``N`` JPEG
streams (little endian).  Any other tensor travels raw.  An encoder never
sends more bytes than raw: when compression does not shrink a tensor, the
tensor travels raw and its descriptor says so.

Decoding never produces more bytes than the descriptor declares, and the
declared size is checked against the caller's budget before any byte is
decompressed: zstd is read as a stream into a buffer of exactly the declared
size, lz4 blocks decompress into at most that size, and a JPEG stream's
header must announce the declared size before any pixel is decoded and it must
be a sequential (baseline) JPEG of at most one scan per channel: libjpeg
decodes every scan of a progressive stream over the whole image, so a small
frame repeating one scan thousands of times costs seconds.  This
module depends on :mod:`rrto_wire.tensors` only; message framing
(:mod:`rrto_wire.protocol`) builds on it, never the other way round.
"""

from __future__ import annotations

import io
import math
import struct
from typing import Literal

import numpy as np
import torch

from rrto_wire.errors import ErrorCode, ProtocolError
from rrto_wire.limits import MAX_DECODED_BYTES, MAX_JPEG_SIDE
from rrto_wire.tensors import TensorSpec, tensor_frame, tensor_from_buffer

RAW = 'raw'
LZ4 = 'lz4'
ZSTD = 'zstd'
JPEG = 'jpeg'
LOSSLESS = (RAW, LZ4, ZSTD)
CODECS = LOSSLESS + (JPEG,)
CodecName = Literal['raw', 'lz4', 'zstd', 'jpeg']
JPEG_QUALITY = 90


def parse(codec: str) -> tuple[str, int]:
    """Split ``'jpeg:75'`` into ``('jpeg', 75)``; raise ValueError for unknown codecs."""
    name, _, option = str(codec).partition(':')
    if name not in CODECS or (option and name != JPEG):
        raise ValueError(f'unknown codec {codec!r}; choose one of {CODECS} or jpeg:QUALITY')
    quality = JPEG_QUALITY
    if option:
        if not (option.isascii() and option.isdigit()) or not 1 <= int(option) <= 100:
            raise ValueError(f'JPEG quality in {codec!r} must be an integer in 1..100')
        quality = int(option)
    return name, quality


def jpeg_eligible(tensor: torch.Tensor) -> bool:
    """Return True if ``tensor`` is a uint8 HWC image (batch) that JPEG can carry."""
    shape = tuple(tensor.shape)
    return (tensor.dtype == torch.uint8 and len(shape) >= 3 and shape[-1] in (1, 3)
            and 0 < shape[-3] <= MAX_JPEG_SIDE and 0 < shape[-2] <= MAX_JPEG_SIDE)


def _jpeg_encode(tensor: torch.Tensor, quality: int) -> bytes:
    from PIL import Image
    height, width, channels = tensor.shape[-3:]
    frames = tensor.detach().cpu().contiguous().reshape(-1, height, width, channels).numpy()
    streams = []
    for frame in frames:
        image = Image.fromarray(frame[..., 0] if channels == 1 else frame,
                                'L' if channels == 1 else 'RGB')
        out = io.BytesIO()
        image.save(out, 'JPEG', quality=quality)
        streams.append(out.getvalue())
    table = struct.pack(f'<{len(streams) + 1}I', len(streams), *map(len, streams))
    return table + b''.join(streams)


def encode(codec: str, tensor: torch.Tensor) -> tuple[str, bytes | None]:
    """Encode one tensor; return the codec used and the frame (None means raw bytes)."""
    name, quality = parse(codec)
    if name == RAW or tensor.numel() == 0:
        return RAW, None
    if name == JPEG:
        if not jpeg_eligible(tensor):
            return RAW, None
        frame = _jpeg_encode(tensor, quality)
    else:
        raw = tensor_frame(tensor)
        if name == LZ4:
            import lz4.block
            frame = lz4.block.compress(raw, store_size=False)
        else:
            import zstandard
            frame = zstandard.ZstdCompressor(level=1).compress(raw)
    if len(frame) >= tensor.numel() * tensor.element_size():
        return RAW, None
    return name, frame


_SOF_SEQUENTIAL = frozenset((0xC0, 0xC1))      # baseline and extended sequential Huffman


def _jpeg_scans(stream: bytes) -> int | None:
    """
    Count the scans of a sequential JPEG stream by walking its markers.

    Return None if the stream is not a sequential JPEG (progressive, lossless,
    arithmetic-coded or broken before its first scan).  Inside a scan's
    entropy-coded data a 0xFF byte is always followed by 0x00 (stuffing) or a
    restart marker, so the next other marker ends the scan.
    """
    if stream[:2] != b'\xff\xd8':
        return None
    pos, scans, sequential, end = 2, 0, False, len(stream)
    while pos + 4 <= end:
        if stream[pos] != 0xFF:
            return None
        marker = stream[pos + 1]
        if marker == 0xFF:                       # fill byte
            pos += 1
            continue
        if marker == 0xD9:                       # EOI
            break
        length = int.from_bytes(stream[pos + 2:pos + 4], 'big')
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
            if marker not in _SOF_SEQUENTIAL:
                return None
            sequential = True
        pos += 2 + length
        if marker != 0xDA:
            continue
        if not sequential:
            return None
        scans += 1
        while True:                              # skip the entropy-coded data
            pos = stream.find(b'\xff', pos)
            if pos < 0 or pos + 1 >= end:
                return scans
            following = stream[pos + 1]
            if following != 0x00 and not 0xD0 <= following <= 0xD7:
                break
            pos += 2
    return scans if sequential else None


def _jpeg_decode(buf: memoryview, shape: tuple[int, ...], index: int, out: bytearray) -> int:
    from PIL import Image

    def bad(why: str) -> ProtocolError:
        return ProtocolError(ErrorCode.BAD_REQUEST, f'tensor {index} is not a JPEG frame: {why}')

    if len(shape) < 3 or shape[-1] not in (1, 3) or min(shape[-3:-1]) < 1 \
            or max(shape[-3:-1]) > MAX_JPEG_SIDE:
        raise bad(f'shape {list(shape)} is not [..., H, W, 1 or 3] uint8')
    height, width, channels = shape[-3:]
    count = math.prod(shape[:-3])
    if len(buf) < 4 or struct.unpack_from('<I', buf)[0] != count:
        raise bad(f'its table does not announce {count} images')
    table_bytes = 4 * (count + 1)
    if len(buf) < table_bytes:
        raise bad('its length table is truncated')
    lengths = struct.unpack_from(f'<{count}I', buf, 4)
    if table_bytes + sum(lengths) != len(buf):
        raise bad(f'lengths add up to {table_bytes + sum(lengths)} bytes, frame has {len(buf)}')
    mode = 'L' if channels == 1 else 'RGB'
    pixels_out = np.frombuffer(out, dtype=np.uint8).reshape(count, height, width, channels)
    offset = table_bytes
    for i, length in enumerate(lengths):
        data = bytes(buf[offset:offset + length])
        offset += length
        scans = _jpeg_scans(data)
        if scans is None or not 1 <= scans <= channels:
            raise bad(f'image {i} does not decode as a sequential JPEG of at most {channels} '
                      'scan(s)')
        stream = io.BytesIO(data)
        try:
            image = Image.open(stream, formats=['JPEG'])
            # the header alone tells the size: check it before decoding any pixel
            if image.size != (width, height) or image.mode != mode:
                raise bad(f'image {i} is {image.mode} {image.size[0]}x{image.size[1]}, '
                          f'expected {mode} {width}x{height}')
            image.load()
            pixels = np.asarray(image, dtype=np.uint8)
        except ProtocolError:
            raise
        except Exception as exc:  # Pillow raises several error types for broken streams
            raise bad(f'image {i} does not decode: {exc}') from None
        pixels_out[i] = pixels.reshape(height, width, channels)
    return len(out)


def _zstd_decode(buf: memoryview, out: bytearray) -> int:
    import zstandard
    # a stream, never ZstdDecompressor.decompress: that one allocates whatever size the
    # frame header claims before checking it against max_output_size
    reader = zstandard.ZstdDecompressor().stream_reader(buf, read_across_frames=False)
    got = reader.readinto(out) if out else 0
    return got + len(reader.read(1))    # one byte more than declared means "too long"


def decode(codec: str, buf: memoryview, spec: TensorSpec, index: int,
           max_bytes: int = MAX_DECODED_BYTES) -> torch.Tensor:
    """
    Decode one frame into a tensor of ``spec`` or raise ProtocolError.

    ``spec.nbytes`` is checked against ``max_bytes`` first; then exactly that
    many bytes are allocated and never more are decoded.
    """
    nbytes = spec.nbytes
    if nbytes > max_bytes:
        raise ProtocolError(ErrorCode.TOO_LARGE,
                            f'tensor {index} ({spec}) decodes to {nbytes} bytes, '
                            f'more than {max_bytes}')
    out = bytearray(nbytes)
    try:
        if codec == LZ4:
            import lz4.block
            data = lz4.block.decompress(buf, uncompressed_size=nbytes) if nbytes else b''
            got = len(data)
            out[:got] = data
        elif codec == ZSTD:
            got = _zstd_decode(buf, out)
        elif codec == JPEG:
            if spec.dtype != 'uint8':
                raise ProtocolError(ErrorCode.BAD_REQUEST,
                                    f'tensor {index}: jpeg carries uint8 only, not {spec.dtype}')
            got = _jpeg_decode(buf, spec.shape, index, out)
        else:
            raise ProtocolError(ErrorCode.BAD_REQUEST,
                                f'tensor {index} has unknown codec {codec!r}')
    except ProtocolError:
        raise
    except Exception as exc:  # the libraries raise their own error types
        raise ProtocolError(ErrorCode.BAD_REQUEST,
                            f'tensor {index} does not decode as {codec}: {exc}') from None
    if got != nbytes:
        raise ProtocolError(
            ErrorCode.BAD_REQUEST,
            f'tensor {index} decodes to {"more than " if got > nbytes else ""}'
            f'{min(got, nbytes)} bytes, {spec} needs {nbytes}')
    return tensor_from_buffer(memoryview(out), spec)


def ratio(tensor: torch.Tensor, codec: str) -> float:
    """Return encoded size / raw size for one tensor under a codec."""
    raw = max(1, tensor.numel() * tensor.element_size())
    used, frame = encode(codec, tensor)
    return (raw if frame is None else len(frame)) / raw if raw else math.nan
