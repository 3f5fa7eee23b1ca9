"""
a13's findings on dynamic programs, their work model and peer strings: each fails without its fix.

#3 a dynamic program ran inline on the I/O thread (its cost follows the data, its inline
admission came from cheap calls); #4 a reduction was charged by its output (``sum`` of an
``expand()``ed view: n^3 additions for 1); #5 the work budget used a constant rate; #6
``segments: 'ops:²'`` was answered ``internal``; S1 a fleet front without keys served every
robot's warms as one key's (FIFO).
"""

import json
import time

import pytest
import torch

from rrto_ros.client import RemoteError, RrtoClient
from rrto_server import work_rate
from rrto_server.runner import Execution
from rrto_server.runner_fx import DynamicRunner
from rrto_server.segments import parse_granularity
from rrto_testing import SlowPort, raw_socket, receive, reply_header, wait_running
from rrto_wire import codecs, treespec
from rrto_wire import protocol as wire
from rrto_wire.errors import ErrorCode, ProtocolError
from rrto_wire.ops_dynamic import cost
from rrto_wire.program import Program, sha256
from rrto_wire.program_writer import from_exported
from rrto_wire.tensors import TensorSpec


def _doc(module: torch.nn.Module, *example: torch.Tensor) -> dict:
    ep = torch.export.export(module, example, strict=False)
    _, in_spec = treespec.flatten((example, {}))
    _, out_spec = treespec.flatten(ep.module()(*example))
    return json.loads(from_exported(ep, in_spec, out_spec)[0])


def _run(doc: dict, *inputs: torch.Tensor, max_work: int) -> list:
    program = Program(doc)
    runner = DynamicRunner([program.module({}, torch.device('cpu'))], program.live_ranges([]),
                           program.input_names, program.output_names, torch.device('cpu'),
                           'fp32', [torch.float32] * len(program.output_names),
                           max_bytes=64 << 20, max_work=max_work)
    return Execution(runner, list(inputs)).run()


def _recorded(client: RrtoClient, doc: dict, *example: torch.Tensor) -> str:
    blob = json.dumps(doc).encode()
    client.upload({sha256(blob): ('program', blob)})
    return client.record(sha256(blob), [TensorSpec.of(t) for t in example], {})['replay']


# ----------------------------------------------------------------------------- 3: inline

class Products(torch.nn.Module):
    """a13's x03: the rows a mask selects, multiplied ``rounds`` times (n^2 x 256 each)."""

    def __init__(self, rounds: int):
        super().__init__()
        self.rounds = rounds

    def forward(self, mask: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        a = x[torch.nonzero(mask).squeeze(1)]
        out = a.sum()
        for _ in range(self.rounds):
            out = out + (a @ a.t()).sum()
        return out


def test_a_dynamic_program_is_never_served_on_the_io_thread(make_server, zmq_ctx):
    """a13 #3: its cost follows the data; cheap calls made it look short (1 call: 31 s deaf)."""
    server = make_server(inline_max_ms=1000.0)     # any fixed-cost replay this short: inline
    inline = []
    run_inline = server.scheduler.run_inline

    def spy(job, *args):
        ran = run_inline(job, *args)
        inline.append((job.replay.backend, ran))
        return ran
    server.scheduler.run_inline = spy
    mask, x = torch.zeros(2048, dtype=torch.bool), torch.randn(2048, 256)
    client = RrtoClient(server.endpoint, call_timeout_ms=120000)
    sock, hello = raw_socket(zmq_ctx, server.endpoint), raw_socket(zmq_ctx, server.endpoint)
    try:
        replay = _recorded(client, _doc(Products(4), mask, x), mask, x)
        for request_id in range(4):                  # cheap calls: no row selected
            sock.send_multipart(_infer(request_id, replay, mask, x))
            assert receive(sock)[0]['kind'] == 'ok'
        assert not [backend for backend, ran in inline if ran and backend == 'eager-dynamic']
        sock.send_multipart(_infer(9, replay, torch.ones(2048, dtype=torch.bool), x,
                                   task='heavy'))     # 4 x 2.1 GFLOP: seconds on a loaded VM
        wait_running(server, 'heavy', timeout=120)
        hello.send_multipart(_hello(10))
        assert hello.poll(120000)
        assert reply_header(hello.recv_multipart()[0], 'hello')['kind'] == 'ok'
        assert not sock.poll(0), 'the I/O thread answered hello only after the dynamic call'
        assert receive(sock, 120000)[0]['kind'] == 'ok'
    finally:
        client.close()


def _infer(request_id: int, replay: str, *tensors: torch.Tensor, **fields) -> list:
    return wire.encode({'kind': 'infer', 'id': request_id, 'replay': replay, **fields},
                       list(tensors))


def _hello(request_id: int) -> list:
    return wire.encode({'kind': 'hello', 'id': request_id})


# ----------------------------------------------------------------------------- 4: reads

class Spin(torch.nn.Module):
    """a13's x04: ``reduce(x.expand(n, n, n))`` reads n^3 elements and writes one."""

    def __init__(self, reduce):
        super().__init__()
        self.reduce = reduce

    def forward(self, mask: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        n = torch.nonzero(mask).shape[0]
        return self.reduce(x.reshape(1, 1, 1).expand(n, n, n)).float().sum()


@pytest.mark.parametrize('reduce', [
    torch.sum, torch.amax, torch.prod, torch.any, torch.all, torch.max, (lambda t: t.var(2)),
    (lambda t: t.mean(1)), (lambda t: torch.amin(t, (0, 1))), (lambda t: t.topk(1, 2).values)],
    ids=['sum', 'amax', 'prod', 'any', 'all', 'max', 'var', 'mean', 'amin', 'topk'])
def test_a_reduction_is_charged_for_what_it_reads(reduce):
    """a13 #4: sum of an expand()ed [2048]^3 view was charged ~1 and ran 18.8 s at 1 s."""
    x = torch.ones(1)
    doc = _doc(Spin(reduce), torch.ones(500, dtype=torch.bool), x)
    small = torch.zeros(500, dtype=torch.bool)
    small[:10] = True                               # 1e3 elements read: runs
    _run(doc, small, x, max_work=10 ** 7)
    with pytest.raises(ProtocolError) as err:       # 1.25e8 elements read > 1e7
        _run(doc, torch.ones(500, dtype=torch.bool), x, max_work=10 ** 7)
    assert err.value.code == ErrorCode.UNSAFE_PROGRAM and 'program-max-s' in str(err.value)


class Pool(torch.nn.Module):
    """A 64 x 64 window over rows the data sizes: each output element reads 4096."""

    def forward(self, mask: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        n = torch.nonzero(mask).shape[0] + 64        # at least the window
        y = x.reshape(1, 1, 1, 1).expand(1, 1, n, n)
        return torch.nn.functional.max_pool2d(y, 64, 1).sum()


def test_a_window_is_charged_for_every_element_it_reads():
    """a13 #4's class: a pooling window reads kernel-size elements per output element."""
    x = torch.ones(1)
    doc = _doc(Pool(), torch.ones(200, dtype=torch.bool), x)
    small = torch.zeros(200, dtype=torch.bool)
    small[:10] = True
    _run(doc, small, x, max_work=10 ** 7)          # 11^2 outputs x 4096: 5e5, runs
    with pytest.raises(ProtocolError) as err:       # 201^2 outputs x 4096 = 1.7e8 > 1e7
        _run(doc, torch.ones(200, dtype=torch.bool), x, max_work=10 ** 7)
    assert err.value.code == ErrorCode.UNSAFE_PROGRAM and 'program-max-s' in str(err.value)


@pytest.mark.parametrize('op, args, taps', [
    (torch.ops.aten.upsample_bilinear2d.vec, (torch.ones(1, 3, 8, 8), [16, 16], False, None), 4),
    (torch.ops.aten.upsample_bicubic2d.vec, (torch.ones(1, 3, 8, 8), [16, 16], False, None), 16),
    (torch.ops.aten.grid_sampler_2d.default,
     (torch.ones(1, 3, 8, 8), torch.zeros(1, 16, 16, 2), 2, 0, False), 16)])
def test_a_resampling_is_charged_for_each_tap(op, args, taps):
    """a13 #4's class: each output element of a resampling reads ``taps`` input elements."""
    _, _, elements = cost(op, args, {}, torch.device('cpu'))
    assert elements >= taps * 3 * 16 * 16


# ----------------------------------------------------------------------------- 5: rate

def test_the_work_rate_is_measured_once_per_process_and_conservative():
    """a13 #5: WORK_PER_S['cpu'] = 1e11 was ~3x this VM (10 s admitted 31 s of matmuls)."""
    cpu = torch.device('cpu')
    rate = work_rate.rate(cpu)
    assert rate is work_rate.rate(cpu)               # cached: measured once
    flops, elements = work_rate.CEILING['cpu']
    products = {f'{kind}_{str(dtype).removeprefix("torch.")}'   # per-dtype products' timings
                for dtype in work_rate.DTYPES for kind in ('mm', 'conv')}
    slowest = min(v for name, v in rate.kernels.items()
                  if name not in work_rate.FLOP_KERNELS and name not in products)
    assert rate.elements_per_s == max(work_rate.FLOOR, min(elements, slowest))
    assert rate.flops_per_s == max(work_rate.FLOOR, min(flops, rate.kernels['mm']))
    assert rate.max_work(2.0) == int(2.0 * rate.elements_per_s)


def test_the_servers_work_budget_follows_the_measured_rate(make_server, monkeypatch):
    """a13 #5: the budget of a call is --program-max-s at this server's measured rate."""
    slow = work_rate.WorkRate(flops_per_s=1e7, elements_per_s=1e6, conv_flops_per_s=1e7)
    monkeypatch.setitem(work_rate.MEASURED, 'cpu', slow)
    server = make_server(program_max_s=1.0)
    client = RrtoClient(server.endpoint, call_timeout_ms=120000)
    try:
        mask, x = torch.zeros(2048, dtype=torch.bool), torch.randn(2048, 16)
        replay = _recorded(client, _doc(Products(1), mask, x), mask, x)
        mask[:10] = True
        client.infer(replay, [mask, x])             # 10^2 x 16 x 2 FLOPs: in 1 s at 1e7
        with pytest.raises(RemoteError) as err:     # 2048^2 x 32 = 1.3e8 FLOPs: 13 s at 1e7
            client.infer(replay, [torch.ones(2048, dtype=torch.bool), x])
        assert err.value.code == ErrorCode.UNSAFE_PROGRAM.value
        assert 'program-max-s' in str(err.value)
    finally:
        client.close()


# ----------------------------------------------------------------------------- 6: digits

@pytest.mark.parametrize('spec', ['ops:²', 'block:¹', 'ops:٣', 'ops:１', 'ops:3\n', 'ops: 3',
                                  'ops:+3', 'ops:3_0', 'ops:' + '9' * 12])
def test_segments_take_ascii_digits_only(spec):
    """a13 #6: 'ops:²' passed str.isdigit and int() raised (answered internal, logged)."""
    with pytest.raises(ProtocolError) as err:
        parse_granularity(spec)
    assert err.value.code == ErrorCode.BAD_REQUEST


def test_a_record_with_superscript_segments_is_a_bad_request(server):
    client = RrtoClient(server.endpoint, call_timeout_ms=30000)
    try:
        with pytest.raises(RemoteError) as err:
            client.record('0' * 64, [TensorSpec('float32', (4,))], {'segments': 'ops:²'})
        assert err.value.code == ErrorCode.BAD_REQUEST.value
        assert client.hello()['server'] == 'rrto_server'
    finally:
        client.close()


@pytest.mark.parametrize('codec', ['jpeg:٩٠', 'jpeg:²', 'jpeg:９０'])
def test_a_jpeg_quality_takes_ascii_digits_only(codec):
    with pytest.raises(ValueError):
        codecs.parse(codec)


# ----------------------------------------------------------------------------- S1: front

def test_a_front_without_keys_serves_each_connections_warms_in_turn(zmq_ctx):
    """S1: without keys every robot was 'anonymous': one robot's 8 warms delayed another's."""
    from rrto_fleet.directory import Directory
    from rrto_fleet.front import Front
    from rrto_wire import fleet
    port = SlowPort(0.3)
    directory = Directory({'a': port})
    directory.poll()
    front = Front(directory, 'tcp://127.0.0.1:*').start()
    signature = [{'dtype': 'float32', 'shape': [4]}]

    def warm(sock, request_id, model):
        sock.send(fleet.encode(fleet.Request(v=fleet.DIRECTORY_VERSION, id=request_id,
                                             kind='warm', model=model, signature=signature)))
    mallory, robot = raw_socket(zmq_ctx, front.endpoint), raw_socket(zmq_ctx, front.endpoint)
    try:
        for k in range(8):                           # one connection, 8 warms
            warm(mallory, k, f'{k:x}' * 64)
        deadline = time.monotonic() + 30
        while not port.started:
            assert time.monotonic() < deadline
            time.sleep(0.005)
        time.sleep(0.1)                              # every one of hers is in the queue
        warm(robot, 99, 'f' * 64)
        assert robot.poll(60000)
        assert fleet.decode_reply(robot.recv()).kind == 'ok'
        ahead = port.started.index('f' * 64)
        assert ahead <= 2, f"the robot's warm started after {ahead} of mallory's 8"
        for _ in range(8):
            assert mallory.poll(60000)
            assert fleet.decode_reply(mallory.recv()).kind == 'ok'
    finally:
        front.close()
