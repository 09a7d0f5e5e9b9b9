"""Training the seed-001 patch network (roiqa.models.patchnet): symmetric InfoNCE between query crops and the
region around their pasted copies, plus lambda_cost times the soft quadtree's subdivision cost; thresholds learned."""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Sequence

import numpy as np
import torch

from roiqa.losses import symmetric_info_nce
from roiqa.models.patchnet import PatchNet, PatchNetConfig


def patchnet_loss(
    model: PatchNet,
    queries: torch.Tensor,
    query_hw: torch.Tensor,
    images: torch.Tensor,
    image_hw: torch.Tensor,
    tau: float = 0.1,
    lambda_cost: float = 1.0,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Symmetric InfoNCE (query i's positive is image i, the other images its negatives, and the converse) plus
    lambda_cost * mean subdivision cost of queries and images (soft quadtree). Returns (loss, float parts)."""
    b = len(queries)
    emb, aux = model(torch.cat([queries, images]), torch.cat([query_hw, image_hw]), soft=True)
    q, g = emb[:b], emb[b:]
    nce = symmetric_info_nce(q, g, tau)
    cost = aux["cost"].mean()
    loss = nce + lambda_cost * cost
    parts = {"loss": loss.item(), "nce": nce.item(), "cost": cost.item(), "leaves": aux["leaves"].mean().item()}
    parts["embedded"] = aux["embedded"].float().mean().item()
    return loss, parts


def context_crop(image: np.ndarray, box: np.ndarray, factor: float) -> np.ndarray:
    """The part of (H, W, 3) `image` inside box (x0, y0, x1, y1) grown about its centre by `factor`, clipped."""
    h, w = image.shape[:2]
    cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
    hw_, hh = max(1.0, (box[2] - box[0]) * factor / 2), max(1.0, (box[3] - box[1]) * factor / 2)
    x0, x1 = max(0, math.floor(cx - hw_)), min(w, math.ceil(cx + hw_))
    y0, y1 = max(0, math.floor(cy - hh)), min(h, math.ceil(cy + hh))
    return np.ascontiguousarray(image[y0:y1, x0:x1])


def make_optimizer(model: PatchNet, lr: float = 2e-3, threshold_lr: float = 1e-2) -> torch.optim.Optimizer:
    """AdamW over the networks (weight decay 1e-4) and, at its own rate, the thresholds (no decay)."""
    nets = [p for n, p in model.named_parameters() if n != "thresholds"]
    groups = [{"params": nets, "lr": lr, "weight_decay": 1e-4}]
    groups.append({"params": [model.thresholds], "lr": threshold_lr, "weight_decay": 0.0})
    return torch.optim.AdamW(groups)


def train_patchnet(
    photos: Sequence[np.ndarray],
    steps: int,
    cfg: PatchNetConfig | None = None,
    batch_size: int = 8,
    lr: float = 2e-3,
    threshold_lr: float = 1e-2,
    lambda_cost: float = 1.0,
    tau: float = 0.1,
    layout: str | None = None,
    seed: int = 0,
    device: str | None = None,
    log_every: int = 10,
    context: tuple[float, float] | None = (1.0, 2.0),
) -> tuple[PatchNet, list[dict]]:
    """Train a PatchNet on self-supervised pairs of `photos` (roiqa.train.data.synthesize_pair at image_size).

    The two views of an instance are the query crop and the region of the synthesized image around its pasted,
    augmented copy (rotation, perspective, colour, blur, occlusion, JPEG): the box grown by a factor drawn from
    `context` (None: the whole image), clipped to the image; both resized so the long side is image_size.
    `layout` overrides cfg.layout; the same (photos, batch_size, seed) give the same batches for either layout.
    cfg None: PatchNetConfig().
    Returns (model in eval mode, history: one dict per logged step: loss parts, thresholds, elapsed seconds).
    """
    from roiqa.config import TrainConfig
    from roiqa.stages.embed import prepare
    from roiqa.train.data import collate, sample_stream

    if steps < 1 or batch_size < 2:
        raise ValueError(f"steps must be >= 1 and batch_size >= 2, got {steps}, {batch_size}")
    cfg = cfg or PatchNetConfig()
    cfg = dataclasses.replace(cfg, layout=layout or cfg.layout, seed=seed)
    dev = torch.device(device or "cpu")
    model = PatchNet(cfg).to(dev).train()
    opt = make_optimizer(model, lr, threshold_lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * i / steps)))
    hi = min(160.0, cfg.image_size / math.sqrt(2))
    tcfg = TrainConfig(image_size=cfg.image_size, query_size=cfg.image_size, object_scale=(32.0, hi), seed=seed)
    stream = sample_stream(list(photos), tcfg, seed)
    rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(1,)))
    history, t0 = [], time.perf_counter()
    for step in range(1, steps + 1):
        batch = collate([next(stream) for _ in range(batch_size)])
        if context is None:
            views, hw = batch["image"], np.full((batch_size, 2), cfg.image_size)
        else:
            crops = [context_crop(im, box, rng.uniform(*context)) for im, box in zip(batch["image"], batch["box"])]
            views, hw = (np.stack(a) for a in zip(*[prepare(c, cfg.image_size)[:2] for c in crops]))
        q, q_hw = torch.from_numpy(batch["query"]).to(dev), torch.from_numpy(batch["query_hw"]).long().to(dev)
        v, v_hw = torch.from_numpy(views).to(dev), torch.from_numpy(np.asarray(hw)).long().to(dev)
        loss, parts = patchnet_loss(model, q, q_hw, v, v_hw, tau, lambda_cost)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % log_every == 0 or step in (1, steps):
            parts.update(step=step, seconds=time.perf_counter() - t0, thresholds=model.thresholds.tolist())
            history.append(parts)
    return model.eval(), history
