"""
The checked substitutes a dynamic program's operators run as (:mod:`rrto_wire.ops_dynamic`).

``index`` with boolean masks and integer indices clamped into range,
``index_put`` with its indices clamped, and ``torchvision::roi_align`` with a
fixed sampling ratio and its RoIs in range; each carries the schema of the
operator it replaces (for :func:`rrto_wire.ops.check_call`).
"""

from __future__ import annotations

import functools
from typing import Any

import torch

from rrto_wire.errors import ErrorCode, ProtocolError


def index_masked(tensor: torch.Tensor, indices: list) -> torch.Tensor:
    """``aten.index.Tensor``: boolean masks as they are, integer indices clamped into range."""
    return torch.ops.aten.index.Tensor(tensor, _clamped_indices(tensor, indices))


def _clamped_indices(tensor: torch.Tensor, indices: list) -> list:
    """Return ``indices`` with boolean masks as they are and integer indices clamped."""
    fixed, dim = [], 0
    for index in indices:
        if index is not None and index.dtype not in (torch.bool, torch.uint8) and index.numel():
            size = tensor.shape[dim] if dim < tensor.dim() else 0
            if size == 0:
                raise IndexError(f'index into dimension {dim} of size 0')
            index = index.clamp(-size, size - 1)
        dim += index.dim() if index is not None and index.dtype in (torch.bool,
                                                                    torch.uint8) else 1
        fixed.append(index)
    return fixed


def index_put_clamped(tensor: torch.Tensor, indices: list, values: torch.Tensor,
                      accumulate: bool = False) -> torch.Tensor:
    """``aten.index_put.default`` with integer indices clamped into range."""
    return torch.ops.aten.index_put.default(tensor, _clamped_indices(tensor, indices), values,
                                            accumulate)


def index_put_clamped_(tensor: torch.Tensor, indices: list, values: torch.Tensor,
                       accumulate: bool = False) -> torch.Tensor:
    """``aten.index_put_.default`` with integer indices clamped into range."""
    return torch.ops.aten.index_put_.default(tensor, _clamped_indices(tensor, indices), values,
                                             accumulate)


MAX_SAMPLING_RATIO = 8     # RoIAlign samples per bin side (torchvision's detectors use 2)
MAX_SPATIAL_SCALE = 1024.0   # feature cells per input pixel (torchvision's: 1/4 .. 1/64)
_MAX_COORDINATE = 1e6


def roi_align_checked(input: torch.Tensor, rois: torch.Tensor, spatial_scale: float,
                      pooled_height: int, pooled_width: int, sampling_ratio: int,
                      aligned: bool) -> torch.Tensor:
    """
    ``torchvision::roi_align`` with a fixed sampling ratio and its rois in range.

    With ``sampling_ratio <= 0`` RoIAlign samples each bin as often as the
    box is large: boxes from the data would set the work of a call.  Each
    RoI's batch index (column 0) addresses the input: clamped into the batch,
    coordinates made finite (:func:`rois_in_range`).
    """
    if not 0 < sampling_ratio <= MAX_SAMPLING_RATIO:
        raise ProtocolError(ErrorCode.UNSAFE_PROGRAM,
                            f'roi_align sampling_ratio {sampling_ratio}: a program must fix it '
                            f'between 1 and {MAX_SAMPLING_RATIO} (else the boxes set the work)')
    if not (isinstance(spatial_scale, (int, float)) and 0 < spatial_scale <= MAX_SPATIAL_SCALE):
        raise ProtocolError(ErrorCode.UNSAFE_PROGRAM,
                            f'roi_align spatial_scale {str(spatial_scale)[:20]}: must be in '
                            f'(0, {MAX_SPATIAL_SCALE}]')
    return torch.ops.torchvision.roi_align.default(
        input, rois_in_range(rois, input.shape[0], spatial_scale), spatial_scale, pooled_height,
        pooled_width, sampling_ratio, aligned)


def rois_in_range(rois: torch.Tensor, batch: int, spatial_scale: float) -> torch.Tensor:
    """
    Return ``rois`` [K, 5] with finite coordinates and batch indices inside ``batch``.

    The kernels cast the batch index (column 0) and each sample's position to
    ``int`` and read there: NaN (which ``clamp`` lets through) casts to
    INT_MIN, an out-of-bounds read; an infinite coordinate makes ``inf - inf``
    a NaN position.  Non-finite values become 0, coordinates are bounded so
    that scaled by ``spatial_scale`` they stay finite in the rois' dtype.
    """
    if not rois.numel() or not batch:
        return rois
    bound = min(_MAX_COORDINATE, torch.finfo(rois.dtype).max / (4 * max(1.0, spatial_scale)))
    rois = rois.nan_to_num(0.0, 0.0, 0.0)
    return torch.cat([rois[:, :1].clamp(0, batch - 1), rois[:, 1:].clamp(-bound, bound)], 1)


@functools.lru_cache(maxsize=None)
def torchvision_op(name: str) -> Any:
    """Return ``torch.ops.torchvision.<name>.default`` where torchvision is installed."""
    try:
        import torchvision  # noqa: F401 - registers its operators
        return getattr(torch.ops.torchvision, name).default
    except (ImportError, AttributeError, RuntimeError):
        return None


index_masked._schema = torch.ops.aten.index.Tensor._schema
index_put_clamped._schema = torch.ops.aten.index_put.default._schema
index_put_clamped_._schema = torch.ops.aten.index_put_.default._schema
