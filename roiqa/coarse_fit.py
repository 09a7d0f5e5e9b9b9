"""Fitting the coarse stage's regional whitening on training photographs (the shipped checkpoint's only fit)."""

from __future__ import annotations

import numpy as np
import torch

from roiqa.imageio import resize_long_side
from roiqa.models.matcher import Matcher


def photo_rgb(img: np.ndarray) -> np.ndarray:
    """(H, W[, C]) photo -> (H, W, 3) uint8 RGB (grey replicated, alpha dropped)."""
    img = np.asarray(img)
    if img.ndim == 2:
        img = np.stack([img] * 3, axis=-1)
    return np.ascontiguousarray(img[..., :3]).astype(np.uint8)


@torch.no_grad()
def regional_sample(model: Matcher, photos: list[np.ndarray], image_size: int) -> torch.Tensor:
    """Every regional descriptor (before whitening) of `photos` resized to `image_size`, flipped copies included."""
    white = model.whitening
    mean, proj = white.mean.clone(), white.proj.clone()
    white.mean.zero_()
    white.proj.copy_(torch.eye(len(mean)))
    out = []
    try:
        for photo in photos:
            img, _ = resize_long_side(photo_rgb(photo), image_size)
            for view in (img, img[:, ::-1]):
                view = np.ascontiguousarray(view)
                feats = model.pyramid(view[None])
                out.append(model.regional_descriptors(feats, np.array([view.shape[:2]]))[0][0])
    finally:
        white.mean.copy_(mean)
        white.proj.copy_(proj)
    return torch.cat(out)


def fit_coarse(model: Matcher, photos: list[np.ndarray], image_size: int = 512, shrink: float = 0.1) -> int:
    """Fit `model.whitening` on the regional descriptors of `photos`; returns how many descriptors it saw."""
    model.eval()
    sample = regional_sample(model, photos, image_size)
    model.whitening.fit(sample, shrink=shrink)
    return len(sample)
