"""
Argument checks for allowed operators whose kernels trust one argument's size or code.

Some native kernels index one argument by another argument's size and never
check that the first is that long: ``_native_batch_norm_legit_no_training``
and ``native_batch_norm`` (training off) read ``weight[c]``, ``bias[c]``,
``running_mean[c]`` and ``running_var[c]`` for every channel ``c`` of the
input, so a 1-element ``running_mean`` under C channels reads C*4 bytes of the
server's heap, which the result hands to the client (a15 #1).  Others take an
integer code or a scale and trust it: ``grid_sampler(_2d)`` with an
interpolation or padding mode it does not know returns its output unwritten
(freed heap bytes), and ``_upsample_bilinear2d_aa`` with a scale that does not
match its output size computes a window past the input (SIGSEGV on CPU);
``scaled_dot_product_attention`` on CPU reads as many key rows as the value
has.  The meta kernels of these operators do not check either, and a sandbox trial
does not see a read that does not fault.

:func:`checked` wraps such an overload: the wrapper checks the arguments'
shapes, dtypes and codes (Python integer comparisons, no device sync, so a
CUDA graph captures only the kernel) and raises ``UNSAFE_PROGRAM`` before the
kernel runs; it keeps the overload's ``_schema``, ``overloadpacket`` and
``tags``, so the alias, cost and pricing rules see the operator it runs.
Every other allowed operator with more than one tensor argument (or an index
in its arguments) checks them in its own kernel: ``test/test_security_a15_ops.py``
calls each one with a too-short argument and requires an error, and fails for
an allowed overload it has no case for.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Callable

import torch

from rrto_wire.errors import ErrorCode, ProtocolError

_HALF = (torch.float16, torch.bfloat16)


def _refuse(op: str, message: str) -> ProtocolError:
    return ProtocolError(ErrorCode.UNSAFE_PROGRAM, f'{op}: {message}')


def _per_channel(op: str, input: Any, vectors: dict[str, Any]) -> None:
    """Require each given vector to be 1-D with one element per channel of ``input``."""
    if not isinstance(input, torch.Tensor) or input.dim() < 2:
        raise _refuse(op, 'its input needs a channel dimension (at least 2-D)')
    channels = input.shape[1]
    for name, vector in vectors.items():
        if vector is None:
            continue
        if vector.dim() != 1 or vector.shape[0] != channels:
            raise _refuse(op, f'{name} has shape {list(vector.shape)[:8]}, the input has '
                              f'{channels} channels (a per-channel vector of {channels} is read)')
        mixed = input.dtype in _HALF and vector.dtype == torch.float32   # torch's one mix
        if vector.dtype != input.dtype and not mixed:
            raise _refuse(op, f'{name} is {vector.dtype}, the input {input.dtype}')
        if vector.device != input.device:
            raise _refuse(op, f'{name} is on {vector.device}, the input on {input.device}')


_NORM_VECTORS = ('weight', 'bias', 'running_mean', 'running_var')


def _check_norm(op: str, given: dict) -> None:
    _per_channel(op, given.get('input'),
                 {name: given.get(name) for name in _NORM_VECTORS if name in given})


def _check_group_norm(op: str, given: dict) -> None:
    _per_channel(op, given.get('input'), {'weight': given.get('weight'),
                                          'bias': given.get('bias')})


# grid_sampler's codes: interpolation bilinear, nearest, bicubic; padding zeros, border,
# reflection (torch.nn.functional.grid_sample); any other leaves the output unwritten
_GRID_MODES = {'interpolation_mode': range(3), 'padding_mode': range(3)}


def _check_grid_sampler(op: str, given: dict) -> None:
    for name, allowed in _GRID_MODES.items():
        code = given.get(name)
        if type(code) is not int or code not in allowed:
            raise _refuse(op, f'{name} {str(code)[:20]} is not one of {list(allowed)}')


def _check_upsample(op: str, given: dict) -> None:
    """Require each scale a ``.default`` upsample passes to give its output size."""
    input, sizes = given.get('self', given.get('input')), given.get('output_size')
    if not isinstance(input, torch.Tensor) or not isinstance(sizes, (list, tuple)):
        return           # ``.vec``: torch computes the size from the scales itself
    names = {1: ('scales',), 2: ('scales_h', 'scales_w')}.get(len(sizes), ())
    scales = [given.get(name) for name in names]
    spatial = list(input.shape[input.dim() - len(sizes):])
    for size, out, scale in zip(spatial, sizes, scales):
        if scale is None:
            continue
        if not (isinstance(scale, (int, float)) and math.isfinite(scale) and scale > 0
                and abs(out - size * scale) < 1):
            raise _refuse(op, f'scale {str(scale)[:20]} does not map {size} to its output '
                              f'size {out} (the kernel reads at index / scale)')


def _check_attention(op: str, given: dict) -> None:
    """
    Require key and value to hold the same positions, and the query's batch and width.

    The CPU kernel takes the number of positions from ``value`` and reads that
    many rows of ``key`` (and the reverse): a key shorter than the value is
    read past its end.
    """
    query, key, value = (given.get(name) for name in ('query', 'key', 'value'))
    if not all(isinstance(t, torch.Tensor) and t.dim() >= 2 for t in (query, key, value)):
        raise _refuse(op, 'query, key and value are tensors of at least 2 dimensions')
    if not query.dim() == key.dim() == value.dim():
        raise _refuse(op, 'query, key and value have different numbers of dimensions')
    if key.shape[-2] != value.shape[-2] or key.shape[-1] != query.shape[-1]:
        raise _refuse(op, f'key {list(key.shape)} and value {list(value.shape)} must hold '
                          f'the same positions, of the query\'s width {query.shape[-1]}')
    lead = list(query.shape[:-2])
    for name, t in (('key', key), ('value', value)):
        theirs = list(t.shape[:-2])
        if given.get('enable_gqa') and len(lead) >= 1 and theirs[-1] and \
                lead[-1] % theirs[-1] == 0:   # grouped heads: the query's are a multiple
            theirs[-1] = lead[-1]
        if theirs != lead:
            raise _refuse(op, f'{name} {list(t.shape)} does not have the batch and heads of '
                              f'the query {list(query.shape)}')


_CHECKS: dict[str, Callable[[str, dict], None]] = {
    'scaled_dot_product_attention': _check_attention,
    '_native_batch_norm_legit_no_training': _check_norm,
    'native_batch_norm': _check_norm,
    'batch_norm': _check_norm,
    'instance_norm': _check_norm,
    'native_group_norm': _check_group_norm,
    'group_norm': _check_group_norm,
    'grid_sampler': _check_grid_sampler,
    'grid_sampler_2d': _check_grid_sampler,
    **{name: _check_upsample for name in (
        'upsample_nearest1d', 'upsample_nearest2d', 'upsample_bilinear2d', 'upsample_bicubic2d',
        'upsample_linear1d', '_upsample_nearest_exact2d', '_upsample_bilinear2d_aa')},
}


def has_check(overload: torch._ops.OpOverload) -> bool:
    """Return True if :func:`checked` wraps ``overload``."""
    return overload._schema.name.split('::')[-1] in _CHECKS


@functools.lru_cache(maxsize=None)
def checked(overload: torch._ops.OpOverload) -> Callable:
    """Return ``overload``, or a wrapper checking its arguments first (one per overload)."""
    packet = overload._schema.name.split('::')[-1]
    check = _CHECKS.get(packet)
    if check is None:
        return overload
    names = [arg.name for arg in overload._schema.arguments]
    op = f'aten.{packet}.{overload._overloadname}'

    def call(*args: Any, **kwargs: Any) -> Any:
        check(op, {**dict(zip(names, args)), **kwargs})
        return overload(*args, **kwargs)

    call.__name__ = call.__qualname__ = f'checked_{packet}_{overload._overloadname}'
    call._schema = overload._schema
    call.overloadpacket = overload.overloadpacket
    call.tags = overload.tags
    call._overloadname = overload._overloadname
    return call
