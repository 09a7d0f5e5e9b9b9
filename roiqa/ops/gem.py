"""Generalized-mean (GeM) pooling, optionally restricted to a valid region of each feature map."""

from __future__ import annotations

import torch
from torch import nn


def gem(
    x: torch.Tensor, p: float | torch.Tensor = 3.0, eps: float = 1e-6, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """GeM over the spatial dims: (mean over cells of clamp(x, eps)**p) ** (1/p).

    x: (B, C, H, W). mask: optional (B, 1, H, W) {0, 1} weights; only cells with weight 1 are averaged (padding of a
    batch of different-sized images). Returns (B, C).
    """
    xp = x.clamp(min=eps).pow(p)  # (B, C, H, W)
    if mask is None:
        m = xp.mean(dim=(2, 3))
    else:
        mask = mask.to(xp.dtype)
        m = (xp * mask).sum(dim=(2, 3)) / mask.sum(dim=(2, 3)).clamp(min=1.0)
    return m.pow(1.0 / p)


class GeM(nn.Module):
    """GeM pooling with a learnable exponent p."""

    def __init__(self, p: float = 3.0, eps: float = 1e-6) -> None:
        super().__init__()
        self.p = nn.Parameter(torch.tensor(float(p)))
        self.eps = eps

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        return gem(x, self.p, self.eps, mask)


def valid_mask(valid_hw: torch.Tensor, size_hw: tuple[int, int], stride: int) -> torch.Tensor:
    """(B, 1, H, W) mask of feature cells that overlap the valid (unpadded) image region.

    valid_hw: (B, 2) valid image height and width in input pixels; size_hw: the feature map's (H, W).
    """
    h, w = size_hw
    vh = torch.ceil(valid_hw[:, 0].float() / stride).clamp(1, h)  # (B,)
    vw = torch.ceil(valid_hw[:, 1].float() / stride).clamp(1, w)
    rows = torch.arange(h, device=valid_hw.device)[None, :, None] < vh[:, None, None]  # (B, H, 1)
    cols = torch.arange(w, device=valid_hw.device)[None, None, :] < vw[:, None, None]  # (B, 1, W)
    return (rows & cols)[:, None].float()
