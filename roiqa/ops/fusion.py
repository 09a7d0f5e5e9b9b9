"""Multi-scale heatmap fusion by weighted log-sum-exp (seed 003, eq. 4)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def upsample_to(heatmaps: list[torch.Tensor], size_hw: tuple[int, int]) -> torch.Tensor:
    """Bilinearly resize each (B, H_l, W_l) map to size_hw and stack: (L, B, H, W)."""
    out = [F.interpolate(h[:, None], size=size_hw, mode="bilinear", align_corners=False)[:, 0] for h in heatmaps]
    return torch.stack(out)


def lse_fuse(heatmaps: torch.Tensor, alpha: torch.Tensor, gamma: float | torch.Tensor) -> torch.Tensor:
    """H = (1/gamma) * log(sum_l alpha_l * exp(gamma * H_l)).

    heatmaps: (L, ...) maps already upsampled to one size; alpha: (L,) positive weights (normalise them to sum 1 so
    that equal maps fuse to the map itself); gamma > 0. Large gamma approaches max_l H_l; small gamma the
    alpha-weighted mean. Computed with logsumexp for stability. Returns (...).
    """
    if alpha.shape != heatmaps.shape[:1]:
        raise ValueError(f"alpha must have shape ({heatmaps.shape[0]},), got {tuple(alpha.shape)}")
    log_alpha = torch.log(alpha.clamp(min=1e-12)).reshape(-1, *([1] * (heatmaps.dim() - 1)))
    return torch.logsumexp(gamma * heatmaps + log_alpha, dim=0) / gamma
