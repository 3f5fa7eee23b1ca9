"""
Model variants of the zoo architectures: width by filter pruning, depth by dropping blocks.

Width scaling keeps, in every *channel group*, the filters with the largest L1
norm.  A channel group is a set of channels that must be pruned together: the
outputs of every convolution feeding one residual sum (the block outputs of a
ResNet stage, the projections of a MobileNet stage), the depthwise
convolutions that pass them through, and the channels a concatenation
receives from each of its inputs at their offsets (KeypointNet's ``fuse``).
A group is ranked by the summed L1 norms of its producers' filters, so one
index set is cut from producers, pass-throughs (out and in) and consumers
(input dimension, at the group's offset).

Depth scaling replaces a *repeated block* (one whose input and output shapes
are equal: a ResNet block without downsampling, a residual MobileNet block, a
KeypointNet stage's second convolution) with the identity, deepest first.
Module paths of the remaining layers stay as they were, so a depth variant's
layers are byte-identical to its parent's and are stored once on the server
(content-addressed per-layer weight shards, :func:`rrto_wire.program.shard_weights`).

:func:`ladder` picks, for an architecture and input shape, variants whose
multiply-accumulate counts fall in roughly equal steps from the full network.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from rrto_ros.zoo import ARCHITECTURES, BasicBlock, InvertedResidual, KeypointNet, MobileNet, \
    ResNet18

WIDTHS = (1.0, 0.875, 0.75, 0.625, 0.5, 0.375)


@dataclass(frozen=True)
class VariantSpec:
    """Which variant: architecture, kept fraction of every channel group, blocks dropped."""

    arch: str
    width: float = 1.0
    drop: int = 0

    @property
    def name(self) -> str:
        return f'{self.arch}-w{self.width:g}-d{self.drop}'

    def parent(self) -> 'VariantSpec':
        """Return the variant this one's shared layers come from (same width, no drops)."""
        return VariantSpec(self.arch, self.width, 0)


@dataclass
class Group:
    """Channels pruned together: producers (conv, bn), pass-throughs, consumers (path, offset)."""

    producers: list
    passthrough: list
    consumers: list


class Zoomed(nn.Module):
    """A network behind a bilinear ``zoom`` x upsampling: small frames, a large network."""

    def __init__(self, net: nn.Module, zoom: int):
        super().__init__()
        self.net = net
        self.zoom = int(zoom)

    def forward(self, x):
        return self.net(F.interpolate(x, scale_factor=float(self.zoom), mode='bilinear',
                                      align_corners=False))


def zoomed(net: nn.Module, zoom: int) -> nn.Module:
    """Return ``net`` behind a ``zoom`` x upsampling (``net`` itself when ``zoom`` is 1)."""
    return net if zoom == 1 else Zoomed(net, zoom)


def _get(model: nn.Module, path: str) -> nn.Module:
    return model.get_submodule(path)


def droppable(model: nn.Module) -> list[str]:
    """Return the paths of repeated blocks, in the order they are dropped (deepest first)."""
    if isinstance(model, ResNet18):
        paths = [f'layers.{i}' for i, b in enumerate(model.layers)
                 if isinstance(b, BasicBlock) and b.down is None]
    elif isinstance(model, MobileNet):
        paths = [f'features.{i}' for i, b in enumerate(model.features)
                 if isinstance(b, InvertedResidual) and b.residual]
    elif isinstance(model, KeypointNet):
        paths = [f'stage{s}.1' for s in (1, 2, 3)]
    else:
        raise ValueError(f'no variants for {type(model).__name__}')
    return paths[::-1]


def drop_blocks(model: nn.Module, count: int) -> nn.Module:
    """Replace the ``count`` deepest repeated blocks by the identity (in place)."""
    paths = droppable(model)
    if not 0 <= count <= len(paths):
        raise ValueError(f'can drop 0..{len(paths)} blocks, not {count}')
    for path in paths[:count]:
        parent, _, child = path.rpartition('.')
        setattr(_get(model, parent), child, nn.Identity())
    return model


def _chain_groups(model: nn.Module) -> tuple[list[Group], list]:
    """Walk a network's layers; return its channel groups and the head consumers."""
    groups: list[Group] = []
    if isinstance(model, ResNet18):
        current = Group([('stem.0', 'stem.1')], [], [])
        for i, block in enumerate(model.layers):
            if not isinstance(block, BasicBlock):
                continue
            p = f'layers.{i}'
            current.consumers.append((f'{p}.conv1', 0))
            groups.append(Group([(f'{p}.conv1', f'{p}.bn1')], [], [(f'{p}.conv2', 0)]))
            if block.down is not None:
                current.consumers.append((f'{p}.down.0', 0))
                groups.append(current)
                current = Group([(f'{p}.conv2', f'{p}.bn2'), (f'{p}.down.0', f'{p}.down.1')],
                                [], [])
            else:
                current.producers.append((f'{p}.conv2', f'{p}.bn2'))
        current.consumers.append(('fc', 0))
        groups.append(current)
        return groups, ['fc']
    if isinstance(model, MobileNet):
        current = Group([('features.0.0', 'features.0.1')], [], [])
        for i, block in enumerate(model.features):
            p = f'features.{i}'
            if isinstance(block, InvertedResidual):
                body = [f'{p}.body.{j}' for j in range(len(block.body))]
                if len(body) == 2:                       # expansion 1: depthwise on the input
                    current.passthrough.append((f'{body[0]}.0', f'{body[0]}.1'))
                    current.consumers.append((f'{body[1]}.0', 0))
                else:
                    current.consumers.append((f'{body[0]}.0', 0))
                    groups.append(Group([(f'{body[0]}.0', f'{body[0]}.1')],
                                        [(f'{body[1]}.0', f'{body[1]}.1')],
                                        [(f'{body[2]}.0', 0)]))
                out = (f'{body[-1]}.0', f'{body[-1]}.1')
                if block.residual:
                    current.producers.append(out)
                else:
                    groups.append(current)
                    current = Group([out], [], [])
            elif i > 0 and not isinstance(block, nn.Identity):   # the final 1x1 to 1280
                current.consumers.append((f'{p}.0', 0))
                groups.append(current)
                current = Group([(f'{p}.0', f'{p}.1')], [], [])
        current.consumers.append(('classifier', 0))
        groups.append(current)
        return groups, ['classifier']
    if isinstance(model, KeypointNet):
        chain = [f'stage{s}.{j}' for s in (1, 2, 3) for j in (0, 1)
                 if not isinstance(_get(model, f'stage{s}.{j}'), nn.Identity)]
        current, c2 = None, None
        for path in chain:
            if current is not None:
                current.consumers.append((f'{path}.0', 0))
                groups.append(current)
            current = Group([(f'{path}.0', f'{path}.1')], [], [])
            if path.startswith('stage2.'):
                c2 = current
        c2.consumers.append(('fuse.0', 0))
        current.consumers.append(('lateral.0', 0))
        groups.append(current)
        lateral = Group([('lateral.0', 'lateral.1')], [],
                        [('fuse.0', _get(model, c2.producers[0][0]).out_channels)])
        heads = ['heatmap', 'offset', 'box', 'objectness']
        fuse = Group([('fuse.0', 'fuse.1')], [], [(h, 0) for h in heads])
        groups = [g for g in groups if g is not c2] + [c2, lateral, fuse]
        return groups, heads
    raise ValueError(f'no variants for {type(model).__name__}')


def _rank(model: nn.Module, group: Group, keep: int) -> torch.Tensor:
    score = sum(_get(model, conv).weight.detach().abs().flatten(1).sum(1)
                for conv, _ in group.producers)
    return torch.sort(torch.topk(score, keep).indices).values


def _slice_out(conv: nn.Conv2d, bn: nn.BatchNorm2d, idx: torch.Tensor, depthwise: bool) -> None:
    conv.weight = nn.Parameter(conv.weight.detach()[idx].clone())
    if conv.bias is not None:
        conv.bias = nn.Parameter(conv.bias.detach()[idx].clone())
    conv.out_channels = len(idx)
    if depthwise:
        conv.in_channels = conv.groups = len(idx)
    for name in ('weight', 'bias'):
        setattr(bn, name, nn.Parameter(getattr(bn, name).detach()[idx].clone()))
    for name in ('running_mean', 'running_var'):
        setattr(bn, name, getattr(bn, name)[idx].clone())
    bn.num_features = len(idx)


def prune_width(model: nn.Module, width: float) -> nn.Module:
    """Keep ``width`` of every channel group's filters, ranked by L1 norm (in place)."""
    if not 0 < width <= 1:
        raise ValueError('width must be in (0, 1]')
    if width == 1:
        return model
    groups, _ = _chain_groups(model)
    plan = []
    for group in groups:
        size = _get(model, group.producers[0][0]).out_channels
        plan.append((group, size, _rank(model, group, max(1, round(size * width)))))
    # consumers first (their offsets refer to the unpruned layout), then producers
    inputs: dict[str, list] = {}
    for group, size, idx in plan:
        for path, offset in group.consumers:
            inputs.setdefault(path, []).append((offset, size, idx))
    for path, parts in inputs.items():
        layer = _get(model, path)
        weight = layer.weight.detach()
        keep = torch.cat([idx + offset for offset, _, idx in sorted(parts, key=lambda p: p[0])])
        covered = sum(size for _, size, _ in parts)
        if covered != weight.shape[1]:
            raise AssertionError(f'{path}: groups cover {covered} of {weight.shape[1]} inputs')
        layer.weight = nn.Parameter(weight[:, keep].clone())
        if isinstance(layer, nn.Conv2d):
            layer.in_channels = len(keep)
        else:
            layer.in_features = len(keep)
    for group, _, idx in plan:
        for conv, bn in group.producers:
            _slice_out(_get(model, conv), _get(model, bn), idx, depthwise=False)
        for conv, bn in group.passthrough:
            _slice_out(_get(model, conv), _get(model, bn), idx, depthwise=True)
    return model


def make(spec: VariantSpec, base: nn.Module) -> nn.Module:
    """Return the variant ``spec`` of ``base`` (a copy; ``base`` is unchanged)."""
    model = copy.deepcopy(base)
    drop_blocks(model, spec.drop)
    return prune_width(model, spec.width)


def build(spec: VariantSpec, classes: int = 10) -> nn.Module:
    """Return an untrained network with the structure of ``spec`` (to load a state dict into)."""
    return make(spec, base_model(spec.arch, classes)).eval()


def base_model(arch: str, classes: int = 10) -> nn.Module:
    """Return the zoo architecture with ``classes`` outputs (KeypointNet: one heatmap each)."""
    if arch not in ARCHITECTURES:
        raise ValueError(f'unknown architecture {arch!r}')
    key = 'keypoints' if arch == 'keypoint_net' else 'num_classes'
    return ARCHITECTURES[arch](**{key: classes})


def macs(model: nn.Module, shape: tuple) -> int:
    """Return the multiply-accumulates of one forward pass on an input of ``shape``."""
    total = [0]

    def hook(module, inputs, output):
        if isinstance(module, nn.Conv2d):
            k = module.weight[0].numel()
            total[0] += output.numel() * k
        elif isinstance(module, nn.Linear):
            total[0] += output.numel() * module.in_features

    handles = [m.register_forward_hook(hook) for m in model.modules()
               if isinstance(m, (nn.Conv2d, nn.Linear))]
    try:
        with torch.no_grad():
            model.eval()(torch.zeros(shape))
    finally:
        for h in handles:
            h.remove()
    return total[0]


def ladder(arch: str, shape: tuple, rungs: int = 4, classes: int = 10) -> list[VariantSpec]:
    """
    Return ``rungs`` variants whose MACs step down evenly from the full network.

    Targets are ``1, 1 - s, 1 - 2s, ...`` of the full count with the smallest at
    ``1 / rungs`` (``s = (1 - 1/rungs) / (rungs - 1)``); each rung is the candidate
    (width in :data:`WIDTHS`, none to all repeated blocks dropped in quarters) nearest its
    target, preferring,
    among candidates within 5 % of the target, one of a width already on the
    ladder (its depth variants share that rung's layers).
    """
    base = base_model(arch, classes)
    full = macs(base, shape)
    candidates = {}
    blocks = len(droppable(base))
    for width in WIDTHS:
        for drop in sorted({round(i * blocks / 4) for i in range(5)}):
            spec = VariantSpec(arch, width, drop)
            candidates[spec] = macs(make(spec, base), shape) / full
    chosen: list[VariantSpec] = []
    step = (1 - 1 / rungs) / max(1, rungs - 1)
    for k in range(rungs):
        target = 1 - k * step
        free = [s for s in candidates if s not in chosen]
        near = min(abs(candidates[s] - target) for s in free)
        close = [s for s in free if abs(candidates[s] - target) <= near + 0.05]
        widths = {s.width for s in chosen}
        chosen.append(min(close, key=lambda s: (s.width not in widths,
                                                abs(candidates[s] - target))))
    return chosen
