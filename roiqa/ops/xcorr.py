"""Dense cosine cross-correlation of a query feature map over a search feature map (seed 003, eq. 3)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def same_padding(kh: int, kw: int) -> tuple[int, int, int, int]:
    """(left, right, top, bottom) zero padding that keeps the output the size of the input for a kh x kw window.

    Output cell (i, j) is the window whose top-left input cell is (i - kh // 2, j - kw // 2).
    """
    return (kw // 2, (kw - 1) // 2, kh // 2, (kh - 1) // 2)


FFT_MIN_CELLS = 100  # kernels with at least this many cells correlate through the FFT (measured crossover)


def xcorr_direct(query: torch.Tensor, padded: torch.Tensor) -> torch.Tensor:
    """<query, window> for every valid window of an already padded (B, C, H', W') map: one convolution."""
    return F.conv2d(padded, query[None])[:, 0]


def xcorr_fft(query: torch.Tensor, padded: torch.Tensor) -> torch.Tensor:
    """The same as `xcorr_direct` through the FFT: irfft2(sum_c rfft2(X_c) * conj(rfft2(q_c))).

    Cost O(C H' W' log(H' W')) whatever the kernel size, against O(C H' W' h w) for the convolution, so large
    kernels take this path and small ones the direct one (FFT_MIN_CELLS; timings in benchmarks/RESULTS.md).
    """
    _, _, hp, wp = padded.shape
    _, kh, kw = query.shape
    dt = padded.dtype if padded.dtype in (torch.float32, torch.float64) else torch.float32  # no half-precision FFT
    xf = torch.fft.rfft2(padded.to(dt), s=(hp, wp))  # (B, C, H', W'//2+1)
    qf = torch.fft.rfft2(query.to(dt), s=(hp, wp))  # (C, H', W'//2+1)
    r = torch.fft.irfft2(torch.einsum("bchw,chw->bhw", xf, qf.conj()), s=(hp, wp))  # (B, H', W'), circular
    return r[:, : hp - kh + 1, : wp - kw + 1].to(padded.dtype)  # valid part: no wrap-around


def cosine_xcorr(query: torch.Tensor, search: torch.Tensor, eps: float = 1e-6, method: str = "auto") -> torch.Tensor:
    """H(u, v) = <q, X[u:u+h, v:v+w]> / (||q|| * ||X[u:u+h, v:v+w]||) for every window position at once.

    query: (C, h, w) kernel; search: (B, C, H, W). Windows are aligned as in `same_padding` and the part of a window
    outside the search map counts as zeros (it adds to neither the dot product nor the window norm), so the output
    is (B, H, W), aligned with the search map's cells. A window with zero norm scores 0.

    The numerator is one correlation with the unit-norm query (a convolution, or the FFT for kernels of at least
    FFT_MIN_CELLS cells; `method` = "auto" | "direct" | "fft"); the window norms are a box filter over the
    per-cell squared norm: no loop over positions.
    """
    c, kh, kw = query.shape
    if search.dim() != 4 or search.shape[1] != c:
        raise ValueError(f"search must be (B, {c}, H, W) to match the query, got {tuple(search.shape)}")
    if method not in ("auto", "direct", "fft"):
        raise ValueError(f"method must be auto, direct or fft, got {method!r}")
    pad = same_padding(kh, kw)
    qn = query / query.norm().clamp(min=eps)  # (C, h, w), unit norm
    x = F.pad(search, pad)  # (B, C, H + kh - 1, W + kw - 1)
    use_fft = method == "fft" or (method == "auto" and kh * kw >= FFT_MIN_CELLS)
    dot = xcorr_fft(qn, x) if use_fft else xcorr_direct(qn, x)  # (B, H, W)
    sq = F.pad(search.pow(2).sum(dim=1, keepdim=True), pad)  # (B, 1, H', W')
    win_norm = (F.avg_pool2d(sq, (kh, kw), stride=1)[:, 0] * (kh * kw)).clamp(min=0).sqrt()  # (B, H, W)
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
