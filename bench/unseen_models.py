"""
Two networks outside the zoo, added to test the planner on what it was not tuned for.

* :func:`unet`: a 4-level U-Net-style segmenter (two 3x3 conv-BN-ReLU per
  level, max pooling down, nearest upsampling up, skip connections by channel
  concatenation, a 1x1 classifier per pixel; frame sides divisible by 16);
* :func:`tiny_yolo`: a Tiny-YOLOv2-style detector head (3x3 conv-BN-leaky
  ReLU with 2x2 max pooling, widths 16..512, a stride-1 pooling, a 1x1
  prediction of 5 anchors x (5 + 20 classes) per cell).

Both are plain ``nn.Module`` factories with deterministic random weights, so
``python:bench.unseen_models:unet`` works wherever a model spec does.
"""

from __future__ import annotations

import torch
from torch import nn

from rrto_ros.zoo import initialise


def _conv(cin: int, cout: int, act: nn.Module) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout), act)


class UNet(nn.Module):
    """Encoder-decoder with skips: 4 levels, nearest upsampling, channel concatenation."""

    def __init__(self, classes: int = 8, width: int = 16):
        super().__init__()
        widths = [width * 2 ** i for i in range(4)]
        self.down = nn.ModuleList()
        cin = 3
        for w in widths:
            self.down.append(nn.Sequential(_conv(cin, w, nn.ReLU()), _conv(w, w, nn.ReLU())))
            cin = w
        self.pool = nn.MaxPool2d(2)
        self.bottom = nn.Sequential(_conv(cin, 2 * cin, nn.ReLU()), _conv(2 * cin, cin, nn.ReLU()))
        self.up = nn.ModuleList()
        for w in reversed(widths):
            self.up.append(nn.Sequential(_conv(cin + w, w, nn.ReLU()), _conv(w, w, nn.ReLU())))
            cin = w
        self.head = nn.Conv2d(cin, classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = []
        for block in self.down:
            x = block(x)
            skips.append(x)
            x = self.pool(x)
        x = self.bottom(x)
        for block, skip in zip(self.up, reversed(skips)):
            x = nn.functional.interpolate(x, scale_factor=2, mode='nearest')
            x = block(torch.cat([x, skip], 1))
        return self.head(x)


class TinyYolo(nn.Module):
    """Tiny-YOLOv2-style: conv-BN-leaky + pooling to stride 32, one prediction map."""

    def __init__(self, anchors: int = 5, classes: int = 20):
        super().__init__()
        layers, cin = [], 3
        for i, w in enumerate((16, 32, 64, 128, 256, 512)):
            layers.append(_conv(cin, w, nn.LeakyReLU(0.1)))
            layers.append(nn.MaxPool2d(2) if i < 5 else nn.MaxPool2d(3, 1, 1))
            cin = w
        layers.append(_conv(cin, 512, nn.LeakyReLU(0.1)))
        self.features = nn.Sequential(*layers)
        self.predict = nn.Conv2d(512, anchors * (5 + classes), 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.predict(self.features(x))


def unet(classes: int = 8, width: int = 16, seed: int = 0) -> UNet:
    """Return the U-Net in eval mode with deterministic random weights."""
    return initialise(UNet(classes, width), seed)


def tiny_yolo(anchors: int = 5, classes: int = 20, seed: int = 0) -> TinyYolo:
    """Return the Tiny-YOLOv2-style head in eval mode with deterministic random weights."""
    return initialise(TinyYolo(anchors, classes), seed)
