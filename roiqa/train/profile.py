"""Training a task profile's confidence estimator from box supervision (seed 002): per-pixel BCE + Dice against the
boxes of pasted objects (self-supervised pairs) or of a training manifest, and the threshold curve a profile's
thresholds are chosen from. Used by `jobs/profile.py`."""

from __future__ import annotations

import math
import time
from collections.abc import Iterator

import numpy as np
import pyarrow as pa
import torch

from roiqa.io import uri as uri_mod
from roiqa.losses import mask_loss
from roiqa.stages.masks import ConfidenceEstimator


def box_mask(boxes: np.ndarray, h: int, w: int) -> np.ndarray:
    """(h, w) float32: 1 inside any box of `boxes` ((4,) or (N, 4) x0, y0, x1, y1, x1/y1 exclusive), else 0."""
    out = np.zeros((h, w), np.float32)
    for x0, y0, x1, y1 in np.asarray(boxes, np.float64).reshape(-1, 4):
        out[max(0, round(y0)) : max(0, round(y1)), max(0, round(x0)) : max(0, round(x1))] = 1.0
    return out


def manifest_samples(
    manifest: pa.Table, image_size: int, max_pixels: int, seed: int, holdout: bool | None = None
) -> Iterator[dict]:
    """Infinite samples {'image' (S, S, 3) uint8, 'box' (N, 4)} from a training manifest (TRAIN_MANIFEST_SCHEMA):
    a random image resized to long side S and zero-padded, with *every* box the manifest gives for it (another
    labelled instance in the same image is relevant too). `holdout` True / False: only the held-out images / the
    others (every 5th image in URI-hash order, the first included, is held out; a one-image manifest serves both
    splits); None: all images."""
    from roiqa.io.imageio import decode_image, pad_to_square, resize_long_side
    from roiqa.train.data import BOX, URI, instance_hash, validate_manifest

    table = validate_manifest(manifest, "manifest")
    boxes: dict[str, list[np.ndarray]] = {}
    all_boxes = np.stack([table.column(c).to_numpy() for c in BOX], axis=1)  # (N, 4)
    for u, box in zip(table.column(URI).to_pylist(), all_boxes):
        boxes.setdefault(u, []).append(box)
    order = sorted(boxes, key=lambda u: (instance_hash(u), u))
    held = set(order[::5])
    uris = order if holdout is None or len(order) < 2 else [u for u in order if (u in held) == holdout]
    rng = np.random.default_rng(seed)
    cache: dict[str, tuple[np.ndarray, float]] = {}
    while True:
        u = uris[int(rng.integers(len(uris)))]
        if u not in cache:
            if len(cache) >= 256:
                cache.pop(next(iter(cache)))
            resized, scale = resize_long_side(decode_image(uri_mod.read_bytes(u), u, max_pixels=max_pixels), image_size)
            cache[u] = (pad_to_square(resized, image_size), scale)
        image, scale = cache[u]
        yield {"image": image, "box": np.stack(boxes[u]).astype(np.float32) * np.float32(scale)}


def _batches(samples: Iterator[dict], batch_size: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(images (B, S, S, 3) uint8, box-mask targets (B, S, S) float32) from samples with 'image' and 'box'."""
    while True:
        items = [next(samples) for _ in range(batch_size)]
        images = np.stack([s["image"] for s in items])
        h, w = images.shape[1:3]
        yield images, np.stack([box_mask(s["box"], h, w) for s in items])


def train_profile(
    samples: Iterator[dict],
    steps: int,
    lr: float = 3e-3,
    batch_size: int = 8,
    dice_weight: float = 1.0,
    estimator: ConfidenceEstimator | None = None,
    seed: int = 0,
    max_seconds: float | None = None,
) -> tuple[ConfidenceEstimator, list[float]]:
    """Train an estimator on samples with 'image' (S, S, 3) uint8 and 'box' ((4,) or (N, 4), every box relevant).

    AdamW, the learning rate cosine-decayed to 5% over the progress max(step / steps, elapsed / max_seconds):
    with a time budget the run ends early but still decays fully. Returns (estimator in eval mode, loss per step).
    """
    if steps < 1 or batch_size < 1:
        raise ValueError(f"train_profile: steps and batch_size must be >= 1, got {steps}, {batch_size}")
    if estimator is None:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            estimator = ConfidenceEstimator()
    device = next(estimator.parameters()).device
    estimator.train()
    opt = torch.optim.AdamW(estimator.parameters(), lr=lr, weight_decay=1e-4)
    t0, losses = time.perf_counter(), []
    for step, (images, target) in zip(range(steps), _batches(samples, batch_size)):
        progress = step / steps
        if max_seconds:
            progress = max(progress, (time.perf_counter() - t0) / max_seconds)
        if progress >= 1:
            break
        for group in opt.param_groups:
            group["lr"] = lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * progress)))
        loss = mask_loss(estimator.logits(images), torch.from_numpy(target).to(device), dice_weight)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    return estimator.eval(), losses


@torch.inference_mode()
def mask_curve(
    estimator: ConfidenceEstimator, samples: list[dict], thresholds: np.ndarray, batch_size: int = 8
) -> dict[str, list[float]]:
    """Pixel-pooled IoU, precision and recall of `threshold_mask` against the box masks, and the mean coverage,
    at every threshold; plus the mean confidence inside and outside the boxes. Samples as for train_profile."""
    ts = np.asarray(thresholds, np.float64)
    if (np.diff(ts) <= 0).any():
        raise ValueError("mask_curve: thresholds must be strictly increasing")
    tp, fp, fn = (np.zeros(len(ts)) for _ in range(3))
    total, inside, outside, n_in, n_out = 0, 0.0, 0.0, 0, 0
    for i in range(0, len(samples), batch_size):
        chunk = samples[i : i + batch_size]
        images = np.stack([s["image"] for s in chunk])
        h, w = images.shape[1:3]
        target = np.stack([box_mask(s["box"], h, w) for s in chunk]) > 0
        conf = estimator(images).float().cpu().numpy()
        inside += float(conf[target].sum())
        outside += float(conf[~target].sum())
        n_in, n_out, total = n_in + int(target.sum()), n_out + int((~target).sum()), total + target.size
        # a pixel is kept at threshold j iff thresholds[j] < conf iff j < (number of thresholds below conf)
        below = np.searchsorted(ts, conf, side="left")  # (B, H, W)
        for mask, acc in ((target, tp), (~target, fp)):
            counts = np.bincount(below[mask], minlength=len(ts) + 1)
            acc += counts[::-1].cumsum()[::-1][1:]  # acc[j] += #pixels with below > j
        fn_counts = np.bincount(below[target], minlength=len(ts) + 1).cumsum()[:-1]
        fn += fn_counts  # #object pixels with below <= j
    kept = tp + fp
    with np.errstate(invalid="ignore", divide="ignore"):
        out = {
            "threshold": [float(t) for t in thresholds],
            "iou": (tp / (tp + fp + fn)).tolist(),
            "precision": np.where(tp + fp > 0, tp / (tp + fp), 1.0).tolist(),
            "recall": (tp / (tp + fn)).tolist(),
            "coverage": (kept / total).tolist(),
        }
    out["mean_conf_inside"] = [inside / max(n_in, 1)]
    out["mean_conf_outside"] = [outside / max(n_out, 1)]
    return out
