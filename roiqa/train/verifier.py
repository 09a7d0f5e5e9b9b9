"""Seed 004: train the ROI-mask verifier on views of training-photo crops and calibrate it (see roiqa.stages.verify).

Training data. An instance is a crop of a TRAINING photograph (never an evaluation one). A scene view is a square
background cut from another training photo with an augmented copy of the crop pasted in (train_data's paste: scale,
rotation, perspective, colour jitter, blur, occluder, JPEG), sometimes after a distractor crop of another instance;
the ROI mask is the pasted copy's box and the whole scene, resized, is the input, so the net sees object and
context. Half the scene views (`small_frac`) draw the object's long side below a fifth of the input, so small
regions are well represented. A query view is the crop alone, framed the way `Verifier` frames query patches. The
net classifies each view into its instance id (cosine softmax, cross-entropy); a, b of the probability are fitted on
held-out instances (crops never trained on).
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from roiqa.config import TrainConfig, to_dict
from roiqa.eval.demo_data import TRAINING_PHOTOS, load_photo
from roiqa.eval.metrics import roc_auc
from roiqa.models.roimask import RoiMaskConfig, RoiMaskNet
from roiqa.stages.verify import SMALL, Verifier, query_view, to_tensors

# train_data's augmentation helpers (private there, reused here rather than copied).
from roiqa.train.data import _color_jitter, _finish, _paste, _sample_crop, _square_background

_GALLERY = 256  # side of the scenes that calibration regions are cut from (pixels)


@dataclass(frozen=True)
class VerifierTrainConfig:
    instances: int = 100  # training instances (classes): crops of TRAINING_PHOTOS
    holdout_instances: int = 48  # further crops, never trained on: calibration pairs and verification AUC
    steps: int = 800  # optimiser steps
    pool: int = 12288  # views drawn once and sampled (with replacement) by every step; 0: fresh views every step
    batch_size: int = 32  # views per step
    lr: float = 2e-3  # AdamW learning rate (linear warm-up over 20 steps, cosine decay to 5%)
    weight_decay: float = 5e-4  # AdamW weight decay
    small_frac: float = 0.5  # fraction of scene views whose object's long side is drawn in [8, input/5] pixels
    query_frac: float = 0.15  # fraction of views that are the crop alone, framed like Verifier's query input
    distractor_prob: float = 0.5  # probability that a scene also holds another instance (the mask must pick)
    eval_views: int = 512  # held-out scene views of the training instances (accuracy overall / small / large)
    context: float = 2.0  # region window side / box long side (training views of the query and calibration)
    seed: int = 0  # seed of instances, views and initialisation order


def sample_instances(
    photos: Sequence[np.ndarray], n: int, rng: np.random.Generator, avoid: Sequence[tuple] = ()
) -> list[tuple[int, tuple[int, int, int, int]]]:
    """`n` (photo index, crop box) instances; a crop overlapping an earlier one by IoU > 0.2 is redrawn (20 tries)."""
    taken: list[tuple[int, tuple[int, int, int, int]]] = list(avoid)
    out = []
    for i in range(n):
        p = i % len(photos)
        for _ in range(20):
            box = _sample_crop(photos[p], rng)
            if all(q != p or _iou(box, b) <= 0.2 for q, b in taken):
                break
        taken.append((p, box))
        out.append((p, box))
    return out


def _iou(a: tuple, b: tuple) -> float:
    iw = max(0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


class Views:
    """Scene and query views of instances (crops of `photos`); every method is deterministic given its rng."""

    def __init__(self, photos: Sequence[np.ndarray], instances: list[tuple[int, tuple]], size: int):
        self.photos, self.instances, self.size = photos, instances, size
        self.crops = [photos[p][b[1] : b[3], b[0] : b[2]] for p, b in instances]
        self.small = TrainConfig(image_size=size, object_scale=(8.0, max(8.0, size / 5)))
        self.large = TrainConfig(image_size=size, object_scale=(size / 4, size * 0.7))

    def _other_photo(self, src: int, rng: np.random.Generator) -> np.ndarray:
        j = int(rng.integers(len(self.photos) - 1))
        return self.photos[j + (j >= src)]

    def scene(
        self, k: int, small: bool, distractor: bool, rng: np.random.Generator, size: int | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """A scene (size, size, 3) uint8 with instance `k` pasted in, and its box; see the module docstring."""
        size = size or self.size
        src = self.instances[k][0]
        cfg = other_cfg = self.small if small else self.large
        if size != self.size:  # a gallery-like scene (calibration): objects 24-160 px
            cfg = other_cfg = TrainConfig(image_size=size, object_scale=(24.0, min(160.0, size * 0.6)))
        elif rng.random() < 0.5:
            other_cfg = self.large
        canvas = _square_background(self._other_photo(src, rng), size, rng).astype(np.float32)
        occluders = lambda: self._other_photo(src, rng)  # noqa: E731
        if distractor:
            other = int(rng.integers(len(self.crops) - 1))
            other += other >= k
            _paste(canvas, self.crops[other], other_cfg, rng, occluders)
        box = _paste(canvas, self.crops[k], cfg, rng, occluders)
        return _finish(canvas, cfg, rng), np.array(box, np.float32)

    def query(self, k: int, context: float, rng: np.random.Generator | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Instance `k`'s crop framed as Verifier frames a query (colour-jittered when `rng` is given)."""
        crop = self.crops[k] if rng is None else _color_jitter(np.ascontiguousarray(self.crops[k]), 0.2, rng)
        return query_view(crop, self.size, context)

    def batch(self, n: int, cfg: VerifierTrainConfig, rng: np.random.Generator) -> dict[str, np.ndarray]:
        """`n` training views: images (n, S, S, 3) uint8, boxes (n, 4), labels (n,) int64, kind (n,) 0 query /
        1 small scene / 2 large scene."""
        images, boxes, labels, kind = [], [], [], []
        for _ in range(n):
            k = int(rng.integers(len(self.instances)))
            if rng.random() < cfg.query_frac:
                img, box = self.query(k, cfg.context, rng)
                kind.append(0)
            else:
                small = bool(rng.random() < cfg.small_frac)
                img, box = self.scene(k, small, bool(rng.random() < cfg.distractor_prob), rng)
                kind.append(1 if max(box[2] - box[0], box[3] - box[1]) < SMALL * self.size else 2)
            images.append(img)
            boxes.append(box)
            labels.append(k)
        labels_a, kind_a = np.array(labels, np.int64), np.array(kind, np.int64)
        return {"images": np.stack(images), "boxes": np.stack(boxes), "labels": labels_a, "kind": kind_a}


def training_photos() -> list[np.ndarray]:
    """The TRAINING_PHOTOS (never an evaluation photograph)."""
    return [load_photo(p) for p in TRAINING_PHOTOS]


def fit_logistic(x: np.ndarray, labels: np.ndarray, iters: int = 200) -> tuple[float, float]:
    """(a, b) minimising the class-balanced logistic loss of sigmoid(a * x + b) against `labels`."""
    x_t = torch.as_tensor(np.asarray(x, np.float64).ravel())
    y_t = torch.as_tensor(np.asarray(labels, bool).ravel(), dtype=torch.float64)
    w = torch.where(y_t > 0, 0.5 / y_t.sum().clamp(min=1), 0.5 / (1 - y_t).sum().clamp(min=1))
    params = torch.tensor([10.0, -5.0], dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([params], max_iter=iters, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = (w * F.binary_cross_entropy_with_logits(params[0] * x_t + params[1], y_t, reduction="none")).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return float(params[0].detach()), float(params[1].detach())


@torch.no_grad()
def accuracy(model: RoiMaskNet, views: dict[str, np.ndarray], batch_size: int = 64) -> dict[str, float]:
    """Classification accuracy of `model` on views (Views.batch output): overall, small and large scene regions."""
    model.eval()
    preds = []
    for i in range(0, len(views["labels"]), batch_size):
        logits, _ = model(*to_tensors(views["images"][i : i + batch_size], views["boxes"][i : i + batch_size]))
        preds.append(logits.argmax(1).numpy())
    ok = np.concatenate(preds) == views["labels"]
    kind = views["kind"]
    return {
        "acc": float(ok[kind > 0].mean()),
        "acc_small": float(ok[kind == 1].mean()) if (kind == 1).any() else math.nan,
        "acc_large": float(ok[kind == 2].mean()) if (kind == 2).any() else math.nan,
        "n_small": int((kind == 1).sum()),
        "n_large": int((kind == 2).sum()),
    }


def calibration_pairs(
    verifier: Verifier, views: Views, rng: np.random.Generator, per_instance: int = 2
) -> tuple[np.ndarray, np.ndarray]:
    """(cosines, labels) of every (query, region) pair over `views`' instances: each query is the clean crop, each
    instance has `per_instance` regions cut from _GALLERY-pixel scenes; label True for the same instance."""
    q = np.stack([verifier.embed_query(c) for c in views.crops])  # (Q, D)
    regions, owner = [], []
    for k in range(len(views.instances)):
        for _ in range(per_instance):
            img, box = views.scene(k, False, bool(rng.random() < 0.5), rng, size=_GALLERY)
            regions.append(verifier.embed_regions(img, box[None])[0])
            owner.append(k)
    cos = q @ np.stack(regions).T  # (Q, R)
    labels = np.arange(len(q))[:, None] == np.array(owner)[None, :]
    return cos.ravel(), labels.ravel()


def training_views(cfg: VerifierTrainConfig, size: int) -> tuple[Views, Views]:
    """(training instances' views, held-out instances' views) at input side `size`; deterministic given cfg.seed."""
    photos = training_photos()
    rng = np.random.default_rng(cfg.seed)
    instances = sample_instances(photos, cfg.instances, rng)
    holdout = sample_instances(photos, cfg.holdout_instances, rng, avoid=instances)
    return Views(photos, instances, size), Views(photos, holdout, size)


def training_batches(cfg: VerifierTrainConfig, views: Views) -> Iterator[dict[str, np.ndarray]]:
    """The `cfg.steps` training batches (Views.batch), the same for every model given cfg.seed.

    With `cfg.pool`, `cfg.pool` views are drawn first (the cost of one draw, whatever the steps) and each batch
    samples them: a net that trains faster than views are made sees each view several times instead of waiting.
    """
    rng = np.random.default_rng([cfg.seed, 1])
    if cfg.pool <= 0:
        for _ in range(cfg.steps):
            yield views.batch(cfg.batch_size, cfg, rng)
        return
    chunks = [views.batch(min(256, cfg.pool - i), cfg, rng) for i in range(0, cfg.pool, 256)]
    pool = {k: np.concatenate([c[k] for c in chunks]) for k in chunks[0]}
    for _ in range(cfg.steps):
        idx = np.sort(rng.choice(cfg.pool, cfg.batch_size, replace=False))
        yield {k: v[idx] for k, v in pool.items()}


def train_verifier(
    model_cfg: RoiMaskConfig,
    cfg: VerifierTrainConfig,
    log: Callable[[str], None] | None = None,
    batches: Iterable[dict[str, np.ndarray]] | None = None,
) -> tuple[RoiMaskNet, dict]:
    """Train a RoiMaskNet on views of `cfg.instances` training crops, calibrate it on held-out crops; returns the
    model (eval mode, `.calibration` = {"a", "b", "context"}) and a JSON-able log.

    `batches`: precomputed `training_batches(cfg, views)` (a list shared by several models saves making them again).
    """
    t_start = time.perf_counter()
    views, holdout = training_views(cfg, model_cfg.input_size)
    batches = training_batches(cfg, views) if batches is None else batches
    model = RoiMaskNet(RoiMaskConfig(**{**to_dict(model_cfg), "num_classes": cfg.instances}))
    decay = [p for n, p in model.named_parameters() if p.ndim > 1 and not n.startswith("side.")]
    rest = [p for n, p in model.named_parameters() if p.ndim <= 1 or n.startswith("side.")]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay}, {"params": rest}], lr=cfg.lr)
    warm = 20

    def lr_at(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        t = (step - warm) / max(1, cfg.steps - warm)
        return 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * t))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    losses, t_data, t_model = [], 0.0, 0.0
    batch_iter = iter(batches)
    for step in range(cfg.steps):
        t0 = time.perf_counter()
        b = next(batch_iter)
        images, masks = to_tensors(b["images"], b["boxes"])
        t1 = time.perf_counter()
        model.train()
        logits, _ = model(images, masks)
        loss = F.cross_entropy(logits, torch.from_numpy(b["labels"]))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        t_data, t_model = t_data + t1 - t0, t_model + time.perf_counter() - t1
        losses.append(loss.item())
        if log and (step + 1) % 50 == 0:
            log(f"step {step + 1}/{cfg.steps} loss {np.mean(losses[-50:]):.3f}")
    model.eval()
    held = views.batch(cfg.eval_views, dataclasses.replace(cfg, query_frac=0.0), np.random.default_rng([cfg.seed, 2]))
    acc = accuracy(model, held)
    verifier = Verifier.from_model(model, a=1.0, b=0.0, context=cfg.context)
    cos, labels = calibration_pairs(verifier, holdout, np.random.default_rng([cfg.seed, 3]))
    a, b = fit_logistic(cos, labels)
    model.calibration = {"a": a, "b": b, "context": cfg.context}
    every = max(1, cfg.steps // 20)
    report = {
        "model": to_dict(model.cfg),
        "train": to_dict(cfg),
        "loss_first": float(np.mean(losses[: min(20, len(losses))])),
        "loss_last": float(np.mean(losses[-20:])),
        "loss_curve": [[i, float(np.mean(losses[i - every : i]))] for i in range(every, len(losses) + 1, every)],
        **{f"heldout_{k}": v for k, v in acc.items()},
        "verify_auc_holdout": roc_auc(cos, labels),
        "verify_pairs": [int(labels.sum()), int((~labels).sum())],
        "calibration": model.calibration,
        "seconds": {"data": t_data, "model": t_model, "total": time.perf_counter() - t_start},
    }
    return model, report
