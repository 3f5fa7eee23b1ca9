"""
A built-in two-stage detector shaped like torchvision's R-CNNs, branches on sizes included.

:func:`rcnn` proposes boxes (objectness threshold by boolean mask, top-k of a
data-dependent size), suppresses overlaps with :func:`batched_nms`, runs a
box head on the survivors' pooled features, thresholds and suppresses again,
and runs a keypoint head on the detections' features.  :func:`batched_nms`
has the shape of torchvision's: Python branches on the number of boxes (none
at all; more than 4000 coordinates: class by class), which dynamo cannot
keep inside a graph, so the three heavy stages are three captured graphs
whose sizes depend on the data, as in Keypoint R-CNN: the case chained
programs exist for (:mod:`rrto_ros.partition_chain`).  The suppression
itself is matrix NMS (a box is dropped if a higher-scoring one of its class
overlaps it), written in torch without loops.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from rrto_ros.zoo import _anchors, _conv_bn, _decode, _pooled, box_iou, initialise


def batched_nms(boxes: torch.Tensor, scores: torch.Tensor, labels: torch.Tensor,
                iou_threshold: float, classes: int, vanilla_above: int = 4000) -> torch.Tensor:
    """Return the indices kept by per-class matrix NMS, highest score first."""
    if boxes.numel() == 0:
        return torch.zeros(0, dtype=torch.int64, device=boxes.device)
    if boxes.numel() > vanilla_above:   # many boxes: class by class (torchvision's on a CPU)
        return _batched_nms_vanilla(torch.zeros_like(scores, dtype=torch.bool), boxes, scores,
                                    labels, iou_threshold)
    # one class never suppresses another: move each class's boxes apart
    shifted = boxes + (labels.to(boxes) * (boxes.max() + 1))[:, None]
    return _matrix_nms(shifted, scores, iou_threshold)


def _batched_nms_vanilla(keep_mask: torch.Tensor, boxes: torch.Tensor, scores: torch.Tensor,
                         labels: torch.Tensor, iou_threshold: float) -> torch.Tensor:
    # torchvision's: a mask of zeros that the loop over the classes writes True into.  Dynamo
    # cannot keep the loop in a graph (its length is data-dependent): it runs eagerly and
    # writes into the mask, which a graph made (Keypoint R-CNN's proposals: more than 4000
    # coordinates on a CPU).  torchvision makes the mask in this function; here the caller
    # makes it, so that every torch version compiles it into the graph before the loop
    for c in torch.unique(labels):
        curr = torch.where(labels == c)[0]
        keep_mask[curr[_matrix_nms(boxes[curr], scores[curr], iou_threshold)]] = True
    keep = torch.where(keep_mask)[0]
    return keep[scores[keep].sort(descending=True, stable=True).indices]


def _matrix_nms(boxes: torch.Tensor, scores: torch.Tensor, iou_threshold: float):
    order = scores.sort(descending=True, stable=True).indices
    ordered = boxes[order]
    n = ordered.shape[0]
    earlier = torch.arange(n)[:, None] < torch.arange(n)[None, :]
    suppressed = torch.logical_and(box_iou(ordered, ordered) > iou_threshold, earlier).any(0)
    return order[~suppressed]


class RCNN(nn.Module):
    """Proposals, a box head on the survivors, a keypoint head on the detections."""

    def __init__(self, classes: int = 4, keypoints: int = 5, width: int = 16,
                 rpn_thresh: float = 0.5, pre_nms: int = 150, post_nms: int = 40,
                 score_thresh: float = 0.35, detections: int = 12, vanilla_above: int = 4000):
        super().__init__()
        w = width
        self.backbone = nn.Sequential(_conv_bn(3, w, 3, 2), _conv_bn(w, 2 * w, 3, 2),
                                      _conv_bn(2 * w, 4 * w, 3, 2), _conv_bn(4 * w, 4 * w, 3))
        self.down = _conv_bn(4 * w, 4 * w, 3, 2)
        self.sizes, self.classes = (16.0, 32.0), classes
        self.objectness = nn.ModuleList(nn.Conv2d(4 * w, 3, 3, padding=1) for _ in range(2))
        self.deltas = nn.ModuleList(nn.Conv2d(4 * w, 12, 3, padding=1) for _ in range(2))
        self.box_head = nn.Sequential(nn.Flatten(), nn.Linear(4 * w * 49, 128), nn.ReLU(),
                                      nn.Linear(128, classes + 4))
        # no batch norm on a batch of data-dependent size (dynamo would not capture it)
        self.keypoint_head = nn.Sequential(*(layer for _ in range(3) for layer in (
            nn.Conv2d(4 * w, 4 * w, 3, padding=1), nn.ReLU())), nn.Conv2d(4 * w, keypoints, 1))
        self.rpn_thresh, self.pre_nms, self.post_nms = rpn_thresh, pre_nms, post_nms
        self.score_thresh, self.detections = score_thresh, detections
        self.vanilla_above = vanilla_above      # NMS class by class above (coordinates)

    def forward(self, images: torch.Tensor) -> list[dict[str, torch.Tensor]]:
        p3 = self.backbone(images)
        levels = [p3, self.down(p3)]
        objectness, deltas, anchors = [], [], []
        for level, feature in enumerate(levels):
            n, _, h, w = feature.shape
            objectness.append(self.objectness[level](feature).permute(0, 2, 3, 1).reshape(n, -1))
            deltas.append(self.deltas[level](feature).permute(0, 2, 3, 1).reshape(n, -1, 4))
            anchors.append(_anchors(h, w, images.shape[-1] / w, self.sizes[level]))
        boxes = _decode(torch.cat(deltas, 1), torch.cat(anchors), images.shape[-2:])
        scores = torch.sigmoid(torch.cat(objectness, 1))
        strides = [images.shape[-1] / f.shape[-1] for f in levels]
        return [self._detect([f[i:i + 1] for f in levels], self.proposal_boxes(boxes[i]),
                             scores[i], strides) for i in range(len(images))]

    def proposal_boxes(self, boxes: torch.Tensor) -> torch.Tensor:
        """Return one image's decoded boxes as the proposals see them (a subclass's hook)."""
        return boxes

    def _detect(self, features, boxes, objectness, strides) -> dict[str, torch.Tensor]:
        candidates = torch.nonzero(objectness > self.rpn_thresh).squeeze(1)
        top = objectness[candidates].topk(min(self.pre_nms, len(candidates)))
        proposals = boxes[candidates[top.indices]]
        keep = batched_nms(proposals, top.values, torch.zeros_like(top.indices), 0.7,
                           self.classes, self.vanilla_above)[:self.post_nms]
        proposals = proposals[keep]
        out = self.box_head(_pooled(features, proposals, strides, self.sizes))
        scores, labels = torch.softmax(out[:, :self.classes], 1).max(1)
        boxes = proposals + out[:, self.classes:] * 4.0
        final = torch.nonzero(scores > self.score_thresh).squeeze(1)
        boxes, scores, labels = boxes[final], scores[final], labels[final]
        keep = batched_nms(boxes, scores, labels, 0.5, self.classes,
                           self.vanilla_above)[:self.detections]
        boxes, scores, labels = boxes[keep], scores[keep], labels[keep]
        heatmaps = self.keypoint_head(_pooled(features, boxes, strides, self.sizes))
        return {'boxes': boxes, 'scores': scores, 'labels': labels, 'keypoints': heatmaps}


def rcnn(classes: int = 4, keypoints: int = 5, width: int = 16, seed: int = 0,
         vanilla_above: int = 4000) -> RCNN:
    """Return the R-CNN-shaped detector in eval mode with deterministic random weights."""
    return initialise(RCNN(classes, keypoints, width, vanilla_above=vanilla_above), seed)
