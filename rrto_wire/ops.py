"""
Which operators a received graph may name, and how names map to callables.

A program or a naive-mode request names operators as strings.  The server
resolves them only through this allowlist: ATen operator overloads
(``aten.<op>.<overload>``) except those that touch files or raw storage, and a
few Python operators that export graphs use (``operator.getitem`` and integer
arithmetic on sizes).  Nothing else can be called, so a request can never run
arbitrary Python.
"""

from __future__ import annotations

import operator
from typing import Any, Callable

import torch

from rrto_wire.errors import ErrorCode, ProtocolError

_PY_OPS: dict[str, Callable] = {
    f'operator.{name}': getattr(operator, name)
    for name in ('getitem', 'add', 'sub', 'mul', 'floordiv', 'truediv', 'mod', 'neg', 'pow',
                 'eq', 'ne', 'lt', 'le', 'gt', 'ge')
}
_NAME_OF_PY_OP = {fn: name for name, fn in _PY_OPS.items()}

# ATen operators that read or write files, print, or alias raw storage.
_DENIED_ATEN = frozenset({'from_file', '_print', 'set_', 'save', 'record_stream'})


def resolve(name: Any) -> Callable:
    """Return the callable for an allowed operator name, else raise ProtocolError."""
    if not isinstance(name, str):
        raise ProtocolError(ErrorCode.BAD_REQUEST, f'operator name must be a string, got {name!r}')
    if name in _PY_OPS:
        return _PY_OPS[name]
    parts = name.split('.')
    if len(parts) != 3 or parts[0] != 'aten' or not all(parts):
        raise ProtocolError(ErrorCode.BAD_REQUEST,
                            f'operator {name!r} is not an allowed ATen operator')
    if parts[1] in _DENIED_ATEN:
        raise ProtocolError(ErrorCode.BAD_REQUEST,
                            f'operator {name!r} is not allowed on this server')
    try:
        packet = getattr(torch.ops.aten, parts[1])
        overload = getattr(packet, parts[2])
    except (AttributeError, RuntimeError):
        raise ProtocolError(ErrorCode.BAD_REQUEST, f'unknown operator {name!r}') from None
    if not isinstance(overload, torch._ops.OpOverload):
        raise ProtocolError(ErrorCode.BAD_REQUEST, f'{name!r} is not an operator overload')
    return overload


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
