"""
a16: what a dynamic program makes that its budgets did not see.

#1 integer arithmetic on sizes (Python's ``operator.mul``) was free and
unbounded: ``n = nonzero(mask).shape[0]`` (0 on the trial's zeros) squared 30
times is a 2^30-bit integer.  #2 a view returned as a list (``unbind``,
``split``, ``chunk``) was free: ``x.expand(n * n).unbind(0)`` makes n^2 tensor
objects of ~600 bytes, from a 1-element input.  Each test fails without its fix.
"""

import ast
import copy
import gc
import json
import pathlib
import threading
import time
import tracemalloc

import exploits
import pytest
import torch

from rrto_ros.client import RemoteError, RrtoClient
from rrto_server import taskstats, work_rate
from rrto_server.runner import Execution
from rrto_server.runner_fx import DynamicRunner
from rrto_server.taskstats import TaskStats
from rrto_testing import raw_socket, receive, upload
from rrto_wire import dtypes, heap, ops_dynamic
from rrto_wire import protocol as wire
from rrto_wire.errors import ErrorCode, ProtocolError
from rrto_wire.ops_cost import TENSOR_BYTES
from rrto_wire.program import Program, sha256
from rrto_wire.summary import summarise
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
    # export's own assertions about Square (torch 2.11 writes u1 <= u0**2) do not hold for n*n + 1
    nodes[:] = [n for n in nodes if n['op'] != 'aten._assert_scalar.default']
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


# ----------------------------------------------------------------------------- 3: cycles

KEPT = 1234567      # floats of the value alive when the call is refused (a distinctive size)


class Keep(torch.nn.Module):
    """A value of KEPT floats alive when ``ones(n, 65536)`` is refused (n = 256: 64 MiB)."""

    def forward(self, mask: torch.Tensor) -> tuple:
        n = torch.nonzero(mask).shape[0]
        kept = torch.ones(KEPT)
        more = torch.ones(n, 65536)
        return (kept.sum() + more.sum(),)


def _kept_alive() -> int:
    return sum(1 for o in gc.get_objects()    # real tensors (not an export's fake values)
               if type(o) is torch.Tensor and o.shape == (KEPT,))


def test_a_refused_call_keeps_nothing_after_its_answer(make_server, zmq_ctx):
    """a16 #3: its error kept its frames (values) in a cycle: 20 calls held +458 MiB."""
    blob = json.dumps(_doc(Keep(), _mask(0))).encode()
    server = make_server(program_max_bytes=64 << 20)
    client = RrtoClient(server.endpoint, call_timeout_ms=60000)
    sock = raw_socket(zmq_ctx, server.endpoint)
    try:
        client.upload({sha256(blob): ('program', blob)})
        replay = client.record(sha256(blob), [TensorSpec.of(_mask(0))], {})['replay']
        gc.collect()
        gc.disable()        # what reference counting frees, not what a collection finds
        try:
            for request_id in range(3):
                sock.send_multipart(wire.encode(
                    {'kind': 'infer', 'id': request_id, 'replay': replay}, [_mask(256)]))
                header = receive(sock)[0]
                assert header['kind'] == 'error' and header['code'] == 'unsafe_program', header
            deadline = time.monotonic() + 5
            while _kept_alive() and time.monotonic() < deadline:
                time.sleep(0.05)    # the lane may still be ending its step
            assert _kept_alive() == 0, 'a refused call\'s value outlived its answer'
        finally:
            gc.enable()
    finally:
        client.close()


def _kept_exceptions(root: pathlib.Path) -> list[str]:
    """Each place in the server where a caught exception is kept past its ``except`` block."""
    found = []
    for path in sorted(root.glob('rrto_server/*.py')) + sorted(root.glob('rrto_fleet/*.py')):
        for handler in ast.walk(ast.parse(path.read_text())):
            if not isinstance(handler, ast.ExceptHandler) or not handler.name:
                continue

            def named(node, name=handler.name):
                return isinstance(node, ast.Name) and node.id == name
            for node in ast.walk(ast.Module(body=handler.body, type_ignores=[])):
                if isinstance(node, (ast.Assign, ast.AnnAssign)) and node.value is not None:
                    values = node.value.elts if isinstance(node.value, ast.Tuple) else [node.value]
                    kept = any(named(v) for v in values)
                elif isinstance(node, ast.Lambda):
                    kept = any(named(n) for n in ast.walk(node.body))
                elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
                    kept = node.func.attr in ('append', 'add', 'put', 'submit', 'set_exception') \
                        and any(named(a) for a in node.args)
                else:
                    kept = False
                if kept:
                    found.append(f'{path.name}:{node.lineno}: {ast.unparse(node)[:80]}')
    return found


def test_no_caught_exception_is_kept_with_its_frames():
    """a16 #3 (class): a kept error is ``detached`` (main: scheduler.py, recording.py)."""
    root = pathlib.Path(__file__).resolve().parents[1]
    assert _kept_exceptions(root) == []


# ----------------------------------------------------------------------------- 4: settles

class Small(torch.nn.Module):
    """Three operators: ``ops:1`` and ``ops:2`` are two more replays of it."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(x * 2 + 1)


def _settled() -> None:
    """Let what earlier tests dropped (their servers, still watched) go first."""
    for _ in range(heap.PENDING_SETTLES + 2):
        heap.dropped()
        heap.settle('test')


def test_a_peers_recordings_do_not_each_stop_the_server_for_a_full_collection(
        make_server, monkeypatch):
    """a16 #4: each recording past the replay limit unfroze the heap (230 ms, every thread)."""
    monkeypatch.setenv(heap.ENV, '1')      # as `python -m rrto_server` does
    server = make_server(max_replays=1)
    x = torch.randn(4)
    artifact = upload(server.endpoint, Small(), x)
    client = RrtoClient(server.endpoint, call_timeout_ms=60000)
    try:
        _settled()
        before = server.snapshot()['heap']['unfreezes']
        for segments in ['whole', 'ops:1', 'ops:2'] * 2:    # each evicts the one before
            client.record(artifact.model, artifact.signature, {'segments': segments})
        unfreezes = server.snapshot()['heap']['unfreezes'] - before
    finally:
        client.close()
    assert unfreezes <= 1, f'{unfreezes} full collections for 5 small replays dropped'


def test_dropped_state_worth_a_full_collection_still_gets_one(monkeypatch):
    """a16 #4: the bound on what waits: UNFREEZE_BYTES dropped, or UNFREEZE_S, or unknown."""
    monkeypatch.setenv(heap.ENV, '1')
    _settled()
    heap.dropped()                          # unknown bytes: now
    assert heap.due()
    heap.settle('test')
    heap.dropped(nbytes=1 << 20)            # a small replay: it waits
    assert heap.stale() and not heap.due()
    assert heap.due(time.monotonic() + heap.UNFREEZE_S)
    heap.dropped(nbytes=heap.UNFREEZE_BYTES)
    assert heap.due()
    heap.settle('test')
    assert not heap.stale()


# ----------------------------------------------------------------------------- 5: Python values

@pytest.mark.parametrize('op, args', [
    ('operator.mul', ['x', {'n': 'mul'}]),          # 'x' * n*n: a string of n^2 characters
    ('operator.mul', [[0], {'n': 'mul'}]),          # [0] * n*n: a list of n^2 slots
    ('operator.add', [{'n': 'mul'}, 0.5]),          # a float where a size goes
    ('operator.add', [{'n': 'mul'}, 1 << 70]),      # an integer past any size
    ('operator.pow', [{'n': 'mul'}, {'n': 'mul'}]),   # (n^2)^(n^2): 2000 rows ran past 4x
    ('operator.pow', [2, {'n': 'mul'}]),             # 2^(n^2)
    ('operator.pow', [{'n': 'mul'}, 1000]),
])
def test_a_python_operator_in_a_dynamic_program_is_size_arithmetic_only(op, args):
    """a16 #5: one node computed an unbounded Python value (main: parsed, then ran)."""
    doc = _doc(Square(), _mask(0), torch.ones(1))
    nodes = doc['nodes']
    at = next(k for k, n in enumerate(nodes) if n['op'] == 'operator.mul')
    Program(json.loads(json.dumps(doc)))        # the program as exported parses
    nodes.insert(at + 1, _node('value', op, args))
    with pytest.raises(ProtocolError) as refused:
        Program(doc)
    assert refused.value.code == ErrorCode.UNSAFE_PROGRAM, refused.value


def test_a_float_from_sizes_is_never_a_size():
    """a16 #5: ``truediv`` may compare (an assertion), but its float is not a size."""
    doc = _doc(Square(), _mask(0), torch.ones(1))
    nodes = doc['nodes']
    at = next(k for k, n in enumerate(nodes) if n['op'] == 'operator.mul')
    nodes.insert(at + 1, _node('half', 'operator.truediv', [{'n': 'mul'}, 2]))
    nodes.insert(at + 2, _node('square', 'operator.pow', [{'n': 'mul'}, 2]))
    Program(copy.deepcopy(doc))              # a size's square and half: size arithmetic
    expand = next(n for n in nodes if n['op'] == 'aten.expand.default')
    expand['args'][1] = [{'n': 'half'}]
    with pytest.raises(ProtocolError) as refused:
        Program(doc)
    assert refused.value.code == ErrorCode.UNSAFE_PROGRAM and 'not a size' in str(refused.value)


# ----------------------------------------------------------------------------- 6: stats

def _full(tasks: TaskStats, names: int, samples: int = 4096) -> None:
    for task in range(names):
        for i in range(samples):
            tasks.ended(f't{task}', 'completed', 1e-3 + i * 1e-9, client='eve',
                        queue_s=1e-4, preempt_s=2e-4)


def test_a_keys_stats_summarise_only_what_changed(monkeypatch):
    """a16 #6: 257 full entries took 179 ms of the I/O thread per `stats` (main: every time)."""
    tasks = TaskStats()
    _full(tasks, 8, 64)
    calls = []
    monkeypatch.setattr(taskstats, 'summarise', lambda s: calls.append(1) or summarise(s))
    first = tasks.snapshot('eve')
    assert len(calls) == 8 * 3
    assert tasks.snapshot('eve') == first
    assert len(calls) == 8 * 3, 'summarised again although nothing changed'
    tasks.ended('t3', 'completed', 5e-3, client='eve')
    again = tasks.snapshot('eve')
    assert len(calls) == 9 * 3 and again['t3']['completed'] == 65
    assert again['t3']['latency_ms']['max'] == 5.0 and again['t2'] == first['t2']


def test_no_request_waits_for_a_stats_summary(monkeypatch):
    """a16 #6: the summaries were built holding the lock every request's end takes."""
    tasks = TaskStats()
    _full(tasks, 2, 16)
    started, release = threading.Event(), threading.Event()

    def slow(samples):
        started.set()
        release.wait(10)
        return summarise(samples)
    monkeypatch.setattr(taskstats, 'summarise', slow)
    reader = threading.Thread(target=tasks.snapshot, args=('eve',))
    reader.start()
    try:
        assert started.wait(10)
        ended = threading.Thread(target=tasks.ended, args=('t0', 'completed', 1e-3),
                                 kwargs={'client': 'victim'})
        ended.start()
        ended.join(2)
        assert not ended.is_alive(), 'a request\'s end waited for a stats summary'
    finally:
        release.set()
        reader.join(10)


def test_a_full_task_entry_is_kept_in_compact_rings():
    """a16 #6: 3 windows of 4096 Python floats in deques: ~390 KB an entry, 1024 entries."""
    tasks = TaskStats()
    _full(tasks, 1, 8)                  # the entry exists: measure its samples only
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        _full(tasks, 1)
        held = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert held < 3 * 4096 * 8 * 1.5, f'{held} bytes for 3 x 4096 samples'
    summary = tasks.snapshot('eve')['t0']['latency_ms']
    assert summary['n'] == 4096 and summary['max'] == pytest.approx(1e-3 * 1e3 + 4095e-6)


# ----------------------------------------------------------------------------- 7: outputs

class Spread(torch.nn.Module):
    """An output that is a view: one stored element, n * n + 1 in the reply."""

    def forward(self, mask: torch.Tensor, x: torch.Tensor) -> tuple:
        n = torch.nonzero(mask).shape[0]
        return (x.expand(n * n + 1),)


def test_an_output_is_charged_what_its_reply_holds():
    """a16 #7: x.expand(n * n + 1), n = 4000: a 61 MiB reply under an 8 MiB budget (main)."""
    doc = _doc(Spread(), _mask(0, 1024), torch.ones(1))
    assert Execution(_runner(doc), [_mask(2, 1024), torch.ones(1)]).run()[0].shape == (5,)
    with pytest.raises(ProtocolError) as refused:    # 2^20 + 1 floats: 4 MiB of 1
        Execution(_runner(doc, max_bytes=1 << 20), [_mask(1024, 1024), torch.ones(1)]).run()
    assert refused.value.code == ErrorCode.UNSAFE_PROGRAM and 'reply' in str(refused.value)


def test_a_static_programs_view_output_is_charged_at_its_trial(make_server):
    """a16 #7: x.expand(2^26) of a 1-element input: 256 MiB replies under 64 MiB (main: ok)."""
    size = 1 << 23                              # 32 MiB in the reply, 4 bytes stored
    blob = exploits.program([exploits.node('y', 'aten.expand.default', {'n': 'x'}, [size],
                                           out=('float32', (size,)))], ['y'],
                            inputs=(('x', 'float32', (1,)),))
    server = make_server(program_max_bytes=16 << 20)
    client = RrtoClient(server.endpoint, call_timeout_ms=60000)
    try:
        client.upload({sha256(blob): ('program', blob)})
        with pytest.raises(RemoteError) as refused:
            client.record(sha256(blob), [TensorSpec.of(torch.ones(1))], {})
        assert refused.value.code == 'unsafe_program' and 'MiB' in str(refused.value)
    finally:
        client.close()
