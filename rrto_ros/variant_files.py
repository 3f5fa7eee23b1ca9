"""
Trained variants on disk, and how they travel: one weight blob per layer.

A variant file (``.variant.pt``) holds the variant's spec and state dict; the
network is rebuilt from the spec (:func:`rrto_ros.variants.build`) and the
file is read with ``torch.load(weights_only=True)``.  :class:`ShardedModule`
exports a module as a version-2 program whose weights are per-layer shards,
so layers that variants share are uploaded and stored once;
:func:`storage_bytes` counts a set of variants' bytes before and after that
sharing.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterable, Sequence

import torch

from rrto_ros import variants
from rrto_ros.local_model import Artifact, TorchModule
from rrto_wire.program import sha256
from rrto_wire.program_writer import from_exported
from rrto_wire.tensors import TensorSpec
from rrto_wire.weights import pack_weights, shard_weights

SUFFIX = '.variant.pt'


class ShardedModule(TorchModule):
    """A torch module offloaded as a program with one weights blob per layer."""

    def artifact(self, flat: Sequence[torch.Tensor], in_spec: Any) -> Artifact:
        """Export for one input signature; the blobs are the program and its shards."""
        ep, out_spec = self.export(flat, in_spec)
        program_json, shards = from_exported(
            ep, in_spec, out_spec, self.label, scope_prefix='model.', sharded=True)
        digest = sha256(program_json)
        blobs = {digest: ('program', program_json)}
        blobs.update({sha256(blob): ('weights', blob) for blob in shards})
        doc = json.loads(program_json)
        signature = tuple(TensorSpec.from_json(i) for i in doc['inputs'])
        return Artifact(digest, signature, out_spec, blobs, doc)


def save(path: str | Path, spec: variants.VariantSpec, net: torch.nn.Module,
         classes: int, accuracy: float | None = None, zoom: int = 1) -> Path:
    """Write a variant file (the network without its zoom); return its path."""
    path = Path(path)
    torch.save({'arch': spec.arch, 'width': spec.width, 'drop': spec.drop, 'classes': classes,
                'accuracy': accuracy, 'zoom': zoom, 'state_dict': net.state_dict()}, path)
    return path


def load(path: str | Path) -> tuple[variants.VariantSpec, torch.nn.Module, dict]:
    """Read a variant file: its spec, the network (zoom included) in eval mode, its fields."""
    data = torch.load(Path(path), map_location='cpu', weights_only=True)
    spec = variants.VariantSpec(str(data['arch']), float(data['width']), int(data['drop']))
    net = variants.build(spec, int(data['classes']))
    net.load_state_dict(data['state_dict'])
    model = variants.zoomed(net, int(data.get('zoom', 1)))
    return spec, model.eval(), {k: data.get(k) for k in ('classes', 'accuracy', 'zoom')}


def load_module(path: str | Path) -> ShardedModule:
    """Return a variant file's network, ready to offload with per-layer shards."""
    spec, model, _ = load(path)
    return ShardedModule(model, label=spec.name)


def storage_bytes(models: Iterable[torch.nn.Module]) -> dict[str, int]:
    """
    Return the weight bytes of ``models`` stored whole and stored as shared shards.

    ``separate``: one blob per model (the version-1 format); ``shared``: each
    distinct layer shard once, as the server's content-addressed store keeps them.
    """
    separate, shards = 0, {}
    for model in models:
        state = {k: v for k, v in model.state_dict().items()
                 if not k.endswith('num_batches_tracked')}
        separate += len(pack_weights(state))
        for _, blob in shard_weights(state):
            shards[sha256(blob)] = len(blob)
    return {'separate': separate, 'shared': sum(shards.values())}
