"""
Chained programs: several captured graphs in one request, each after a guard on sizes.

A partitioned model (:mod:`rrto_ros.partition`) runs its captured graphs one
round trip each, because Python between them branches on sizes the server
computed (torchvision's ``batched_nms``: ``if boxes.numel() > 4000``).  When
the graphs' inputs are the earlier graphs' outputs, the robot may ask for
the next graph speculatively: one program runs link 0, then, if its
**guard** holds on the sizes link 0 produced, link 1, and so on.  The guard
is a conjunction of comparisons of one size with a constant, the shapes
dynamo specialised the next graph for (``size(boxes, 0) == 1000``):

    rrto.guard([s0, s1, ...], [["eq", 1000], ["ge", 1], ...])

with each ``s`` the result of a ``sym_size``/``sym_numel`` node
(:func:`rrto_wire.ops_dynamic.check_sizes` refuses anything else), at most
:data:`MAX_TERMS` terms, a relation from :data:`RELATIONS` and an integer
constant: evaluating it costs a few comparisons.  A guard that fails raises
:class:`GuardFailed`: the server stops the program there
(:class:`rrto_server.runner_fx.DynamicRunner`) and returns the outputs
computed so far, each later one as zeros of its declared shape, whose
guarded dimensions are 0 (empty).  The robot evaluates the same guard on
what comes back and uses a later link's outputs only if it held, and only
if its own Python then calls that graph on exactly those tensors; a wrong
guess costs the round trip the guess would have saved, never a wrong
result.  :func:`rrto_wire.program_writer.chain` writes such a program from
the links' own programs.
"""

from __future__ import annotations

import math
import operator
from typing import Any, Iterable, Sequence

import torch

from rrto_wire.errors import invalid_program

GUARD = 'rrto.guard'
MAX_TERMS = 256             # comparisons in one guard
RELATIONS = {'eq': operator.eq, 'ne': operator.ne, 'lt': operator.lt, 'le': operator.le,
             'gt': operator.gt, 'ge': operator.ge}
MAX_CONSTANT = 1 << 62      # constants: sizes, nothing near an overflow


class GuardFailed(Exception):
    """A chained program's guard did not hold: the links after it do not run."""


def guard(sizes: list, tests: list) -> None:
    """Raise :class:`GuardFailed` unless every ``sizes[i]`` relates to ``tests[i]`` as named."""
    for size, (relation, constant) in zip(sizes, tests):
        if not RELATIONS[relation](size, constant):
            raise GuardFailed(f'size {size} is not {relation} {constant}')


def check_guard(args: Any) -> None:
    """Refuse a guard node's arguments unless they are ``[refs, [[relation, int], ...]]``."""
    if not (isinstance(args, list) and len(args) == 2 and isinstance(args[0], list)
            and isinstance(args[1], list)):
        raise invalid_program(f'{GUARD} takes [sizes, tests]')
    sizes, tests = args
    if len(sizes) != len(tests) or len(tests) > MAX_TERMS:
        raise invalid_program(f'{GUARD}: as many sizes as tests, at most {MAX_TERMS}')
    for size in sizes:
        if not (isinstance(size, dict) and set(size) == {'n'}):
            raise invalid_program(f'{GUARD}: each size is a reference to a size node')
    for test in tests:
        if not (isinstance(test, list) and len(test) == 2 and test[0] in RELATIONS
                and type(test[1]) is int and -MAX_CONSTANT <= test[1] <= MAX_CONSTANT):
            raise invalid_program(f'{GUARD}: each test is [relation, integer], relation one of '
                                  f'{sorted(RELATIONS)}')


def check_skippable(nodes: Sequence[Any], outputs: Iterable[str]) -> None:
    """
    Refuse an output a failed guard can skip unless its declared shape holds nothing (a14 #2).

    ``nodes`` are :class:`rrto_wire.program.ProgramNode` in program order.  An
    output computed after the first guard comes back as :func:`skipped` zeros of
    its declared (client-written) shape when a guard fails; that allocation is
    never run in the sandbox (its zeros fail the guard), so the shape must be
    empty (or a scalar's): :func:`rrto_wire.program_writer.chain` writes dimension 0 as 0.
    """
    after = set()
    for node in nodes:
        if after or node.fn is guard:
            after.add(node.name)
    for name in set(outputs) & after:
        out = next(node.out for node in nodes if node.name == name)
        if out is None or (out.shape and math.prod(out.shape)):     # a scalar: one element
            raise invalid_program(
                f'output {name[:80]!r} is computed after a guard, which may skip it, but its '
                f'declared shape {list(out.shape) if out else None} is not empty: a skipped '
                'output comes back as zeros of that shape (write its guarded dimension as 0)')


def skipped(spec_shape: Sequence[int], dtype: torch.dtype,
            device: torch.device | str = 'cpu') -> torch.Tensor:
    """Return what a chained program returns for an output its failed guard skipped."""
    return torch.zeros(tuple(spec_shape), dtype=dtype, device=device)
