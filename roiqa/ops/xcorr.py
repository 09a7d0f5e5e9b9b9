"""Dense cosine cross-correlation of a query feature map over a search feature map (seed 003, eq. 3)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def same_padding(kh: int, kw: int) -> tuple[int, int, int, int]:
    """(left, right, top, bottom) zero padding that keeps the output the size of the input for a kh x kw window.

    Output cell (i, j) is the window whose top-left input cell is (i - kh // 2, j - kw // 2).
    """
    return (kw // 2, (kw - 1) // 2, kh // 2, (kh - 1) // 2)


def cosine_xcorr(query: torch.Tensor, search: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """H(u, v) = <q, X[u:u+h, v:v+w]> / (||q|| * ||X[u:u+h, v:v+w]||) for every window position at once.

    query: (C, h, w) kernel; search: (B, C, H, W). Windows are aligned as in `same_padding` and the part of a window
    outside the search map counts as zeros (it adds to neither the dot product nor the window norm), so the output
    is (B, H, W), aligned with the search map's cells. A window with zero norm scores 0.

    The numerator is one convolution with the unit-norm query as kernel; the window norms are a box filter (a
    convolution with ones) over the per-cell squared norm: no loop over positions.
    """
    c, kh, kw = query.shape
    if search.dim() != 4 or search.shape[1] != c:
        raise ValueError(f"search must be (B, {c}, H, W) to match the query, got {tuple(search.shape)}")
    pad = same_padding(kh, kw)
    qn = query / query.norm().clamp(min=eps)  # (C, h, w), unit norm
    x = F.pad(search, pad)  # (B, C, H + kh - 1, W + kw - 1)
    dot = F.conv2d(x, qn[None])[:, 0]  # (B, H, W)
    sq = F.pad(search.pow(2).sum(dim=1, keepdim=True), pad)  # (B, 1, H', W')
    ones = torch.ones(1, 1, kh, kw, dtype=search.dtype, device=search.device)
    win_norm = F.conv2d(sq, ones)[:, 0].clamp(min=0).sqrt()  # (B, H, W)
    return torch.where(win_norm > eps, dot / win_norm.clamp(min=eps), torch.zeros_like(dot))


def cosine_xcorr_naive(query: torch.Tensor, search: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Reference loop over positions of `cosine_xcorr` (for tests; O(H W C h w) Python work)."""
    c, kh, kw = query.shape
    b, _, h, w = search.shape
    left, _right, top, _bottom = same_padding(kh, kw)
    x = F.pad(search, same_padding(kh, kw))
    out = torch.zeros(b, h, w, dtype=search.dtype)
    qv = query.reshape(-1)
    for n in range(b):
        for i in range(h):
            for j in range(w):
                win = x[n, :, i : i + kh, j : j + kw].reshape(-1)
                denom = qv.norm() * win.norm()
                out[n, i, j] = (qv @ win) / denom if win.norm() > eps else 0.0
    del left, top
    return out
