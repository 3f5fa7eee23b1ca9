"""
What an operator of a dynamic program allocates and computes, before it runs.

:func:`cost` sizes a node of a program whose sizes depend on the data
(:mod:`rrto_wire.ops_dynamic`) on meta tensors, from the sizes (and strides)
its arguments have at run time; the server's runner
(:class:`rrto_server.runner_fx.DynamicRunner`) refuses the node before it runs
if that would take the call past its budgets.

Only the operators of :data:`PURE_VIEWS` cost nothing: they can only alias
their input (a view that cannot be made raises), never copy, and return one
tensor.  Those of :data:`LIST_VIEWS` (``unbind``, ``split``, ``chunk``) copy
nothing either, but return as many tensor objects as a size says, which the
data may set (``x.expand(n * n).unbind(0)``: n^2 objects of ~600 bytes each,
a16 #2): they cost :data:`TENSOR_BYTES` and :data:`VIEW_ELEMENTS` per view,
counted from their arguments before any is made.  An operator
whose schema says that it returns a view *may* still copy (``reshape``,
``contiguous``, ``flatten``, ``to``: a copy of an ``expand()``ed view is
as large as the view's numel, a15 #2): it is sized on meta tensors with its
arguments' strides, and every storage that the call creates is counted,
its intermediates too (a composite operator such as scaled-dot-product
attention materialises its attention matrix: ``B*H*L*S`` elements, more
than once).  A kernel's hidden workspace that meta tensors cannot show is
added by formula (:func:`_workspace`: a convolution's columns on the CPU).
"""

from __future__ import annotations

import math
from typing import Any, Callable

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import flop_registry

from rrto_wire.errors import ErrorCode, ProtocolError
from rrto_wire.ops_substitutes import (index_masked, index_put_clamped, index_put_clamped_,
                                       roi_align_checked, torchvision_op)

A = torch.ops.aten
# operators that never allocate: each returns views of its input (or raises), whatever its
# strides; any other operator, a schema's alias annotation or not, is sized (a15 #2)
PURE_VIEWS = frozenset((
    A.alias.default, A.detach.default, A.expand.default, A.expand_as.default,
    A.narrow.default, A.narrow.Tensor, A.permute.default, A.select.int, A.slice.Tensor,
    A.squeeze.default, A.squeeze.dim, A.squeeze.dims, A.t.default, A.transpose.int,
    A.unsqueeze.default, A.view.default, A.view.dtype))
# views returned as a list, as many as a size says (a16 #2): each one a tensor object
LIST_VIEWS = frozenset((A.chunk.default, A.split.Tensor, A.split.sizes,
                        A.split_with_sizes.default, A.unbind.int))
# one tensor object (TensorImpl, its Python object, sizes and strides): an unbind view took
# 630 bytes of RSS, a split one 96 (10^6 of each, CPU, 2026-12-02); making one costs about
# what reading 64 elements does (10^6 unbind views: 2.0 s on the 2-core VM)
TENSOR_BYTES = 1024
VIEW_ELEMENTS = 64
CONVOLUTIONS = frozenset((A.convolution, A._convolution, A.conv1d, A.conv2d, A.conv3d,
                          A.conv_transpose1d, A.conv_transpose2d, A.conv_transpose3d))

# at most one row per input element (nonzero: [n, dim] int64 for n <= numel), whatever the
# values, so sized at numel rows; index_put returns the tensor it writes into (or a copy)
_UNIQUE = A._unique2.default
_ROW_PER_ELEMENT = frozenset((A.nonzero.default, A.where.default, _UNIQUE))
_SAME_SIZE = frozenset((index_put_clamped, index_put_clamped_))
# one tensor in, one of its shape out (a dtype argument may widen it to 8 bytes an element)
_SAME_SHAPE = frozenset(getattr(A, name) for name in (
    'cumsum', 'cumprod', 'clone', '_softmax', 'softmax', '_log_softmax', 'log_softmax'))


def costs_nothing(fn: Callable) -> bool:
    """Return True for a Python operator (on sizes: see ``ops_dynamic.check_sizes``) or a view."""
    return getattr(fn, '_schema', None) is None or fn in PURE_VIEWS


def cost(fn: Callable, args: tuple, kwargs: dict, device: torch.device) -> tuple[int, int, int]:
    """
    Return (bytes, flops, elements) of calling ``fn`` on arguments of these sizes, before it runs.

    Whatever its values: the bytes it allocates (each storage its call
    creates on meta tensors, outputs and intermediates, plus
    :func:`_workspace`; an in-place operator or a call that returns views
    none), the FLOPs of matrix products and convolutions (torch's formulas),
    and the elements it touches: each of each tensor it reads (a view at its
    logical numel), each it writes, what it computes beyond (:func:`_beyond_one_pass`).
    A boolean mask counts as all set, a data-dependent operator at its most
    rows (``nonzero``: ``numel x dim`` int64; NMS its pairwise mask on
    CUDA).  UNSAFE_PROGRAM if unsizable.
    """
    if costs_nothing(fn):
        return 0, 0, 0
    if fn in LIST_VIEWS:
        views = _list_views(fn, args, kwargs)
        return views * TENSOR_BYTES, 0, views * VIEW_ELEMENTS
    tensors = [t for t in torch.utils._pytree.tree_leaves((args, kwargs))
               if isinstance(t, torch.Tensor)]
    read = sum(t.numel() for t in tensors)
    if fn in _ROW_PER_ELEMENT:    # unique: values, inverse and counts, numel each at most
        rows = tensors[0].numel() * (3 if fn is _UNIQUE else max(1, tensors[0].dim()))
        return rows * 8, 0, read + rows * (max(1, rows).bit_length() if fn is _UNIQUE else 1)
    if fn is torchvision_op('nms'):
        n = tensors[0].shape[0]
        mask = n * -(-n // 64) * 8 if device.type == 'cuda' else n   # suppressed, per pair
        return mask + n * 32, 0, read + n * n  # + sorted scores, order, areas, kept indices
    masks = sum(t.numel() * t.dim() * 8 for t in tensors if t.dtype in (torch.bool, torch.uint8)
                ) if fn in (index_masked, *_SAME_SIZE) else 0   # nonzero of each mask
    if fn in _SAME_SIZE:          # index_put: a copy of its input, or in place
        written = tensors[0].numel() * tensors[0].element_size()
        return masks + (written if fn is index_put_clamped else 0), 0, read + tensors[0].numel()
    if getattr(fn, 'overloadpacket', None) in _SAME_SHAPE:   # its input's shape (no meta: ms)
        return tensors[0].numel() * 8, 0, read + tensors[0].numel()   # at most int64/double
    if torch.Tag.pointwise in getattr(fn, 'tags', ()):   # broadcast (a meta kernel: ms)
        numel = math.prod(torch.broadcast_shapes(*(t.shape for t in tensors)))
        itemsize = max([4] + [t.element_size() for t in tensors])  # type promotion's widest
        return (0 if _writes_input(fn) else numel * itemsize), 0, read + numel
    try:     # not in inference mode: matmul, linear, einsum reach the mode as mm, addmm...
        with torch.inference_mode(False):
            meta = torch.utils._pytree.tree_map(_meta, (args, kwargs))
            if fn is index_masked:       # the most a mask can select: every element
                fn, meta = A.index.Tensor, ((meta[0][0], _masks_as_indices(meta[0][1])), meta[1])
            with _Counted(meta) as counted:
                outputs = fn(*meta[0], **meta[1])
            if _moves((args, kwargs), tensors) and not counted.allocated:   # to(device): a copy
                counted.allocated = sum(t.numel() * t.element_size() for t in
                                        torch.utils._pytree.tree_leaves(outputs)
                                        if isinstance(t, torch.Tensor))
    except Exception as exc:  # noqa: B902 - any failure to size it refuses it
        raise ProtocolError(ErrorCode.UNSAFE_PROGRAM,
                            f'{getattr(fn, "_schema", fn).name}: its output size cannot be '
                            f'computed before it runs ({type(exc).__name__}), which a program '
                            'whose sizes depend on the data needs') from None
    leaves = [t for t in torch.utils._pytree.tree_leaves(outputs) if isinstance(t, torch.Tensor)]
    numel = sum(t.numel() for t in leaves)
    extra = _beyond_one_pass(fn, args, kwargs, leaves)
    nbytes = masks + counted.allocated + _workspace(fn, tensors, leaves, device)
    return nbytes, counted.flops, read + numel + extra


def _list_views(fn: Callable, args: tuple, kwargs: dict) -> int:
    """Return how many views a :data:`LIST_VIEWS` operator returns, without making them."""
    given = dict(zip((arg.name for arg in fn._schema.arguments), args), **kwargs)
    try:
        tensor, dim = given['self'], given.get('dim', 0)
        size = tensor.shape[dim] if tensor.dim() else 1
        if fn is A.unbind.int:
            return size
        if fn is A.chunk.default:
            return max(1, min(given['chunks'], size))
        if fn is A.split.Tensor:
            step = given['split_size']
            return max(1, -(-size // step)) if step > 0 else 1
        return len(given['split_size' if fn is A.split.sizes else 'split_sizes'])
    except (AttributeError, KeyError, IndexError, TypeError) as exc:
        raise ProtocolError(ErrorCode.UNSAFE_PROGRAM,
                            f'{fn._schema.name}: how many views it returns cannot be computed '
                            f'before it runs ({type(exc).__name__})') from None


def _writes_input(fn: Callable) -> bool:
    """Return True for an in-place operator (its schema returns an argument it writes)."""
    return any(ret.alias_info is not None and ret.alias_info.is_write
               for ret in fn._schema.returns)


def _moves(arguments: tuple, tensors: list) -> bool:
    """Return True when a device argument names another device than a tensor's (meta: one)."""
    return any(isinstance(v, torch.device) and any(
        v.type != t.device.type or v.index not in (None, t.device.index) for t in tensors)
        for v in torch.utils._pytree.tree_leaves(arguments))


def _workspace(fn: Callable, tensors: list, outputs: list, device: torch.device) -> int:
    """
    Return the bytes of a kernel's workspace that its meta call does not show.

    A convolution on the CPU in any dtype but float32 runs im2col over the
    whole batch (``slow_conv2d``: a15 #2; on a 2-core VM, 2026-12-01, a
    float16 / float64 3x3 convolution of 16x64x64x64 grew the peak RSS by 84
    / 332 MiB for an 8 / 32 MiB output): its columns, batch x channels x
    kernel taps x positions (on the larger side, for a transposed one).  In
    float32 (oneDNN) a copy of a strided input.
    """
    if getattr(fn, 'overloadpacket', None) not in CONVOLUTIONS or device.type != 'cpu' or (
            len(tensors) < 2 or not outputs):
        return 0
    x, weight, out = tensors[0], tensors[1], outputs[0]
    if x.dtype == torch.float32:
        return x.numel() * x.element_size()
    batch = x.shape[0] if x.dim() == weight.dim() else 1
    channels = max(x.shape[-weight.dim() + 1], out.shape[-weight.dim() + 1], 1)
    positions = max(math.prod(x.shape[2 - weight.dim():]), math.prod(out.shape[2 - weight.dim():]))
    return batch * channels * math.prod(weight.shape[2:]) * positions * x.element_size()


# per output element: a pool's window (adaptive ones tile their input: read once), a
# resampling's taps (antialiased: ~4 more per input element), RoIAlign's sampling_ratio^2
# bilinear samples; a sort compares each element log2(n) times
_WINDOWED = {getattr(A, f'{kind}_pool{d}d'): d for kind in ('max', 'avg')
             for d in (1, 2, 3)} | {A.max_pool2d_with_indices: 2}
_TAPS = {getattr(A, name): taps for name, taps in (
    ('upsample_linear1d', 2), ('upsample_bilinear2d', 4), ('_upsample_bilinear2d_aa', 16),
    ('upsample_bicubic2d', 16), ('grid_sampler', 16), ('grid_sampler_2d', 16))}
_SORTING = frozenset((A.sort, A.topk))


def _beyond_one_pass(fn: Callable, args: tuple, kwargs: dict, outputs: list) -> int:
    """Return the elements ``fn`` computes beyond reading its inputs and writing its outputs."""
    packet = getattr(fn, 'overloadpacket', None)
    if fn is not roi_align_checked and not {packet} & (_WINDOWED.keys() | _TAPS.keys() | _SORTING):
        return 0
    given = dict(zip((arg.name for arg in fn._schema.arguments), args), **kwargs)
    first = next(iter(given.values()))
    if fn is roi_align_checked:
        return outputs[0].numel() * 4 * given['sampling_ratio'] ** 2
    if packet in _TAPS:
        return outputs[0].numel() * _TAPS[packet] + (
            4 * first.numel() if packet is A._upsample_bilinear2d_aa else 0)
    if packet in _SORTING:
        size = first.shape[given.get('dim', -1)] if first.dim() else 1
        return first.numel() * max(1, size).bit_length()
    kernel = given['kernel_size']
    kernel = [kernel] if isinstance(kernel, int) else list(kernel)
    return outputs[0].numel() * math.prod(kernel * _WINDOWED[packet] if len(kernel) == 1
                                          else kernel)


class _Counted(TorchDispatchMode):
    """
    Sum torch's flop formulas, and the bytes of each new storage, over an operator's ATen calls.

    A storage is new if no argument and no earlier call's output holds it
    (a view, an in-place write, an operator returning its input: none).
    Every storage stays referenced until the mode exits, so no address is
    reused meanwhile.
    """

    def __init__(self, arguments: Any):
        super().__init__()
        self.seen = {}
        self._add(arguments)
        self.allocated = 0

    def __enter__(self) -> '_Counted':
        self.flops = 0
        return super().__enter__()

    def _add(self, value: Any) -> int:
        new = 0
        for t in torch.utils._pytree.tree_leaves(value):
            if isinstance(t, torch.Tensor):
                storage = t.untyped_storage()
                if storage._cdata not in self.seen:
                    self.seen[storage._cdata] = storage
                    new += storage.nbytes()
        return new

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        formula = flop_registry.get(func.overloadpacket)
        if formula is not None:
            self.flops += formula(*args, **kwargs, out_val=out)
        self.allocated += self._add(out)
        return out


def _masks_as_indices(indices: list) -> list:
    """Replace each k-dimensional boolean mask by k index vectors selecting all its elements."""
    out = []
    for index in indices:
        if index is not None and index.dtype in (torch.bool, torch.uint8):
            out += [torch.empty(index.numel(), dtype=torch.int64, device='meta')] * index.dim()
        else:
            out.append(index)
    return out


def _meta(value: Any) -> Any:
    """Return a meta tensor of ``value``'s shape, strides and dtype (a copy follows strides)."""
    if isinstance(value, torch.Tensor):
        return torch.empty_strided(value.shape, value.stride(), dtype=value.dtype, device='meta')
    if isinstance(value, torch.device):
        return torch.device('meta')
    return value
