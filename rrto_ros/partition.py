"""
Offload a model that cannot be exported whole: tensor programs remote, data-dependent code local.

Detectors end in code whose shapes depend on the data (score thresholds by
boolean mask, top-k of a data-dependent size, NMS); ``torch.export`` cannot
trace it.  :class:`Partition` lets PyTorch find the cut: ``torch.compile``
with our backend and static shapes hands us each graph it captures, while
Python that branches on the data, and ``.item()``, break the graphs and stay
on the robot.  Operators with data-dependent output sizes stay inside a graph
(``capture_dynamic_output_shape_ops``): such a graph is a dynamic program the
server runs unrecorded (:mod:`rrto_wire.ops_dynamic`).

Each captured graph becomes a :class:`Subgraph`.  Its first call runs locally
and counts its FLOPs (``FlopCounterMode``) and the bytes it would move; a
subgraph holding at least :data:`MIN_SHARE` of the model's FLOPs and
:data:`MIN_FLOPS_PER_BYTE` per byte moved is offloaded through its own inner
offloaded model (the engine's usual machinery: it is exported, uploaded
once, recorded per input signature, replayed, timed out, fallen back and
reconnected exactly like a whole model, with the outer model's options).
Smaller ones (a few elementwise operators between two breaks) stay local
rather than cost a round trip.  One call of the partitioned model costs one
round trip per offloaded subgraph; each subgraph's output equals its local
output, so the whole output does too.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import torch
import torch._dynamo
from torch.fx.experimental.symbolic_shapes import GuardOnDataDependentSymNode
from torch.utils.flop_counter import FlopCounterMode

from rrto_ros import partition_adopt, partition_capture, partition_chain as chaining
from rrto_ros.partition_graphs import Outputs, SubgraphModule, counted_call, tensors_of
from rrto_ros.local_model import EXPORT_GUARD, TorchModule
from rrto_ros.partition_report import call_fields, first_line, local_fields
from rrto_ros.weight_versions import versions as versions_of
from rrto_wire.program_writer import is_dynamic

CHAIN = True               # guess the next subgraphs: one request for a chain of them
EAGER_LINKS = True         # chains take the operators run between graphs (partition_eager)
ADOPT = True               # a call following a chain takes the server's values (partition_adopt)
MIN_SHARE = 0.01            # of the whole model's FLOPs, for a subgraph to be worth a round trip
MIN_FLOPS_PER_BYTE = 8.0    # FLOPs per byte of a subgraph's inputs and outputs, likewise
RECOMPILE_LIMIT = 64        # graphs per code object (a new shape after a break is a new graph)
PREPARE_CALLS = 3           # calls at most while preparing, until one captures no new graph
# data-dependent sizes (nonzero, boolean masks, NMS) stay in graphs as unbacked sizes; Python
# branching on data and .item() (a value the server could not bound) break them
DYNAMO_CONFIG = {'capture_scalar_outputs': False, 'capture_dynamic_output_shape_ops': True,
                 'recompile_limit': RECOMPILE_LIMIT}
if hasattr(torch._dynamo.config, 'nested_graph_breaks'):
    # a break inside a nested call ends the graph there, not at the outermost call: a
    # detector's backbone and heads stay one graph (one round trip), not one per call level
    DYNAMO_CONFIG['nested_graph_breaks'] = True
log = logging.getLogger('rrto_ros.partition')
_COUNTERS = ('round_trips', 'infer_round_trips', 'bytes_sent', 'bytes_received', 'timeouts',
             'reconnects', 'errors', 'uploads', 'records', 'prepare_errors')


def is_data_dependent(exc: BaseException) -> bool:
    """Return True if an export failed on an operator whose output depends on the data."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, (GuardOnDataDependentSymNode,
                            torch._subclasses.fake_tensor.DynamicOutputShapeException,
                            torch._subclasses.fake_tensor.DataDependentOutputException)):
            return True
        if 'data-dependent' in str(exc):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


@dataclass
class Subgraph:
    """One captured graph: the callable dynamo runs in its place."""

    index: int
    graph: torch.fx.GraphModule
    weights: dict[int, torch.Tensor]       # argument position -> the module's own tensor
    owner: 'Partition'
    flops: int = -1                        # -1 until its first call
    io_bytes: int = 0
    dynamic: bool = False                  # sizes depend on the data: the server runs it eagerly
    writes: bool = False                   # writes into an input in place (never chained)
    outputs: Outputs | None = None         # its outputs rebuilt from its tensor outputs
    remote: Any = None                     # the inner offloaded model, when worth a round trip
    reason: str = ''                       # why it stays local
    example: list = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    versions: tuple = ()        # its weights' version counters when captured: written since?

    def __post_init__(self):
        self.versions = versions_of(self.weights.values())

    def __call__(self, *args: torch.Tensor) -> Any:
        with self.owner.quiet():    # its operators are not the ones between graphs
            return self._call(args)

    def _call(self, args: tuple) -> Any:
        start = time.perf_counter()
        data = [a for i, a in enumerate(args) if i not in self.weights]
        adopter = self.owner.following()      # this call follows a chain
        if self.flops >= 0 and self._weights_unchanged(args):
            guess = self.owner.claim(self, data)     # computed by a chained request
            if guess is not None:
                if adopter is not None:
                    adopter.called(self, guess.outputs, True)
                return guess.outputs
        if self.flops >= 0 and self.remote is not None and self._weights_unchanged(args):
            with self.lock:
                outputs = self.owner.call_remote(self, data)
        else:
            outputs = self._first_call(args, data) if self.flops < 0 else self.graph(*args)
            self.owner.trace(self, None, (time.perf_counter() - start) * 1e3)
        if adopter is not None:
            adopter.called(self, outputs, False)
        self.owner.note(self, len(args), data, outputs)
        return outputs

    def _first_call(self, args: tuple, data: list) -> Any:
        outputs, self.flops, self.io_bytes = counted_call(self.graph, args, data, wrote := [])
        self.writes = self.writes or bool(wrote)    # by the schemas of the operators it ran
        self.reason = local_reason(self.flops, self.io_bytes, self.owner.model_flops, data)
        if not self.reason and not self.outputs.ok:
            self.reason = 'returns a size the robot cannot compute from its tensor outputs'
        if not self.reason:
            self.example = [t.detach().clone() for t in data]
            self.remote = self.owner.remote_for(self, len(args))
        return outputs

    def _weights_unchanged(self, args: tuple) -> bool:      # not replaced, not written
        return all(args[i] is t for i, t in self.weights.items()) and \
            self.versions == versions_of(self.weights.values())

    def describe(self) -> dict:
        """Return what this subgraph is and where it runs."""
        ops = sum(1 for n in self.graph.graph.nodes if n.op not in ('placeholder', 'output'))
        remote, table = self.remote, getattr(self.remote, 'table', None)
        return {'index': self.index, 'operators': ops, 'flops': max(self.flops, 0),
                'io_bytes': self.io_bytes, 'remote': remote is not None,
                'eager': remote is not None and self.dynamic,
                'reason': self.reason, 'plan_table': table.label if table else '',
                'plan': remote.last.plan if remote is not None and remote.last else ''}


class Partition:
    """
    One model run as compiled Python whose captured graphs may run on the server.

    ``outer`` is the model's :class:`~rrto_ros.engine.OffloadedModel`; each
    remote subgraph gets an inner one of the same type with the outer's
    options (server, timeouts, mode, precision, segments, codec, priority,
    deadline, task), kept up to date with the outer's link, codec and timeout
    before every call.  Plan tables are bound to one program, so a whole
    model's table cannot apply to its subgraphs: each takes the table of its
    own program from the outer's ``subgraph_plans``
    (:mod:`rrto_ros.partition_plans`), or offloads whole.
    """

    def __init__(self, outer: Any):
        if not isinstance(outer.local, TorchModule):
            raise TypeError(f'only nn.Module models can be partitioned, not {outer.local.label}')
        self.outer = outer
        self.local = outer.local
        self.label = outer.local.label
        self.model_flops = 0
        self.subgraphs: list[Subgraph] = []
        self.last_call: list[tuple[int, bool]] = []   # (subgraph index, ran remotely)
        self._remotes: dict[tuple, Any] = {}
        self.chains: dict[int, tuple] = {}    # head index -> (ChainModel, its remote, links)
        self.guesses = [0, 0]                 # subgraph calls guessed by chained requests, claimed
        self.plans = outer.subgraph_plans     # plan tables of the subgraphs' programs
        self._own = {id(t): t for t in tensors_of(self.local.module)}
        self._lock = threading.Lock()
        self._local = threading.local()
        self.compiled = partition_capture.compiled(self.local.module, self._capture, self._own)

    # ------------------------------------------------------------------ preparation
    def prepare(self, args: tuple, kwargs: dict, timeout_s: float) -> bool:
        """Count the model's FLOPs, capture its graphs, record the remote ones; True if all are."""
        if not self.model_flops:
            with EXPORT_GUARD.shared(), torch.inference_mode(), \
                    FlopCounterMode(display=False) as counter:
                self.local.module(*args, **kwargs)
            self.model_flops = int(counter.get_total_flops())
        # a call can change what the next one's guards see (torchvision's anchor generator
        # stores tensors made in inference mode): call until no new graph is captured
        for _ in range(PREPARE_CALLS):
            captured = len(self.subgraphs)
            self._compiled_call(args, kwargs)   # a failure to compile here: cannot offload
            if self.last_call and len(self.subgraphs) == captured:
                break
        remotes = [s for s in self.subgraphs if s.remote is not None]
        ready = [s.remote.warmup(*s.example, timeout_s=timeout_s) for s in remotes]
        if self.plans is not None:   # exported now: their plan tables' plans are prepared
            for s in remotes:
                self.plans.give(s.remote)
            ready = [s.remote.warmup(*s.example, timeout_s=timeout_s) for s in remotes]
        if CHAIN and all(ready):     # watch one call; each chain it shows: one request
            tracer = chaining.Tracer()
            with tracer.recording() if EAGER_LINKS else contextlib.nullcontext():
                self._compiled_call(args, kwargs, tracer)
            self.chains = chaining.build(tracer.events, lambda c: SubgraphModule(
                c.subgraph.graph, c.arity, c.subgraph.weights), self._make_remote,
                self.label, timeout_s, self._own, ADOPT and EAGER_LINKS)
        return all(ready)

    def _capture(self, graph: torch.fx.GraphModule, example: list) -> Subgraph:
        weights = {i: t for i, t in enumerate(example) if self._own.get(id(t)) is t}
        with self._lock:
            subgraph = Subgraph(len(self.subgraphs), graph, weights, self,
                                dynamic=is_dynamic(graph.graph),
                                writes=chaining.writes_inputs(graph), outputs=Outputs(graph))
            self.subgraphs.append(subgraph)
        return subgraph

    def remote_for(self, subgraph: Subgraph, arity: int) -> Any:
        """Return the inner offloaded model of a subgraph (shared by graphs of the same code)."""
        key = (subgraph.graph.code, tuple((i, id(t)) for i, t in subgraph.weights.items()))
        with self._lock:
            if key not in self._remotes:
                module = SubgraphModule(subgraph.graph, arity, subgraph.weights)
                label = f'{self.label}.subgraph{subgraph.index}'
                self._remotes[key] = self._make_remote(TorchModule(module, label=label))
            return self._remotes[key]

    def _make_remote(self, local: TorchModule) -> Any:
        outer = self.outer
        return type(outer)(
            local, outer.server, outer.timeout_ms, mode=outer.mode,
            precision=outer.options['precision'], segments=outer.options['segments'],
            codec=outer.codec, priority=outer.keys['priority'],
            deadline_ms=outer.keys['deadline_ms'], task=outer.keys['task'],
            late=outer.keys['late'], connect_timeout_ms=outer.data.connect_timeout_ms,
            upload_timeout_ms=outer.upload_timeout_ms, record_timeout_ms=outer.record_timeout_ms,
            switch_after=outer.switch_after, link=outer.link, plan_feedback=outer.plan_feedback)

    def _sync(self, remote: Any) -> None:
        outer = self.outer
        if outer.link is not None and remote.link != outer.link:
            remote.set_link(*outer.link)
        if remote.codec != outer.codec:
            remote.set_codec(outer.codec)
        if remote.timeout_ms != outer.timeout_ms:
            remote.set_timeout(outer.timeout_ms)
        if self.plans is not None:
            self.plans.give(remote)

    # ------------------------------------------------------------------ calls
    def trace(self, subgraph: Subgraph, record: Any, local_ms: float) -> None:
        """Note one subgraph call of the current call (``record``: the inner model's)."""
        calls = getattr(self._local, 'calls', None)
        if calls is not None:
            calls.append((subgraph, record, local_ms))

    def quiet(self) -> Any:
        """Return a context in which no operator is noted (tracer) or checked (adopter)."""
        return partition_adopt.quiet(self._local)

    def following(self) -> Any:
        """Return the adopter of the chain this call follows, if any."""
        return getattr(self._local, 'adopter', None)

    def note(self, subgraph: Subgraph, arity: int, data: list, outputs: tuple) -> None:
        """Show a subgraph call to the tracer, while one watches (in :meth:`prepare`)."""
        tracer = getattr(self._local, 'tracer', None)
        if tracer is not None:
            tracer.note(subgraph, arity, data, outputs)

    def claim(self, subgraph: Subgraph, data: list) -> Any:
        """Return the guess of this call's chained request for this subgraph call, if any."""
        speculation = getattr(self._local, 'speculation', None)
        guess = speculation.claim(subgraph, data) if speculation is not None else None
        if guess is not None:
            self.trace(subgraph, guess.record, 0.0)
            self.guesses[1] += 1
        return guess

    def call_remote(self, subgraph: Subgraph, data: list) -> tuple:
        """Run a remote subgraph: alone, or as the head of its chain (one round trip)."""
        if subgraph.index not in self.chains:
            outputs = _inference(subgraph.remote(*data))
            self.trace(subgraph, subgraph.remote.last, 0.0)
            return subgraph.outputs.complete(outputs)
        model, remote, links = self.chains[subgraph.index]
        outputs = model.split(_inference(remote(*data)))
        self._local.speculation = chaining.speculate(model, links, data, outputs, remote.last)
        self.guesses[0] += len(self._local.speculation.queue)
        if model.steps and self._local.speculation.reached > 1:
            partition_adopt.follow(self._local, partition_adopt.Adopter(
                model.steps, outputs, self._local.speculation.reached,
                self._local.speculation, data))
        self.trace(subgraph, remote.last, 0.0)
        return subgraph.outputs.complete(outputs[0])

    def run(self, args: tuple, kwargs: dict, bandwidth_mbps: float = 0.0) -> tuple[Any, dict]:
        """
        Run one call; return its outputs and the fields of its call record.

        A call that dynamo fails to compile (a graph it cannot capture once the
        shapes after a break changed) runs the model eagerly on the robot
        instead, its record ``local`` with the failure as reason; the next
        call compiles (and offloads) again.  An error the model itself raises
        in that eager run reaches the caller, as it would without offloading.
        """
        for remote in self._remote_models():
            self._sync(remote)
        start = time.perf_counter()
        try:
            outputs, calls = self._compiled_call(args, kwargs)
        except Exception as exc:  # noqa: B902 - dynamo's errors have no common base
            log.warning('%s: this call could not be compiled (%s); it runs locally',
                        self.label, first_line(exc))
            with EXPORT_GUARD.shared(), torch.inference_mode():
                outputs = self.local.module(*args, **kwargs)
            self.last_call = []
            total_ms = (time.perf_counter() - start) * 1e3
            return outputs, local_fields(total_ms, bandwidth_mbps,
                                         f'cannot partition this call: {first_line(exc)}')
        total_ms = (time.perf_counter() - start) * 1e3
        return outputs, call_fields(calls, total_ms, bandwidth_mbps)

    def _compiled_call(self, args: tuple, kwargs: dict, tracer: Any = None) -> tuple[Any, list]:
        calls: list = []
        self._local.calls, self._local.tracer, self._local.speculation = calls, tracer, None
        try:
            with EXPORT_GUARD.shared(), torch.inference_mode(), torch._dynamo.config.patch(
                    **DYNAMO_CONFIG):
                outputs = self.compiled(*args, **kwargs)
        finally:
            partition_adopt.release(self._local, end=True)
            self._local.calls = self._local.speculation = self._local.tracer = None
        self.last_call = [(s.index, r is not None and r.result.value == 'offloaded')
                          for s, r, _ in calls]
        return outputs, calls

    # ------------------------------------------------------------------ reporting
    def describe(self) -> dict:
        """
        Return the partition: every captured subgraph, and where the last call ran each.

        ``last_call`` lists the subgraph indices the last call ran, in order,
        ``remote`` those the server ran; ``remote_flops`` and ``remote_share``
        are the server's part of the model's FLOPs in that call.
        """
        last = self.last_call
        remote = [i for i, offloaded in last if offloaded]
        flops = sum(self.subgraphs[i].flops for i in remote)
        return {'model_flops': self.model_flops, 'remote_flops': flops,
                'remote_share': flops / self.model_flops if self.model_flops else 0.0,
                'last_call': [i for i, _ in last], 'remote': remote,
                'chains': [[s.index if s is not None else 'ops' for s in links]
                           for _, _, links in self.chains.values()],
                'subgraphs': [s.describe() for s in self.subgraphs]}

    def stats(self) -> dict:
        """Return the inner models' counters summed, and the number of (remote) subgraphs."""
        remote = [s for s in self.subgraphs if s.remote is not None]
        data = {'subgraphs': len(self.subgraphs), 'remote_subgraphs': len(remote),
                'eager_subgraphs': sum(s.dynamic for s in remote), 'chains': len(self.chains),
                'chain_guesses': self.guesses[0], 'chain_claims': self.guesses[1]}
        for remote in self._remote_models():
            stats = remote.stats()
            for key in _COUNTERS:
                data[key] = data.get(key, 0) + stats.get(key, 0)
        return data

    def close(self) -> None:
        for remote in self._remote_models():
            remote.close()

    def _remote_models(self) -> list:
        return list(self._remotes.values()) + [remote for _, remote, _ in self.chains.values()]


def local_reason(flops: int, io_bytes: int, model_flops: int, data: list) -> str:
    """Return why a subgraph should run on the robot ('' if it is worth a round trip)."""
    if not all(isinstance(t, torch.Tensor) for t in data):
        return 'takes non-tensor inputs'
    if flops < MIN_SHARE * model_flops:
        return f'{flops} FLOPs: under {MIN_SHARE:.0%} of the model\'s {model_flops}'
    if flops < MIN_FLOPS_PER_BYTE * io_bytes:
        return (f'{flops} FLOPs for {io_bytes} bytes moved: under '
                f'{MIN_FLOPS_PER_BYTE:g} FLOPs per byte')
    return ''


def _inference(outputs: Any) -> tuple:
    """Return outputs as inference tensors, as local ones are (dynamo guards on dispatch keys)."""
    return tuple(o.clone() if isinstance(o, torch.Tensor) and not o.is_inference() else o
                 for o in outputs)
