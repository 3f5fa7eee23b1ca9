"""
What a call follows to adopt a chain's values: the watched call's steps after the head.

:func:`script` turns the events a partition watched (:mod:`rrto_ros.partition_chain`)
between a chain's head and its last link into :class:`Step` s, which an
:class:`~rrto_ros.partition_adopt.Adopter` checks a later call against.  Each
value of a step is taken from the server (``adopt``), made by the robot
(``view``; ``robot``: it lives in memory a segment writes into in place, where
the server returns the last value written, not the one at the step), or made
by the robot and compared byte for byte with the server's value (``check``:
read from such memory; equal bytes, and the robot holds the server's value
again).  A local graph whose outputs a segment writes into (torchvision's
``_batched_nms_vanilla``: a graph's mask of zeros, True written into it by the
eager loop) or that reads written memory runs on the robot (:func:`native`),
never claimed.  A write into the chain's inputs or a remote graph's outputs
is not followed at all (the reason names the operator and the link).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils._pytree import tree_flatten

from rrto_ros.partition_eager import Builder, Op, Segment, storage, written

log = logging.getLogger('rrto_ros.partition')


def views(op: Op) -> list[bool]:
    """Return, per tensor output of a recorded operator, whether it aliases an input."""
    ins = {storage(a) for a in tree_flatten((op.args, op.kwargs))[0]
           if isinstance(a, torch.Tensor)}
    alias = any(r.alias_info is not None for r in op.func._schema.returns)
    return [alias or storage(t) in ins for t in op.outputs()]


def export_all(links: list) -> None:
    """Have each segment return every output but its views and what segments write into."""
    segments = [link for _, link, _ in links if isinstance(link, Segment)]
    writes = _writes(segments)
    for link in segments:
        for op in link.ops:
            for t, view in zip(op.outputs(), views(op)):
                if not view and storage(t) not in writes:
                    link.export(t)


def _writes(segments: list) -> dict[int, tuple]:
    """Return each storage the segments write into: (the first operator, its segment)."""
    out: dict[int, tuple] = {}
    for link in segments:
        for op in link.ops:
            for w in written(op):
                out.setdefault(storage(w), (op, link))
    return out


class Script(list):
    """A chain's steps, and the chain's name for the logs."""

    label = ''


def steps(events: list, found: tuple, chain: list, own: dict,
          label: str = '') -> tuple[list, str]:
    """Return the steps a call follows to adopt a planned chain's values, or why not."""
    start, links = found
    if len(links) != len(chain) or any(
            not isinstance(link, Segment) if isinstance(c, torch.nn.Module) else c is not link
            for (c, _), link in zip(chain, links)):
        return [], 'the chain is not the one planned'
    out, reason = script(events, start, links, own)
    out = Script(out)
    out.label = label
    return out, reason


@dataclass
class Step:
    """One event of the watched call after a chain's head: an operator or a graph call."""

    func: Any = None              # the ATen operator; None for a graph call
    subgraph: Any = None
    link: int = -1                # its link of the chain; -1: the robot runs it
    writes: bool = False          # an operator outside the chain writing in place
    spec: Any = None              # a segment operator's argument structure
    # ('v', value) | ('t', key) | ('w', (weight, its version)) | ('c', a copy)
    leaves: list = field(default_factory=list)
    # per tensor output: (key, output index or -1, shape, stride, dtype, how); how: 'adopt'
    # (the server's value), 'view', 'robot' (the robot's), 'check' (the robot's, equal bytes)
    outs: list = field(default_factory=list)
    out_spec: Any = None
    native: bool = False          # a graph link the robot runs (its outputs: outs' how)
    why: str = ''                 # why the robot runs it, for the logs

    def name(self) -> str:
        """Return the step as the logs name it: the operator or graph, and its link."""
        what = f'graph {self.subgraph.index}' if self.func is None else str(self.func)
        return f'{what} (link {self.link})' if self.link >= 0 else f'{what} (not a link)'


def native(steps: list) -> set[int]:
    """Return the chain's links a call following ``steps`` runs itself (never claimed)."""
    return {s.link for s in steps if s.func is None and s.native}


def describe(steps: list) -> str:
    """Return what the logs say of a chain's steps: how many, and the graphs the robot runs."""
    mine = '; '.join(f'{s.name()} runs on the robot: {s.why}' for s in steps
                     if s.func is None and s.native)
    return f'{len(steps)} steps followed' + (f' ({mine})' if mine else '')


def script(events: list, start: int, kept: list, own: dict) -> tuple[list[Step], str]:
    """
    Return the steps of the watched call from a chain's head to its last link, or a reason.

    ``start`` is the head's position in ``events``, ``kept`` the chain's
    links in order (the head's and graphs' :class:`Call`, segments'
    :class:`Segment`), ``own`` the module's weights by id.
    """
    head = events[start]
    known: dict[int, tuple] = {id(t): ('in', j) for j, t in enumerate(head.data)}
    known.update({id(t): ('out', 0, k) for k, t in enumerate(head.outputs)})
    calls = {id(link): n for n, link in enumerate(kept) if not isinstance(link, Segment)}
    ops = {id(op): n for n, link in enumerate(kept) if isinstance(link, Segment)
           for op in link.ops}
    last = max(p for p, e in enumerate(events) if id(e) in calls)
    writes = _writes([link for link in kept if isinstance(link, Segment)])
    at = {id(link): n for n, link in enumerate(kept)}
    protected = {storage(t): f'the chain\'s input {j}' for j, t in enumerate(head.data)}
    for n, link in enumerate(kept):
        if not isinstance(link, Segment) and (n == 0 or link.subgraph.remote is not None):
            protected.update({storage(t): f'the outputs of remote graph {link.subgraph.index} '
                              f'(link {n})' for t in link.outputs})
    for key, (op, segment) in writes.items():
        if key in protected:        # the server's values were computed from what it wrote
            return [], f'{op.func} (link {at[id(segment)]}) writes into {protected[key]}'
    produced: set[int] = set()
    steps = []
    for p in range(start + 1, last + 1):
        event = events[p]
        if not isinstance(event, Op):
            step = _graph_step(event, calls.get(id(event), -1), writes, at)
            if isinstance(step, str):
                return [], step
            for k, t in enumerate(event.outputs):
                produced.add(id(t))
                if step.link >= 0:
                    known[id(t)] = ('out', step.link, k)
            steps.append(step)
            continue
        n = ops.get(id(event), -1)
        if n < 0:
            produced.update(id(t) for t in event.outputs())
            steps.append(Step(event.func, writes=bool(written(event))))
            continue
        step = _segment_step(event, p, n, kept[n], (known, produced, own, writes))
        if isinstance(step, str):
            return [], step
        steps.append(step)
    return steps, ''


def _graph_step(call: Any, n: int, writes: dict, at: dict) -> Step | str:
    """
    Return how a call follows one graph call (``n``: its link, -1 if none).

    A local link whose outputs a segment writes into, or that reads such
    memory, the robot runs: its written outputs stay the robot's, the others
    are checked against the server's.  The others are claimed (links) or
    run as usual.
    """
    step = Step(subgraph=call.subgraph, link=n)
    if n < 0:
        if call.subgraph.writes:
            return f'graph {call.subgraph.index} (not a link) writes into its inputs'
        return step
    mine = [storage(t) in writes for t in call.outputs]
    read = [storage(t) for t in call.data if storage(t) in writes]
    step.native = call.subgraph.remote is None and (any(mine) or bool(read))
    if step.native:
        op, segment = writes[next(storage(t) for t, m in zip(call.outputs, mine) if m)
                             if any(mine) else read[0]]
        step.why = (f'{op.func} (link {at[id(segment)]}) writes into '
                    f'{"its outputs" if any(mine) else "what it reads"}')
    step.outs = [(('out', n, k), k, (), (), None, 'robot' if m else 'check')
                 for k, m in enumerate(mine)]
    return step


def _segment_step(op: Op, p: int, n: int, segment: Segment, state: tuple) -> Step | str:
    """
    Return how a call follows one operator of a segment (or why it cannot).

    What lives in memory a segment writes into the robot computes (the
    server returns its last value); an operator that writes in place or
    reads such memory it runs, and checks its other outputs against the
    server's; a view it runs too; otherwise it takes the server's value.
    """
    known, produced, own, writes = state
    run = bool(written(op))
    leaves, spec = tree_flatten((op.args, op.kwargs))
    step = Step(op.func, link=n, spec=spec)
    for leaf in leaves:
        if not isinstance(leaf, torch.Tensor):
            step.leaves.append(('v', leaf))
        elif id(leaf) in known:
            step.leaves.append(('t', known[id(leaf)]))
            run = run or storage(leaf) in writes
        elif id(leaf) in produced:
            return f'{op.func} (link {n}) reads a tensor the chain did not make'
        elif own.get(id(leaf)) is leaf and not leaf.is_inference():
            step.leaves.append(('w', (leaf, leaf._version)))    # written since: not adopted
        else:
            step.leaves.append(('c', leaf.detach().clone()))
    out, step.out_spec = tree_flatten(op.out)
    if not all(isinstance(t, torch.Tensor) for t in out):
        return f'{op.func} (link {n}) returns more than tensors'
    for j, (t, view) in enumerate(zip(out, views(op))):
        how = 'robot' if storage(t) in writes else 'view' if view else 'check' if run \
            else 'adopt'
        k = -1 if how in ('robot', 'view') else next(
            (k for k, key in enumerate(segment.exported) if key == id(t)), None)
        if k is None:
            return f'an output of {op.func} (link {n}) does not come back'
        step.outs.append((('op', p, j), k, tuple(t.shape), t.stride(), t.dtype, how))
        known[id(t)] = ('op', p, j)
        produced.add(id(t))
    return step


def grow(head: Any, events: list, i: int, own: dict, joins: Any, is_remote: Any) -> tuple:
    """
    Return a chain's kept links grown from ``events[i]``, and the builder's links kept.

    As :func:`~rrto_ros.partition_eager.grow`, with every output of the
    segments returned (:func:`export_all`).
    """
    try:
        builder = Builder(head, own, joins)
        for p in range(i + 1, len(events)):
            builder.add(p, events[p])
        export_all(builder.links)
        links, needed = builder.links, set()
        keep = [False] * len(links)        # as Builder.finish keeps them
        for n in range(len(links) - 1, -1, -1):
            keep[n] = n == 0 or is_remote(links[n][1]) or n in needed
            if keep[n]:
                needed.update(s[1] for s in links[n][2] if s[0] in ('out', 'seg'))
        kept = builder.finish(is_remote)
    except Exception as exc:  # noqa: B902 - one chain left out, never the partition
        log.info('chain%s: not chained, planning it failed (%s: %s)',
                 getattr(head.subgraph, 'index', '?'), type(exc).__name__, exc)
        return [], []
    return kept, [link for (_, link, _), k in zip(links, keep) if k]
