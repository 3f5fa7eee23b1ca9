"""Graph analysis and split execution: every plan gives the unsplit answer."""

import pytest
import torch

from rrto_ros.graph import GraphAnalysis
from rrto_ros.hybrid import PlanRuntime, in_process
from rrto_ros.local_model import TorchModule
from rrto_ros.preprocess import WithImageInput
from rrto_ros.split import Plan, as_program, band_program, robot_rows
from rrto_ros.zoo import ARCHITECTURES
from rrto_wire import treespec
from rrto_wire.program import Program

CPU = torch.device('cpu')


def _prepare(model, x):
    flat, spec = treespec.flatten(((x,), {}))
    artifact = TorchModule(model).artifact(flat, spec)
    program = Program.parse(artifact.blobs[artifact.model][1])
    weights = artifact.weights()
    analysis = GraphAnalysis(program, {k: v.shape for k, v in weights.items()})
    return program, weights, analysis, list(program.module(weights, CPU)(x))


CASES = {
    # odd sizes and stride-2 layers: rows do not divide evenly anywhere
    'resnet18-odd': (lambda: ARCHITECTURES['resnet18'](), lambda: torch.randn(1, 3, 67, 45)),
    'mobilenet-odd': (lambda: ARCHITECTURES['mobilenet'](), lambda: torch.randn(1, 3, 61, 50)),
    # multi-output head, upsampling and concatenation, uint8 NHWC camera input
    'keypoint-image': (lambda: WithImageInput(ARCHITECTURES['keypoint_net']()),
                       lambda: torch.randint(0, 256, (1, 96, 80, 3), dtype=torch.uint8)),
}


@pytest.fixture(scope='module', params=sorted(CASES))
def case(request):
    torch.manual_seed(0)
    model_fn, input_fn = CASES[request.param]
    x = input_fn()
    return (x,) + _prepare(model_fn(), x)


def _run(plan, x, program, weights, analysis):
    runtime = PlanRuntime(program, analysis, weights, plan, 'test')
    remote = None
    if runtime.server_doc is not None:
        remote = in_process(as_program(runtime.server_doc).module(weights, CPU))
    return runtime.run([x], remote)


def _assert_equal(outputs, expected):
    assert len(outputs) == len(expected)
    for out, ref in zip(outputs, expected):
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5 * float(ref.abs().max()))


def test_every_kind_of_plan_equals_unsplit_execution(case):
    x, program, weights, analysis, expected = case
    cuts = analysis.cut_candidates()
    assert cuts, 'a CNN has a local prefix'
    chosen = sorted({cuts[0], cuts[1], cuts[len(cuts) // 3], cuts[len(cuts) // 2], cuts[-1]})
    for cut in chosen:
        ratios = (0.0, 0.02, 0.37, 0.5, 1.0)
        plans = [Plan('split', cut)] + [Plan('hybrid', cut, r) for r in ratios]
        for plan in plans:
            _assert_equal(_run(plan, x, program, weights, analysis), expected)


def test_global_operators_are_never_split(case):
    _, program, _, analysis, _ = case
    kinds = {n.op.split('.')[1]: analysis.info[n.name].kind for n in program.nodes}
    for op in ('adaptive_avg_pool2d', 'adaptive_max_pool2d', 'linear', 'flatten'):
        if op in kinds:
            assert kinds[op] == 'global'
    for op in ('conv2d', 'batch_norm', 'relu', 'add'):
        if op in kinds:
            assert kinds[op] != 'global'
    last = analysis.cut_candidates()[-1]
    assert all(analysis.info[n.name].local for n in program.nodes[:last])


def test_unknown_operators_count_as_global():
    class Odd(torch.nn.Module):
        def forward(self, x):
            return torch.cumsum(torch.relu(x), dim=2) + 1  # cumsum runs down the rows

    program, _, analysis, _ = _prepare(Odd(), torch.randn(1, 2, 8, 8))
    kinds = [(n.op, analysis.info[n.name].kind) for n in program.nodes]
    assert ('aten.cumsum.default', 'global') in kinds
    assert analysis.info[program.nodes[-1].name].kind == 'global'


def test_halo_follows_kernel_stride_padding_and_dilation():
    conv = torch.nn.Conv2d(1, 1, 5, stride=2, padding=4, dilation=2)
    x = torch.randn(1, 1, 40, 9)
    program, weights, analysis, expected = _prepare(torch.nn.Sequential(conv).eval(), x)
    cut = analysis.cut_candidates()[-1]
    (value,) = analysis.crossing(cut)
    # output rows [3, 5) of a k=5, s=2, p=4, d=2 conv read input rows 3*2-4 .. 4*2-4+2*4+1
    assert analysis.required(cut, {value: (3, 5)})[program.input_names[0]] == (2, 13)
    doc, rows = band_program(analysis, cut, {value: (3, 5)}, 'band')
    assert rows == {program.input_names[0]: (2, 13)}
    (band,) = as_program(doc).module(weights, CPU)(x[:, :, 2:13])
    torch.testing.assert_close(band, expected[0][:, :, 3:5], rtol=1e-6, atol=1e-6)
    # a band at the top edge gets explicit zero padding instead of rows from above
    doc, rows = band_program(analysis, cut, {value: (0, 2)}, 'edge')
    assert rows[program.input_names[0]] == (0, 7)
    (edge,) = as_program(doc).module(weights, CPU)(x[:, :, 0:7])
    torch.testing.assert_close(edge, expected[0][:, :, 0:2], rtol=1e-6, atol=1e-6)


def test_robot_rows_round_to_whole_rows():
    assert robot_rows(7, 0.0) == 0 and robot_rows(7, 1.0) == 7
    assert robot_rows(7, 0.5) == 4 and robot_rows(56, 0.25) == 14


def test_plans_reject_bad_cuts_and_ratios(case):
    _, program, weights, analysis, _ = case
    with pytest.raises(ValueError):
        Plan('hybrid', 3, 1.5)
    with pytest.raises(ValueError):
        Plan('teleport')
    with pytest.raises(ValueError, match='cut'):
        PlanRuntime(program, analysis, weights, Plan('hybrid', len(program.nodes), 0.5))
