"""
Requests the control thread serves: uploads, recordings' first trial, profiles, evictions.

Each handler checks its request on the I/O thread, then queues the slow part
(writing to the store, the sandbox's trial run of a model not yet vetted,
loading a model, deleting files) on the control thread
(:class:`~rrto_server.put_queue.ControlQueue`, round robin between client
keys), so neither the I/O thread nor a device lane waits for it.  That work
answers its own request, exactly once.  A vetted recording then enters the
scheduler through the :class:`~rrto_server.record_gate.RecordGate` (one per
key at a time), as that key's ticket of the shared
:class:`~rrto_server.recording.Recording` of its replay key, and spends the key's
record budget; a profile runs as :class:`~rrto_server.profile_job.ProfileJob`
steps within the key's profile budget.  The sandbox trial of a program that a
record or a profile uses first is paid from that same budget (both
:class:`~rrto_server.profiling.DeviceBudget`; keys with the ``admin`` role, a fleet's
deputised key and every client of a server without keys have no record budget).
"""

from __future__ import annotations

from functools import partial

import msgspec
import torch

from rrto_server import profiling
from rrto_server import segments as segmentation
from rrto_server.guard import Guard
from rrto_server.jobs import Services, replay_info
from rrto_server.models import ModelRegistry
from rrto_server.options import ServerConfig
from rrto_server.profile_job import ProfileJob
from rrto_server.put_queue import ControlQueue, PutQueue
from rrto_server.record_gate import GatedRecordJob, RecordGate
from rrto_server.recording import Recordings
from rrto_server.replay_cache import ReplayCache
from rrto_server.replay_key import check_options, replay_key
from rrto_server.requests import Request
from rrto_server.sandbox import FREE
from rrto_server.scheduler import Scheduler
from rrto_server.stats import ServerStats
from rrto_server.store import BlobStore
from rrto_wire import protocol as wire
from rrto_wire.errors import ErrorCode, ProtocolError

PUT_QUEUE_MESSAGES = 4      # uploads waiting for the control thread, in whole messages
RECORD_BURST_S, RECORD_RATE = 30.0, 0.1     # a key's record budget: seconds, seconds back/s


class ControlRequests:
    """The handlers of ``put``, ``record``, ``profile`` and ``evict``; the thread they share."""

    def __init__(self, config: ServerConfig, guard: Guard, store: BlobStore,
                 registry: ModelRegistry, replays: ReplayCache, scheduler: Scheduler,
                 services: Services, stats: ServerStats):
        self.config, self.guard, self.store, self.registry = config, guard, store, registry
        self.replays, self.scheduler, self.services, self.stats = \
            replays, scheduler, services, stats
        self.queue = ControlQueue()
        self.put_queue = PutQueue(PUT_QUEUE_MESSAGES * config.max_message_bytes)
        self.recordings = Recordings()
        self.record_gate = RecordGate(scheduler.submit)
        self.profile_budget = profiling.DeviceBudget('profile')
        self.record_budget = profiling.DeviceBudget('record', RECORD_BURST_S, RECORD_RATE)
        self._deputies: set[str] = set()

    def deputise(self, name: str) -> None:
        """
        Record for key ``name`` without its record budget: it records for other keys.

        A fleet replica's server deputises the fleet key its directory warms with
        (:class:`~rrto_fleet.replica.Replica`): every robot's warms are recorded as
        that key, so one budget for all of them would let one robot spend every
        robot's.  The directory bounds each robot's recordings instead (one warm at a
        time per key, at most its ``max_replays`` claimed specs).
        """
        self._deputies.add(name)

    def close(self) -> None:
        """Stop the control thread; queued work is dropped."""
        self.queue.shutdown(wait=True, cancel_futures=True)

    def on_put(self, request: Request, frames: list) -> None:
        if not self.config.allow_upload:
            raise ProtocolError(
                ErrorCode.UPLOAD_DISABLED,
                'this server was started with --no-upload; it serves only stored models')
        header = request.header
        chunks = wire.decode_tensors(header.tensors, frames, self.config.max_message_bytes)
        if len(chunks) != 1 or chunks[0].dtype != torch.uint8 or chunks[0].dim() != 1:
            raise ProtocolError(ErrorCode.BAD_REQUEST, 'put carries exactly one uint8 chunk')
        chunk = memoryview(chunks[0].numpy())
        nbytes = max(request.size, chunk.nbytes)
        owner_key = self.key(request)
        self.put_queue.enter(nbytes, owner_key)     # the control thread may be in a trial

        def write() -> None:
            self.put_queue.leave(nbytes, owner_key)
            try:
                owner = self.owner(request)
                complete = self.store.put_chunk(header.digest, header.blob_kind, header.upload,
                                                header.offset, header.total, chunk, owner,
                                                request.client.grant.store_bytes)
                if complete:
                    self.stats.count(header.digest, 'uploads')
                request.ok(complete=complete)
            except ProtocolError as exc:
                request.error(exc)
            except OSError as exc:
                request.error(ProtocolError(ErrorCode.INTERNAL, f'store write failed: {exc}'))
            except Exception as exc:
                request.fail(exc)

        self.queue.submit(write, owner_key)

    def owner(self, request: Request) -> str | None:
        """Return the client key that sent ``request`` (None on a server without keys)."""
        return request.client.name if self.guard.authenticating else None

    def key(self, request: Request):
        # whose turn a unit of control-thread work waits for: its key (its connection on
        # a server without keys)
        return request.peer if self.owner(request) is None else request.client.name

    def budget_key(self, request: Request) -> str | None:
        """Return whose record budget ``request`` spends (None: admins, servers without keys)."""
        owner = self.owner(request)
        if owner is None or request.client.grant.allows('admin') or owner in self._deputies:
            return None
        return owner

    def record_pay(self, budget_key: str | None):
        """Return who pays a trial for ``budget_key``: its record budget (FREE: no budget)."""
        return FREE if budget_key is None else partial(self.record_budget.spending, budget_key)

    def vet_then_op(self, request: Request, submit) -> None:
        """
        Run a naive ``op`` once its model is loaded; ``submit()`` queues its job (a14 #5).

        A model not loaded yet is vetted here on the control thread first, its trial paid
        from the key's record budget, never on a device lane inside the ``op`` job.
        """
        digest = request.header.model
        if self.registry.loaded_model(digest) is not None:
            submit()
            return
        pay = self.record_pay(self.budget_key(request))

        def vet_then_submit() -> None:
            if _or_answer(request, self.registry.get, digest, pay) is not None:
                submit()
        self.queue.submit(vet_then_submit, self.key(request))

    def on_record(self, request: Request, frames: list) -> None:
        header = request.header
        check_options(header.options)
        replay = self.replays.claim(replay_key(header.model, header.signature, header.options),
                                    request.client)
        if replay is not None:
            request.ok(**replay_info(replay, recorded=False))
            return
        budget_key = self.budget_key(request)

        def vet_then_record() -> None:      # a first trial run blocks neither I/O nor lanes
            pay = self.record_pay(budget_key)
            options = _or_answer(request, self._vet, header.model, header.signature,
                                 header.options, pay)
            if options is None:
                return
            key = replay_key(header.model, header.signature, options)
            replay = self.replays.claim(key, request.client)
            if replay is not None:          # options written another way: recorded already
                request.ok(**replay_info(replay, recorded=False))
                return
            try:                            # only a recording to be made spends the budget
                if budget_key is not None:
                    self.record_budget.check(budget_key)
            except ProtocolError as exc:
                request.error(exc)
                return
            # a request of another key for the same replay waits with its own ticket: in its
            # own gate and at its own priority, whichever ticket runs first records (a11 #3)
            ticket = self.key(request)
            recording = self.recordings.join(key, header.model, header.signature, options,
                                             request, ticket,
                                             lambda: self.replays.claim(key, request.client))
            if recording is not None:
                self.record_gate.submit(GatedRecordJob(
                    self.record_gate, ticket, self.services, self.recordings, recording,
                    ticket, request, self.record_budget, budget_key))
        self.queue.submit(vet_then_record, self.key(request))

    def _vet(self, digest: str, signature, options, pay):
        """Vet a model for a recording; return the options, segments canonical (a11 #2)."""
        if self.store.kind(digest) == 'onnx':
            self.registry.vet(digest, signature, pay)
            return options
        model = self.registry.get(digest, pay)      # vets it first
        segments = segmentation.canonical(model.program, options.segments)
        if segments == options.segments:
            return options
        return msgspec.structs.replace(options, segments=segments)

    def on_profile(self, request: Request, frames: list) -> None:
        client = self.owner(request)
        self.profile_budget.check(client)

        def load_then_profile() -> None:    # a first trial run blocks neither I/O nor lanes
            model = _or_answer(request, self._profiled_model, request.header.model,
                               partial(self.profile_budget.spending, client))
            if model is None:
                return
            self.scheduler.submit(ProfileJob(self.services, request, model,
                                             self.profile_budget, client))
        self.queue.submit(load_then_profile, self.key(request))

    def _profiled_model(self, digest: str, pay):
        if self.store.kind(digest) == 'onnx':
            raise ProtocolError(ErrorCode.BAD_REQUEST, 'only rrto-program models can be profiled')
        model = self.registry.get(digest, pay)
        if model.program.dynamic:       # a14 #1: its sizes follow its inputs, its budgets live
            raise ProtocolError(        # in DynamicRunner, which a profile would go around
                ErrorCode.BAD_REQUEST,
                'a dynamic program is not profiled: its sizes follow its inputs and it runs '
                'only within its per-call budgets; record it and read the replay\'s times')
        return model

    def on_evict(self, request: Request, frames: list) -> None:
        # admin only (rrto_server.auth.KIND_ROLES); reads and deletes files: control thread
        header = request.header

        def evict() -> None:
            try:
                request.ok(**self.registry.evict(header.model, self.replays.remove_model,
                                                 header.store))
            except ProtocolError as exc:
                request.error(exc)
            except Exception as exc:
                request.fail(exc)
        self.queue.submit(evict, self.key(request))


def _or_answer(request: Request, call, *args):
    """Return ``call(*args)``; if it raises, answer ``request`` with the error and return None."""
    try:
        return call(*args)
    except ProtocolError as exc:
        request.error(exc)
    except Exception as exc:
        request.fail(exc)
    return None
