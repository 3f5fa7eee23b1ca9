"""Fleet mode without Ray: replicas in this process, the directory, its front and the resolver."""

import json
import subprocess
import sys
import threading
import time

import msgspec
import pytest
import torch
import zmq

from rrto_fleet.directory import Directory, Policy, WarmError
from rrto_fleet.front import Front
from rrto_fleet.replica import Replica
from rrto_ros import OffloadResult
from rrto_server.server import ServerConfig
from rrto_testing import REPO, assert_same_as_local, child_env, client_certificates, raw_socket
from rrto_wire import fleet as fleet_wire

TIMEOUT_MS = 2000


def tiny_net() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4))


class LocalFleet:
    """Replicas sharing one store, a directory and its front, all in this process."""

    def __init__(self, store, replicas: int, policy: Policy | None = None, poll_s: float = 0.2,
                 extra_ports: dict | None = None, **server_options):
        config = ServerConfig(bind='tcp://127.0.0.1:0', store=str(store), device='cpu',
                              **server_options)
        self.replicas = [Replica(config) for _ in range(replicas)]
        ports = {f'r{i}': r for i, r in enumerate(self.replicas)}
        ports.update(extra_ports or {})
        self.directory = Directory(ports, policy)
        self.directory.poll()
        self.front = Front(self.directory, 'tcp://127.0.0.1:0', poll_s).start()
        self.endpoint = self.front.endpoint

    def holders(self, model: str) -> list[str]:
        return self.directory.snapshot()['models'].get(model, {}).get('holders', [])

    def infers(self, replica: Replica) -> int:
        return sum(replica.load()['infers'].values())

    def close(self) -> None:
        self.front.close()
        for replica in self.replicas:
            replica.close()


@pytest.fixture
def local_fleet(tmp_path):
    fleets = []

    def make(replicas: int = 2, **options) -> LocalFleet:
        fleets.append(LocalFleet(tmp_path / 'store', replicas, **options))
        return fleets[-1]

    yield make
    for f in fleets:
        f.close()


def _only_model(fleet: LocalFleet) -> str:
    (model,) = fleet.directory.snapshot()['models']
    return model


def _run_until(om, x, result, limit: int = 200) -> int:
    for n in range(limit):
        om(x)
        if om.last.result == result:
            return n
        time.sleep(0.01)
    pytest.fail(f'no {result} call in {limit}: {om.last.reason}')


def test_offload_through_directory_equals_local_one_round_trip(local_fleet, offloaded):
    fleet = local_fleet(2)
    model, x = tiny_net(), torch.randn(1, 16)
    om = offloaded(model, '', timeout_ms=TIMEOUT_MS, directory=fleet.endpoint)
    assert om.warmup(x)
    # warmed on one replica, ahead of the first call
    assert len(fleet.holders(_only_model(fleet))) == 1
    before = om.stats()['infer_round_trips']
    for _ in range(5):
        out = om(x)
        assert om.last.result == OffloadResult.OFFLOADED, om.last.reason
        assert_same_as_local(out, model(x))
    assert om.stats()['infer_round_trips'] - before == 5
    # all on the holder, none elsewhere; a replica counts an express request once its reply
    # is out, so the count can trail the fifth reply by a moment
    deadline = time.monotonic() + 10
    while sorted(served := [fleet.infers(r) for r in fleet.replicas]) != [0, 5] \
            and time.monotonic() < deadline:
        time.sleep(0.01)
    assert sorted(served) == [0, 5]


def test_directory_refuses_malformed_requests_and_keeps_serving(local_fleet, zmq_ctx):
    fleet = local_fleet(1)
    sock = raw_socket(zmq_ctx, fleet.endpoint)
    bad = [b'not json', json.dumps({'v': 2, 'kind': 'hello', 'id': 1}).encode(),
           json.dumps({'v': 1, 'kind': 'hello', 'id': 1, 'extra': 1}).encode(),
           json.dumps({'v': 1, 'kind': 'resolve', 'id': 1, 'model': 'x' * 64}).encode(),
           json.dumps({'v': 1, 'kind': 'warm', 'id': 1}).encode(),
           json.dumps({'v': 1, 'kind': 'warm', 'id': 1, 'model': 'a' * 64,
                       'replicas': 10 ** 6}).encode()]
    codes = []
    for frame in bad:
        sock.send(frame)
        assert sock.poll(5000), frame
        codes.append(msgspec.json.decode(sock.recv())['code'])
    assert codes == ['bad_request', 'version_mismatch', 'bad_request', 'bad_request',
                     'bad_request', 'bad_request']
    sock.send(fleet_wire.encode(fleet_wire.Request(1, 'resolve', 7)))
    assert sock.poll(5000)
    reply = fleet_wire.decode_reply(sock.recv())
    assert reply.kind == 'ok' and [h.endpoint for h in reply.endpoints] == [
        fleet.replicas[0].endpoint]


def test_warm_of_a_model_missing_from_the_store_is_an_error(local_fleet):
    fleet = local_fleet(1)
    with pytest.raises(WarmError) as info:
        fleet.directory.warm('b' * 64, [{'dtype': 'float32', 'shape': [1, 16]}], {})
    assert info.value.code == 'unknown_model'
    assert fleet.directory.resolve('b' * 64) == []


def test_replica_death_reroutes_every_call_offloaded_or_local(local_fleet, offloaded):
    fleet = local_fleet(2)
    model, x = tiny_net(), torch.randn(1, 16)
    expected = model(x)
    hedged = offloaded(model, '', timeout_ms=500, directory=fleet.endpoint, duplicate=True)
    assert hedged.warmup(x)                   # a duplicating robot: warm on both replicas
    om = offloaded(model, '', timeout_ms=500, connect_timeout_ms=200, directory=fleet.endpoint)
    assert om.warmup(x)
    model_digest = _only_model(fleet)
    assert len(fleet.holders(model_digest)) == 2
    _run_until(om, x, OffloadResult.OFFLOADED)
    preferred = om.data.resolver.endpoints(model_digest)[0]
    victim = next(r for r in fleet.replicas if r.endpoint == preferred)
    killer = threading.Timer(0.05, victim.close)
    killer.start()
    results = []
    deadline = time.monotonic() + 3.0
    while time.monotonic() < deadline:
        out = om(x)
        results.append(om.last.result)
        assert_same_as_local(out, expected)
    killer.join()
    assert set(results) <= {OffloadResult.OFFLOADED, OffloadResult.LOCAL_FALLBACK}
    assert results[-1] == OffloadResult.OFFLOADED   # rerouted to the survivor
    assert fleet.holders(model_digest) == [r.endpoint for r in fleet.replicas if r is not victim]


def test_a_robot_without_a_live_replica_waits_instead_of_retrying(local_fleet, offloaded):
    fleet = local_fleet(1)
    model, x = tiny_net(), torch.randn(1, 16)
    om = offloaded(model, '', timeout_ms=300, connect_timeout_ms=200, directory=fleet.endpoint)
    assert om.warmup(x)
    fleet.replicas[0].close()
    om(x)
    assert om.last.result == OffloadResult.LOCAL_FALLBACK
    started = time.monotonic()
    assert not om.data.wait_available(0.5)      # the directory answers, no replica does
    assert time.monotonic() - started >= 0.45


def test_duplicate_requests_beat_a_stalled_replica(tmp_path, offloaded, zmq_ctx):
    stalled = zmq_ctx.socket(zmq.ROUTER)    # accepts requests, never answers
    stalled.bind('tcp://127.0.0.1:*')
    stalled_endpoint = stalled.getsockopt_string(zmq.LAST_ENDPOINT)
    live: list[Replica] = []

    class StalledPort:
        """Records on the live replica (same store), is listed at the silent socket."""

        keys: list[str] = []

        def warm(self, model, signature, options):
            reply = live[0].warm(model, signature, options)
            self.keys.append(reply['replay'])
            return reply

        def load(self):
            return {'instance': 'stalled', 'endpoint': stalled_endpoint, 'infers': {},
                    'replays': self.keys}

    fleet = LocalFleet(tmp_path / 'store', 1, extra_ports={'stalled': StalledPort()})
    live.append(fleet.replicas[0])
    try:
        fleet.directory.poll()
        model, x = tiny_net(), torch.randn(1, 16)
        robots = [offloaded(model, '', timeout_ms=300, directory=fleet.endpoint, duplicate=dup)
                  for dup in (True, False, False, False, False, False)]
        for om in robots:
            # an attempt routed to the stalled replica ends unready (warmup says so at once);
            # preparation resumes on a live replica, so a second wait finds it ready
            assert om.warmup(x) or om.warmup(x)
        model_digest = _only_model(fleet)
        assert len(fleet.holders(model_digest)) == 2
        hedged = [(robots[0](x), robots[0].last.result)[1] for _ in range(10)]
        assert hedged == [OffloadResult.OFFLOADED] * 10
        for om in robots[1:]:   # a robot that prefers the stalled replica waits, then runs locally
            stuck = om.data.resolver.endpoints(model_digest)[0] == stalled_endpoint
            om(x)
            assert om.last.result == (OffloadResult.LOCAL_FALLBACK if stuck
                                      else OffloadResult.OFFLOADED), om.last.reason
    finally:
        fleet.close()
        stalled.close(linger=0)


def test_lru_eviction_on_a_replica_is_followed_by_the_directory(local_fleet):
    fleet = local_fleet(1, max_replays=1)
    store = fleet.replicas[0].server.store
    from rrto_ros.local_model import TorchModule
    from rrto_wire import treespec
    digests = []
    for width in (8, 12):
        net = torch.nn.Linear(width, 2)
        flat, spec = treespec.flatten(((torch.randn(1, width),), {}))
        artifact = TorchModule(net).artifact(flat, spec)
        for digest, (kind, data) in artifact.blobs.items():
            store.put(digest, kind, bytes(data))
        digests.append(artifact.model)
        fleet.directory.warm(artifact.model, [s.to_json() for s in artifact.signature], {})
    fleet.directory.poll()
    assert fleet.directory.resolve(digests[0]) == []     # evicted to make room
    assert len(fleet.directory.resolve(digests[1])) == 1


class FakePort:
    """A replica whose served inference count the test sets."""

    def __init__(self, name):
        self.name, self.infers, self.warmed = name, 0, []

    def warm(self, model, signature, options):
        self.warmed.append(model)
        return {'replay': f'{model}|x'}

    def load(self):
        return {'instance': self.name, 'endpoint': f'tcp://{self.name}:1',
                'infers': {'m' * 64: self.infers}, 'replays': [f'{"m" * 64}|x']}


def test_model_stays_under_steady_load_and_spreads_under_a_burst():
    now = [0.0]
    ports = {n: FakePort(n) for n in ('a', 'b', 'c')}
    directory = Directory(ports, Policy(scale_up=100, scale_down=30, cooldown_s=2),
                          clock=lambda: now[0])
    model = 'm' * 64
    directory.poll()
    holders, replay = directory.warm(model, [], {})
    assert [h.endpoint for h in holders] == ['tcp://a:1'] and replay == f'{model}|x'

    def run(seconds: float, rate: float) -> list[str]:
        for _ in range(int(seconds * 2)):
            now[0] += 0.5
            holders = directory.resolve(model)
            for h in holders:
                ports[h.endpoint[6]].infers += int(rate * 0.5 / len(holders))
            directory.poll()
            directory.scale()
        return [h.endpoint for h in directory.resolve(model)]

    assert run(10, 60) == ['tcp://a:1']                          # steady: stays put
    assert len(run(10, 450)) == 3                                # burst: spreads
    assert run(20, 20) == [directory.resolve(model)[0].endpoint]  # calm again: back to one


def test_a_failed_replacement_is_retried_after_the_cooldown_not_every_poll():
    from rrto_fleet.directory import ReplicaDown
    now = [0.0]
    ports = {n: FakePort(n) for n in ('a', 'b')}
    directory = Directory(ports, Policy(cooldown_s=2), clock=lambda: now[0])
    directory.poll()
    model = 'm' * 64
    directory.warm(model, [], {})
    holder = directory.resolve(model)[0].endpoint[6]
    spare = ports['b' if holder == 'a' else 'a']

    def dead():
        raise ReplicaDown('gone')

    def refuses(*args):
        spare.warmed.append('refused')
        raise WarmError('record_failed', 'out of memory')

    ports[holder].load, spare.warm = dead, refuses
    for _ in range(10):          # 1 s of polls: one attempt
        now[0] += 0.1
        directory.poll()
        directory.scale()
    assert spare.warmed.count('refused') == 1
    now[0] += 2.0
    directory.poll()
    directory.scale()
    assert spare.warmed.count('refused') == 2 and directory.resolve(model) == []


def test_offload_node_with_a_directory_offloads_through_the_fleet(local_fleet, domain_id):
    import rclpy
    from rclpy.parameter import Parameter
    from rclpy.signals import SignalHandlerOptions
    from rrto_ros.nodes import spin
    from rrto_ros.nodes.offload_node import OffloadNode
    fleet = local_fleet(1)
    context = rclpy.Context()
    rclpy.init(context=context, domain_id=domain_id,
               signal_handler_options=SignalHandlerOptions.NO)
    overrides = {'directory': fleet.endpoint, 'server': 'tcp://127.0.0.1:9',  # nobody there
                 'model': 'python:rrto_ros.zoo:keypoint_net', 'resize_height': 64,
                 'resize_width': 64, 'timeout_ms': float(TIMEOUT_MS)}
    node = OffloadNode(context=context, parameter_overrides=[
        Parameter(k, value=v) for k, v in overrides.items()])
    try:
        assert spin.start(node) == ''    # configure and activate, as its process would
        frame = torch.zeros(1, 64, 64, 3, dtype=torch.uint8)
        assert node.engine.warmup(frame, timeout_s=120)
        node.engine(frame)
        assert node.engine.last.result == OffloadResult.OFFLOADED, node.engine.last.reason
        assert len(fleet.holders(_only_model(fleet))) == 1
    finally:
        node.destroy_node()
        context.try_shutdown()


def test_keys_carry_over_to_the_directory_and_every_replica(tmp_path, offloaded):
    keys, client_keys = client_certificates(tmp_path, {'robot': {'role': 'upload'},
                                                       'fleet': {'role': 'infer'}})
    config = ServerConfig(bind='tcp://127.0.0.1:0', store=str(tmp_path / 'store'), device='cpu',
                          keys=str(keys))
    fleet_keys = client_keys['fleet']
    replicas = [Replica(config, keys=fleet_keys) for _ in range(2)]
    directory = Directory({f'r{i}': r for i, r in enumerate(replicas)})
    directory.poll()
    front = Front(directory, 'tcp://127.0.0.1:*', keys=str(keys)).start()
    try:
        model, x = tiny_net(), torch.randn(1, 16)
        om = offloaded(model, '', timeout_ms=TIMEOUT_MS, directory=front.endpoint,
                       duplicate=True, server_key=str(keys / 'server.key'),
                       client_key=str(tmp_path / 'robot' / 'robot.key_secret'))
        assert om.warmup(x, timeout_s=120)
        out = om(x)
        assert om.last.result == OffloadResult.OFFLOADED, om.last.reason
        assert_same_as_local(out, model(x))
        stranger = offloaded(model, '', timeout_ms=300, connect_timeout_ms=300,
                             directory=front.endpoint)
        assert not stranger.warmup(x, timeout_s=3)     # no key: the directory does not answer
        stranger(x)
        assert stranger.last.result != OffloadResult.OFFLOADED
    finally:
        front.close()
        for replica in replicas:
            replica.close()


def test_single_server_and_robot_runtime_never_import_ray():
    code = ('import sys, rrto_server.__main__, rrto_server.server, rrto_ros.resolver, '
            'rrto_ros.engine, rrto_fleet.directory, rrto_fleet.front; '
            'assert "ray" not in sys.modules, "ray imported"')
    subprocess.run([sys.executable, '-c', code], env=child_env(), cwd=REPO, check=True,
                   timeout=120)
    robot = ('import sys, rrto_ros, rrto_ros.resolver; '
             'bad = [m for m in sys.modules if m.split(".")[0] in ("ray", "rrto_server", '
             '"rrto_fleet")]; assert not bad, bad')
    subprocess.run([sys.executable, '-c', robot], env=child_env(), cwd=REPO, check=True,
                   timeout=120)
