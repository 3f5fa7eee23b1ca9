"""
Which operators a received graph may name, and how names map to callables.

A program or a naive-mode request names operators as strings.  The server
resolves them only through a positive allowlist: the ATen operators that
exported inference graphs of classification, detection and segmentation
networks use (convolutions, normalisation, activations, pooling, linear
algebra, resampling, shape and pointwise operators; both the export IR and
its core-ATen decomposition), and a few Python operators on sizes and tuples.
Everything else is refused, in particular:

* operators that take indices from tensor data (``embedding``, ``scatter``,
  ``index_put``...): on CUDA an index out of range is a device-side assert
  that kills the server's CUDA context.  ``aten.index.Tensor`` (``x[idx]``)
  and ``aten.gather.default`` (detection heads use both) run with their
  integer indices clamped into range first: equal results wherever the robot's
  own run succeeds, and no kernel ever sees an index out of range (a check
  would need a device sync, which a CUDA graph cannot replay);
* sparse and quantized constructors, ``as_strided``, ``set_``, storage and file
  operators: they trust their arguments (a sparse constructor that skips index
  validation writes out of bounds; see ``docs/security.md``);
* uninitialised allocations (``empty*``): they would hand a client memory that
  another client's tensors just freed.  ``aten.empty.memory_format`` (in
  torchvision's detector subgraphs) runs zero-filled instead: a program whose
  result the robot computes never reads what it did not write;
* ``out=`` overloads: they write into an argument by design;
* overloads on Python values (``add.t`` on lists, ``eq.int_list``, ``copy.Dict_str``)
  and data-dependent output shapes (``where(condition)``, boolean masks in
  ``index``): exported inference graphs have static shapes, so every size is
  a constant of the program.  A node may therefore only be passed where the
  schema takes a tensor: a size computed from input values (a 0-d tensor in a
  ``SymInt[]``) would make the work and memory of a call depend on what a
  client sends, which the sandbox's trial run cannot see.  (A program marked
  ``dynamic`` may have such sizes, under the rules of :mod:`rrto_wire.ops_dynamic`.)

Some kernels index one argument by another's size, or trust an integer code or
a scale, without checking (batch norm's running statistics, a15 #1):
:func:`resolve` returns those overloads wrapped by :func:`rrto_wire.ops_checked.checked`,
which checks the arguments first.  A ``Device`` argument takes only the
``{"device": ...}`` tag, which means the server's device (a15 #8).

In-place overloads (``relu_``, ``add_``) stay allowed here;
:meth:`rrto_wire.program.Program` refuses any node that writes into an input,
a weight, or a view of either (see :func:`writes` and :func:`aliases`).  Some
operators return their input (or a view of it) without saying so in their
schema (``type_as``, ``dropout(train=False)``, ``einsum('i->i')``,
``meshgrid``, ``_unsafe_view``): :func:`aliases` counts them as views.  Norms
in training mode write their running statistics without an annotation, and
dropout in training mode is random: :func:`check_call` refuses both.
"""

from __future__ import annotations

import operator
from typing import Any, Callable

import torch

from rrto_wire import ops_checked
from rrto_wire.errors import ErrorCode, ProtocolError

_INPLACE_OK = (
    'abs add clamp clamp_min clamp_max copy detach div elu exp fill gelu hardsigmoid hardswish '
    'hardtanh leaky_relu log mul neg pow reciprocal relu relu6 rsqrt sigmoid silu sqrt sub '
    'tanh zero dropout masked_fill')
# packet names (``torch.ops.aten.<name>``); every non-``out`` overload of each is allowed
ALLOWED_ATEN = frozenset((
    # convolution, normalisation, linear algebra
    'conv1d conv2d conv3d conv_transpose1d conv_transpose2d convolution _convolution '
    'batch_norm _native_batch_norm_legit_no_training native_batch_norm layer_norm '
    'native_layer_norm group_norm native_group_norm instance_norm linear addmm mm bmm matmul '
    'baddbmm einsum t scaled_dot_product_attention '
    # activations and pointwise arithmetic
    'relu relu6 hardtanh hardswish hardsigmoid sigmoid silu gelu elu leaky_relu tanh mish '
    'softplus prelu _prelu_kernel softmax _softmax log_softmax _log_softmax abs neg exp log '
    'log2 sqrt rsqrt reciprocal pow add sub rsub mul div floor ceil round trunc sign erf clamp '
    'clamp_min clamp_max minimum maximum where eq ne lt le gt ge logical_and logical_or '
    'logical_not bitwise_not masked_fill '
    # pooling, resampling, padding
    'max_pool1d max_pool2d max_pool2d_with_indices max_pool3d avg_pool1d avg_pool2d '
    'avg_pool3d adaptive_avg_pool1d adaptive_avg_pool2d _adaptive_avg_pool2d '
    'adaptive_avg_pool3d _adaptive_avg_pool3d '
    'adaptive_max_pool2d upsample_nearest1d upsample_nearest2d upsample_bilinear2d '
    'upsample_bicubic2d upsample_linear1d _upsample_nearest_exact2d '
    '_upsample_bilinear2d_aa pad constant_pad_nd reflection_pad2d replication_pad2d '
    'pixel_shuffle pixel_unshuffle channel_shuffle grid_sampler grid_sampler_2d '
    'affine_grid_generator '
    # reductions
    'sum mean amax amin max min argmax argmin var std var_mean prod norm topk sort cumsum '
    'logsumexp all any '
    # shape and layout (views are checked by the alias rules, not refused)
    'view reshape _unsafe_view flatten unflatten permute transpose squeeze unsqueeze expand '
    'expand_as repeat cat concat stack split split_with_sizes chunk unbind slice select '
    'narrow contiguous clone alias detach lift_fresh_copy flip roll _to_copy to type_as '
    '_assert_tensor_metadata dropout native_dropout copy '
    # constants and ranges (initialised, sizes fixed in the program)
    'zeros zeros_like ones ones_like full full_like new_zeros new_ones new_full scalar_tensor '
    'arange linspace meshgrid fill zero'
).split()) | frozenset(f'{name}_' for name in _INPLACE_OK.split())


def _index_clamped(tensor: torch.Tensor, indices: list) -> torch.Tensor:
    """``aten.index.Tensor`` with integer indices clamped into their dimension's range."""
    fixed, dim = [], 0
    for index in indices:
        if index is None:
            dim += 1
        elif index.dtype in (torch.bool, torch.uint8):
            # a mask selects a number of elements that depends on its values
            raise ValueError('boolean mask indexing has a data-dependent output shape')
        else:
            size = tensor.shape[dim] if dim < tensor.dim() else 0
            if size == 0:
                raise IndexError(f'index into dimension {dim} of size 0')
            index = index.clamp(-size, size - 1)
            dim += 1
        fixed.append(index)
    return torch.ops.aten.index.Tensor(tensor, fixed)


_index_clamped._schema = torch.ops.aten.index.Tensor._schema     # its arguments' names


def _gather_clamped(tensor: torch.Tensor, dim: int, index: torch.Tensor, *,
                    sparse_grad: bool = False) -> torch.Tensor:
    """``aten.gather.default`` with its index clamped into ``[0, size)`` of ``dim``."""
    size = tensor.shape[dim] if tensor.dim() else 1
    if size == 0:
        raise IndexError(f'gather from dimension {dim} of size 0')
    return torch.ops.aten.gather.default(tensor, dim, index.clamp(0, size - 1),
                                         sparse_grad=sparse_grad)


_gather_clamped._schema = torch.ops.aten.gather.default._schema


def _empty_zeroed(size: list, *, dtype: Any = None, layout: Any = None, device: Any = None,
                  pin_memory: Any = None, memory_format: Any = None) -> torch.Tensor:
    """``aten.empty.memory_format``, zero-filled: no client sees memory another one freed."""
    zeros = torch.ops.aten.zeros.default(size, dtype=dtype, layout=layout, device=device,
                                         pin_memory=pin_memory)
    return zeros if memory_format is None else zeros.contiguous(memory_format=memory_format)


_empty_zeroed._schema = torch.ops.aten.empty.memory_format._schema


# operators run through a safe equivalent (see module docstring): data-dependent indexing
# with its indices clamped, an uninitialised allocation zero-filled
_CLAMPED = {'aten.index.Tensor': _index_clamped, 'aten.gather.default': _gather_clamped,
            'aten.empty.memory_format': _empty_zeroed}


def _getitem(container: Any, index: Any) -> Any:
    """``operator.getitem`` for what export graphs use it for: picking from a tuple or list."""
    if not isinstance(container, (tuple, list)):
        raise ProtocolError(ErrorCode.BAD_REQUEST,
                            'operator.getitem only indexes tuples and lists')
    return container[index]


_PY_OPS: dict[str, Callable] = {
    f'operator.{name}': getattr(operator, name)
    for name in ('add', 'sub', 'mul', 'floordiv', 'truediv', 'mod', 'neg', 'pow',
                 'eq', 'ne', 'lt', 'le', 'gt', 'ge')
}
_NAME_OF_PY_OP = {fn: name for name, fn in _PY_OPS.items()}
_PY_OPS['operator.getitem'] = _getitem
_NAME_OF_PY_OP[operator.getitem] = 'operator.getitem'


def resolve(name: Any) -> Callable:
    """Return the callable for an allowed operator name, else raise ProtocolError."""
    if not isinstance(name, str):
        raise ProtocolError(ErrorCode.BAD_REQUEST,
                            f'operator name must be a string, got {type(name).__name__}')
    if name in _PY_OPS:
        return _PY_OPS[name]
    parts = name.split('.')
    if len(parts) != 3 or parts[0] != 'aten' or not all(parts):
        raise ProtocolError(ErrorCode.BAD_REQUEST,
                            f'operator {name[:80]!r} is not an allowed ATen operator')
    try:
        overload = getattr(getattr(torch.ops.aten, parts[1]), parts[2])
    except (AttributeError, RuntimeError):
        raise ProtocolError(ErrorCode.BAD_REQUEST, f'unknown operator {name[:80]!r}') from None
    if not isinstance(overload, torch._ops.OpOverload):
        raise ProtocolError(ErrorCode.BAD_REQUEST, f'{name[:80]!r} is not an operator overload')
    if name in _CLAMPED:
        return _CLAMPED[name]
    if (parts[1] not in ALLOWED_ATEN or name in _DATA_DEPENDENT or named_tensor(parts[2])
            or _writes_out_argument(overload) or not _tensor_typed(overload)):
        raise ProtocolError(ErrorCode.BAD_REQUEST,
                            f'operator {name[:80]!r} is not allowed on this server')
    return ops_checked.checked(overload)


def named_tensor(overload_name: str) -> bool:
    """
    Return True for a named-tensor overload (``cat.names``, ``softmax.Dimname``, ...).

    Their dimension names arrive as ``str`` in the schema, so the type filter
    lets them through; torch builds without them (2.13's CPU wheel) and with
    them (2.11's CUDA wheel: ``cat.names``, ``sum.dim_DimnameList``,
    ``flatten.using_names``, ...), so which overloads an allowed packet has
    depends on the build.  No exported program uses them: every one is refused.
    """
    return 'name' in overload_name.lower()


# schema types of arguments that may receive a graph node; any other argument is a constant
_TENSOR_TYPES = frozenset(('Tensor', 'Optional[Tensor]', 'List[Tensor]',
                           'List[Optional[Tensor]]'))
# schema types an allowed overload may take (tensors and constants) and return
_ARGUMENT_TYPES = _TENSOR_TYPES | frozenset((
    'int', 'float', 'bool', 'number', 'str', 'Device', 'List[int]', 'List[float]',
    'List[bool]', 'Optional[int]', 'Optional[float]', 'Optional[bool]', 'Optional[number]',
    'Optional[str]', 'Optional[Device]', 'Optional[List[int]]', 'Optional[List[float]]'))
_RETURN_TYPES = frozenset(('Tensor', 'List[Tensor]'))
# output shape depends on input values (``where(condition)`` is ``nonzero``)
_DATA_DEPENDENT = frozenset(('aten.where.default',))


def _tensor_typed(overload: torch._ops.OpOverload) -> bool:
    """Return True if ``overload`` maps tensors and constants to tensors."""
    schema = overload._schema
    return (all(str(arg.type) in _ARGUMENT_TYPES for arg in schema.arguments)
            and all(str(ret.type) in _RETURN_TYPES for ret in schema.returns))


def _has_node(value: Any) -> bool:
    """Return True if an encoded argument refers to a graph node (``{"n": name}``)."""
    if isinstance(value, list):
        return any(_has_node(item) for item in value)
    return isinstance(value, dict) and ('n' in value or any(_has_node(v)
                                                            for v in value.values()))


def _writes_out_argument(overload: torch._ops.OpOverload) -> bool:
    return any(arg.kwarg_only and arg.alias_info is not None and arg.alias_info.is_write
               for arg in overload._schema.arguments)


def name_of(target: Any) -> str:
    """Return the wire name of a graph node's target; raise ValueError if it is not allowed."""
    if isinstance(target, torch._ops.OpOverload):
        namespace, op = target._schema.name.split('::')
        name = f'{namespace}.{op}.{target._overloadname}'
    elif target in _NAME_OF_PY_OP:
        name = _NAME_OF_PY_OP[target]
    else:
        raise ValueError(f'operator {target!r} cannot be offloaded (not an ATen operator)')
    try:
        resolve(name)
    except ProtocolError as exc:
        raise ValueError(exc.message) from None
    return name


def creates_tensors(fn: Callable) -> bool:
    """Return True for factory operators whose schema takes a ``device`` argument."""
    schema = getattr(fn, '_schema', None)
    return schema is not None and any(arg.name == 'device' for arg in schema.arguments)


def check_call(fn: Callable, args: Any, kwargs: Any, dynamic: bool = False) -> dict:
    """
    Return ``kwargs`` if ``fn`` may be called with these arguments, else raise.

    Keyword names end up as Python source in the fx module the server generates
    (``op(x, name=value)``), so a name that is not one of the operator's own
    argument names would be code injection; Python operators take no keywords
    and exactly their number of positional arguments (fx writes them as ``a + b``).
    In a ``dynamic`` program a size may be a node: :func:`rrto_wire.ops_dynamic.check_sizes`
    decides which.
    """
    if not isinstance(kwargs, dict) or not isinstance(args, list):
        raise ProtocolError(ErrorCode.BAD_REQUEST, 'arguments must be a list and an object')
    schema = getattr(fn, '_schema', None)
    allowed = {arg.name for arg in schema.arguments} if schema is not None else set()
    unknown = [key for key in kwargs if key not in allowed]
    if unknown:
        raise ProtocolError(ErrorCode.BAD_REQUEST,
                            f'{str(unknown[0])[:40]!r} is not a keyword argument of this operator')
    if schema is None and len(args) != (1 if fn is operator.neg else 2):
        raise ProtocolError(ErrorCode.BAD_REQUEST,
                            f'this Python operator takes {1 if fn is operator.neg else 2} '
                            f'arguments, got {len(args)}')
    if schema is not None:
        _check_inference_mode(fn, args, kwargs)
        if len(args) > len(schema.arguments):
            raise ProtocolError(ErrorCode.BAD_REQUEST,
                                f'this operator takes at most {len(schema.arguments)} arguments')
        for arg, value in size_arguments(fn, args, kwargs):
            _check_device(arg, value)
            if not dynamic and _has_node(value):
                raise ProtocolError(
                    ErrorCode.UNSAFE_PROGRAM,
                    f'argument {arg.name!r} ({arg.type}) is a constant of the program, not '
                    f'a value computed from its inputs (sizes are static)')
    return kwargs


_DEVICE_TYPES = frozenset(('Device', 'Optional[Device]'))


def _check_device(arg: Any, value: Any) -> None:
    """Refuse a ``Device`` argument other than null or the ``{"device": ...}`` tag."""
    if str(arg.type) in _DEVICE_TYPES and value is not None and not (
            isinstance(value, dict) and len(value) == 1 and isinstance(value.get('device'), str)):
        raise ProtocolError(ErrorCode.BAD_REQUEST,
                            f'argument {arg.name!r} is a device: only the tag {{"device": ...}} '
                            "(the server's own device) or null, not "
                            f'{str(value)[:40]!r} (a15 #8)')


# operators that may return an argument itself, or a view of it, with no alias annotation
# (found by running each allowed operator; a9's finding 7)
_RETURNS_INPUT = frozenset(('type_as', 'dropout', 'einsum', '_unsafe_view', 'meshgrid'))
# training-mode flags: a norm writes into its running statistics, dropout draws at random
_TRAINING_FLAGS = frozenset(('training', 'train', 'use_input_stats'))
_RUNNING_STATS = ('running_mean', 'running_var')


def _check_inference_mode(fn: Callable, args: list, kwargs: dict) -> None:
    """Refuse a call in training mode: it writes into running statistics or is random."""
    bound = {arg.name: value for arg, value in _bound(fn, args, kwargs)}
    for flag in _TRAINING_FLAGS & set(bound):
        if bound[flag] is False:
            continue
        if flag == 'train' or any(bound.get(name) is not None for name in _RUNNING_STATS):
            raise ProtocolError(ErrorCode.UNSAFE_PROGRAM,
                                f'{flag}={str(bound[flag])[:20]} runs the operator in training '
                                'mode (it writes its running statistics or is random); '
                                'export the model in eval mode')


def size_arguments(fn: Callable, args: list, kwargs: dict):
    """Yield (schema argument, value) for each non-tensor argument a call passes."""
    return ((arg, value) for arg, value in _bound(fn, args, kwargs)
            if str(arg.type) not in _TENSOR_TYPES)


def _bound(fn: Callable, args: list, kwargs: dict):
    """Yield (schema argument, value) for each argument a call passes."""
    for index, arg in enumerate(fn._schema.arguments):
        if index < len(args):
            yield arg, args[index]
        elif arg.name in kwargs:
            yield arg, kwargs[arg.name]


def writes(fn: Callable, args: list, kwargs: dict) -> list:
    """Return the argument values ``fn`` writes into (its schema's ``Tensor(a!)`` arguments)."""
    if getattr(fn, '_schema', None) is None:   # a Python operator (substitutes have one)
        return []
    return [value for arg, value in _bound(fn, args, kwargs)
            if arg.alias_info is not None and arg.alias_info.is_write]


def aliases(fn: Callable, args: list, kwargs: dict) -> list:
    """Return the argument values ``fn``'s result may view (alias) rather than copy."""
    if fn is _getitem:
        return args[:1]
    if getattr(fn, '_schema', None) is None:   # a Python operator (substitutes have one)
        return []
    if fn._schema.name.split('::')[-1] in _RETURNS_INPUT:
        return [value for arg, value in _bound(fn, args, kwargs)
                if str(arg.type) in _TENSOR_TYPES]
    if not any(ret.alias_info is not None for ret in fn._schema.returns):
        return []
    return [value for arg, value in _bound(fn, args, kwargs) if arg.alias_info is not None]
