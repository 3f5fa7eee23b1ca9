"""Chained programs: a partitioned model's graphs in one request, each after a guard on sizes."""

import pytest
import torch

from rrto_ros import OffloadResult, partition
from rrto_ros.zoo_rcnn import rcnn

SHAPE = (1, 3, 128, 128)


def _image(seed: int) -> torch.Tensor:
    return torch.randn(*SHAPE, generator=torch.Generator().manual_seed(seed))


def _equal(got: list, want: list) -> bool:
    return all(torch.equal(got[0][key], want[0][key]) for key in want[0])


def _rcnn_offloaded(server, offloaded, **options):
    """Return the R-CNN-shaped zoo detector, its input, local outputs and offloaded model."""
    torch.compiler.reset()      # RCNN._detect's code is shared with other tests' detectors
    model = rcnn(**options)
    x = _image(0)
    with torch.inference_mode():
        expected = model(x)
    om = offloaded(model, server.endpoint, timeout_ms=30000)
    assert om.warmup(x, timeout_s=300)
    return model, x, expected, om


@pytest.fixture
def chained(server, offloaded):
    """The zoo R-CNN offloaded with chains on (:func:`_rcnn_offloaded`)."""
    return _rcnn_offloaded(server, offloaded)


def test_graphs_split_by_branches_on_sizes_share_a_round_trip(chained, server):
    # proposals, box head and keypoint head are separated by `if boxes.numel() ...` (the
    # shape of torchvision's batched_nms): one round trip each before chains; the
    # backbone's outputs reach the box head through Python indexing in a loop over the
    # images (dynamo skips that frame: eager operators on the robot), recorded as a
    # segment of the chain; the backbone's request carries the box head and the keypoint
    # head behind guards on sizes, and the robot claims both
    model, x, expected, om = chained
    assert len(expected[0]['boxes']) > 2
    described = om.partition.describe()
    chains = described['chains']       # graph indices, 'ops' for recorded operators
    assert len(chains) == 1 and len(chains[0]) == 5 and chains[0][1] == 'ops', chains
    for _ in range(2):
        out = om(x)
        assert _equal(out, expected)
        record = om.last
        assert record.result == OffloadResult.OFFLOADED, record.reason
        assert record.round_trips == 1, record
        assert record.remote_subgraphs == 4     # the local graph in the chain: claimed too
    described = om.partition.describe()
    assert described['remote_share'] >= 0.9, described
    backends = [r['backend'] for r in server.snapshot()['replays']
                if r['label'].startswith('RCNN.chain')]
    assert backends == ['eager-dynamic']
    assert om.stats()['chains'] == 1


def test_a_guess_the_guards_refuse_costs_round_trips_never_a_wrong_result(chained):
    # a blank image: as many proposals as traced (the box head's guard holds, its outputs
    # are claimed), but no box passes the box head's threshold, so its outputs have another
    # count than the keypoint head was compiled for; the server's guard stops after the box
    # head, the robot sees the guard fail, and the keypoint graph (compiled again for the
    # new count) runs as before; then the guessed image is guessed right again
    model, x, expected, om = chained
    for image in (torch.zeros(*SHAPE), _image(4) * 5, x):
        with torch.inference_mode():
            want = model(image)
        before = om.stats()
        for _ in range(2):
            got = om(image)
            assert _equal(got, want)
            assert om.last.result in (OffloadResult.OFFLOADED, OffloadResult.LOCAL), om.last
            assert om.last.round_trips <= 3
        after = om.stats()
        guessed = after['chain_guesses'] - before['chain_guesses']
        assert guessed == after['chain_claims'] - before['chain_claims']
        if image is x:
            assert guessed == 6 and om.last.round_trips == 1
        elif not len(want[0]['boxes']):
            # the local graph and the box head each call; the guard held the keypoint head
            assert guessed == 4


def test_nms_class_by_class_writes_into_a_graphs_output_and_still_shares_a_round_trip(
        server, offloaded):
    # torchvision's NMS of more than 4000 coordinates on a CPU (Keypoint R-CNN's proposals):
    # a graph makes the mask of zeros and the eager loop writes True into it; the server
    # returns the mask as last written, so the robot runs that graph itself (a local graph:
    # the only one not claimed) and the writes, and the heads are claimed as before
    model, x, expected, om = _rcnn_offloaded(server, offloaded, vanilla_above=400)
    chains = om.partition.describe()['chains']
    assert len(chains) == 1 and chains[0].count('ops') == 3, chains
    for _ in range(2):
        before = om.stats()
        out = om(x)
        assert _equal(out, expected)
        claims = om.stats()['chain_claims'] - before['chain_claims']
        assert (om.last.round_trips, om.last.local_subgraphs, claims) == (1, 1, 4), om.last


def test_without_chains_the_same_model_takes_three_round_trips(server, offloaded, monkeypatch):
    monkeypatch.setattr(partition, 'CHAIN', False)
    _, x, expected, om = _rcnn_offloaded(server, offloaded)
    out = om(x)
    assert _equal(out, expected)
    assert om.last.round_trips == 3 and om.last.remote_subgraphs == 3
    assert om.partition.describe()['chains'] == []


def test_without_the_operators_between_graphs_the_backbone_chains_nothing(
        server, offloaded, monkeypatch):
    # session 5's chains: graph outputs straight into graph inputs only; the box head's
    # inputs are made by eager operators, so only box head -> keypoint head chains
    monkeypatch.setattr(partition, 'EAGER_LINKS', False)
    _, x, expected, om = _rcnn_offloaded(server, offloaded)
    out = om(x)
    assert _equal(out, expected)
    assert om.last.round_trips == 2
    chains = om.partition.describe()['chains']
    assert len(chains) == 1 and len(chains[0]) == 2 and 'ops' not in chains[0], chains


def test_a_guess_is_not_claimed_after_python_wrote_into_its_inputs():
    """r5 B1: eager code between two graphs wrote into a guessed input; the guess was used."""
    from rrto_ros.partition_chain import Guess, Speculation

    class Link:
        writes = False
    link = Link()
    with torch.inference_mode():            # as a partitioned call's tensors: no versions
        x = torch.ones(3)
        guess = Guess(link, [x], (x * 2,), None, [x.clone()])
        assert Speculation([guess], {id(link)}, {id(x)}).claim(link, [x]) is guess
        again = Guess(link, [x], (x * 2,), None, [x.clone()])
        speculation = Speculation([again], {id(link)}, {id(x)})
        x.add_(1)
        assert speculation.claim(link, [x]) is None
        assert speculation.queue == []       # the rest of the chain runs as usual


def test_a_guess_is_not_claimed_after_a_write_that_only_flips_a_sign():
    """a14 #6: ``torch.equal`` has -0.0 == 0.0, so zeros negated in place kept the guess."""
    from rrto_ros.partition_chain import Guess, Speculation

    class Link:
        writes = False
    link = Link()
    with torch.inference_mode():
        x = torch.zeros(4)
        guess = Guess(link, [x], (torch.atan2(torch.zeros(4), x),), None, [x.clone()])
        speculation = Speculation([guess], {id(link)}, {id(x)})
        x.neg_()                             # atan2(0, -0.0) is pi, not the guessed 0
        assert speculation.claim(link, [x]) is None


def test_inputs_are_compared_by_their_bytes():
    from rrto_ros.partition_chain import same_bits
    nan = torch.tensor([float('nan'), 1.0])
    assert same_bits(nan, nan.clone())       # the same bytes compute the same: claimable
    assert not same_bits(torch.tensor(1.0), torch.tensor(1.0, dtype=torch.float64))
    assert same_bits(torch.arange(3), torch.arange(3))
