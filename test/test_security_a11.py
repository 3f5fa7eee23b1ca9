"""
The scheduling attacks of a11's review (docs/security.md, the "a11" block): each is bounded.

#2 a priority-0 key held the device for seconds per ``record`` (one unpreemptible step, no
budget, a new replay key per option string); #3 another key's ``record`` joined the
attacker's queued recording and waited behind all of her work; #4 the fleet front warmed
every key's models through one FIFO; #5 a profile with ``deadline_ms=0.001, late='run'``
kept the earliest deadline of its band for the whole profile.
"""

import hashlib
import threading
import time

import pytest
import torch
import zmq
import zmq.auth

import exploits
from rrto_server.lanes import RUN, Job
from rrto_server.sandbox import FREE
from rrto_server.scheduler import Scheduler
from rrto_testing import SlowPort, client_certificates, infer_frames, prepare, raw_socket, \
    receive, reply_header, upload, wait_running
from rrto_wire import protocol as wire
from rrto_wire.curve import ClientKeys
from rrto_wire.errors import ErrorCode


def _keyed_socket(ctx, endpoint, keys: ClientKeys) -> zmq.Socket:
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    keys.apply(sock)
    sock.connect(endpoint)
    return sock


def _chain(n_mm: int, side: int) -> bytes:
    """A program of ``n_mm`` chained ``side``^2 matrix products (a slow call, a10's x04)."""
    nodes, prev = [], 'x'
    for k in range(n_mm):
        nodes.append(exploits.node(f'm{k}', 'aten.mm.default', {'n': prev}, {'n': 'x'},
                                   out=('float32', (side, side))))
        prev = f'm{k}'
    return exploits.program(nodes, [prev], inputs=(('x', 'float32', (side, side)),))


def _add_one() -> bytes:
    return exploits.program([exploits.node('y', 'aten.add.Tensor', {'n': 'x'}, 1.0,
                                           out=('float32', (4,)))], ['y'])


def _record(request_id, digest, shape, priority=0, **options) -> list:
    return wire.encode({'kind': 'record', 'id': request_id, 'model': digest,
                        'signature': [{'dtype': 'float32', 'shape': list(shape)}],
                        'options': options, 'priority': priority})


def _put(sock, request_id, blob) -> None:
    digest = hashlib.sha256(blob).hexdigest()
    sock.send_multipart(wire.encode({
        'kind': 'put', 'id': request_id, 'digest': digest, 'blob_kind': 'program',
        'upload': f'u{request_id}', 'offset': 0, 'total': len(blob)},
        [torch.frombuffer(bytearray(blob), dtype=torch.uint8)]))
    assert sock.poll(60000)
    assert reply_header(sock.recv_multipart()[0], 'put')['kind'] == 'ok'


def _answer(sock, kind='record', timeout_ms=120000) -> dict:
    assert sock.poll(timeout_ms), f'no {kind} reply'
    return reply_header(sock.recv_multipart()[0], kind)


# ----------------------------------------------------------------------------- 2: records

@pytest.fixture
def keyed(tmp_path, make_server):
    """A keyed server: mallory (upload, capped at priority 0) and a victim robot (upload)."""
    keys, ck = client_certificates(tmp_path, {
        'victim': {'role': 'upload', 'max_priority': 10},
        'mallory': {'role': 'upload', 'max_priority': 0}})
    return make_server(keys=str(keys), sched_trace=4096), ck


def test_a_recording_is_many_short_steps_each_charged_to_its_keys_budget(keyed, zmq_ctx):
    """a11 #2: a record was one exclusive step (record, warm-up, 4 profiled calls), unbudgeted."""
    from rrto_server.profiling import DeviceBudget
    server, ck = keyed
    mallory = _keyed_socket(zmq_ctx, server.endpoint, ck['mallory'])
    blob = _chain(12, 512)
    _put(mallory, 1, blob)
    digest = hashlib.sha256(blob).hexdigest()
    mallory.send_multipart(_record(2, digest, (512, 512)))
    first = _answer(mallory)
    assert first['kind'] == 'ok', first
    steps = [e for e in server.scheduler.snapshot()['trace'] if e['task'] == '(record)']
    assert len(steps) >= 5, f'one recording ran in {len(steps)} scheduler steps'
    server.control.record_budget = DeviceBudget('record', burst_s=1.0, rate=0.0)
    replies, deadline = [], time.monotonic() + 60
    for k in range(1, 12):                      # new replay keys of one vetted model
        mallory.send_multipart(_record(10 + k, digest, (512, 512), segments=f'ops:{k}'))
        replies.append(_answer(mallory))
        if replies[-1]['kind'] == 'error':
            break
        assert time.monotonic() < deadline
    refused = replies[-1]
    assert refused['kind'] == 'error' and refused['code'] == ErrorCode.OVERLOADED, replies
    assert 'record budget' in refused['message']
    mallory.send_multipart(_record(30, digest, (512, 512), segments='ops:11'))
    again = _answer(mallory, timeout_ms=10000)               # refused: no trial, no step
    assert again['kind'] == 'error' and again['code'] == ErrorCode.OVERLOADED
    mallory.send_multipart(_record(31, digest, (512, 512)))  # recorded already: no device time
    assert _answer(mallory)['kind'] == 'ok'
    # the same replay written another way (cuts past the last operator: whole) is recorded
    # already too: answered, not refused for a budget it would not spend (r4's review)
    mallory.send_multipart(_record(32, digest, (512, 512), segments='ops:1000'))
    same = _answer(mallory, timeout_ms=10000)
    assert same['kind'] == 'ok' and not same['recorded'], same
    victim = _keyed_socket(zmq_ctx, server.endpoint, ck['victim'])     # its own budget
    vblob = _add_one()
    _put(victim, 1, vblob)
    victim.send_multipart(_record(2, hashlib.sha256(vblob).hexdigest(), (4,)))
    assert _answer(victim)['kind'] == 'ok'


def test_a_keys_sandbox_trials_are_paid_from_its_record_budget(keyed, zmq_ctx):
    """a10 #3 / a11 left-over: each new program's trial ran however spent its key's budget was."""
    from rrto_server.profiling import DeviceBudget
    server, ck = keyed
    sandbox = server.registry.sandbox
    server.control.record_budget = DeviceBudget('record', burst_s=1e-9, rate=0.0)
    mallory = _keyed_socket(zmq_ctx, server.endpoint, ck['mallory'])
    blobs = [exploits.program([exploits.node('y', 'aten.add.Tensor', {'n': 'x'}, float(k),
                                             out=('float32', (4,)))], ['y'])
             for k in range(1, 4)]
    for k, blob in enumerate(blobs):
        _put(mallory, 1 + k, blob)
    trials = sandbox.trials
    mallory.send_multipart(_record(10, hashlib.sha256(blobs[0]).hexdigest(), (4,)))
    first = _answer(mallory)
    assert sandbox.trials == trials + 1, 'the first program was not tried'
    assert first['kind'] == 'error' and first['code'] == ErrorCode.OVERLOADED, first
    for k, blob in enumerate(blobs[1:]):        # the trial spent the budget: no more trials
        mallory.send_multipart(_record(11 + k, hashlib.sha256(blob).hexdigest(), (4,)))
        refused = _answer(mallory, timeout_ms=30000)
        assert refused['kind'] == 'error' and refused['code'] == ErrorCode.OVERLOADED, refused
        assert 'record budget' in refused['message']
    assert sandbox.trials == trials + 1, f'{sandbox.trials - trials} trials on a spent budget'
    server.control.profile_budget = DeviceBudget('profile', burst_s=1e-9, rate=0.0)
    mallory.send_multipart(_profile_frames(20, hashlib.sha256(blobs[2]).hexdigest(), 2))
    profiled = _answer(mallory, 'profile')      # a profile's trial is paid from its budget
    assert sandbox.trials == trials + 2
    assert profiled['kind'] == 'error' and profiled['code'] == ErrorCode.OVERLOADED, profiled
    server.control.record_budget = DeviceBudget('record', burst_s=60.0, rate=0.0)
    victim = _keyed_socket(zmq_ctx, server.endpoint, ck['victim'])     # budgets are per key
    _put(victim, 1, blobs[1])
    victim.send_multipart(_record(2, hashlib.sha256(blobs[1]).hexdigest(), (4,)))
    assert _answer(victim)['kind'] == 'ok'
    assert sandbox.trials == trials + 3


def test_a_priority_0_keys_recordings_leave_a_priority_10_robot_its_deadlines(keyed, zmq_ctx):
    """a11 #2 as x01 ran it: the robot's infers (deadline 1 s) while mallory records in a loop."""
    from rrto_server.profiling import DeviceBudget
    server, ck = keyed
    server.control.record_budget = DeviceBudget('record', burst_s=3.0, rate=0.0)
    mallory = _keyed_socket(zmq_ctx, server.endpoint, ck['mallory'])
    blob = _chain(40, 512)       # a call of about 0.3 s: one step at most
    _put(mallory, 1, blob)
    digest = hashlib.sha256(blob).hexdigest()
    victim = _keyed_socket(zmq_ctx, server.endpoint, ck['victim'])
    vblob = _add_one()
    _put(victim, 1, vblob)
    victim.send_multipart(_record(2, hashlib.sha256(vblob).hexdigest(), (4,)))
    replay = _answer(victim)['replay']
    answers = []

    def records():                  # until refused: 39 segmentations are 39 recordings
        for k in range(1, 40):
            mallory.send_multipart(_record(10 + k, digest, (512, 512), segments=f'ops:{k}',
                                           priority=10))
            answers.append(_answer(mallory, timeout_ms=300000))
            if answers[-1]['kind'] == 'error':
                return
    attack = threading.Thread(target=records)
    attack.start()
    try:
        wait_running(server, '(record)', timeout=120)
        served = []
        for i in range(30):
            victim.send_multipart(infer_frames(100 + i, replay, torch.zeros(4), priority=10,
                                               deadline_ms=1000))
            header, _ = receive(victim, 60000)
            served.append(header['kind'] == 'ok')
            time.sleep(0.05)
    finally:
        attack.join(300)            # her budget (3 s of device time) ends it
    assert sum(served) >= 0.8 * len(served), f'{sum(served)} of {len(served)} within 1 s'
    assert answers[-1]['kind'] == 'error' and answers[-1]['code'] == ErrorCode.OVERLOADED
    assert len(answers) < 39, 'the budget never refused her'


def test_segments_are_canonical_so_option_strings_cannot_mint_replay_keys(make_server, zmq_ctx):
    """a11 #2: ``ops:01``, ``ops:1001`` ... were each a new replay key of one segmentation."""
    server = make_server()
    sock = raw_socket(zmq_ctx, server.endpoint)
    blob = _add_one()
    _put(sock, 1, blob)
    digest = hashlib.sha256(blob).hexdigest()
    sock.send_multipart(_record(2, digest, (4,)))
    whole = _answer(sock)
    assert whole['kind'] == 'ok' and whole['recorded']
    for k, segments in enumerate(['ops:1000', 'ops:1', 'block:9']):   # one node: no cut
        sock.send_multipart(_record(3 + k, digest, (4,), segments=segments))
        again = _answer(sock)
        assert again['kind'] == 'ok' and again['replay'] == whole['replay'], (segments, again)
        assert not again['recorded']
    for k, segments in enumerate(['ops:01', 'ops:+1', 'block:007']):
        sock.send_multipart(_record(10 + k, digest, (4,), segments=segments))
        refused = _answer(sock, timeout_ms=10000)
        assert refused['kind'] == 'error' and refused['code'] == ErrorCode.BAD_REQUEST
    assert len(server.replays.items()) == 1


# ----------------------------------------------------------------------------- 3: joins

class _Heavy(torch.nn.Module):
    """Chained 256 x 256 matrix products: a few ms of CPU per call."""

    def forward(self, x):
        for _ in range(8):
            x = torch.tanh(x @ x)
        return x


def test_a_record_that_joins_anothers_queued_recording_keeps_its_own_place(make_server,
                                                                           zmq_ctx):
    """a11 #3: the robot's record joined mallory's, queued behind all of her recordings."""
    server = make_server()
    mallory, robot = (raw_socket(zmq_ctx, server.endpoint) for _ in range(2))
    heavy, victim = _chain(12, 512), _add_one()
    _put(mallory, 1, heavy)
    _put(robot, 1, victim)
    heavy, victim = hashlib.sha256(heavy).hexdigest(), hashlib.sha256(victim).hexdigest()
    server.registry.get(heavy, FREE)                  # vetted (as after a restart): no trials
    server.registry.get(victim, FREE)
    for i in range(6):
        mallory.send_multipart(_record(i, heavy, (512, 512), segments=f'ops:{i + 1}'))
    mallory.send_multipart(_record(6, victim, (4,)))         # the robot's, queued first
    wait_running(server, '(record)')
    deadline = time.monotonic() + 60
    while server.control.queue.pending():             # every one vetted (cached verdicts)
        assert time.monotonic() < deadline
        time.sleep(0.005)
    before = [_answer(mallory)['id'] for _ in range(8) if mallory.poll(0)]
    assert len(before) <= 2, f'mallory\'s recordings went too fast to measure: {before}'
    robot.send_multipart(_record(9, victim, (4,)))
    assert _answer(robot)['kind'] == 'ok'
    ahead = [_answer(mallory)['id'] for _ in range(8) if mallory.poll(0)]
    assert len([i for i in ahead if i < 6]) <= 2, (
        f'the robot\'s recording waited for {ahead} of mallory\'s {6 - len(before)} left')
    for _ in range(7 - len(before) - len(ahead)):
        assert _answer(mallory)['kind'] == 'ok'


# ----------------------------------------------------------------------------- 5: deadlines

def _profile_frames(request_id, digest, repeats, **fields):
    return wire.encode(dict({'kind': 'profile', 'id': request_id, 'model': digest,
                             'repeats': repeats}, **fields), [])


def test_a_profile_with_a_past_deadline_and_late_run_yields_to_its_band(make_server, zmq_ctx):
    """a11 #5: deadline_ms=0.001 + late='run' kept a profile first in its band to its end."""
    server = make_server()
    victim = prepare(server.endpoint, torch.nn.Linear(4, 4), torch.ones(1, 4))
    heavy = upload(server.endpoint, _Heavy(), torch.randn(256, 256)).model
    attacker = raw_socket(zmq_ctx, server.endpoint)
    robot = raw_socket(zmq_ctx, server.endpoint)
    attacker.send_multipart(_profile_frames(1, heavy, 100, priority=5, deadline_ms=0.001,
                                            late='run'))
    wait_running(server, '(profile)')
    start = time.monotonic()
    robot.send_multipart(infer_frames(2, victim, torch.ones(1, 4), priority=5))
    header, _ = receive(robot, 120000)
    assert header['kind'] == 'ok'
    assert not attacker.poll(0), (
        f'the victim waited {time.monotonic() - start:.1f} s, the whole profile')
    assert _answer(attacker, 'profile')['kind'] == 'ok'


class _Block(Job):
    """A job whose one step waits for ``gate``, and records its name when it runs."""

    def __init__(self, name, order, gate=None, **keys):
        super().__init__(**keys)
        self.name, self.order, self.gate = name, order, gate

    def step(self):
        if self.gate is not None:
            self.gate.wait(10)
        self.order.append(self.name)
        return True


def _until(condition, within_s: float = 10.0) -> None:
    deadline = time.monotonic() + within_s
    while not condition():
        assert time.monotonic() < deadline, f'{condition} did not hold within {within_s} s'
        time.sleep(0.001)


def test_a_late_run_job_past_its_deadline_does_not_outrank_its_band():
    """a11 #5 for every job kind: a deadline already passed orders as no deadline."""
    scheduler = Scheduler()
    order, gate = [], threading.Event()
    try:
        scheduler.submit(_Block('holder', order, gate, priority=9))
        _until(scheduler.running)
        scheduler.submit(_Block('on time', order, priority=5))
        scheduler.submit(_Block('past, run', order, priority=5, late=RUN,
                                deadline=time.perf_counter() - 1.0))
        scheduler.submit(_Block('urgent', order, priority=5,
                                deadline=time.perf_counter() + 60))
        gate.set()
        _until(lambda: len(order) == 4)
    finally:
        scheduler.close()
    assert order == ['holder', 'urgent', 'on time', 'past, run']


def test_a_late_run_job_past_its_deadline_does_not_overtake_on_the_io_thread():
    """a11 #5 on the inline path: a missed deadline must not count as urgency there either."""
    scheduler = Scheduler()
    order, gate = [], threading.Event()
    try:
        scheduler.submit(_Block('holder', order, gate, priority=5))
        _until(scheduler.running)
        threading.Timer(0.3, gate.set).start()      # the holder's step ends in 0.3 s
        late = _Block('past, run', order, priority=5, late=RUN,
                      deadline=time.perf_counter() - 1.0)
        assert not scheduler.run_inline(late, wait_s=10.0), 'it overtook its band inline'
    finally:
        gate.set()
        scheduler.close()


# ----------------------------------------------------------------------------- 4: fleet warms

def test_the_front_serves_each_keys_warms_in_turn(tmp_path, zmq_ctx):
    """a11 #4: 8 warms of one key, then another key's: it waited for all 8 (one FIFO pool)."""
    from rrto_fleet.directory import Directory
    from rrto_fleet.front import Front
    from rrto_wire import fleet
    keys, ck = client_certificates(tmp_path, {
        'robot': {'role': 'infer'},
        'mallory': {'role': 'infer'}})
    port = SlowPort(0.3)
    directory = Directory({'a': port})
    directory.poll()
    front = Front(directory, 'tcp://127.0.0.1:*', keys=str(keys)).start()
    signature = [{'dtype': 'float32', 'shape': [4]}]

    def send(who, request_id, model):
        sock = _keyed_socket(zmq_ctx, front.endpoint, ck[who])
        sock.send(fleet.encode(fleet.Request(v=fleet.DIRECTORY_VERSION, id=request_id,
                                             kind='warm', model=model, signature=signature)))
        return sock
    try:
        socks = [send('mallory', k, f'{k:x}' * 64) for k in range(8)]
        deadline = time.monotonic() + 30
        while not port.started:
            assert time.monotonic() < deadline
            time.sleep(0.005)
        time.sleep(0.1)                          # every one of hers is in the front's queue
        robot = send('robot', 99, 'f' * 64)
        assert robot.poll(60000)
        assert fleet.decode_reply(robot.recv()).kind == 'ok'
        ahead = port.started.index('f' * 64)
        assert ahead <= 2, f'the robot\'s warm started after {ahead} of mallory\'s 8'
        for sock in socks:
            assert sock.poll(60000)
            assert fleet.decode_reply(sock.recv()).kind == 'ok'
    finally:
        front.close()


def test_a_replica_records_its_fleets_warms_without_one_shared_record_budget(tmp_path,
                                                                             zmq_ctx):
    """
    The replicas record every robot's warms as the fleet key: one record budget for all
    of them would let one robot spend every robot's.  A robot's own records spend its own.
    """
    from rrto_fleet.replica import Replica
    from rrto_server.options import ServerConfig
    from rrto_server.profiling import DeviceBudget
    keys, ck = client_certificates(tmp_path, {
        'robot': {'role': 'upload'},
        'fleet': {'role': 'infer'}})
    config = ServerConfig(bind='tcp://127.0.0.1:0', store=str(tmp_path / 'store'),
                          device='cpu', keys=str(keys))
    replica = Replica(config, keys=ck['fleet'])
    try:
        robot = _keyed_socket(zmq_ctx, replica.endpoint, ck['robot'])
        nodes = [exploits.node(f'y{i}', 'aten.add.Tensor', {'n': 'x' if i == 0 else f'y{i - 1}'},
                               1.0, out=('float32', (4,))) for i in range(3)]
        blob = exploits.program(nodes, ['y2'])
        digest = hashlib.sha256(blob).hexdigest()
        _put(robot, 1, blob)
        replica.server.control.record_budget = DeviceBudget(    # any one step exceeds it
            'record', burst_s=1e-9, rate=0.0)
        signature = [{'dtype': 'float32', 'shape': [4]}]
        for segments in ('ops:1', 'ops:2', 'whole'):
            assert replica.warm(digest, signature, {'segments': segments})['replay']
        robot.send_multipart(_record(2, digest, (4,), segments='ops:1'))
        assert _answer(robot)['kind'] == 'ok'                 # recorded: no device time
        robot.send_multipart(_record(3, digest, (4,), segments='ops:2', mode='eager'))
        refused = _answer(robot)                              # its own budget
        assert refused['kind'] == 'error' and refused['code'] == ErrorCode.OVERLOADED, refused
    finally:
        replica.close()
