"""
Measure the variants' accuracy: train, prune, fine-tune, evaluate on one held-out split.

Data: scikit-learn's bundled handwritten digits (1797 8x8 images, 10
classes; shipped inside the ``scikit-learn`` wheel, nothing is downloaded),
upsampled to ``size`` x ``size``, three channels, split once into train and
held-out (stratified, fixed seed).  KeypointNet is trained as a detector of
the digit's class: the logit of class ``c`` is the peak of heatmap ``c``.

:func:`train_ladder` trains the full network, then makes each rung of the
ladder (:func:`rrto_ros.variants.ladder`): a width variant is pruned from the
trained network and fine-tuned whole; a depth variant starts from its width
parent and fine-tunes only its batch norms and output layers, so its
convolutions stay byte-identical to the parent's and are stored once.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from rrto_ros import variant_files, variants

CLASSES = 10
HEADS = {'resnet18': ('fc',), 'mobilenet': ('classifier',),
         'keypoint_net': ('heatmap', 'offset', 'box', 'objectness')}


def digits(size: int, seed: int = 0, held_out: float = 0.2) -> dict[str, torch.Tensor]:
    """Return the digits upsampled to ``size``: ``x_train, y_train, x_val, y_val``."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    data = load_digits()
    x = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
    x = F.interpolate(x, size=(size, size), mode='bilinear', align_corners=False)
    x = ((x - 0.5) / 0.5).expand(-1, 3, -1, -1).contiguous()
    y = torch.tensor(data.target, dtype=torch.long)
    train, val = train_test_split(range(len(y)), test_size=held_out, random_state=seed,
                                  stratify=data.target)
    return {'x_train': x[train], 'y_train': y[train], 'x_val': x[val], 'y_val': y[val]}


def logits(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Return the class scores of ``model`` for ``x`` (KeypointNet: each heatmap's peak)."""
    out = model(x)
    if isinstance(out, dict):
        return torch.logit(out['heatmaps'].amax(dim=(2, 3)), eps=1e-6)
    return out


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int = 512) -> float:
    """Return top-1 accuracy of ``model`` (eval mode) on ``x, y``."""
    model.eval()
    device = next(model.parameters()).device
    correct = 0
    with torch.no_grad():
        for i in range(0, len(y), batch):
            pred = logits(model, x[i:i + batch].to(device)).argmax(1)
            correct += int((pred.cpu() == y[i:i + batch]).sum())
    return correct / len(y)


def fit(model: nn.Module, data: dict, steps: int, lr: float = 2e-3, batch: int = 128,
        trainable: list[nn.Parameter] | None = None, seed: int = 0) -> nn.Module:
    """Train ``model`` for ``steps`` minibatches (random shifts of up to 1/8 of the size)."""
    device = next(model.parameters()).device
    params = list(model.parameters()) if trainable is None else trainable
    frozen = {id(p) for p in model.parameters()} - {id(p) for p in params}
    for p in model.parameters():
        p.requires_grad_(id(p) not in frozen)
    optimiser = torch.optim.AdamW(params, lr=lr, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimiser, lr, total_steps=max(1, steps))
    x, y = data['x_train'].to(device), data['y_train'].to(device)
    generator = torch.Generator().manual_seed(seed)
    shift = max(1, x.shape[-1] // 8)
    model.train()
    for _ in range(steps):
        idx = torch.randint(len(y), (min(batch, len(y)),), generator=generator).to(device)
        dy, dx = torch.randint(-shift, shift + 1, (2,), generator=generator).tolist()
        xb = torch.roll(x[idx], shifts=(dy, dx), dims=(2, 3))
        loss = F.cross_entropy(logits(model, xb), y[idx])
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
        schedule.step()
    for p in model.parameters():
        p.requires_grad_(True)
    return model.eval()


def _norms_and_heads(model: nn.Module, arch: str) -> list[nn.Parameter]:
    """Return the parameters a depth variant fine-tunes: batch norms and output layers."""
    params = [p for m in model.modules() if isinstance(m, nn.BatchNorm2d)
              for p in m.parameters()]
    for head in HEADS[arch]:
        params += list(model.get_submodule(head).parameters())
    return params


def train_ladder(arch: str, size: int, out_dir: str | Path, steps: int, finetune_steps: int,
                 rungs: int = 4, device: str = 'cpu', seed: int = 0, zoom: int = 1) -> list[dict]:
    """
    Train ``arch``, make its ladder, fine-tune and evaluate every rung; save variant files.

    The networks see the digits at ``size * zoom`` (:class:`rrto_ros.variants.Zoomed`:
    frames travel at ``size``).  Returns one dict per rung: ``name, arch, width,
    drop, accuracy, macs, file, params, train_s``.  Every rung's accuracy is measured
    on the same held-out split.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    data = digits(size, seed)
    shape = (1, 3, size * zoom, size * zoom)

    def tune(net, count, lr, trainable=None, offset=0):
        fit(variants.zoomed(net.to(device), zoom), data, count, lr=lr, trainable=trainable,
            seed=seed + offset)
        return net

    start = time.perf_counter()
    base = tune(variants.base_model(arch, CLASSES), steps, 2e-3)
    base_s = time.perf_counter() - start
    trained = {variants.VariantSpec(arch): base}
    rows = []
    for spec in variants.ladder(arch, shape, rungs, CLASSES):
        start = time.perf_counter()
        parent = spec.parent()
        if parent not in trained:
            trained[parent] = tune(variants.make(parent, base.cpu()), finetune_steps, 1e-3,
                                   offset=1)
        if spec.drop:
            model = variants.make(variants.VariantSpec(arch, 1.0, spec.drop),
                                  trained[parent].cpu())
            model = tune(model, 2 * finetune_steps, 3e-3, _norms_and_heads(model, arch),
                         offset=2)
        else:
            model = trained[parent]
        acc = accuracy(variants.zoomed(model.to(device), zoom), data['x_val'], data['y_val'])
        path = variant_files.save(out_dir / f'{spec.name}{variant_files.SUFFIX}', spec,
                                  model.cpu(), CLASSES, acc, zoom)
        rows.append({'name': spec.name, 'arch': arch, 'width': spec.width, 'drop': spec.drop,
                     'zoom': zoom, 'accuracy': acc, 'macs': variants.macs(model, shape),
                     'params': sum(p.numel() for p in model.parameters()), 'file': str(path),
                     'train_s': time.perf_counter() - start + (base_s if not rows else 0.0)})
    return rows
