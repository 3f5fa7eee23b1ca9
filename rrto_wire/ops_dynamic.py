"""
The operators of a data-dependent program, and the rule that keeps its sizes bounded.

A detector's stages hold operators whose output size depends on the data
(``nonzero``, boolean-mask indexing, ``torch.where(mask)``, NMS).  Captured
with unbacked sizes (``torch._dynamo.config.capture_dynamic_output_shape_ops``),
such a stage exports as one graph; its program says ``"dynamic": true`` and
the server runs it op by op, unrecorded (a CUDA graph replays fixed shapes),
under the same allowlist as any program (:mod:`rrto_wire.ops`) plus:

* **data-dependent operators** (:data:`DATA_DEPENDENT`): ``nonzero``, ``where(condition)``,
  ``unique`` and ``torchvision::nms`` (where the server has torchvision) return at most one
  row per element of their input, whatever the values (sized at that many: the numel of an
  ``expand()``ed view is not memory); ``index`` may take boolean masks (its integer indices
  clamped into range, as in every program);
* **size operators** (:data:`SIZE_OPS`): a tensor's size (``sym_size``, ``sym_numel``),
  integer arithmetic on sizes (``operator.*``, ``sym_min``, ``sym_max``: never on a
  tensor), the assertions export writes about them, and a chained program's guard on them
  (:mod:`rrto_wire.program_chain`);
* Python's ``&`` and ``|`` on tensors (``aten.__and__.Tensor``: ``bitwise_and``);
* **indexed writes** (``index_put``), indices clamped, the size of the tensor written into;
* ``torchvision::roi_align`` (where the server has torchvision) with a fixed
  sampling ratio and each RoI's batch index clamped (:func:`roi_align_checked`).

:func:`check_sizes` is the rule: a node may pass a value where an operator
takes a size (a non-tensor argument) only if that value is an integer
computed from tensor sizes by the size operators.  No operator turns tensor
values into an integer (``item``, ``_local_scalar_dense``,
``repeat_interleave`` with tensor repeats, ``masked_select`` are not
allowed), so every size in the program is a function of the sizes of its
inputs and of the data-dependent operators' outputs.  What each operator
will allocate and compute at run time is known before it runs
(:func:`cost`, every operator, no exemptions); the server's runner
(:class:`rrto_server.runner_fx.DynamicRunner`) holds each execution to the
sandbox's budgets with it: the bytes alive at once, the work of the call.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Callable, Iterable

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import flop_registry

from rrto_wire import ops, program_chain
from rrto_wire.errors import ErrorCode, ProtocolError


def _index_masked(tensor: torch.Tensor, indices: list) -> torch.Tensor:
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


def _index_put_clamped(tensor: torch.Tensor, indices: list, values: torch.Tensor,
                       accumulate: bool = False) -> torch.Tensor:
    """``aten.index_put.default`` with integer indices clamped into range."""
    return torch.ops.aten.index_put.default(tensor, _clamped_indices(tensor, indices), values,
                                            accumulate)


def _index_put_clamped_(tensor: torch.Tensor, indices: list, values: torch.Tensor,
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
def _torchvision(name: str) -> Any:
    """Return ``torch.ops.torchvision.<name>.default`` where torchvision is installed."""
    try:
        import torchvision  # noqa: F401 - registers its operators
        return getattr(torch.ops.torchvision, name).default
    except (ImportError, AttributeError, RuntimeError):
        return None


_index_masked._schema = torch.ops.aten.index.Tensor._schema
_index_put_clamped._schema = torch.ops.aten.index_put.default._schema
_index_put_clamped_._schema = torch.ops.aten.index_put_.default._schema

# operators whose output size depends on the values of their inputs
DATA_DEPENDENT: dict[str, Callable] = {
    'aten.nonzero.default': torch.ops.aten.nonzero.default,
    'aten.where.default': torch.ops.aten.where.default,
    'aten.index.Tensor': _index_masked,
    'aten._unique2.default': torch.ops.aten._unique2.default,
}
# sizes of tensors, integer arithmetic on them, and export's assertions about them
SIZE_OPS: dict[str, Callable] = {
    'aten.sym_size.int': torch.ops.aten.sym_size.int,
    'aten.sym_numel.default': torch.ops.aten.sym_numel.default,
    'aten._assert_scalar.default': torch.ops.aten._assert_scalar.default,
    'aten.sym_constrain_range_for_size.default': torch.ops.aten.sym_constrain_range_for_size
    .default, 'torch.sym_min': torch.sym_min, 'torch.sym_max': torch.sym_max,
    program_chain.GUARD: program_chain.guard,    # a chained program's guard on sizes
}
_GETITEM = ops.resolve('operator.getitem')     # picks one value of a tuple (where, nms...)
_ARITHMETIC = frozenset(ops.resolve(f'operator.{name}') for name in (
    'add', 'sub', 'mul', 'floordiv', 'mod', 'neg', 'eq', 'ne', 'lt', 'le', 'gt', 'ge'))
_WRITES = {'aten.index_put.default': _index_put_clamped,
           'aten.index_put_.default': _index_put_clamped_}
_TORCHVISION = {'torchvision.nms.default': ('nms', None),
                'torchvision.roi_align.default': ('roi_align', roi_align_checked)}
_BITWISE = {f'aten.__{op}__.Tensor': getattr(torch.ops.aten, f'bitwise_{op}').Tensor
            for op in ('and', 'or')}        # Python's & and | on tensors, as exported
_NAMES = {fn: name for name, fn in {**DATA_DEPENDENT, **SIZE_OPS, **_WRITES}.items()}
_NAMES.update({getattr(torch.ops.aten, name.split('.')[1]).Tensor: name for name in _BITWISE})
_NAMES.update({torch.ops.aten.index.Tensor: 'aten.index.Tensor',
               torch.ops.aten.index_put.default: 'aten.index_put.default',
               torch.ops.aten.index_put_.default: 'aten.index_put_.default'})


def resolve(name: Any) -> Callable:
    """Return the callable of an operator a dynamic program may name, else raise."""
    if name in _TORCHVISION:
        op_name, substitute = _TORCHVISION[name]
        if _torchvision(op_name) is None:
            raise ProtocolError(ErrorCode.BAD_REQUEST,
                                f'operator {name!r} is not available on this server '
                                '(no torchvision)')
        op = _torchvision(op_name)
        if substitute is None:
            return op
        substitute._schema = op._schema      # its arguments' names, for check_call
        return substitute
    for table in (DATA_DEPENDENT, SIZE_OPS, _WRITES, _BITWISE):
        if name in table:
            return table[name]
    return ops.resolve(name)


def name_of(target: Any) -> str:
    """Return the wire name of a node's target in a dynamic program; ValueError if refused."""
    if target in _NAMES:
        return _NAMES[target]
    for name, (op_name, _) in _TORCHVISION.items():
        if target is not None and target is _torchvision(op_name):
            return name
    return ops.name_of(target)


def varies(fn: Callable) -> bool:
    """Return True for a data-dependent operator (its output size follows the values)."""
    return fn in _DATA_DEPENDENT_FNS or fn is _torchvision('nms')


def is_size_op(fn: Callable) -> bool:
    """Return True for an operator on sizes (its result is an integer, a bool or nothing)."""
    return fn in _SIZE_FNS or fn in _ARITHMETIC


_DATA_DEPENDENT_FNS = frozenset(DATA_DEPENDENT.values())
_SIZE_FNS = frozenset(SIZE_OPS.values())
# at most one row per input element (nonzero: [n, dim] int64 for n <= numel), whatever the
# values, so sized at numel rows; index_put returns the tensor it writes into (or a copy)
_UNIQUE = torch.ops.aten._unique2.default
_ROW_PER_ELEMENT = frozenset((torch.ops.aten.nonzero.default, torch.ops.aten.where.default,
                              _UNIQUE))
_SAME_SIZE = frozenset((_index_put_clamped, _index_put_clamped_))
# one tensor in, one of its shape out (a dtype argument may widen it to 8 bytes an element)
_SAME_SHAPE = frozenset(getattr(torch.ops.aten, name) for name in (
    'cumsum', 'cumprod', 'clone', '_softmax', 'softmax', '_log_softmax', 'log_softmax'))


def check_sizes(nodes: Iterable[Any], refs_in: Callable[[Any], Iterable[str]]) -> None:
    """
    Refuse a node that passes anything but an integer computed from sizes as a size.

    ``nodes`` are :class:`rrto_wire.program.ProgramNode` in program order,
    ``refs_in`` yields the value names an encoded argument refers to.  An
    integer value is the result of ``sym_size``/``sym_numel``, or of integer
    arithmetic whose operands are integer values or constants.  Every
    reference an operator receives in a non-tensor argument must name one.
    """
    integers: set[str] = set()
    for node in nodes:
        if node.fn in (torch.ops.aten.sym_size.int, torch.ops.aten.sym_numel.default):
            integers.add(node.name)
            continue
        if node.fn is _GETITEM:
            continue
        if node.fn is program_chain.guard:
            program_chain.check_guard(node.args)
        if getattr(node.fn, '_schema', None) is None:
            if node.refs - integers:     # on a tensor it would escape cost()'s sizing
                raise ProtocolError(
                    ErrorCode.UNSAFE_PROGRAM,
                    f'invalid program: node {node.name[:80]!r} applies a Python operator to '
                    f'{sorted(node.refs - integers)[0][:80]!r}, which is not a size: in a '
                    'program whose sizes depend on the data, tensors go through ATen operators')
            if node.fn in _ARITHMETIC or node.fn in (torch.sym_min, torch.sym_max):
                integers.add(node.name)
            continue
        for arg, value in ops.size_arguments(node.fn, node.args, node.kwargs):
            refs = set(refs_in(value))
            if refs - integers:
                raise ProtocolError(
                    ErrorCode.UNSAFE_PROGRAM,
                    f'invalid program: node {node.name[:80]!r} takes its {arg.name!r} from '
                    f'{sorted(refs - integers)[0][:80]!r}, which is not a size: sizes follow '
                    'from the sizes of tensors, never from their values')


def cost(fn: Callable, args: tuple, kwargs: dict, device: torch.device) -> tuple[int, int, int]:
    """
    Return (bytes, flops, elements) of calling ``fn`` on arguments of these sizes, before it runs.

    Whatever its values: the bytes it allocates (outputs, workspace; a view
    none), the FLOPs of matrix products and convolutions (torch's formulas),
    and the elements it touches: each of each tensor it reads (a view at its
    logical numel), each it writes, what it computes beyond (:func:`_beyond_one_pass`).
    Shapes from meta tensors or the broadcast; a boolean mask counts as all
    set, a data-dependent operator at its most rows (``nonzero``: ``numel x
    dim`` int64; NMS its pairwise mask on CUDA).  UNSAFE_PROGRAM if unsizable.
    """
    if costs_nothing(fn):
        return 0, 0, 0
    tensors = [t for t in torch.utils._pytree.tree_leaves((args, kwargs))
               if isinstance(t, torch.Tensor)]
    read = sum(t.numel() for t in tensors)
    if fn in _ROW_PER_ELEMENT:    # unique: values, inverse and counts, numel each at most
        rows = tensors[0].numel() * (3 if fn is _UNIQUE else max(1, tensors[0].dim()))
        return rows * 8, 0, read + rows * (max(1, rows).bit_length() if fn is _UNIQUE else 1)
    if fn is _torchvision('nms'):
        n = tensors[0].shape[0]
        mask = n * -(-n // 64) * 8 if device.type == 'cuda' else n   # suppressed, per pair
        return mask + n * 32, 0, read + n * n  # + sorted scores, order, areas, kept indices
    masks = sum(t.numel() * t.dim() * 8 for t in tensors if t.dtype in (torch.bool, torch.uint8)
                ) if fn in (_index_masked, *_SAME_SIZE) else 0   # nonzero of each mask
    if fn in _SAME_SIZE:          # index_put: a copy of its input, or in place
        written = tensors[0].numel() * tensors[0].element_size()
        return masks + (written if fn is _index_put_clamped else 0), 0, read + tensors[0].numel()
    if getattr(fn, 'overloadpacket', None) in _SAME_SHAPE:   # its input's shape (no meta: ms)
        return tensors[0].numel() * 8, 0, read + tensors[0].numel()   # at most int64/double
    if torch.Tag.pointwise in getattr(fn, 'tags', ()):   # broadcast (a meta kernel: ms)
        numel = math.prod(torch.broadcast_shapes(*(t.shape for t in tensors)))
        itemsize = max([4] + [t.element_size() for t in tensors])  # type promotion's widest
        return (0 if _returns_view(fn) else numel * itemsize), 0, read + numel
    try:     # not in inference mode: matmul, linear, einsum reach the mode as mm, addmm...
        with torch.inference_mode(False), _FlopCount() as counted:
            meta = torch.utils._pytree.tree_map(_meta, (args, kwargs))
            if fn is _index_masked:       # the most a mask can select: every element
                fn, meta = torch.ops.aten.index.Tensor, (
                    (meta[0][0], _masks_as_indices(meta[0][1])), meta[1])
            outputs = fn(*meta[0], **meta[1])
    except Exception as exc:  # noqa: B902 - any failure to size it refuses it
        raise ProtocolError(ErrorCode.UNSAFE_PROGRAM,
                            f'{_NAMES.get(fn, str(fn))[:80]}: its output size cannot be '
                            f'computed before it runs ({type(exc).__name__}), which a program '
                            'whose sizes depend on the data needs') from None
    leaves = [t for t in torch.utils._pytree.tree_leaves(outputs) if isinstance(t, torch.Tensor)]
    numel = sum(t.numel() for t in leaves)
    nbytes = 0 if _returns_view(fn) else sum(t.numel() * t.element_size() for t in leaves)
    extra = _beyond_one_pass(fn, args, kwargs, leaves)
    return masks + nbytes, counted.flops, read + numel + extra


# per output element: a pool's window (adaptive ones tile their input: read once), a
# resampling's taps (antialiased: ~4 more per input element), RoIAlign's sampling_ratio^2
# bilinear samples; a sort compares each element log2(n) times
_WINDOWED = {getattr(torch.ops.aten, f'{kind}_pool{d}d'): d for kind in ('max', 'avg')
             for d in (1, 2, 3)} | {torch.ops.aten.max_pool2d_with_indices: 2}
_TAPS = {getattr(torch.ops.aten, name): taps for name, taps in (
    ('upsample_linear1d', 2), ('upsample_bilinear2d', 4), ('_upsample_bilinear2d_aa', 16),
    ('upsample_bicubic2d', 16), ('grid_sampler', 16), ('grid_sampler_2d', 16))}
_SORTING = frozenset((torch.ops.aten.sort, torch.ops.aten.topk))


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
            4 * first.numel() if packet is torch.ops.aten._upsample_bilinear2d_aa else 0)
    if packet in _SORTING:
        size = first.shape[given.get('dim', -1)] if first.dim() else 1
        return first.numel() * max(1, size).bit_length()
    kernel = given['kernel_size']
    kernel = [kernel] if isinstance(kernel, int) else list(kernel)
    return outputs[0].numel() * math.prod(kernel * _WINDOWED[packet] if len(kernel) == 1
                                          else kernel)


def costs_nothing(fn: Callable) -> bool:
    """Return True for an operator on sizes, a Python operator (on sizes) or a view."""
    if is_size_op(fn) or getattr(fn, '_schema', None) is None:
        return True
    return _returns_view(fn) and not any(arg.alias_info is not None and arg.alias_info.is_write
                                         for arg in fn._schema.arguments)


def _returns_view(fn: Callable) -> bool:
    """Return True when ``fn``'s schema says it returns a view of an argument (no memory)."""
    return any(ret.alias_info is not None for ret in fn._schema.returns)


class _FlopCount(TorchDispatchMode):
    """Sum torch's flop formulas over the ATen calls an operator makes on meta tensors."""

    def __enter__(self) -> '_FlopCount':
        self.flops = 0
        return super().__enter__()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        formula = flop_registry.get(func.overloadpacket)
        if formula is not None:
            self.flops += formula(*args, **kwargs, out_val=out)
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
    if isinstance(value, torch.Tensor):
        return torch.empty(value.shape, dtype=value.dtype, device='meta')
    if isinstance(value, torch.device):
        return torch.device('meta')
    return value
