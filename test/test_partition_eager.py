"""Recorded eager operators as chain links: each guard on the dimension that follows the data."""

import json
import logging

import pytest
import torch

from rrto_ros.partition_chain import Call, plan
from rrto_ros.partition_eager import Op, Recorder, Segment
from rrto_ros.partition_sizes import varies, varying
from rrto_wire import treespec
from rrto_wire.program import Program
from rrto_wire.program_chain import GuardFailed

aten = torch.ops.aten


@torch.library.custom_op('rrto_e7test::positive', mutates_args=())
def positive(x: torch.Tensor) -> torch.Tensor:
    """Return the positive elements (as many as the data has): an operator of no known kind."""
    return x[x > 0]


@positive.register_fake
def _positive_fake(x: torch.Tensor) -> torch.Tensor:
    return x.new_empty(torch.library.get_ctx().new_dynamic_size())


@torch.library.custom_op('rrto_e7test::rows', mutates_args=())
def rows(x: torch.Tensor) -> torch.Tensor:
    """Return the rows with a positive first column: no fake kernel, its sizes unknown."""
    return x[x[:, 0] > 0]


def _recorded(fn, *args, **kwargs) -> Op:
    """Return the one ATen operator a torch function ran, as the recorder notes it."""
    events: list = []
    with Recorder(events):
        fn(*args, **kwargs)
    (op,) = events
    return op


UNIQUE = _recorded(torch.unique, torch.zeros(2), return_inverse=True, return_counts=True).func


def _segment(func, args: tuple, inputs: list) -> tuple[Segment, torch.Tensor]:
    """Return a segment of one recorded operator taking ``inputs`` from the chain."""
    out = func(*args)
    segment = Segment()
    segment.inputs += inputs
    segment.ops.append(Op(func, args, {}, out))
    first = out if isinstance(out, torch.Tensor) else out[0]
    for k, t in enumerate([out] if isinstance(out, torch.Tensor) else out):
        segment.values[id(t)], segment.tensors[id(t)] = (0, k), t
    segment.export(first)
    return segment, out


def _served(module, *inputs: torch.Tensor) -> torch.nn.Module:
    """Return a segment's program as the server builds it (with the specs a chain gives it)."""
    data, weights = module.program('t')
    doc = json.loads(data)
    doc.update(in_spec=treespec.flatten((inputs, {}))[1],
               out_spec={'tuple': ['T'] * len(doc['outputs'])})
    return doc, Program(doc).module(weights, torch.device('cpu'))


def _mask(*bits: int) -> torch.Tensor:
    return torch.tensor(bits, dtype=torch.bool)


def test_a_mask_on_dimension_one_is_guarded_and_declared_on_dimension_one():
    # r7 #4: x[:, mask] was guarded on dimension 0 (always 4 here), so another mask passed
    # the guard and the server ran on with the traced sizes; its dimension 1 follows the mask
    x = torch.randn(4, 6, generator=torch.Generator().manual_seed(0))
    mask = _mask(1, 0, 1, 0, 1, 0)
    segment, y = _segment(aten.index.Tensor, (x, [None, mask]), [x, mask])
    assert y.shape == (4, 3)
    module = segment.module()
    assert module.tests == [(0, 1, 3)]
    with pytest.raises(GuardFailed):                          # 5 columns: the robot stops
        module(x, _mask(1, 1, 1, 1, 1, 0))
    moved = _mask(0, 1, 1, 1, 0, 0)                           # 3 columns elsewhere: it holds
    assert torch.equal(module(x, moved)[0], x[:, moved])
    doc, served = _served(module, x, mask)                    # the server's reading of it
    out = next(n['out'] for n in doc['nodes'] if n['op'] == 'aten.index.Tensor')
    assert out['dims'] == [1] and out['shape'] == [4, 0]
    with pytest.raises(GuardFailed):                          # and the server stops too
        served(x, _mask(1, 1, 1, 1, 1, 0))
    assert torch.equal(served(x, moved)[0], x[:, moved])


def _dims(func, *args) -> list[list[int]]:
    return varying(Op(func, args, {}, func(*args)))


def test_the_dimensions_that_vary_are_derived_from_each_operator():
    x = torch.randn(5, 3, 4, generator=torch.Generator().manual_seed(1))
    assert _dims(aten.index.Tensor, x, [x[:, 0, 0] > 0]) == [[0]]
    assert _dims(aten.index.Tensor, x, [None, x[0] > 0]) == [[1]]        # a 2-d mask: 2 dims
    assert _dims(aten.index.Tensor, x, [None, None, x[0, 0] > 0]) == [[2]]
    # indices split by a slice: their result comes first, whatever the mask's position
    assert _dims(aten.index.Tensor, x, [torch.tensor([1]), None, x[0, 0] > 0]) == [[0]]
    assert _dims(aten.index.Tensor, x, [None, torch.tensor([0, 2])]) == [[]]   # no mask
    assert _dims(aten.nonzero.default, x > 0) == [[0]]
    assert _dims(aten.where.default, x > 0) == [[0], [0], [0]]
    assert _dims(aten.masked_select.default, x, x > 0) == [[0]]
    assert _dims(UNIQUE, x, True, True, True) == [[0], [], [0]]
    assert _dims(UNIQUE, x, True, False, False) == [[0], [], []]
    assert _dims(aten.add.Tensor, x, 1) == [[]]
    # an operator of another namespace: its fake kernel says which; none: every dimension
    assert _dims(torch.ops.rrto_e7test.positive.default, x) == [[0]]
    assert _dims(torch.ops.rrto_e7test.rows.default, x[:, :, 0]) == [[0, 1]]


def test_torchvision_nms_varies_and_roi_align_follows_the_rois_shape():
    # r7 #11: every non-aten operator counted as varying; roi_align's size is the rois'
    torchvision = pytest.importorskip('torchvision')
    boxes = torch.tensor([[0, 0, 10, 10], [1, 1, 10, 10], [20, 20, 30, 30.]])
    scores = torch.tensor([0.9, 0.8, 0.7])
    nms = torch.ops.torchvision.nms.default
    assert varies(Op(nms, (boxes, scores, 0.5), {}, None))
    assert _dims(nms, boxes, scores, 0.5) == [[0]]
    rois = torch.cat([torch.zeros(3, 1), boxes], 1)
    roi_align = torch.ops.torchvision.roi_align.default
    args = (torch.randn(1, 2, 32, 32), rois, 1.0, 7, 7, 2, False)
    assert not varies(Op(roi_align, args, {}, None))
    assert _dims(roi_align, *args) == [[]]
    assert torchvision is not None


def test_unique_of_a_0d_tensor_guards_its_1d_outputs_and_not_its_0d_inverse():
    # r7 #5: the 0-d inverse was guarded on its dimension 0, an IndexError while planning
    x = torch.tensor(3.0)
    segment, (values, inverse, counts) = _segment(UNIQUE, (x, True, True, True),
                                                  [x])
    assert inverse.dim() == 0
    module = segment.module()
    assert module.tests == [(0, 0, 1), (1, 0, 1)]             # values and counts, not inverse
    assert [t.shape for t in module(torch.tensor(5.0))] == [(1,), (1,)]
    assert [t.shape for t in _served(module, x)[1](torch.tensor(5.0))] == [(1,), (1,)]


class _Outputs:
    """A subgraph's outputs as plan() reads them; ``ok`` raises for a subgraph it cannot read."""

    def __init__(self, fails: bool):
        self.fails = fails

    @property
    def ok(self) -> bool:
        if self.fails:
            raise RuntimeError('cannot rebuild its outputs')
        return True


class _Graph:
    """A captured graph as plan() sees it."""

    def __init__(self, index: int, fails: bool = False):
        self.index, self.remote, self.flops, self.writes = index, True, 1, False
        self.outputs = _Outputs(fails)


def test_a_chain_whose_planning_raises_is_left_out_and_the_others_stay(caplog):
    # r7 #5: an exception while one chain was planned left Partition.prepare
    x = torch.ones(4)
    h0, h1, h2, h3 = x * 2, x * 3, x * 4, x * 5
    head, other = Call(_Graph(0), 1, [x], (h0,)), Call(_Graph(2), 1, [x], (h2,))
    events = [head, Call(_Graph(1, fails=True), 1, [h0], (h1,)), other,
              Call(_Graph(3), 1, [h2], (h3,))]
    with caplog.at_level(logging.INFO, logger='rrto_ros.partition'):
        chains = plan(events)
    assert [[link.subgraph.index for link, _ in chain] for chain in chains] == [[2, 3]]
    assert 'chain0: not chained, planning it failed (RuntimeError: cannot rebuild' in caplog.text


class _Scaled(torch.nn.Module):
    """``x * c`` with a constant ``c`` the traced graph reads as an attribute."""

    def __init__(self, c: torch.Tensor):
        super().__init__()
        self.register_buffer('c', c)

    def forward(self, w: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return x * self.c + w


def test_a_graph_captured_again_is_the_same_subgraph_only_when_it_is_the_same_computation():
    # dynamo recompiles a frame when a process-wide guard fails (thread count, TF32): the
    # same graph is handed to the backend again and must not become a second subgraph; a
    # graph that differs in anything it computes with is a new one
    from rrto_ros.partition_capture import CaptureOnce

    weight = torch.ones(3)
    made = []
    once = CaptureOnce(lambda graph, example: made.append(object()) or made[-1],
                       {id(weight): weight})

    def capture(c: torch.Tensor, w: torch.Tensor, x: torch.Tensor):
        return once(torch.fx.symbolic_trace(_Scaled(c)), [w, x])

    first = capture(torch.tensor(2.0), weight, torch.zeros(3))
    assert capture(torch.tensor(2.0), weight, torch.ones(3)) is first     # other data only
    assert once.again == 1
    assert capture(torch.tensor(2.0), weight, torch.zeros(4)) is not first   # another shape
    assert capture(torch.tensor(2.0), torch.ones(3), torch.zeros(3)) is not first  # weight
    assert capture(torch.tensor(3.0), weight, torch.zeros(3)) is not first    # a constant
    assert capture(torch.tensor(-0.0), weight, torch.zeros(3)) is not capture(
        torch.tensor(0.0), weight, torch.zeros(3))                          # bit for bit
    assert len(made) == 6
