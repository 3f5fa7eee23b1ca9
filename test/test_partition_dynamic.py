"""Graphs whose sizes depend on the data: captured whole, checked, run unrecorded by a server."""

import json

import pytest
import torch

from rrto_ros import OffloadResult
from rrto_ros.zoo import detector
from rrto_server.runner import Execution
from rrto_server.runner_fx import DynamicRunner
from rrto_wire import treespec
from rrto_wire.errors import ErrorCode, ProtocolError
from rrto_wire.program import Program
from rrto_wire.ops_dynamic import MAX_SAMPLING_RATIO, roi_align_checked
from rrto_wire.program_writer import from_exported

SHAPE = (1, 3, 128, 160)
CHANNELS = 4 * 32            # the zoo detector's feature maps (width 32)


class Blowup(torch.nn.Module):
    """A size from a bounded operator, squared: bounded by the input, but large."""

    def forward(self, mask: torch.Tensor) -> torch.Tensor:
        n = torch.nonzero(mask).shape[0]
        return torch.zeros(n * n, 1000)


def _doc(module: torch.nn.Module, *example: torch.Tensor) -> dict:
    ep = torch.export.export(module, example, strict=False)
    _, in_spec = treespec.flatten((example, {}))
    _, out_spec = treespec.flatten(ep.module()(*example))
    return json.loads(from_exported(ep, in_spec, out_spec)[0])


def _node(doc: dict, op: str) -> dict:
    return next(n for n in doc['nodes'] if n['op'] == op)


def test_second_stage_with_data_dependent_sizes_runs_on_the_server_in_one_graph(
        server, offloaded):
    # stage 2 assigns each NMS survivor to a feature level by torch.where, pools it and
    # writes it by index (torchvision's MultiScaleRoIAlign); with its nonzero inside the
    # graph, the pooled features never cross the link: the feature maps do, much smaller
    model = detector()
    x = torch.randn(*SHAPE, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        expected = model(x)
    detections = len(expected[0]['boxes'])
    assert detections > 8
    om = offloaded(model, server.endpoint, timeout_ms=30000)
    assert om.warmup(x, timeout_s=300)
    for _ in range(2):
        out = om(x)
        for key in expected[0]:
            assert torch.equal(out[0][key], expected[0][key]), key
        record = om.last
        assert record.result == OffloadResult.OFFLOADED, record.reason
        assert record.round_trips == 2 and record.remote_subgraphs == 2
        assert record.eager_subgraphs == 1
        pooled = detections * CHANNELS * 7 * 7 * 4    # the survivors' features, at least
        assert record.bytes_sent < x.numel() * 4 + pooled, record.bytes_sent
    subgraphs = om.partition.describe()['subgraphs']
    eager = [s for s in subgraphs if s['eager']]
    assert len(eager) == 1 and eager[0]['remote'] and eager[0]['flops'] > 0
    assert om.stats()['eager_subgraphs'] == 1
    # the server ran it op by op, never as a recording
    backends = {r['label']: r['backend'] for r in server.snapshot()['replays']}
    assert backends[f'Detector.subgraph{eager[0]["index"]}'] == 'eager-dynamic'
    assert sorted(backends.values()).count('eager-dynamic') == 1

    other = torch.randn(*SHAPE, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        want = model(other)
    got = om(other)
    assert all(torch.equal(got[0][k], want[0][k]) for k in want[0])


def test_a_graph_dynamo_captures_again_stays_one_subgraph(server, offloaded):
    # dynamo's GLOBAL_STATE guard holds torch's thread count (and the TF32 matmul flag, the
    # default dtype): anything in the process changing one recompiles every frame.  The
    # partition counted each graph twice (the full-suite failure of the test above: eager
    # subgraphs 3 and 7, the same FLOPs) and ran the first call after it locally
    model = detector()
    x = torch.randn(*SHAPE, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        expected = model(x)
    om = offloaded(model, server.endpoint, timeout_ms=30000)
    assert om.warmup(x, timeout_s=300)
    om(x)
    before = [(s['index'], s['eager'], s['flops']) for s in om.partition.describe()['subgraphs']]
    threads = torch.get_num_threads()
    torch.set_num_threads(threads + 1 if threads == 1 else threads - 1)
    try:
        out = om(x)
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(out[0][k], expected[0][k]) for k in expected[0])
    assert om.last.result == OffloadResult.OFFLOADED and om.last.round_trips == 2
    after = [(s['index'], s['eager'], s['flops']) for s in om.partition.describe()['subgraphs']]
    assert after == before and om.stats()['eager_subgraphs'] == 1


def test_server_checks_every_size_of_a_dynamic_program_before_it_allocates():
    mask = torch.zeros(1000, dtype=torch.bool)
    mask[:10] = True
    doc = _doc(Blowup(), mask)
    assert doc['dynamic'] and _node(doc, 'aten.nonzero.default')['out']['dims'] == [0]
    program = Program(doc)
    module = program.module({}, torch.device('cpu'))
    live = program.live_ranges([])
    runner = DynamicRunner([module], live, program.input_names, program.output_names,
                           torch.device('cpu'), 'fp32', [torch.float32], max_bytes=1 << 20,
                           max_work=1 << 40)
    assert runner.backend == 'eager-dynamic' and not runner.can_express
    ex = Execution(runner, [mask])
    ex.step()
    assert ex.outputs[0].shape == (100, 1000)
    # every element set: 1000 x 1000 x 1000 floats, refused before anything is allocated
    with pytest.raises(ProtocolError) as refused:
        Execution(runner, [torch.ones(1000, dtype=torch.bool)]).step()
    assert refused.value.code == ErrorCode.UNSAFE_PROGRAM and 'would allocate' in str(
        refused.value)


class OuterIndex(torch.nn.Module):
    """Index a matrix by the set elements of a mask in both dimensions: u x u elements."""

    def forward(self, mask: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        index = torch.nonzero(mask).squeeze(1)
        return x[index[:, None], index[None, :]]


def test_indexing_by_data_dependent_indices_is_sized_before_it_runs():
    mask = torch.zeros(1000, dtype=torch.bool)
    mask[:10] = True
    x = torch.randn(1000, 1000)
    program = Program(_doc(OuterIndex(), mask, x))
    runner = DynamicRunner([program.module({}, torch.device('cpu'))], program.live_ranges([]),
                           program.input_names, program.output_names, torch.device('cpu'),
                           'fp32', [torch.float32], max_bytes=1 << 20, max_work=1 << 40)
    ex = Execution(runner, [mask, x])
    ex.step()
    assert torch.equal(ex.outputs[0], OuterIndex()(mask, x))
    # 1000 x 1000 floats from a 1000-element mask: refused before the index runs
    with pytest.raises(ProtocolError) as refused:
        Execution(runner, [torch.ones(1000, dtype=torch.bool), x]).step()
    assert refused.value.code == ErrorCode.UNSAFE_PROGRAM and 'would allocate' in str(
        refused.value)


def test_dynamic_program_is_refused_unless_each_op_is_bounded_and_each_size_a_size():
    mask = torch.ones(100, dtype=torch.bool)
    doc = _doc(Blowup(), mask)
    Program(doc)
    # without "dynamic": a data-dependent operator is refused, as in every static program
    static = dict(doc)
    del static['dynamic']
    with pytest.raises(ProtocolError, match='nonzero'):
        Program(static)
    # an operator whose output size is not bounded by its inputs' (repeats from the data)
    unbounded = json.loads(json.dumps(doc))
    node = _node(unbounded, 'aten.nonzero.default')
    node.update(op='aten.repeat_interleave.Tensor')
    with pytest.raises(ProtocolError, match='repeat_interleave'):
        Program(unbounded)
    # masked_select broadcasts its mask: not among the data-dependent operators allowed
    select = json.loads(json.dumps(doc))
    _node(select, 'aten.nonzero.default').update(op='aten.masked_select.default',
                                                 args=[{'n': 'mask'}, {'n': 'mask'}])
    with pytest.raises(ProtocolError, match='masked_select'):
        Program(select)
    # a value turned into a size (.item()) is no operator a program may name
    item = json.loads(json.dumps(doc))
    _node(item, 'aten.sym_size.int').update(op='aten._local_scalar_dense.default',
                                            args=[{'n': 'mask'}])
    with pytest.raises(ProtocolError, match='_local_scalar_dense'):
        Program(item)
    # a tensor's values passed where a size goes: refused by the size rule
    valued = json.loads(json.dumps(doc))
    _node(valued, 'aten.zeros.default')['args'] = [[{'n': 'nonzero'}, 1000]]
    with pytest.raises(ProtocolError) as refused:
        Program(valued)
    assert refused.value.code == ErrorCode.UNSAFE_PROGRAM
    assert 'never from their values' in str(refused.value)
    # an in-place indexed write into an input is refused like any other write into one
    writes = _index_put_into_input(mask, torch.zeros(100))
    with pytest.raises(ProtocolError) as refused:
        Program(writes)
    assert refused.value.code == ErrorCode.UNSAFE_PROGRAM and 'writes into' in str(refused.value)


class MaskedWrite(torch.nn.Module):
    """Write zeros where ``mask`` is set, into a copy of ``values``."""

    def forward(self, mask: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        return torch.ops.aten.index_put_.default(
            values.clone(), [torch.nonzero(mask).squeeze(1)], torch.zeros(()))


def _index_put_into_input(*example: torch.Tensor) -> dict:
    """Export :class:`MaskedWrite`, then point its write at an input (as a peer might)."""
    doc = _doc(MaskedWrite(), *example)
    Program(doc)
    put = _node(doc, 'aten.index_put_.default')
    put['args'][0] = {'n': doc['inputs'][1]['name']}
    return doc


@pytest.mark.parametrize('sampling_ratio', [0, -1, MAX_SAMPLING_RATIO + 1])
def test_roi_align_whose_work_the_boxes_would_set_is_refused(sampling_ratio):
    # sampling_ratio <= 0 samples each bin as often as the box is large (boxes are data)
    boxes = torch.tensor([[0.0, 0.0, 0.0, 1e6, 1e6]])
    with pytest.raises(ProtocolError) as refused:
        roi_align_checked(torch.zeros(1, 1, 4, 4), boxes, 1.0, 7, 7, sampling_ratio, False)
    assert refused.value.code == ErrorCode.UNSAFE_PROGRAM
