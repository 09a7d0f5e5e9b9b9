"""Heatmap overlays: the fused heatmap in colour over the image, with the predicted box."""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw

# A perceptually ordered blue -> cyan -> yellow -> red ramp (anchor colours of a jet-like map).
_ANCHORS = np.array([[0, 0, 128], [0, 64, 255], [0, 224, 255], [255, 255, 0], [255, 96, 0], [160, 0, 0]], np.float32)


def colorize(heatmap: np.ndarray) -> np.ndarray:
    """(H, W) float map -> (H, W, 3) uint8 colours after min-max normalisation."""
    h = heatmap.astype(np.float32)
    lo, hi = float(np.nanmin(h)), float(np.nanmax(h))
    t = (h - lo) / (hi - lo) if hi > lo else np.zeros_like(h)
    pos = t * (len(_ANCHORS) - 1)
    i = np.clip(pos.astype(np.int64), 0, len(_ANCHORS) - 2)
    f = (pos - i)[..., None]
    return (_ANCHORS[i] * (1 - f) + _ANCHORS[i + 1] * f).astype(np.uint8)


def overlay(
    image: np.ndarray,
    heatmap: np.ndarray,
    box: np.ndarray | None = None,
    true_box: np.ndarray | None = None,
    long_side: int = 384,
    alpha: float = 0.45,
) -> np.ndarray:
    """Blend the colourised `heatmap` (covering the whole `image`) over the image and draw boxes.

    image: (H, W, 3) uint8; heatmap: (h, w) covering the same extent; box / true_box: (4,) x0, y0, x1, y1 in image
    pixels (predicted in white, true in green). The result is resized so its long side is `long_side`.
    """
    h, w = image.shape[:2]
    s = long_side / max(h, w)
    size = (max(1, round(w * s)), max(1, round(h * s)))
    base = Image.fromarray(image).resize(size, Image.BILINEAR)
    heat = Image.fromarray(colorize(heatmap)).resize(size, Image.BILINEAR)
    out = Image.blend(base, heat, alpha)
    draw = ImageDraw.Draw(out)
    for b, colour in ((true_box, (0, 255, 0)), (box, (255, 255, 255))):
        if b is not None and np.all(np.isfinite(b)):
            draw.rectangle([float(v) * s for v in b], outline=colour, width=2)
    return np.asarray(out)
