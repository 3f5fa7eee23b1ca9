"""
Flatten nested inputs/outputs to a tensor list and back, with a JSON spec.

A model may take and return tensors inside tuples, lists and dicts.  Only the
flat tensor list travels; both sides hold the JSON-serialisable spec that
rebuilds the structure, so an offloaded call returns exactly the structure a
local call returns.  Non-tensor leaves (None, numbers, strings) are kept in the
spec as constants.
"""

from __future__ import annotations

from typing import Any

import torch

_CONST_TYPES = (type(None), bool, int, float, str)


def flatten(obj: Any) -> tuple[list[torch.Tensor], Any]:
    """Return the tensors of ``obj`` in depth-first order and the spec to rebuild it."""
    leaves: list[torch.Tensor] = []
    return leaves, _flatten(obj, leaves)


def _flatten(obj: Any, leaves: list) -> Any:
    if isinstance(obj, torch.Tensor):
        leaves.append(obj)
        return 'T'
    if isinstance(obj, tuple) and hasattr(obj, '_fields'):
        raise TypeError(f'namedtuple {type(obj).__name__} is not supported; return a dict')
    if isinstance(obj, (tuple, list)):
        tag = 'tuple' if isinstance(obj, tuple) else 'list'
        return {tag: [_flatten(item, leaves) for item in obj]}
    if isinstance(obj, dict):
        if not all(isinstance(k, str) for k in obj):
            raise TypeError('only dicts with string keys are supported')
        return {'dict': [[k, _flatten(v, leaves)] for k, v in obj.items()]}
    if isinstance(obj, _CONST_TYPES):
        return {'const': obj}
    raise TypeError(f'cannot carry a {type(obj).__name__} across the wire')


def unflatten(leaves: list, spec: Any) -> Any:
    """Rebuild the structure described by ``spec`` from a flat leaf list."""
    if spec == 'T' and len(leaves) == 1:    # one tensor: most models' outputs
        return leaves[0]
    it = iter(leaves)
    result = _unflatten(it, spec)
    if next(it, None) is not None:
        raise ValueError('more leaves than the spec holds')
    return result


def _unflatten(it, spec: Any) -> Any:
    if spec == 'T':
        try:
            return next(it)
        except StopIteration:
            raise ValueError('fewer leaves than the spec holds') from None
    if not isinstance(spec, dict) or len(spec) != 1:
        raise ValueError(f'malformed tree spec {spec!r}')
    (tag, body), = spec.items()
    if tag == 'tuple':
        return tuple(_unflatten(it, s) for s in body)
    if tag == 'list':
        return [_unflatten(it, s) for s in body]
    if tag == 'dict':
        return {k: _unflatten(it, s) for k, s in body}
    if tag == 'const':
        return body
    raise ValueError(f'unknown tree spec tag {tag!r}')


def count_leaves(spec: Any) -> int:
    """Return how many tensors a spec holds."""
    if spec == 'T':
        return 1
    if not isinstance(spec, dict) or len(spec) != 1:
        raise ValueError(f'malformed tree spec {spec!r}')
    (tag, body), = spec.items()
    if tag in ('tuple', 'list'):
        return sum(count_leaves(s) for s in body)
    if tag == 'dict':
        return sum(count_leaves(s) for _, s in body)
    return 0
