"""
Built-in perception models, defined here so nothing depends on torchvision.

* :func:`resnet18`: ResNet-18 (basic blocks, 11.7 M parameters), classification.
* :func:`mobilenet`: MobileNetV2-style inverted residuals with depthwise convs.
* :func:`keypoint_net`: a small pose/detection network with a dict of outputs
  (keypoint heatmaps, offsets, box regression, objectness), using upsampling
  and channel concatenation like real keypoint heads.
* :func:`detector`: a two-stage object detector ending, like SSD, RetinaNet or
  Faster R-CNN, in data-dependent post-processing written in torch (score
  threshold by boolean mask, top-k of a data-dependent size, class-wise NMS),
  with a box-refinement head on the surviving boxes; returns one dict of
  variable-length ``boxes``, ``scores``, ``labels`` per image.  It cannot be
  exported whole; :mod:`rrto_ros.partition` offloads its tensor programs.

Weights are random but deterministic (seeded), and batch-norm statistics are
randomised so outputs are not trivially zero; the models exist to measure
offloading, not to recognise anything.  Each factory is usable as a ROS
parameter value, e.g. ``python:rrto_ros.zoo:resnet18``.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


def _conv_bn(cin: int, cout: int, k: int, stride: int = 1, groups: int = 1, act: bool = True):
    layers = [
        nn.Conv2d(
            cin,
            cout,
            k,
            stride,
            k // 2,
            groups=groups,
            bias=False),
        nn.BatchNorm2d(cout)]
    if act:
        layers.append(nn.ReLU6(inplace=False) if groups > 1 or k == 1 else nn.ReLU())
    return nn.Sequential(*layers)


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.down = None
        if stride != 1 or cin != cout:
            self.down = nn.Sequential(
                nn.Conv2d(
                    cin,
                    cout,
                    1,
                    stride,
                    bias=False),
                nn.BatchNorm2d(cout))

    def forward(self, x):
        y = F.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return F.relu(y + (x if self.down is None else self.down(x)))


class ResNet18(nn.Module):
    def __init__(self, num_classes: int = 1000):
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(
                3,
                64,
                7,
                2,
                3,
                bias=False),
            nn.BatchNorm2d(64),
            nn.ReLU(),
            nn.MaxPool2d(
                3,
                2,
                1))
        blocks, cin = [], 64
        for cout, stride in [(64, 1), (64, 1), (128, 2), (128, 1),
                             (256, 2), (256, 1), (512, 2), (512, 1)]:
            blocks.append(BasicBlock(cin, cout, stride))
            cin = cout
        self.layers = nn.Sequential(*blocks)
        self.fc = nn.Linear(512, num_classes)

    def forward(self, x):
        x = self.layers(self.stem(x))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


class InvertedResidual(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, expand: int):
        super().__init__()
        hidden = cin * expand
        layers = [] if expand == 1 else [_conv_bn(cin, hidden, 1)]
        layers += [_conv_bn(hidden, hidden, 3, stride, groups=hidden),
                   _conv_bn(hidden, cout, 1, act=False)]
        self.body = nn.Sequential(*layers)
        self.residual = stride == 1 and cin == cout

    def forward(self, x):
        return x + self.body(x) if self.residual else self.body(x)


class MobileNet(nn.Module):
    # (expansion, channels, repeats, stride) as in MobileNetV2, width 1.0
    SETTINGS = [(1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1),
                (6, 160, 3, 2), (6, 320, 1, 1)]

    def __init__(self, num_classes: int = 1000):
        super().__init__()
        layers, cin = [_conv_bn(3, 32, 3, 2)], 32
        for expand, cout, repeats, stride in self.SETTINGS:
            for i in range(repeats):
                layers.append(InvertedResidual(cin, cout, stride if i == 0 else 1, expand))
                cin = cout
        layers.append(_conv_bn(cin, 1280, 1))
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(1280, num_classes)

    def forward(self, x):
        x = F.adaptive_avg_pool2d(self.features(x), 1)
        return self.classifier(torch.flatten(x, 1))


class KeypointNet(nn.Module):
    """Stride-4 heads over a small FPN-like backbone; returns a dict of maps."""

    def __init__(self, keypoints: int = 17, width: int = 32):
        super().__init__()
        w = width
        self.stage1 = nn.Sequential(_conv_bn(3, w, 3, 2), _conv_bn(w, w, 3))            # /2
        self.stage2 = nn.Sequential(_conv_bn(w, 2 * w, 3, 2), _conv_bn(2 * w, 2 * w, 3))  # /4
        self.stage3 = nn.Sequential(_conv_bn(2 * w, 4 * w, 3, 2), _conv_bn(4 * w, 4 * w, 3))  # /8
        self.lateral = _conv_bn(4 * w, 2 * w, 1)
        self.fuse = _conv_bn(4 * w, 2 * w, 3)
        self.heatmap = nn.Conv2d(2 * w, keypoints, 1)
        self.offset = nn.Conv2d(2 * w, 2 * keypoints, 1)
        self.box = nn.Conv2d(2 * w, 4, 1)
        self.objectness = nn.Conv2d(2 * w, 1, 1)

    def forward(self, x):
        c2 = self.stage2(self.stage1(x))
        c3 = self.stage3(c2)
        up = F.interpolate(self.lateral(c3), scale_factor=2.0, mode='nearest')
        p2 = self.fuse(torch.cat([c2, up], dim=1))
        return {'heatmaps': torch.sigmoid(self.heatmap(p2)), 'offsets': self.offset(p2),
                'boxes': F.relu(self.box(p2)),
                'score': torch.sigmoid(F.adaptive_max_pool2d(self.objectness(p2), 1)).flatten(1)}


def box_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Return the IoU matrix of two sets of ``x1, y1, x2, y2`` boxes."""
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    low = torch.maximum(a[:, None, :2], b[None, :, :2])
    high = torch.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = (high - low).clamp(min=0).prod(dim=2)
    return inter / (area_a[:, None] + area_b[None, :] - inter)


def batched_nms(boxes: torch.Tensor, scores: torch.Tensor, labels: torch.Tensor,
                iou_threshold: float) -> torch.Tensor:
    """Return the indices kept by greedy per-class NMS, highest score first."""
    if boxes.numel() == 0:
        return torch.zeros(0, dtype=torch.int64)
    # one class never suppresses another: move each class's boxes apart
    shifted = boxes + (labels.to(boxes) * (boxes.max() + 1))[:, None]
    order = scores.argsort(descending=True, stable=True)
    overlap = box_iou(shifted[order], shifted[order]) > iou_threshold
    suppressed = torch.zeros(len(order), dtype=torch.bool)
    keep = []
    for i in range(len(order)):
        if not suppressed[i]:
            keep.append(i)
            suppressed |= overlap[i]
    return order[torch.tensor(keep, dtype=torch.int64)]


class Detector(nn.Module):
    """
    SSD-style dense head at strides 8 and 16, then a refinement head on the NMS survivors.

    Stage 1 (backbone and dense head) is a static tensor program; thresholds,
    top-k and NMS follow, depending on the data.  Stage 2 pools each survivor's
    features from the map its size belongs to, as torchvision's
    ``MultiScaleRoIAlign`` does (``torch.where`` per level, results written by
    index), then runs a two-layer MLP and a final score threshold.
    """

    def __init__(self, classes: int = 8, width: int = 32, score_thresh: float = 0.3,
                 pre_nms: int = 200, iou_threshold: float = 0.5, max_detections: int = 50):
        super().__init__()
        w = width
        self.backbone = nn.Sequential(_conv_bn(3, w, 3, 2), _conv_bn(w, 2 * w, 3, 2),
                                      _conv_bn(2 * w, 2 * w, 3), _conv_bn(2 * w, 4 * w, 3, 2),
                                      _conv_bn(4 * w, 4 * w, 3))
        self.down = _conv_bn(4 * w, 4 * w, 3, 2)
        self.sizes, self.classes = (16.0, 32.0), classes
        self.cls = nn.ModuleList(nn.Conv2d(4 * w, 3 * classes, 3, padding=1) for _ in range(2))
        self.reg = nn.ModuleList(nn.Conv2d(4 * w, 3 * 4, 3, padding=1) for _ in range(2))
        self.refine = nn.Sequential(nn.Flatten(), nn.Linear(4 * w * 49, 256), nn.ReLU(),
                                    nn.Linear(256, classes + 4))
        self.score_thresh, self.pre_nms = score_thresh, pre_nms
        self.iou_threshold, self.max_detections = iou_threshold, max_detections

    def forward(self, images: torch.Tensor) -> list[dict[str, torch.Tensor]]:
        p3 = self.backbone(images)
        levels = [p3, self.down(p3)]
        logits, deltas, anchors = [], [], []
        for level, feature in enumerate(levels):
            n, _, h, w = feature.shape
            scores = self.cls[level](feature).permute(0, 2, 3, 1)
            logits.append(scores.reshape(n, -1, self.classes))
            deltas.append(self.reg[level](feature).permute(0, 2, 3, 1).reshape(n, -1, 4))
            anchors.append(_anchors(h, w, images.shape[-1] / w, self.sizes[level]))
        boxes = _decode(torch.cat(deltas, 1), torch.cat(anchors), images.shape[-2:])
        scores = torch.sigmoid(torch.cat(logits, 1))
        strides = [images.shape[-1] / f.shape[-1] for f in levels]
        return [self._detect([f[i:i + 1] for f in levels], boxes[i], scores[i], strides)
                for i in range(len(images))]

    def _detect(self, features, boxes, scores, strides) -> dict[str, torch.Tensor]:
        flat = scores.flatten()
        candidates = torch.nonzero(flat > self.score_thresh).squeeze(1)
        top = flat[candidates].topk(min(self.pre_nms, len(candidates)))
        index = candidates[top.indices]
        boxes, labels = boxes[index // self.classes], index % self.classes
        keep = batched_nms(boxes, top.values, labels, self.iou_threshold)[:self.max_detections]
        boxes, labels = boxes[keep], labels[keep]
        refined = self.refine(_pooled(features, boxes, strides, self.sizes))
        scores = torch.sigmoid(refined.gather(1, labels[:, None]).squeeze(1))
        boxes = boxes + refined[:, self.classes:] * 4.0
        final = scores > self.score_thresh
        return {'boxes': boxes[final], 'scores': scores[final], 'labels': labels[final]}


def _anchors(h: int, w: int, stride: float, size: float) -> torch.Tensor:
    ys, xs = torch.meshgrid(torch.arange(h), torch.arange(w), indexing='ij')
    centres = (torch.stack([xs, ys], -1).reshape(-1, 1, 2).float() + 0.5) * stride
    half = torch.tensor([[1.0, 1.0], [1.4, 0.7], [0.7, 1.4]]) * size / 2
    return torch.cat([centres - half, centres + half], -1).reshape(-1, 4)


def _decode(deltas: torch.Tensor, anchors: torch.Tensor, size) -> torch.Tensor:
    wh = anchors[:, 2:] - anchors[:, :2]
    centre = anchors[:, :2] + wh / 2 + deltas[..., :2] * wh * 0.1
    half = wh * torch.exp(deltas[..., 2:].clamp(max=4.0) * 0.2) / 2
    limit = torch.tensor([size[1], size[0]], dtype=deltas.dtype)
    return torch.cat([(centre - half).clamp(min=0), torch.minimum(centre + half, limit)], -1)


def _pooled(features: list, boxes: torch.Tensor, strides: list, sizes: tuple) -> torch.Tensor:
    """Pool each box from the level whose anchor size is nearest its own (by where, per level)."""
    side = ((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])).clamp(min=0).sqrt()
    level = (side > (sizes[0] * sizes[1]) ** 0.5).long()
    pooled = features[0].new_zeros(len(boxes), features[0].shape[1], 7, 7)
    for k, (feature, stride) in enumerate(zip(features, strides)):
        index = torch.where(level == k)[0]
        pooled[index] = _box_features(feature, boxes[index] / stride)
    return pooled


def _box_features(feature: torch.Tensor, boxes: torch.Tensor, size: int = 7) -> torch.Tensor:
    """Sample a ``size`` x ``size`` grid of features inside each box (RoIAlign-like)."""
    _, _, h, w = feature.shape
    steps = (torch.arange(size, dtype=feature.dtype) + 0.5) / size
    xs = boxes[:, 0:1] + (boxes[:, 2:3] - boxes[:, 0:1]) * steps
    ys = boxes[:, 1:2] + (boxes[:, 3:4] - boxes[:, 1:2]) * steps
    grid = torch.stack([xs[:, None, :].expand(-1, size, -1),
                        ys[:, :, None].expand(-1, -1, size)], -1)
    grid = grid / torch.tensor([w, h], dtype=feature.dtype) * 2 - 1
    return F.grid_sample(feature.expand(len(boxes), -1, -1, -1), grid, align_corners=False)


def initialise(model: nn.Module, seed: int) -> nn.Module:
    """Give every layer seeded He-normal weights and non-trivial batch-norm statistics."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (nn.Conv2d, nn.Linear)):
                fan_in = module.weight[0].numel()
                module.weight.normal_(0.0, (2.0 / fan_in) ** 0.5, generator=generator)
                if module.bias is not None:
                    module.bias.uniform_(-0.1, 0.1, generator=generator)
            elif isinstance(module, nn.BatchNorm2d):
                module.weight.uniform_(0.5, 1.5, generator=generator)
                module.bias.uniform_(-0.1, 0.1, generator=generator)
                module.running_mean.uniform_(-0.1, 0.1, generator=generator)
                module.running_var.uniform_(0.5, 1.5, generator=generator)
    return model.eval()


def resnet18(num_classes: int = 1000, seed: int = 0) -> ResNet18:
    """Return a ResNet-18 in eval mode with deterministic random weights."""
    return initialise(ResNet18(num_classes), seed)


def mobilenet(num_classes: int = 1000, seed: int = 0) -> MobileNet:
    """Return a MobileNetV2-style network in eval mode with deterministic random weights."""
    return initialise(MobileNet(num_classes), seed)


def keypoint_net(keypoints: int = 17, width: int = 32, seed: int = 0) -> KeypointNet:
    """Return the keypoint/detection network in eval mode with deterministic random weights."""
    return initialise(KeypointNet(keypoints, width), seed)


def detector(classes: int = 8, width: int = 32, seed: int = 0) -> Detector:
    """Return the two-stage detector in eval mode with deterministic random weights."""
    return initialise(Detector(classes, width), seed)


# models that export whole (one remote program per input signature)
ARCHITECTURES = {'resnet18': resnet18, 'mobilenet': mobilenet, 'keypoint_net': keypoint_net}
# models with data-dependent post-processing (partitioned: see rrto_ros.partition)
DETECTORS = {'detector': detector}
