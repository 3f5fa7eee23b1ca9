"""Chained programs: a partitioned model's graphs in one request, each after a guard on sizes."""

import gc

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensor
from torch.utils._python_dispatch import TorchDispatchMode

from rrto_ros import OffloadResult, partition
from rrto_ros.zoo import _anchors, _decode, initialise
from rrto_ros.zoo_rcnn import RCNN, rcnn

SHAPE = (1, 3, 128, 128)


def _image(seed: int) -> torch.Tensor:
    return torch.randn(*SHAPE, generator=torch.Generator().manual_seed(seed))


def _equal(got: list, want: list) -> bool:
    return all(torch.equal(got[0][key], want[0][key]) for key in want[0])


def _rcnn_offloaded(server, offloaded):
    """Return the R-CNN-shaped zoo detector, its input, local outputs and offloaded model."""
    model = rcnn()
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


class _EagerRCNN(RCNN):
    """The zoo R-CNN with float operators between its graphs (in the frame dynamo skips)."""

    extra = write = False       # Python between the graphs: another operator, a write

    def forward(self, images: torch.Tensor) -> list:
        p3 = self.backbone(images)
        levels = [p3, self.down(p3)]
        objectness, deltas, anchors = [], [], []
        for level, feature in enumerate(levels):
            n, _, h, w = feature.shape
            objectness.append(self.objectness[level](feature).permute(0, 2, 3, 1).reshape(n, -1))
            deltas.append(self.deltas[level](feature).permute(0, 2, 3, 1).reshape(n, -1, 4))
            anchors.append(_anchors(h, w, images.shape[-1] / w, self.sizes[level]))
        boxes = _decode(torch.cat(deltas, 1), torch.cat(anchors), images.shape[-2:])
        logits = torch.cat(objectness, 1)
        strides = [images.shape[-1] / f.shape[-1] for f in levels]
        return [self._detect([f[i:i + 1] for f in levels], self._boxes(boxes[i]),
                             torch.sigmoid(logits[i]), strides) for i in range(len(images))]

    @torch.compiler.disable
    def _boxes(self, boxes: torch.Tensor) -> torch.Tensor:
        out = torch.mul(boxes, 1.0)         # ONE: the operator the robot computes differently
        if self.write:
            out.add_(0.0)
        return out + 0.0 if self.extra else out


class _Perturbed(TorchDispatchMode):
    """The robot's CPU rounding otherwise: ``x * 1.0`` comes out one ulp higher."""

    @classmethod
    def ignore_compile_internals(cls) -> bool:
        return True

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func is torch.ops.aten.mul.Tensor and len(args) == 2 and isinstance(args[1], float) and args[1] == 1.0 and \
                out.dtype == torch.float32 and not isinstance(out, FakeTensor):
            out = torch.nextafter(out, torch.full_like(out, float('inf')))
        return out


def _eager_offloaded(server, offloaded, write=False):
    # RCNN._detect's code is shared with the zoo R-CNNs of the tests before: start from no
    # dynamo entries, and collect those models now (not in the middle of a call)
    gc.collect()
    torch.compiler.reset()
    model = initialise(_EagerRCNN(), 0)
    model.write = write
    x = _image(0)
    with torch.inference_mode():
        expected = model(x)
    om = offloaded(model, server.endpoint, timeout_ms=30000)
    with _Perturbed():      # the robot's every call (dynamo's entries are made under it)
        assert om.warmup(x, timeout_s=300)
    return model, x, expected, om


def _perturbed_call(om, x) -> tuple:
    before = om.stats()
    with _Perturbed():
        out = om(x)
    after = om.stats()
    return out, om.last.round_trips, after['chain_claims'] - before['chain_claims']


def test_the_robot_adopts_the_servers_values_between_graphs(server, offloaded):
    # the robot computes the operator between the backbone and the next graph one ulp
    # off (as a CPU does against CUDA): the inputs its Python hands the box head never
    # equal those the server used, so without adoption no guess is claimed (3 round
    # trips); following the chain, the robot takes the server's value for the operator
    # (and for the local graph after it), and the box and keypoint heads are claimed
    model, x, expected, om = _eager_offloaded(server, offloaded)
    chains = om.partition.describe()['chains']
    assert len(chains) == 1 and 'ops' in chains[0], chains
    for _ in range(2):
        out, round_trips, claims = _perturbed_call(om, x)
        assert (round_trips, claims) == (1, 3), om.last.reason
        assert _equal(out, expected)            # the server's values, not the robot's
    with _Perturbed(), torch.inference_mode():
        robot = model(x)
    assert not torch.equal(robot[0]['boxes'], expected[0]['boxes'])    # the test bites


def test_without_adoption_the_robots_rounding_spoils_every_guess(
        server, offloaded, monkeypatch):
    monkeypatch.setattr(partition, 'ADOPT', False)
    model, x, _, om = _eager_offloaded(server, offloaded)
    out, round_trips, claims = _perturbed_call(om, x)
    assert (round_trips, claims) == (3, 0), om.last
    with _Perturbed(), torch.inference_mode():
        assert _equal(out, model(x))            # the robot's own values, served per graph


@pytest.mark.parametrize('change', ['extra', 'write'])
def test_python_off_the_watched_path_ends_the_adoption(server, offloaded, change):
    # another operator after the adopted one, or a write into the adopted tensor: the
    # robot stops taking the server's values there and drops the guesses (one round trip
    # per remote graph); its outputs are its own computation from what it held then (the
    # server's value of the operator before: no ulp off)
    model, x, _, om = _eager_offloaded(server, offloaded)
    setattr(model, change, True)
    with torch.inference_mode():
        want = model(x)
    for _ in range(2):
        out, round_trips, claims = _perturbed_call(om, x)
        assert (round_trips, claims) == (3, 0), om.last
        assert _equal(out, want)
    setattr(model, change, False)       # the watched path again: adopted
    out, round_trips, claims = _perturbed_call(om, x)
    assert (round_trips, claims) == (1, 3), om.last.reason


def test_a_chain_whose_operators_write_in_place_is_not_adopted(server, offloaded):
    # the server returns a tensor's value after the segment's last write, not the value
    # the robot's Python saw at the operator: such a chain is only claimed on equal bytes
    model, x, _, om = _eager_offloaded(server, offloaded, write=True)
    out, round_trips, claims = _perturbed_call(om, x)
    assert (round_trips, claims) == (3, 0), om.last
    with _Perturbed(), torch.inference_mode():
        assert _equal(out, model(x))
