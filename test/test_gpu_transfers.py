"""
CUDA-graph replays with their copies in the graph: staging, copy-back, buffers in flight.

A replay whose inputs fit the staging cap copies them from page-locked host
buffers inside its first captured graph; its outputs are copied back into
page-locked buffer sets that a reply keeps until ZeroMQ has sent it.  These
tests check that no request ever sees another's data through those shared
buffers (consecutive, suspended and concurrent requests, replies in flight)
and that inputs or outputs over the caps still come back right.  Skipped
without CUDA.
"""

import threading

import pytest
import torch

from rrto_ros import OffloadResult
from rrto_ros.zoo import keypoint_net
from rrto_server import host_buffers, runner_cudagraph, transfers
from rrto_server.lanes import Job, Lane
from rrto_server.replay import Replay
from rrto_wire import treespec
from test_preemption import make_replay as preemption_replay

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason='needs CUDA')]

SIZE = (1, 3, 64, 96)


class Tracker:
    def __init__(self, done=False):
        self.done = done


class Upsample(torch.nn.Module):
    """A small network with a 4 MiB output (zero-copy frames, a tracked reply)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(3, 16, 3, padding=1)

    def forward(self, x):
        return torch.nn.functional.interpolate(self.conv(x), scale_factor=4.0)


def make_replay(tmp_path, model, example, segments='whole') -> Replay:
    return preemption_replay(tmp_path, model, example, segments, 'cuda')


def reference(model, x):
    return treespec.flatten(model(x))[0]


def close(actual, expected):
    return all(torch.allclose(a, e, rtol=1e-4, atol=1e-5) for a, e in zip(actual, expected))


def test_inputs_are_staged_inside_the_graph_and_never_mixed(tmp_path):
    model = keypoint_net()
    xs = [torch.randn(*SIZE) for _ in range(3)]
    replay = make_replay(tmp_path, model, xs[0])
    assert replay.runner.staging is not None
    first = [replay.start([x]).run() for x in xs]
    again = [replay.start([x]).run() for x in reversed(xs)][::-1]
    for x, a, b in zip(xs, first, again):
        assert all(torch.equal(p, q) for p, q in zip(a, b))
        assert close(a, reference(model, x))


def test_a_suspended_execution_keeps_its_inputs_when_another_is_staged(tmp_path):
    model = keypoint_net()
    x, y = torch.randn(*SIZE), torch.randn(*SIZE)
    replay = make_replay(tmp_path, model, x, segments='ops:5')
    assert replay.num_segments > 3 and replay.runner.staging is not None
    unpreempted = replay.start([x]).run()
    suspended = replay.start([x])
    suspended.step()                      # its inputs went in through the staging buffers
    between = replay.start([y]).run()     # which now hold y
    while not suspended.step():
        pass
    resumed = suspended.host_outputs()
    assert all(torch.equal(a, b) for a, b in zip(resumed, unpreempted))
    assert close(between, reference(model, y))
    suspended.release_buffers()


def test_replies_in_flight_keep_their_page_locked_outputs(tmp_path):
    model = keypoint_net()
    x, y = torch.randn(*SIZE), torch.randn(*SIZE)
    replay = make_replay(tmp_path, model, x)
    first = replay.start([x])
    first.step()
    out_x = first.host_outputs()                  # a reply being sent from these buffers
    assert all(t.is_pinned() for t in out_x)
    kept = [t.clone() for t in out_x]
    second = replay.start([y])
    second.step()
    out_y = second.host_outputs()
    assert out_x[0].data_ptr() != out_y[0].data_ptr()
    assert all(torch.equal(a, b) for a, b in zip(out_x, kept)), 'overwritten while in flight'
    tracker = Tracker()
    first.release_buffers(tracker)                # a zero-copy frame libzmq still holds
    second.release_buffers()
    third = replay.start([x])
    third.step()
    assert third.host_outputs()[0].data_ptr() == out_y[0].data_ptr()
    assert all(torch.equal(a, b) for a, b in zip(out_x, kept))
    third.release_buffers()
    tracker.done = True
    fourth = replay.start([y])
    fourth.step()
    fourth.host_outputs()
    fifth = replay.start([y])
    fifth.step()
    assert {fourth.host_outputs()[0].data_ptr(), fifth.host_outputs()[0].data_ptr()} == \
        {out_x[0].data_ptr(), out_y[0].data_ptr()}


def test_inputs_and_outputs_over_the_caps_take_the_plain_path(tmp_path, monkeypatch):
    monkeypatch.setattr(runner_cudagraph, 'STAGED_INPUT_BYTES', 1024)
    monkeypatch.setattr(transfers, 'STAGE_CHUNK_BYTES', 4096)    # staged in 18 pieces
    monkeypatch.setattr(host_buffers, 'MAX_BYTES', 1024)
    model = keypoint_net()
    x, y = torch.randn(*SIZE), torch.randn(*SIZE)
    replay = make_replay(tmp_path, model, x, segments='ops:5')
    assert replay.runner.staging is None and not replay.runner.output_buffers.enabled
    suspended = replay.start([x])
    suspended.step()
    between = replay.start([y]).run()
    while not suspended.step():
        pass
    out = suspended.host_outputs()
    assert not out[0].is_pinned()
    assert close(out, reference(model, x)) and close(between, reference(model, y))


def test_a_bulk_input_staged_in_pieces_is_the_whole_copy_byte_for_byte():
    device = torch.device('cuda')
    for tensor in (torch.randn(1000, 1031),                  # 4 pieces of 1 MiB and a rest
                   torch.randint(0, 255, ((3 << 20) + 7,), dtype=torch.uint8),
                   torch.randn(1031, 1000).t(),              # not contiguous: one copy
                   torch.randn(100)):                        # under a piece
        pieces = transfers.stage([tensor], device, chunk_bytes=1 << 20)[0]
        whole = transfers.stage([tensor], device, chunk_bytes=1 << 40)[0]
        assert pieces.device.type == 'cuda' and pieces.dtype == tensor.dtype
        assert pieces.shape == tensor.shape
        assert torch.equal(pieces.cpu(), tensor) and torch.equal(whole.cpu(), tensor)


def test_large_outputs_are_copied_back_off_the_lane_into_tracked_buffers(tmp_path):
    model = Upsample().eval()
    x = torch.randn(1, 3, 64, 64)
    replay = make_replay(tmp_path, model, x)
    assert replay.runner.output_buffers.nbytes >= 4 << 20
    assert not replay.runner.copies_on_lane
    out = replay.start([x]).run()
    assert close(out, reference(model, x))


def test_concurrent_clients_of_one_replay_get_their_own_outputs(make_server, offloaded):
    """Many replies in flight at once, small (copied) and large (zero-copy, tracked) ones."""
    server = make_server(device='cuda')
    errors = []
    for model, shape in ((keypoint_net(), SIZE), (Upsample().eval(), (1, 3, 64, 64))):
        clients = [offloaded(model, server.endpoint, timeout_ms=30000) for _ in range(4)]
        assert all(c.warmup(torch.randn(*shape)) for c in clients)

        def work(client, seed):
            gen = torch.Generator().manual_seed(seed)
            for _ in range(25):
                x = torch.randn(*shape, generator=gen)
                out = client(x)
                if client.last.result != OffloadResult.OFFLOADED or \
                        not close(treespec.flatten(out)[0], reference(model, x)):
                    errors.append((type(model).__name__, seed))

        threads = [threading.Thread(target=work, args=(c, i)) for i, c in enumerate(clients)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(120)
    assert not errors


def test_any_input_layout_is_staged_byte_for_byte(tmp_path):
    model = keypoint_net()
    x = torch.randn(1, 96, 64, 3).permute(0, 3, 2, 1)   # the right shape, not contiguous
    assert x.shape == SIZE and not x.is_contiguous()
    replay = make_replay(tmp_path, model, x.contiguous())
    assert replay.runner.staging is not None
    assert close(replay.start([x]).run(), reference(model, x))
    on_device = torch.randn(*SIZE)                       # a direct caller's device tensor
    assert close(replay.start([on_device.cuda()]).run(), reference(model, on_device))


def test_a_step_on_the_io_thread_copies_large_outputs_back_itself(tmp_path):
    model = Upsample().eval()
    x, y = torch.randn(1, 3, 64, 64), torch.randn(1, 3, 64, 64)
    replay = make_replay(tmp_path, model, x)
    assert not replay.runner.copies_on_lane
    inline = replay.start([x])
    inline.copy_on_lane = True
    assert inline.step()
    assert inline.buffers is not None and inline.outputs is inline.buffers.tensors
    queued = replay.start([y])           # a lane's step: its copy-back waits for a worker
    assert queued.step() and queued.buffers is None
    assert close(queued.host_outputs(), reference(model, y))
    out = inline.host_outputs()
    assert out[0].is_pinned() and close(out, reference(model, x))
    inline.release_buffers()
    queued.release_buffers()


def test_an_io_thread_step_with_outputs_over_the_cap_copies_them_later(tmp_path, monkeypatch):
    monkeypatch.setattr(host_buffers, 'MAX_BYTES', 1024)
    model = Upsample().eval()
    x = torch.randn(1, 3, 64, 64)
    replay = make_replay(tmp_path, model, x)
    assert not replay.runner.output_buffers.enabled
    inline = replay.start([x])
    inline.copy_on_lane = True
    assert inline.step() and inline.buffers is None
    out = inline.host_outputs()
    assert not out[0].is_pinned() and close(out, reference(model, x))


def _frames(x):
    return [memoryview(x.contiguous().numpy()).cast('B')]


def _express(plan, frames):
    outputs = plan.run(frames)
    torch.cuda.current_stream().synchronize()    # what the lane does after the step
    return outputs


class _ExpressStep(Job):
    def __init__(self, plan, frames):
        super().__init__()
        self.plan, self.frames, self.outputs = plan, frames, None

    def step(self):
        self.outputs = self.plan.run(self.frames)
        return True


def test_an_express_step_on_a_lane_never_asks_torch_for_the_stream(tmp_path, monkeypatch):
    # the lane synchronises the stream it made current; asking torch for it again per request
    # was 13 % of the I/O thread's samples (py-spy, H200)
    model = Upsample().eval()
    xs = [torch.randn(*SIZE) for _ in range(3)]
    replay = make_replay(tmp_path, model, xs[0])
    expected = [replay.start([x]).run() for x in xs]
    lane = Lane(0, torch.device('cuda'), stream_priority=-100)
    asked = []
    real = torch.cuda.current_stream
    monkeypatch.setattr(torch.cuda, 'current_stream',
                        lambda *a, **k: asked.append(a) or real(*a, **k))
    jobs = [_ExpressStep(replay.express, _frames(x)) for x in xs]
    compared = []

    def serve():     # on a thread of its own, as the I/O thread: Lane.run sets its stream
        for job, want in zip(jobs, expected):
            assert lane.run(job, to_end=True)
            # complete when the lane returns (the 4 MiB copy-back is in the graph)
            compared.append(all(torch.equal(a, b) for a, b in zip(job.outputs, want)))

    thread = threading.Thread(target=serve)
    thread.start()
    thread.join(60)
    assert compared == [True] * len(xs), 'complete when the lane returns, bit for bit'
    assert asked == []


@pytest.mark.parametrize('model_cls', [keypoint_net, Upsample])
def test_the_express_graph_answers_byte_for_byte_as_the_general_path(tmp_path, model_cls):
    model = model_cls().eval()
    x, y = torch.randn(*SIZE), torch.randn(*SIZE)
    replay = make_replay(tmp_path, model, x)
    plan = replay.express
    assert plan is not None and plan.body is not None, 'one segment, staged: express'
    general = [replay.start([v]).run() for v in (x, y)]
    first = [t.clone() for t in _express(plan, _frames(x))]
    second = _express(plan, _frames(y))
    assert second[0].is_pinned() and second[0].data_ptr() == plan.runner.express_outputs[0]\
        .data_ptr(), 'answers from its own page-locked buffers'
    for express, expected in ((first, general[0]), (second, general[1])):
        assert [t.dtype for t in express] == [t.dtype for t in expected]
        assert all(torch.equal(a, b) for a, b in zip(express, expected)), 'bit for bit'
    assert close(first, reference(model, x))
    assert [bytes(f) for f in plan.reply_body(second)[1]] == \
        [t.numpy().tobytes() for t in general[1]]
    between = replay.start([x]).run()        # graph 0 after the express graph: unaffected
    assert all(torch.equal(a, b) for a, b in zip(between, general[0]))


def test_segmented_or_unstaged_replays_have_no_express_graph(tmp_path, monkeypatch):
    model = keypoint_net()
    x = torch.randn(*SIZE)
    assert make_replay(tmp_path / 'seg', model, x, segments='ops:5').express is None
    monkeypatch.setattr(runner_cudagraph, 'STAGED_INPUT_BYTES', 1024)
    assert make_replay(tmp_path / 'big', model, x).express is None
