"""
``sensor_msgs/Image`` fields to an NHWC tensor, without cv_bridge and without ROS.

:class:`ImageConverter` takes the fields of an Image message (``height``,
``width``, ``encoding``, ``is_bigendian``, ``step``, ``data``) and returns a
``1 x H x W x C`` tensor in the channel order the network expects: uint8 for
8-bit encodings (so frames travel as uint8 and normalisation runs on the
server), float32 for ``32FC1``.  Row padding (``step`` larger than a row) and
big-endian data are honoured; an optional resize runs on the robot so fewer
bytes cross the link.  :func:`array_to_image` is the inverse, used by the
camera simulator and the tests.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any, TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class Encoding:
    """How one ``sensor_msgs/Image`` encoding lays out a pixel."""

    dtype: np.dtype
    order: str          # 'rgb', 'bgr', 'rgba', 'bgra' or 'mono'

    @property
    def channels(self) -> int:
        return 1 if self.order == 'mono' else len(self.order)


ENCODINGS = {
    'rgb8': Encoding(np.dtype(np.uint8), 'rgb'),
    'bgr8': Encoding(np.dtype(np.uint8), 'bgr'),
    'rgba8': Encoding(np.dtype(np.uint8), 'rgba'),
    'bgra8': Encoding(np.dtype(np.uint8), 'bgra'),
    'mono8': Encoding(np.dtype(np.uint8), 'mono'),
    '32FC1': Encoding(np.dtype(np.float32), 'mono'),
}
CHANNEL_ORDERS = ('rgb', 'bgr', 'mono')
_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)  # ITU-R BT.601, R G B
_NATIVE = '<' if sys.byteorder == 'little' else '>'


def encoding_of(name: str) -> Encoding:
    """Return the layout of an encoding, or raise ValueError naming it."""
    try:
        return ENCODINGS[name]
    except (KeyError, TypeError):
        raise ValueError(f'unsupported image encoding {name!r} '
                         f'(supported: {", ".join(ENCODINGS)})') from None


def image_to_array(height: int, width: int, encoding: str, step: int, data: Any,
                   is_bigendian: bool = False) -> np.ndarray:
    """Return an ``H x W x C`` view of an Image's data (copied only to swap byte order)."""
    enc = encoding_of(encoding)
    if height < 0 or width < 0:
        raise ValueError(f'image size {width}x{height} is negative')
    row_bytes = width * enc.channels * enc.dtype.itemsize
    if step < row_bytes:
        raise ValueError(f'step {step} is shorter than a {encoding} row of {width} pixels '
                         f'({row_bytes} bytes)')
    raw = np.frombuffer(data, dtype=np.uint8)
    if raw.size < height * step:
        raise ValueError(f'{encoding} image of {width}x{height} with step {step} needs '
                         f'{height * step} bytes, got {raw.size}')
    rows = raw[:height * step].reshape(height, step)[:, :row_bytes]
    dtype = enc.dtype
    if dtype.itemsize > 1:
        dtype = dtype.newbyteorder('>' if is_bigendian else '<')
    pixels = rows.view(dtype).reshape(height, width, enc.channels)
    if dtype.itemsize > 1 and dtype.byteorder not in ('=', '|', _NATIVE):
        pixels = pixels.astype(enc.dtype)
    return pixels


def reorder(pixels: np.ndarray, source: str, target: str) -> np.ndarray:
    """Return ``pixels`` (H x W x C in ``source`` order) in ``target`` order."""
    if target not in CHANNEL_ORDERS:
        raise ValueError(f'channel order must be one of {CHANNEL_ORDERS}, got {target!r}')
    if source == 'mono':
        return pixels if target == 'mono' else np.repeat(pixels, 3, axis=2)
    rgb = [source.index(c) for c in 'rgb']
    if target == 'mono':
        luma = pixels[..., rgb].astype(np.float32) @ _LUMA
        if pixels.dtype == np.uint8:
            luma = np.clip(np.rint(luma), 0, 255).astype(np.uint8)
        return luma[..., None]
    wanted = rgb if target == 'rgb' else rgb[::-1]
    if wanted == list(range(len(source))):
        return pixels
    return pixels[..., wanted]


class ImageConverter:
    """Turn Image fields into a contiguous ``1 x H x W x C`` tensor for the network."""

    def __init__(self, channel_order: str = 'rgb', resize: tuple[int, int] | None = None):
        if channel_order not in CHANNEL_ORDERS:
            raise ValueError(f'channel order must be one of {CHANNEL_ORDERS}, '
                             f'got {channel_order!r}')
        if resize is not None and (len(resize) != 2 or min(resize) <= 0):
            raise ValueError(f'resize must be (height, width) with positive sizes, got {resize}')
        self.channel_order = channel_order
        self.channels = 1 if channel_order == 'mono' else 3
        self.resize = tuple(int(s) for s in resize) if resize is not None else None

    def __call__(self, height: int, width: int, encoding: str, step: int, data: Any,
                 is_bigendian: bool = False) -> torch.Tensor:
        import torch   # here: camera_sim uses this module and starts without torch
        import torch.nn.functional as F
        pixels = image_to_array(height, width, encoding, step, data, is_bigendian)
        pixels = reorder(pixels, encoding_of(encoding).order, self.channel_order)
        pixels = np.ascontiguousarray(pixels)
        if not pixels.flags.writeable:      # a view of immutable bytes: torch wants to own it
            pixels = pixels.copy()
        tensor = torch.from_numpy(pixels).unsqueeze(0)
        if self.resize is not None and tuple(tensor.shape[1:3]) != self.resize:
            nchw = tensor.permute(0, 3, 1, 2)
            nchw = F.interpolate(nchw, size=self.resize, mode='bilinear', antialias=True,
                                 align_corners=False)
            tensor = nchw.permute(0, 2, 3, 1).contiguous()
        return tensor


def array_to_image(pixels: np.ndarray, encoding: str, padding: int = 0,
                   big_endian: bool = False) -> dict:
    """Return Image fields for an ``H x W x C`` array (``padding`` extra bytes per row)."""
    enc = encoding_of(encoding)
    if pixels.ndim == 2:
        pixels = pixels[..., None]
    if pixels.ndim != 3 or pixels.shape[2] != enc.channels:
        raise ValueError(f'{encoding} needs H x W x {enc.channels} pixels, got {pixels.shape}')
    dtype = enc.dtype.newbyteorder('>' if big_endian else '<') if enc.dtype.itemsize > 1 \
        else enc.dtype
    height, width = pixels.shape[:2]
    rows = np.ascontiguousarray(pixels, dtype=dtype).reshape(height, -1).view(np.uint8)
    if padding:
        rows = np.concatenate([rows, np.zeros((height, padding), np.uint8)], axis=1)
    return {'height': height, 'width': width, 'encoding': encoding,
            'is_bigendian': bool(big_endian and enc.dtype.itemsize > 1),
            'step': rows.shape[1], 'data': rows.tobytes()}
