"""
The models the GPU request-path benchmarks serve, with the frame each one takes.

The project's zoo (``rrto_ros.zoo``) exists everywhere; torchvision's models
only where torchvision is installed (the GPU host, not the CPU CI).  Every
model is wrapped in :class:`~rrto_ros.preprocess.WithImageInput`, so a uint8
NHWC camera frame travels and normalisation runs on the server.  Weights are
random (seeded): these benchmarks time the request path, not accuracy.
``lraspp_mobilenet_v3_large`` on a 320x320 frame answers with 8.6 MB of
float32 scores: the multi-megabyte-output case.
"""

from __future__ import annotations

from typing import Callable

import torch

from rrto_ros.preprocess import WithImageInput
from rrto_ros.zoo import ARCHITECTURES

TORCHVISION = {   # name -> (constructor name, frame side)
    'squeezenet1_1': ('squeezenet1_1', 224),
    'mobilenet_v3_large': ('mobilenet_v3_large', 224),
    'efficientnet_b0': ('efficientnet_b0', 224),
    'resnet50': ('resnet50', 224),
    'lraspp_mobilenet_v3_large': ('segmentation.lraspp_mobilenet_v3_large', 320),
}


class _MainOutput(torch.nn.Module):
    """Return a segmentation model's ``out`` map (torchvision returns a dict)."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model(x)['out']


def _torchvision(name: str) -> Callable[[], torch.nn.Module]:
    def build() -> torch.nn.Module:
        import torchvision
        owner, _, attr = TORCHVISION[name][0].rpartition('.')
        module = getattr(torchvision.models, owner) if owner else torchvision.models
        kwargs = {'weights_backbone': None} if owner == 'segmentation' else {}
        torch.manual_seed(0)
        model = getattr(module, attr)(weights=None, **kwargs)
        return _MainOutput(model) if owner == 'segmentation' else model
    return build


def available() -> list[str]:
    """Return every model name this machine can build (zoo first, then torchvision)."""
    names = sorted(ARCHITECTURES)
    try:
        import torchvision  # noqa: F401  (only to know whether it is there)
    except ImportError:
        return names
    return names + list(TORCHVISION)


def build(name: str) -> tuple[torch.nn.Module, torch.Tensor]:
    """Return ``(model in eval mode, its uint8 NHWC frame)`` for a name of :func:`available`."""
    if name in ARCHITECTURES:
        factory, side = ARCHITECTURES[name], 224
    elif name in TORCHVISION:
        factory, side = _torchvision(name), TORCHVISION[name][1]
    else:
        raise KeyError(f'unknown model {name!r}; known here: {available()}')
    model = WithImageInput(factory().eval()).eval()
    generator = torch.Generator().manual_seed(1)
    frame = torch.randint(0, 256, (1, side, side, 3), dtype=torch.uint8, generator=generator)
    return model, frame
