"""
Recordings: one per replay key, shared by every request for it, advanced in short steps.

A record request whose replay is not recorded yet waits on the :class:`Recording`
of its replay key (the first such request makes it).  Each client key with a
request waiting there holds its own *ticket*, a :class:`RecordJob` that went
through that key's control-queue turn and :class:`~rrto_server.record_gate.RecordGate`
slot and runs at that key's request's priority.  Every ticket advances the same
recording, whichever the scheduler runs first, so the recording goes at the best
place among its waiters; a ticket that finds it done ends at once.  (Before a11's
finding 3, a second key's request joined the first key's unit of work and waited in
that key's queue and gate, at its priority.)

A recording advances one stage per scheduler step: the recording itself with its
warm-up call, then each profiling call (:func:`~rrto_server.profiling.profile_steps`),
so it holds the device for about one call at a time, and more urgent work runs
between two stages.  Each step is charged to the stepping key's record
:class:`~rrto_server.profiling.DeviceBudget` (a11's finding 2); a key whose budget is
spent gets ``overloaded`` for its own requests while the other keys' tickets carry on.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from typing import Callable, Hashable, Iterator

from rrto_server import profiling
from rrto_server.jobs import Services, job_keys, replay_info
from rrto_server.lanes import EXCLUSIVE, Job
from rrto_server.replay import Replay
from rrto_server.requests import Request
from rrto_server.sandbox import no_trial
from rrto_wire import heap
from rrto_wire.errors import ErrorCode, ProtocolError, detached
from rrto_wire.messages import RecordOptions
from rrto_wire.tensors import Signature

log = logging.getLogger('rrto_server.recording')


class Recording:
    """One replay being recorded for everyone waiting for it (see the module docstring)."""

    def __init__(self, key: str, digest: str, signature: Signature, options: RecordOptions):
        self.key, self.digest, self.signature, self.options = key, digest, signature, options
        self.waiting: dict[Hashable, list[Request]] = {}    # ticket (client key) -> requests
        self.replay: Replay | None = None
        self.error: ProtocolError | None = None
        self.done = False
        self._profile: Iterator[None] | None = None

    def abandon(self) -> None:
        """Give up (nobody waits any more): drop what was recorded so far."""
        self.done = True
        replay, self.replay, self._profile = self.replay, None, None
        if replay is not None:
            heap.dropped(replay, nbytes=replay.nbytes)   # a settle may have frozen it

    def advance(self, services: Services, owners: list) -> bool:
        """Run the next stage; return True once the replay is profiled and in the cache."""
        if self.replay is None:
            if heap.due():      # what was dropped goes before a new replay takes memory
                heap.settle('before recording')
            model = services.registry.get(self.digest, no_trial)   # vetted on the control thread
            self.replay = Replay(model, self.signature, self.options, services.device,
                                 services.cpu_backend)
            self._profile = profiling.profile_steps(self.replay, services.profile_utilisation)
            return False
        try:
            next(self._profile)
            return False
        except StopIteration:
            pass
        except Exception:  # an unprofiled replay still serves; it just never packs
            log.exception('profiling %s failed', self.key)
        self._profile = None
        services.replays.add(self.replay, owners)
        services.stats.count(self.digest, 'records')
        heap.settle('replay recorded')  # the replay lives on: out of full collections
        return True


class Recordings:
    """The recordings in progress, by replay key, and the requests waiting for each."""

    def __init__(self):
        self._lock = threading.Lock()
        self._recordings: dict[str, Recording] = {}

    def join(self, key: str, digest: str, signature: Signature, options: RecordOptions,
             request: Request, ticket: Hashable,
             claim: Callable[[], Replay | None]) -> Recording | None:
        """
        Add ``request`` to the waiters of ``key``'s recording (made if there is none).

        Return the recording when ``ticket`` (the sender's client key) had no request
        waiting for it yet: that key's :class:`RecordJob` is then due.  Before making
        a recording, ``claim()`` looks the replay up once more under the lock that
        :meth:`finish` takes: a recording that finished since the caller's own claim
        answers ``request`` with its replay instead of being made again (r4 B5).
        """
        with self._lock:
            recording = self._recordings.get(key)
            replay = claim() if recording is None else None
            if recording is None and replay is None:
                recording = self._recordings[key] = Recording(key, digest, signature, options)
            if replay is None:
                mine = recording.waiting.setdefault(ticket, [])
                mine.append(request)
                return recording if len(mine) == 1 else None
        request.ok(**replay_info(replay, recorded=False))
        return None

    def owners(self, recording: Recording) -> list:
        """Return the senders of the requests waiting for ``recording`` (the replay's owners)."""
        with self._lock:
            return [r.client for requests in recording.waiting.values() for r in requests
                    if r.client is not None]

    def finish(self, recording: Recording) -> None:
        """Answer every request waiting for a done ``recording`` (its replay or its error)."""
        with self._lock:
            waiting = [r for requests in recording.waiting.values() for r in requests]
            recording.waiting = {}
            if self._recordings.get(recording.key) is recording:
                del self._recordings[recording.key]
        for request in waiting:
            if recording.error is not None:
                request.error(recording.error)
            else:
                request.ok(**replay_info(recording.replay, recorded=True))

    def leave(self, recording: Recording, ticket: Hashable, error: ProtocolError) -> None:
        """Answer ``ticket``'s requests with ``error``; drop the recording if nobody else waits."""
        with self._lock:
            mine = recording.waiting.pop(ticket, [])
            if not recording.waiting and not recording.done:
                recording.abandon()                 # a later request starts anew
                if self._recordings.get(recording.key) is recording:
                    del self._recordings[recording.key]
        for request in mine:
            request.error(error)


class RecordJob(Job):
    """
    One client key's ticket for a shared :class:`Recording`: advances it, one stage a step.

    Every stage holds every lane (profiling needs the device to itself).  A step
    of a key with a ``budget`` is charged to it and refused ``overloaded`` when it is
    spent; that answers this key's requests only.
    """

    def __init__(self, services: Services, recordings: Recordings, recording: Recording,
                 ticket: Hashable, request: Request, budget: profiling.DeviceBudget,
                 budget_key: str | None):
        keys = job_keys(request.header, request.received)
        keys.update(late='run', deadline=math.inf, task=keys['task'] or '(record)')
        super().__init__(**keys, utilisation=EXCLUSIVE)
        self.services, self.recordings, self.recording = services, recordings, recording
        self.ticket, self.budget, self.budget_key = ticket, budget, budget_key

    def step(self) -> bool:
        recording = self.recording
        if recording.done:
            return True             # another key's ticket finished it (or it was abandoned)
        if self.budget_key is not None:
            self.budget.check(self.budget_key)
        start = time.perf_counter()
        try:
            done = recording.advance(self.services, self.recordings.owners(recording))
        except Exception as exc:
            if not isinstance(exc, ProtocolError):
                log.exception('recording %s failed', recording.key)
                exc = ProtocolError(ErrorCode.INTERNAL, f'{type(exc).__name__}: {exc}')
            recording.error, recording.done = detached(exc), True     # a16 #3
            raise exc from None
        finally:
            if self.budget_key is not None:
                self.budget.charge(self.budget_key, time.perf_counter() - start)
        recording.done = done
        return done

    def complete(self) -> None:
        self.recordings.finish(self.recording)

    def fail(self, error: ProtocolError) -> None:
        if self.recording.error is not None:        # the recording failed: everyone hears it
            self.recordings.finish(self.recording)
        else:                                       # this key's budget, a shutdown
            self.recordings.leave(self.recording, self.ticket, error)
