"""Every training loss of roiqa: the four of seed 003 (eqs. 6-8) and the heatmap targets they are computed against,
the patch network's symmetric InfoNCE (seed 001) and the task profiles' mask loss (seed 002).

Every function takes plain tensors and returns a scalar (mean over the batch) so each term can be checked against a
value computed by hand; `roiqa.train.matcher`, `roiqa.train.patchnet` and `roiqa.train.profile` wire them to models.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from roiqa.boxes import feature_window_to_boxes


def info_nce(
    query: torch.Tensor,
    positive: torch.Tensor,
    negatives: torch.Tensor,
    tau: float,
    negative_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Eq. 7: -log(exp(s(g_q, g+)/tau) / (exp(s(g_q, g+)/tau) + sum_j exp(s(g_q, g_j-)/tau))), mean over queries.

    query, positive: (B, C) descriptors; negatives: (N, C) shared by every query or (B, N, C) per query;
    negative_mask: (B, N) bool, False where a negative does not count for that query (e.g. it shows the same
    instance). s is the cosine similarity (eq. 1): inputs need not be normalised.
    """
    if tau <= 0:
        raise ValueError(f"tau must be > 0, got {tau}")
    q = F.normalize(query, dim=-1)
    pos = (q * F.normalize(positive, dim=-1)).sum(-1, keepdim=True)  # (B, 1)
    neg_n = F.normalize(negatives, dim=-1)
    neg = q @ neg_n.T if neg_n.dim() == 2 else torch.einsum("bc,bnc->bn", q, neg_n)  # (B, N)
    if negative_mask is not None:
        neg = neg.masked_fill(~negative_mask, float("-inf"))
    logits = torch.cat([pos, neg], dim=1) / tau
    return F.cross_entropy(logits, torch.zeros(len(q), dtype=torch.long, device=q.device))


def focal_loss(logits: torch.Tensor, target: torch.Tensor, alpha: float = 0.25, gamma: float = 2.0) -> torch.Tensor:
    """Sigmoid focal loss (Lin et al.): -alpha_t (1 - p_t)^gamma log(p_t), mean over every element.

    alpha weighs positives (1 - alpha the negatives); alpha < 0 disables the weighting.
    """
    p = torch.sigmoid(logits)
    ce = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
    p_t = p * target + (1 - p) * (1 - target)
    loss = ce * (1 - p_t) ** gamma
    if alpha >= 0:
        loss = (alpha * target + (1 - alpha) * (1 - target)) * loss
    return loss.mean()


def dice_loss(logits: torch.Tensor, target: torch.Tensor, eps: float = 1.0) -> torch.Tensor:
    """1 - (2 sum(p t) + eps) / (sum(p) + sum(t) + eps) per sample (all dims but the first), mean over samples."""
    p = torch.sigmoid(logits).flatten(1)
    t = target.flatten(1)
    return (1 - (2 * (p * t).sum(1) + eps) / (p.sum(1) + t.sum(1) + eps)).mean()


def triplet_region_loss(pos_sims: torch.Tensor, neg_sims: torch.Tensor, margin: float) -> torch.Tensor:
    """Eq. 8: [m + max_k s(z, r_k-) - max_k s(z, r_k+)]_+, mean over the batch.

    pos_sims, neg_sims: (B, K) similarities of the query descriptor z to the regions of the positive and of the
    negative image (a padded entry is -inf).
    """
    return F.relu(margin + neg_sims.max(dim=1).values - pos_sims.max(dim=1).values).mean()


def scale_consistency_loss(levels: torch.Tensor, fused: torch.Tensor, temperature: float) -> torch.Tensor:
    """KL(P_fused || P_l) averaged over levels l and the batch, P = spatial softmax(temperature * heatmap).

    levels: (B, L, H, W) per-level heatmaps upsampled to the fused resolution; fused: (B, H, W). The fused
    distribution is the target (no gradient flows into it): the per-level heatmaps are pulled towards it.
    """
    b, n_levels = levels.shape[:2]
    log_p = F.log_softmax(temperature * fused.detach().reshape(b, 1, -1), dim=-1)  # (B, 1, HW)
    log_q = F.log_softmax(temperature * levels.reshape(b, n_levels, -1), dim=-1)  # (B, L, HW)
    return (log_p.exp() * (log_p - log_q)).sum(-1).mean()


def total_loss(parts: dict[str, torch.Tensor], weights: dict[str, float]) -> torch.Tensor:
    """Eq. 6: sum of lambda_i * L_i over the named parts (a part without a weight is an error)."""
    missing = sorted(set(parts) - set(weights))
    if missing:
        raise ValueError(f"no loss weight for {missing}")
    return sum(weights[k] * v for k, v in parts.items())


def window_targets(
    size_hw: tuple[int, int], box: torch.Tensor, query_hw: tuple[int, int], stride: int, iou: float = 0.5
) -> torch.Tensor:
    """The box as a heatmap target: 1 at cells whose correlation window overlaps `box` with IoU >= `iou`.

    Cell (r, c) of a same-padded correlation heatmap (H, W) = size_hw is the window `feature_window_to_boxes`
    gives for a query of query_hw pixels; the target is in those window coordinates, so the heatmap is pulled up
    exactly where the rerank would read a box matching the ground truth. The best cell is always 1, so the target
    is never empty for a box inside the image.
    """
    h, w = size_hw
    rows, cols = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    qh = torch.full((h * w,), float(query_hw[0]))
    qw = torch.full((h * w,), float(query_hw[1]))
    windows = feature_window_to_boxes(rows.reshape(-1), cols.reshape(-1), qh, qw, stride)  # (HW, 4)
    b = box.float().reshape(1, 4)
    ix = (torch.minimum(windows[:, 2], b[:, 2]) - torch.maximum(windows[:, 0], b[:, 0])).clamp(min=0)
    iy = (torch.minimum(windows[:, 3], b[:, 3]) - torch.maximum(windows[:, 1], b[:, 1])).clamp(min=0)
    inter = ix * iy
    area_w = (windows[:, 2] - windows[:, 0]) * (windows[:, 3] - windows[:, 1])
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    ious = inter / (area_w + area_b - inter).clamp(min=1e-9)
    target = (ious >= iou).float()
    target[ious.argmax()] = 1.0
    return target.reshape(h, w)


def symmetric_info_nce(queries: torch.Tensor, keys: torch.Tensor, tau: float) -> torch.Tensor:
    """CLIP-style InfoNCE both ways: query i's positive is key i and the other keys its negatives, and the converse;
    the mean of the two cross-entropies over logits queries @ keys.T / tau. (B, E) embeddings, used as given."""
    logits = queries @ keys.T / tau  # (B, B)
    target = torch.arange(len(queries), device=logits.device)
    return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target))


def mask_loss(logits: torch.Tensor, target: torch.Tensor, dice_weight: float = 1.0) -> torch.Tensor:
    """Per-pixel BCE (mean) + dice_weight * `dice_loss` (eps 1) of (B, H, W) logits against a (B, H, W) target."""
    return F.binary_cross_entropy_with_logits(logits, target) + dice_weight * dice_loss(logits, target, eps=1.0)
