"""
Image normalisation as part of the offloaded model, so frames travel as uint8.

A camera frame of ``H x W x 3`` uint8 is 4x smaller on the wire than the
normalised float tensor the network wants.  :class:`WithImageInput` wraps a
network so the uint8-to-float conversion, channel reordering and
normalisation run inside the recorded graph, on the server.
"""

from __future__ import annotations

from typing import Sequence

import torch

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class WithImageInput(torch.nn.Module):
    """
    Run ``model`` on NHWC images: divide by ``value_scale``, reorder channels, normalise.

    ``value_scale`` is the pixel value that maps to 1.0: 255 for uint8 frames,
    1.0 for float images (e.g. ``32FC1`` depth) that are already in the
    units ``mean`` and ``std`` are given in.
    """

    def __init__(self, model: torch.nn.Module, mean: Sequence[float] = IMAGENET_MEAN,
                 std: Sequence[float] = IMAGENET_STD, bgr_input: bool = False,
                 value_scale: float = 255.0):
        super().__init__()
        if len(mean) != len(std) or any(s <= 0 for s in std):
            raise ValueError('mean and std need one value per channel and std > 0')
        if value_scale <= 0:
            raise ValueError('value_scale must be positive')
        self.model = model
        self.bgr_input = bool(bgr_input)
        shape = (1, len(mean), 1, 1)
        std_t = torch.tensor(std, dtype=torch.float32)
        self.register_buffer('scale', 1.0 / (float(value_scale) * std_t).view(shape))
        mean_t = torch.tensor(mean, dtype=torch.float32)
        self.register_buffer('shift', (mean_t / std_t).view(shape))

    def forward(self, image: torch.Tensor):
        x = image.permute(0, 3, 1, 2).float()
        if self.bgr_input:
            x = x.flip(1)
        return self.model(x * self.scale - self.shift)
