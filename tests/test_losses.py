"""The four seed-003 losses against values computed by hand, and the training objective on a real batch."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from roiqa.config import ModelConfig, RoiqaConfig, TrainConfig
from roiqa.losses import (
    dice_loss,
    focal_loss,
    info_nce,
    mask_loss,
    scale_consistency_loss,
    symmetric_info_nce,
    total_loss,
    triplet_region_loss,
    window_targets,
)
from roiqa.models.matcher import Matcher
from roiqa.train.matcher import DescriptorQueue, batch_losses, trainable_parameters


def test_info_nce_hand_computed():
    q = torch.tensor([[1.0, 0.0]])
    pos = torch.tensor([[2.0, 0.0]])  # cosine 1 (not normalised on purpose)
    neg = torch.tensor([[0.0, 3.0]])  # cosine 0
    # -log(e^(1/0.5) / (e^(1/0.5) + e^(0/0.5))) = log(1 + e^-2)
    assert info_nce(q, pos, neg, tau=0.5).item() == pytest.approx(math.log(1 + math.exp(-2)), abs=1e-6)
    # Two negatives, one at cosine 0.6: log(1 + e^((0 - 1)/0.5) + e^((0.6 - 1)/0.5))
    neg2 = torch.tensor([[0.0, 1.0], [0.6, 0.8]])
    expect = math.log(1 + math.exp(-2) + math.exp(-0.8))
    assert info_nce(q, pos, neg2, tau=0.5).item() == pytest.approx(expect, abs=1e-6)
    # Per-query negatives with a mask that drops the harder one: back to the first value.
    per_query = neg2[None]
    mask = torch.tensor([[True, False]])
    assert info_nce(q, pos, per_query, 0.5, mask).item() == pytest.approx(math.log(1 + math.exp(-2)), abs=1e-6)
    with pytest.raises(ValueError, match="tau"):
        info_nce(q, pos, neg, tau=0.0)


def test_focal_and_dice_hand_computed():
    logits = torch.zeros(1, 2, 2)  # p = 0.5 everywhere
    target = torch.tensor([[[1.0, 0.0], [0.0, 0.0]]])
    # focal at p = 0.5: ce = log 2, (1 - p_t)^2 = 1/4; alpha 0.25 on the positive, 0.75 on the 3 negatives
    pos, neg = 0.25 * 0.25 * math.log(2), 0.75 * 0.25 * math.log(2)
    assert focal_loss(logits, target, 0.25, 2.0).item() == pytest.approx((pos + 3 * neg) / 4, abs=1e-6)
    # gamma 0, no alpha: plain binary cross-entropy
    assert focal_loss(logits, target, -1, 0.0).item() == pytest.approx(math.log(2), abs=1e-6)
    # dice: 1 - (2 * 0.5 + 1) / (2 + 1 + 1) = 0.5
    assert dice_loss(logits, target, eps=1.0).item() == pytest.approx(0.5, abs=1e-6)
    # a confident perfect prediction has dice ~0
    sharp = (target * 2 - 1) * 30
    assert dice_loss(sharp, target, eps=1.0).item() == pytest.approx(0.0, abs=1e-6)


def test_mask_loss_hand_computed():
    logits = torch.zeros(1, 2, 2)  # p = 0.5: BCE log 2 per pixel, dice 1 - 2 / 4 as above
    target = torch.tensor([[[1.0, 0.0], [0.0, 0.0]]])
    assert mask_loss(logits, target, 1.0).item() == pytest.approx(math.log(2) + 0.5, abs=1e-6)
    assert mask_loss(logits, target, 0.25).item() == pytest.approx(math.log(2) + 0.125, abs=1e-6)


def test_symmetric_info_nce_hand_computed():
    q = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    k = torch.tensor([[1.0, 0.0], [0.6, 0.8]])
    tau = 0.5

    # rows: q0 . k = (1, 0.6), q1 . k = (0, 0.8); columns: k0 . q = (1, 0), k1 . q = (0.6, 0.8)
    def ce(row, i):
        return -math.log(math.exp(row[i] / tau) / sum(math.exp(v / tau) for v in row))

    rows = (ce([1.0, 0.6], 0) + ce([0.0, 0.8], 1)) / 2
    cols = (ce([1.0, 0.0], 0) + ce([0.6, 0.8], 1)) / 2
    assert symmetric_info_nce(q, k, tau).item() == pytest.approx((rows + cols) / 2, abs=1e-6)


def test_triplet_region_hand_computed():
    pos = torch.tensor([[0.9, 0.2], [0.3, 0.95]])
    neg = torch.tensor([[0.5, 0.8], [0.1, 0.2]])
    # row 1: [0.2 + 0.8 - 0.9]_+ = 0.1; row 2: [0.2 + 0.2 - 0.95]_+ = 0
    assert triplet_region_loss(pos, neg, 0.2).item() == pytest.approx(0.05, abs=1e-6)


def test_scale_consistency_hand_computed():
    fused = torch.tensor([[[0.0, math.log(2)]]])  # softmax -> (1/3, 2/3)
    levels = torch.zeros(1, 2, 1, 2)  # both levels uniform (1/2, 1/2)
    expect = (1 / 3) * math.log((1 / 3) / 0.5) + (2 / 3) * math.log((2 / 3) / 0.5)
    assert scale_consistency_loss(levels, fused, 1.0).item() == pytest.approx(expect, abs=1e-6)
    same = fused[:, None].expand(1, 2, 1, 2)
    assert scale_consistency_loss(same, fused, 1.0).item() == pytest.approx(0.0, abs=1e-7)
    # the fused map is the target: no gradient reaches it
    f = fused.clone().requires_grad_(True)
    lv = levels.clone().requires_grad_(True)
    scale_consistency_loss(lv, f, 1.0).backward()
    assert f.grad is None and lv.grad is not None


def test_total_loss_weights():
    parts = {"nce": torch.tensor(1.0), "dense": torch.tensor(2.0)}
    assert total_loss(parts, {"nce": 0.5, "dense": 3.0}).item() == pytest.approx(6.5)
    with pytest.raises(ValueError, match="dense"):
        total_loss(parts, {"nce": 1.0})


def test_window_targets_hand_computed():
    # 16x16 query at stride 8: kernel 2x2 cells, cell (r, c) is the window with top-left ((c - 1) * 8, (r - 1) * 8)
    box = torch.tensor([8.0, 8.0, 24.0, 24.0])  # exactly the window of cell (2, 2)
    t = window_targets((4, 4), box, (16, 16), stride=8, iou=0.5)
    assert t.sum().item() == 1 and t[2, 2].item() == 1
    # windows shifted by one cell overlap 8x16 / (2 * 256 - 128) = 1/3: in at IoU 0.3, the diagonals (1/7) are not
    t = window_targets((4, 4), box, (16, 16), stride=8, iou=0.3)
    assert {tuple(map(int, x)) for x in t.nonzero()} == {(2, 2), (1, 2), (3, 2), (2, 1), (2, 3)}
    # a box matching no window at IoU 0.5 still marks its best cell
    assert window_targets((4, 4), torch.tensor([0.0, 0.0, 64.0, 4.0]), (16, 16), 8).sum().item() == 1


TINY_TRAIN = RoiqaConfig(
    model=ModelConfig(backbone="resnet18", backbone_weights=None, fpn_channels=32),
    train=TrainConfig(batch_size=2, image_size=96, query_size=48, object_scale=(24.0, 48.0), mined_negatives=2),
)


def _batch(seed: int) -> dict[str, np.ndarray]:
    from roiqa.eval.demo_data import load_photo
    from roiqa.train import data as train_data

    photos = [load_photo(n) for n in ("camera", "grass", "clock")]
    rng = np.random.default_rng(seed)
    return train_data.collate([train_data.synthesize_pair(photos, TINY_TRAIN.train, rng) for _ in range(2)])


def test_batch_losses_are_finite_and_training_reduces_them():
    torch.manual_seed(0)
    model = Matcher(TINY_TRAIN.model)
    model.train()
    params = trainable_parameters(model, "none")
    opt = torch.optim.AdamW(params, lr=1e-3)
    batch = _batch(0)
    queue = DescriptorQueue(16)
    first = None
    for _ in range(8):  # fit one fixed batch: the objective must go down
        loss, stats = batch_losses(model, batch, TINY_TRAIN, queue)
        assert set(stats) >= {"nce", "dense", "trip", "scale", "loss"}
        assert all(math.isfinite(v) for v in stats.values())
        first = stats["loss"] if first is None else first
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert stats["loss"] < first
    assert len(queue.descriptors) == 16  # 8 steps x 4 images pushed, capped at the queue size


def test_queue_mines_other_instances_only():
    q = DescriptorQueue(4)
    q.push(torch.eye(3), torch.tensor([7, 8, 9]))
    mined, mask = q.hardest(torch.tensor([[1.0, 0.0, 0.0]]), torch.tensor([7]), k=2)
    assert mask.all() and mined.shape == (1, 2, 3)
    assert not any(torch.equal(m, torch.tensor([1.0, 0.0, 0.0])) for m in mined[0])  # its own instance is excluded
    q.push(torch.ones(3, 3), torch.tensor([1, 2, 3]))
    assert len(q.descriptors) == 4 and q.instances.tolist() == [1, 2, 3, 7]  # newest first, capped


def test_freeze_options():
    model = Matcher(TINY_TRAIN.model)
    n_all = len(trainable_parameters(model, "none"))
    body = trainable_parameters(model, "body")
    assert 0 < len(body) < n_all and not model.body.body.conv1.weight.requires_grad
    assert model.phi["3"].weight.requires_grad
    with pytest.raises(ValueError, match="freeze"):
        trainable_parameters(model, "all")


def test_forward_finds_a_pasted_patch():
    """The whole model on a (query, images) batch: the pasted copy is boxed and outscores an image without it."""
    from roiqa.boxes import box_iou
    from roiqa.eval.demo_data import load_photo

    model = Matcher(ModelConfig()).eval()
    patch = np.ascontiguousarray(load_photo("astronaut")[150:214, 180:244])  # 64x64 face region
    bg = np.ascontiguousarray(load_photo("brick")[:256, :256])
    pos = bg.copy()
    pos[96:160, 64:128] = patch
    with torch.no_grad():
        out = model(patch, np.stack([pos, bg]))
    assert out["heatmap"].shape == (2, 32, 32) and out["boxes"].shape == (2, 5, 4) and out["global"].shape[0] == 2
    iou = box_iou(out["boxes"][0, :1].numpy(), np.array([[64, 96, 128, 160]], np.float32))[0, 0]
    assert iou >= 0.5
    assert out["heatmap"][0].max() > out["heatmap"][1].max()
