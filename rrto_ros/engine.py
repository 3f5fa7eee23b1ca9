"""
One model's execution on the robot: offloaded when it can be, local when it must be.

``offload(model, server=..., timeout_ms=...)`` returns an :class:`OffloadedModel`,
a callable with the model's own signature.  For each new input signature it
prepares the server in the background (export, upload only what the store
lacks, record); until that is done, and whenever the server is unreachable,
slow or failing, calls run locally and say so in their :class:`CallRecord`.
After recording, one call is one request and one reply carrying only the
input and output tensors.

With a plan table (:mod:`rrto_ros.plan_table`) each call runs under the plan
chosen for the current link estimate (:meth:`OffloadedModel.set_link`):
local, full offload, a layer split, or a hybrid row split in which robot and
server compute at the same time.  Plans change only between calls, and a
plan that measures worse than a baseline is replaced
(:mod:`rrto_ros.plan_feedback`; ``plan_feedback=False`` turns that off).

The work is split three ways: :mod:`rrto_ros.preparer` owns each input
signature's preparation state, :mod:`rrto_ros.call_path` serves one call,
:mod:`rrto_ros.records` says how it went.  This module holds the options and
the public API.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import Any, Callable, TYPE_CHECKING

from rrto_ros.client import RrtoClient
from rrto_ros.call_path import CallPath
from rrto_ros.codec_choice import CANDIDATES as AUTO_CODECS
from rrto_ros.codec_choice import check_codec, CodecChooser
from rrto_ros.export_cache import ExportCache
from rrto_ros.local_model import LocalModel, load_local_model
from rrto_ros.partition_plans import SubgraphPlans
from rrto_ros.plan_table import bind_table, PlanTable
from rrto_ros.preparer import Prepared, Preparer
from rrto_ros.records import CallRecord, OffloadResult
from rrto_ros.resolver import fleet_clients
from rrto_wire import codecs, heap, treespec
from rrto_wire.curve import ClientKeys

if TYPE_CHECKING:   # rrto_ros.partition imports torch's tracer: loaded when a model needs it
    from rrto_ros.partition import Partition

log = logging.getLogger('rrto_ros.engine')

MODES = ('replay', 'eager', 'naive', 'local')
FALLBACKS = ('local', 'skip')
AUTO_TIMEOUT = 'auto'
# an 'auto' budget: AUTO_FACTOR times the server's recent inference time, never less than
# AUTO_FLOOR_MS (also the budget before the server has measured) nor more than
# AUTO_CEILING_MS (a stopping node waits for a call in flight; launch escalates after 5 s)
AUTO_FLOOR_MS = 200.0
AUTO_FACTOR = 3.0
AUTO_CEILING_MS = 4000.0
AUTO_SMOOTHING = 0.2    # weight of the newest reply in the server-time estimate


class OffloadedModel:
    """A model whose calls run on rrto_server when possible (see module docstring)."""

    def __init__(self, model: Any, server: str = 'tcp://127.0.0.1:5555',
                 timeout_ms: float | str = 200.0,
                 *, mode: str = 'replay', precision: str = 'fp32', segments: str = 'whole',
                 codec: str = codecs.RAW, priority: int = 0, deadline_ms: float | None = None,
                 task: str = '', late: str | None = None, connect_timeout_ms: float = 1000.0,
                 upload_timeout_ms: float = 60000.0, record_timeout_ms: float = 120000.0,
                 plan_table: str | Path | PlanTable | None = None, switch_after: int = 2,
                 link: tuple[float, float] | None = None, plan_feedback: bool = True,
                 server_key: str | None = None, client_key: str | None = None,
                 directory: str = '', duplicate: bool = False, subgraph_plans: Any = None,
                 export_cache: str | Path | None = None, fallback: str = 'local'):
        if mode not in MODES:
            raise ValueError(f'mode must be one of {MODES}, got {mode!r}')
        if fallback not in FALLBACKS:
            raise ValueError(f'fallback must be one of {FALLBACKS}, got {fallback!r}')
        self.fallback = fallback
        if late not in (None, 'drop', 'run'):
            raise ValueError(f"late must be 'drop', 'run' or None, got {late!r}")
        self.local: LocalModel = load_local_model(model)
        self.server = server
        self.auto_timeout = False
        self.timeout_ms = AUTO_FLOOR_MS
        self.mode = mode
        self.options = {'precision': precision, 'mode': 'eager' if mode == 'eager' else 'replay',
                        'segments': segments}
        self.codec = codecs.RAW
        self.chooser: CodecChooser | None = None    # per-call codec choice (codec='auto')
        self.link: tuple[float, float] | None = None
        self.set_codec(codec)
        self.keys = {'priority': priority, 'deadline_ms': deadline_ms,
                     'task': task or self.local.label, 'late': late}
        self.upload_timeout_ms = upload_timeout_ms
        self.record_timeout_ms = record_timeout_ms
        self.switch_after = switch_after
        self.plan_feedback = plan_feedback
        self.exports = ExportCache(export_cache) if export_cache else None
        table = bind_table(_load_table(plan_table), self.local)
        self.subgraph_plans = SubgraphPlans.load(subgraph_plans)   # partitioned models' tables
        self.link = None
        if link is not None:
            self.set_link(*link)
        name = self.keys['task']
        curve = ClientKeys.load(server_key, client_key) if client_key or server_key else None
        if directory:   # fleet mode: replicas found through the directory (rrto_ros.resolver)
            self.data, self.control = fleet_clients(
                directory, name=name, connect_timeout_ms=connect_timeout_ms,
                call_timeout_ms=AUTO_FLOOR_MS, record_timeout_ms=record_timeout_ms,
                duplicate=duplicate, keys=curve)
        else:
            self.data = RrtoClient(server, connect_timeout_ms=connect_timeout_ms,
                                   call_timeout_ms=AUTO_FLOOR_MS, name=f'{name}-data',
                                   keys=curve)
            self.control = RrtoClient(server, connect_timeout_ms=connect_timeout_ms,
                                      call_timeout_ms=record_timeout_ms, name=f'{name}-control',
                                      keys=curve)
        self.server_ms = 0.0    # the server's inference time: when it recorded, then replies
        self.set_timeout(timeout_ms)
        self._call_lock = threading.Lock()
        self.counters = {'calls': 0, 'offloaded': 0, 'local': 0, 'fallbacks': 0, 'uploads': 0,
                         'records': 0, 'prepare_errors': 0, 'plan_switches': 0, 'exports': 0,
                         'cached_exports': 0, 'skipped': 0}
        self.last: CallRecord | None = None
        self.listeners: list[Callable[[CallRecord], None]] = []
        self.preparer = Preparer(self, table, self._partition, name)
        self.calls = CallPath(self)

    # ------------------------------------------------------------------ public API
    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        with self._call_lock:
            timeouts = self.data.counters['timeouts']
            outputs, record = self.calls.run(args, kwargs)
            if self.auto_timeout:
                self.follow_server(record, self.data.counters['timeouts'] > timeouts)
        deadline_ms = self.keys['deadline_ms']
        if deadline_ms is not None and record.total_ms > deadline_ms:
            record.deadline_missed = True
        self.last = record
        for listener in self.listeners:
            listener(record)
        return outputs

    def warmup(self, *args: Any, timeout_s: float = 120.0, **kwargs: Any) -> bool:
        """
        Prepare the server for these inputs' signature (and plans); return True once ready.

        Returns False after ``timeout_s``, when preparation failed, or as soon as
        an attempt found the server unreachable (preparation resumes in the
        background when it answers again).
        """
        flat, in_spec = treespec.flatten((args, kwargs))
        target = self.preparer.target(flat, in_spec)
        self.preparer.stale(target)     # weights changed since: prepared again
        return self.preparer.wait(target, timeout_s)

    def prepared(self) -> list[Prepared]:
        """
        Return what is prepared for each input signature seen so far.

        One :class:`~rrto_ros.preparer.Prepared` per signature: its state
        (new, preparing, ready, failed), the error that keeps it local, its
        replay id, its prepared plans (name -> replay id) and its artifact.
        """
        return self.preparer.prepared()

    @property
    def table(self) -> PlanTable | None:
        """Return the plan table in use (None: whole inferences offload)."""
        return self.preparer.table

    def _partition(self) -> Partition:
        from rrto_ros.partition import Partition   # torch's tracer, only for models that need it
        return Partition(self)

    @property
    def partition(self) -> Partition | None:
        """Return the partition of a model that cannot be exported whole (else None)."""
        return self.preparer.partition

    def stats(self) -> dict:
        """Return counters: calls, round_trips, uploads, records, fallbacks, bytes_sent, ..."""
        data = dict(self.counters)
        for key in ('round_trips', 'bytes_sent', 'bytes_received', 'timeouts', 'reconnects',
                    'errors'):
            data[key] = self.data.counters[key] + self.control.counters[key]
        data['infer_round_trips'] = self.data.counters['round_trips']
        partition = self.partition.stats() if self.partition else {}
        for key, value in list(partition.items()) + list(self.preparer.retired.items()):
            data[key] = data.get(key, 0) + value
        return data

    def set_timeout(self, timeout_ms: float | str) -> None:
        """
        Change the per-call timeout (takes effect from the next call).

        ``'auto'``: :data:`AUTO_FACTOR` times the server's recent inference
        time, within :data:`AUTO_FLOOR_MS` .. :data:`AUTO_CEILING_MS`.  The
        server measures it when it records; from then on each reply's
        ``server_ms`` plus ``network_ms`` moves the estimate (:data:`AUTO_SMOOTHING`), and a reply
        later than the budget doubles it: a server slower than it measured (a
        loaded CPU server) gets a longer budget instead of a stream of
        abandoned requests.
        """
        self.auto_timeout = timeout_ms == AUTO_TIMEOUT
        if self.auto_timeout:
            timeout_ms = min(AUTO_CEILING_MS, max(AUTO_FLOOR_MS, AUTO_FACTOR * self.server_ms))
        elif isinstance(timeout_ms, str) or not timeout_ms > 0:
            raise ValueError(f"timeout_ms must be positive or 'auto', got {timeout_ms!r}")
        self.timeout_ms = float(timeout_ms)
        self.data.call_timeout_ms = float(timeout_ms)

    def follow_server(self, record: CallRecord, timed_out: bool) -> None:
        """
        Learn from one call's record (each call does this under ``timeout_ms='auto'``).

        An offloaded call moves the server-time estimate by its server and
        network time; a call whose reply was later than the budget (``timed_out``)
        doubles it.  The auto budget follows (:meth:`set_timeout`).
        """
        if record.result == OffloadResult.OFFLOADED and record.server_ms > 0:
            waited = record.server_ms + record.network_ms   # what the budget has to cover
            self.server_ms += AUTO_SMOOTHING * (waited - self.server_ms)
        elif timed_out:
            self.server_ms = max(2 * self.server_ms, self.timeout_ms / AUTO_FACTOR * 2)
        else:
            return
        before = self.timeout_ms
        self.set_timeout(AUTO_TIMEOUT)
        if timed_out and self.timeout_ms > before:
            log.info('%s: a reply came later than %g ms; the auto timeout is now %g ms',
                     self.local.label, before, self.timeout_ms)

    def set_link(self, bandwidth_mbps: float, rtt_ms: float) -> None:
        """Tell the model the current link estimate; the next call's plan and codec follow it."""
        if not bandwidth_mbps > 0 or not rtt_ms >= 0:
            raise ValueError('bandwidth must be positive and RTT non-negative')
        self.link = (float(bandwidth_mbps), float(rtt_ms))
        if self.chooser is not None:
            self.chooser.set_bandwidth(self.link[0])

    def set_codec(self, codec: str) -> None:
        """
        Send inputs with ``codec`` from the next call on.

        ``raw``, ``lz4``, ``zstd``, ``jpeg``/``jpeg:Q`` (lossy, uint8 HWC images
        only), or ``auto`` / ``auto_lossy`` to choose per call by the link
        estimate (see :mod:`rrto_ros.codec_choice`).
        """
        check_codec(codec)
        self.codec = codec
        self.chooser = CodecChooser(codec) if codec in AUTO_CODECS else None
        if self.chooser is not None and self.link is not None:
            self.chooser.set_bandwidth(self.link[0])

    def set_plan_table(self, table: str | Path | PlanTable | None) -> None:
        """
        Use another plan table (or none: plain offload); prepared in the background.

        Raises :class:`~rrto_ros.plan_table.PlanTableMismatch` if the table was
        solved for another program or input signature.
        """
        self.preparer.set_table(bind_table(_load_table(table), self.local))

    def close(self) -> None:
        self.preparer.close()
        self.data.close()
        self.control.close()
        heap.dropped(self)  # what its preparation froze goes at the process's next settles

    def __enter__(self) -> 'OffloadedModel':
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _add_traffic(record: CallRecord, counters: dict, before: dict) -> None:
    """Set a record's requests (answered or timed out) and bytes from the client's counters."""
    record.round_trips = (counters['round_trips'] - before['round_trips']
                          + counters['timeouts'] - before['timeouts'])
    record.bytes_sent = counters['bytes_sent'] - before['bytes_sent']
    record.bytes_received = counters['bytes_received'] - before['bytes_received']


def _load_table(table: str | Path | PlanTable | None) -> PlanTable | None:
    if table is None or table == '':
        return None
    return table if isinstance(table, PlanTable) else PlanTable.load(table)


def offload(model: Any, server: str = 'tcp://127.0.0.1:5555', timeout_ms: float = 200.0,
            **options: Any) -> OffloadedModel:
    """
    Return a callable that runs ``model`` on rrto_server, with the same outputs as locally.

    ``model`` is an ``nn.Module``, a ``.pt2``/TorchScript/ONNX file, or
    ``python:module:factory``.  ``options`` are those of :class:`OffloadedModel`
    (``mode``, ``precision``, ``segments``, ``codec``, ``priority``,
    ``deadline_ms``, ``task``, ``late``, ``connect_timeout_ms``, ``plan_table``,
    ``switch_after``, ``link``, ``plan_feedback``, ``server_key``, ``client_key``,
    ``directory``, ``duplicate``, ``subgraph_plans``, ``export_cache``, ...).
    ``subgraph_plans`` gives a model that cannot be exported whole the plan tables
    of its remote subgraphs (:mod:`rrto_ros.partition_plans`).  ``export_cache``
    (a directory) keeps the robot's exports on disk, so a restart skips
    ``torch.export`` (:mod:`rrto_ros.export_cache`).  ``server_key`` (the server's public
    ``.key`` file) and ``client_key`` (this robot's ``.key_secret``) make every
    connection CURVE-authenticated and encrypted; the client then talks only to
    the server holding that key.  With ``directory='tcp://...'`` (fleet mode,
    :mod:`rrto_ros.resolver`) ``server`` is unused: replicas are found through
    the fleet directory, and ``duplicate=True`` sends each inference to two of
    them.  ``deadline_ms`` is the call's budget: the server drops a request it
    cannot start in time (``late='drop'``, answered at once, then computed
    locally) or runs it late (``late='run'``); either way
    ``last.deadline_missed`` says so.
    """
    return OffloadedModel(model, server, timeout_ms, **options)
