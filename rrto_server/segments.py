"""
Where a recorded program may be cut into segments (preemption points).

A replay runs segment by segment; between two segments the scheduler may run
a more urgent request first.  Granularity is chosen per record request:

* ``whole``    one segment (no preemption inside an inference)
* ``ops:N``    a cut after every N operators
* ``block:D``  a cut where the module path truncated to depth D changes
               (``block:2`` cuts ResNet's ``layers.3`` from ``layers.4``)

A cut is legal only where every value crossing it is a tensor of known shape
(static buffers carry it); a proposed cut that would split a tuple from its
``getitem`` users moves forward to the next legal place.
"""

from __future__ import annotations

import re

from rrto_wire.program import Program
from rrto_wire.errors import ErrorCode, ProtocolError

WHOLE = 'whole'
MAX_SEGMENTS = 1024      # each is a preemption point with its own module, live values, buffers
_NUMBER = re.compile(r'[1-9][0-9]{0,8}')      # ASCII, no leading zero, below 10^9


def parse_granularity(spec: object) -> tuple[str, int]:
    """Validate a granularity string; return (kind, number)."""
    if spec == WHOLE or spec is None:
        return WHOLE, 0
    if isinstance(spec, str) and ':' in spec:
        kind, _, number = spec.partition(':')
        # ASCII digits only (str.isdigit takes '²', which int() refuses), one spelling per
        # number (no leading zeros: each spelling is a replay key)
        if kind in ('ops', 'block') and _NUMBER.fullmatch(number):
            return kind, int(number)
    raise ProtocolError(ErrorCode.BAD_REQUEST,
                        "segments must be 'whole', 'ops:N' or 'block:D' (N, D in ASCII digits "
                        f"from 1 to 999999999, no leading zeros), got {str(spec)[:40]!r}")


def canonical(program: Program, spec: object) -> str:
    """
    Return the one spelling of ``spec``'s segmentation of ``program`` (part of the replay key).

    A granularity that cuts nowhere (``ops:N`` with N at least the number of
    operators, a program of one operator) is ``whole``, and ``block:D`` deeper than
    the deepest module path is that depth: so the option strings a client may send
    name at most one replay key per distinct segmentation, bounded by the program.
    """
    kind, number = parse_granularity(spec)
    if kind == WHOLE or not bounds(program, spec):
        return WHOLE
    if kind == 'block':
        deepest = max(len(node.scope.split('.')) for node in program.nodes)
        return f'block:{min(number, deepest)}'
    return f'ops:{number}'


def _legal_cuts(program: Program) -> list[bool]:
    """legal[i] is True when a cut before node i keeps every crossing value a tensor."""
    nodes = program.nodes
    producer = {n.name: i for i, n in enumerate(nodes)}
    tensor_values = {name for name, _ in program.inputs} | {n.name for n in nodes if n.out}
    # last_use[name] = index of the last node using it (len(nodes) for program outputs)
    last_use: dict[str, int] = {}
    for i, node in enumerate(nodes):
        for ref in node.refs:
            last_use[ref] = i
    for name in program.output_names:
        if name is not None:
            last_use[name] = len(nodes)
    crossing = [0] * (len(nodes) + 2)     # +1 where a non-tensor value's range starts...
    for name, last in last_use.items():
        if name in program.params or name in tensor_values:
            continue
        crossing[producer.get(name, -1) + 1] += 1
        crossing[last + 1] -= 1           # ... -1 after it ends: linear, not quadratic
    legal, open_values = [], 0
    for i in range(len(nodes) + 1):
        open_values += crossing[i]
        legal.append(open_values == 0)
    return legal


def bounds(program: Program, spec: object) -> list[int]:
    """Return the node indices where segments start (excluding 0), for a granularity."""
    kind, number = parse_granularity(spec)
    if kind == WHOLE or not program.nodes:
        return []
    legal = _legal_cuts(program)
    wanted: list[int] = []
    if kind == 'ops':
        wanted = list(range(number, len(program.nodes), number))
    else:
        def block(i: int) -> str:
            return '.'.join(program.nodes[i].scope.split('.')[:number])
        wanted = [i for i in range(1, len(program.nodes)) if block(i) != block(i - 1)]
    cuts: list[int] = []
    for cut in wanted:
        while cut < len(program.nodes) and not legal[cut]:
            cut += 1
        if 0 < cut < len(program.nodes) and (not cuts or cut > cuts[-1]):
            cuts.append(cut)
    if len(cuts) >= MAX_SEGMENTS:
        raise ProtocolError(ErrorCode.BAD_REQUEST,
                            f'segments={str(spec)[:40]!r} cuts this program into '
                            f'{len(cuts) + 1} segments; at most {MAX_SEGMENTS}')
    return cuts
