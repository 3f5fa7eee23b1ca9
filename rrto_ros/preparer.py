"""
Prepare the server for each input signature of a model, in the background.

A :class:`Target` is one input signature (dtypes, shapes and nesting of the
call's arguments) and its :class:`PrepState`::

    NEW ──▶ PREPARING ──▶ READY ──(server lost the replay)──▶ PREPARING
                 │  ▲
                 │  └── server unreachable: wait until it answers, then again
                 └──▶ FAILED  (rejected for good, or the export failed)

Preparing is: ask the server ``hello`` (so an unreachable server is found
before the robot spends CPU on an export), export the model for the
signature, upload only the blobs the store lacks, record the replay, and
prepare the split/hybrid plans of the plan table.  A model that cannot be
exported whole (data-dependent operators) is partitioned instead
(:mod:`rrto_ros.partition`).  A target ready settles the heap: what preparing
built is kept out of the collector's full collections (:mod:`rrto_wire.heap`).
Only the :class:`Preparer` changes a target's state; callers ask
:meth:`Preparer.prepared` what is prepared.
"""

from __future__ import annotations

import enum
import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, TYPE_CHECKING

from rrto_ros.client import RemoteError, ServerUnavailable
from rrto_ros.graph import GraphAnalysis
from rrto_ros.hybrid import PlanRuntime
from rrto_ros.local_model import Artifact
from rrto_ros.plan_feedback import PlanFeedback
from rrto_ros.plan_table import PlanSelector, PlanTable, program_key
from rrto_ros.split import as_program
from rrto_ros import weight_versions
from rrto_wire import heap, treespec
from rrto_wire.errors import ErrorCode
from rrto_wire.tensors import signature_key, signature_of

if TYPE_CHECKING:   # rrto_ros.partition imports torch's tracer: loaded when a model needs it
    from rrto_ros.partition import Partition

log = logging.getLogger('rrto_ros.preparer')
_SHAPE = ('subgraphs', 'remote_subgraphs', 'eager_subgraphs', 'chains')    # not counters
MAX_SAME_CHANGES = 3    # the same tensor changed when each preparation came to be used: give up


class PrepState(str, enum.Enum):
    """Where one input signature stands with the server."""

    NEW = 'new'
    PREPARING = 'preparing'
    READY = 'ready'
    FAILED = 'failed'


class Target:
    """One input signature: its example inputs and what has been prepared for it."""

    def __init__(self, example: tuple):
        self.state = PrepState.NEW
        self.example = example              # (flat CPU tensors, in_spec)
        self.signature = signature_key(signature_of(example[0]))
        self.artifact: Artifact | None = None
        self.replay: str | None = None
        self.error = ''
        self.ready = threading.Event()      # set when READY or FAILED
        self.attempted = threading.Event()  # set after each preparation attempt
        self.selector: PlanSelector | None = None
        self.plans: dict[str, tuple[PlanRuntime, str]] = {}  # plan name -> (runtime, replay)
        self.partition: Partition | None = None   # set when the model cannot be exported whole
        self.whole = True                   # False once its export failed on the data
        self.weights: weight_versions.Snapshot | None = None    # what the server was given
        self.changed, self.changes = '', 0  # the last change seen in them, how many in a row


@dataclass(frozen=True)
class Prepared:
    """What is prepared for one input signature (:meth:`Preparer.prepared`)."""

    signature: str
    state: PrepState
    error: str
    replay: str | None
    plans: dict[str, str] = field(default_factory=dict)  # plan name -> replay ('': robot only)
    artifact: Artifact | None = None
    partitioned: bool = False


class Preparer:
    """
    The background thread that prepares targets, and the one owner of their states.

    ``model`` is the :class:`~rrto_ros.engine.OffloadedModel` it prepares for;
    it reads its public settings (``local``, ``control``, ``mode``, ``options``,
    ``upload_timeout_ms``, ``record_timeout_ms``, ``switch_after``,
    ``plan_feedback``) and adds to its ``counters``.  ``make_partition``
    returns the model's :class:`~rrto_ros.partition.Partition`.
    """

    def __init__(self, model: Any, table: PlanTable | None,
                 make_partition: Callable[[], Partition], name: str):
        self.model = model
        self.table = table
        self.partition: Partition | None = None   # shared by the signatures that need it
        self.retired: dict[str, int] = {}       # counters of partitions prepared again
        self._make_partition = make_partition
        self._targets: dict[tuple, Target] = {}
        self._lock = threading.Lock()
        self._jobs: queue.Queue = queue.Queue()
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._loop, name=f'{name}-prepare', daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ asked by the engine
    def target(self, flat: list, in_spec: Any) -> Target:
        """Return the target of these inputs, queuing its preparation if it is new."""
        key = (tuple((t.dtype, t.shape) for t in flat), repr(in_spec))
        with self._lock:
            target = self._targets.get(key)
            if target is None:
                example = ([t.detach().cpu().clone() for t in flat], in_spec)
                target = self._targets[key] = Target(example)
            if target.state == PrepState.NEW and self.model.mode != 'local':
                self._queue(target)
        return target

    def wait(self, target: Target, timeout_s: float) -> bool:
        """Wait until an attempt for ``target`` has ended; return True if it is READY."""
        target.attempted.wait(timeout_s)
        return target.state == PrepState.READY

    def prepared(self) -> list[Prepared]:
        """Return what is prepared for every input signature seen so far."""
        with self._lock:
            return [Prepared(t.signature, t.state, t.error, t.replay,
                             {name: replay for name, (_, replay) in t.plans.items()},
                             t.artifact, t.partition is not None)
                    for t in self._targets.values()]

    def reprepare(self, target: Target) -> None:
        """Prepare ``target`` again (the server lost its replay or a blob); keep the export."""
        with self._lock:
            target.replay, target.plans = None, {}
            target.ready.clear()
            self._queue(target)

    def stale(self, target: Target) -> str:
        """
        Return why a READY target's server copy is out of date, or ''; prepare it again.

        The module's weights or buffers changed since they were exported
        (``load_state_dict``, a write in place, a tensor replaced): the
        target, and every target sharing its partition, is exported, uploaded
        (a new digest) and recorded again; its calls run locally until then.
        """
        snapshot = target.weights
        what = snapshot.changed() if snapshot is not None else ''
        if not what:
            return ''
        why = weight_versions.reason(what)
        with self._lock:
            if target.state != PrepState.READY or target.weights is not snapshot:
                return why
            target.changes = target.changes + 1 if what == target.changed else 1
            target.changed = what
            if target.changes > MAX_SAME_CHANGES:     # the model's forward writes it
                target.state, target.error = PrepState.FAILED, (
                    f'cannot offload: {what} on each of {target.changes} calls (state the '
                    'model updates itself, read by what the server would run)')
                log.warning('%s: %s; it runs locally', self.model.local.label, target.error)
                return target.error
            old = target.partition
            group = [t for t in self._targets.values() if old is not None and t.partition is old]
            for t in group or [target]:
                t.artifact = t.replay = t.weights = t.selector = t.partition = None
                t.plans = {}
                t.error = why
                t.ready.clear()
                self._queue(t)
            if old is not None and old is self.partition:
                self.partition = None
        log.warning('%s: %s', self.model.local.label, why)
        if old is not None:     # its counters stay counted (stats() only grow)
            for key, value in old.stats().items():
                if key not in _SHAPE:
                    self.retired[key] = self.retired.get(key, 0) + value
            old.close()
        return why

    def give_up(self, target: Target, reason: str) -> None:
        """Mark ``target`` FAILED: its calls run locally from now on."""
        with self._lock:
            target.state, target.error = PrepState.FAILED, reason
            target.ready.set()

    def set_table(self, table: PlanTable | None) -> None:
        """Use ``table`` from now on; READY targets prepare its plans again."""
        with self._lock:
            self.table = table
            for target in self._targets.values():
                target.selector, target.plans = None, {}
                if target.state == PrepState.READY:
                    target.ready.clear()
                    self._queue(target)

    def close(self) -> None:
        """Stop the thread (it does not wait for a server that is away)."""
        self._closed.set()
        self._jobs.put(None)
        self._thread.join(timeout=5)
        if self.partition is not None:
            self.partition.close()

    # ------------------------------------------------------------------ the thread
    def _queue(self, target: Target) -> None:
        target.state = PrepState.PREPARING
        target.attempted.clear()
        self._jobs.put(target)

    def _loop(self) -> None:
        while not self._closed.is_set():
            target = self._jobs.get()
            if target is None:
                return
            if target.state != PrepState.PREPARING:
                continue
            try:
                self._prepare(target)
                with self._lock:
                    target.state, target.error = PrepState.READY, ''
                heap.settle('model prepared')  # its export and plans live on; not the calls'
            except ServerUnavailable as exc:
                target.error = f'server unreachable: {exc}'
                target.attempted.set()
                # try again once the server answers; close() must not wait for that
                while not self.model.control.wait_available(timeout_s=0.2):
                    if self._closed.is_set():
                        return
                with self._lock:
                    self._queue(target)
                continue
            except Exception as exc:  # noqa: B902 - any failure here means: run locally
                self.model.counters['prepare_errors'] += 1
                log.error('cannot offload %s: %s; it runs locally', self.model.local.label, exc)
                with self._lock:
                    target.state, target.error = PrepState.FAILED, f'cannot offload: {exc}'
            target.ready.set()
            target.attempted.set()

    def _prepare(self, target: Target) -> None:
        m = self.model
        if target.partition is not None:
            return
        m.control.hello()    # an unreachable server is found before an export costs CPU
        if target.artifact is None:
            weights = weight_versions.snapshot(m.local)     # before the export reads them
            if target.whole:
                try:
                    artifact = self._export(target)
                except Exception as exc:  # noqa: B902 - data-dependent: partitioned, else raised
                    from rrto_ros.partition import is_data_dependent
                    if not is_data_dependent(exc):
                        raise
                    target.whole = False
            if not target.whole:
                # what the model's own calls wrote is its running state: not the server's
                self._prepare_partition(target)
                target.weights = weight_versions.snapshot(m.local, weights.written()
                                                          if weights is not None else frozenset())
                return
            target.weights = weights    # changed while exporting: stale at the first call
            target.artifact = artifact
        artifact = target.artifact
        m.counters['uploads'] += m.control.upload(artifact.blobs,
                                                  timeout_ms=m.upload_timeout_ms)
        if m.mode == 'naive':
            return
        try:
            reply = self._record(artifact.model, artifact.signature)
        except RemoteError as exc:
            if exc.code != ErrorCode.BLOB_CORRUPT.value:
                raise
            # the server found a stored blob damaged and quarantined it: upload it again, once
            m.counters['uploads'] += m.control.upload(artifact.blobs,
                                                      timeout_ms=m.upload_timeout_ms)
            reply = self._record(artifact.model, artifact.signature)
        target.replay = reply['replay']
        m.server_ms = max(m.server_ms, sum(reply.get('segment_ms') or [0.0]))
        if m.auto_timeout:
            m.set_timeout('auto')
        how = f'in {reply["record_ms"]:.0f} ms' if reply.get('recorded') else 'already stored'
        log.info('%s: the server has recorded its replay (%s; one inference takes %.1f ms '
                 'there); offloading with a %g ms timeout', m.local.label, how,
                 m.server_ms, m.timeout_ms)
        table = self.table
        if table is not None and not target.plans:
            self._prepare_plans(target, table)

    def _export(self, target: Target):
        m = self.model
        flat, in_spec = target.example
        started = time.perf_counter()
        if m.exports is None:
            artifact, cached = m.local.artifact(flat, in_spec), False
        else:
            artifact, cached = m.exports.artifact(m.local, flat, in_spec)
        m.counters['cached_exports' if cached else 'exports'] += 1
        log.info('%s: %s for %s in %.0f ms', m.local.label,
                 'export read from the cache' if cached else 'exported', target.signature,
                 (time.perf_counter() - started) * 1e3)
        return artifact

    def _prepare_partition(self, target: Target) -> None:
        m = self.model
        log.info('%s cannot be exported whole (data-dependent operators): partitioning it',
                 m.local.label)
        self.partition = self.partition or self._make_partition()
        args, kwargs = treespec.unflatten(list(target.example[0]), target.example[1])
        self.partition.prepare(args, kwargs, m.record_timeout_ms / 1e3)
        target.partition = self.partition

    def _record(self, model: str, signature) -> dict:
        m = self.model
        reply = m.control.record(model, signature, m.options, timeout_ms=m.record_timeout_ms)
        m.counters['records'] += int(bool(reply.get('recorded')))
        return reply

    def _prepare_plans(self, target: Target, table: PlanTable) -> None:
        m = self.model
        artifact = target.artifact
        if program_key(artifact) != table.program:   # another input signature than the table's
            log.info('plan table of %s is for %s, not %s: whole inferences offload',
                     m.local.label, table.signature, signature_key(artifact.signature))
            return
        program = as_program(artifact.program)
        weights = artifact.weights()
        analysis = GraphAnalysis(program, {k: v.shape for k, v in weights.items()})
        for plan in table.plans():
            if plan.kind not in ('split', 'hybrid'):
                continue
            try:
                runtime = PlanRuntime(program, analysis, weights, plan, m.local.label)
                if runtime.server_blob is not None:
                    m.counters['uploads'] += m.control.upload(
                        {runtime.server_digest: ('program', runtime.server_blob)},
                        timeout_ms=m.upload_timeout_ms)
                    replay = self._record(runtime.server_digest,
                                          as_program(runtime.server_doc).signature)['replay']
                else:
                    replay = ''
                target.plans[plan.name] = (runtime, replay)
            except (RemoteError, ValueError) as exc:
                log.error('plan %s of %s cannot run: %s; it will be replaced by full offload',
                          plan.name, m.local.label, exc)
        target.selector = PlanSelector(table, self.model.switch_after,
                                       PlanFeedback() if m.plan_feedback else None)
