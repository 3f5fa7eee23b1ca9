"""
The long-lived heap is frozen out of full collections where it is built, and only there.

:mod:`rrto_wire.heap`: the server settles after start-up, a model load and a
recording, the robot after a model is prepared; requests never freeze
anything, a cycle made per request is still collected, and a replay or model
that the server lets go is not kept alive by the freeze.
"""

import gc
import weakref

import pytest
import torch

from rrto_ros.client import RrtoClient
from rrto_ros.preparer import PrepState
from rrto_ros.zoo import ARCHITECTURES
from rrto_testing import prepare
from rrto_wire import heap
from rrto_wire.messages import Kind


class Small(torch.nn.Module):
    """A linear layer and a nonlinearity: quick to export and record."""

    def __init__(self, width: int = 8):
        super().__init__()
        self.linear = torch.nn.Linear(width, width)

    def forward(self, x):
        return torch.relu(self.linear(x))


@pytest.fixture(autouse=True)
def freezing(monkeypatch):
    """Settle in this process, as the server's and the nodes' entry points make theirs do."""
    monkeypatch.setenv(heap.ENV, '1')


def _unfrozen() -> int:
    """Return how many tracked objects full collections still traverse (not frozen)."""
    return len(gc.get_objects())


def _earlier_drops_gone() -> None:
    """Let the servers and replays earlier tests dropped go (their unfreezing settles)."""
    for _ in range(heap.PENDING_SETTLES + 1):
        if not heap.stale():
            return
        heap.settle('earlier tests')
    assert not heap.stale()


def test_server_start_up_and_recording_freeze_the_long_lived_heap(make_server):
    _earlier_drops_gone()       # else recording's settle may unfreeze (and free) their heap
    server = make_server()
    started = gc.get_freeze_count()
    assert started > 0 and server.snapshot()['heap']['settles'] >= 1
    prepare(server.endpoint, Small(), torch.randn(1, 8))
    recorded = gc.get_freeze_count()
    settled = server.snapshot()['heap']
    assert recorded > started      # the model's program and the replay joined the frozen heap
    assert settled['last'] == 'replay recorded' and settled['frozen'] >= recorded
    # what a full collection still traverses is a small part of the heap
    assert _unfrozen() < recorded / 4


def test_requests_freeze_nothing_and_their_cycles_are_collected(make_server):
    server = make_server()
    x = torch.randn(1, 8)
    replay = prepare(server.endpoint, Small(), x)
    made = []
    serve = server.handlers[Kind.INFER]

    class Cycle:
        pass

    def with_cycle(request, frames):    # each request leaves a reference cycle behind
        cycle = Cycle()
        cycle.me = cycle
        made.append(weakref.ref(cycle))
        serve(request, frames)

    server.handlers[Kind.INFER] = with_cycle
    frozen = gc.get_freeze_count()
    client = RrtoClient(server.endpoint, call_timeout_ms=30000)
    try:
        for _ in range(50):
            client.infer(replay, [x])
        client.stats()      # answered by the I/O thread after it left the last with_cycle
    finally:
        client.close()
    assert len(made) == 50
    assert gc.get_freeze_count() <= frozen      # no request froze anything (some were freed)
    gc.collect()
    assert not [ref for ref in made if ref() is not None]


def test_an_evicted_replay_is_not_kept_alive_by_the_freeze(make_server):
    server = make_server(max_replays=1)
    prepare(server.endpoint, Small(), torch.randn(1, 8))
    first = weakref.ref(server.replays.items()[0])
    assert gc.get_freeze_count() > 0
    prepare(server.endpoint, Small(), torch.randn(2, 8))     # evicts the first replay
    assert len(server.replays) == 1 and server.replays.items()[0] is not first()
    gc.collect()
    assert first() is None
    assert server.snapshot()['heap']['unfreezes'] >= 1


def test_an_evicted_model_is_not_kept_alive_by_the_freeze(make_server):
    server = make_server()
    prepare(server.endpoint, Small(), torch.randn(1, 8))
    (replay,) = server.replays.items()
    digest = replay.model.digest
    model, recorded = weakref.ref(replay.model), weakref.ref(replay)
    del replay
    admin = RrtoClient(server.endpoint, call_timeout_ms=30000)
    try:
        assert admin.evict(digest)['unloaded']
    finally:
        admin.close()
    settled = server.snapshot()['heap']
    assert settled['last'] == 'model evicted'
    # the scheduler still holds its last job (the recording): watched, frozen again
    assert recorded() is not None and settled['watched'] >= 1 and settled['stale']
    prepare(server.endpoint, Small(16), torch.randn(1, 16))    # the lane lets go of it
    gc.collect()
    assert model() is None and recorded() is None


def test_the_robot_freezes_after_preparing_a_model(server_process, offloaded):
    server = server_process()       # its own process: only the robot settles here
    before = heap.snapshot()
    frozen = gc.get_freeze_count()
    om = offloaded(ARCHITECTURES['keypoint_net'](), server.endpoint, timeout_ms=30000)
    x = torch.randn(1, 3, 64, 64)
    assert om.warmup(x)
    assert om.prepared()[0].state == PrepState.READY
    after = heap.snapshot()
    assert after['settles'] == before['settles'] + 1 and after['last'] == 'model prepared'
    assert gc.get_freeze_count() > frozen       # the export and the model's runtime
    assert _unfrozen() < gc.get_freeze_count() / 4
    om(x)
    om.close()
    assert heap.snapshot()['stale']     # the next settle unfreezes: its cycles can go


def test_freezing_can_be_turned_off(monkeypatch, make_server):
    monkeypatch.setenv(heap.ENV, '0')       # also in a process that called heap.enable()
    settles, frozen = heap.snapshot()['settles'], gc.get_freeze_count()
    server = make_server()
    prepare(server.endpoint, Small(), torch.randn(1, 8))
    assert heap.settle('test') is None
    assert heap.snapshot()['settles'] == settles and gc.get_freeze_count() <= frozen


def test_the_server_process_freezes_by_itself_a_library_user_does_not(monkeypatch,
                                                                      server_process):
    monkeypatch.delenv(heap.ENV)
    assert not heap.enabled()       # nobody in this process called heap.enable()
    server = server_process()       # python -m rrto_server does
    client = RrtoClient(server.endpoint, call_timeout_ms=30000)
    try:
        settled = client.stats()['heap']
    finally:
        client.close()
    assert settled['enabled'] and settled['last'] == 'server start-up'
    assert settled['frozen_now'] > 100000      # torch and the server, out of full collections
