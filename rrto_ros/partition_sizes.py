"""
Which output dimensions of a recorded eager operator follow the values of its inputs.

A segment of recorded operators (:mod:`rrto_ros.partition_eager`) guards,
after each operator whose output size follows the data, that the size is
the traced one, and declares those dimensions data-dependent in its
program.  The dimension is the operator's, not always the first: ``x[:,
mask]`` varies in dimension 1, a 2-d mask at position ``k`` collapses two
dimensions into one at ``k``, indices split by a slice move theirs to the
front, ``unique`` of a 0-d tensor has a 0-d ``inverse`` that never varies.
So it is derived from the operator's own fake kernel (r7 #4, #5).
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.experimental.symbolic_shapes import ShapeEnv, free_unbacked_symbols
from torch.utils._pytree import tree_flatten, tree_map

log = logging.getLogger('rrto_ros.partition')
aten = torch.ops.aten

# the operators of other namespaces a segment may hold (those rrto_wire.ops_dynamic allows):
# does their output size follow their inputs' values (not only their sizes)?
FOREIGN = {'torchvision::nms': True,         # as many indices as boxes survive
           'torchvision::roi_align': False}  # one pooled map per RoI: the rois' shape


def varies(op: Any) -> bool:
    """
    Return True if an operator's output size may follow the values of its inputs.

    ATen operators: those tagged ``dynamic_output_shape`` (``nonzero``,
    ``unique``, ``masked_select``...), ``index.Tensor`` only with a boolean
    mask among its indices, and ``where(condition)`` (untagged, a
    ``nonzero``).  Other namespaces: as :data:`FOREIGN` says (``torchvision::nms``
    varies, ``torchvision::roi_align`` does not); one it does not name counts
    as varying (the server allows none, so none reaches a segment).  Which
    dimensions vary: :func:`varying`.
    """
    if op.func.namespace != 'aten':
        return FOREIGN.get(op.func._schema.name, True)
    if op.func is aten.index.Tensor:
        return any(isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8)
                   for i in op.args[1])
    return torch.Tag.dynamic_output_shape in op.func.tags or op.func is aten.where.default


def varying(op: Any) -> list[list[int]]:
    """
    Return, per tensor output of an operator, the dimensions whose size follows the data.

    Derived from the operator itself: its fake kernel runs on fake copies of
    the recorded inputs (static shapes) with a shape environment, and each
    output dimension it could not size from the inputs' shapes is an unbacked
    symbol (``x[:, mask]``: dimension 1; ``nonzero``: 0; ``unique`` of a 0-d
    tensor: none of its 0-d ``inverse``).  An operator that does not vary
    (:func:`varies`) has none; one whose fake kernel fails has all of them
    (each guarded: the conservative reading).  Computed once, kept in ``op.dims``.
    """
    if op.dims is None:
        op.dims = _varying(op)
    return op.dims


def _varying(op: Any) -> list[list[int]]:
    outputs = op.outputs()
    if not varies(op):
        return [[] for _ in outputs]
    try:
        mode = FakeTensorMode(shape_env=ShapeEnv())

        def fake(a):
            return mode.from_tensor(a, static_shapes=True) if isinstance(a, torch.Tensor) else a
        with mode:
            out = op.func(*tree_map(fake, op.args), **tree_map(fake, op.kwargs))
        shapes = [t.shape for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)]
        if len(shapes) != len(outputs):
            raise ValueError(f'{len(shapes)} fake outputs for {len(outputs)}')
        return [[d for d, size in enumerate(shape) if free_unbacked_symbols(size)]
                for shape in shapes]
    except Exception as exc:  # noqa: B902 - any failure: guard every dimension
        log.debug('%s: sizes not derived (%s: %s), every dimension guarded', op.func,
                  type(exc).__name__, exc)
        return [list(range(t.dim())) for t in outputs]
