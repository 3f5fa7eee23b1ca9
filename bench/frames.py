"""
Camera-like input frames: crops of a real photograph plus sensor noise.

Codecs must be measured on images that look like a camera's (random noise
does not compress, a flat colour compresses absurdly well).  The frames are
random crops (40-100 % of the side), flips and brightness changes of the
photograph matplotlib ships as sample data (``grace_hopper.jpg``), resized
to ``size`` and given Gaussian sensor noise; they are deterministic for a
seed.  Without matplotlib's sample data, a synthetic scene (gradients and
shapes) stands in, and :func:`camera_frames` says so in its ``source``.
"""

from __future__ import annotations

import numpy as np
import torch

PHOTO = 'grace_hopper.jpg'


def _photo() -> tuple[np.ndarray, str]:
    try:
        from matplotlib import cbook
        from PIL import Image
        with Image.open(cbook.get_sample_data(PHOTO)) as image:
            return np.asarray(image.convert('RGB')), f'matplotlib sample data {PHOTO}'
    except (ImportError, OSError, ValueError):
        y, x = np.mgrid[0:480, 0:640]
        scene = np.stack([x * 255 // 640, y * 255 // 480, (x + y) % 256], -1)
        scene[100:300, 200:350] = (200, 40, 40)
        return scene.astype(np.uint8), 'synthetic scene (matplotlib sample data missing)'


def camera_frames(count: int = 16, size: int = 224, seed: int = 0, noise: float = 2.0,
                  ) -> tuple[torch.Tensor, str]:
    """Return ``count`` uint8 frames shaped ``[count, 1, size, size, 3]`` and their source."""
    from PIL import Image
    photo, source = _photo()
    rng = np.random.default_rng(seed)
    height, width = photo.shape[:2]
    frames = np.empty((count, 1, size, size, 3), dtype=np.uint8)
    for i in range(count):
        side = int(min(height, width) * rng.uniform(0.4, 1.0))
        top, left = rng.integers(0, height - side + 1), rng.integers(0, width - side + 1)
        crop = Image.fromarray(photo[top:top + side, left:left + side]).resize(
            (size, size), Image.BILINEAR)
        pixels = np.asarray(crop, dtype=np.float32) * rng.uniform(0.85, 1.15)
        if rng.random() < 0.5:
            pixels = pixels[:, ::-1]
        pixels += rng.normal(0.0, noise, pixels.shape)
        frames[i, 0] = np.clip(pixels, 0, 255).astype(np.uint8)
    return torch.from_numpy(frames), f'{source}, random crops, sensor noise sigma {noise:g}'
