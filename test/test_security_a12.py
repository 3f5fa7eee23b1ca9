"""a12's findings on dynamic programs (data-dependent sizes): each test fails without its fix."""

import json

import pytest
import torch

from rrto_ros.client import RemoteError, RrtoClient
from rrto_server.runner import Execution
from rrto_server.runner_fx import DynamicRunner
from rrto_server.work_rate import WorkRate
from rrto_wire import treespec
from rrto_wire.errors import ErrorCode, ProtocolError
from rrto_wire.ops_dynamic import roi_align_checked, rois_in_range
from rrto_wire.program import Program, sha256
from rrto_wire.program_writer import from_exported
from rrto_wire.tensors import TensorSpec


def _doc(module: torch.nn.Module, *example: torch.Tensor) -> dict:
    ep = torch.export.export(module, example, strict=False)
    _, in_spec = treespec.flatten((example, {}))
    _, out_spec = treespec.flatten(ep.module()(*example))
    return json.loads(from_exported(ep, in_spec, out_spec)[0])


def _run(doc: dict, *inputs: torch.Tensor, max_bytes: int = 1 << 20,
         max_work: int = 1 << 40) -> list:
    program = Program(doc)
    runner = DynamicRunner([program.module({}, torch.device('cpu'))], program.live_ranges([]),
                           program.input_names, program.output_names, torch.device('cpu'),
                           'fp32', [torch.float32] * len(program.output_names),
                           max_bytes=max_bytes, max_work=max_work,
                           rate=WorkRate(1.0, 1.0, 1.0))     # a FLOP, an element: one unit
    return Execution(runner, list(inputs)).run()


class Outer(torch.nn.Module):
    def forward(self, mask: torch.Tensor) -> torch.Tensor:
        i = torch.nonzero(mask)
        return (i * i.t()).sum()


def test_python_operator_on_tensors_is_refused():                 # a12 #2 (x01)
    doc = _doc(Outer(), torch.zeros(1000, dtype=torch.bool))
    next(n for n in doc['nodes'] if n['name'] == 'mul')['op'] = 'operator.mul'
    with pytest.raises(ProtocolError) as err:    # 1000 x 1000 int64 = 8 MB unsized
        Program(doc)
    assert err.value.code == ErrorCode.UNSAFE_PROGRAM and 'Python operator' in str(err.value)


class Expand(torch.nn.Module):
    def forward(self, flag: torch.Tensor) -> torch.Tensor:
        return torch.nonzero(flag.expand(100, 100, 100)).sum()


def test_nonzero_of_an_expanded_view_is_sized():                  # a12 #1 (x08)
    doc = _doc(Expand(), torch.zeros(1, 1, 1, dtype=torch.bool))
    with pytest.raises(ProtocolError) as err:    # 1e6 rows x 3 x 8 B = 24 MB > 1 MiB
        _run(doc, torch.ones(1, 1, 1, dtype=torch.bool))
    assert err.value.code == ErrorCode.UNSAFE_PROGRAM
    assert _run(doc, torch.ones(1, 1, 1, dtype=torch.bool), max_bytes=32 << 20)[0] > 0


class Many(torch.nn.Module):
    def __init__(self, width: int = 200):
        super().__init__()
        self.width = width

    def forward(self, mask: torch.Tensor) -> torch.Tensor:
        n = torch.nonzero(mask).shape[0]
        held = [torch.ones(n, self.width) for _ in range(4)]   # 4 x 800 kB at n = 1000
        return sum(t.sum() for t in held)


def test_bound_is_per_execution_not_per_operator():              # a12 #3 (x02)
    doc = _doc(Many(), torch.zeros(1000, dtype=torch.bool))
    mask = torch.zeros(1000, dtype=torch.bool)
    mask[:100] = True                           # 4 x 80 kB alive: runs
    assert _run(doc, mask)[0].item() == 4 * 100 * 200
    with pytest.raises(ProtocolError) as err:    # 3.2 MB alive at once > 1 MiB
        _run(doc, torch.ones(1000, dtype=torch.bool))
    assert err.value.code == ErrorCode.UNSAFE_PROGRAM and 'held' in str(err.value)


class Chain(torch.nn.Module):
    """Tensors that die as the next is made: what is alive stays under the cap."""

    def forward(self, mask: torch.Tensor) -> torch.Tensor:
        n = torch.nonzero(mask).shape[0]
        out = torch.ones(n, 200).sum()
        for _ in range(6):
            out = out + torch.ones(n, 200).sum()
        return out


def test_values_freed_are_not_counted():                          # a12 #3
    doc = _doc(Chain(), torch.zeros(1000, dtype=torch.bool))    # 7 x 800 kB, one at a time
    assert _run(doc, torch.ones(1000, dtype=torch.bool))[0].item() == 7 * 1000 * 200


def test_dynamic_replay_is_refused_at_program_max_mb(make_server):   # a12 #3, server level
    server = make_server(program_max_bytes=24 << 20)   # the trial (n = 0) needs ~5 MiB
    client = RrtoClient(server.endpoint, call_timeout_ms=60000)
    try:
        blob = json.dumps(_doc(Many(2000), torch.zeros(1000, dtype=torch.bool))).encode()
        client.upload({sha256(blob): ('program', blob)})
        mask = torch.zeros(1000, dtype=torch.bool)
        replay = client.record(sha256(blob), [TensorSpec.of(mask)], {})['replay']
        mask[:10] = True
        assert client.infer(replay, [mask])[0][0].item() == 4 * 10 * 2000
        with pytest.raises(RemoteError) as err:      # 4 x 8 MB alive > 24 MiB (not 1 GiB)
            client.infer(replay, [torch.ones(1000, dtype=torch.bool)])
        assert err.value.code == ErrorCode.UNSAFE_PROGRAM.value
        assert client.infer(replay, [mask])[0][0].item() == 4 * 10 * 2000   # still serving
    finally:
        client.close()


class Burn(torch.nn.Module):
    def forward(self, mask: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        a = x[torch.nonzero(mask).squeeze(1)]
        out = a.sum()
        for _ in range(8):
            out = out + (a @ a.t()).sum()
        return out


def test_work_of_a_call_is_bounded():                            # a12 #4 (x03)
    x = torch.randn(1000, 64)
    doc = _doc(Burn(), torch.zeros(1000, dtype=torch.bool), x)
    small = torch.zeros(1000, dtype=torch.bool)
    small[:10] = True                           # 8 x 2 x 10 x 10 x 64 FLOPs: runs
    _run(doc, small, x, max_bytes=64 << 20, max_work=10 ** 8)
    with pytest.raises(ProtocolError) as err:    # 8 x 2 x 1000 x 1000 x 64 = 1e9 FLOPs
        _run(doc, torch.ones(1000, dtype=torch.bool), x, max_bytes=64 << 20, max_work=10 ** 8)
    assert err.value.code == ErrorCode.UNSAFE_PROGRAM and 'program-max-s' in str(err.value)


@pytest.mark.parametrize('dtype', [torch.float32, torch.float16])
def test_roi_align_gets_finite_rois_with_batch_indices_in_range(dtype):   # a12 #6 (x05)
    inf, nan = float('inf'), float('nan')
    rois = torch.tensor([[nan, 0, 0, 4, 4], [inf, 0, 0, 4, 4], [-inf, 0, 0, 4, 4],
                         [1, nan, -inf, inf, 4], [1e4, 0, 0, 4, 4]], dtype=dtype)
    fixed = rois_in_range(rois, 2, 16.0)
    assert fixed[:, 0].tolist() == [0, 0, 0, 1, 1]       # torch.clamp alone keeps the NaN
    assert torch.isfinite(fixed.float() * 16.0).all() and torch.isfinite(fixed * 16.0).all()
    assert torch.equal(fixed[:, 1:4][-1], rois[-1, 1:4])   # finite in-range values unchanged


def test_roi_align_scale_is_bounded():                                  # a12 #6
    pytest.importorskip('torchvision')
    with pytest.raises(ProtocolError):
        roi_align_checked(torch.zeros(1, 1, 4, 4), torch.zeros(1, 5), float('inf'), 2, 2, 2,
                          False)
