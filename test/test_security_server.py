"""The trust boundary end to end: a CURVE server, roles, naive mode, integrity, budgets."""

import hashlib
import time

import exploits
import pytest
import torch
import zmq
from rrto_testing import raw_socket, reply_header

from rrto_ros.client import RemoteError, RrtoClient
from rrto_ros.records import OffloadResult
from rrto_ros.zoo import keypoint_net
from rrto_server import keys
from rrto_server.auth import Grant, Peer
from rrto_server.replay import Replay
from rrto_server.sandbox import FREE
from rrto_server.replay_cache import ReplayCache
from rrto_server.server import Server, ServerConfig
from rrto_wire import protocol as wire
from rrto_wire.curve import ClientKeys
from rrto_wire.messages import Kind, RecordOptions


@pytest.fixture
def keyed(tmp_path):
    """Keys: 'uploader' (upload, ceiling 5), 'viewer' (infer), 'hog' (infer, 2 replays), 'ops'."""
    server_dir, robots = tmp_path / 'keys', tmp_path / 'robots'
    keys.create_pair(server_dir, 'server')
    for name, grant in (('uploader', Grant('upload', max_priority=5)), ('viewer', Grant()),
                        ('hog', Grant(max_replays=2)), ('ops', Grant('admin'))):
        keys.create_pair(robots, name)
        keys.allow(server_dir, robots / f'{name}.key', grant)
    keys.create_pair(robots, 'stranger')

    def client_keys(name):
        return ClientKeys.load(server_dir / 'server.key', robots / f'{name}.key_secret')
    return server_dir, robots, client_keys


def _put(client, blob, kind):
    return client.upload({hashlib.sha256(blob).hexdigest(): (kind, blob)}, timeout_ms=30000)


def test_a_server_on_a_public_address_needs_keys_or_an_explicit_insecure_flag(tmp_path, caplog):
    with pytest.raises(ValueError, match='insecure'):
        Server(ServerConfig(bind='tcp://0.0.0.0:0', store=str(tmp_path / 's'), device='cpu'))
    server = Server(ServerConfig(bind='tcp://0.0.0.0:0', store=str(tmp_path / 's'),
                                 device='cpu', insecure=True))
    server.close()
    assert 'INSECURE' in caplog.text


def test_only_allowed_keys_are_served_with_their_roles(make_server, keyed, zmq_ctx, caplog):
    caplog.set_level('DEBUG')
    server_dir, robots, client_keys = keyed
    server = make_server(keys=str(server_dir))
    uploader = RrtoClient(server.endpoint, call_timeout_ms=20000, keys=client_keys('uploader'))
    viewer = RrtoClient(server.endpoint, call_timeout_ms=20000, keys=client_keys('viewer'))
    stranger = RrtoClient(server.endpoint, connect_timeout_ms=500, call_timeout_ms=1500,
                          keys=client_keys('stranger'))
    plain = raw_socket(zmq_ctx, server.endpoint)
    try:
        assert uploader.hello()['kind'] == Kind.OK
        program, weights = exploits.scale_by_weights()
        _put(uploader, weights, 'weights')
        _put(uploader, program, 'program')
        with pytest.raises(RemoteError, match='forbidden'):
            _put(viewer, exploits.inplace_on_intermediate(), 'program')
        reply, _ = viewer.call(Kind.RECORD, {
            'model': hashlib.sha256(program).hexdigest(), 'priority': 10 ** 9,
            'signature': [{'dtype': 'float32', 'shape': [4]}]}, timeout_ms=120000)
        (y,), = [viewer.call(Kind.INFER, {'replay': reply['replay']}, [torch.ones(4)])[1]]
        assert torch.equal(y, torch.arange(4.0))
        assert server.guard.policy.clamped == 1          # 10**9 ran at the viewer's ceiling
        assert hashlib.sha256(program).hexdigest() in uploader.stats()['models']
        assert viewer.stats()['models'] == {} and viewer.stats()['replays'] == []
        with pytest.raises(Exception):
            stranger.hello()
        try:           # once the failed handshake dropped its pipe a send would block
            plain.send_multipart(wire.encode({'kind': 'hello', 'id': 1}), zmq.NOBLOCK)
        except zmq.Again:
            pass
        assert not plain.poll(1500)
        for name in ('uploader', 'viewer', 'stranger'):        # no key in any log line
            for key in (client_keys(name).public, client_keys(name).secret):
                assert key.decode() not in caplog.text
    finally:
        for client in (uploader, viewer, stranger):
            client.close()


def test_naive_mode_is_off_by_default_and_works_on_copies(make_server):
    victim, weights = exploits.scale_by_weights()
    digest = hashlib.sha256(victim).hexdigest()
    for allow_naive in (False, True):
        server = make_server(allow_naive=allow_naive)
        client = RrtoClient(server.endpoint, call_timeout_ms=120000)
        try:
            _put(client, weights, 'weights')
            _put(client, victim, 'program')
            replay = client.call(Kind.RECORD, {'model': digest, 'signature': [
                {'dtype': 'float32', 'shape': [4]}]})[0]['replay']
            op = {'model': digest, 'session': 'evil', 'op': 'aten.mul_.Tensor',
                  'args': [{'n': 'p_w'}, 0.0], 'out': 'z', 'fetch': ['p_w']}
            if not allow_naive:
                with pytest.raises(RemoteError, match='forbidden'):
                    client.call(Kind.OP, op)
                continue
            (zeroed,) = client.call(Kind.OP, op)[1]
            assert not zeroed.any()                        # the session's own copy
            (y,) = client.call(Kind.INFER, {'replay': replay}, [torch.ones(4)])[1]
            assert torch.equal(y, torch.arange(4.0))      # the stored weights are untouched
        finally:
            client.close()


def test_a_corrupt_blob_is_uploaded_again_by_the_client_on_its_own(
        tmp_path, make_server, offloaded):
    store = tmp_path / 'shared'
    server = make_server(store=str(store))
    x = torch.randn(1, 3, 64, 64)
    model = keypoint_net().eval()
    om = offloaded(model, server.endpoint, timeout_ms=30000)
    assert om.warmup(x)
    expected = model(x)
    server.close()
    for blob in (store / 'blobs').iterdir():
        if blob.suffix == '' and len(blob.read_bytes()) > 100_000:     # the weights
            data = bytearray(blob.read_bytes())
            blob.write_bytes(bytes(data[:len(data) // 2]))             # truncated
    restarted = make_server(store=str(store))
    again = offloaded(model, restarted.endpoint, timeout_ms=30000)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        out = again(x)
        if again.last.result == OffloadResult.OFFLOADED:
            break
        time.sleep(0.5)
    assert again.last.result == OffloadResult.OFFLOADED
    assert torch.equal(out, expected) if isinstance(out, torch.Tensor) else True
    assert again.stats()['uploads'] >= 1 and restarted.store.quarantined == 1


def test_unsafe_programs_are_refused_and_the_server_keeps_serving(server, zmq_ctx):
    client = RrtoClient(server.endpoint, call_timeout_ms=300000)
    try:
        with pytest.raises(RemoteError, match='not allowed'):
            _put(client, exploits.sparse_segfault(), 'program')
        hog = exploits.allocates(2 << 30)
        _put(client, hog, 'program')
        with pytest.raises(RemoteError, match='unsafe_program'):
            client.call(Kind.RECORD, {'model': hashlib.sha256(hog).hexdigest(),
                                      'signature': [{'dtype': 'float32', 'shape': [4]}]})
        assert client.hello()['kind'] == Kind.OK
    finally:
        client.close()


def test_cpu_replays_count_against_the_replay_budget(make_server):
    server = make_server(max_replay_bytes=48 << 20)
    client = RrtoClient(server.endpoint, call_timeout_ms=300000)
    try:
        replays = []
        for megabytes in (32, 33):                  # each call needs > 24 MiB
            blob = exploits.allocates(megabytes << 20)
            _put(client, blob, 'program')
            replays.append(client.call(Kind.RECORD, {
                'model': hashlib.sha256(blob).hexdigest(),
                'signature': [{'dtype': 'float32', 'shape': [4]}]})[0])
        assert all(r['nbytes'] >= 32 << 20 for r in replays)
        assert server.replays.evictions == 1 and len(server.replays) == 1
    finally:
        client.close()


def _record(client, digest, segments='whole'):
    return client.call(Kind.RECORD, {'model': digest, 'options': {'segments': segments},
                                     'signature': [{'dtype': 'float32', 'shape': [4]}]},
                       timeout_ms=120000)[0]['replay']


def _keyed_clients(server, client_keys, *names):
    return [RrtoClient(server.endpoint, call_timeout_ms=120000, keys=client_keys(name))
            for name in names]


def test_only_an_admin_evicts_a_model_and_shared_weights_stay(make_server, keyed):
    server_dir, _, client_keys = keyed
    server = make_server(keys=str(server_dir))
    uploader, viewer, admin = _keyed_clients(server, client_keys, 'uploader', 'viewer', 'ops')
    try:
        scale, weights = exploits.scale_by_weights()
        shift = exploits.program([exploits.node('y', 'aten.add.Tensor', {'n': 'x'}, {'n': 'p_w'},
                                                out=('float32', (4,)))], ['y'],
                                 params={'p_w': 'w'}, weights=weights)   # the same weights
        digest, shared, other = (hashlib.sha256(b).hexdigest() for b in (scale, weights, shift))
        for blob, kind in ((weights, 'weights'), (scale, 'program'), (shift, 'program')):
            _put(uploader, blob, kind)
        replay = _record(viewer, digest)
        for client in (uploader, viewer):
            with pytest.raises(RemoteError, match='forbidden'):
                client.evict(digest)
        assert admin.evict(digest) == {'replays': 1, 'unloaded': True, 'deleted': [digest],
                                       'kept': [shared]}
        with pytest.raises(RemoteError, match='not_recorded'):
            viewer.call(Kind.INFER, {'replay': replay}, [torch.ones(4)])
        assert viewer.call(Kind.MISSING, {'digests': [digest, shared]})[0]['missing'] == [digest]
        with pytest.raises(RemoteError, match='unknown_model'):
            admin.evict(digest)                      # nothing of it is left
        assert admin.evict(other, store=False) == {'replays': 0, 'unloaded': False,
                                                   'deleted': [], 'kept': []}
        assert sorted(admin.evict(other)['deleted']) == sorted([other, shared])
        assert server.store.digests() == []
        snapshot = server.snapshot()
        assert snapshot['open_requests'] == 0 and snapshot['double_answers'] == 0
    finally:
        for client in (uploader, viewer, admin):
            client.close()


def test_a_key_recording_many_replays_pushes_out_its_own_never_anothers(make_server, keyed):
    server_dir, _, client_keys = keyed
    server = make_server(keys=str(server_dir), max_replays=3)
    uploader, viewer, hog = _keyed_clients(server, client_keys, 'uploader', 'viewer', 'hog')
    try:
        # eight operators: ops:1 to ops:7 are seven segmentations (a11: replay keys are
        # canonical, so option strings that cut alike name one replay)
        program = exploits.program(
            [exploits.node(f'y{i}', 'aten.add.Tensor', {'n': f'y{i - 1}' if i else 'x'}, 1.0,
                           out=('float32', (4,))) for i in range(8)], ['y7'])
        _put(uploader, program, 'program')
        digest = hashlib.sha256(program).hexdigest()
        mine = _record(viewer, digest)
        theirs = [_record(hog, digest, f'ops:{n}') for n in range(1, 6)]   # 5 option sets
        kept = {r.key for r in server.replays.items()}
        assert mine in kept and kept - {mine} == set(theirs[-2:])    # hog's quota: 2
        usage = server.replays.usage()
        assert usage['hog']['replays'] == 2 and usage['viewer']['replays'] == 1
        (y,) = viewer.call(Kind.INFER, {'replay': mine}, [torch.ones(4)])[1]
        assert torch.equal(y, torch.full((4,), 9.0))
        # a replay both use stays while one of them still pays for it
        assert _record(viewer, digest, 'ops:5') == theirs[-1]
        _record(hog, digest, 'ops:6')
        latest = _record(hog, digest, 'ops:7')    # hog gives up ops:5 (viewer keeps it), and
        # at the server's limit the tie between viewer and hog (2 each) costs hog its ops:6
        assert {r.key for r in server.replays.items()} == {mine, theirs[-1], latest}
        assert server.replays.usage()['hog']['replays'] == 1
    finally:
        for client in (uploader, viewer, hog):
            client.close()


class _Replay:
    """What the replay cache reads of a replay: its key, bytes and model."""

    def __init__(self, key, nbytes, digest='m'):
        self.key, self.nbytes = key, nbytes
        self.model = type('Model', (), {'digest': digest})()


def test_the_replay_byte_budget_is_taken_from_the_heaviest_key_first():
    small, big = Peer('small', Grant()), Peer('big', Grant(replay_bytes=250))
    cache = ReplayCache(max_replays=100, max_bytes=300)
    cache.add(_Replay('s1', 50), [small])
    cache.add(_Replay('b1', 100), [big])
    cache.add(_Replay('b2', 100), [big])
    cache.add(_Replay('b3', 100), [big])       # big over its own 250: its b1 goes
    assert [r.key for r in cache.items()] == ['s1', 'b2', 'b3'] and cache.nbytes == 250
    cache.add(_Replay('s2', 90), [small])      # 340 > 300: big uses most, its b2 goes
    assert [r.key for r in cache.items()] == ['s1', 'b3', 's2'] and cache.evictions == 2
    assert cache.usage() == {'small': {'replays': 2, 'bytes': 140},
                             'big': {'replays': 1, 'bytes': 100}}
    assert cache.remove_model('m') == 3 and len(cache) == 0 and cache.nbytes == 0


def test_a_burst_is_admitted_highest_priority_first_and_low_ones_are_shed(tmp_path, zmq_ctx):
    server = Server(ServerConfig(bind='tcp://127.0.0.1:0', store=str(tmp_path / 's'),
                                 device='cpu', admission_capacity=2))   # bands: 2, 1, 1
    try:
        program, weights = exploits.scale_by_weights()
        server.store.put(hashlib.sha256(weights).hexdigest(), 'weights', weights)
        server.store.put(hashlib.sha256(program).hexdigest(), 'program', program)
        model = server.registry.get(hashlib.sha256(program).hexdigest(), FREE)
        replay = Replay(model, model.program.signature, RecordOptions(), torch.device('cpu'))
        server.replays.add(replay)
        sock = raw_socket(zmq_ctx, server.endpoint)
        for index, priority in enumerate((10, 10, 0, 0, 0)):     # the urgent ones first
            sock.send_multipart(wire.encode({'kind': 'infer', 'id': index, 'replay': replay.key,
                                             'priority': priority}, [torch.ones(4)]))
        time.sleep(2.0)                  # all five wait in the socket: one received batch
        server.start()
        codes = {}
        for _ in range(5):
            assert sock.poll(60000), 'a request was not answered'
            header = reply_header(sock.recv_multipart()[0])
            codes[header['id']] = header.get('code', 'ok')
        assert codes[0] == codes[1] == 'ok'          # never shed for the low ones behind
        assert [codes[i] for i in (2, 3, 4)].count('overloaded') >= 2
    finally:
        server.close()
