"""
A static program's shapes, propagated on meta tensors before any kernel runs.

Defence in depth for a15 #1's class: a kernel that indexes one argument by
another's size, when the operator's meta kernel checks what the native one
does not (``scaled_dot_product_attention``'s key and value lengths on CPU,
``grid_sampler``'s modes).  :func:`check` calls every node of a static
program once, on meta tensors of the program's input specs and of its
weights' shapes (through the same checked callables the server runs,
:mod:`rrto_wire.ops_checked`), and compares each node's result with the
shape the program declares for it.  A meta kernel that refuses the arguments,
or a result of another shape than declared, refuses the program
(``UNSAFE_PROGRAM``); an operator without a meta kernel takes its declared
shape.  Python operators other than ``getitem`` are not run here (their
values are the trial's to bound); every factory makes meta tensors too (no
memory is ever allocated here).  Dynamic programs are sized on meta tensors
node by node as they run (:func:`rrto_wire.ops_dynamic.cost`), not here.
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from rrto_wire import ops
from rrto_wire.dtypes import torch_dtype
from rrto_wire.errors import ErrorCode, ProtocolError

META = torch.device('meta')
_UNKNOWN = object()     # a value whose shape is not known here (no meta kernel, no declared)
# torch sets up meta dispatch on its first meta call (it imports torch._dynamo: ~1 s on a
# loaded VM).  Done here, at import: the sandbox's forkserver imports this module once, so
# each trial child forked from it does not pay that second against its key's budgets.
torch.ops.aten.add.Tensor(torch.empty(1, device=META), 1.0)


def _meta(spec: Any) -> torch.Tensor:
    return torch.empty(tuple(spec.shape), dtype=torch_dtype(spec.dtype), device=META)


def _has_unknown(value: Any) -> bool:
    if isinstance(value, (list, tuple)):
        return any(_has_unknown(item) for item in value)
    return value is _UNKNOWN


def check(program: Any, weights: dict[str, torch.Tensor],
          decode: Callable[[Any, Callable[[str], Any], torch.device], Any]) -> None:
    """Run ``program``'s nodes on meta tensors; raise UNSAFE_PROGRAM where shapes do not fit."""
    env: dict[str, Any] = {name: _meta(spec) for name, spec in program.inputs}
    for name, key in program.params.items():
        if key in weights:
            value = weights[key]
            env[name] = torch.empty(value.shape, dtype=value.dtype, device=META)

    def lookup(name: str) -> Any:
        return env.get(name, _UNKNOWN)

    with torch.inference_mode(False):
        for node in program.nodes:
            args = decode(node.args, lookup, META)
            kwargs = {k: decode(v, lookup, META) for k, v in node.kwargs.items()}
            if _has_unknown((args, list(kwargs.values()))):
                env[node.name] = _meta(node.out) if node.out is not None else _UNKNOWN
                continue
            if getattr(node.fn, '_schema', None) is None and node.op != 'operator.getitem':
                env[node.name] = _UNKNOWN     # Python arithmetic: values, run under the trial's
                continue                      # limits (7 ** 10**8 would run here unbounded)
            if ops.creates_tensors(node.fn):         # a factory: on meta, whatever it names
                where = [arg.name for arg in node.fn._schema.arguments].index('device')
                if where < len(args):
                    args[where] = META
                else:
                    kwargs['device'] = META
            env[node.name] = _run(node, args, kwargs)


def _run(node: Any, args: list, kwargs: dict) -> Any:
    """Return ``node``'s result on meta tensors, checked against its declared shape."""
    try:
        result = node.fn(*args, **kwargs)
    except ProtocolError as exc:
        if exc.code == ErrorCode.UNSAFE_PROGRAM:
            raise
        return _UNKNOWN                     # the run raises it again, where it did before
    except NotImplementedError:            # no meta kernel: what the program declares
        return _meta(node.out) if node.out is not None else _UNKNOWN
    except (ValueError, IndexError, TypeError):   # a substitute's own refusal (boolean
        return _UNKNOWN                           # masks): the run raises it, as before
    except RuntimeError as exc:            # the meta kernel refuses these arguments
        result = _contiguous_retry(node, args, kwargs)
        if result is _UNKNOWN:
            raise _refused(node, exc) from None
    if node.out is not None and isinstance(result, torch.Tensor) and \
            list(result.shape) != list(node.out.shape):
        raise ProtocolError(
            ErrorCode.UNSAFE_PROGRAM,
            f'invalid program: node {node.name[:80]!r} ({node.op[:80]}) gives shape '
            f'{list(result.shape)[:8]}, the program declares {list(node.out.shape)[:8]}')
    return result


def _contiguous(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.contiguous()
    if isinstance(value, (list, tuple)):
        return type(value)(_contiguous(item) for item in value)
    return value


def _contiguous_retry(node: Any, args: list, kwargs: dict) -> Any:
    """
    Return ``node``'s result with its tensor arguments made contiguous, or _UNKNOWN.

    A meta kernel gives its output the default layout where the device's
    kernel may not (``scaled_dot_product_attention`` of transposed heads: CPU
    and CUDA keep the heads' layout, meta returns a contiguous tensor), so a
    later ``view`` that fits the device's strides may not fit meta's.  Strides
    are not what this pass checks (a view that does not fit the real strides
    is refused by its own kernel, with nothing read): the shapes are, and they
    are checked again on the contiguous arguments.
    """
    try:
        return node.fn(*_contiguous(args), **{k: _contiguous(v) for k, v in kwargs.items()})
    except Exception:   # noqa: B902 - whatever the retry raises, the first refusal stands
        return _UNKNOWN


def _refused(node: Any, exc: Exception) -> ProtocolError:
    return ProtocolError(
        ErrorCode.UNSAFE_PROGRAM,
        f'invalid program: node {node.name[:80]!r} ({node.op[:80]}): its arguments do not '
        f'fit together: {type(exc).__name__}: {str(exc)[:200]}')
