"""Deploying a strategy: sharded programs, the strategy file on the robot, /rrto/latency."""

import json

import pytest
import torch

from rrto_ros import latency
from rrto_ros.records import CallRecord, OffloadResult
from rrto_wire import program
from rrto_wire import strategy as strategy_file
from rrto_wire.weights import shard_weights, unpack_shards


def _doc(version, weights):
    return {'format': 'rrto-program', 'version': version, 'label': 'm', 'weights': weights,
            'inputs': [], 'in_spec': {'tuple': []}, 'out_spec': {'tuple': []}, 'params': {},
            'nodes': [], 'outputs': []}


def test_shards_group_tensors_by_module_and_round_trip():
    tensors = {'a.conv.weight': torch.randn(4, 3), 'a.bn.weight': torch.ones(4),
               'a.bn.bias': torch.zeros(4), 'fc.weight': torch.randn(2, 4)}
    shards = shard_weights(tensors)
    assert [prefix for prefix, _ in shards] == ['a.bn.', 'a.conv.', 'fc.']
    back = unpack_shards([(bytearray(blob), prefix) for prefix, blob in shards])
    assert set(back) == set(tensors)
    assert all(torch.equal(back[k], tensors[k]) for k in tensors)
    # a layer at another path is the same blob: stored once
    moved = shard_weights({'b.conv.weight': tensors['a.conv.weight']})
    assert moved[0][1] == dict(shards)['a.conv.']
    with pytest.raises(program.ProtocolError, match='two shards'):
        unpack_shards([(bytearray(dict(shards)['fc.']), 'fc.')] * 2)


@pytest.mark.parametrize('weights,words', [
    ('0' * 64, 'list'),
    ([{'blob': 'xyz', 'prefix': ''}], 'sha256'),
    ([{'blob': '0' * 64}], 'prefix'),
    ([{'blob': '0' * 64, 'prefix': 7}], 'prefix'),
    ([{'blob': '0' * 64, 'prefix': ''}] * (program.MAX_SHARDS + 1), 'at most'),
])
def test_version_2_programs_with_bad_shards_are_refused(weights, words):
    with pytest.raises(program.ProtocolError, match=words):
        program.Program(_doc(2, weights))


def test_version_1_programs_read_as_one_shard_and_unknown_versions_are_refused():
    assert program.Program(_doc(1, 'a' * 64)).weight_shards == [('a' * 64, '')]
    assert program.Program(_doc(1, None)).weight_shards == []
    assert program.Program(_doc(2, [{'blob': 'b' * 64, 'prefix': 'x.'}])).weight_shards == \
        [('b' * 64, 'x.')]
    with pytest.raises(program.ProtocolError, match='version 3'):
        program.Program(_doc(3, None))


def test_latency_record_names_the_variant():
    record = CallRecord(OffloadResult.OFFLOADED, 'offload')
    values = dict(latency.record_values(record, task='t', server='s', stamp='0.0',
                                        preprocess_ms=0.0, age_ms=0.0,
                                        variant='resnet18-w0.5-d1'))
    assert values['variant'] == 'resnet18-w0.5-d1'
    assert latency.parse_values(values.items())['variant'] == 'resnet18-w0.5-d1'
    assert list(latency.KEYS)[-1] == 'variant'


def test_offload_node_checks_its_strategy_parameter(tmp_path):
    offload_params = pytest.importorskip('rrto_ros.nodes.offload_params')
    good = strategy_file.Strategy(0.8, {'detect': strategy_file.TaskStrategy(
        'keypoint_net-w1-d0', 3, 'block:3', 15.0, 20.0)}).save(tmp_path / 's.json')
    assert offload_params.strategy_problem('') is None
    assert offload_params.strategy_problem(str(good)) is None
    bad = tmp_path / 'bad.json'
    bad.write_text(json.dumps({'format': 'rrto-strategy', 'version': 1, 'theta': 9}))
    assert 'theta' in offload_params.strategy_problem(str(bad))
    assert 'cannot read' in offload_params.strategy_problem(str(tmp_path / 'missing.json'))
