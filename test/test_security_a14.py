"""a14: dynamic programs stay inside their budgets on every path (profile, skipped outputs,
slow kernels, naive trials)."""

import copy
import hashlib
import json

import pytest
import torch

from rrto_ros.client import RemoteError, RrtoClient
from rrto_server import work_rate
from rrto_server.runner import Execution
from rrto_server.profiling import DeviceBudget
from rrto_server.runner_fx import DynamicRunner
from rrto_testing import client_certificates
from rrto_wire import protocol as wire
from rrto_wire.errors import ErrorCode, ProtocolError
from rrto_wire.program import Program, sha256
from rrto_wire.tensors import TensorSpec
from test_security_a11 import _answer, _chain as _mm_chain, _keyed_socket, _profile_frames, \
    _put, _record
from test_security_chain import ROWS, _chain, _doc, _mask

A = torch.ops.aten


class Grow(torch.nn.Module):
    """n = the set elements of x (0 on the trial's zeros); then n x n x 64 floats."""

    def forward(self, x: torch.Tensor) -> tuple:
        n = torch.nonzero(x).shape[0]
        return (torch.ones(n, n, 64).sum(2),)


def test_a_dynamic_program_is_never_profiled_outside_its_budgets(make_server, zmq_ctx):
    """a14 #1: profile would run it unbounded on randn inputs (n = 512: 64 MiB at once)."""
    blob = json.dumps(_doc(Grow(), torch.zeros(512))).encode()
    server = make_server(program_max_bytes=16 << 20, program_max_s=0.5)
    sock = zmq_ctx.socket(__import__('zmq').DEALER)
    sock.connect(server.endpoint)
    _put(sock, 1, blob)
    sock.send_multipart(_profile_frames(2, sha256(blob), 1))
    reply = _answer(sock, 'profile')
    assert reply['kind'] == 'error' and reply['code'] == 'bad_request', reply
    assert 'dynamic' in reply['message']


def test_only_the_bounded_executors_build_a_programs_module():
    """a14 #1 (class): a new caller of ``program.module`` in the server starts unbounded."""
    import ast
    import pathlib
    import rrto_server
    callers = set()
    for path in pathlib.Path(rrto_server.__file__).parent.glob('*.py'):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and \
                    node.func.attr == 'module':
                callers.add(path.name)
    # replay: DynamicRunner for a dynamic program; sandbox: a child under rlimits;
    # profile_job: static programs only (a dynamic one is refused before it is built)
    assert callers == {'replay.py', 'sandbox.py', 'profile_job.py'}


def _declared(doc: dict, shape: list) -> dict:
    doc = copy.deepcopy(doc)
    name = doc['outputs'][-1]['n']           # link 1's output: after the guard
    out = next(n for n in doc['nodes'] if n['name'] == name)['out']
    for key in ('dims', 'sym', 'max'):      # nothing says a dimension is data-dependent
        out.pop(key, None)
    out['shape'] = shape
    return doc


@pytest.mark.parametrize('shape', [[16384, 16384], [3], [1 << 20, 1 << 20]])
def test_an_output_a_guard_can_skip_is_declared_empty(shape):
    """a14 #2: its declared shape is what a failed guard allocates: it must hold nothing."""
    with pytest.raises(ProtocolError) as refused:
        Program(_declared(_chain(), shape))
    assert refused.value.code == ErrorCode.BAD_REQUEST and 'skip' in str(refused.value)
    Program(_declared(_chain(), [0]))


def test_a_data_dependent_dimension_is_declared_zero():
    """a14 #2: ``dims`` and ``shape`` agree (a data-dependent size is written as 0)."""
    doc = _chain()
    node = next(n for n in doc['nodes'] if n['out'] and n['out'].get('dims'))
    node['out']['shape'] = [7] + list(node['out']['shape'][1:])
    with pytest.raises(ProtocolError) as refused:
        Program(doc)
    assert refused.value.code == ErrorCode.BAD_REQUEST and 'dims' in str(refused.value)


def test_a_huge_skipped_output_is_refused_at_upload_not_answered_internal(make_server):
    """a14 #2: the 4 TiB declaration is refused before any allocation, never ``internal``."""
    blob = json.dumps(_declared(_chain(), [1 << 20, 1 << 20])).encode()
    server = make_server()
    client = RrtoClient(server.endpoint, call_timeout_ms=60000)
    try:
        with pytest.raises(RemoteError) as refused:
            client.upload({sha256(blob): ('program', blob)})
            client.record(sha256(blob), [TensorSpec.of(_mask(0))], {})
        assert refused.value.code == 'bad_request'
    finally:
        client.close()


def _runner(program: Program, **budget) -> DynamicRunner:
    budget = {'max_bytes': 64 << 20, 'max_work': 1 << 50,
              'rate': work_rate.WorkRate(1e10, 1e9, 1e8), **budget}
    out_specs = program.output_specs()
    return DynamicRunner([program.module({}, torch.device('cpu'))], program.live_ranges([]),
                         program.input_names, program.output_names, torch.device('cpu'),
                         'fp32', [torch.float32] * len(out_specs),
                         out_shapes=[tuple(s.shape) for s in out_specs], **budget)


def test_skipped_outputs_are_counted_in_the_calls_bytes():
    """a14 #2 (in depth): zeros of a skipped output are the call's bytes, refused if over."""
    program = Program(_chain())
    runner = _runner(program)
    runner.out_shapes = [shape if k == 0 else (1 << 20, 1 << 20)
                         for k, shape in enumerate(runner.out_shapes)]
    with pytest.raises(ProtocolError) as refused:
        Execution(runner, [_mask(3)]).run()
    assert refused.value.code == ErrorCode.UNSAFE_PROGRAM
    rows, total = Execution(_runner(program), [_mask(3)]).run()
    assert rows.shape == (3, 1) and total.shape == (0,)
    assert Execution(_runner(program), [_mask(ROWS)]).run()[1].shape == (3,)


def _conv(x, w, groups=1, transposed=False):
    return (A.convolution.default, (x, w, None, [1, 1], [0, 0], [1, 1], transposed, [0, 0],
                                    groups), {})


def test_few_channel_convolutions_are_priced_at_the_slow_convolutions_rate():
    """a14 #4: a 1-channel or depthwise convolution is not a GEMM (8-230x slower per FLOP)."""
    rate = work_rate.WorkRate(flops_per_s=1e10, elements_per_s=1e8, conv_flops_per_s=1e8)
    x1, w1 = torch.empty(1, 1, 64, 64), torch.empty(1, 1, 31, 31)
    xd, wd = torch.empty(1, 64, 64, 64), torch.empty(64, 1, 15, 15)
    xw, ww = torch.empty(1, 64, 64, 64), torch.empty(64, 64, 3, 3)
    for fn, args, kwargs in (_conv(x1, w1), _conv(xd, wd, 64), _conv(x1, w1, transposed=True),
                             (A.conv2d.default, (xw,), {'weight': ww})):    # unseen: slow
        assert rate.work(fn, args, 10 ** 8, 0) == 10 ** 8          # 1 s at the slow rate
    fn, args, kwargs = _conv(xw, ww)
    assert rate.work(fn, args, 10 ** 10, 0) == 10 ** 8             # a wide one: at mm's
    assert rate.work(A.mm.default, (xw, xw), 10 ** 10, 5) == 10 ** 8 + 5


def test_slow_element_operators_count_more_per_element():
    """a14 #4: a fractional-p norm, a float64 cumprod, a sort run 3-7x the slowest kernel."""
    rate = work_rate.WorkRate(flops_per_s=1e10, elements_per_s=1e8, conv_flops_per_s=1e8)
    x = torch.empty(16)
    assert rate.work(A.add.Tensor, (x, x), 0, 1000) == 1000
    for fn in (A.norm.ScalarOpt_dim, A.cumprod.default, A.sort.default,
               A.linalg_vector_norm.default):
        assert rate.work(fn, (x,), 0, 1000) >= 4000, fn


def test_the_measured_rates_include_the_slow_convolutions():
    """a14 #4: the convolution rate is measured on few-channel kernels, never above mm's."""
    rate = work_rate.rate(torch.device('cpu'))
    assert {'conv_1ch', 'conv_depthwise', 'conv_transposed'} <= set(rate.kernels)
    assert rate.conv_flops_per_s <= rate.flops_per_s
    assert rate.conv_flops_per_s == max(work_rate.FLOOR, min(
        rate.kernels[k] for k in ('conv_1ch', 'conv_depthwise', 'conv_transposed')))


class Steps(torch.nn.Module):
    """Many cheap-looking steps: the time bound stops it between two of them."""

    def forward(self, mask: torch.Tensor, x: torch.Tensor) -> tuple:
        n = torch.nonzero(mask).shape[0]
        y = x[:n]
        for _ in range(40):
            y = torch.tanh(y @ x)
        return (y,)


def test_a_call_past_its_time_budget_stops_between_nodes():
    """a14 #4 (in depth): whatever the cost model says, a call stops past k x --program-max-s."""
    mask, x = torch.zeros(256, dtype=torch.bool), torch.randn(256, 256)
    program = Program(_doc(Steps(), mask, x))
    mask[:] = True
    fast = work_rate.WorkRate(1e15, 1e15, 1e15)     # priced far below their real cost
    seconds = {'rate': fast, 'max_work': fast.max_work(60.0)}
    assert Execution(_runner(program, **seconds), [mask, x]).run()[0].shape == (256, 256)
    with pytest.raises(ProtocolError) as stopped:       # 40 products of 256^2: > 4 x 0.1 ms
        Execution(_runner(program, rate=fast, max_work=fast.max_work(1e-4)), [mask, x]).run()
    assert stopped.value.code == ErrorCode.UNSAFE_PROGRAM and 'program-max-s' in str(
        stopped.value)


class Convs(torch.nn.Module):
    """x05: n rows of a 256 x 256 image, through 1-channel 31 x 31 convolutions."""

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> tuple:
        n = torch.nonzero(mask).shape[0]
        y = x.expand(n, 1, 256, 256)
        w = torch.ones(1, 1, 31, 31) / 961
        for _ in range(10):
            y = torch.nn.functional.conv2d(y, w, padding=15)
        return (y,)


def test_a_call_of_slow_convolutions_is_refused_within_its_budget(make_server):
    """a14 #4 (x05): 10 one-channel convolutions, ~3 s here, on a 0.25 s budget."""
    x, mask = torch.randn(1, 1, 256, 256), torch.zeros(16, dtype=torch.bool)
    blob = json.dumps(_doc(Convs(), x, mask)).encode()
    server = make_server(program_max_s=0.25)
    client = RrtoClient(server.endpoint, call_timeout_ms=120000)
    try:
        client.upload({sha256(blob): ('program', blob)})
        replay = client.record(sha256(blob), [TensorSpec.of(x), TensorSpec.of(mask)],
                               {})['replay']
        mask[0] = True
        with pytest.raises(RemoteError) as refused:
            client.infer(replay, [x, mask])
        assert refused.value.code == 'unsafe_program'
    finally:
        client.close()


def _op(request_id, digest):
    return wire.encode({'kind': 'op', 'id': request_id, 'model': digest, 'session': 's',
                        'op': 'aten.add.Tensor', 'args': [1.0, 1.0], 'out': 'z'})


def test_a_naive_op_pays_for_the_trial_of_the_program_it_names(tmp_path, make_server,
                                                               zmq_ctx):
    """a14 #5: naming a new program in ``op`` trials it on the key's record budget."""
    keys, ck = client_certificates(tmp_path, {'mallory': {'role': 'upload',
                                                          'max_priority': 0}})
    server = make_server(keys=str(keys), allow_naive=True)
    sandbox = server.registry.sandbox
    server.control.record_budget = DeviceBudget('record', burst_s=1e-9, rate=0.0)
    mallory = _keyed_socket(zmq_ctx, server.endpoint, ck['mallory'])
    blobs = [_mm_chain(6 + k, 128) for k in range(3)]
    for k, blob in enumerate(blobs):
        _put(mallory, 1 + k, blob)
    trials = sandbox.trials
    mallory.send_multipart(_record(10, hashlib.sha256(blobs[0]).hexdigest(), (128, 128)))
    _answer(mallory)                    # its one trial spends the budget
    assert sandbox.trials - trials == 1
    for k, blob in enumerate(blobs[1:]):
        mallory.send_multipart(_op(20 + k, hashlib.sha256(blob).hexdigest()))
        reply = _answer(mallory, 'op')
        assert reply['kind'] == 'error' and reply['code'] == 'overloaded', reply
    assert sandbox.trials - trials == 1
    mallory.send_multipart(_op(30, hashlib.sha256(blobs[0]).hexdigest()))
    assert _answer(mallory, 'op')['kind'] == 'ok'      # vetted already: no trial, no charge


def test_every_caller_says_who_pays_for_a_trial(tmp_path):
    """a14 #5: ``pay`` has no default: a caller that forgets it fails at once."""
    from rrto_server.models import ModelRegistry
    from rrto_server.sandbox import Sandbox
    with pytest.raises(TypeError):
        ModelRegistry.get(None, 'digest')
    with pytest.raises(TypeError):
        ModelRegistry.vet(None, 'digest')
    with pytest.raises(TypeError):
        Sandbox.check(None, 'digest', 'program')


def test_a_recording_out_of_memory_is_the_programs_not_internal(make_server, monkeypatch):
    """a14 #2: an allocation that fails while recording answers ``unsafe_program``."""
    from rrto_server.replay import Replay

    def out_of_memory(replay):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:127] DefaultCPUAllocator: can't "
                           'allocate memory: you tried to allocate 4398046511104 bytes')
    monkeypatch.setattr(Replay, '_warm_up', out_of_memory)
    blob = json.dumps(_chain()).encode()
    server = make_server()
    client = RrtoClient(server.endpoint, call_timeout_ms=60000)
    try:
        client.upload({sha256(blob): ('program', blob)})
        with pytest.raises(RemoteError) as refused:
            client.record(sha256(blob), [TensorSpec.of(_mask(0))], {})
        assert refused.value.code == 'unsafe_program'
    finally:
        client.close()
