"""The seed-003 training objective (eq. 6) of the matcher on a batch of (query, positive, negative) triples.

A batch is what `roiqa.train.data.collate` stacks: query (B, Q, Q, 3) uint8 with its valid query_hw (B, 2), image
(B, S, S, 3) uint8 holding the instance at box (B, 4), negative (B, S, S, 3) uint8 without it, instance (B,) ids.
Queries are encoded the way the query pipeline encodes them (`roiqa.stages.rerank`): the global descriptor from the
patch resized to `query.descriptor_size`, z and the correlation kernels from the mirror-padded patch (`context_pad`).
The correlation kernel is the patch resized to the ground-truth box size (the size the multi-scale rerank would
pick), so the heatmap target is the box in correlation-window coordinates (`roiqa.losses.window_targets`).
"""

from __future__ import annotations

import itertools
import json
import math
import os
from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image
from torchvision.ops import roi_align

from roiqa.config import RoiqaConfig
from roiqa.io.imageio import resize_long_side
from roiqa.losses import (
    dice_loss,
    focal_loss,
    info_nce,
    scale_consistency_loss,
    total_loss,
    triplet_region_loss,
    window_targets,
)
from roiqa.models.matcher import Matcher
from roiqa.ops.fusion import upsample_to

LOSS_NAMES = ("nce", "dense", "trip", "scale")


def loss_weights(cfg: RoiqaConfig) -> dict[str, float]:
    t = cfg.train
    return {"nce": t.lambda_nce, "dense": t.lambda_dense, "trip": t.lambda_trip, "scale": t.lambda_scale}


@dataclass
class DescriptorQueue:
    """Global image descriptors of earlier batches (no gradient), mined for the hardest InfoNCE negatives."""

    size: int
    descriptors: torch.Tensor = field(default_factory=lambda: torch.zeros(0, 0))
    instances: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.long))

    def push(self, descriptors: torch.Tensor, instances: torch.Tensor) -> None:
        d, i = descriptors.detach().float().cpu(), instances.detach().long().cpu()
        if self.descriptors.numel():
            d, i = torch.cat([d, self.descriptors]), torch.cat([i, self.instances])
        self.descriptors, self.instances = d[: self.size], i[: self.size]

    def hardest(self, queries: torch.Tensor, instances: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, k, C) the k queue entries most similar to each query among other instances, and their (B, k) mask."""
        b = len(queries)
        if k <= 0 or not self.descriptors.numel():
            return queries.new_zeros(b, 0, queries.shape[1]), torch.zeros(b, 0, dtype=torch.bool)
        bank = self.descriptors.to(queries.device)
        sims = queries.detach() @ bank.T  # (B, N)
        other = instances.cpu()[:, None] != self.instances[None, :]  # (B, N)
        sims = sims.masked_fill(~other.to(sims.device), float("-inf"))
        k = min(k, bank.shape[0])
        top = sims.topk(k, dim=1)
        return bank[top.indices], torch.isfinite(top.values).cpu()


def resize_hw(patch: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
    """Bilinear resize of an (h, w, 3) uint8 patch to hw = (height, width)."""
    if patch.shape[:2] == tuple(hw):
        return patch
    return np.asarray(Image.fromarray(patch).resize((int(hw[1]), int(hw[0])), Image.Resampling.BILINEAR))


def batch_losses(
    model: Matcher,
    batch: dict[str, np.ndarray],
    cfg: RoiqaConfig,
    queue: DescriptorQueue | None = None,
    device: torch.device | str = "cpu",
) -> tuple[torch.Tensor, dict[str, float]]:
    """Eq. 6 on one batch: (total loss with grad, {"loss", "nce", "dense", "trip", "scale", "pos_sim", "neg_sim"}).

    `model` may be wrapped (DDP): its `.module` is used for the pieces, its forward is never called.
    """
    device = torch.device(device)
    net: Matcher = getattr(model, "module", model)
    t, q = cfg.train, cfg.query
    queries, query_hw = np.array(batch["query"]), np.asarray(batch["query_hw"])
    images = np.concatenate([np.asarray(batch["image"]), np.asarray(batch["negative"])])  # (2B, S, S, 3)
    boxes = torch.as_tensor(np.array(batch["box"]), dtype=torch.float32)
    instances = torch.as_tensor(np.array(batch["instance"]), dtype=torch.long)
    b = len(queries)
    stride = net.stride(net.cfg.levels[0])

    feats = net.pyramid(torch.from_numpy(np.ascontiguousarray(images)).to(device))  # one backbone pass
    g_img = net.global_descriptor(feats)  # (2B, C)

    g_q, dense, kl, pos_sims, neg_sims = [], [], [], [], []
    for i in range(b):
        h, w = (int(v) for v in query_hw[i])
        patch = queries[i, :h, :w]
        small, _ = resize_long_side(patch, q.descriptor_size)  # as the query pipeline's encoders do
        g_q.append(net.global_descriptor(net.pyramid(torch.from_numpy(np.array(small[None])).to(device))))
        z = net.query_descriptor(net.patch_features(small, q.context_pad))[0]  # (C,)

        bx = boxes[i]
        kh = max(8, int(round(float(bx[3] - bx[1]))))
        kw = max(8, int(round(float(bx[2] - bx[0]))))
        kernel = net.patch_features(resize_hw(patch, (kh, kw)), q.context_pad)
        pair = {lv: f[[i, b + i]] for lv, f in feats.items()}  # positive and negative image
        levels = net.level_heatmaps(kernel, pair)  # [(2, H_l, W_l)]
        size = tuple(levels[0].shape[-2:])
        up = upsample_to(levels, size)  # (L, 2, H, W)
        fused = net.fuse(levels)  # (2, H, W)

        target = torch.zeros_like(fused)
        target[0] = window_targets(size, bx, (kh, kw), stride).to(device)
        logits = heatmap_logits(fused, t.heatmap_temperature)
        dense.append(
            focal_loss(logits, target, t.focal_alpha, t.focal_gamma) + dice_loss(logits[:1], target[:1], eps=1.0)
        )
        kl.append(scale_consistency_loss(up[:, :1].permute(1, 0, 2, 3), fused[:1], t.heatmap_temperature))

        sims = []
        for j, extra in ((0, bx[None]), (1, None)):
            rb, _, _ = net.peak_boxes(fused[j], [(kh, kw)], q.peaks, q.nms_iou)
            if extra is not None:  # the true box is always among the positive's regions
                rb = torch.cat([extra, rb])
            regions = net.region_descriptors(feats[net.region_level][[b * j + i]], rb.to(device), net.region_level)
            sims.append(regions @ z)
        pos_sims.append(sims[0].max())
        neg_sims.append(sims[1].max())

    gq = torch.cat(g_q)  # (B, C)
    # Negatives of query i: every other search image of the batch not showing instance i, and mined ones.
    inst_all = torch.cat([instances, torch.full_like(instances, -1)])  # negatives show no batch instance
    mask = instances[:, None] != inst_all[None, :]
    mined, mined_mask = (queue or DescriptorQueue(0)).hardest(gq, instances, t.mined_negatives)
    negs = torch.cat([g_img[None].expand(b, -1, -1), mined.to(g_img.dtype)], dim=1)  # (B, 2B + k, C)
    nce = info_nce(gq, g_img[:b], negs, t.tau, torch.cat([mask, mined_mask], dim=1).to(device))

    pos, neg = torch.stack(pos_sims)[:, None], torch.stack(neg_sims)[:, None]
    parts = {
        "nce": nce,
        "dense": torch.stack(dense).mean(),
        "trip": triplet_region_loss(pos, neg, t.margin),
        "scale": torch.stack(kl).mean(),
    }
    loss = total_loss(parts, loss_weights(cfg))
    if queue is not None:
        queue.push(g_img, inst_all)
    stats = {k: float(v.detach()) for k, v in parts.items()}
    stats.update(loss=float(loss.detach()), pos_sim=float(pos.detach().mean()), neg_sim=float(neg.detach().mean()))
    return loss, stats


def heatmap_logits(heatmap: torch.Tensor, temperature: float, threshold: float = 2.0) -> torch.Tensor:
    """Logits for the focal and Dice terms: temperature * (z - threshold), z the heatmap z-scored per map.

    Raw cosines would make "every cell low" a minimum of the focal loss that needs no matching at all (features
    that stop varying give H = 0 everywhere); on z-scores a map can only lower most cells by raising a few, and a
    cell `threshold` standard deviations above its map's mean is at p = 0.5. Measured: on raw cosines training
    collapsed every region descriptor onto one (cosine 1.0 between positive and negative regions within 20 steps).
    """
    flat = heatmap.flatten(-2)
    mu = flat.mean(-1, keepdim=True)[..., None]
    sd = flat.std(-1, keepdim=True)[..., None].clamp(min=1e-4)
    return temperature * ((heatmap - mu) / sd - threshold)


@torch.no_grad()
def center_head(model: Matcher, batch: dict[str, np.ndarray], device: torch.device | str = "cpu") -> torch.Tensor:
    """Data-dependent start for the descriptor head: its output bias becomes minus the mean pooled feature.

    GeM pools clamped (positive) features, so every untrained descriptor shares one large component and all cosines
    sit near 1 for positives and negatives alike (benchmarks/RESULTS.md), which leaves the triplet and
    InfoNCE terms almost no gradient. With the head's last layer still zero, head(x) = x - mean: descriptors start
    centred on the pooled features of `batch` (its images' global and ground-truth region poolings). Returns the mean.
    """
    net: Matcher = getattr(model, "module", model)
    images = torch.from_numpy(np.concatenate([np.asarray(batch["image"]), np.asarray(batch["negative"])])).to(device)
    feats = net.pyramid(images)
    pooled = [net.gem(feats[net.cfg.descriptor_level])]
    lv = net.region_level
    boxes = torch.as_tensor(np.array(batch["box"]), dtype=torch.float32)
    for i, bx in enumerate(boxes):
        rois = roi_align(feats[lv][i : i + 1], [bx[None].to(device)], (3, 3), 1.0 / net.stride(lv), 2, True)
        pooled.append(net.gem(rois))
    mean = torch.cat(pooled).mean(0)
    net.head.fc2.bias.copy_(net.head.fc2.bias - mean)
    return mean


def trainable_parameters(model: Matcher, freeze: str) -> list[torch.nn.Parameter]:
    """Parameters to optimise under `train.freeze`: none | stem (ResNet conv1, bn1, layer1 fixed) | body (ResNet)."""
    if freeze not in ("none", "stem", "body"):
        raise ValueError(f"train.freeze must be none, stem or body, got {freeze!r}")
    body = model.body.body  # torchvision IntermediateLayerGetter over the ResNet
    frozen: set[int] = set()
    if freeze == "stem":
        for name in ("conv1", "bn1", "layer1"):
            frozen |= {id(p) for p in getattr(body, name).parameters()}
    elif freeze == "body":
        frozen = {id(p) for p in body.parameters()}
    params = []
    for p in model.parameters():
        p.requires_grad_(id(p) not in frozen)
        if p.requires_grad:
            params.append(p)
    return params


def refined_localization(
    model: Matcher, batch: dict[str, np.ndarray], cfg: RoiqaConfig, device: torch.device | str = "cpu"
) -> dict[str, float]:
    """Localization of the triples' positives from the query at its own size, before and after ROI refinement.

    The correlation kernel is the query patch as the batch holds it (long side `train.query_size`, not the true
    size, as the rerank would try it), its best heatmap peak gives a box of the patch's size, and
    `roiqa.stages.refine.refine_box` with `cfg.refine` (enabled or not) adjusts it on the raw FPN features. Returns
    {"val_loc50_query_size", "val_loc50_refined"}: the fractions of positives whose box has IoU >= 0.5 with the
    truth, before and after refinement, and "val_iou_refined", the mean IoU after it.
    """
    from roiqa.boxes import box_iou
    from roiqa.stages.refine import edge_pyramid, edge_weights, refine_box

    net = getattr(model, "module", model)
    was_training = net.training
    net.eval()
    before, after, ious = [], [], []
    with torch.no_grad():
        for i in range(len(batch["query"])):
            h, w = (int(v) for v in batch["query_hw"][i])
            patch = np.ascontiguousarray(batch["query"][i, :h, :w])
            kernel = net.patch_features(patch, cfg.query.context_pad)
            image = torch.from_numpy(np.ascontiguousarray(batch["image"][i : i + 1])).to(device)
            feats = net.pyramid(image)
            box = net.localize([((h, w), kernel)], feats, None, 1, cfg.query.nms_iou).boxes[0].numpy()
            truth = np.asarray(batch["box"][i], np.float32)[None]
            query = {lv: f[0] for lv, f in kernel.items()}
            strides = {lv: net.stride(lv) for lv in query}
            edge = edge_pyramid(
                edge_weights(patch), {lv: tuple(f.shape[-2:]) for lv, f in query.items()}, strides, device
            )
            hw = tuple(image.shape[1:3])
            refined = refine_box(query, feats, strides, box, cfg.refine, edge, image_hw=hw, query_hw=(h, w)).box
            before.append(float(box_iou(box[None], truth)[0, 0]) >= 0.5)
            iou = float(box_iou(np.asarray(refined, np.float32)[None], truth)[0, 0])
            after.append(iou >= 0.5)
            ious.append(iou)
    net.train(was_training)
    return {
        "val_loc50_query_size": float(np.mean(before)),
        "val_loc50_refined": float(np.mean(after)),
        "val_iou_refined": float(np.mean(ious)),
    }


# --- the training step and validation, shared by `roiqa train` workers and `roiqa tune` trials ----------------------
CLIP_NORM = 5.0  # gradients are clipped to this global L2 norm before each AdamW step


def learning_rate(cfg: RoiqaConfig, step: int) -> float:
    """Linear warm-up over the first 5% of steps, then cosine decay to 5% of train.lr at the last step."""
    t = cfg.train
    total = max(1, t.epochs * t.steps_per_epoch)
    warm = max(1, total // 20)
    if step < warm:
        return t.lr * (step + 1) / warm
    frac = min(1.0, (step - warm) / max(1, total - warm))
    return t.lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * frac)))


def freeze_batchnorm(model: torch.nn.Module) -> None:
    """BatchNorm layers keep their running statistics (eval mode) while the rest trains, as detection fine-tuning
    does with frozen BN: query patches come one at a time, and inference uses the running statistics anyway."""
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.eval()


class Objective(torch.nn.Module):
    """`batch_losses` as a module's forward, so that a data-parallel wrapper (DDP, through Ray Train's
    `prepare_model`) sees the pass and averages the gradients of the matcher's parameters across workers."""

    def __init__(self, model: Matcher) -> None:
        super().__init__()
        self.model = model

    def forward(self, batch, cfg: RoiqaConfig, queue, device) -> tuple[torch.Tensor, dict[str, float]]:
        return batch_losses(self.model, batch, cfg, queue, device)


class TrainStep:
    """One optimisation step of the matcher: learning rate of the schedule, eq. 6 on a batch, backward, gradient
    clipping, AdamW over `train.freeze`'s trainable parameters; BatchNorm statistics frozen.

    `objective` is `Objective(model)`, or its data-parallel wrapper (whose forward averages gradients across
    workers during the backward pass). The hard-negative queue of the descriptor loss lives here too.
    """

    def __init__(self, model: Matcher, cfg: RoiqaConfig, device: torch.device | str = "cpu") -> None:
        t = cfg.train
        self.cfg, self.device = cfg, torch.device(device)
        model.train()
        freeze_batchnorm(model)
        self.params = trainable_parameters(model, t.freeze)
        self.optimizer = torch.optim.AdamW(self.params, lr=t.lr, weight_decay=t.weight_decay)
        self.objective: torch.nn.Module = Objective(model)
        self.queue = DescriptorQueue(t.queue_size)

    def __call__(self, batch: dict[str, np.ndarray], step: int) -> dict[str, float]:
        """Train on `batch` as global step `step` (0-based, it sets the learning rate); returns its loss stats."""
        for g in self.optimizer.param_groups:
            g["lr"] = learning_rate(self.cfg, step)
        loss, stats = self.objective(batch, self.cfg, self.queue, self.device)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, CLIP_NORM)
        self.optimizer.step()
        return stats

    def epoch(self, batches: Iterable[dict[str, np.ndarray]], epoch: int) -> dict[str, float]:
        """Epoch `epoch` of the schedule: `train.steps_per_epoch` steps on the next batches of `batches` (fewer when
        it ends first); returns the mean of each loss statistic."""
        per_epoch = self.cfg.train.steps_per_epoch
        sums: dict[str, float] = {}
        steps = 0
        for batch in itertools.islice(batches, per_epoch):
            for k, v in self(batch, epoch * per_epoch + steps).items():
                sums[k] = sums.get(k, 0.0) + v
            steps += 1
        return {k: v / max(1, steps) for k, v in sums.items()}


def validate(
    model: Matcher, batch: dict[str, np.ndarray], cfg: RoiqaConfig, device: torch.device | str = "cpu"
) -> dict[str, float]:
    """Held-in validation on fixed triples: val_map (each query's global descriptor ranks all 2V search images,
    its positive the one relevant) and val_loc50 (fraction of positives whose best `Matcher.localize` box with the
    query at its true size has IoU >= 0.5 with the truth), plus the validation loss."""
    from roiqa.boxes import box_iou
    from roiqa.eval.metrics import average_precision

    net = getattr(model, "module", model)
    was_training = net.training
    net.eval()
    with torch.no_grad():
        _, stats = batch_losses(net, batch, cfg, None, device)
        images = np.concatenate([batch["image"], batch["negative"]])
        feats = net.pyramid(torch.from_numpy(np.ascontiguousarray(images)).to(device))
        g_img = net.global_descriptor(feats)
        aps, hits = [], []
        for i in range(len(batch["query"])):
            h, w = (int(v) for v in batch["query_hw"][i])
            patch = np.array(batch["query"][i, :h, :w])
            small, _ = resize_long_side(patch, cfg.query.descriptor_size)
            gq = net.global_descriptor(net.pyramid(torch.from_numpy(small[None].copy()).to(device)))[0]
            order = torch.argsort(g_img @ gq, descending=True).cpu().numpy()
            aps.append(average_precision(order == i, 1))
            bx = batch["box"][i]
            kh, kw = max(8, int(round(float(bx[3] - bx[1])))), max(8, int(round(float(bx[2] - bx[0]))))
            kernel = net.patch_features(resize_hw(patch, (kh, kw)), cfg.query.context_pad)
            image = {lv: f[[i]] for lv, f in feats.items()}
            best = net.localize([((kh, kw), kernel)], image, None, 1, cfg.query.nms_iou).boxes[:1].numpy()
            hits.append(float(box_iou(best, np.asarray(bx, np.float32)[None]).max()) >= 0.5)
    net.train(was_training)
    freeze_batchnorm(net)
    return {"val_loss": stats["loss"], "val_map": float(np.mean(aps)), "val_loc50": float(np.mean(hits))}


# --- training state: model, AdamW moments, JSON (safetensors + JSON, never pickle) ---------------------------------
def save_state(directory: str, model, optimizer, state: dict) -> None:
    """model.safetensors (a matcher checkpoint `roiqa query --model` reads), optimizer.safetensors, state.json."""
    from roiqa.models.checkpoint import save_matcher, save_weights

    save_matcher(model, os.path.join(directory, "model.safetensors"))
    names = {id(p): n for n, p in model.named_parameters()}
    tensors, steps = {}, {}
    for group in optimizer.param_groups:
        for p in group["params"]:
            st = optimizer.state.get(p)
            if not st:
                continue
            name = names[id(p)]
            tensors[f"exp_avg/{name}"] = st["exp_avg"].detach().cpu().contiguous()
            tensors[f"exp_avg_sq/{name}"] = st["exp_avg_sq"].detach().cpu().contiguous()
            steps[name] = float(st["step"])
    save_weights(tensors, os.path.join(directory, "optimizer.safetensors"), {})
    with open(os.path.join(directory, "state.json"), "w") as f:
        json.dump({**state, "optimizer_steps": steps}, f)


def load_state(directory: str, model, optimizer) -> dict:
    """Restore what `save_state` wrote into `model` and `optimizer`; returns state.json."""
    from roiqa.io import uri as uri_mod
    from roiqa.models.checkpoint import load_matcher, read_tensors

    model.load_state_dict(load_matcher(os.path.join(directory, "model.safetensors")).state_dict())
    with open(os.path.join(directory, "state.json")) as f:
        state = json.load(f)
    path = os.path.join(directory, "optimizer.safetensors")
    tensors = read_tensors(uri_mod.read_bytes(path), path)
    params = dict(model.named_parameters())
    for name, step in state.pop("optimizer_steps", {}).items():
        p = params[name]
        optimizer.state[p] = {
            "step": torch.tensor(step),
            "exp_avg": tensors[f"exp_avg/{name}"].to(p.device),
            "exp_avg_sq": tensors[f"exp_avg_sq/{name}"].to(p.device),
        }
    return state
