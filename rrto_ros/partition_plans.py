"""
Plan tables for the remote subgraphs of a partitioned model.

A plan table (:mod:`rrto_ros.plan_table`) is solved for one program and one
input signature.  The remote subgraphs of a partitioned model
(:mod:`rrto_ros.partition`) are programs of their own, so a whole model's
table cannot reach them: each subgraph takes the table solved for its own
program.  ``offload(model, subgraph_plans=...)`` names the tables (a
directory of table files, a file, a table, or a list of them).  Once a
subgraph's model has exported its program, :meth:`SubgraphPlans.give` hands
it the table whose program digest and input signature match; from then on
its calls run under that table's plans (local, offload, split or hybrid per
link estimate, switched between calls, with plan feedback) exactly as a
whole model's calls do, in one round trip each.  A subgraph without a table
offloads whole.  ``rrto-plan`` solves the tables for a model that cannot be
exported whole: :func:`offloaded_subgraphs` returns the modules a partition
would offload (the same programs, so the tables match), and it solves one
table per module that takes one tensor.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import Any, Iterable

import torch
import torch._dynamo
from torch.utils.flop_counter import FlopCounterMode

from rrto_ros.local_model import TorchModule
from rrto_ros.partition import (counted_call, DYNAMO_CONFIG, local_reason, PREPARE_CALLS,
                                tensors_of)
from rrto_ros.partition_graphs import SubgraphModule
from rrto_ros.plan_table import PlanTable, program_key

log = logging.getLogger('rrto_ros.partition_plans')


class SubgraphPlans:
    """Plan tables keyed by the program they were solved for; given to subgraphs that match."""

    def __init__(self, tables: Iterable[PlanTable]):
        self.tables = list(tables)
        self._given: set[int] = set()     # ids of the subgraph models already looked at
        self._lock = threading.Lock()

    @classmethod
    def load(cls, source: Any) -> 'SubgraphPlans | None':
        """Return the tables of a directory, a file, a table or a list of them (None: none)."""
        if source is None or source == '' or isinstance(source, SubgraphPlans):
            return source or None
        if isinstance(source, (str, Path)) and Path(source).is_dir():
            items: list = sorted(Path(source).glob('*.json'))
            if not items:
                raise ValueError(f'no plan table (*.json) in {source}')
        elif isinstance(source, (str, Path, PlanTable)):
            items = [source]
        else:
            items = list(source)
        return cls(t if isinstance(t, PlanTable) else PlanTable.load(t) for t in items)

    def give(self, remote: Any) -> None:
        """
        Give a subgraph's model (an OffloadedModel) the table of its program, if there is one.

        Nothing happens until the model has exported its program; after that,
        once per model.  The model prepares the table's plans in the background
        (its calls run locally meanwhile, as while any table is prepared).
        """
        if id(remote) in self._given:
            return
        exported = [p for p in remote.prepared() if p.artifact is not None]
        if not exported:
            return
        prepared = exported[0]
        key = program_key(prepared.artifact)
        table = next((t for t in self.tables
                      if t.program == key and t.signature == prepared.signature), None)
        with self._lock:
            if id(remote) in self._given:
                return
            self._given.add(id(remote))
        if table is not None:
            log.info('%s runs under plan table %r', remote.local.label, table.label)
            remote.preparer.set_table(table)


def offloaded_subgraphs(model: TorchModule, args: tuple) -> list[tuple[TorchModule, list]]:
    """
    Return the subgraphs a partition of ``model`` offloads for ``args``, and their inputs.

    The model is compiled and called as :class:`~rrto_ros.partition.Partition`
    does (until a call captures no new graph); each graph the last call ran
    that is worth a round trip comes back as the module its inner offloaded
    model exports, labelled ``<model>.subgraph<index>`` as on the robot, with
    the tensors it took.
    """
    module = model.module
    own = {id(t): t for t in tensors_of(module)}
    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        module(*args)
    model_flops = int(counter.get_total_flops())
    graphs: list = []
    ran: list = []

    def capture(graph: torch.fx.GraphModule, example: list) -> Any:
        index = len(graphs)
        weights = {i: t for i, t in enumerate(example) if own.get(id(t)) is t}
        graphs.append((graph, weights))

        def call(*inputs: torch.Tensor) -> tuple:
            data = [a for i, a in enumerate(inputs) if i not in weights]
            outputs, flops, io_bytes = counted_call(graph, inputs, data)
            if not local_reason(flops, io_bytes, model_flops, data):
                ran.append((index, len(inputs), [t.detach().clone() for t in data]))
            return outputs
        return call

    compiled = torch.compile(module, backend=capture, dynamic=False)
    with torch.inference_mode(), torch._dynamo.config.patch(**DYNAMO_CONFIG):
        for _ in range(PREPARE_CALLS):
            captured = len(graphs)
            ran.clear()
            compiled(*args)
            if len(graphs) == captured:
                break
    return [(TorchModule(SubgraphModule(graphs[index][0], arity, graphs[index][1]),
                         label=f'{model.label}.subgraph{index}'), data)
            for index, arity, data in ran]
