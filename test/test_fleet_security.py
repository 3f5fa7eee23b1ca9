"""
The fleet directory acts for the key that asks (a10's finding 4, docs/security.md).

Before, every ``warm`` was kept for good under the directory's own name: one
infer-role key could raise a model's minimum of replicas to 64, pile up specs
that every new replica records again, and fill the fleet key's replay quota on
the replicas until another robot's replay was evicted.
"""

import hashlib
import json
import threading
import time

import pytest
import torch
import zmq
import zmq.auth

import exploits
from rrto_fleet.directory import Caller, Directory, Policy, WarmError
from rrto_fleet.front import Front
from rrto_fleet.replica import Replica
from rrto_ros.client import RrtoClient
from rrto_server.server import ServerConfig
from rrto_testing import client_certificates
from rrto_wire import fleet
from rrto_wire.curve import ClientKeys

MODEL = 'f' * 64
SIGNATURE = [{'dtype': 'float32', 'shape': [4]}]


class FakePort:
    """A replica that records anything; ``gate`` (when set) holds every warm until it opens."""

    def __init__(self, name):
        self.name, self.warmed, self.gate, self.entered = name, [], None, 0

    def warm(self, model, signature, options):
        self.entered += 1
        if self.gate is not None:
            self.gate.wait(30)
        self.warmed.append((model, json.dumps(options, sort_keys=True)))
        return {'replay': f'{model}|{json.dumps(options, sort_keys=True)}'}

    def load(self):
        return {'instance': self.name, 'endpoint': f'tcp://{self.name}:1', 'infers': {},
                'replays': [r for m, o in self.warmed for r in [f'{m}|{o}']]}


def _directory(names=('a', 'b', 'c'), **policy):
    now = [0.0]
    ports = {n: FakePort(n) for n in names}
    directory = Directory(ports, Policy(**policy), clock=lambda: now[0])
    directory.poll()
    return directory, ports, now


def test_only_an_admin_key_raises_the_minimum_of_replicas():
    directory, _, _ = _directory()
    robot = Caller('mallory', max_specs=16, admin=False)
    holders, _ = directory.warm(MODEL, SIGNATURE, {}, replicas=64, caller=robot)
    assert len(holders) == 2                      # a duplicated request's two, no more
    assert directory.snapshot()['models'][MODEL]['minimum'] == 1      # and not kept
    holders, _ = directory.warm(MODEL, SIGNATURE, {}, replicas=3, caller=Caller('ops'))
    assert len(holders) == 3 and directory.snapshot()['models'][MODEL]['minimum'] == 3


def test_a_key_claims_at_most_its_limit_of_specs_and_claims_expire():
    directory, ports, now = _directory(('a',), claim_ttl_s=100.0)
    mallory = Caller('mallory', max_specs=3, admin=False)
    for k in range(3):
        directory.warm(MODEL, SIGNATURE, {'segments': f'ops:{k}'}, caller=mallory)
    directory.warm(MODEL, SIGNATURE, {'segments': 'ops:0'}, caller=mallory)   # a refresh
    with pytest.raises(WarmError) as err:
        directory.warm(MODEL, SIGNATURE, {'segments': 'ops:9'}, caller=mallory)
    assert err.value.code == 'forbidden' and 'max_replays' in err.value.message
    # another key is not held by mallory's claims, and shares a spec she claims
    victim = Caller('victim', max_specs=1, admin=False)
    directory.warm(MODEL, SIGNATURE, {'segments': 'ops:1'}, caller=victim)
    assert directory.snapshot()['models'][MODEL]['specs'] == 3
    now[0] += 60
    directory.warm(MODEL, SIGNATURE, {'segments': 'ops:1'}, caller=victim)    # victim's refresh
    now[0] += 50               # mallory's claims (ops:1's at 0 s) are past 100 s, victim's not
    directory.scale()
    assert directory.snapshot()['models'][MODEL]['specs'] == 1
    directory.warm(MODEL, SIGNATURE, {'segments': 'ops:9'}, caller=mallory)   # room again
    now[0] += 200
    directory.scale()
    assert MODEL not in directory.snapshot()['models']     # nobody claims it: forgotten


def test_all_keys_together_claim_at_most_the_fleet_keys_quota():
    directory, _, _ = _directory(('a',), max_claims=2)
    directory.warm(MODEL, SIGNATURE, {'segments': 'ops:1'}, caller=Caller('a', 8, False))
    directory.warm(MODEL, SIGNATURE, {'segments': 'ops:2'}, caller=Caller('b', 8, False))
    with pytest.raises(WarmError) as err:
        directory.warm(MODEL, SIGNATURE, {'segments': 'ops:3'}, caller=Caller('c', 8, False))
    assert err.value.code == 'overloaded'
    directory.warm(MODEL, SIGNATURE, {'segments': 'ops:2'}, caller=Caller('c', 8, False))  # shared


def test_an_expired_spec_is_not_recorded_on_a_new_replica():
    directory, ports, now = _directory(('a', 'b'), claim_ttl_s=100.0, cooldown_s=0.0)
    old = Caller('old', max_specs=4, admin=False)
    directory.warm(MODEL, SIGNATURE, {'segments': 'ops:1'}, caller=old)
    now[0] += 90
    directory.warm(MODEL, SIGNATURE, {}, caller=Caller('new', max_specs=4, admin=False))
    holder = directory.resolve(MODEL)[0].endpoint[6]
    spare = ports['b' if holder == 'a' else 'a']
    now[0] += 20                                  # 'old' expired, 'new' still claims {}

    def dead():
        from rrto_fleet.directory import ReplicaDown
        raise ReplicaDown('gone')
    ports[holder].load = dead
    directory.poll()
    directory.scale()
    assert spare.warmed == [(MODEL, '{}')]


# ----------------------------------------------------------------------------- through the front

def _send(ctx, endpoint: str, key: ClientKeys, request_id: int, **fields) -> zmq.Socket:
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    key.apply(sock)
    sock.connect(endpoint)
    sock.send(fleet.encode(fleet.Request(v=fleet.DIRECTORY_VERSION, id=request_id, **fields)))
    return sock


def _reply(sock: zmq.Socket) -> fleet.Reply:
    assert sock.poll(60000), 'the directory did not answer'
    reply = fleet.decode_reply(sock.recv())
    sock.close(0)
    return reply


@pytest.mark.parametrize('grant, codes', [
    ({}, ['ok'] * 15 + ['overloaded'] * 5),                    # the fleet key's 16 in all
    ({'max_replays': 4}, ['ok'] * 4 + ['forbidden'] * 16)])    # her own 4
def test_a_key_cannot_evict_another_robots_replay_through_the_directory(tmp_path, zmq_ctx,
                                                                        grant, codes):
    # x03 in small: mallory (role infer) warms the victim's model 20 times with new options
    # and 64 replicas; the replicas record as the fleet key, whose quota is 16 replays
    keys, ck = client_certificates(tmp_path, {
        'robot': {'role': 'upload'},
        'fleet': {'role': 'infer'},
        'mallory': {'role': 'infer', **grant}})
    config = ServerConfig(bind='tcp://127.0.0.1:0', store=str(tmp_path / 'store'),
                          device='cpu', keys=str(keys))
    replica = Replica(config, keys=ck['fleet'])
    directory = Directory({'r0': replica})
    directory.poll()
    front = Front(directory, 'tcp://127.0.0.1:*', keys=str(keys),
                  fleet_key=str(tmp_path / 'fleet' / 'fleet.key_secret')).start()
    robot = RrtoClient(replica.endpoint, call_timeout_ms=60000, keys=ck['robot'])
    try:
        robot.hello(timeout_ms=10000)
        nodes = [exploits.node(f'y{i}', 'aten.add.Tensor', {'n': 'x' if i == 0 else f'y{i - 1}'},
                               1.0, out=('float32', (4,))) for i in range(25)]
        blob = exploits.program(nodes, ['y24'])
        digest = hashlib.sha256(blob).hexdigest()
        robot.upload({digest: ('program', blob)}, timeout_ms=60000)
        warm = _reply(_send(zmq_ctx, front.endpoint, ck['robot'], 1, kind='warm', model=digest,
                            signature=SIGNATURE))
        assert warm.kind == 'ok', warm
        got = [_reply(_send(zmq_ctx, front.endpoint, ck['mallory'], 2 + k, kind='warm',
                            model=digest, signature=SIGNATURE, replicas=64,
                            options={'segments': f'ops:{k + 1}'})).code or 'ok'
               for k in range(20)]
        assert got == codes
        assert directory.snapshot()['models'][digest]['minimum'] == 1
        assert directory.snapshot()['models'][digest]['specs'] == 1 + codes.count('ok')
        out, header = robot.infer(warm.replay, [torch.zeros(4)])
        assert header['kind'] == 'ok' and out[0].tolist() == [25.0] * 4
    finally:
        robot.close()
        front.close()
        replica.close()


def test_the_front_bounds_each_keys_warms_in_flight(tmp_path, zmq_ctx):
    keys, ck = client_certificates(tmp_path, {
        'robot': {'role': 'infer'},
        'mallory': {'role': 'infer', 'max_in_flight': 2}})
    port = FakePort('a')
    port.gate = threading.Event()
    directory = Directory({'a': port})
    directory.poll()
    front = Front(directory, 'tcp://127.0.0.1:*', keys=str(keys)).start()
    try:
        def send(k):
            return _send(zmq_ctx, front.endpoint, ck['mallory'], k, kind='warm',
                         model=chr(ord('a') + k) * 64, signature=SIGNATURE)
        socks = [send(0), send(1)]
        deadline = time.monotonic() + 30
        while port.entered < 1:                     # one is recorded, one queued (in turn)
            assert time.monotonic() < deadline
            time.sleep(0.01)
        time.sleep(0.1)
        socks += [send(2), send(3)]
        refused = [_reply(s) for s in socks[2:]]    # answered at once: the first two hold
        assert [r.code for r in refused] == ['overloaded', 'overloaded']
        other = _send(zmq_ctx, front.endpoint, ck['robot'], 9, kind='warm', model=MODEL,
                      signature=SIGNATURE)        # another key is not held by mallory's quota
        port.gate.set()
        assert [_reply(s).kind for s in socks[:2]] == ['ok', 'ok']
        other = _reply(other)
        assert other.kind == 'ok', other
        again = _reply(_send(zmq_ctx, front.endpoint, ck['mallory'], 10, kind='warm',
                             model=MODEL, signature=SIGNATURE))
        assert again.kind == 'ok'                   # answered warms free the quota
    finally:
        front.close()
