"""The real-time server: deadlines, priorities, packing and accounting, end to end on the CPU."""

import collections
import threading
import time

import pytest
import torch
import zmq
from rrto_testing import (assert_packing_invariant, call_concurrently, exchange, infer_frames,
                          leaves, prepare, raw_socket, receive, reply_and_tensors,
                          reply_header, wait_running)

from rrto_ros import OffloadResult
from rrto_ros.client import RrtoClient
from rrto_ros.zoo import keypoint_net, mobilenet, resnet18
from rrto_server.__main__ import parse_args
from rrto_server.options import ServerConfig
from rrto_server import server as server_module
from rrto_server.server import Server

BLOCKER_INPUT = (4, 3, 224, 224)     # one whole-segment resnet18 inference: ~0.1-0.5 s on CPU


@pytest.fixture
def blocker(zmq_ctx):
    """Start a long, unsegmented, high-priority inference on a server; return its socket."""
    sockets = []

    def start(server, priority: int = 9):
        replay = prepare(server.endpoint, resnet18(), torch.zeros(BLOCKER_INPUT))
        sock = raw_socket(zmq_ctx, server.endpoint)
        sockets.append(sock)
        sock.send_multipart(infer_frames('blocker', replay, torch.randn(BLOCKER_INPUT),
                                         priority=priority, task='blocker'))
        wait_running(server, 'blocker')
        return sock

    yield start
    for sock in sockets:
        sock.close(linger=0)


def test_expired_requests_are_answered_at_once_and_counted(make_server, zmq_ctx, blocker):
    server = make_server(task_late={'slam': 'run'})
    small = keypoint_net()
    x = torch.randn(1, 3, 32, 32)
    replay = prepare(server.endpoint, small, x)
    block = blocker(server)
    sock = raw_socket(zmq_ctx, server.endpoint)
    sock.send_multipart(infer_frames('dropped', replay, x, deadline_ms=5, task='det'))
    sock.send_multipart(infer_frames('by-config', replay, x, deadline_ms=5, task='slam'))
    sock.send_multipart(infer_frames('by-request', replay, x, deadline_ms=5, task='det2',
                                     late='run'))
    header, _ = receive(sock)
    # answered while the blocker still holds the device, not when it is through
    assert header['id'] == 'dropped' and header['kind'] == 'error'
    assert header['code'] == 'deadline_missed' and "task 'det'" in header['message']
    assert any(r['task'] == 'blocker' for r in server.scheduler.running())
    assert receive(block)[0]['kind'] == 'ok'
    late = {}
    for _ in range(2):
        header, outputs = receive(sock)
        late[header['id']] = header
        assert all(torch.equal(a, b) for a, b in zip(outputs, leaves(small(x))))
    for request_id in ('by-config', 'by-request'):
        assert late[request_id]['kind'] == 'ok'
        assert late[request_id]['timing']['deadline_missed'] is True
    tasks = server.snapshot()['tasks']
    assert tasks['det']['expired'] == 1 and tasks['det']['miss_rate'] == 1.0
    assert tasks['slam']['late'] == 1 and tasks['slam']['completed'] == 1
    assert tasks['det2']['deadline_misses'] == 1
    assert tasks['blocker']['deadline_misses'] == 0
    sock.close(linger=0)


def test_priorities_are_respected_under_contention(make_server, zmq_ctx, blocker):
    server = make_server(sched_policy='priority', sched_trace=256)
    x = torch.randn(1, 3, 32, 32)
    replay = prepare(server.endpoint, keypoint_net(), x, segments='ops:5')
    block = blocker(server, priority=0)
    clients = [raw_socket(zmq_ctx, server.endpoint) for _ in range(4)]
    for sock, priority in zip(clients, [1, 3, 0, 2]):
        sock.send_multipart(infer_frames(priority, replay, x, priority=priority,
                                         task=f'p{priority}'))
    time.sleep(0.05)
    assert receive(block)[0]['kind'] == 'ok'
    for sock in clients:
        assert receive(sock)[0]['kind'] == 'ok'
        sock.close(linger=0)
    order = [entry['task'] for entry in server.snapshot()['scheduler']['trace']
             if entry['task'].startswith('p')]
    assert order == ['p3', 'p2', 'p1', 'p0']


def test_every_request_is_answered_exactly_once_under_concurrent_clients(make_server, zmq_ctx):
    # the 96-request burst stays under admission control's limit: this test is about the
    # scheduler answering each one once (shedding has its own tests in test_security_server)
    server = make_server(admission_capacity=256)
    small, big = keypoint_net(), resnet18()
    xs, xb = torch.randn(1, 3, 32, 32), torch.randn(1, 3, 96, 96)
    small_replay = prepare(server.endpoint, small, xs, segments='ops:5')
    big_replay = prepare(server.endpoint, big, xb, segments='ops:4')
    expected = {small_replay: leaves(small(xs)), big_replay: leaves(big(xb))}
    per_client, results = 24, {}

    def client(c: int) -> None:
        sock = raw_socket(zmq_ctx, server.endpoint)
        sent = {}
        for i in range(per_client):
            request_id = f'{c}-{i}'
            replay, x = (big_replay, xb) if i % 4 == 0 else (small_replay, xs)
            fields = {'task': f'client{c}', 'priority': (c + i) % 4}
            if i % 3 == 0:
                fields.update(deadline_ms=1 + i % 5, late='drop')
            if i % 11 == 5:
                fields['late'] = 'soon'             # malformed: bad_request, still answered
            sent[request_id] = (replay, fields)
            sock.send_multipart(infer_frames(request_id, replay, x, **fields))
        replies = collections.defaultdict(list)
        deadline = time.monotonic() + 120
        while len(replies) < per_client and time.monotonic() < deadline:
            if sock.poll(100):
                frames = sock.recv_multipart()
                header, outputs = reply_and_tensors(frames)
                replies[header['id']].append((header, outputs))
        while sock.poll(300):                       # nothing may come after the last answer
            replies[reply_header(sock.recv_multipart()[0])['id']].append(None)
        sock.close(linger=0)
        results[c] = (sent, replies)

    threads = [threading.Thread(target=client, args=(c,)) for c in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(180)
    outcomes = collections.Counter()
    for sent, replies in results.values():
        assert set(replies) == set(sent)
        for request_id, answers in replies.items():
            assert len(answers) == 1, f'{request_id} answered {len(answers)} times'
            header, outputs = answers[0]
            replay, fields = sent[request_id]
            if header['kind'] == 'ok':
                assert all(torch.equal(a, b) for a, b in zip(outputs, expected[replay]))
                outcomes['ok'] += 1
            elif fields.get('late') == 'soon':
                assert header['code'] == 'bad_request'
                outcomes['bad_request'] += 1
            else:
                assert header['code'] == 'deadline_missed' and 'deadline_ms' in fields
                outcomes['deadline_missed'] += 1
    assert sum(outcomes.values()) == 4 * per_client and outcomes['ok'] > 0
    tasks = server.snapshot()['tasks']
    assert sum(t['requests'] for t in tasks.values()) == 4 * per_client - outcomes['bad_request']
    for task in tasks.values():
        assert task['in_flight'] == 0
        assert task['completed'] + task['expired'] + task['abandoned'] + task['failed'] == \
            task['requests']
    assert sum(t['expired'] + t['abandoned'] for t in tasks.values()) == \
        outcomes['deadline_missed']


def test_packing_rule_holds_for_real_inferences_on_two_cpu_lanes(make_server):
    theta = 0.8
    server = make_server(pack_theta=theta, sched_trace=4096, profile_util=False)
    specs = {'KeypointNet': (keypoint_net(), (1, 3, 64, 64), 'ops:5', 2, 0.3),
             'MobileNet': (mobilenet(), (1, 3, 64, 64), 'ops:10', 1, 0.4),
             'ResNet18': (resnet18(), (1, 3, 64, 64), 'ops:5', 0, 0.6)}
    replays = {label: prepare(server.endpoint, model, torch.randn(shape), segments=seg)
               for label, (model, shape, seg, _, _) in specs.items()}
    for replay in server.replays.items():
        replay.utilisation = specs[replay.model.label][4]   # as if profiled
    calls = {}
    for label, (model, shape, _, priority, _) in specs.items():
        x = torch.randn(shape)
        calls[label] = (replays[label], x, priority, leaves(model(x)))
    failures = call_concurrently(server.endpoint, calls, 1.5)
    assert not failures
    snapshot = server.snapshot()['scheduler']
    assert snapshot['lanes'] == 2 and snapshot['packed_steps'] > 0
    pairs = assert_packing_invariant(snapshot['trace'], theta)
    assert pairs > 0
    assert not any(e['lane'] == 1 and e['task'] == 'ResNet18' and e['util'] is None
                   for e in snapshot['trace'])


def test_recording_profiles_segments_and_utilisation(make_server, offloaded):
    profiled = make_server(profile_util=True)
    plain = make_server()
    x = torch.randn(1, 3, 32, 32)
    for server in (profiled, plain):
        om = offloaded(keypoint_net(), server.endpoint, timeout_ms=30000, segments='ops:5')
        assert om.warmup(x)
    info = profiled.snapshot()['replays'][0]
    assert 0.0 <= info['utilisation'] <= 1.0
    assert len(info['segment_ms']) == info['segments'] > 1
    assert all(ms > 0 for ms in info['segment_ms'])
    info = plain.snapshot()['replays'][0]
    assert info['utilisation'] is None and len(info['segment_ms']) == info['segments']


def test_offloaded_model_missing_its_deadline_still_answers(server, offloaded, blocker):
    model = keypoint_net()
    x = torch.randn(1, 3, 32, 32)
    expected = leaves(model(x))
    dropping = offloaded(model, server.endpoint, timeout_ms=30000, deadline_ms=5, task='det')
    running = offloaded(model, server.endpoint, timeout_ms=30000, deadline_ms=5, task='det',
                        late='run')
    assert dropping.warmup(x) and running.warmup(x)
    block = blocker(server)
    out = dropping(x)
    record = dropping.last
    assert record.result == OffloadResult.LOCAL_FALLBACK and record.deadline_missed
    assert 'deadline_missed' in record.reason
    assert all(torch.equal(a, b) for a, b in zip(leaves(out), expected))
    out = running(x)
    assert running.last.result == OffloadResult.OFFLOADED and running.last.deadline_missed
    assert running.last.to_dict()['deadline_missed'] is True
    assert 'preemptions' in running.last.to_dict()
    assert all(torch.equal(a, b) for a, b in zip(leaves(out), expected))
    assert receive(block)[0]['kind'] == 'ok'


@pytest.mark.parametrize('fields, words', [
    ({'late': 'maybe'}, '$.late'),
    ({'deadline_ms': -3}, '$.deadline_ms'),
    ({'deadline_ms': True}, '$.deadline_ms'),
    ({'priority': True}, '$.priority'),
    ({'task': 7}, '$.task'),
    ({'task': 'x' * 500}, '$.task'),
])
def test_bad_scheduling_fields_get_an_error_reply(server, zmq_ctx, fields, words):
    x = torch.randn(1, 3, 32, 32)
    replay = prepare(server.endpoint, keypoint_net(), x)
    sock = raw_socket(zmq_ctx, server.endpoint)
    reply = exchange(sock, infer_frames(1, replay, x, **fields))
    assert reply['kind'] == 'error' and reply['code'] == 'bad_request'
    assert words in reply['message']
    sock.close(linger=0)


def test_scheduler_options_from_the_command_line(tmp_path):
    config = parse_args(['--sched-policy', 'fifo', '--pack-theta', '0.7', '--task-late',
                         'slam=run', '--late-policy', 'run', '--cpu-workers', '3',
                         '--profile-util', 'on', '--sched-trace', '100'])
    assert (config.sched_policy, config.pack_theta, config.task_late, config.late_policy,
            config.cpu_workers, config.profile_util, config.sched_trace) == \
        ('fifo', 0.7, {'slam': 'run'}, 'run', 3, True, 100)
    for bad in (['--task-late', 'slam'], ['--task-late', 'slam=later'], ['--pack-theta', '-0.5'],
                ['--cpu-workers', '0'], ['--sched-policy', 'edf']):
        with pytest.raises(SystemExit):
            parse_args(bad)
    with pytest.raises(ValueError, match='late policy'):
        Server(ServerConfig(store=str(tmp_path), bind='tcp://127.0.0.1:0',
                            task_late={'slam': 'later'}), zmq.Context.instance())


def _spy_threads(monkeypatch, seen):
    from rrto_wire import protocol
    from rrto_server.express import ExpressPlan
    from rrto_server.runner import Execution

    def spy(name, fn):
        def wrapper(*args, **kwargs):
            thread = threading.current_thread().name
            for prefix, role in (('rrto-io', 'io'), ('rrto-cpu', 'cpu'), ('rrto-gpu', 'lane')):
                if thread.startswith(prefix):       # server threads only, not this client
                    seen[name].add(role)
            return fn(*args, **kwargs)
        return wrapper

    monkeypatch.setattr(protocol, 'decode_tensors', spy('decode', protocol.decode_tensors))
    monkeypatch.setattr(Execution, 'step', spy('segment', Execution.step))
    monkeypatch.setattr(Execution, 'host_outputs', spy('copy-back', Execution.host_outputs))
    monkeypatch.setattr(ExpressPlan, 'run', spy('express', ExpressPlan.run))


def test_an_idle_device_serves_short_raw_requests_on_the_io_thread(make_server, monkeypatch):
    server = make_server(inline_max_ms=1000.0)
    seen = collections.defaultdict(set)
    x = torch.randn(1, 3, 32, 32)
    replay = prepare(server.endpoint, keypoint_net(), x)
    _spy_threads(monkeypatch, seen)
    client = RrtoClient(server.endpoint, call_timeout_ms=30000)
    try:
        outputs, _ = client.infer(replay, [x])
        assert all(torch.equal(a, b) for a, b in zip(outputs, leaves(keypoint_net()(x))))
        assert seen == {'express': {'io'}}     # the common request: rrto_server.express
        seen.clear()
        flat = torch.zeros_like(x)  # compressible, so lz4 is really used: a CPU worker decodes
        client.infer(replay, [flat], codec='lz4')
        assert seen['decode'] == {'cpu'}
    finally:
        client.close()


def test_cpu_phases_run_on_cpu_workers_and_only_segments_on_the_lane(make_server, monkeypatch):
    server = make_server(inline_max_ms=0.0)  # the fast path off: every phase on its own thread
    seen = collections.defaultdict(set)
    x = torch.randn(1, 3, 32, 32)
    replay = prepare(server.endpoint, keypoint_net(), x, segments='ops:5')
    # as bulk inputs (small raw frames are decoded by the I/O thread: test_request_path)
    monkeypatch.setattr(server_module, 'INLINE_MAX_INPUT_BYTES', x.nbytes - 1)
    _spy_threads(monkeypatch, seen)
    client = RrtoClient(server.endpoint, call_timeout_ms=30000)
    try:
        for codec in ('raw', 'lz4'):
            outputs, _ = client.infer(replay, [x], codec=codec)
            assert all(torch.equal(a, b) for a, b in zip(outputs, leaves(keypoint_net()(x))))
    finally:
        client.close()
    assert seen == {'decode': {'cpu'}, 'segment': {'lane'}, 'copy-back': {'cpu'}}
