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
    """Run ``model`` on uint8 NHWC images: scale to [0, 1], reorder channels, normalise."""

    def __init__(self, model: torch.nn.Module, mean: Sequence[float] = IMAGENET_MEAN,
                 std: Sequence[float] = IMAGENET_STD, bgr_input: bool = False):
        super().__init__()
        if len(mean) != len(std) or any(s <= 0 for s in std):
            raise ValueError('mean and std need one value per channel and std > 0')
        self.model = model
        self.bgr_input = bool(bgr_input)
        channels = len(mean)
        self.register_buffer('scale', 1.0 / (255.0 * torch.tensor(std).view(1, channels, 1, 1)))
        self.register_buffer('shift',
                             (torch.tensor(mean) / torch.tensor(std)).view(1, channels, 1, 1))

    def forward(self, image: torch.Tensor):
        x = image.permute(0, 3, 1, 2).float()
        if self.bgr_input:
            x = x.flip(1)
        return self.model(x * self.scale - self.shift)
