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
operator's output; a constant compared byte for byte, a weight by identity and
version counter: ``load_state_dict`` copies into the same tensor, and the
server holds the copy taken when the chain was prepared).
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
place, through torch or not (a value an adopted operator reads is kept when
it becomes known and compared byte for byte when read: numpy writes through
``t.numpy()`` move no version counter).  What lives in memory a segment
writes in place (the server returns its last value, not the one at the
operator: torchvision's NMS writes into a local graph's mask of zeros) the
robot computes, that graph included, and
what it reads from there it checks against the server's value, byte for
byte (:mod:`rrto_ros.partition_script`).  The server returns every segment
output but views (:func:`~rrto_ros.partition_script.export_all`).
"""

from __future__ import annotations

import contextlib
import logging
import math
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode, _get_current_dispatch_mode
from torch.utils._pytree import tree_flatten, tree_unflatten

from rrto_ros.partition_eager import Op, storage, written
from rrto_ros.partition_script import Step

log = logging.getLogger('rrto_ros.partition')
_SAID: set = set()      # reasons logged once
# values adopted operators read are kept up to this size, compared when read (numpy writes);
# the zoo R-CNN: 4-18 values, 101-112 KB, 0.16-0.29 ms a call of 22-29 ms
MAX_COPY_BYTES = 1 << 22
_SKIPPED = frozenset((torch.ops.aten.lift_fresh.default, torch.ops.aten.lift_fresh_copy.default))


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
        self.label = getattr(steps, 'label', '') or 'chain'
        self.read = reads(steps)        # values adopted operators read: their bytes kept
        self.copies: dict[int, torch.Tensor] = {}
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
            if key in self.read and t.numel() * t.element_size() <= MAX_COPY_BYTES:
                self.copies[id(t)] = t.clone()      # a write outside torch moves no version

    def stop(self, reason: str) -> None:
        """End the adoption and the call's guesses: the rest runs as usual."""
        if self.active:
            self.active, self.reason = False, reason
            self.speculation.queue.clear()
            (log.info if reason not in _SAID else log.debug)(
                '%s: adoption ends after %d of %d steps: %s', self.label, self.at,
                len(self.steps), reason)
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
        tensors = [o for o in outputs if isinstance(o, torch.Tensor)]
        if step is None or step.func is not None or step.subgraph is not subgraph:
            self.stop(f'graph {subgraph.index} where the watched call ran {_name(step)}')
        elif step.link >= 0 and claimed == step.native:
            self.stop(f'{step.name()} was {"" if claimed else "not "}claimed')
        elif step.link < 0 and subgraph.writes:
            self.stop(f'{step.name()} writes into its inputs')
        elif step.native and step.link >= self.reached:
            self.stop(f'the server stopped before {step.name()}')
        elif step.native and len(tensors) != len(step.outs):
            self.stop(f'{step.name()} gave other outputs than watched')
        elif step.link >= 0:
            for k, t in enumerate(tensors):
                if step.native and step.outs[k][-1] == 'check' and not same_bits(
                        t, self.values[step.link][k]):
                    self.stop(f'{step.name()}: the robot\'s output {k} is not the server\'s')
                    return
                self._know(t, ('out', step.link, k))
        if self.active and self.at == len(self.steps):
            self.active, self.reason = False, 'done'

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self.paused or not self.active or func in _SKIPPED:
            return func(*args, **kwargs)
        step = self._next()
        if step is None or step.func is not func:
            self.stop(f'{func} where the watched call ran {_name(step)}')
        elif step.link < 0:
            out = func(*args, **kwargs)
            if step.writes:
                self.written.update(storage(t) for t in written(Op(func, args, kwargs, out)))
            return out
        elif step.link >= self.reached:
            self.stop(f'the server stopped before {step.name()}')
        elif not self._matches(step, args, kwargs):
            self.stop(f'{step.name()} on other arguments than watched')
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
                if self.known.get(id(live)) != want or storage(live) in self.written or (
                        id(live) in self.copies and not same_bits(live, self.copies[id(live)])):
                    return False
            elif kind == 'w':       # the module's weight as the server got it: same version
                if live is not want[0] or live._version != want[1]:
                    return False
            elif not same_bits(live, want):
                return False
        return True

    def _adopt(self, step: Step, func: Any, args: tuple, kwargs: dict) -> Any:
        run = any(how != 'adopt' for *_, how in step.outs)
        native = func(*args, **kwargs) if run else None
        robot = tree_flatten(native)[0]      # what the robot computes itself
        out = []
        for j, (key, k, shape, stride, dtype, how) in enumerate(step.outs):
            t = robot[j] if run and how != 'adopt' else self.values[step.link][k]
            if tuple(t.shape) != shape or t.dtype != dtype:
                self.stop(f'{step.name()} gave another shape than watched')
                return native if native is not None else func(*args, **kwargs)
            if how == 'check' and not same_bits(t, self.values[step.link][k]):
                self.stop(f'{step.name()}: the robot\'s output {j} is not the server\'s')
                return native
            if how == 'adopt' and t.stride() != stride:
                t = torch.empty_strided(shape, stride, dtype=dtype).copy_(t)
            out.append(t)
        for (key, *_), t in zip(step.outs, out):
            self._know(t, key)
        return tree_unflatten(out, step.out_spec)


def reads(steps: list) -> set:
    """Return the keys of the values the adopted operators of ``steps`` read (kept once)."""
    found = getattr(steps, 'reads', None)
    if found is None:
        found = {want for step in steps if step.func is not None and step.link >= 0
                 for kind, want in step.leaves if kind == 't'}
        try:
            steps.reads = found
        except AttributeError:      # a plain list
            pass
    return found


def _name(step: Step | None) -> str:
    return 'no more steps' if step is None else step.name()


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
    """
    Note and check no operator while a graph runs (its call is one step); release at end.

    The adopter, when it is the innermost mode, leaves the mode stack while
    the graph runs (its operators then cost nothing: 82 a call on the zoo
    R-CNN went through it paused, ~7 us each), else it is paused.  Contexts
    nest (a graph called while another graph's call is quiet): an adopter
    made inside starts paused once per context open then (:func:`follow`),
    and each of them resumes it once on leaving.
    """
    tracer = getattr(local, 'tracer', None)
    adopter = getattr(local, 'adopter', None)
    with tracer.paused() if tracer is not None else contextlib.nullcontext():
        local.depth = getattr(local, 'depth', 0) + 1
        off = adopter is not None and _get_current_dispatch_mode() is adopter
        if off:
            adopter.__exit__(None, None, None)
        elif adopter is not None:
            adopter.paused += 1
        try:
            yield
        finally:
            local.depth -= 1
            now = getattr(local, 'adopter', None)
            if off and now is adopter:
                if adopter.active:
                    adopter.__enter__()
                else:                           # done while off the stack
                    local.adopter = now = None
            elif adopter is not None and not off:
                adopter.paused -= 1
            if now is not None and now is not adopter:      # made in this context
                now.paused -= 1
            if now is not None and not now.active:
                release(local)


def follow(local: Any, adopter: Adopter) -> None:
    """Start following a chain in this call (after its head's reply), paused until it returns."""
    release(local)
    adopter.paused = getattr(local, 'depth', 0)
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
