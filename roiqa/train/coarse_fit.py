"""Fitting the coarse stage's regional whitening on training photographs (the shipped checkpoint's only fit)."""

from __future__ import annotations

import numpy as np
import torch

from roiqa.io.imageio import resize_long_side
from roiqa.models.matcher import Matcher


@torch.no_grad()
def regional_sample(model: Matcher, photos: list[np.ndarray], image_size: int) -> torch.Tensor:
    """Every regional descriptor (before whitening) of (H, W, 3) uint8 `photos` resized to `image_size`, flipped
    copies included."""
    out = []
    for photo in photos:
        img, _ = resize_long_side(photo, image_size)
        for view in (img, img[:, ::-1]):
            view = np.ascontiguousarray(view)
            feats = model.pyramid(view[None])
            out.append(model.regional_descriptors(feats, np.array([view.shape[:2]]), whiten=False)[0][0])
    return torch.cat(out)


def fit_coarse(model: Matcher, photos: list[np.ndarray], image_size: int = 512, shrink: float = 0.1) -> int:
    """Fit `model.whitening` on the regional descriptors of `photos`; returns how many descriptors it saw."""
    model.eval()
    sample = regional_sample(model, photos, image_size)
    model.whitening.fit(sample, shrink=shrink)
    return len(sample)
