"""
The operators of a data-dependent program, and the rule that keeps its sizes bounded.

A detector's stages hold operators whose output size depends on the data
(``nonzero``, boolean-mask indexing, ``masked_select``, NMS).  Captured with
unbacked sizes (``torch._dynamo.config.capture_dynamic_output_shape_ops``),
such a stage exports as one graph; its program says ``"dynamic": true`` and
the server runs it op by op, unrecorded (a CUDA graph replays fixed shapes),
under the same allowlist as any program (:mod:`rrto_wire.ops`) plus:

* **bounded operators** (:data:`BOUNDED`): each returns at most as many
  elements as one of its inputs holds, whatever the values: ``nonzero``,
  ``where(condition)``, ``masked_select``, ``index`` with boolean masks, and
  ``torchvision::nms`` where the server has torchvision;
* **size operators** (:data:`SIZE_OPS`): a tensor's size (``sym_size``,
  ``sym_numel``), integer arithmetic on sizes (``operator.*``, ``sym_min``,
  ``sym_max``), and the assertions export writes about them;
* **indexed writes** (``index_put``) with their indices clamped into range,
  as ``index`` and ``gather`` are for every program.

:func:`check_sizes` is the rule: a node may pass a value where an operator
takes a size (a non-tensor argument) only if that value is an integer
computed from tensor sizes by the size operators.  No operator turns tensor
values into an integer (``item``, ``_local_scalar_dense``,
``repeat_interleave`` with tensor repeats are not allowed), so every size in
the program is a function of the sizes of its inputs and of bounded outputs.
How large such a size may grow at run time is checked node by node before it
is allocated: :func:`check_output`, used by the server's runner.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Iterable

import torch

from rrto_wire import ops
from rrto_wire.errors import ErrorCode, ProtocolError


def _index_masked(tensor: torch.Tensor, indices: list) -> torch.Tensor:
    """``aten.index.Tensor``: boolean masks as they are, integer indices clamped into range."""
    fixed, dim = [], 0
    for index in indices:
        if index is not None and index.dtype in (torch.bool, torch.uint8):
            dim += index.dim()
        elif index is not None and index.numel():
            size = tensor.shape[dim] if dim < tensor.dim() else 0
            if size == 0:
                raise IndexError(f'index into dimension {dim} of size 0')
            index = index.clamp(-size, size - 1)
            dim += 1
        else:
            dim += 1
        fixed.append(index)
    return torch.ops.aten.index.Tensor(tensor, fixed)


def _clamped_indices(tensor: torch.Tensor, indices: list) -> list:
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


def _roi_align_clamped(input: torch.Tensor, rois: torch.Tensor, spatial_scale: float,
                       pooled_height: int, pooled_width: int, sampling_ratio: int,
                       aligned: bool) -> torch.Tensor:
    """``torchvision::roi_align`` with each RoI's batch index clamped into the batch."""
    if rois.numel() and input.shape[0]:
        rois = torch.cat([rois[:, :1].clamp(0, input.shape[0] - 1), rois[:, 1:]], 1)
    return torch.ops.torchvision.roi_align.default(
        input, rois, spatial_scale, pooled_height, pooled_width, sampling_ratio, aligned)


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

# operators whose output holds at most as many elements as one of their inputs
BOUNDED: dict[str, Callable] = {
    'aten.nonzero.default': torch.ops.aten.nonzero.default,
    'aten.where.default': torch.ops.aten.where.default,
    'aten.masked_select.default': torch.ops.aten.masked_select.default,
    'aten.index.Tensor': _index_masked,
}
# sizes of tensors, integer arithmetic on them, and export's assertions about them
SIZE_OPS: dict[str, Callable] = {
    'aten.sym_size.int': torch.ops.aten.sym_size.int,
    'aten.sym_numel.default': torch.ops.aten.sym_numel.default,
    'aten._assert_scalar.default': torch.ops.aten._assert_scalar.default,
    'aten.sym_constrain_range_for_size.default':
        torch.ops.aten.sym_constrain_range_for_size.default,
    'torch.sym_min': torch.sym_min, 'torch.sym_max': torch.sym_max,
}
_ARITHMETIC = frozenset(ops.resolve(f'operator.{name}') for name in (
    'add', 'sub', 'mul', 'floordiv', 'mod', 'neg', 'eq', 'ne', 'lt', 'le', 'gt', 'ge'))
_WRITES = {'aten.index_put.default': _index_put_clamped,
           'aten.index_put_.default': _index_put_clamped_}
_TORCHVISION = {'torchvision.nms.default': ('nms', None),
                'torchvision.roi_align.default': ('roi_align', _roi_align_clamped)}
_NAMES = {fn: name for name, fn in {**BOUNDED, **SIZE_OPS, **_WRITES}.items()}
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
    for table in (BOUNDED, SIZE_OPS, _WRITES):
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


def is_bounded(fn: Callable) -> bool:
    """Return True for a bounded operator (its output is no larger than an input)."""
    return fn in _BOUNDED_FNS or fn is _torchvision('nms')


def is_size_op(fn: Callable) -> bool:
    """Return True for an operator on sizes (its result is an integer, a bool or nothing)."""
    return fn in _SIZE_FNS or fn in _ARITHMETIC


_BOUNDED_FNS = frozenset(BOUNDED.values())
_SIZE_FNS = frozenset(SIZE_OPS.values())


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
        if node.fn in _ARITHMETIC or node.fn in (torch.sym_min, torch.sym_max):
            if node.refs <= integers:
                integers.add(node.name)
            continue
        if getattr(node.fn, '_schema', None) is None:
            continue
        for arg, value in ops.size_arguments(node.fn, node.args, node.kwargs):
            refs = set(refs_in(value))
            if refs - integers:
                raise ProtocolError(
                    ErrorCode.UNSAFE_PROGRAM,
                    f'invalid program: node {node.name[:80]!r} takes its {arg.name!r} from '
                    f'{sorted(refs - integers)[0][:80]!r}, which is not a size: sizes follow '
                    'from the sizes of tensors, never from their values')


def check_output(fn: Callable, args: tuple, kwargs: dict, max_bytes: int) -> None:
    """
    Refuse to run ``fn`` if its outputs would hold more than ``max_bytes``.

    The output shapes come from running ``fn`` on meta tensors of the same
    shapes (nothing is allocated); bounded and size operators are not
    checked (their outputs are no larger than their inputs, or are integers).
    """
    if is_bounded(fn) or is_size_op(fn) or getattr(fn, '_schema', None) is None:
        return
    meta = torch.utils._pytree.tree_map(_meta, (args, kwargs))
    try:
        outputs = fn(*meta[0], **meta[1])
    except NotImplementedError:
        raise ProtocolError(ErrorCode.UNSAFE_PROGRAM,
                            f'{_NAMES.get(fn, str(fn))[:80]} has no shape function: it cannot '
                            'run in a program whose sizes depend on the data') from None
    nbytes = sum(t.numel() * t.element_size()
                 for t in torch.utils._pytree.tree_leaves(outputs) if isinstance(t, torch.Tensor))
    if nbytes > max_bytes:
        raise ProtocolError(ErrorCode.UNSAFE_PROGRAM,
                            f'{str(fn)[:80]} would allocate {nbytes} bytes at this input: over '
                            f'the {max_bytes} one operator of a data-dependent program may')


def _meta(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return torch.empty(value.shape, dtype=value.dtype, device='meta')
    if isinstance(value, torch.device):
        return torch.device('meta')
    return value
