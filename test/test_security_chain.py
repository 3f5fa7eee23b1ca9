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
