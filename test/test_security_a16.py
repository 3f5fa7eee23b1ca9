"""
a16: what a dynamic program makes that its budgets did not see.

#1 integer arithmetic on sizes (Python's ``operator.mul``) was free and
unbounded: ``n = nonzero(mask).shape[0]`` (0 on the trial's zeros) squared 30
times is a 2^30-bit integer.  #2 a view returned as a list (``unbind``,
``split``, ``chunk``) was free: ``x.expand(n * n).unbind(0)`` makes n^2 tensor
objects of ~600 bytes, from a 1-element input.  Each test fails without its fix.
"""

import json

import pytest
import torch

from rrto_ros.client import RemoteError, RrtoClient
from rrto_server import work_rate
from rrto_server.runner import Execution
from rrto_server.runner_fx import DynamicRunner
from rrto_wire import dtypes, ops_dynamic
from rrto_wire.errors import ErrorCode, ProtocolError
from rrto_wire.ops_cost import TENSOR_BYTES
from rrto_wire.program import Program, sha256
from rrto_wire.tensors import TensorSpec
from test_security_chain import _doc

A = torch.ops.aten
CPU = torch.device('cpu')


def _runner(doc: dict, max_bytes: int = 4 << 20) -> DynamicRunner:
    program = Program(doc)
    out_specs = program.output_specs()
    live = program.live_ranges([])
    return DynamicRunner([program.module({}, CPU, inputs=live[0][0])], live,
                         program.input_names, program.output_names, CPU, 'fp32',
                         [dtypes.torch_dtype(s.dtype) for s in out_specs],
                         out_shapes=[tuple(s.shape) for s in out_specs], max_bytes=max_bytes,
                         max_work=1 << 50, rate=work_rate.WorkRate(1e10, 1e9, 1e8))


def _mask(count: int, size: int = 256) -> torch.Tensor:
    mask = torch.zeros(size, dtype=torch.bool)
    mask[:count] = True
    return mask


class Square(torch.nn.Module):
    """n = the set elements of the mask; n * n as a size (rewritten below to more squarings)."""

    def forward(self, mask: torch.Tensor, x: torch.Tensor) -> tuple:
        n = torch.nonzero(mask).shape[0]
        return (x.expand(n * n)[0:1].sum(),)


def _node(name: str, op: str, args: list, out=None) -> dict:
    return {'name': name, 'op': op, 'args': args, 'kwargs': {}, 'out': out, 'scope': ''}


def _squared(times: int) -> dict:
    """``Square`` whose size is n squared ``times`` times, taken modulo 7 (a small size)."""
    doc = _doc(Square(), _mask(0), torch.ones(1))
    nodes = doc['nodes']
    at = next(k for k, n in enumerate(nodes) if n['op'] == 'operator.mul')
    value = nodes[at]['args'][0]['n']
    chain = []
    for k in range(times):
        chain.append(_node(f'sq{k}', 'operator.mul', [{'n': value}, {'n': value}]))
        value = f'sq{k}'
    chain.append(_node(nodes[at]['name'], 'operator.mod', [{'n': value}, 7]))
    nodes[at:at + 1] = chain
    return doc


def test_a_size_computed_from_sizes_stays_a_size():
    """a16 #1: 30 squarings of n = 2: 128 MiB of integer, +380 MiB RSS (main: answered)."""
    doc = _squared(12)                           # 2^4096 at n = 2: a 4097-bit integer
    assert Execution(_runner(doc), [_mask(1), torch.ones(1)]).run()[0] == 1   # 1 stays 1
    with pytest.raises(ProtocolError) as refused:
        Execution(_runner(doc), [_mask(2), torch.ones(1)]).run()
    assert refused.value.code == ErrorCode.UNSAFE_PROGRAM and 'bits' in str(refused.value)


LIST_VIEWS = {
    'unbind': ('aten.unbind.int', lambda v, size: [v, 0], []),
    'split': ('aten.split.Tensor', lambda v, size: [v, 1], [1]),
    'chunk': ('aten.chunk.default', lambda v, size: [v, size], [1]),
}


def _views(kind: str, lists: int = 1) -> dict:
    """``Square`` with ``lists`` lists of the views of ``x.expand(n * n + 1)``, alive at once."""
    op, args, shape = LIST_VIEWS[kind]
    doc = _doc(Square(), _mask(0), torch.ones(1))
    nodes = doc['nodes']
    expand = next(n for n in nodes if n['op'] == 'aten.expand.default')
    expand['args'][1] = [{'n': 'plus1'}]          # n * n + 1: one view on the trial's zeros
    nodes.insert(nodes.index(expand), _node('plus1', 'operator.add', [{'n': 'mul'}, 1]))
    at = next(k for k, n in enumerate(nodes) if n['op'] == 'aten.slice.Tensor')
    made = [_node(f'parts{k}', op, args({'n': expand['name']}, {'n': 'plus1'}))
            for k in range(lists)]
    picked = [_node(f'one{k}', 'operator.getitem', [{'n': f'parts{k}'}, 0],
                    {'dtype': 'float32', 'shape': shape}) for k in range(lists)]
    joined = _node(nodes[at]['name'], 'aten.stack.default',
                   [[{'n': f'one{k}'} for k in range(lists)]],
                   {'dtype': 'float32', 'shape': [lists] + shape})
    nodes[at:at + 1] = made + picked + [joined]
    return doc


@pytest.mark.parametrize('kind', sorted(LIST_VIEWS))
def test_views_returned_as_a_list_are_counted_before_they_are_made(kind):
    """a16 #2: n = 1000: 10^6 views, +650 MiB RSS under a 64 MiB budget (main: answered)."""
    doc = _views(kind)
    assert Execution(_runner(doc), [_mask(2), torch.ones(1)]).run()[0] == 1.0
    with pytest.raises(ProtocolError) as refused:   # 16,384 views: 16 MiB of 4
        Execution(_runner(doc), [_mask(128), torch.ones(1)]).run()
    assert refused.value.code == ErrorCode.UNSAFE_PROGRAM and 'allocate' in str(refused.value)
    assert 'aten.' + kind in str(refused.value)


def test_the_tensors_a_call_holds_count_against_its_bytes():
    """a16 #2 (class): 8 lists of 1,024 views alive at once, each under the cap, not together."""
    doc = _views('unbind', lists=8)
    runner = _runner(doc, max_bytes=8 * 1024 * TENSOR_BYTES - 1)
    assert Execution(runner, [_mask(2), torch.ones(1)]).run()[0] == 8.0
    with pytest.raises(ProtocolError) as refused:
        Execution(runner, [_mask(32), torch.ones(1)]).run()
    assert refused.value.code == ErrorCode.UNSAFE_PROGRAM and 'hold' in str(refused.value)


@pytest.mark.parametrize('op, args, views', [
    (A.unbind.int, (torch.ones(1).expand(10 ** 6),), 10 ** 6),
    (A.unbind.int, (torch.ones(3, 1).expand(3, 10 ** 6), -1), 10 ** 6),
    (A.split.Tensor, (torch.ones(1).expand(10 ** 6), 3), 333334),
    (A.split.sizes, (torch.ones(6), [1, 2, 3]), 3),
    (A.split_with_sizes.default, (torch.ones(6), [1, 5]), 2),
    (A.chunk.default, (torch.ones(1).expand(10 ** 6), 10 ** 9), 10 ** 6),
    (A.chunk.default, (torch.ones(1).expand(10 ** 6), 4), 4),
])
def test_a_list_of_views_is_priced_by_how_many_it_returns(op, args, views):
    """a16 #2: priced from the arguments (never by making them), at least each view it returns."""
    nbytes, _, elements = ops_dynamic.cost(op, args, {}, CPU)
    assert nbytes == views * TENSOR_BYTES and elements >= views
    assert len(op(*args)) == views


def test_a_list_of_views_from_the_data_is_refused_over_the_wire(make_server):
    """a16 #2 end to end: one unsafe_program answer, then the same replay serves again."""
    doc = _views('unbind')
    blob = json.dumps(doc).encode()
    server = make_server(program_max_bytes=8 << 20)
    client = RrtoClient(server.endpoint, call_timeout_ms=60000)
    try:
        client.upload({sha256(blob): ('program', blob)})
        specs = [TensorSpec.of(_mask(0)), TensorSpec.of(torch.ones(1))]
        replay = client.record(sha256(blob), specs, {})['replay']
        with pytest.raises(RemoteError) as refused:        # 65,536 views: 64 MiB of 8
            client.infer(replay, [_mask(256), torch.ones(1)])
        assert refused.value.code == 'unsafe_program'
        assert client.infer(replay, [_mask(3), torch.ones(1)])[0][0] == 1.0
    finally:
        client.close()
