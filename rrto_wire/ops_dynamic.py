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
(:func:`rrto_wire.ops_cost.cost`: every operator but the pure views); the server's runner
(:class:`rrto_server.runner_fx.DynamicRunner`) holds each execution to the
sandbox's budgets with it: the bytes alive at once, the work of the call.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable

import torch

from rrto_wire import ops, ops_cost, program_chain
from rrto_wire.errors import ErrorCode, ProtocolError
from rrto_wire.ops_substitutes import (MAX_SAMPLING_RATIO, MAX_SPATIAL_SCALE,  # noqa: F401
                                       index_masked, index_put_clamped, index_put_clamped_,
                                       roi_align_checked, rois_in_range, torchvision_op)


# operators whose output size depends on the values of their inputs
DATA_DEPENDENT: dict[str, Callable] = {
    'aten.nonzero.default': torch.ops.aten.nonzero.default,
    'aten.where.default': torch.ops.aten.where.default,
    'aten.index.Tensor': index_masked,
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
# what a size computed at run time may be (integer arithmetic on sizes is Python's, without
# bound: 40 squarings of 2 are a 2^40-bit integer; a16 #1); a guard's constants alike
MAX_SIZE_VALUE = program_chain.MAX_CONSTANT
_GETITEM = ops.resolve('operator.getitem')     # picks one value of a tuple (where, nms...)
_TRUEDIV, _POW = ops.resolve('operator.truediv'), ops.resolve('operator.pow')
MAX_EXPONENT = 8            # pow on sizes: a constant exponent (sympy's u0**2), at most this
_ARITHMETIC = frozenset(ops.resolve(f'operator.{name}') for name in (
    'add', 'sub', 'mul', 'floordiv', 'mod', 'neg', 'eq', 'ne', 'lt', 'le', 'gt', 'ge'))
_WRITES = {'aten.index_put.default': index_put_clamped,
           'aten.index_put_.default': index_put_clamped_}
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
        if torchvision_op(op_name) is None:
            raise ProtocolError(ErrorCode.BAD_REQUEST,
                                f'operator {name!r} is not available on this server '
                                '(no torchvision)')
        op = torchvision_op(op_name)
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
        if target is not None and target is torchvision_op(op_name):
            return name
    return ops.name_of(target)


def varies(fn: Callable) -> bool:
    """Return True for a data-dependent operator (its output size follows the values)."""
    return fn in _DATA_DEPENDENT_FNS or fn is torchvision_op('nms')


def is_size_op(fn: Callable) -> bool:
    """Return True for an operator on sizes (its result is an integer, a bool or nothing)."""
    return fn in _SIZE_FNS or fn in _ARITHMETIC


_DATA_DEPENDENT_FNS = frozenset(DATA_DEPENDENT.values())
_SIZE_FNS = frozenset(SIZE_OPS.values())


def cost(fn: Callable, args: tuple, kwargs: dict, device: torch.device) -> tuple[int, int, int]:
    """Return (bytes, flops, elements) of ``fn`` before it runs (:mod:`rrto_wire.ops_cost`)."""
    return (0, 0, 0) if is_size_op(fn) else ops_cost.cost(fn, args, kwargs, device)


def costs_nothing(fn: Callable) -> bool:
    """Return True for a size operator, a Python operator (on sizes) or a pure view."""
    return is_size_op(fn) or ops_cost.costs_nothing(fn)


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
            if node.fn is not program_chain.guard:
                _check_arithmetic(node)
                if node.fn is not _TRUEDIV:      # a float: never a size
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


def _check_arithmetic(node: Any) -> None:
    """
    Refuse a Python operator unless it is arithmetic on integers of a size's range (a16 #5).

    Python computes on any value without bound (``'x' * n``, ``[0] * n``,
    ``n ** n``): allowed are :data:`_ARITHMETIC`, ``sym_min``, ``sym_max``,
    ``truediv`` (a float, never a size) and ``pow`` with a constant exponent of
    at most :data:`MAX_EXPONENT` (a square in an assertion export wrote), each
    argument a size value or an integer constant within :data:`MAX_SIZE_VALUE`;
    each integer result is held to that bound as it runs
    (:class:`rrto_server.runner_budget.CheckedInterpreter`).
    """
    allowed = node.fn in _ARITHMETIC or node.fn in (torch.sym_min, torch.sym_max, _TRUEDIV) or (
        node.fn is _POW and len(node.args) == 2 and type(node.args[1]) is int
        and 0 <= node.args[1] <= MAX_EXPONENT)
    if not allowed:
        raise ProtocolError(
            ErrorCode.UNSAFE_PROGRAM,
            f'invalid program: node {node.name[:80]!r} ({node.op[:40]}): in a program whose '
            'sizes depend on the data, a Python operator is integer arithmetic on sizes '
            f'(add, sub, mul, floordiv, truediv, mod, neg, comparisons, sym_min, sym_max, '
            f'pow to a constant of at most {MAX_EXPONENT})')
    for arg in node.args:
        if isinstance(arg, dict) and set(arg) == {'n'}:
            continue
        if type(arg) not in (int, bool) or not -MAX_SIZE_VALUE <= arg <= MAX_SIZE_VALUE:
            raise ProtocolError(
                ErrorCode.UNSAFE_PROGRAM,
                f'invalid program: node {node.name[:80]!r} ({node.op[:40]}) takes '
                f'{type(arg).__name__} {str(arg)[:40]!r}: size arithmetic takes sizes and '
                f'integer constants within 2^{MAX_SIZE_VALUE.bit_length() - 1}')
