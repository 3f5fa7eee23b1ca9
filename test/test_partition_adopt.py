"""A call following a chain takes the server's values between its graphs (partition_adopt)."""

import gc

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensor
from torch.utils._python_dispatch import TorchDispatchMode

from rrto_ros import partition
from rrto_ros.zoo import _anchors, _decode, initialise
from rrto_ros.zoo_rcnn import RCNN

SHAPE = (1, 3, 128, 128)


def _image(seed: int) -> torch.Tensor:
    return torch.randn(*SHAPE, generator=torch.Generator().manual_seed(seed))


def _equal(got: list, want: list) -> bool:
    return all(torch.equal(got[0][key], want[0][key]) for key in want[0])


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
        if func is torch.ops.aten.mul.Tensor and len(args) == 2 and \
                isinstance(args[1], float) and args[1] == 1.0 and not isinstance(out, FakeTensor):
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


def test_what_a_segment_writes_in_place_stays_the_robots(server, offloaded):
    # the server returns a tensor's value after the segment's last write, not the value
    # the robot's Python saw at the operator: the robot computes the written tensor (and
    # what follows from it) itself, and a graph reading it is claimed on equal bytes only
    model, x, _, om = _eager_offloaded(server, offloaded, write=True)
    out, round_trips, claims = _perturbed_call(om, x)
    assert (round_trips, claims) == (3, 0), om.last
    with _Perturbed(), torch.inference_mode():
        assert _equal(out, model(x))


@pytest.mark.parametrize('live, adopted', [
    ('watched', True),
    ('other tensor', False),        # the same values, not the value the server used
    ('other value', False),
    ('negative zero', False),       # -0.0 is not 0.0 (floats bit for bit)
])
def test_an_operator_is_adopted_only_on_the_watched_arguments(live, adopted):
    from torch.utils._pytree import tree_flatten

    from rrto_ros.partition_adopt import Adopter, Step
    from rrto_ros.partition_chain import Speculation

    with torch.inference_mode():
        head_out = torch.ones(3)        # the head's output as it came back
        served = torch.full((3,), 7.0)  # the server's value of the operator (not 1 + 0.0)
        step = Step(torch.ops.aten.add.Tensor, link=1,
                    spec=tree_flatten(((head_out, 0.0), {}))[1],
                    leaves=[('t', ('out', 0, 0)), ('v', 0.0)],
                    outs=[(('op', 1, 0), 0, (3,), (1,), torch.float32)],
                    out_spec=tree_flatten(served)[1])
        speculation = Speculation([object()])
        adopter = Adopter([step, Step(subgraph=object(), link=2)], [(head_out,), (served,)], 3,
                          speculation, [])
        adopter.paused = 0
        x, scalar = {'other tensor': (torch.ones(3), 0.0), 'other value': (head_out, 1.0),
                     'negative zero': (head_out, -0.0)}.get(live, (head_out, 0.0))
        with adopter:
            got = x + scalar
        assert (got is served) == adopted
        assert adopter.active == adopted and bool(speculation.queue) == adopted
        if not adopted:         # the robot's own result
            assert torch.equal(got, x + scalar)
