"""
Chains of a partitioned model's graphs: several subgraphs in one round trip, by guessing.

Between two of a detector's captured graphs, Python often branches on a size
the server computed (torchvision's ``batched_nms``: ``if boxes.numel() >
4000``, ``== 0``), so each graph used to cost its own round trip.  Yet the
next graph's inputs are mostly the previous graph's outputs, and dynamo
compiled it for exactly the shapes it saw.  While preparing, the partition
watches one call (:class:`Tracer`); :func:`plan` finds each remote subgraph
(the head) followed by subgraphs whose inputs are all the head's inputs or
earlier links' outputs, and the partition uploads them as one chained
program (:mod:`rrto_wire.program_chain`): link ``n`` runs on the server only
if its inputs' data-dependent sizes equal those it was compiled for (its
guard).  A call of the head sends one request; the links' outputs come back
with the head's, and each later subgraph call whose graph and input tensors
are exactly the guessed ones (the same tensor objects, the same weights) is
answered from them (:class:`Speculation`).  Anything else, a guard that
failed, another branch taken, a subgraph writing into a guessed input, ends
the guess: the remaining subgraphs run as before, at most one round trip
each.  Python outside the captured graphs that writes into a graph's output
in place between two graphs is not seen (dynamo captures tensor operations
into graphs; only code it does not trace could).
"""

from __future__ import annotations

import contextlib
import json
import logging
from dataclasses import dataclass, field
from typing import Any

import torch

from rrto_ros import partition_eager, partition_script
from rrto_ros.partition_adopt import same_bits
from rrto_ros.partition_graphs import writes_inputs  # noqa: F401 - partition's name for it
from rrto_ros.local_model import EXPORT_GUARD, Artifact, LocalModel, TorchModule
from rrto_ros.reply_check import check_outputs, program_outputs
from rrto_wire import program as program_format
from rrto_wire import treespec
from rrto_wire.program_chain import RELATIONS, GuardFailed, skipped
from rrto_wire import program_writer
from rrto_wire.program_writer import Link
from rrto_wire.dtypes import torch_dtype
from rrto_wire.errors import ProtocolError
from rrto_wire.tensors import TensorSpec

log = logging.getLogger('rrto_ros.partition')


@dataclass
class Call:
    """One subgraph call watched while preparing: its data inputs and its outputs."""

    subgraph: Any
    arity: int          # its graph's inputs: weights and data
    data: list
    outputs: tuple


class Tracer:
    """
    One call of the model, in order: its subgraph calls and the operators between them.

    While :meth:`recording`, each ATen operator that runs outside a captured
    graph is noted too (:class:`~rrto_ros.partition_eager.Recorder`).
    """

    def __init__(self):
        self.events: list = []
        self.recorder = partition_eager.Recorder(self.events)

    def note(self, subgraph: Any, arity: int, data: list, outputs: tuple) -> None:
        """Note one subgraph call: its data inputs and its tensor outputs."""
        self.events.append(Call(subgraph, arity, list(data), tuple(
            o for o in outputs if isinstance(o, torch.Tensor))))

    @property
    def calls(self) -> list[Call]:
        """Return the subgraph calls noted, in order."""
        return [e for e in self.events if isinstance(e, Call)]

    @contextlib.contextmanager
    def recording(self):
        """Note the operators run outside the graphs while in this context."""
        with self.recorder:
            yield

    @contextlib.contextmanager
    def paused(self):
        """Note no operator while a subgraph runs (its call is noted as one)."""
        self.recorder.paused += 1
        try:
            yield
        finally:
            self.recorder.paused -= 1


def is_remote(link: Any) -> bool:
    """Return True for a chain link that is a graph the server runs (not a local one)."""
    return isinstance(link, Call) and link.subgraph.remote is not None


def plan(events: list, own: dict | None = None,
         found: list | None = None) -> list[list[tuple[Any, list[tuple]]]]:
    """
    Return the chains of a watched call: per chain, its links as (link, sources), head first.

    A head is a remote subgraph; a later call joins its chain when each data
    input is the head's input j (``('in', j)``) or a link's output k
    (``('out', link, k)``, its k-th tensor output), the robot can rebuild its
    other outputs (sizes) from its tensor outputs, and it writes into none of
    its inputs.  Recorded operators between the calls join as segments
    (:class:`~rrto_ros.partition_eager.Builder`, ``own``: the module's
    weights by id), a link the server runs as a
    :class:`~rrto_ros.partition_eager.EagerModule`.  A local link or segment
    stays only if a later link takes its outputs; a chain needs a second
    remote link.  Subgraphs called twice in the call (a loop) chain nothing.
    A chain whose planning raises is left out (logged), the others stay.
    With ``found`` (a list), each segment returns every output but its views
    (:func:`~rrto_ros.partition_script.export_all`) and ``found`` gets, per
    chain, the head's position and the builder's links kept.
    """
    calls = [e for e in events if isinstance(e, Call)]
    counts: dict[int, int] = {}
    for call in calls:
        counts[id(call.subgraph)] = counts.get(id(call.subgraph), 0) + 1
    used: set[int] = set()
    chains = []

    def joins(call: Call, sources: list) -> bool:
        return (call.subgraph.flops >= 0 and counts[id(call.subgraph)] == 1
                and not call.subgraph.writes and call.subgraph.outputs.ok and id(call) not in used)

    for i, head in enumerate(events):
        if not isinstance(head, Call) or head.subgraph.remote is None or \
                counts[id(head.subgraph)] > 1 or id(head) in used:
            continue
        if found is None:
            kept, links = partition_eager.grow(head, events[i + 1:], i + 1, own or {}, joins,
                                               is_remote), []
        else:
            kept, links = partition_script.grow(head, events, i, own or {}, joins, is_remote)
        if sum(is_remote(link) for link, _ in kept) > 1:
            used.update(id(link) for link, _ in kept)
            chains.append(kept)
            if found is not None:
                found.append((i, links))
    return chains


def build(events: list, module_of: Any, remote_of: Any, label: str,
          timeout_s: float, own: dict | None = None, adopt: bool = False) -> dict[int, tuple]:
    """
    Plan the chains of a watched call and prepare each on the server.

    ``module_of(call)`` returns a call's graph as a module taking its data
    inputs, ``remote_of(local)`` an offloaded model of a local model.
    Returns head subgraph index -> (ChainModel, its offloaded model, the
    chain's links: subgraphs, None for a segment); a chain that cannot be
    written or recorded is left out (its subgraphs run one round trip each).
    With ``adopt``, a chain's ``steps`` are what the robot follows to take
    the server's values for its links (:mod:`rrto_ros.partition_adopt`).
    """
    found: list | None = [] if adopt else None
    chains = {}
    log.info('%s: one call ran subgraphs %s (r: remote), %d operators between them', label,
             ' '.join(f'{c.subgraph.index}{"r" if c.subgraph.remote is not None else ""}'
                      for c in events if isinstance(c, Call)),
             sum(not isinstance(e, Call) for e in events))
    for n, chain in enumerate(plan(events, own, found)):
        head = chain[0][0]
        name = f'{label}.chain{head.subgraph.index}'
        remote = None
        try:
            model = ChainModel([module_of(c) if isinstance(c, Call) else c
                                for c, _ in chain], chain, name)
            if found is not None:
                model.steps, reason = partition_script.steps(events, found[n], chain, own or {},
                                                             name)
                log.info('%s: %s', name, f'not adopted ({reason})' if reason else
                         f'adopted: {partition_script.describe(model.steps)}')
            remote = remote_of(model)
            ready = remote.warmup(*head.data, timeout_s=timeout_s)
        except Exception as exc:  # noqa: B902 - export's errors have no common base
            log.info('%s: not chained (%s: %s)', name, type(exc).__name__, exc)
            if remote is not None:
                remote.close()
            continue
        if ready:
            links = [c.subgraph if isinstance(c, Call) else None for c, _ in chain]
            chains[head.subgraph.index] = (model, remote, links)
            log.info('%s: links %s in one request', name, [
                s.index if s is not None else 'ops' for s in links])
        else:
            log.info('%s: not chained (the server did not record it)', name)
            remote.close()
    return chains


class ChainModel(LocalModel):
    """
    The local side of a chained program: its links run in order, each after its guard.

    :meth:`run` computes what the server returns (a failed guard: zeros of the
    declared shapes, guarded dimensions empty), so a call the server cannot
    serve falls back to exactly the same outputs; :meth:`artifact` is the
    program :func:`~rrto_wire.program_writer.chain` wrote.
    """

    def __init__(self, modules: list, chain: list, label: str):
        self.label = label
        self.steps: list = []        # what a call follows to adopt the links' values
        self.modules = modules
        self.sources = [sources for _, sources in chain]
        links, self.leaves, self.inline = [], [], []
        for (link, sources), module in zip(chain, modules):
            if isinstance(link, Call):
                artifact = TorchModule(module, label).artifact(link.data, _spec(link.data))
                doc, weights = artifact.program, artifact.weights()
            else:       # recorded operators: their own program, their guards inside
                data, weights = module.program(label)
                doc = json.loads(data)
            self.leaves.append(program_outputs(doc))
            self.inline.append([(len(links), k, dim, 'eq', size)
                                for k, dim, size in getattr(module, 'tests', [])])
            links.append(Link(doc, weights, sources, []))
        for n, link in enumerate(links[1:], 1):
            link.tests = self.tests(n, links, chain)
        self.counts = [len(link.doc['outputs']) for link in links]
        data, blob = program_writer.chain(links, label)
        doc = program_format.Program.parse(data)        # the server's view of it
        self.skipped = [(tuple(spec.shape), torch_dtype(spec.dtype))
                        for spec in doc.output_specs()]
        self.link_tests = [link.tests for link in links]
        blobs = {program_format.sha256(data): ('program', data)}
        if blob:
            blobs[program_format.sha256(blob)] = ('weights', blob)
        head = chain[0][0].data
        self._artifact = Artifact(program_format.sha256(data), tuple(TensorSpec.of(t)
                                  for t in head), {'tuple': ['T'] * sum(self.counts)},
                                  blobs, json.loads(data))

    @staticmethod
    def tests(n: int, links: list[Link], chain: list) -> list[tuple]:
        """Link ``n``'s guard: each data-dependent size of its inputs as it was traced."""
        tests = []
        for (kind, *where), value in zip(chain[n][1], chain[n][0].data):
            if kind != 'out':
                continue
            link, k = where
            name = links[link].doc['outputs'][k].get('n')
            node = next((x for x in links[link].doc['nodes'] if x['name'] == name), None)
            out = (node or {}).get('out') or {}
            tests += [(link, k, d, 'eq', int(value.shape[d])) for d in out.get('dims', ())]
        return tests

    def run(self, args: tuple, kwargs: dict) -> tuple:
        values: list[tuple] = []
        stopped = False
        with EXPORT_GUARD.shared(), torch.inference_mode():
            for n, (module, sources) in enumerate(zip(self.modules, self.sources)):
                stopped = stopped or not holds(self.link_tests[n], values)
                if not stopped:
                    inputs = [args[s[1]] if s[0] == 'in' else values[s[1]][s[2]]
                              for s in sources]
                    try:
                        values.append(tuple(module(*inputs)))
                        continue
                    except GuardFailed:     # a recorded segment's size guard
                        stopped = True
                values.append(None)
        flat, at = [], 0
        for n, outputs in enumerate(values):
            count = self.counts[n]
            flat += list(outputs) if outputs is not None else [
                skipped(shape, dtype) for shape, dtype in self.skipped[at:at + count]]
            at += count
        return tuple(flat)

    def artifact(self, flat: list, in_spec: Any) -> Artifact:
        got = tuple(TensorSpec.of(t) for t in flat)
        if got != self._artifact.signature:
            raise ValueError(f'chain {self.label} was written for {self._artifact.signature}')
        return self._artifact

    def split(self, flat: tuple) -> list[tuple]:
        """Return a chained call's flat outputs per link."""
        per, at = [], 0
        for count in self.counts:
            per.append(tuple(flat[at:at + count]))
            at += count
        return per


def holds(tests: list[tuple], values: list) -> bool:
    """Evaluate a link's guard on the outputs of the links before it (as the server does)."""
    for link, k, dim, relation, constant in tests:
        tensor = values[link][k]
        if not RELATIONS[relation](tensor.numel() if dim is None else tensor.shape[dim],
                                   constant):
            return False
    return True


@dataclass
class Guess:
    """
    A link's outputs the server computed, and the inputs it computed them from.

    ``seen`` holds copies of those inputs as they came back: Python between two
    graphs (eager code dynamo skipped, a hook) may write into them in place, and
    the inference tensors a partitioned call returns carry no version counter,
    so a claim compares values (r5 B1: a guess was claimed after ``x.add_(1)``).
    """

    subgraph: Any
    inputs: list
    outputs: tuple
    record: Any
    seen: list

    def unchanged(self) -> bool:
        """Return True if every input still holds the values the server computed from."""
        return all(not isinstance(now, torch.Tensor) or same_bits(now, then)
                   for now, then in zip(self.inputs, self.seen))


@dataclass
class Speculation:
    """The guesses of one call still to be claimed, in order."""

    queue: list[Guess]
    members: set = field(default_factory=set)     # ids of the chain's subgraphs
    sources: set = field(default_factory=set)     # ids of the tensors the guesses read
    reached: int = 0                              # links the server ran

    def claim(self, subgraph: Any, data: list) -> tuple | None:
        """Return the guessed outputs if ``subgraph`` is called on the guessed inputs."""
        if self.queue:
            guess = self.queue[0]
            if guess.subgraph is subgraph and len(data) == len(guess.inputs) and all(
                    _same(a, b) for a, b in zip(data, guess.inputs)) and guess.unchanged():
                self.queue.pop(0)
                return guess
        if id(subgraph) in self.members or (subgraph.writes and any(
                id(t) in self.sources for t in data)):
            self.queue.clear()      # another branch, or a write into what the guess read
        return None


def speculate(chain: ChainModel, links: list, head_data: list, outputs: list[tuple],
              record: Any) -> Speculation:
    """
    Return the guesses of a chained call whose outputs per link are ``outputs``.

    ``links`` are the chain's subgraphs (None for a segment of recorded
    operators).  Each link ran on the server only if every guard up to it
    held: those before it on its inputs' sizes, and a segment's own after
    each size-varying operator (evaluated here on the sizes that came back).
    Graphs are guessed, local ones too (claimed on the same bytes, they are
    offloaded graphs); segments are adopted (:mod:`rrto_ros.partition_adopt`).
    """
    queue = []
    reached = 1
    mine = partition_script.native(chain.steps)     # local links the robot runs itself
    for n in range(1, len(links)):
        if not holds(chain.link_tests[n] + chain.inline[n], outputs):
            break           # the server stopped here: the rest runs as usual
        try:
            check_outputs(outputs[n], chain.leaves[n])
        except ProtocolError:
            break
        reached = n + 1
        if links[n] is None or (links[n].remote is None and (not chain.steps or n in mine)):
            continue        # a local graph only when adopting (its inputs: the server's)
        inputs = [head_data[s[1]] if s[0] == 'in' else outputs[s[1]][s[2]]
                  for s in chain.sources[n]]
        seen = [t.clone() if isinstance(t, torch.Tensor) else t for t in inputs]
        queue.append(Guess(links[n], inputs, links[n].outputs.complete(outputs[n]), record,
                           seen))
    return Speculation(queue, {id(s) for n, s in enumerate(links) if n and s is not None
                               and n not in mine},
                       {id(t) for guess in queue for t in guess.inputs}, reached)


def _same(a: Any, b: Any) -> bool:
    """Return True if the robot's input ``a`` is, or holds the bytes of, the input ``b``."""
    return a is b or (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)
                      and same_bits(a, b))


def _spec(data: list) -> Any:
    return treespec.flatten((tuple(data), {}))[1]
