"""
Name and lay out a model's outputs for ``std_msgs/Float32MultiArray`` topics.

Each output tensor gets its own topic, named from the output structure the
model returns: a single tensor is ``output``; a dict's entries are named by
their keys; sequence items are ``output0``, ``output1``, ...; nested
structures join their names with ``/``.  Names are valid ROS name tokens.
Each tensor's layout labels its dimensions, batch first; a detector's
variable-length outputs (``boxes``, ``scores``, ``labels``, ``keypoints``, ...,
as torchvision's detectors and :func:`rrto_ros.zoo.detector` return them, one
dict per image) label their first dimension ``detection``: its size is the
number of detections in that message, possibly 0.
"""

from __future__ import annotations

import re
from typing import Any

_LABELS = {
    1: ('index',),
    2: ('batch', 'feature'),
    3: ('batch', 'row', 'column'),
    4: ('batch', 'channel', 'height', 'width'),
}

# detection outputs by (name, rank): the first dimension counts the image's detections
DETECTION_LABELS = {
    ('boxes', 2): ('detection', 'coordinate'),             # x1, y1, x2, y2
    ('scores', 1): ('detection',),
    ('labels', 1): ('detection',),
    ('keypoints', 3): ('detection', 'keypoint', 'coordinate'),  # x, y, visibility
    ('keypoints_scores', 2): ('detection', 'keypoint'),
    ('masks', 4): ('detection', 'channel', 'height', 'width'),
}


def _token(key: str) -> str:
    token = re.sub(r'_+', '_', re.sub(r'[^A-Za-z0-9_]', '_', key)).strip('_')
    if not token or token[0].isdigit():
        token = f'output_{token}' if token else 'output'
    return token


def output_names(spec: Any) -> list[str]:
    """Return one topic-safe name per tensor of a tree spec, in flatten order."""
    names: list[str] = []
    _walk(spec, '', names)
    unique, seen = [], {}
    for name in names:
        seen[name] = seen.get(name, 0) + 1
        unique.append(name if seen[name] == 1 else f'{name}_{seen[name]}')
    return unique


def _walk(spec: Any, prefix: str, names: list[str]) -> None:
    if spec == 'T':
        names.append(prefix or 'output')
        return
    (tag, body), = spec.items()
    if tag in ('tuple', 'list'):
        for i, item in enumerate(body):
            _walk(item, f'{prefix}/output{i}' if prefix else f'output{i}', names)
    elif tag == 'dict':
        for key, item in body:
            _walk(item, f'{prefix}/{_token(key)}' if prefix else _token(key), names)


def dimensions(shape: tuple[int, ...], name: str = '') -> list[tuple[str, int, int]]:
    """
    Return ``(label, size, stride)`` per dimension, as MultiArrayDimension wants them.

    ``name`` is the output's name from :func:`output_names`; a detection output
    (see :data:`DETECTION_LABELS`) gets its detection labels.
    """
    shape = tuple(int(s) for s in shape) or (1,)
    labels = DETECTION_LABELS.get((name.rsplit('/', 1)[-1], len(shape))) or _LABELS.get(
        len(shape)) or ('batch',) + tuple(f'dim{i}' for i in range(1, len(shape)))
    dims, stride = [], 1
    for size in reversed(shape):
        stride *= size
        dims.append(stride)
    strides = list(reversed(dims))
    return [(label, size, st) for label, size, st in zip(labels, shape, strides)]
