"""Box geometry: (N, 4) float32 x0, y0, x1, y1 in pixels of the original image; H, W order for sizes."""

from __future__ import annotations

import numpy as np
import torch


def as_boxes(boxes: np.ndarray | list) -> np.ndarray:
    """Return `boxes` as a (N, 4) float32 array, raising on any other shape."""
    arr = np.asarray(boxes, dtype=np.float32)
    if arr.ndim == 1 and arr.size == 4:
        arr = arr[None]
    if arr.ndim != 2 or arr.shape[1] != 4:
        raise ValueError(f"boxes must have shape (N, 4), got {arr.shape}")
    return arr


def xyxy_to_xywh(boxes: np.ndarray) -> np.ndarray:
    """x0, y0, x1, y1 -> x0, y0, width, height."""
    b = as_boxes(boxes)
    return np.stack([b[:, 0], b[:, 1], b[:, 2] - b[:, 0], b[:, 3] - b[:, 1]], axis=1)


def xywh_to_xyxy(boxes: np.ndarray) -> np.ndarray:
    """x0, y0, width, height -> x0, y0, x1, y1."""
    b = as_boxes(boxes)
    return np.stack([b[:, 0], b[:, 1], b[:, 0] + b[:, 2], b[:, 1] + b[:, 3]], axis=1)


def xyxy_to_cxcywh(boxes: np.ndarray) -> np.ndarray:
    """x0, y0, x1, y1 -> centre x, centre y, width, height."""
    b = as_boxes(boxes)
    return np.stack([(b[:, 0] + b[:, 2]) / 2, (b[:, 1] + b[:, 3]) / 2, b[:, 2] - b[:, 0], b[:, 3] - b[:, 1]], axis=1)


def cxcywh_to_xyxy(boxes: np.ndarray) -> np.ndarray:
    """Centre x, centre y, width, height -> x0, y0, x1, y1."""
    b = as_boxes(boxes)
    hw, hh = b[:, 2] / 2, b[:, 3] / 2
    return np.stack([b[:, 0] - hw, b[:, 1] - hh, b[:, 0] + hw, b[:, 1] + hh], axis=1)


def scale_boxes(boxes: np.ndarray, scale: float | np.ndarray) -> np.ndarray:
    """Multiply coordinates by `scale` (e.g. resized pixels -> original pixels with scale = 1 / resize factor)."""
    return as_boxes(boxes) * np.float32(scale)


def clip_boxes(boxes: np.ndarray, height: int, width: int) -> np.ndarray:
    """Clip boxes to an image of `height` x `width` pixels."""
    b = as_boxes(boxes).copy()
    b[:, [0, 2]] = b[:, [0, 2]].clip(0, width)
    b[:, [1, 3]] = b[:, [1, 3]].clip(0, height)
    return b


def box_area(boxes: np.ndarray) -> np.ndarray:
    """Area of each box; degenerate boxes have area 0."""
    b = as_boxes(boxes)
    return (b[:, 2] - b[:, 0]).clip(0) * (b[:, 3] - b[:, 1]).clip(0)


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(N, M) intersection over union of two box sets (0 where the union is empty)."""
    a, b = as_boxes(a), as_boxes(b)
    lt = np.maximum(a[:, None, :2], b[None, :, :2])  # (N, M, 2)
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])  # (N, M, 2)
    wh = (rb - lt).clip(0)
    inter = wh[..., 0] * wh[..., 1]
    union = box_area(a)[:, None] + box_area(b)[None, :] - inter
    return np.where(union > 0, inter / np.maximum(union, 1e-12), 0.0).astype(np.float32)


def feature_window_to_boxes(
    rows: torch.Tensor, cols: torch.Tensor, win_h: torch.Tensor, win_w: torch.Tensor, stride: float
) -> torch.Tensor:
    """Boxes in input pixels of same-padded correlation windows at output cells (rows, cols).

    A query of win_h x win_w pixels has a kernel of kh = ceil(win_h / stride) by kw cells, and output cell (r, c)
    of `roiqa.ops.xcorr.cosine_xcorr` is the window whose top-left cell is (r - kh // 2, c - kw // 2). The query's
    pixels fill its kernel from the top-left, so the box starts at that cell's top-left corner, stride * (c - kw //
    2), and spans win_w x win_h pixels. Returns (N, 4) float32 x0, y0, x1, y1.
    """
    kh = torch.ceil(win_h.float() / stride)
    kw = torch.ceil(win_w.float() / stride)
    x0 = (cols.float() - torch.div(kw, 2, rounding_mode="floor")) * stride
    y0 = (rows.float() - torch.div(kh, 2, rounding_mode="floor")) * stride
    return torch.stack([x0, y0, x0 + win_w.float(), y0 + win_h.float()], dim=1)
