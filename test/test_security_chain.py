"""Chained programs from the network: the guard language is validated, a failed guard stops."""

import copy
import json

import pytest
import torch

from rrto_ros.client import RrtoClient
from rrto_ros.reply_check import decode_bound, program_outputs
from rrto_wire import treespec
from rrto_wire.errors import ErrorCode, ProtocolError
from rrto_wire.program import Program, sha256
from rrto_wire.program_chain import MAX_TERMS
from rrto_wire.program_writer import Link, chain, from_exported
from rrto_wire.tensors import TensorSpec

ROWS = 5        # the count link 1 was compiled for


class Rows(torch.nn.Module):
    """Link 0: the indices of the set elements (a data-dependent count), as floats."""

    def forward(self, mask: torch.Tensor) -> tuple:
        return (torch.nonzero(mask).float() * 2,)


class Double(torch.nn.Module):
    """Link 1: static, compiled for ROWS rows."""

    def forward(self, rows: torch.Tensor) -> tuple:
        return (rows.reshape(ROWS) @ torch.ones(ROWS, 3),)


def _doc(module: torch.nn.Module, *example: torch.Tensor) -> dict:
    ep = torch.export.export(module, example, strict=False)
    _, in_spec = treespec.flatten((example, {}))
    _, out_spec = treespec.flatten(ep.module()(*example))
    return json.loads(from_exported(ep, in_spec, out_spec)[0])


def _chain() -> dict:
    first = _doc(Rows(), torch.zeros(16, dtype=torch.bool))
    second = _doc(Double(), torch.zeros(ROWS, 1))
    links = [Link(first, {}, [('in', 0)], []),
             Link(second, {}, [('out', 0, 0)], [(0, 0, 0, 'eq', ROWS)])]
    return json.loads(chain(links, 'chain')[0])


def _mask(count: int) -> torch.Tensor:
    mask = torch.zeros(16, dtype=torch.bool)
    mask[:count] = True
    return mask


def test_a_failed_guard_stops_the_program_and_the_server_keeps_serving(make_server):
    doc = _chain()
    blob = json.dumps(doc).encode()
    server = make_server()
    client = RrtoClient(server.endpoint, call_timeout_ms=60000)
    try:
        client.upload({sha256(blob): ('program', blob)})
        # recorded although the sandbox's trial (zeros: no rows) fails the guard
        replay = client.record(sha256(blob), [TensorSpec.of(_mask(0))], {})['replay']
        leaves = program_outputs(doc)
        for count in (ROWS, 3, 0, ROWS):
            rows, total = client.infer(replay, [_mask(count)])[0]
            assert torch.equal(rows, torch.arange(count, dtype=torch.float32)[:, None] * 2)
            if count == ROWS:       # the guard held: link 1 ran
                assert torch.equal(total, Double()(rows)[0])
            else:                   # it did not: link 1's output comes back empty
                assert total.shape == (0,) and total.dtype == torch.float32
            decode_bound([TensorSpec.of(rows), TensorSpec.of(total)], leaves, 1 << 30)
    finally:
        client.close()


def test_the_guard_after_a_link_bounds_what_its_reply_may_hold():
    leaves = program_outputs(_chain())
    assert decode_bound([TensorSpec.of(torch.zeros(ROWS, 1)), TensorSpec.of(torch.zeros(3))],
                        leaves, 1 << 30) == 16 * 4 + 3 * 4
    with pytest.raises(ProtocolError) as err:     # more than link 1 can give
        decode_bound([TensorSpec.of(torch.zeros(ROWS, 1)), TensorSpec.of(torch.zeros(4))],
                     leaves, 1 << 30)
    assert err.value.code == ErrorCode.BAD_REPLY


def _guard(doc: dict) -> dict:
    return next(n for n in doc['nodes'] if n['op'] == 'rrto.guard')


@pytest.mark.parametrize('change, code', [
    (lambda g, d: g['args'][1][0].__setitem__(0, '__import__'), ErrorCode.BAD_REQUEST),
    (lambda g, d: g['args'][1][0].__setitem__(1, 5.0), ErrorCode.BAD_REQUEST),
    (lambda g, d: g['args'][1][0].__setitem__(1, True), ErrorCode.BAD_REQUEST),
    (lambda g, d: g['args'][1][0].__setitem__(1, 1 << 70), ErrorCode.BAD_REQUEST),
    (lambda g, d: g['args'][1].append(['eq', 1]), ErrorCode.BAD_REQUEST),
    (lambda g, d: g['args'].append([]), ErrorCode.BAD_REQUEST),
    (lambda g, d: g.update(args=[[{'n': 'g1_0'}] * (MAX_TERMS + 1),
                                 [['eq', 1]] * (MAX_TERMS + 1)]), ErrorCode.BAD_REQUEST),
    (lambda g, d: g['args'][0].__setitem__(0, 5), ErrorCode.BAD_REQUEST),
    # a tensor where a size goes: the guard would compare values, not sizes
    (lambda g, d: g['args'][0].__setitem__(0, {'n': 'c0_mul'}), ErrorCode.UNSAFE_PROGRAM),
    (lambda g, d: d.pop('dynamic'), ErrorCode.BAD_REQUEST),     # no guard in static programs
])
def test_a_guard_is_sizes_against_integer_constants_and_nothing_else(change, code):
    doc = _chain()
    assert any(n['name'] == 'c0_mul' for n in doc['nodes'])
    Program(copy.deepcopy(doc))                   # the well-formed chain parses
    change(_guard(doc), doc)
    with pytest.raises(ProtocolError) as err:
        Program(doc)
    assert err.value.code == code, err.value


class _Graph:
    """A captured graph as plan() sees it: remote or not, its outputs rebuildable."""

    def __init__(self, index: int, remote: bool):
        self.index, self.remote, self.flops, self.writes = index, remote or None, 1, False
        self.outputs = type('Outputs', (), {'ok': True})()


def test_recorded_operators_never_write_into_what_a_remote_graph_reads_or_returns():
    # a segment of the eager operators between graphs runs on the server inside the chain;
    # a write there into the head's output (or a remote link's input once it ran) would
    # change what the server returns for it: such an operator is left out, and what reads
    # its result is left out too; a write into a tensor the operators made is kept
    from rrto_ros.partition_chain import Call, plan
    from rrto_ros.partition_eager import Op

    aten = torch.ops.aten
    with torch.inference_mode():
        x = torch.ones(4)
        h = x * 2                                   # the head's output
        head = Call(_Graph(0, True), 1, [x], (h,))

        def chained(events):
            chains = plan([head] + events)
            return [[type(link).__name__ for link, _ in c] for c in chains]

        made = torch.zeros(4)
        events = [Op(aten.zeros.default, ([4],), {}, made),
                  Op(aten.add_.Tensor, (made, h), {}, made)]
        y = made * 3
        events.append(Op(aten.mul.Tensor, (made, 3), {}, y))
        z = y + 1
        assert chained(events + [Call(_Graph(1, True), 1, [y], (z,))]) == [
            ['Call', 'EagerModule', 'Call']]
        bad = [Op(aten.add_.Tensor, (h, 1), {}, h)]
        w = h * 3
        bad.append(Op(aten.mul.Tensor, (h, 3), {}, w))
        assert chained(bad + [Call(_Graph(1, True), 1, [w], (w + 1,))]) == []
        assert chained(bad + [Call(_Graph(1, True), 1, [h], (h + 1,))]) == []


def test_a_guess_is_claimed_only_on_inputs_equal_to_those_the_server_used():
    # a remote graph after recorded operators: the robot's input is its own eager result,
    # another tensor object; it takes the server's outputs only if the values are equal
    from rrto_ros.partition_chain import Guess, Speculation

    link = _Graph(1, True)
    with torch.inference_mode():
        served = torch.arange(6.0)
        for robot, claimed in ((torch.arange(6.0), True), (torch.arange(6.0) + 1, False),
                               (torch.arange(5.0), False), (torch.arange(6), False)):
            guess = Guess(link, [served], (served * 2,), None, [served.clone()])
            speculation = Speculation([guess], {id(link)}, {id(served)})
            assert (speculation.claim(link, [robot]) is guess) == claimed
            if not claimed:     # a miss ends the guess: the graph runs as usual
                assert speculation.claim(link, [served.clone()]) is None


@pytest.mark.parametrize('served, robot, claimed', [
    # r7 #1: the server's segment made +0.0 where the robot's eager code made -0.0;
    # atan2(0, -0.0) is pi, so the guess (computed from +0.0) is not the robot's answer
    (torch.zeros(6), -torch.zeros(6), False),
    (torch.zeros(6), torch.zeros(6), True),
    # the same bytes compute the same, NaN included (torch.equal has nan != nan)
    (torch.tensor([float('nan'), 1.0]), torch.tensor([float('nan'), 1.0]), True),
])
def test_a_guess_after_a_segment_is_claimed_only_on_the_same_bytes(served, robot, claimed):
    from rrto_ros.partition_chain import Guess, Speculation

    link = _Graph(1, True)
    with torch.inference_mode():
        served, robot = served.clone(), robot.clone()
        guess = Guess(link, [served], (torch.atan2(torch.zeros_like(served), served),), None,
                      [served.clone()])
        speculation = Speculation([guess], {id(link)}, {id(served)})
        assert (speculation.claim(link, [robot]) is guess) == claimed


def test_unique_in_a_dynamic_program_is_sized_at_its_most_before_it_runs():
    from rrto_wire import ops_dynamic

    fn = ops_dynamic.resolve('aten._unique2.default')
    n = 1000
    nbytes, flops, work = ops_dynamic.cost(fn, (torch.zeros(n),), {}, torch.device('cpu'))
    assert nbytes == 3 * n * 8 and flops == 0 and work >= n
    assert ops_dynamic.varies(fn)
