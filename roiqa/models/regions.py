"""Regional descriptors of the coarse stage: GeM over a multi-scale grid of windows, and their learned whitening.

A single whole-image descriptor cannot single out a 24-128 px object in a 512 px image, so every image is indexed
as R regional descriptors (R-MAC / DELG style): GeM pooling of the descriptor level over square windows of 3, 5
and 8 cells (48, 80 and 128 px at stride 16) on a grid with ~50% overlap, plus the whole image. An image's score
for a query is its best region's. Descriptors are PCA-whitened with statistics fitted on the training photographs
(`fit_whitening`), which ranks better than unwhitened descriptors (benchmarks/RESULTS.md).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

# (window side, step) in cells of the descriptor level.
WINDOWS: tuple[tuple[int, ...], ...] = ((3, 2), (5, 3), (8, 4))
MAX_REGIONS = 4096  # regions per image: the region number is stored in the low 12 bits of its faiss id
REGION_BITS = 12


def _starts(n: int, side: int, step: int) -> list[int]:
    """Window starts covering 0..n with windows of `side` (clamped to n), every `step`, the last one flush."""
    side = min(side, n)
    starts = list(range(0, n - side + 1, step))
    if starts[-1] != n - side:
        starts.append(n - side)
    return starts


def region_grid(h: int, w: int, windows: tuple[tuple[int, ...], ...] = WINDOWS) -> torch.Tensor:
    """(R, 4) int64 cell boxes x0, y0, x1, y1 (end exclusive) over an (h, w) cell map: the whole map first, then
    every window of `windows` ((side, step) for a square, (width, height, step) otherwise), each clamped to the
    map, duplicates removed, at most MAX_REGIONS."""
    if h < 1 or w < 1:
        raise ValueError(f"region_grid: empty map {h}x{w}")
    boxes = [(0, 0, w, h)]
    for window in windows:
        ww, wh, step = (window[0], window[0], window[1]) if len(window) == 2 else window
        sh, sw = min(wh, h), min(ww, w)
        for y in _starts(h, wh, step):
            for x in _starts(w, ww, step):
                boxes.append((x, y, x + sw, y + sh))
    unique = list(dict.fromkeys(boxes))[:MAX_REGIONS]
    return torch.tensor(unique, dtype=torch.int64)


def box_gem(feat: torch.Tensor, cells: torch.Tensor, p: float, eps: float = 1e-6) -> torch.Tensor:
    """GeM of a (C, H, W) map over each cell box of `cells` (R, 4): (mean over the box of x^p)^(1/p). (R, C).

    Computed from an integral image of x^p, so every box costs the same whatever its size.
    """
    x = feat.clamp(min=eps).pow(p)  # (C, H, W)
    ii = F.pad(x.cumsum(1).cumsum(2), (1, 0, 1, 0))  # (C, H + 1, W + 1), ii[:, y, x] = sum of x[:, :y, :x]
    x0, y0, x1, y1 = cells.unbind(1)
    sums = ii[:, y1, x1] - ii[:, y0, x1] - ii[:, y1, x0] + ii[:, y0, x0]  # (C, R)
    area = ((x1 - x0) * (y1 - y0)).to(x.dtype)
    return (sums / area).clamp(min=eps).pow(1.0 / p).T


class Whitening(nn.Module):
    """x -> L2((L2(x) - mean) @ proj.T): PCA whitening of regional descriptors; the identity (after L2) until fitted."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("proj", torch.eye(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.normalize(x, dim=-1)
        return F.normalize((x - self.mean.to(x.dtype)) @ self.proj.to(x.dtype).T, dim=-1)

    @torch.no_grad()
    def fit(self, x: torch.Tensor, shrink: float = 0.1) -> None:
        """Fit on (N, D) descriptors: centre on their mean, rotate onto the covariance's eigenvectors and scale each
        by 1 / sqrt(eigenvalue + shrink * mean eigenvalue) (the shrinkage keeps noise directions from exploding)."""
        x = F.normalize(x.double(), dim=-1)
        if len(x) <= x.shape[1]:
            raise ValueError(f"whitening needs more descriptors than dimensions, got {tuple(x.shape)}")
        mean = x.mean(0)
        xc = x - mean
        cov = xc.T @ xc / len(x)
        evals, evecs = torch.linalg.eigh(cov)  # ascending
        evals = evals.clamp(min=0) + shrink * evals.clamp(min=0).mean()
        proj = (evecs / evals.sqrt()).T.flip(0)  # (D, D), strongest direction first
        self.mean.copy_(mean.to(self.mean.dtype))
        self.proj.copy_(proj.to(self.proj.dtype))


def region_keys(image_ids: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """faiss ids of every region: (low 51 bits of image_id) << 12 | region number, image by image. (sum(counts),)"""
    ids = np.repeat(image_key(image_ids), counts)
    within = np.concatenate([np.arange(c) for c in counts]) if len(counts) else np.zeros(0, np.int64)
    return (ids << REGION_BITS) | within.astype(np.int64)


def image_key(image_ids: np.ndarray) -> np.ndarray:
    """The image part of a region key (what `region_keys` keeps of each image id)."""
    return np.asarray(image_ids, np.int64) & ((1 << (63 - REGION_BITS)) - 1)


def split_key(keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """region keys -> (image key, region number)."""
    keys = np.asarray(keys, np.int64)
    return keys >> REGION_BITS, keys & ((1 << REGION_BITS) - 1)


def encode_regions(x: np.ndarray) -> bytes:
    """(R, D) float descriptors -> the stored form (S.REGIONS_Q8): R float16 scales, then R x D int8, row-major.

    Each row is scaled by its own largest magnitude / 127, so every component is off by at most half a step of its
    row (scale / 2): the whitened, L2-normalised descriptors lose about nothing in inner products, at (D + 2) bytes
    per region against 2 D for float16."""
    x = np.asarray(x, np.float32)
    if x.ndim != 2:
        raise ValueError(f"encode_regions: expected (R, D) descriptors, got shape {x.shape}")
    peak = np.abs(x).max(axis=1) if x.size else np.zeros(len(x), np.float32)
    scales = (peak / 127.0).astype(np.float16)
    safe = np.where(scales > 0, scales.astype(np.float32), 1.0)[:, None]
    q = np.clip(np.rint(x / safe), -127, 127).astype(np.int8)
    return scales.tobytes() + q.tobytes()


def decode_regions(blob: bytes | None, dim: int) -> np.ndarray:
    """The stored form of `encode_regions` -> (R, D) float32."""
    blob = blob or b""
    if len(blob) % (dim + 2):
        raise ValueError(f"decode_regions: {len(blob)} bytes are not whole {dim}-d regions ({dim + 2} bytes each)")
    r = len(blob) // (dim + 2)
    scales = np.frombuffer(blob, np.float16, count=r).astype(np.float32)
    q = np.frombuffer(blob, np.int8, offset=2 * r).reshape(r, dim).astype(np.float32)
    return q * scales[:, None]


def region_count(blob: bytes | None, dim: int) -> int:
    """Regions in a stored blob, without decoding it."""
    return len(blob or b"") // (dim + 2)
