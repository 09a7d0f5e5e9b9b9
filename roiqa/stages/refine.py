"""Seed 000: refine a found box by descending a multi-scale perceptual loss (feature similarity, edge-weighted
dissimilarity, size weight, optional depth penalty) between the query's feature maps and ROIAligned search features.

Every function works on feature maps of any matcher (a dict {pyramid level: map}) on whatever device they live.
Boxes are x0, y0, x1, y1 in pixels of the resized search image (the image the feature maps were computed from);
sizes are (h, w).
"""

from __future__ import annotations

import io
import math
import os
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torchvision.ops import roi_align

from roiqa.config import RefineConfig
from roiqa.io import uri as uri_mod

EDGE_FLOOR = 0.25  # share of the edge mask spread evenly, so flat cells still count (mask = floor + (1-floor) * g)
EDGE_SIGMA = 2.0  # Gaussian sigma (pixels) smoothing the Sobel magnitude of the query patch
PROBE = 0.5  # finite-difference probe delta, as a fraction of cfg.max_change
MIN_STEP = 1e-3  # stop when the accepted relative change of size and centre falls below this
HALVINGS = 2  # times a rejected step is halved before the refinement stops


def _gauss_kernel(sigma: float) -> torch.Tensor:
    r = max(1, int(math.ceil(3 * sigma)))
    x = torch.arange(-r, r + 1, dtype=torch.float32)
    k = torch.exp(-0.5 * (x / sigma) ** 2)
    return k / k.sum()  # (2r + 1,)


def edge_weights(patch: np.ndarray) -> np.ndarray:
    """(h, w) float32 mask, mean 1, emphasising the query's edges, corners and texture.

    Sobel gradient magnitude of the grey patch, Gaussian-smoothed (sigma EDGE_SIGMA px), then
    EDGE_FLOOR + (1 - EDGE_FLOOR) * g / mean(g). A flat patch gives all ones.
    """
    if not isinstance(patch, np.ndarray) or patch.ndim != 3 or patch.shape[2] != 3 or patch.dtype != np.uint8:
        got = f"{patch.dtype} {patch.shape}" if isinstance(patch, np.ndarray) else type(patch).__name__
        raise ValueError(f"edge_weights: expected an (h, w, 3) uint8 patch, got {got}")
    h, w = patch.shape[:2]
    grey = torch.from_numpy(patch.astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32))[None, None]
    sob = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]])
    kernels = torch.stack([sob, sob.T])[:, None]  # (2, 1, 3, 3): d/dx, d/dy
    grad = F.conv2d(F.pad(grey, (1, 1, 1, 1), mode="replicate"), kernels)  # (1, 2, h, w)
    mag = grad.pow(2).sum(1, keepdim=True).sqrt()  # (1, 1, h, w)
    k = _gauss_kernel(EDGE_SIGMA)
    r = len(k) // 2
    mag = F.conv2d(F.pad(mag, (r, r, 0, 0), mode="replicate"), k.view(1, 1, 1, -1))
    mag = F.conv2d(F.pad(mag, (0, 0, r, r), mode="replicate"), k.view(1, 1, -1, 1))[0, 0]  # (h, w)
    mean = float(mag.mean())
    if not mean > 1e-6:
        return np.ones((h, w), np.float32)
    return (EDGE_FLOOR + (1 - EDGE_FLOOR) * mag / mean).numpy().astype(np.float32)


def edge_pyramid(
    weights: np.ndarray, out_hw: dict[int, tuple[int, int]], strides: dict[int, int], device: torch.device | str = "cpu"
) -> dict[int, torch.Tensor]:
    """{level: (h_l, w_l)} edge masks on the query's feature grids, each of mean 1.

    A query patch of h x w pixels has ceil(h / s) cells at stride s, covering ceil(h / s) * s pixels (the last row
    and column reach into the mirrored context): the pixel mask is zero-padded to that extent and averaged over
    s x s blocks, so each cell weighs the query pixels it covers and context-only parts of a cell weigh nothing.
    Mirror padding instead was no better (3 pasted-object pairs x 8 start boxes: mean IoU after refine_box 0.81 vs
    0.83).
    """
    w_px = np.asarray(weights, np.float32)
    out = {}
    for lv, (hl, wl) in out_hw.items():
        s = int(strides[lv])
        ph, pw = max(0, hl * s - w_px.shape[0]), max(0, wl * s - w_px.shape[1])
        full = np.pad(w_px, ((0, ph), (0, pw)), mode="constant")[: hl * s, : wl * s]
        cell = full.reshape(hl, s, wl, s).mean(axis=(1, 3))  # (h_l, w_l)
        out[lv] = torch.from_numpy(cell / max(float(cell.mean()), 1e-12)).to(device)
    return out


def roi_features(
    feats: dict[int, torch.Tensor],
    box: np.ndarray | torch.Tensor,
    out_hw: dict[int, tuple[int, int]],
    strides: dict[int, int],
    query_hw: tuple[int, int] | None = None,
) -> dict[int, torch.Tensor]:
    """{level: (C, h_l, w_l)} search features inside `box`, ROIAligned onto the query's grid of each level.

    feats: {level: (1, C, H, W)}; box: (4,) resized-image pixels, or (K, 4) giving (K, C, h_l, w_l) maps.
    query_hw: the query patch's (h, w) pixels. Its grid at stride s covers ceil(h / s) * s pixels, so the sampled
    region is the box stretched from its top-left corner by (h_l * s / h, w_l * s / w) and cell i of the ROI sees
    what cell i of the query saw (as roiqa.boxes.feature_window_to_boxes places windows). None: the grid is taken
    to cover the patch exactly.
    """
    b = torch.as_tensor(np.asarray(box, np.float32) if not isinstance(box, torch.Tensor) else box)
    single = b.ndim == 1
    b = b.reshape(-1, 4)
    out = {}
    for lv, (hl, wl) in out_hw.items():
        f = feats[lv]
        s = float(strides[lv])
        bl = b.to(device=f.device, dtype=f.dtype)
        if query_hw is not None:
            fy, fx = hl * s / query_hw[0], wl * s / query_hw[1]
            x0, y0 = bl[:, 0], bl[:, 1]
            bl = torch.stack([x0, y0, x0 + (bl[:, 2] - x0) * fx, y0 + (bl[:, 3] - y0) * fy], dim=1)
        r = roi_align(f, [bl], output_size=(int(hl), int(wl)), spatial_scale=1.0 / s, sampling_ratio=2, aligned=True)
        out[lv] = r[0] if single else r  # (C, h_l, w_l) or (K, C, h_l, w_l)
    return out


def size_weight(side: np.ndarray | float, reference_side: float, power: float) -> np.ndarray:
    """(reference_side / side) ** power: seed 000's weight "inversely proportional to ROI size", relative to the
    starting box so it is dimensionless and 1 there; smaller ROIs weigh more. float64, the shape of `side`."""
    return (float(reference_side) / np.clip(np.asarray(side, np.float64), 1e-6, None)) ** float(power)


def perceptual_loss(
    query: dict[int, torch.Tensor],
    roi: dict[int, torch.Tensor],
    edge: dict[int, torch.Tensor],
    level_weights: dict[int, float] | tuple[float, ...],
    w_similarity: float,
    w_dissimilarity: float,
    size_weight: float | torch.Tensor = 1.0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Seed 000 spec 2 and 4: total = sum_l a_l * (w_sim * size_weight * (1 - cos_l) + w_dis * dis_l).

    query {l: (C, h, w)}; roi {l: (C, h, w)} or a batch {l: (K, C, h, w)} (then every output has shape (K,));
    edge {l: (h, w)}; level_weights a_l per level (a dict, or a tuple finest level first), normalised to sum 1;
    size_weight a float or (K,).

    - cos_l: cosine of the flattened maps after subtracting the query's mean feature (a C vector) from both, as
      the matcher's correlation does (Matcher.level_heatmaps, cfg.center). FPN features share a large common
      component that keeps uncentred cosines near 1 for any box; centred, 1 - cos grows about three times as fast
      away from the true box (docs/stages.md).
    - dis_l: edge-weighted mean over cells of ||q_hat - r_hat||_1 / sqrt(C), q_hat and r_hat the per-cell
      L2-normalised centred features; the 1 / sqrt(C) puts it in [0, 2] like 1 - cos, whatever C is.

    parts: "similarity" and "dissimilarity" (level-combined, before w_sim / w_dis, the first with the size
    weight), and per level "similarity_l{l}" (size-weighted 1 - cos) and "dissimilarity_l{l}".
    """
    levels = list(query)
    if not isinstance(level_weights, dict):
        if len(level_weights) < len(levels):
            raise ValueError(f"level_weights: {len(level_weights)} weights for {len(levels)} levels {levels}")
        level_weights = dict(zip(sorted(levels), level_weights))
    total_w = sum(float(level_weights[lv]) for lv in levels)
    if not total_w > 0:
        raise ValueError(f"level_weights must have a positive sum over levels {levels}, got {level_weights}")
    sim_total, dis_total = 0.0, 0.0
    parts: dict[str, torch.Tensor] = {}
    for lv in levels:
        q, r = query[lv], roi[lv]  # (C, h, w), (..., C, h, w)
        if q.shape[-3:] != r.shape[-3:]:
            raise ValueError(f"level {lv}: query map {tuple(q.shape)} and ROI map {tuple(r.shape)} differ")
        a = float(level_weights[lv]) / total_w
        sw = torch.as_tensor(size_weight, dtype=r.dtype, device=r.device)
        mu = q.mean(dim=(-2, -1), keepdim=True)  # (C, 1, 1)
        cos = F.cosine_similarity((q - mu).flatten(-3), (r - mu).flatten(-3), dim=-1, eps=1e-8)  # (...)
        sim = sw * (1 - cos)
        c = q.shape[-3]
        qn, rn = F.normalize(q - mu, dim=-3), F.normalize(r - mu, dim=-3)  # centred per-cell unit vectors
        d = (qn - rn).abs().sum(dim=-3) / math.sqrt(c)  # (..., h, w)
        e = edge[lv].to(device=r.device, dtype=r.dtype)
        dis = (d * e).sum(dim=(-2, -1)) / e.sum().clamp_min(1e-12)  # (...)
        parts[f"similarity_l{lv}"], parts[f"dissimilarity_l{lv}"] = sim, dis
        sim_total = sim_total + a * sim
        dis_total = dis_total + a * dis
    parts["similarity"], parts["dissimilarity"] = sim_total, dis_total
    return w_similarity * sim_total + w_dissimilarity * dis_total, parts


def load_depth(template: str, image_uri: str) -> np.ndarray | None:
    """(H, W) float32 depth map of `image_uri`, or None when the file the template names does not exist.

    `template` is a URI with placeholders {stem} (image file name without extension), {name} (file name) and
    {uri} (the whole image URI); a tar member `shard.tar#a/b.jpg` has name b.jpg. The file is a 16-bit (or 8-bit,
    or 32-bit) single-channel PNG/TIFF, or a .npy array (read with allow_pickle=False). Depth <= 0 or non-finite
    means unknown. Other content raises ValueError naming the file.
    """
    _, member = uri_mod.split_member(image_uri)
    name = os.path.basename((member or image_uri).rstrip("/"))
    try:
        target = template.format(stem=os.path.splitext(name)[0], name=name, uri=image_uri)
    except (KeyError, IndexError, ValueError) as exc:
        allowed = "{stem}, {name}, {uri}"
        raise ValueError(f"refine.depth template {template!r}: only {allowed} are allowed ({exc})") from exc
    try:
        data = uri_mod.read_bytes(target)
    except FileNotFoundError:
        return None
    if data[:6] == b"\x93NUMPY":
        try:
            arr = np.load(io.BytesIO(data), allow_pickle=False)
        except ValueError as exc:
            raise ValueError(f"{target}: not a plain numeric .npy depth map ({exc})") from exc
    else:
        from PIL import Image

        try:
            with Image.open(io.BytesIO(data)) as im:
                if im.mode not in ("I;16", "I;16B", "I;16L", "I", "F", "L"):
                    raise ValueError(f"{target}: depth image must be single-channel, got mode {im.mode}")
                arr = np.asarray(im)
        except OSError as exc:
            raise ValueError(f"{target}: not a depth image or .npy file ({exc})") from exc
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[..., 0]
    if arr.ndim != 2 or arr.dtype.kind not in "uif" or min(arr.shape) < 1:
        raise ValueError(f"{target}: depth map must be a non-empty 2-D numeric array, got {arr.dtype} {arr.shape}")
    return arr.astype(np.float32)


def _median_depth(depth: np.ndarray, box: np.ndarray) -> float:
    """Median of the known (finite, > 0) depths of the pixels a box touches (at least one pixel); NaN if none."""
    h, w = depth.shape
    x0, y0, x1, y1 = (float(v) for v in box)
    c0, r0 = min(max(int(math.floor(x0)), 0), w - 1), min(max(int(math.floor(y0)), 0), h - 1)
    c1, r1 = max(min(int(math.ceil(x1)), w), c0 + 1), max(min(int(math.ceil(y1)), h), r0 + 1)
    v = depth[r0:r1, c0:c1]
    v = v[np.isfinite(v) & (v > 0)]
    return float(np.median(v)) if v.size else float("nan")


def depth_difference(depth: np.ndarray, box: np.ndarray, reference_box: np.ndarray) -> float:
    """|median depth in box - median depth in reference_box| / median depth in reference_box (boxes in depth-map
    pixels); 0 when either box holds no known depth."""
    ref = _median_depth(depth, reference_box)
    cur = _median_depth(depth, box)
    if not (math.isfinite(ref) and math.isfinite(cur) and ref > 0):
        return 0.0
    return abs(cur - ref) / ref


@dataclass
class RefineResult:
    """What `refine_box` returns."""

    box: np.ndarray  # (4,) float32 refined x0, y0, x1, y1 in resized-image pixels
    loss: float  # the (depth-scaled) perceptual loss of `box`
    steps: int  # accepted steps
    history: list[dict] = field(default_factory=list)  # per iteration: box, loss, accepted, size_step (relative)


def _levels(query: dict[int, torch.Tensor]) -> dict[int, torch.Tensor]:
    """{level: (C, h, w)} from query maps given as (C, h, w) or (1, C, h, w)."""
    out = {}
    for lv, q in query.items():
        if q.ndim == 4 and q.shape[0] == 1:
            q = q[0]
        if q.ndim != 3:
            raise ValueError(f"query level {lv}: expected a (C, h, w) or (1, C, h, w) map, got {tuple(q.shape)}")
        out[lv] = q
    return out


def box_loss(
    query: dict[int, torch.Tensor],
    search_feats: dict[int, torch.Tensor],
    strides: dict[int, int],
    boxes: np.ndarray,
    reference_box: np.ndarray,
    cfg: RefineConfig,
    edge: dict[int, torch.Tensor],
    depth: np.ndarray | None = None,
    image_hw: tuple[int, int] | None = None,
    query_hw: tuple[int, int] | None = None,
) -> np.ndarray:
    """(K,) float64 losses of boxes (K, 4): `perceptual_loss` with size weight (reference size / size) **
    cfg.size_power, times (1 + depth_difference) when a depth map is given (boxes are mapped onto it by
    depth.shape / image_hw; image_hw None: the depth map has the image's size)."""
    q = _levels(query)
    b = np.asarray(boxes, np.float32).reshape(-1, 4)
    ref = np.asarray(reference_box, np.float32).reshape(4)
    ref_side = max(float(ref[2] - ref[0]), float(ref[3] - ref[1]))
    sides = np.maximum(b[:, 2] - b[:, 0], b[:, 3] - b[:, 1])
    sw = torch.from_numpy(size_weight(sides, ref_side, cfg.size_power))  # (K,)
    out_hw = {lv: tuple(t.shape[-2:]) for lv, t in q.items()}
    roi = roi_features(search_feats, b, out_hw, strides, query_hw)
    lw = dict(zip(sorted(q), cfg.level_weights))
    total, _ = perceptual_loss(q, roi, edge, lw, cfg.w_similarity, cfg.w_dissimilarity, sw)
    loss = total.detach().double().cpu().numpy()
    if depth is not None:
        sy, sx = (1.0, 1.0) if image_hw is None else (depth.shape[0] / image_hw[0], depth.shape[1] / image_hw[1])
        scale = np.array([sx, sy, sx, sy], np.float32)
        loss = loss * np.array([1 + depth_difference(depth, bb * scale, ref * scale) for bb in b])
    return loss


def _make_box(cx: float, cy: float, log_s: float, w0: float, h0: float) -> np.ndarray:
    s = math.exp(log_s)
    return np.array([cx - w0 * s / 2, cy - h0 * s / 2, cx + w0 * s / 2, cy + h0 * s / 2], np.float32)


def refine_box(
    query: dict[int, torch.Tensor],
    search_feats: dict[int, torch.Tensor],
    strides: dict[int, int],
    box: np.ndarray,
    cfg: RefineConfig,
    edge: dict[int, torch.Tensor],
    depth: np.ndarray | None = None,
    image_hw: tuple[int, int] | None = None,
    query_hw: tuple[int, int] | None = None,
) -> RefineResult:
    """Seed 000 spec 3: adjust `box` (4,) resized-image px for at most cfg.iterations steps of the perceptual loss.

    query {l: (C, h, w) or (1, C, h, w)}, search_feats {l: (1, C, H, W)}, strides {l: s}, edge {l: (h, w)} (see
    `edge_pyramid`), depth an (H_d, W_d) map of the search image or None, image_hw the resized image's (h, w)
    (maps boxes onto the depth map and keeps the centre inside the image), query_hw the query patch's pixels (see
    `roi_features`).

    Deviation from the seed: its rule size *= (1 - rate * loss) shrinks the box whenever the loss is positive, so
    it has no fixed point at the right size. This keeps its ingredients but descends the loss instead: each
    iteration evaluates the loss at the box, at size * (1 +- d) and (cfg.move_center) at the centre moved by
    +- d * size in x and y, d = PROBE * cfg.max_change, all in one batched roi_align; the step is -cfg.rate times
    the central-difference slope, in log-size (clamped to +- log(1 + cfg.max_change), the per-iteration limit)
    and in centre / size (clamped to +- cfg.max_change). The long side is clamped to [cfg.min_size, cfg.max_size]
    keeping the aspect ratio. A step is accepted only if the loss does not increase, else halved (HALVINGS times)
    and then the loop stops; it also stops when an accepted step changes size and centre by less than MIN_STEP.
    The similarity weight and the depth term are relative to the starting box; a starting box outside the size
    range is first clamped into it (not counted as an iteration).
    """
    if cfg.iterations < 0 or cfg.max_change <= 0 or not 0 < cfg.min_size <= cfg.max_size:
        raise ValueError(f"RefineConfig: need iterations >= 0, max_change > 0, 0 < min_size <= max_size; got {cfg}")
    start = np.asarray(box, np.float32).reshape(4)
    if not np.all(np.isfinite(start)) or start[2] <= start[0] or start[3] <= start[1]:
        raise ValueError(f"refine_box: box {start.tolist()} is empty or not finite")
    w0, h0 = float(start[2] - start[0]), float(start[3] - start[1])
    long0 = max(w0, h0)
    lo, hi = math.log(cfg.min_size / long0), math.log(cfg.max_size / long0)
    cx, cy, log_s = float(start[0] + start[2]) / 2, float(start[1] + start[3]) / 2, min(max(0.0, lo), hi)
    max_ls = math.log1p(cfg.max_change)
    d = PROBE * cfg.max_change
    dls = math.log1p(d) - math.log1p(-d)  # log-size distance between the two size probes

    def losses(states: list[tuple[float, float, float]]) -> np.ndarray:
        boxes = np.stack([_make_box(x, y, s, w0, h0) for x, y, s in states])
        return box_loss(query, search_feats, strides, boxes, start, cfg, edge, depth, image_hw, query_hw)

    def clamp(x: float, y: float, s: float) -> tuple[float, float, float]:
        s = min(max(s, lo), hi)
        if image_hw is not None:
            x, y = min(max(x, 0.0), float(image_hw[1])), min(max(y, 0.0), float(image_hw[0]))
        return x, y, s

    state = clamp(cx, cy, log_s)
    cur = float(losses([state])[0])
    history: list[dict] = []
    steps = 0
    for _ in range(cfg.iterations):
        x, y, s = state
        size_w, size_h = w0 * math.exp(s), h0 * math.exp(s)
        probes = [(x, y, s + math.log1p(d)), (x, y, s + math.log1p(-d))]
        if cfg.move_center:
            probes += [(x + d * size_w, y, s), (x - d * size_w, y, s), (x, y + d * size_h, s), (x, y - d * size_h, s)]
        pl = losses(probes)
        step_s = float(np.clip(-cfg.rate * (pl[0] - pl[1]) / dls, -max_ls, max_ls))
        step_x = step_y = 0.0
        if cfg.move_center:
            step_x = float(np.clip(-cfg.rate * (pl[2] - pl[3]) / (2 * d), -cfg.max_change, cfg.max_change))
            step_y = float(np.clip(-cfg.rate * (pl[4] - pl[5]) / (2 * d), -cfg.max_change, cfg.max_change))
        accepted, new_loss, new_state = False, cur, state
        for _half in range(HALVINGS + 1):
            cand = clamp(x + step_x * size_w, y + step_y * size_h, s + step_s)
            cand_loss = float(losses([cand])[0])
            if cand_loss <= cur:
                accepted, new_loss, new_state = True, cand_loss, cand
                break
            step_s, step_x, step_y = step_s / 2, step_x / 2, step_y / 2
        change = max(abs(new_state[2] - s), abs(new_state[0] - x) / size_w, abs(new_state[1] - y) / size_h)
        if accepted:
            state, cur, steps = new_state, new_loss, steps + 1
        size_step = math.expm1(new_state[2] - s) if accepted else 0.0  # relative change of the size
        box_now = _make_box(state[0], state[1], state[2], w0, h0).tolist()
        history.append({"box": box_now, "loss": cur, "accepted": accepted, "size_step": size_step})
        if not accepted or change < MIN_STEP:
            break
    return RefineResult(box=_make_box(*state[:2], state[2], w0, h0), loss=cur, steps=steps, history=history)
