"""
The budget of one call of a dynamic program, checked node by node.

:class:`~rrto_server.runner_fx.DynamicRunner` runs its segments with these:
:class:`SizeChecked` prices each node of a segment before it runs
(:func:`rrto_wire.ops_cost.cost`, :meth:`rrto_server.work_rate.WorkRate.work`),
:class:`Budget` holds the call's bytes alive and work done against its caps,
:class:`CheckedInterpreter` runs a segment under both, and :class:`CallState`
carries the call's work and seconds from one segment to the next, apart from
its values (whose names are the peer's: a15 #3).
"""

from __future__ import annotations

import re
import threading
import time

import cachetools
import torch
import torch.fx as fx

from rrto_server.work_rate import WorkRate
from rrto_wire.errors import ErrorCode, ProtocolError
from rrto_wire.ops_cost import TENSOR_BYTES
from rrto_wire.ops_dynamic import MAX_SIZE_VALUE, cost, costs_nothing, varies

STOP_FACTOR = 4.0      # x its budget's seconds: later load may slow an admitted call so much
NAME = re.compile(r'[\w.:/-]{1,256}', re.ASCII)    # a value's name in a dynamic program


class CallState:
    """One call's budget so far, kept apart from its values (a15 #3: never in ``ex.env``)."""

    __slots__ = ('spent', 'elapsed', 'stopped')

    def __init__(self):
        self.spent = 0          # work done so far
        self.elapsed = 0.0      # seconds its segments ran so far
        self.stopped = False    # a chained program's guard failed: nothing more runs


def check_names(names) -> None:
    """Refuse a value name that is not a short identifier-like string (a15 #3)."""
    for name in names:
        if not isinstance(name, str) or not NAME.fullmatch(name):
            raise ProtocolError(ErrorCode.UNSAFE_PROGRAM,
                                f'invalid program: value name {str(name)[:40]!r}: a dynamic '
                                'program names its values with at most 256 letters, digits '
                                'and _ . : / -')


def storage_bytes(values) -> int:
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
                for t in torch.utils._pytree.tree_leaves(list(values))
                if isinstance(t, torch.Tensor)}
    return sum(storages.values())


class Budget:
    """What one execution holds (bytes of live storages) and has done (work), against caps."""

    def __init__(self, max_bytes: int, max_work: int, work: int, stop_at: float):
        self.max_bytes = max_bytes
        self.max_work = max_work
        self.work = work
        self.stop_at = stop_at          # perf_counter() past which no operator starts
        self.held = 0                   # bytes of values outside the interpreter
        self.live: dict[int, list] = {}     # storage -> [bytes, values holding it]
        self.live_bytes = 0             # the sum of their bytes, and of the live tensor objects
        self.of: dict[fx.Node, tuple[list[int], int]] = {}  # storages, bytes of its objects
        self.fixed: set[int] = set()    # the weights' storages (not the call's)

    def charge(self, node: fx.Node, nbytes: int, work: int) -> None:
        """Refuse ``node`` if its bytes or work would exceed what the call may have."""
        if time.perf_counter() > self.stop_at:
            raise ProtocolError(ErrorCode.UNSAFE_PROGRAM, f'this call ran {STOP_FACTOR:g} x '
                                f'the seconds its budget (--program-max-s) is worth: stopped '
                                f'before {str(node.target)[:80]}')
        held = self.held + self.live_bytes
        if held + nbytes > self.max_bytes:
            raise ProtocolError(
                ErrorCode.UNSAFE_PROGRAM,
                f'{str(node.target)[:80]} would allocate {nbytes} bytes at this input with '
                f'{held} held: over the {self.max_bytes} one call may hold (--program-max-mb)')
        if work > self.max_work:     # alone: refused before it runs, never after (a15 #4)
            raise ProtocolError(
                ErrorCode.UNSAFE_PROGRAM,
                f'{str(node.target)[:80]} alone would do work {work:.3g} at this input '
                f'(elements read and written, FLOPs at the measured rates): over the '
                f'{self.max_work:.3g} one call may do (--program-max-s)')
        if self.work + work > self.max_work:
            raise ProtocolError(
                ErrorCode.UNSAFE_PROGRAM,
                f'{str(node.target)[:80]} would bring the work of this call at this input to '
                f'{self.work + work:.3g} (elements read and written, FLOPs at the measured '
                f'rates): over the {self.max_work:.3g} one call may do (--program-max-s)')
        self.work += work

    def hold(self, node: fx.Node, value, fixed: bool = False) -> None:
        """
        Count the storages ``node``'s value holds (new ones at their size), and its tensors.

        Each tensor object of the value costs :data:`~rrto_wire.ops_cost.TENSOR_BYTES`
        while the value lives (a list of views holds no storage of its own: a16 #2).
        """
        keys, objects = [], 0
        for t in torch.utils._pytree.tree_leaves(value):
            if not isinstance(t, torch.Tensor):
                continue
            objects += 0 if fixed else TENSOR_BYTES
            storage = t.untyped_storage()
            key = storage.data_ptr()
            if fixed:
                self.fixed.add(key)
            elif key not in self.fixed and key not in keys:
                keys.append(key)
                entry = self.live.get(key)
                if entry is None:
                    entry = self.live[key] = [storage.nbytes(), 0]
                    self.live_bytes += entry[0]
                entry[1] += 1
        self.of[node] = keys, objects
        self.live_bytes += objects
        if self.held + self.live_bytes > self.max_bytes:    # its cost missed an allocation
            raise ProtocolError(
                ErrorCode.UNSAFE_PROGRAM,
                f'{str(node.target)[:80]} left this call holding '
                f'{self.held + self.live_bytes} bytes: over the {self.max_bytes} one call may '
                'hold (--program-max-mb)')

    def release(self, node: fx.Node) -> None:
        """``node``'s value is freed: drop each storage no other live value holds."""
        keys, objects = self.of.pop(node, ((), 0))
        self.live_bytes -= objects
        for key in keys:
            entry = self.live[key]
            entry[1] -= 1
            if not entry[1]:
                del self.live[key]
                self.live_bytes -= entry[0]


class SizeChecked:
    """
    An fx module whose operators are sized before they run (:class:`DynamicRunner`).

    Each node's cost (bytes, work) is computed on meta tensors once per
    distinct set of argument sizes and strides, remembered (meta shape functions cost
    more than most operators): for a node whose sizes cannot follow the data
    (nothing upstream is data-dependent) the trial's, once; for the others
    per argument size set, the last :attr:`CHECKED_SIZES` kept.
    """

    CHECKED_SIZES = 4096     # argument size sets remembered per module

    def __init__(self, module: fx.GraphModule, device: torch.device, inputs_vary: bool,
                 rate: WorkRate, autocast: torch.dtype | None = None):
        self.module = module
        self.device = device
        self.rate = rate
        self.autocast = autocast
        self.costs: dict = {}             # a fixed-size node's cost
        self.varying_costs = cachetools.LRUCache(self.CHECKED_SIZES)
        self.lock = threading.Lock()
        self.varying: set[str] = set()       # nodes whose sizes may follow the data
        for node in module.graph.nodes:
            if (node.op == 'placeholder' and inputs_vary) or (
                    node.op == 'call_function' and (varies(node.target) or any(
                        n.name in self.varying for n in node.all_input_nodes))):
                self.varying.add(node.name)
        self.free = {node.name for node in module.graph.nodes       # sizes, views: no check
                     if node.op == 'call_function' and costs_nothing(node.target)}

    def cost(self, node: fx.Node, args: tuple, kwargs: dict) -> tuple[int, int]:
        """Return (bytes, work) of ``node`` at these argument sizes."""
        if node.name in self.free:
            return 0, 0
        if node.name not in self.varying:
            key, costs = node.name, self.costs
        else:
            key, costs = (node.name,) + tuple(   # strides too: a copy of a view follows them
                (tuple(leaf.shape), leaf.stride()) if isinstance(leaf, torch.Tensor) else leaf
                for leaf in torch.utils._pytree.tree_leaves((args, kwargs))), self.varying_costs
        with self.lock:          # lanes share it; an LRU reorders on reads
            found = costs.get(key)
        if found is None:
            nbytes, flops, elements = cost(node.target, args, kwargs, self.device)
            found = nbytes, self.rate.work(node.target, args, flops, elements, self.autocast)
            with self.lock:
                costs[key] = found
        return found


class CheckedInterpreter(fx.Interpreter):
    def __init__(self, checked: SizeChecked, budget: Budget, request_inputs: list[bool]):
        super().__init__(checked.module, garbage_collect_values=True)
        self.checked = checked
        self.budget = budget
        self.request_inputs = iter(request_inputs)     # per placeholder, in order

    def run_node(self, node: fx.Node):
        if node.op == 'call_function':
            args, kwargs = self.fetch_args_kwargs_from_env(node)
            self.budget.charge(node, *self.checked.cost(node, args, kwargs))
            result = node.target(*args, **kwargs)
            if type(result) is int and not -MAX_SIZE_VALUE <= result <= MAX_SIZE_VALUE:
                raise ProtocolError(     # a16 #1: squaring a size 40 times is 2^40 bits
                    ErrorCode.UNSAFE_PROGRAM,
                    f'{str(node.target)[:80]} computed a size of {result.bit_length()} bits: '
                    f'sizes stay within +-2^{MAX_SIZE_VALUE.bit_length() - 1}')
        else:
            result = super().run_node(node)
        if node.op != 'output':     # weights and the request's inputs are not the call's
            self.budget.hold(node, result, fixed=node.op == 'get_attr' or (
                node.op == 'placeholder' and next(self.request_inputs)))
        for gone in self.user_to_last_uses.get(node, ()):
            self.budget.release(gone)
        return result

    def computed(self) -> list:
        """Return the module's outputs computed so far (None for the others)."""
        output = next(n for n in reversed(self.module.graph.nodes) if n.op == 'output')
        return [self.env.get(value) if isinstance(value, fx.Node) else value
                for value in output.args[0]]
