"""Authentication and roles: CURVE with pyzmq's ZAP authenticator, revocation, grants."""

import json
import stat
import time

import pytest
import zmq

from rrto_server import keys
from rrto_server.admission import Admission
from rrto_server.auth import ANONYMOUS, CurveGate, Grant, KeyRing, Peer, Policy, needs_curve
from rrto_server.guard import Guard
from rrto_wire.curve import ClientKeys
from rrto_wire.errors import ErrorCode, ProtocolError


@pytest.fixture
def fleet(tmp_path):
    """A server key directory and two robots' key pairs, robot1 allowed as 'upload'."""
    server_dir, robots = tmp_path / 'server', tmp_path / 'robots'
    assert keys.main(['server', str(server_dir)]) == 0
    for name in ('robot1', 'robot2'):
        assert keys.main(['client', str(robots), name]) == 0
    assert keys.main(['allow', str(server_dir), str(robots / 'robot1.key'), '--role', 'upload',
                      '--max-priority', '5']) == 0
    return server_dir, robots


def test_the_key_tool_writes_secrets_private_and_prints_no_key(fleet, capsys):
    server_dir, robots = fleet
    for secret in (server_dir / 'server.key_secret', robots / 'robot1.key_secret'):
        assert stat.S_IMODE(secret.stat().st_mode) == 0o600
    out = capsys.readouterr().out
    public = ClientKeys.load(server_dir / 'server.key', robots / 'robot1.key_secret')
    for key in (public.server_public, public.public, public.secret):
        assert key.decode() not in out and key.decode() not in repr(public)
    assert keys.main(['client', str(robots), 'robot1']) == 2      # never overwrites a key
    assert keys.main(['list', str(server_dir)]) == 0
    assert '"role": "upload"' in capsys.readouterr().out


def _router(ctx, keyring):
    sock = ctx.socket(zmq.ROUTER)
    sock.setsockopt(zmq.LINGER, 0)
    keyring.secure(sock)
    port = sock.bind_to_random_port('tcp://127.0.0.1')
    return sock, f'tcp://127.0.0.1:{port}'


def _dealer(ctx, endpoint, client_keys):
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    if client_keys is not None:
        client_keys.apply(sock)
    sock.connect(endpoint)
    return sock


def _served(router, dealer, keyring, timeout_ms=3000):
    """Send one message; return the Peer the router authenticated, or None if none arrived."""
    dealer.send(b'hello')
    if not router.poll(timeout_ms):
        return None
    frames = router.recv_multipart(copy=False)
    return keyring.peer(frames[1].get('User-Id'))


def test_only_allow_listed_keys_get_through_and_revocation_needs_no_restart(fleet, zmq_ctx):
    server_dir, robots = fleet
    keyring = KeyRing(server_dir)
    gate = CurveGate(zmq_ctx, keyring)
    try:
        router, endpoint = _router(zmq_ctx, keyring)
        server_key = server_dir / 'server.key'
        robot1 = ClientKeys.load(server_key, robots / 'robot1.key_secret')
        robot2 = ClientKeys.load(server_key, robots / 'robot2.key_secret')
        allowed = _dealer(zmq_ctx, endpoint, robot1)
        peer = _served(router, allowed, keyring)
        assert peer.name == 'robot1' and peer.grant == Grant('upload', max_priority=5)
        assert _served(router, _dealer(zmq_ctx, endpoint, robot2), keyring, 1500) is None
        assert _served(router, _dealer(zmq_ctx, endpoint, None), keyring, 1500) is None
        # a client that does not know the server's real key never talks to it
        impostor = ClientKeys(robot2.public, robot1.public, robot1.secret)
        assert _served(router, _dealer(zmq_ctx, endpoint, impostor), keyring, 1500) is None

        assert keys.revoke(server_dir, 'robot1')
        deadline = time.monotonic() + 10
        while len(keyring) and time.monotonic() < deadline:
            time.sleep(0.1)
        with pytest.raises(ProtocolError) as err:       # the open connection: refused per request
            _served(router, allowed, keyring)
        assert err.value.code == ErrorCode.UNAUTHORIZED
        assert _served(router, _dealer(zmq_ctx, endpoint, robot1), keyring, 1500) is None

        keys.allow(server_dir, robots / 'robot2.key', Grant())   # added without a restart
        deadline = time.monotonic() + 10
        while not len(keyring) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert _served(router, _dealer(zmq_ctx, endpoint, robot2), keyring).name == 'robot2'
    finally:
        gate.close()


def test_roles_priority_ceilings_and_in_flight_quotas():
    policy = Policy()
    infer = Peer('cam', Grant('infer', max_priority=3, max_in_flight=2))
    assert policy.authorize(infer, 'infer', 10 ** 9) == 3 and policy.clamped == 1
    assert policy.authorize(infer, 'infer', -4) == -4 and policy.authorize(infer, 'hello') is None
    with pytest.raises(ProtocolError) as err:
        policy.authorize(infer, 'put')
    assert err.value.code == ErrorCode.FORBIDDEN
    policy.authorize(Peer('ops', Grant('upload')), 'put')
    policy.begin(infer)
    policy.begin(infer)
    with pytest.raises(ProtocolError) as err:
        policy.begin(infer)
    assert err.value.code == ErrorCode.OVERLOADED
    policy.end(infer)
    policy.begin(infer)
    assert policy.in_flight(infer) == 2 and ANONYMOUS.grant.allows('admin')


def test_one_admit_checks_what_authorize_and_begin_check():
    # the server's one call a request: the role, the ceiling, then the quota, as the two
    policy = Policy()
    infer = Peer('cam', Grant('infer', max_priority=3, max_in_flight=2))
    assert policy.admit(infer, 'infer', 10 ** 9) == 3 and policy.clamped == 1
    assert policy.admit(infer, 'infer', -4) == -4 and policy.in_flight(infer) == 2
    with pytest.raises(ProtocolError) as err:
        policy.admit(infer, 'hello')
    assert err.value.code == ErrorCode.OVERLOADED and policy.in_flight(infer) == 2
    policy.end(infer)
    policy.end(infer)
    with pytest.raises(ProtocolError) as err:
        policy.admit(infer, 'put', 10 ** 9)
    assert err.value.code == ErrorCode.FORBIDDEN
    assert policy.in_flight(infer) == 0 and policy.clamped == 1, 'refused: neither counted'
    assert policy.admit(Peer('ops', Grant('upload')), 'put') is None
    assert policy.admit(infer, 'hello') is None and policy.in_flight(infer) == 1
    assert policy.admit(ANONYMOUS, 'evict', 2 ** 62) == 2 ** 62


@pytest.mark.parametrize('endpoint, curve', [
    ('tcp://127.0.0.1:5555', False), ('tcp://localhost:5555', False),
    ('tcp://[::1]:5555', False), ('ipc:///tmp/rrto', False), ('tcp://0.0.0.0:5555', True),
    ('tcp://*:5555', True), ('tcp://192.168.1.20:5555', True), ('tcp://eth0:5555', True)])
def test_curve_is_required_on_every_address_but_loopback(endpoint, curve):
    assert needs_curve(endpoint) == curve


def test_admission_sheds_the_lowest_priority_first():
    admission = Admission(capacity=10)
    admitted = {p: 0 for p in (0, 5, 10)}
    for _ in range(20):
        for priority in (0, 5, 10):
            try:
                admission.admit(priority)
                admitted[priority] += 1
            except ProtocolError as exc:
                assert exc.code == ErrorCode.OVERLOADED
    assert admitted[0] < admitted[5] < admitted[10]
    for priority, count in admitted.items():
        for _ in range(count):
            admission.done(priority)
    assert admission.in_flight == 0
    admission.admit(0)
    with pytest.raises(ProtocolError, match='waiting 8'):    # a backlog counts as load
        admission.admit(5, backlog=8)
    admission.admit(10, backlog=8)


def test_queued_low_priorities_never_make_the_top_band_shed():
    admission = Admission(capacity=10)
    for priority, admitted in ((0, 6), (5, 8), (10, 10)):    # 60 %, 80 %, 100 % of 10
        for _ in range(admitted):
            admission.admit(priority)
        with pytest.raises(ProtocolError):
            admission.admit(priority)
    assert admission.in_flight == 24
    admission.done(0)
    with pytest.raises(ProtocolError):      # a low request answered frees no room above it
        admission.admit(10)
    admission.done(10)
    admission.admit(10)


def test_a_received_batch_is_admitted_highest_priority_first(zmq_ctx):
    guard = Guard(zmq_ctx, 'tcp://127.0.0.1:0', capacity=10)

    def message(kind, priority=None, envelope=False):
        header = {'v': 2, 'kind': kind, 'id': f'{kind}{priority}'}
        if priority is not None:
            header['priority'] = priority
        frames = [b'peer'] + ([b''] if envelope else []) + [json.dumps(header).encode(), b'x']
        return [zmq.Frame(f) for f in frames]

    batch = [message('infer', 0), message('infer', 5), message('hello'),
             [zmq.Frame(b'peer'), zmq.Frame(b'{not json')],
             message('infer', 10, envelope=True), message('infer'), message('infer', 10),
             message('record', 10 ** 9)]
    order = guard.order(batch)
    names = [(json.loads(frames[-2].bytes)['id'] if len(frames) > 2 else 'junk', backlog)
             for frames, backlog in order]
    assert names == [('helloNone', 0), ('junk', 0), ('record1000000000', 0), ('infer10', 1),
                     ('infer10', 0), ('infer5', 0), ('infer0', 1), ('inferNone', 0)]
    assert guard.order(batch[:1]) == [(batch[0], 0)]
