"""a15 #6 and #7: per-key task counters, and a stats reply bounded whatever its content."""

import hashlib

import exploits
import msgspec
import pytest
import torch
from rrto_testing import client_certificates

from rrto_ros.client import RrtoClient
from rrto_server import stats as server_stats
from rrto_server import taskstats
from rrto_server.stats import MAX_REPLY_BYTES, ServerStats, bounded
from rrto_server.taskstats import MAX_ENTRIES, MAX_TASKS, OVERFLOW_TASK, TaskStats
from rrto_wire.limits import MAX_HEADER_BYTES, MAX_NAME_CHARS
from rrto_wire.tensors import TensorSpec

DETECT = 'front_camera/detect'


@pytest.fixture
def keyed(make_server, tmp_path):
    """Return a CURVE server and clients: victim (upload, ceiling 10), eve (0), ops (admin)."""
    keys, certs = client_certificates(tmp_path, {
        'victim': {'role': 'upload', 'max_priority': 10},
        'eve': {'role': 'upload', 'max_priority': 0}, 'ops': {'role': 'admin'}})
    server = make_server(keys=str(keys))
    clients = {name: RrtoClient(server.endpoint, call_timeout_ms=60000, keys=cert)
               for name, cert in certs.items()}
    yield server, clients
    for client in clients.values():
        client.close()


def _replay(client) -> str:
    blob = exploits.program([exploits.node('y', 'aten.add.Tensor', {'n': 'x'}, 1.0,
                                           out=('float32', (4,)))], ['y'])
    digest = hashlib.sha256(blob).hexdigest()
    client.upload({digest: ('program', blob)})
    return client.record(digest, [TensorSpec.of(torch.zeros(4))], {})['replay']


# ------------------------------------------------------------------ 6: per-key task counters

def test_a_key_that_sends_another_keys_task_name_reads_and_writes_only_its_own_counters(keyed):
    server, clients = keyed
    victim, eve, ops = clients['victim'], clients['eve'], clients['ops']
    for _ in range(7):
        victim.infer(_replay(victim), [torch.zeros(4)], task=DETECT, priority=9)
    eve.infer(_replay(eve), [torch.zeros(4)], task=DETECT)     # the victim's name, priority 0
    mine = eve.stats()['tasks']
    assert list(mine) == [DETECT] and mine[DETECT]['requests'] == 1
    assert mine[DETECT]['completed'] == 1 and mine[DETECT]['latency_ms']['n'] == 1
    theirs = victim.stats()['tasks'][DETECT]
    assert theirs['requests'] == theirs['completed'] == theirs['latency_ms']['n'] == 7
    assert theirs['priority'] == 9                                   # not overwritten by eve
    assert 'tasks_by_key' not in eve.stats()
    admin = ops.stats()
    assert admin['tasks_by_key']['victim'][DETECT]['requests'] == 7
    assert admin['tasks_by_key']['eve'][DETECT]['priority'] == 0
    assert admin['tasks'][DETECT]['requests'] == 8 and admin['tasks'][DETECT]['priority'] == 9


def test_one_keys_junk_names_pool_into_its_own_overflow_never_another_keys_task(keyed):
    server, clients = keyed
    victim, eve = clients['victim'], clients['eve']
    for k in range(MAX_TASKS):              # the unit test below covers the cap itself
        server.tasks.arrived(f'junk{k}', 0, 'eve')
    eve.infer(_replay(eve), [torch.zeros(4)], task=OVERFLOW_TASK)
    replay = _replay(victim)
    for _ in range(5):
        victim.infer(replay, [torch.zeros(4)], task='rear_camera/segment', priority=9)
    assert victim.stats()['tasks']['rear_camera/segment']['completed'] == 5
    other = eve.stats()['tasks'][OVERFLOW_TASK]
    assert other['requests'] == other['completed'] == 1 and other['priority'] == 0
    assert len(eve.stats()['tasks']) == MAX_TASKS + 1


def test_each_key_has_its_own_cap_and_past_the_total_only_its_own_overflow():
    tasks = TaskStats(window=4)
    for k in range(MAX_TASKS + 10):
        tasks.arrived(f'junk{k}', 0, 'eve')
        tasks.ended(f'junk{k}', 'completed', 0.001, client='eve')
    tasks.arrived('rear', 9, 'victim')
    tasks.ended('rear', 'completed', 0.002, client='victim')
    assert list(tasks.snapshot('victim')) == ['rear']
    eve = tasks.snapshot('eve')
    assert len(eve) == MAX_TASKS + 1 and eve[OVERFLOW_TASK]['completed'] == 10
    for key in range(MAX_ENTRIES // MAX_TASKS):         # fill every entry the server keeps
        for k in range(MAX_TASKS):
            tasks.arrived(f't{k}', 0, f'k{key}')
    tasks.arrived('late', 3, 'victim')
    assert tasks.snapshot('victim')[OVERFLOW_TASK]['requests'] == 1
    assert tasks.snapshot('victim')['rear']['priority'] == 9
    assert OVERFLOW_TASK not in tasks.snapshot('k0') and tasks.snapshot('eve') == eve


def test_a_server_without_keys_is_one_identity_that_sees_all_its_tasks(make_server):
    server = make_server()
    client = RrtoClient(server.endpoint, call_timeout_ms=60000)
    try:
        replay = _replay(client)
        client.infer(replay, [torch.zeros(4)], task='a', priority=2)
        client.infer(replay, [torch.zeros(4)], task='b')
        stats = client.stats()
    finally:
        client.close()
    assert sorted(stats['tasks']) == ['a', 'b'] and stats['tasks']['a']['priority'] == 2
    assert stats['tasks']['b']['completed'] == 1 and 'tasks_by_key' not in stats
    assert server.snapshot()['tasks'] == server.tasks.snapshot(None) == server.tasks.totals()


# ------------------------------------------------------------------ 7: a bounded stats reply

def _size(data: dict) -> int:
    return len(msgspec.json.encode(data))


def test_long_labels_many_models_and_a_long_trace_fit_one_header_and_say_what_was_left_out():
    trace = [{'lane': 0, 'task': 't' * MAX_NAME_CHARS, 'job': i, 'start_ms': 1.0 * i,
              'end_ms': 1.0 * i + 0.5, 'util': 1.0} for i in range(20000)]
    data = {'models': {f'{i:064x}': {'uploads': 1, 'label': 'L' * (600000 if i < 20 else 200)}
                       for i in range(5000)},
            'replays': [{'replay': 'r' * 20000, 'label': 'L' * 600000, 'segment_ms': [1.0]}],
            'scheduler': {'policy': 'fifo', 'trace': trace}, 'tasks': {}}
    reply = bounded(data)
    assert _size(reply) <= MAX_REPLY_BYTES < MAX_HEADER_BYTES
    assert msgspec.json.decode(msgspec.json.encode(reply))['scheduler']['policy'] == 'fifo'
    kept = reply['scheduler']['trace']
    assert kept and kept[-1] == trace[-1] and kept == trace[-len(kept):]     # the newest
    left_out = reply['truncated']
    assert left_out['items'] == len(trace) - server_stats.MAX_ITEMS
    assert left_out['scheduler.trace'] == server_stats.MAX_ITEMS - len(kept)
    assert left_out['strings'] >= 22                    # 21 labels, one replay key
    assert all(len(m.get('label', '')) <= MAX_NAME_CHARS + 3 for m in reply['models'].values())
    assert len(reply['replays'][0]['replay']) <= server_stats.MAX_STRING_CHARS + 3


def test_a_snapshot_that_fits_is_returned_unchanged():
    data = {'models': {'a' * 64: {'uploads': 1, 'label': 'x' * MAX_NAME_CHARS}},
            'scheduler': {'trace': [{'task': 'a'}] * 10}, 'tasks': {'a': {'requests': 1}}}
    assert bounded(dict(data)) == data


def test_per_model_counters_are_capped_and_the_rest_pooled():
    counters = ServerStats()
    for i in range(server_stats.MAX_MODELS + 5):
        counters.count(f'{i:064x}', 'uploads')
    models = counters.snapshot()['models']
    assert len(models) == server_stats.MAX_MODELS + 1
    assert models[server_stats.OTHER_MODEL]['uploads'] == 5


def test_the_admins_stats_reply_decodes_with_every_key_at_its_task_cap(keyed):
    server, clients = keyed
    for key in range(MAX_ENTRIES // MAX_TASKS):
        for k in range(MAX_TASKS):
            name = f'{k:04d}' + 'n' * (MAX_NAME_CHARS - 4)
            server.tasks.arrived(name, 0, f'k{key}')
            server.tasks.ended(name, 'completed', 0.001, client=f'k{key}')
    for i in range(server_stats.MAX_MODELS + 1):
        server.stats.count(f'{i:064x}', 'uploads')
    admin = clients['ops'].stats(timeout_ms=30000)        # on main: over the header limit
    left_out = admin['truncated']            # what was kept and what was left out add up
    assert sum(left_out.values()) > 0
    for section, total in (('tasks_by_key', MAX_ENTRIES // MAX_TASKS), ('tasks', MAX_TASKS),
                           ('models', server_stats.MAX_MODELS + 1)):
        assert len(admin[section]) + left_out.get(section, 0) == total
    assert _size(admin) <= MAX_REPLY_BYTES
    eve = clients['eve'].stats(timeout_ms=30000)
    assert eve['tasks'] == {} and eve['models'] == {}      # '(other)' is for admins
    assert taskstats.ANONYMOUS not in admin['tasks_by_key']
