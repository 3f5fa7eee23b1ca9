"""
Built-in perception models, defined here so nothing depends on torchvision.

* :func:`resnet18`: ResNet-18 (basic blocks, 11.7 M parameters), classification.
* :func:`mobilenet`: MobileNetV2-style inverted residuals with depthwise convs.
* :func:`keypoint_net`: a small pose/detection network with a dict of outputs
  (keypoint heatmaps, offsets, box regression, objectness), using upsampling
  and channel concatenation like real keypoint heads.

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


def _initialise(model: nn.Module, seed: int) -> nn.Module:
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
    return _initialise(ResNet18(num_classes), seed)


def mobilenet(num_classes: int = 1000, seed: int = 0) -> MobileNet:
    """Return a MobileNetV2-style network in eval mode with deterministic random weights."""
    return _initialise(MobileNet(num_classes), seed)


def keypoint_net(keypoints: int = 17, width: int = 32, seed: int = 0) -> KeypointNet:
    """Return the keypoint/detection network in eval mode with deterministic random weights."""
    return _initialise(KeypointNet(keypoints, width), seed)


ARCHITECTURES = {'resnet18': resnet18, 'mobilenet': mobilenet, 'keypoint_net': keypoint_net}
