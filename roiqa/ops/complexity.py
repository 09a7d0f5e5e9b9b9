"""Seed 001 complexity: LoG complexity map, quadtree patch layout, statistics and map PNG (pure functions).

Pixels are those of the image the map is computed on (in the index: the resized, zero-padded square); arrays are
(H, W) row-major, a layout is (N, 3) int32 rows `x, y, size` (top-left corner and side of a square cell).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from roiqa.io.imageio import encode_png

GREY_WEIGHTS = (0.299, 0.587, 0.114)  # ITU-R BT.601 luma, as roiqa.eval.demo_data.clutter
TRUNCATE = 4.0  # Gaussian kernel radius = int(TRUNCATE * sigma + 0.5), scipy.ndimage's default
LAPLACIAN_3X3 = ((0.0, 1.0, 0.0), (1.0, -4.0, 1.0), (0.0, 1.0, 0.0))  # sum of the two 1-D second differences


def gaussian_kernel1d(sigma: float) -> torch.Tensor:
    """(2r + 1,) float64 normalised sampled Gaussian, r = int(4 sigma + 0.5) (scipy.ndimage.gaussian_filter's)."""
    if not sigma > 0:
        raise ValueError(f"sigma must be > 0, got {sigma!r}")
    radius = int(TRUNCATE * sigma + 0.5)
    x = torch.arange(-radius, radius + 1, dtype=torch.float64)
    k = torch.exp(-0.5 * (x / sigma) ** 2)
    return k / k.sum()


def _pad(x: torch.Tensor, p: tuple[int, int, int, int]) -> torch.Tensor:
    """Reflect padding (scipy's "mirror": the edge pixel is not repeated); replicate where a side is too short."""
    h, w = x.shape[-2:]
    mode = "reflect" if max(p[0], p[1]) < w and max(p[2], p[3]) < h else "replicate"
    return F.pad(x, p, mode=mode)


def log_response(grey: torch.Tensor, sigma: float) -> torch.Tensor:
    """(B, H, W) float grey -> (B, H, W) scale-normalised LoG, sigma^2 * laplace(gaussian(grey)).

    Gaussian: two 1-D conv2d passes; Laplacian: the 3x3 4-neighbour kernel; reflect padding before each pass.
    Equals scipy's gaussian_filter(mode="mirror") then laplace(mode="mirror") up to float32 rounding.
    """
    k = gaussian_kernel1d(sigma).to(device=grey.device, dtype=grey.dtype)
    r = (len(k) - 1) // 2
    x = grey[:, None]  # (B, 1, H, W)
    x = F.conv2d(_pad(x, (r, r, 0, 0)), k.view(1, 1, 1, -1))  # along W
    x = F.conv2d(_pad(x, (0, 0, r, r)), k.view(1, 1, -1, 1))  # along H
    lap = torch.tensor(LAPLACIAN_3X3, device=grey.device, dtype=grey.dtype).view(1, 1, 3, 3)
    x = F.conv2d(_pad(x, (1, 1, 1, 1)), lap)
    return x[:, 0] * (sigma**2)


def _as_tensor(images: torch.Tensor | np.ndarray) -> torch.Tensor:
    t = images if isinstance(images, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(images))
    if t.ndim != 4 or t.shape[-1] != 3 or t.dtype != torch.uint8:
        raise ValueError(f"images: expected a (B, H, W, 3) uint8 array, got {t.dtype} {tuple(t.shape)}")
    return t


@torch.no_grad()
def complexity_map(
    images: torch.Tensor | np.ndarray,
    sigma: float,
    scale: float,
    valid_hw: torch.Tensor | np.ndarray | None = None,
) -> torch.Tensor:
    """(B, H, W, 3) uint8 -> (B, H, W) float32 complexity tanh(|sigma^2 LoG(grey)| / scale), in [0, 1).

    Runs on the tensor's device (numpy arrays on the CPU). grey = BT.601 luma / 255. With `valid_hw` (B, 2), each
    image's map is computed on its valid top-left (h, w) crop (so the zero padding adds no edge) and is 0 outside.
    """
    if not scale > 0:
        raise ValueError(f"scale must be > 0, got {scale!r}")
    x = _as_tensor(images)
    w = torch.tensor(GREY_WEIGHTS, device=x.device, dtype=torch.float32) / 255.0
    grey = x.float() @ w  # (B, H, W)
    if valid_hw is None:
        return torch.tanh(log_response(grey, sigma).abs() / scale)
    hw = np.asarray(valid_hw.cpu() if isinstance(valid_hw, torch.Tensor) else valid_hw).reshape(-1, 2)
    if len(hw) != len(grey):
        raise ValueError(f"valid_hw: expected ({len(grey)}, 2) sizes, got shape {hw.shape}")
    out = torch.zeros_like(grey)
    for h, ww in {(int(a), int(b)) for a, b in hw}:  # images of equal valid size are filtered together
        if not (0 < h <= grey.shape[1] and 0 < ww <= grey.shape[2]):
            raise ValueError(f"valid_hw: ({h}, {ww}) is empty or larger than the {tuple(grey.shape[1:])} images")
        rows = torch.from_numpy(np.flatnonzero((hw[:, 0] == h) & (hw[:, 1] == ww))).to(x.device)
        out[rows, :h, :ww] = torch.tanh(log_response(grey[rows, :h, :ww], sigma).abs() / scale)
    return out


# --- quadtree ---------------------------------------------------------------------------------------------------


def _power_of_two(v: int) -> bool:
    return isinstance(v, (int, np.integer)) and v >= 1 and (v & (v - 1)) == 0


def cell_sizes(cell: int, min_cell: int) -> list[int]:
    """[cell, cell / 2, ..., min_cell]; ValueError unless both are powers of two with min_cell <= cell."""
    if not _power_of_two(cell) or not _power_of_two(min_cell) or min_cell > cell:
        raise ValueError(f"cell ({cell!r}) and min_cell ({min_cell!r}) must be powers of two with min_cell <= cell")
    return [cell >> k for k in range(int(math.log2(cell // min_cell)) + 1)]


def check_quadtree(cell: int, min_cell: int, thresholds: Sequence[float]) -> list[int]:
    """cell_sizes(cell, min_cell) after checking that there is one threshold per splittable size."""
    sizes = cell_sizes(cell, min_cell)
    if len(thresholds) != len(sizes) - 1:
        raise ValueError(
            f"thresholds: need log2(cell / min_cell) = {len(sizes) - 1} values (one per size {sizes[:-1]} that can "
            f"split), got {len(thresholds)}: {tuple(thresholds)}"
        )
    return sizes


def _block_means(sat: np.ndarray, xy: np.ndarray, size: int, vh: int, vw: int) -> np.ndarray:
    """Means of cells (x, y, size) clipped to [0, vh) x [0, vw), from the summed-area table `sat` (vh+1, vw+1)."""
    x0, y0 = xy[:, 0], xy[:, 1]
    x1, y1 = np.minimum(x0 + size, vw), np.minimum(y0 + size, vh)
    total = sat[y1, x1] - sat[y0, x1] - sat[y1, x0] + sat[y0, x0]
    return total / ((x1 - x0) * (y1 - y0))


def quadtree(
    cmap: np.ndarray, valid_hw: Sequence[int], cell: int, min_cell: int, thresholds: Sequence[float]
) -> np.ndarray:
    """(N, 3) int32 leaves (x, y, size) of the complexity quadtree over the valid top-left (h, w) of `cmap`.

    Level 0 is a grid of `cell` squares from (0, 0) covering the valid region; a cell whose mean complexity over
    its part inside the valid region is above thresholds[level] splits into 4 (level + 1), down to `min_cell`.
    Edge cells keep their nominal size; children wholly outside the valid region are dropped. Rows are sorted by
    size (largest first), then y, then x.
    """
    sizes = check_quadtree(cell, min_cell, thresholds)
    c = np.asarray(cmap)
    if c.ndim != 2:
        raise ValueError(f"cmap: expected an (H, W) map, got shape {c.shape}")
    vh, vw = (int(v) for v in valid_hw)
    if not (0 < vh <= c.shape[0] and 0 < vw <= c.shape[1]):
        raise ValueError(f"valid_hw: ({vh}, {vw}) is empty or larger than the map {c.shape}")
    sat = np.zeros((vh + 1, vw + 1), np.float64)
    sat[1:, 1:] = c[:vh, :vw].astype(np.float64).cumsum(0).cumsum(1)
    gy, gx = np.meshgrid(np.arange(0, vh, cell), np.arange(0, vw, cell), indexing="ij")
    nodes = np.stack([gx.ravel(), gy.ravel()], axis=1)  # (n, 2) x, y
    leaves = []
    for level, size in enumerate(sizes):
        if level == len(sizes) - 1:
            split = np.zeros(len(nodes), bool)
        else:
            split = _block_means(sat, nodes, size, vh, vw) > thresholds[level]
        keep = nodes[~split]
        leaves.append(np.concatenate([keep, np.full((len(keep), 1), size)], axis=1))
        half = size // 2
        parents = nodes[split]
        nodes = np.concatenate([parents + [dx, dy] for dy in (0, half) for dx in (0, half)], axis=0)
        nodes = nodes[(nodes[:, 0] < vw) & (nodes[:, 1] < vh)]
    out = np.concatenate(leaves, axis=0).astype(np.int32)
    order = np.lexsort((out[:, 0], out[:, 1], -out[:, 2]))
    return np.ascontiguousarray(out[order])


def patch_counts(layout: np.ndarray, cell: int, min_cell: int) -> list[int]:
    """Leaves per size [cell, cell / 2, ..., min_cell] of a layout ((N, 3) or flat (x, y, size) triples)."""
    sizes = cell_sizes(cell, min_cell)
    lay = np.asarray(layout).reshape(-1, 3)
    unknown = sorted(set(lay[:, 2].tolist()) - set(sizes))
    if unknown:
        raise ValueError(f"layout: cell size(s) {unknown} are not among {sizes}")
    return [int((lay[:, 2] == s).sum()) for s in sizes]


# --- statistics and the map image ------------------------------------------------------------------------------


def _valid(cmap: np.ndarray, valid_hw: Sequence[int]) -> np.ndarray:
    c = np.asarray(cmap)
    vh, vw = (int(v) for v in valid_hw)
    if c.ndim != 2 or not (0 < vh <= c.shape[0] and 0 < vw <= c.shape[1]):
        raise ValueError(f"valid_hw: ({vh}, {vw}) is empty or outside the map of shape {c.shape}")
    return c[:vh, :vw]


def complexity_stats(cmap: np.ndarray, valid_hw: Sequence[int]) -> tuple[float, float, float]:
    """(mean, standard deviation, 90th percentile (linear interpolation)) of the map over its valid region."""
    v = _valid(cmap, valid_hw).astype(np.float64)
    return float(v.mean()), float(v.std()), float(np.percentile(v, 90))


def complexity_png(cmap: np.ndarray, valid_hw: Sequence[int], size: int) -> bytes:
    """8-bit grey PNG (value = round(255 * complexity)) of the valid region, resized so its long side is `size`.

    The short side is rounded half up and at least 1 (as roiqa.io.imageio.resize_long_side); PIL bilinear.
    """
    if int(size) != size or size < 1:
        raise ValueError(f"size must be a positive integer, got {size!r}")
    v = _valid(cmap, valid_hw)
    grey = np.rint(np.clip(v, 0.0, 1.0) * 255).astype(np.uint8)
    h, w = grey.shape
    long_side = max(h, w)
    if h >= w:
        new_h, new_w = size, max(1, (2 * w * size + long_side) // (2 * long_side))
    else:
        new_h, new_w = max(1, (2 * h * size + long_side) // (2 * long_side)), size
    if (new_h, new_w) != (h, w):
        grey = np.asarray(Image.fromarray(grey).resize((new_w, new_h), Image.Resampling.BILINEAR, reducing_gap=None))
    return encode_png(grey)
