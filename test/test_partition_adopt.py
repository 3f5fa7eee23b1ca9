"""A call following a chain takes the server's values between its graphs (partition_adopt)."""

import ctypes
import gc

import numpy as np
import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensor
from torch.utils._python_dispatch import TorchDispatchMode

from rrto_ros import partition
from rrto_ros.zoo import initialise
from rrto_ros.zoo_rcnn import RCNN

SHAPE = (1, 3, 128, 128)


def _image(seed: int) -> torch.Tensor:
    return torch.randn(*SHAPE, generator=torch.Generator().manual_seed(seed))


def _equal(got: list, want: list) -> bool:
    return all(torch.equal(got[0][key], want[0][key]) for key in want[0])


class _EagerRCNN(RCNN):
    """The zoo R-CNN with float operators between its graphs (in the frame dynamo skips)."""

    extra = write = False       # Python between the graphs: another operator, a write

    @torch.compiler.disable
    def proposal_boxes(self, boxes: torch.Tensor) -> torch.Tensor:
        """Pass the boxes through one float operator outside the graphs."""
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


def _eager_offloaded(server, offloaded, write=False, vanilla_above=4000):
    # RCNN._detect's code is shared with the zoo R-CNNs of the tests before: start from no
    # dynamo entries, and collect those models now (not in the middle of a call)
    gc.collect()
    torch.compiler.reset()
    model = initialise(_EagerRCNN(vanilla_above=vanilla_above), 0)
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


def test_a_local_graph_a_segment_writes_into_is_the_robots(server, offloaded, caplog):
    # torchvision's NMS class by class (Keypoint R-CNN's proposals on a CPU): dynamo
    # compiles `keep_mask = zeros_like(scores)` as a graph of its own and the loop after it
    # writes True into that graph's output in place; the server returns the mask as last
    # written, so the robot runs that graph and the writes itself, checks what it reads
    # from the mask against the server's values, and the heads are still claimed
    caplog.set_level('INFO', logger='rrto_ros.partition')
    model, x, expected, om = _eager_offloaded(server, offloaded, vanilla_above=400)
    assert 'chain0: adopted' in caplog.text, caplog.text
    assert 'runs on the robot: aten.index_put_.default' in caplog.text, caplog.text
    for _ in range(2):
        out, round_trips, claims = _perturbed_call(om, x)
        assert (round_trips, claims, om.last.local_subgraphs) == (1, 4, 1), om.last
        assert _equal(out, expected)            # the server's values, not the robot's
    assert 'adoption ends' not in caplog.text, caplog.text


class _Swapped(TorchDispatchMode):
    """The robot's NMS mask otherwise: its first kept box dropped, its first dropped box kept."""

    @classmethod
    def ignore_compile_internals(cls) -> bool:
        return True

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        mask = args[0] if args else None
        if func is torch.ops.aten.index_put_.default and mask.dtype == torch.bool and \
                not isinstance(mask, FakeTensor):
            kept, dropped = mask.nonzero()[0, 0], (~mask).nonzero()[0, 0]
            mask[kept], mask[dropped] = False, True
        return out


def test_a_mask_the_robot_makes_otherwise_ends_the_adoption(server, offloaded, caplog):
    # the robot's own mask (the graph of zeros and the writes after it) selects other
    # proposals than the server's: the first value the robot reads from the mask is not
    # the server's, the adoption ends there, no head is claimed, and the outputs are the
    # robot's computation from what it held then (the server's values before the mask)
    caplog.set_level('INFO', logger='rrto_ros.partition')
    model, x, expected, om = _eager_offloaded(server, offloaded, vanilla_above=400)
    with _Swapped(), torch.inference_mode():
        want = model(x)
    assert not torch.equal(want[0]['boxes'], expected[0]['boxes'])     # the test bites
    for _ in range(2):
        before = om.stats()
        with _Perturbed(), _Swapped():
            out = om(x)
        claims = om.stats()['chain_claims'] - before['chain_claims']
        # claimed before the mask is read: the graph before it, the one in the NMS loop
        assert (om.last.round_trips, claims) == (3, 2), om.last
        assert _equal(out, want)
    ends = [r.getMessage() for r in caplog.records if 'adoption ends' in r.getMessage()]
    assert len(ends) == 1 and "aten.where" in ends[0] and \
        "the robot's output 0 is not the server's" in ends[0], ends


@pytest.mark.parametrize('written, reason', [
    ('input', "aten.add_.Tensor (link 2) writes into the chain's input 0"),
    ('remote', 'aten.add_.Tensor (link 2) writes into the outputs of remote graph 0 (link 0)'),
    ('local', ''),      # the robot runs the local graph: its outputs are the robot's
])
def test_a_write_into_what_the_server_computed_from_is_not_followed(written, reason):
    from types import SimpleNamespace

    from rrto_ros.partition_chain import Call
    from rrto_ros.partition_eager import Op, Segment
    from rrto_ros.partition_script import native, script

    def graph(index, remote):
        return SimpleNamespace(index=index, remote=object() if remote else None, writes=False)

    x, h, m = torch.ones(3), torch.ones(3), torch.ones(3)
    head, local = Call(graph(0, True), 1, [x], (h,)), Call(graph(1, False), 1, [h], (m,))
    target = {'input': x, 'remote': h, 'local': m}[written]
    op = Op(torch.ops.aten.add_.Tensor, (target, h), {}, target)
    last = Call(graph(2, True), 1, [target], (torch.ones(3),))
    events = [head, local, op, last]
    steps, why = script(events, 0, [head, local, Segment(ops=[op]), last], {})
    assert why == reason
    if not reason:
        assert native(steps) == {1}                     # never claimed: the robot runs it
        assert [how for *_, how in steps[1].outs] == ['robot']
        assert not steps[2].native                      # the remote graph: claimed on bytes


@pytest.mark.parametrize('live, adopted', [
    ('watched', True),
    ('other tensor', False),        # the same values, not the value the server used
    ('other value', False),
    ('negative zero', False),       # -0.0 is not 0.0 (floats bit for bit)
])
def test_an_operator_is_adopted_only_on_the_watched_arguments(live, adopted):
    from torch.utils._pytree import tree_flatten

    from rrto_ros.partition_adopt import Adopter
    from rrto_ros.partition_script import Step
    from rrto_ros.partition_chain import Speculation

    with torch.inference_mode():
        head_out = torch.ones(3)        # the head's output as it came back
        served = torch.full((3,), 7.0)  # the server's value of the operator (not 1 + 0.0)
        step = Step(torch.ops.aten.add.Tensor, link=1,
                    spec=tree_flatten(((head_out, 0.0), {}))[1],
                    leaves=[('t', ('out', 0, 0)), ('v', 0.0)],
                    outs=[(('op', 1, 0), 0, (3,), (1,), torch.float32, 'adopt')],
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


class _NumpyRCNN(_EagerRCNN):
    """The eager R-CNN whose Python writes through numpy into an adopted value."""

    @torch.compiler.disable
    def proposal_boxes(self, boxes: torch.Tensor) -> torch.Tensor:
        """Write into the float operator's result through numpy, then read it."""
        out = torch.mul(boxes, 1.0)
        if not isinstance(out, FakeTensor):     # (export traces fakes)
            # as numpy would through t.numpy() or np.from_dlpack: no dispatcher, no version
            pointer = ctypes.cast(out.data_ptr(), ctypes.POINTER(ctypes.c_float))
            np.ctypeslib.as_array(pointer, shape=(out.numel(),))[:] += 8.0
        return torch.add(out, 0.0)      # a segment operator reading the written value


def test_a_write_that_bypasses_the_dispatcher_ends_the_adoption(server, offloaded):
    # numpy writes into the server's value of mul (adopted, no version moves) and the next
    # segment operator reads it: adopting its server value (computed from the unwritten one)
    # would hand the box head the server's boxes, claimed on equal bytes, other boxes than
    # local execution labelled offloaded; what an adopted operator reads is checked byte
    # for byte against the value as it was adopted
    gc.collect()
    torch.compiler.reset()
    model = initialise(_NumpyRCNN(), 0)
    x = _image(0)
    om = offloaded(model, server.endpoint, timeout_ms=30000)
    assert om.warmup(x, timeout_s=300)
    with torch.inference_mode():
        want = model(x)
    for _ in range(2):
        before = om.stats()['chain_claims']
        out = om(x)
        assert _equal(out, want), (om.last, om.stats()['chain_claims'] - before)
        assert om.last.round_trips == 3, om.last
