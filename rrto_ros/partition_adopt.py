"""
Take the server's values for the operators of a chain the robot is following.

A chained request (:mod:`rrto_ros.partition_chain`) computes a later graph's
outputs from the server's values for the operators and small local graphs
between the graphs.  The robot computes them again on its CPU where the
server used CUDA: floats differ in the last bits, the next remote graph's
inputs never equal the server's, and a guess is claimed only on equal bytes
(Keypoint R-CNN paid three round trips for that).

While a call follows the path the partition watched, an :class:`Adopter`
(a ``TorchDispatchMode`` with ``ignore_compile_internals``, active from the
chained reply until the chain's last link, or the first difference) takes
the server's values instead of computing them: each ATen operator the robot
runs outside the graphs is checked against the watched call's operator at
the same position (:class:`Step`); an operator of a segment the server ran
must have the same function, the same Python values (sizes, thresholds,
bit for bit), and tensor arguments that are the very values the server used
(the chain's inputs, a link's outputs as they came back, an earlier adopted
operator's output; a constant compared byte for byte, a weight by identity).
It then returns the server's output for it without computing it (a view
operator runs on the robot: it only reinterprets server values).  A local
graph of the chain is claimed like a remote one, its inputs being the
server's values.  So every value the robot holds between the chain's head
and its last link is the server's result of the watched program on the
head's inputs (as for any offloaded graph) or the robot's own computation
from such values: nothing mixes the two results of one operator.

Anything else ends the adoption and the guesses (the rest runs as before):
another operator or graph, other arguments, a graph that writes into its
inputs, an operator reading a tensor robot code outside the chain wrote in
place.  What a segment writes in place (the server returns its last value,
not the one at the operator) the robot computes, and what follows from it.
The server returns every segment output but views (:func:`export_all`).
"""

from __future__ import annotations

import contextlib
import logging
import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode, _get_current_dispatch_mode
from torch.utils._pytree import tree_flatten, tree_unflatten

from rrto_ros.partition_eager import Builder, Op, Segment, storage, written

log = logging.getLogger('rrto_ros.partition')
_SAID: set = set()      # reasons logged once
_SKIPPED = frozenset((torch.ops.aten.lift_fresh.default, torch.ops.aten.lift_fresh_copy.default))


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


def _writes(segments: list) -> set[int]:
    return {storage(w) for link in segments for op in link.ops for w in written(op)}


def steps(events: list, found: tuple, chain: list, own: dict) -> tuple[list, str]:
    """Return the steps a call follows to adopt a planned chain's values, or why not."""
    start, links = found
    if len(links) != len(chain) or any(
            not isinstance(link, Segment) if isinstance(c, torch.nn.Module) else c is not link
            for (c, _), link in zip(chain, links)):
        return [], 'the chain is not the one planned'
    return script(events, start, links, own)


@dataclass
class Step:
    """One event of the watched call after a chain's head: an operator or a graph call."""

    func: Any = None              # the ATen operator; None for a graph call
    subgraph: Any = None
    link: int = -1                # its link of the chain; -1: the robot runs it
    writes: bool = False          # an operator outside the chain writing in place
    spec: Any = None              # a segment operator's argument structure
    leaves: list = field(default_factory=list)   # ('v', value) | ('t', key) | ('w'|'c', tensor)
    outs: list = field(default_factory=list)     # (key, output index or -1, shape, stride, dtype)
    out_spec: Any = None


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
    graphs = {storage(t) for link in kept if not isinstance(link, Segment)
              for t in link.outputs} | {storage(t) for t in head.data}
    if writes & graphs:     # the server returns such a graph's outputs as last written
        return [], 'a segment writes into the chain\'s inputs or a graph\'s outputs'
    produced: set[int] = set()
    robot: set[tuple] = set()       # values the robot computes (what in-place writes touch)
    steps = []
    for p in range(start + 1, last + 1):
        event = events[p]
        if not isinstance(event, Op):
            n = calls.get(id(event), -1)
            if n < 0 and event.subgraph.writes:
                return [], f'graph {event.subgraph.index} writes into its inputs'
            for k, t in enumerate(event.outputs):
                produced.add(id(t))
                if n >= 0:
                    known[id(t)] = ('out', n, k)
            steps.append(Step(subgraph=event.subgraph, link=n))
            continue
        n = ops.get(id(event), -1)
        if n < 0:
            produced.update(id(t) for t in event.outputs())
            steps.append(Step(event.func, writes=bool(written(event))))
            continue
        step = _segment_step(event, p, n, kept[n], (known, produced, own, robot, writes))
        if isinstance(step, str):
            return [], step
        steps.append(step)
    return steps, ''


def _segment_step(op: Op, p: int, n: int, segment: Segment, state: tuple) -> Step | str:
    """
    Return how a call follows one operator of a segment (or why it cannot).

    The robot computes it itself (and what it makes stays the robot's) if it
    writes in place, reads a value the robot computes, or makes a tensor a
    segment writes into later (the server returns its last value); it runs
    a view too; otherwise it takes the server's value.
    """
    known, produced, own, robot, writes = state
    native = bool(written(op))
    leaves, spec = tree_flatten((op.args, op.kwargs))
    step = Step(op.func, link=n, spec=spec)
    for leaf in leaves:
        if not isinstance(leaf, torch.Tensor):
            step.leaves.append(('v', leaf))
        elif id(leaf) in known:
            step.leaves.append(('t', known[id(leaf)]))
            native = native or known[id(leaf)] in robot
        elif id(leaf) in produced:
            return f'{op.func} reads a tensor the chain did not make'
        elif own.get(id(leaf)) is leaf:
            step.leaves.append(('w', leaf))
        else:
            step.leaves.append(('c', leaf.detach().clone()))
    out, step.out_spec = tree_flatten(op.out)
    if not all(isinstance(t, torch.Tensor) for t in out):
        return f'{op.func} returns more than tensors'
    for j, (t, view) in enumerate(zip(out, views(op))):
        mine = native or storage(t) in writes
        k = -1 if view or mine else next((k for k, key in enumerate(segment.exported)
                                          if key == id(t)), None)
        if k is None:
            return f'an output of {op.func} does not come back'
        step.outs.append((('op', p, j), k, tuple(t.shape), t.stride(), t.dtype))
        known[id(t)] = ('op', p, j)
        if mine:
            robot.add(('op', p, j))
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


class Adopter(TorchDispatchMode):
    """
    One call following a chain: the server's values for its operators, checked step by step.

    ``values`` are the chained reply's outputs per link, ``reached`` the
    number of links the server ran (its guards held), ``speculation`` the
    call's guesses (cleared at the first difference).
    """

    def __init__(self, steps: list[Step], values: list, reached: int, speculation: Any,
                 head_data: list):
        super().__init__()
        self.steps, self.values, self.reached = steps, values, reached
        self.speculation = speculation
        self.at, self.active = 0, True
        self.paused = 1         # until the head's call returns
        self.reason = ''
        self.known: dict[int, tuple] = {}
        self.alive: list = []           # the tensors known, so that their ids stay theirs
        self.written: set[int] = set()
        for j, t in enumerate(head_data):
            self._know(t, ('in', j))
        for k, t in enumerate(values[0]):
            self._know(t, ('out', 0, k))

    @classmethod
    def ignore_compile_internals(cls) -> bool:
        """Let dynamo compile and run its graphs as without the mode."""
        return True

    def _know(self, t: Any, key: tuple) -> None:
        if isinstance(t, torch.Tensor):
            self.known[id(t)] = key
            self.alive.append(t)

    def stop(self, reason: str) -> None:
        """End the adoption and the call's guesses: the rest runs as usual."""
        if self.active:
            self.active, self.reason = False, reason
            self.speculation.queue.clear()
            (log.info if reason not in _SAID else log.debug)(
                'adoption ends after %d of %d steps: %s', self.at, len(self.steps), reason)
            _SAID.add(reason)

    def _next(self) -> Step | None:
        if self.at >= len(self.steps):
            return None
        self.at += 1
        return self.steps[self.at - 1]

    def called(self, subgraph: Any, outputs: tuple, claimed: bool) -> None:
        """Follow one graph call (``claimed``: its outputs are the server's guess)."""
        if not self.active:
            return
        step = self._next()
        if step is None or step.func is not None or step.subgraph is not subgraph:
            self.stop(f'graph {subgraph.index} where the watched call ran another step')
        elif step.link >= 0 and not claimed:
            self.stop(f'graph {subgraph.index} was not claimed')
        elif step.link < 0 and subgraph.writes:
            self.stop(f'graph {subgraph.index} writes into its inputs')
        elif step.link >= 0:
            for k, t in enumerate(o for o in outputs if isinstance(o, torch.Tensor)):
                self._know(t, ('out', step.link, k))
        if self.active and self.at == len(self.steps):
            self.active, self.reason = False, 'done'

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self.paused or not self.active or func in _SKIPPED:
            return func(*args, **kwargs)
        step = self._next()
        if step is None or step.func is not func:
            self.stop(f'{func} where the watched call ran another step')
        elif step.link < 0:
            out = func(*args, **kwargs)
            if step.writes:
                self.written.update(storage(t) for t in written(Op(func, args, kwargs, out)))
            return out
        elif step.link >= self.reached:
            self.stop(f'the server stopped before link {step.link}')
        elif not self._matches(step, args, kwargs):
            self.stop(f'{func} on other arguments than watched')
        else:
            return self._adopt(step, func, args, kwargs)
        return func(*args, **kwargs)

    def _matches(self, step: Step, args: tuple, kwargs: dict) -> bool:
        leaves, spec = tree_flatten((args, kwargs))
        if spec != step.spec:
            return False
        for live, (kind, want) in zip(leaves, step.leaves):
            if kind == 'v':
                if not same_value(live, want):
                    return False
            elif not isinstance(live, torch.Tensor):
                return False
            elif kind == 't':
                if self.known.get(id(live)) != want or storage(live) in self.written:
                    return False
            elif kind == 'w':
                if live is not want:
                    return False
            elif not same_bits(live, want):
                return False
        return True

    def _adopt(self, step: Step, func: Any, args: tuple, kwargs: dict) -> Any:
        native = func(*args, **kwargs) if any(k < 0 for _, k, *_ in step.outs) else None
        robot = tree_flatten(native)[0]      # views, and what the robot computes itself
        out = []
        for j, (key, k, shape, stride, dtype) in enumerate(step.outs):
            t = robot[j] if k < 0 else self.values[step.link][k]
            if tuple(t.shape) != shape or t.dtype != dtype:
                self.stop(f'{func} gave another shape than watched')
                return native if native is not None else func(*args, **kwargs)
            if k >= 0 and t.stride() != stride:
                t = torch.empty_strided(shape, stride, dtype=dtype).copy_(t)
            out.append(t)
        for (key, *_), t in zip(step.outs, out):
            self._know(t, key)
        return tree_unflatten(out, step.out_spec)


def same_value(live: Any, want: Any) -> bool:
    """Return True if a Python value Python passed equals the watched one (floats: bitwise)."""
    if type(live) is not type(want):
        return False
    if isinstance(want, float):
        return live == want and math.copysign(1.0, live) == math.copysign(1.0, want)
    return live == want


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Return True if ``a`` and ``b`` hold the same bytes (torch.equal has -0.0 == 0.0, a14 #6)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    if a.dtype.is_floating_point or a.dtype.is_complex:
        a, b = (t.reshape(-1).contiguous().view(torch.uint8) for t in (a, b))
    return torch.equal(a, b)


@contextlib.contextmanager
def quiet(local: Any):
    """Note and check no operator while a graph runs (its call is one step); release at end."""
    tracer = getattr(local, 'tracer', None)
    adopter = getattr(local, 'adopter', None)
    with tracer.paused() if tracer is not None else contextlib.nullcontext():
        if adopter is not None:
            adopter.paused += 1
        try:
            yield
        finally:
            now = getattr(local, 'adopter', None)
            if adopter is not None:
                adopter.paused -= 1
            elif now is not None:       # made during this call (the head): follow from here
                now.paused -= 1
            if now is not None and not now.active:
                release(local)


def follow(local: Any, adopter: Adopter) -> None:
    """Start following a chain in this call (after its head's reply)."""
    release(local)
    local.adopter = adopter.__enter__()


def release(local: Any, end: bool = False) -> None:
    """Stop following (when the mode is the innermost one, or at the call's ``end``)."""
    adopter = getattr(local, 'adopter', None)
    if adopter is None:
        return
    if _get_current_dispatch_mode() is adopter:
        adopter.__exit__(None, None, None)
        local.adopter = None
    elif end:       # not innermost: only ever passes operators through from now on
        adopter.stop('the call ended under another dispatch mode')
        log.warning('a dispatch mode entered during the call covers the chain\'s adopter')
        local.adopter = None
