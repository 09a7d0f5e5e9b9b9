"""Heatmap peaks: local maxima, top-K, and non-maximum suppression of their boxes."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torchvision.ops import nms


def local_maxima(heatmap: torch.Tensor, k: int, window: int = 3) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The k highest local maxima of a (H, W) heatmap: (values (k,), rows (k,), cols (k,)), best first.

    A cell is a local maximum when it equals the max over its window x window neighbourhood. Fewer than k are
    returned when the map has fewer maxima.
    """
    h, w = heatmap.shape
    pooled = F.max_pool2d(heatmap[None, None], window, stride=1, padding=window // 2)[0, 0]
    is_max = heatmap >= pooled
    vals = torch.where(is_max, heatmap, torch.full_like(heatmap, float("-inf"))).reshape(-1)
    n = int(min(k, int(is_max.sum())))
    top = torch.topk(vals, n)
    return top.values, top.indices // w, top.indices % w


def nms_peaks(boxes: torch.Tensor, scores: torch.Tensor, iou: float, k: int) -> torch.Tensor:
    """Indices of at most k boxes kept by torchvision NMS, best first."""
    keep = nms(boxes.float(), scores.float(), iou)
    return keep[:k]
