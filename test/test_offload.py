"""Offloaded calls equal local calls, and cost exactly one round trip once recorded."""

import pytest
import torch

from rrto_ros import OffloadResult
from rrto_ros.client import RrtoClient
from rrto_ros.naive import operator_count
from rrto_ros.preparer import PrepState
from rrto_ros.zoo import ARCHITECTURES
from rrto_testing import assert_same_as_local, prepare
from rrto_wire import replies, treespec

SIZES = {'resnet18': (1, 3, 224, 224), 'mobilenet': (1, 3, 160, 160),
         'keypoint_net': (1, 3, 96, 128)}


@pytest.mark.parametrize('arch', sorted(ARCHITECTURES))
def test_offloaded_equals_local_with_one_round_trip_per_call(arch, server, offloaded):
    model = ARCHITECTURES[arch]()
    om = offloaded(model, server.endpoint, timeout_ms=30000)
    inputs = [torch.randn(*SIZES[arch]) for _ in range(3)]
    assert om.warmup(inputs[0])
    before, server_before = om.stats(), server.snapshot()
    for x in inputs:
        out = om(x)
        assert om.last.result == OffloadResult.OFFLOADED
        assert om.last.round_trips == 1
        assert_same_as_local(out, model(x))
    after, server_after = om.stats(), server.snapshot()
    assert after['calls'] - before['calls'] == 3
    assert after['round_trips'] - before['round_trips'] == 3
    assert server_after['requests']['infer'] - server_before['requests'].get('infer', 0) == 3
    assert sum(server_after['requests'].values()) - sum(server_before['requests'].values()) == 3
    assert after['fallbacks'] == 0 and after['uploads'] == 2 and after['records'] == 1
    # only inputs and outputs travel: request = input bytes + a small header
    assert om.last.bytes_sent - inputs[0].numel() * 4 < 1024


def test_naive_mode_costs_one_round_trip_per_operator(make_server, offloaded):
    server = make_server(allow_naive=True)      # off unless the server is started with it
    model = ARCHITECTURES['resnet18']()
    om = offloaded(model, server.endpoint, timeout_ms=60000, mode='naive')
    x = torch.randn(1, 3, 64, 64)
    assert om.warmup(x)
    target = om.prepared()[0]
    operators = operator_count(target.artifact)
    before = om.stats()
    out = om(x)
    assert om.last.result == OffloadResult.OFFLOADED
    assert om.stats()['round_trips'] - before['round_trips'] == operators
    assert operators == len(target.artifact.program['nodes']) > 60
    assert_same_as_local(out, model(x))
    assert server.snapshot()['naive_sessions'] == 0


def test_eager_mode_serves_without_recording_a_graph(server, offloaded):
    model = ARCHITECTURES['keypoint_net']()
    om = offloaded(model, server.endpoint, timeout_ms=30000, mode='eager')
    x = torch.randn(1, 3, 64, 64)
    assert om.warmup(x)
    assert_same_as_local(om(x), model(x))
    assert om.last.round_trips == 1
    assert server.snapshot()['replays'][0]['backend'] == 'fx'


def test_frozen_cpu_backend_agrees_within_stated_tolerance(make_server, offloaded):
    server = make_server(cpu_backend='frozen')
    model = ARCHITECTURES['resnet18']()
    om = offloaded(model, server.endpoint, timeout_ms=30000)
    x = torch.randn(1, 3, 128, 128)
    assert om.warmup(x)
    torch.testing.assert_close(om(x), model(x), rtol=1e-3, atol=1e-4)
    assert server.snapshot()['replays'][0]['backend'] == 'frozen'


def test_new_signature_records_a_new_replay_and_reuses_weights(server, offloaded):
    model = ARCHITECTURES['keypoint_net']()
    om = offloaded(model, server.endpoint, timeout_ms=30000)
    small, large = torch.randn(1, 3, 64, 64), torch.randn(2, 3, 96, 96)
    assert om.warmup(small) and om.warmup(large)
    assert_same_as_local(om(small), model(small))
    assert_same_as_local(om(large), model(large))
    stats = om.stats()
    assert stats['records'] == 2
    assert stats['uploads'] == 3  # two graphs, one weights blob
    replays = server.snapshot()['replays']
    assert len(replays) == 2
    prepared = {p.signature: p for p in om.prepared()}
    assert set(prepared) == {'float32[1,3,64,64]', 'float32[2,3,96,96]'}
    assert all(p.state == PrepState.READY and not p.error for p in prepared.values())
    assert {p.replay for p in prepared.values()} == {r['replay'] for r in replays}


def test_a_signature_given_up_runs_locally_from_its_next_call(server, offloaded):
    # the call path keeps each f(tensor) signature's target: it must still follow its state
    model = ARCHITECTURES['keypoint_net']()
    om = offloaded(model, server.endpoint, timeout_ms=30000)
    x = torch.randn(1, 3, 64, 64)
    assert om.warmup(x)
    om(x)
    assert om.last.result == OffloadResult.OFFLOADED
    om.preparer.give_up(om.preparer.target([x], treespec.flatten(((x,), {}))[1]), 'refused')
    out = om(x)
    assert om.last.result == OffloadResult.LOCAL and om.last.reason == 'refused'
    assert_same_as_local(out, model(x))


def test_structures_and_keyword_arguments_are_preserved(server, offloaded):
    class TwoInputs(torch.nn.Module):
        def forward(self, image, *, mask):
            return [image * mask, {'sum': (image + mask).sum(dim=1)}]

    om = offloaded(TwoInputs(), server.endpoint, timeout_ms=30000)
    image, mask = torch.randn(2, 3), torch.rand(2, 3)
    assert om.warmup(image, mask=mask)
    out = om(image, mask=mask)
    assert om.last.result == OffloadResult.OFFLOADED
    assert_same_as_local(out, TwoInputs()(image, mask=mask))


def test_calls_before_recording_finishes_run_locally(server, offloaded):
    model = ARCHITECTURES['mobilenet']()
    om = offloaded(model, server.endpoint, timeout_ms=30000)
    x = torch.randn(1, 3, 96, 96)
    expected = model(x)  # before the background export starts (it flips mkldnn off globally)
    out = om(x)  # first call: the server is not prepared yet
    assert om.last.result == OffloadResult.LOCAL
    assert 'preparing' in om.last.reason
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    assert om.warmup(x)
    om(x)
    assert om.last.result == OffloadResult.OFFLOADED


def test_a_pending_infer_hands_over_its_decoded_header_or_a_dict(server):
    torch.manual_seed(0)
    net = torch.nn.Linear(4, 2).eval()
    x = torch.randn(1, 4)
    replay = prepare(server.endpoint, net, x)
    client = RrtoClient(server.endpoint, call_timeout_ms=30000)
    try:
        pending = client.start_infer(replay, [x])
        try:
            header, outputs = pending.take()        # the call path's: typed
        finally:
            pending.cancel()                        # nothing once taken
        assert isinstance(header, replies.InferOk) and header.timing.compute_ms >= 0
        torch.testing.assert_close(outputs[0], net(x))
        header, outputs = client.start_infer(replay, [x]).result()     # everyone else's
        assert isinstance(header, dict) and header['timing']['compute_ms'] >= 0
        torch.testing.assert_close(outputs[0], net(x))
    finally:
        client.close()
