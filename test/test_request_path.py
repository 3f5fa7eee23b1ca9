"""
The request path's hand-offs: which thread serves which request when the device is idle.

And the express path (rrto_server.express): taken by the common request only, answering
byte for byte what the general path answers.
"""

import collections
import gc
import threading
import time

import pytest
from rrto_testing import leaves, prepare

import torch
import zmq

from rrto_ros.client import RemoteError, RrtoClient
from rrto_ros.zoo import keypoint_net
from rrto_server import server as server_module
from rrto_server import stats as stats_module
from rrto_server.express import ExpressPlan
from rrto_server.lanes import Job
from rrto_server.options import ServerConfig
from rrto_server.replay import SERVED_MIN, SERVED_RUNS
from rrto_server.requests import Request
from rrto_server.runner import Execution
from rrto_server.taskstats import TaskStats
from rrto_wire import messages, protocol


def _wrap(seen, name, fn):
    def wrapper(*args, **kwargs):
        thread = threading.current_thread().name
        for prefix, role in (('rrto-io', 'io'), ('rrto-cpu', 'cpu'), ('rrto-gpu', 'lane')):
            if thread.startswith(prefix):
                seen[name].add(role)
        return fn(*args, **kwargs)
    return wrapper


def _spy(monkeypatch, seen):
    def wrap(name, fn):
        return _wrap(seen, name, fn)

    monkeypatch.setattr(protocol, 'decode_tensors', wrap('decode', protocol.decode_tensors))
    monkeypatch.setattr(Execution, 'step', wrap('segment', Execution.step))
    monkeypatch.setattr(ExpressPlan, 'run', wrap('express', ExpressPlan.run))


def _served(server, monkeypatch):
    """Return, for a server with keypoint_net recorded for a 12 KB input, that input, the
    replay, the roles that decoded and stepped each request (filled as calls go), a client."""
    x = torch.randn(1, 3, 32, 32)                       # 12 KB
    replay = prepare(server.endpoint, keypoint_net(), x)
    seen = collections.defaultdict(set)
    _spy(monkeypatch, seen)
    return x, replay, seen, RrtoClient(server.endpoint, call_timeout_ms=30000)


def test_bulk_inputs_never_hold_the_io_thread_even_when_the_device_is_idle(make_server,
                                                                           monkeypatch):
    x, replay, seen, client = _served(make_server(inline_max_ms=1000.0), monkeypatch)
    try:
        outputs, _ = client.infer(replay, [x])
        assert seen == {'express': {'io'}}, 'small: served inline, on the express path'
        seen.clear()
        monkeypatch.setattr(server_module, 'INLINE_MAX_INPUT_BYTES', x.nbytes - 1)
        again, _ = client.infer(replay, [x])
        assert seen == {'decode': {'cpu'}, 'segment': {'lane'}}, 'bulk: workers and lane'
        assert _as_local(outputs, x) and _as_local(again, x)
    finally:
        client.close()


def test_small_raw_requests_skip_the_worker_hop_when_they_cannot_run_inline(
        make_server, monkeypatch):
    # no segment is short enough to run inline: queued
    x, replay, seen, client = _served(make_server(inline_max_ms=0.0), monkeypatch)
    try:
        outputs, _ = client.infer(replay, [x])
        assert seen == {'decode': {'io'}, 'segment': {'lane'}}, 'views here, steps on a lane'
        seen.clear()
        flat = torch.full_like(x, 0.25)                 # compresses: travels as lz4
        packed, _ = client.infer(replay, [flat], codec='lz4')
        assert seen == {'decode': {'cpu'}, 'segment': {'lane'}}, 'a codec: decoded by a worker'
        assert _as_local(outputs, x)
        assert _as_local(packed, flat)
    finally:
        client.close()


def test_the_inline_limit_follows_the_replays_cost_as_served(make_server, monkeypatch):
    # a record-time profile taken while the machine was busy (or cold) said 5 s: the general
    # path, until the runs served say otherwise; runs served slow send it back to the lanes
    server = make_server(inline_max_ms=1000.0)
    x, key, seen, client = _served(server, monkeypatch)
    replay = server.replays.get(key)
    replay.segment_ms = [5000.0]
    try:
        for _ in range(SERVED_MIN):
            client.infer(key, [x])
            assert seen == {'decode': {'io'}, 'segment': {'lane'}}, 'profiled too long to inline'
        assert replay.longest_segment_ms < 1000.0
        seen.clear()
        outputs, _ = client.infer(key, [x])
        assert seen == {'express': {'io'}}, 'the runs served were short'
        for _ in range(SERVED_RUNS // 2 + 1):
            replay.served(2.0)                          # most recent runs: 2 s each
        seen.clear()
        again, _ = client.infer(key, [x])
        assert seen == {'decode': {'io'}, 'segment': {'lane'}}, 'served slow: not inline'
        assert _as_local(outputs, x) and _as_local(again, x)
    finally:
        client.close()


def _as_local(outputs, x) -> bool:
    """Whether ``outputs`` equal keypoint_net's outputs on ``x`` run here, bit for bit."""
    expected = leaves(keypoint_net()(x))
    return len(outputs) == len(expected) and all(map(torch.equal, outputs, expected))


def _reply_bytes(outputs):
    return [bytes(protocol.raw_body([t])[1][0]) for t in outputs]


def test_the_common_request_takes_the_express_path_with_the_general_paths_bytes(
        make_server, monkeypatch):
    server = make_server(inline_max_ms=1000.0)
    x, replay, seen, client = _served(server, monkeypatch)
    try:
        express, header = client.infer(replay, [x])
        assert seen == {'express': {'io'}}
        assert header['timing']['segments'] == 1 and header['timing']['queue_ms'] >= 0
        seen.clear()
        # the same request on the general path (the idle fast path before the express one)
        monkeypatch.setattr(server.replays.get(replay), 'express', None)   # the general path
        general, general_header = client.infer(replay, [x])
        assert seen == {'decode': {'io'}, 'segment': {'io'}}, 'general inline path'
        assert _reply_bytes(express) == _reply_bytes(general)
        assert [(t.dtype, t.shape) for t in express] == [(t.dtype, t.shape) for t in general]
        assert set(header['timing']) == set(general_header['timing'])
        assert _as_local(express, x)
        stats = client.stats()
        assert sum(m.get('infers', 0) for m in stats['models'].values()) == 2
        assert stats['open_requests'] == 1 and stats['double_answers'] == 0   # 1: this one
    finally:
        client.close()


def test_codecs_other_signatures_and_bad_frames_take_the_general_path(make_server, monkeypatch):
    x, replay, seen, client = _served(make_server(inline_max_ms=1000.0), monkeypatch)
    try:
        flat = torch.full_like(x, 0.25)                 # compresses: travels as lz4
        packed, _ = client.infer(replay, [flat], codec='lz4')
        assert seen == {'decode': {'cpu'}, 'segment': {'lane'}}, 'a codec: never express'
        assert _as_local(packed, flat)
        seen.clear()
        with pytest.raises(RemoteError) as wrong:      # not the recorded signature
            client.infer(replay, [torch.randn(1, 3, 32, 16)])
        assert wrong.value.code == 'signature_mismatch' and 'express' not in seen
        seen.clear()
        sock = zmq.Context.instance().socket(zmq.DEALER)
        sock.connect(client.endpoint)
        try:   # the recorded shape declared, a frame one byte short: the general path's error
            header = {'kind': 'infer', 'id': 7, 'replay': replay}
            frames = protocol.encode(header, [x])
            sock.send_multipart(frames[:1] + [bytes(frames[1])[:-1]])
            assert sock.poll(30000)
            answer = sock.recv_multipart()
        finally:
            sock.close(linger=0)
        assert b'"bad_request"' in answer[0] and b'needs' in answer[0]
        assert 'express' not in seen and 'segment' not in seen
    finally:
        client.close()


class _Blocking(Job):
    """Holds the device's only lane until released."""

    def __init__(self):
        super().__init__(priority=-5, task='bulk')
        self.started_event, self.release_event = threading.Event(), threading.Event()

    def step(self) -> bool:
        self.started_event.set()
        assert self.release_event.wait(30)
        return True


def _infer_behind(bulk: _Blocking, server, client, replay, x):
    """Start an infer at priority 5 once ``bulk`` holds the lane; give it 0.2 s to arrive."""
    server.scheduler.submit(bulk)
    assert bulk.started_event.wait(30)
    pending = client.start_infer(replay, [x], priority=5)
    time.sleep(0.2)
    return pending


def test_a_busy_lane_sends_the_common_request_the_general_way(make_server, monkeypatch):
    # the lane's step outlasts INLINE_WAIT_S: the I/O thread stops waiting for it
    server = make_server(inline_max_ms=1000.0)
    x, replay, seen, client = _served(server, monkeypatch)
    bulk = _Blocking()
    try:
        pending = _infer_behind(bulk, server, client, replay, x)
        assert 'express' not in seen and 'segment' not in seen, 'waits for the busy lane'
        bulk.release_event.set()
        _, outputs = pending.result()
        assert 'express' not in seen and seen['segment'] == {'lane'}
        assert _as_local(outputs, x)
        client.infer(replay, [x])                       # idle again: express
        assert seen['express'] == {'io'}
    finally:
        bulk.release_event.set()
        client.close()


def test_the_most_urgent_request_runs_express_at_the_segment_boundary(make_server, monkeypatch):
    monkeypatch.setattr(server_module, 'INLINE_WAIT_S', 30.0)
    server = make_server(inline_max_ms=1000.0)                  # preemptive by default
    x, replay, seen, client = _served(server, monkeypatch)
    bulk = _Blocking()
    try:
        pending = _infer_behind(bulk, server, client, replay, x)
        assert not seen, 'waits for the segment boundary'
        bulk.release_event.set()
        _, outputs = pending.result()
        assert seen == {'express': {'io'}}, 'then runs on the I/O thread, no lane hand-off'
        assert _as_local(outputs, x)
        seen.clear()
        bulk = _Blocking()                      # as urgent as the request: no overtaking
        bulk.priority = 5
        pending = _infer_behind(bulk, server, client, replay, x)
        assert seen == {'decode': {'io'}}, 'queued the general way'
        bulk.release_event.set()
        pending.result()
        assert 'express' not in seen and seen['segment'] == {'lane'}
    finally:
        bulk.release_event.set()
        client.close()


class _Steps(Job):
    """A job of ``n`` steps, each held until its gate opens; records who ran what."""

    def __init__(self, name, n, log, priority=0):
        super().__init__(priority=priority, task=name)
        self.name, self.left, self.log = name, n, log
        self.gates = [threading.Event() for _ in range(n)]
        self.began = threading.Event()

    def step(self) -> bool:
        k = len(self.gates) - self.left
        self.began.set()
        assert self.gates[k].wait(30)
        self.log.append((self.name, k, threading.current_thread().name))
        self.left -= 1
        return self.left == 0


def test_run_inline_preempts_at_the_boundary_only_for_the_most_urgent_job():
    from rrto_server.scheduler import Scheduler
    log = []
    scheduler = Scheduler('preemptive', 0.0, None)
    try:
        low = _Steps('low', 3, log)
        scheduler.submit(low)
        assert low.began.wait(30)
        urgent, mid = _Steps('urgent', 1, log, priority=3), _Steps('mid', 1, log, priority=1)
        urgent.gates[0].set()
        mid.gates[0].set()
        # while we wait: a job less urgent than ours arrives (it waits for ours, not for a
        # preemption), then the lane's step ends
        threading.Timer(0.25, scheduler.submit, (mid,)).start()
        threading.Timer(0.5, low.gates[0].set).start()
        assert scheduler.run_inline(urgent, wait_s=30.0)
        for gate in low.gates[1:]:
            gate.set()
        deadline = time.monotonic() + 30
        while len(log) < 5 and time.monotonic() < deadline:
            time.sleep(0.01)
        me = threading.current_thread().name
        assert [(n, k) for n, k, _ in log] == [('low', 0), ('urgent', 0), ('mid', 0), ('low', 1),
                                               ('low', 2)]
        assert log[1][2] == me and log[2][2] != me, 'inline here; the lane runs the rest'
        assert low.preemptions == 1 and urgent.preempt_s is not None and mid.preempt_s is None
        snap = scheduler.snapshot()
        assert snap['preemptions'] == 1 and snap['preempt_ms']['n'] == 1
        # not more urgent than the running job, or its step outlasts the wait: declined
        log.clear()
        slow = _Steps('slow', 1, log, priority=3)
        scheduler.submit(slow)
        assert slow.began.wait(30)
        peer = _Steps('peer', 1, log, priority=3)
        assert not scheduler.run_inline(peer, wait_s=30.0)
        assert not scheduler.run_inline(_Steps('more', 1, log, priority=4), wait_s=0.05)
        begun = time.monotonic()    # the same step still runs: no second wait for it
        assert not scheduler.run_inline(_Steps('again', 1, log, priority=4), wait_s=10.0)
        assert time.monotonic() - begun < 5.0
        slow.gates[0].set()
        later = _Steps('later', 1, log)
        later.gates[0].set()
        scheduler.submit(later)                 # the lanes are not held by the declined calls
        while len(log) < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert [n for n, _, _ in log] == ['slow', 'later']
    finally:
        scheduler.close()
    fifo = Scheduler('fifo', 0.0, None)
    try:
        first = _Steps('first', 1, log)
        fifo.submit(first)
        assert first.began.wait(30)
        assert not fifo.run_inline(_Steps('urgent', 1, log, priority=9), wait_s=30.0)
        first.gates[0].set()
    finally:
        fifo.close()


def test_segmented_replays_and_expired_requests_never_run_express(make_server, monkeypatch):
    server = make_server(inline_max_ms=1000.0)
    x = torch.randn(1, 3, 32, 32)
    segmented = prepare(server.endpoint, keypoint_net(), x, segments='ops:4')
    seen = collections.defaultdict(set)
    _spy(monkeypatch, seen)
    client = RrtoClient(server.endpoint, call_timeout_ms=30000)
    try:
        outputs, _ = client.infer(segmented, [x])
        assert 'express' not in seen and seen['segment'], 'preemption points stay'
        assert _as_local(outputs, x)
        whole = prepare(server.endpoint, keypoint_net(), x)
        seen.clear()
        with pytest.raises(RemoteError) as late:
            client.infer(whole, [x], deadline_ms=1e-6, late='drop')
        assert late.value.code == 'deadline_missed' and not seen
    finally:
        client.close()


def test_express_requests_are_counted_in_full_after_their_reply(make_server, monkeypatch):
    # the express path counts a request (arrival, inference, how it ended) once its reply is
    # out; every count is still there, expired and failed requests included
    server = make_server(inline_max_ms=1000.0)
    x, key, seen, client = _served(server, monkeypatch)
    order = []

    def note(name, fn):
        def wrapper(*args, **kwargs):
            order.append(name)
            return fn(*args, **kwargs)
        return wrapper
    monkeypatch.setattr(Request, 'ok_ready', note('reply', Request.ok_ready))
    monkeypatch.setattr(TaskStats, 'arrived', note('arrived', TaskStats.arrived))
    monkeypatch.setattr(TaskStats, 'ended', note('ended', TaskStats.ended))
    monkeypatch.setattr(TaskStats, 'arrived_and_ended',
                        note('arrived and ended', TaskStats.arrived_and_ended))
    replay = server.replays.get(key)
    runs = replay.runs
    try:
        for _ in range(3):
            outputs, _ = client.infer(key, [x], task='cam')
            assert _as_local(outputs, x)
        assert seen == {'express': {'io'}}
        assert order == ['reply', 'arrived and ended'] * 3, 'one count, after the reply'
        with pytest.raises(RemoteError) as late:
            client.infer(key, [x], task='cam', deadline_ms=1e-6, late='drop')
        assert late.value.code == 'deadline_missed'
        monkeypatch.setattr(ExpressPlan, 'run', _raises)
        with pytest.raises(RemoteError) as failed:
            client.infer(key, [x], task='cam')
        assert failed.value.code == 'exec_failed'
        stats = client.stats()
        cam = stats['tasks']['cam']
        assert (cam['requests'], cam['completed'], cam['expired'], cam['failed'],
                cam['in_flight']) == (5, 3, 1, 1, 0)
        assert cam['latency_ms']['n'] == 3 and cam['queue_ms']['n'] == 4
        assert 0 < cam['latency_ms']['p50'] < 1e4
        model = stats['models'][replay.model.digest]
        assert model['infers'] == 4 and model['errors'] == 2, 'ran: 3 served, 1 failed'
        assert replay.runs - runs == 4
        monkeypatch.setattr(replay, 'express', None)       # the general path
        order.clear()
        client.infer(key, [x], task='cam')
        assert order == ['arrived', 'ended'], 'the general path counts its arrival first'
    finally:
        client.close()


def _raises(*args):
    raise RuntimeError('broken on this input')


def test_the_servers_context_reads_connections_on_several_threads(make_server):
    # one libzmq I/O thread alternated between a bulk peer's multi-megabyte reads and an
    # urgent peer's small ones (bench.sched_mix: late frames of the urgent task waited there)
    server = make_server()
    assert server_module.IO_THREADS > 1
    assert server.context.get(zmq.IO_THREADS) == server_module.IO_THREADS


class _FixedRunner:
    """A runner that always answers from the same buffers (as a CUDA graph does)."""

    def __init__(self):
        self.express_outputs = [torch.arange(6, dtype=torch.float32)]

    def express(self, buffers, signature):
        self.express_outputs[0] += 1
        return self.express_outputs


class _Tracker:
    done = False


def test_fixed_reply_buffers_are_never_reused_while_a_reply_is_in_flight():
    from rrto_wire.tensors import TensorSpec
    spec = TensorSpec('uint8', (4,))
    plan = ExpressPlan((spec,), _FixedRunner())
    frame = zmq.Frame(b'abcd')
    desc = messages.decode_request(protocol.encode(
        {'kind': 'infer', 'id': 1, 'replay': 'r'}, [torch.zeros(4, dtype=torch.uint8)])[0])
    buffers = plan.accept(desc.tensors, [frame])
    assert buffers is not None and bytes(buffers[0]) == b'abcd'
    body = plan.reply_body(plan.run(buffers))
    assert body[0] == [{'dtype': 'float32', 'shape': (6,), 'codec': 'raw'}]
    assert bytes(body[1][0]) == torch.arange(1, 7, dtype=torch.float32).numpy().tobytes()
    tracker = _Tracker()
    plan.sent(tracker)                      # a zero-copy reply libzmq still holds
    assert plan.accept(desc.tensors, [frame]) is None
    tracker.done = True
    assert plan.accept(desc.tensors, [frame]) is not None
    plan.sent(None)                         # a small reply: copied while it was sent
    assert plan.accept(desc.tensors, [frame]) is not None
    assert plan.accept(desc.tensors, [zmq.Frame(b'abc')]) is None, 'wrong size: general path'


class _Upsample(torch.nn.Module):
    """Outputs of 4 MiB: over what a lane copies back in its last step."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(3, 16, 3, padding=1)

    def forward(self, x):
        return torch.nn.functional.interpolate(self.conv(x), scale_factor=8.0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs CUDA')
def test_a_lane_that_copied_the_outputs_back_sends_the_reply_itself(make_server, monkeypatch):
    # no hand-off to a CPU worker for a reply that needs no copy: the urgent task of
    # bench.sched_mix paid 0.07 ms for it at p50 under the mix
    server = make_server(device='cuda', inline_max_ms=0.0)      # every step on a lane
    x = torch.randn(1, 3, 32, 32)
    small, large = (prepare(server.endpoint, model, x) for model in (keypoint_net(), _Upsample()))
    seen = collections.defaultdict(set)
    monkeypatch.setattr(Request, 'ok', _wrap(seen, 'reply', Request.ok))
    client = RrtoClient(server.endpoint, call_timeout_ms=30000)
    try:
        for k in range(3):
            y = x + k
            outputs, _ = client.infer(small, [y])
            assert seen == {'reply': {'lane'}}, 'copied back by the lane: sent by it'
            assert all(torch.allclose(a, b, rtol=1e-4, atol=1e-5)
                       for a, b in zip(outputs, leaves(keypoint_net()(y))))
            seen.clear()
            outputs, _ = client.infer(large, [y])
            assert seen == {'reply': {'cpu'}}, 'copied back on a worker, sent from there'
            assert torch.allclose(outputs[0], _Upsample()(y), rtol=1e-4, atol=1e-5)
            seen.clear()
        assert client.stats()['double_answers'] == 0
    finally:
        client.close()


def test_garbage_collections_are_timed_while_the_server_runs(make_server, tmp_path,
                                                             monkeypatch):
    """A collection stops every thread: the stats count and time each one (when: admins)."""
    monkeypatch.setattr(stats_module, 'PAUSE_MS', 0.0)      # keep every pause's start
    server = make_server()
    before = server.snapshot()['gc']['2']['collections']
    gc.collect()
    snapshot = server.snapshot()
    assert snapshot['gc']['2']['collections'] == before + 1
    assert snapshot['gc']['2']['longest_ms'] > 0
    pause = snapshot['gc_pauses'][-1]
    assert pause['generation'] == 2 and abs(pause['start'] - time.perf_counter()) < 60
    assert 'gc_pauses' not in server.snapshot(client='a-peer')
    closed = server_module.Server(ServerConfig(bind='tcp://127.0.0.1:0',
                                               store=str(tmp_path / 'closed'), device='cpu'))
    closed.close()                              # takes its timer out of the collector
    gc.collect()
    assert closed.snapshot()['gc']['2']['collections'] == 0
