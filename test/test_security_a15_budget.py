"""
a15 #2, #3, #4: a dynamic program's budgets hold whatever its operators, names and dtypes.

Views that copy, hidden workspace, value names that match the runner's
bookkeeping, and products in slow dtypes.
"""

import copy
import time

import pytest
import torch

from rrto_server import work_rate
from rrto_server.runner import Execution
from rrto_server.runner_fx import DynamicRunner
from rrto_wire import dtypes, ops_dynamic
from rrto_wire.errors import ErrorCode, ProtocolError
from rrto_wire.program import Program
from test_security_chain import _doc

A = torch.ops.aten
CPU = torch.device('cpu')
COLS = 16384


def _runner(doc: dict, precision: str = 'fp32', **budget) -> DynamicRunner:
    program = Program(doc)
    budget = {'max_bytes': 1 << 20, 'max_work': 1 << 50,
              'rate': work_rate.WorkRate(1e10, 1e9, 1e8), **budget}
    out_specs = program.output_specs()
    live = program.live_ranges([])
    return DynamicRunner([program.module({}, CPU, inputs=live[0][0])], live,
                         program.input_names, program.output_names, CPU, precision,
                         [dtypes.torch_dtype(s.dtype) for s in out_specs],
                         out_shapes=[tuple(s.shape) for s in out_specs], **budget)


def _mask(count: int, size: int = 256) -> torch.Tensor:
    mask = torch.zeros(size, dtype=torch.bool)
    mask[:count] = True
    return mask


class Copy(torch.nn.Module):
    """n = the set elements of the mask (0 on the trial); a copy of an n x COLS view of one."""

    def __init__(self, kind: str, last: bool):
        super().__init__()
        self.kind, self.last = kind, last

    def forward(self, mask: torch.Tensor) -> tuple:
        n = torch.nonzero(mask).shape[0]
        big = torch.ones(1, 1).expand(n, COLS)       # a view: no memory
        y = big.contiguous() if self.kind == 'contiguous' else big.to(torch.float64)
        return (y,) if self.last else (y[:1, :1],)


@pytest.mark.parametrize('kind', ['contiguous', 'to'])
@pytest.mark.parametrize('last', [True, False])
def test_a_copy_of_an_expanded_view_is_refused_before_it_allocates(kind, last):
    """a15 #2: n = 64 makes 4-8 MiB under a 1 MiB budget (main: answered, 0 bytes charged)."""
    doc = _doc(Copy(kind, last), _mask(0))
    small = Execution(_runner(doc), [_mask(2)]).run()[0]
    assert small.shape == ((2, COLS) if last else (1, 1))
    with pytest.raises(ProtocolError) as refused:
        Execution(_runner(doc), [_mask(64)]).run()
    assert refused.value.code == ErrorCode.UNSAFE_PROGRAM and 'allocate' in str(refused.value)


@pytest.mark.parametrize('op, args, copies', [
    (A.contiguous.default, (torch.ones(1, 1).expand(64, COLS),), True),
    (A.contiguous.default, (torch.ones(64, COLS),), False),
    (A.reshape.default, (torch.ones(64, 1).expand(64, COLS), [-1]), True),
    (A.reshape.default, (torch.ones(64, COLS), [-1]), False),
    (A.flatten.using_ints, (torch.ones(COLS, 64).t(), 0, 1), True),
    (A.to.dtype, (torch.ones(64, COLS), torch.float64), True),
    (A.to.dtype, (torch.ones(64, COLS), torch.float32), False),
    (A.expand.default, (torch.ones(1, COLS), [64, COLS]), False),
    (A.permute.default, (torch.ones(64, COLS), [1, 0]), False),
])
def test_only_what_cannot_copy_costs_nothing(op, args, copies):
    """a15 #2 (class): a view by its schema is charged whenever its call copies."""
    nbytes = ops_dynamic.cost(op, args, {}, CPU)[0]
    expected = op(*args)
    if copies:
        assert nbytes >= expected.numel() * expected.element_size()
    else:
        assert nbytes == 0


def test_attention_is_charged_its_attention_matrix():
    """a15 #2: SDPA with an expanded boolean mask materialises n x n floats (main: 32 KiB)."""
    n = 1024
    q = torch.randn(1, 1, n, 1)
    mask = torch.ones(1, 1, 1, n, dtype=torch.bool).expand(1, 1, n, n)
    nbytes = ops_dynamic.cost(A.scaled_dot_product_attention.default, (q, q, q),
                              {'attn_mask': mask}, CPU)[0]
    assert nbytes >= n * n * 4


@pytest.mark.parametrize('dtype', [torch.float16, torch.float64])
def test_a_cpu_convolution_in_a_slow_dtype_is_charged_its_columns(dtype):
    """a15 #2: im2col over the batch (16x64x64x64, 3x3: 9x the input), not the output only."""
    x = torch.ones(1, 64, 16, 16, dtype=dtype).expand(16, 64, 16, 16)
    w = torch.ones(64, 64, 3, 3, dtype=dtype)
    args = (x, w, None, [1, 1], [1, 1], [1, 1], False, [0, 0], 1)
    nbytes = ops_dynamic.cost(A.convolution.default, args, {}, CPU)[0]
    assert nbytes >= 16 * 64 * 9 * 16 * 16 * x.element_size()


class Steps(torch.nn.Module):
    """Products whose sizes follow n (0 on the trial)."""

    def forward(self, spent: torch.Tensor, mask: torch.Tensor, x: torch.Tensor) -> tuple:
        z = x[:torch.nonzero(mask).shape[0]]
        return (torch.tanh(z @ z.t()).sum() + spent.sum(),)


def _renamed(doc: dict, old: str, new: str) -> dict:
    def walk(value):
        if isinstance(value, dict):
            return {k: (new if k == 'n' and v == old else walk(v)) for k, v in value.items()}
        if isinstance(value, list):
            return [walk(v) for v in value]
        return value
    doc = walk(copy.deepcopy(doc))
    for spec in doc['inputs']:
        if spec['name'] == old:
            spec['name'] = new
    return doc


def _steps_inputs(count: int) -> list:
    return [torch.full((1,), -1e30), _mask(count, 64), torch.randn(64, 64)]


def test_the_runners_bookkeeping_is_not_among_the_values():
    """a15 #3 (class): a call's work and seconds are kept apart from the names a peer picks."""
    doc = _doc(Steps(), *_steps_inputs(0))
    runner = _runner(doc)
    ex = Execution(runner, _steps_inputs(64))
    while not ex.step():
        pass
    names = set(runner.input_names) | {n for ins, outs in runner.live for n in (*ins, *outs)}
    assert set(ex.env) <= names


@pytest.mark.parametrize('name', [' spent', ' elapsed', ' stopped', 'a b', '', 'x' * 300])
def test_a_value_name_that_is_not_identifier_like_is_refused(name):
    """a15 #3: an input named ' spent' holding -1e30 switched off the work budget and stop."""
    doc = _doc(Steps(), *_steps_inputs(0))
    doc = _renamed(doc, doc['inputs'][0]['name'], name)
    with pytest.raises(ProtocolError) as refused:
        Execution(_runner(doc, max_work=10_000), _steps_inputs(64)).run()
    assert refused.value.code == ErrorCode.UNSAFE_PROGRAM and 'name' in str(refused.value)


def _conv_args(dtype: torch.dtype, batch: int = 4) -> tuple:
    x = torch.ones(1, 64, 32, 32, dtype=dtype).expand(batch, 64, 32, 32)
    w = torch.ones(64, 64, 3, 3, dtype=dtype)
    return x, w, None, [1, 1], [1, 1], [1, 1], False, [0, 0], 1


def test_products_are_priced_at_their_dtypes_rate():
    """a15 #4: float16 products at a rate 100x below float32's cost 100x the work."""
    rate = work_rate.WorkRate(1e10, 1e9, 1e8, dtype_flops={torch.float16: 1e8})
    op = A.convolution.default
    flops = ops_dynamic.cost(op, _conv_args(torch.float32), {}, CPU)[1]
    fp32 = rate.work(op, _conv_args(torch.float32), flops, 0)
    assert rate.work(op, _conv_args(torch.float16), flops, 0) >= 99 * fp32
    assert rate.work(op, _conv_args(torch.float32), flops, 0, torch.float16) >= 99 * fp32
    for dtype in (torch.float64, torch.bfloat16):      # not measured: refused
        with pytest.raises(ProtocolError) as refused:
            rate.work(op, _conv_args(dtype), flops, 0)
        assert refused.value.code == ErrorCode.UNSAFE_PROGRAM and str(dtype) in str(refused.value)
    with pytest.raises(ProtocolError):
        rate.work(A.mm.default, (torch.ones(2, 2, dtype=torch.int64),) * 2, 16, 0)


class HalfConv(torch.nn.Module):
    """a15's x02: a float16 convolution of n images (0 on the trial)."""

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> tuple:
        y = x.expand(torch.nonzero(mask).shape[0], 64, 32, 32)
        w = torch.ones(64, 64, 3, 3, dtype=x.dtype)
        return (torch.nn.functional.conv2d(y, w, padding=1)[:1, :1, :1, :1],)


def test_a_node_priced_over_the_budget_never_runs():
    """a15 #4: at the measured rates a float16 convolution over the budget is refused at once."""
    rate = work_rate.rate(CPU)
    assert set(rate.dtype_flops) >= set(work_rate.DTYPES)
    x = torch.randn(1, 64, 32, 32).half()
    doc = _doc(HalfConv(), x, _mask(0))
    flops = ops_dynamic.cost(A.convolution.default, _conv_args(torch.float16, 64), {}, CPU)[1]
    seconds = flops / rate.dtype_flops[torch.float16]      # 64 images: 4-5 s on a 2-core VM
    runner = _runner(doc, max_bytes=1 << 30, rate=rate, max_work=rate.max_work(seconds / 4))
    started = time.perf_counter()
    with pytest.raises(ProtocolError) as refused:
        Execution(runner, [x, _mask(64)]).run()
    assert refused.value.code == ErrorCode.UNSAFE_PROGRAM and 'alone' in str(refused.value)
    assert time.perf_counter() - started < seconds / 4
    runner = _runner(doc, max_bytes=1 << 30, rate=rate, max_work=rate.max_work(seconds / 4))
    assert Execution(runner, [x, _mask(1)]).run()[0].shape == (1, 1, 1, 1)
