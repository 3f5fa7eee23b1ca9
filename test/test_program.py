"""The uploaded model format: faithful, deterministic, and safe to load from strangers."""

import copy
import json
import subprocess
import sys

import pytest
import torch
from rrto_testing import child_env

from rrto_ros.local_model import TorchModule
from rrto_ros.zoo import keypoint_net
from rrto_wire import program as fmt
from rrto_wire import treespec
from rrto_wire.errors import ProtocolError
from rrto_wire.weights import pack_weights, unpack_weights


class Tiny(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3, padding=1)
        self.register_buffer('scale', torch.tensor(2.0))

    def forward(self, x, bias=None):
        y = torch.relu(self.conv(x)) * self.scale
        return {'y': y, 'pooled': (y.mean(dim=(2, 3)), y.amax(dim=1)), 'extra': bias}


@pytest.fixture(scope='module')
def tiny_artifact():
    model = Tiny().eval()
    x = torch.randn(1, 3, 8, 8)
    flat, in_spec = treespec.flatten(((x,), {}))
    return model, x, TorchModule(model).artifact(flat, in_spec)


def _program_and_weights(artifact):
    program_blob = artifact.blobs[artifact.model][1]
    weights = {kind: data for kind, data in artifact.blobs.values()}.get('weights', b'')
    return program_blob, weights


def test_program_runs_like_the_model(tiny_artifact):
    model, x, artifact = tiny_artifact
    program_blob, weights_blob = _program_and_weights(artifact)
    program = fmt.Program.parse(program_blob)
    weights = unpack_weights(bytearray(weights_blob))
    outputs = program.module(weights, torch.device('cpu'))(x)
    rebuilt = treespec.unflatten(list(outputs), program.out_spec)
    expected = model(x)
    assert torch.equal(rebuilt['y'], expected['y'])
    assert torch.equal(rebuilt['pooled'][1], expected['pooled'][1])
    assert rebuilt['extra'] is None


def test_segments_compose_to_the_whole_program(tiny_artifact):
    model, x, artifact = tiny_artifact
    program_blob, weights_blob = _program_and_weights(artifact)
    program = fmt.Program.parse(program_blob)
    weights = unpack_weights(bytearray(weights_blob))
    cuts = [1, 3]
    env = {program.input_names[0]: x}
    edges = [0] + cuts + [len(program.nodes)]
    for (a, b), (ins, outs) in zip(zip(edges, edges[1:]), program.live_ranges(cuts)):
        module = program.module(weights, torch.device('cpu'), a, b, ins, outs)
        env.update(zip(outs, module(*[env[n] for n in ins])))
    whole = program.module(weights, torch.device('cpu'))(x)
    for name, expected in zip(program.output_names, whole):
        assert torch.equal(env[name], expected)


def test_weights_blob_round_trips_every_tensor():
    tensors = {'a': torch.randn(3, 4), 'b': torch.arange(5), 'c': torch.randn(2).bfloat16(),
               'empty': torch.zeros(0)}
    unpacked = unpack_weights(bytearray(pack_weights(tensors)))
    assert unpacked.keys() == tensors.keys()
    for key in tensors:
        assert torch.equal(unpacked[key], tensors[key])


_EXPORT_SCRIPT = '''
import hashlib, torch
from rrto_ros.local_model import TorchModule
from rrto_ros.zoo import keypoint_net
from rrto_wire import treespec
flat, spec = treespec.flatten(((torch.zeros(1, 3, 64, 64),), {}))
art = TorchModule(keypoint_net()).artifact(flat, spec)
print(art.model, *sorted(art.blobs))
'''


def test_export_is_byte_identical_across_processes():
    runs = [subprocess.run([sys.executable, '-c', _EXPORT_SCRIPT], env=child_env(), check=True,
                           capture_output=True, text=True).stdout.split() for _ in range(2)]
    assert runs[0] == runs[1] and len(runs[0]) == 3


def _doc(tiny_artifact):
    return json.loads(_program_and_weights(tiny_artifact[2])[0])


@pytest.mark.parametrize('mutate, words', [
    (lambda d: d['nodes'][0].update(op='builtins.eval'), 'not an allowed ATen operator'),
    (lambda d: d['nodes'][0].update(op='aten.from_file.default'), 'not allowed'),
    (lambda d: d['nodes'][0].update(op='aten.no_such_op.default'), 'unknown operator'),
    (lambda d: d['nodes'][0].update(args=[{'n': 'ghost'}]), 'undefined values'),
    (lambda d: d['nodes'][0].update(args=[{'py': 'os.system'}]), 'unknown argument tag'),
    (lambda d: d['nodes'][0].update(args=[{'dtype': 'os'}]), 'unknown dtype'),
    (lambda d: d.update(format='pickle'), 'rrto-program'),
    (lambda d: d.update(out_spec={'tuple': ['T']}), 'out_spec'),
    (lambda d: d.pop('nodes'), 'KeyError'),
])
def test_malicious_or_broken_programs_are_rejected(tiny_artifact, mutate, words):
    doc = copy.deepcopy(_doc(tiny_artifact))
    mutate(doc)
    with pytest.raises(ProtocolError) as err:
        program = fmt.Program.parse(json.dumps(doc).encode())
        program.module({}, torch.device('cpu'))
    assert words in err.value.message


class Counting(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.register_buffer('count', torch.zeros(()))

    def forward(self, x):
        self.count.add_(1)
        return x * 2


def test_models_that_mutate_state_during_inference_are_refused():
    flat, spec = treespec.flatten(((torch.zeros(2, 3),), {}))
    with pytest.raises(ValueError, match='mutates'):
        TorchModule(Counting()).artifact(flat, spec)


def test_training_mode_models_are_exported_in_eval_mode():
    model = keypoint_net().train()
    module = TorchModule(model)
    assert not model.training
    flat, spec = treespec.flatten(((torch.zeros(1, 3, 32, 32),), {}))
    assert module.artifact(flat, spec).model
