"""Seed 004: RoiMaskNet (side-branch attention, hard attention), its checkpoints, training and the Verifier."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from safetensors.torch import save as st_save

from roiqa.eval.metrics import roc_auc
from roiqa.models.roimask import (
    RoiMaskConfig,
    RoiMaskNet,
    load_roimask,
    resize_mask,
    save_roimask,
    variant_config,
)
from roiqa.stages.verify import (
    SHIPPED,
    Verifier,
    box_masks,
    query_view,
    region_view,
)
from roiqa.train.verifier import fit_logistic

torch.set_num_threads(1)
S = 64  # input side of the small test nets


def _net(merge: str, op: str = "add", **kw) -> RoiMaskNet:
    return RoiMaskNet(variant_config(merge, op, input_size=S, num_classes=5, **kw)).eval()


def _inputs(b: int = 3, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    images = torch.rand(b, 3, S, S, generator=g)
    masks = (torch.rand(b, 1, S, S, generator=g) > 0.7).float()
    return images, masks


@pytest.mark.parametrize("op", ["add", "mul"])
@pytest.mark.parametrize("merge", ["first", "deep", "multi"])
def test_side_branch_has_exactly_zero_effect_at_init(merge, op):
    net = _net(merge, op)
    plain = _net("none")
    plain.load_state_dict({k: v for k, v in net.state_dict().items() if not k.startswith("side.")})
    images, masks = _inputs()
    logits, emb = net(images, masks)
    logits_other, _ = net(images, 1.0 - masks)  # any mask
    logits_plain, emb_plain = plain(images, masks)
    assert torch.equal(logits, logits_other)
    assert torch.equal(logits, logits_plain) and torch.equal(emb, emb_plain)
    # The branch is wired: once its weights move, the mask changes the output.
    with torch.no_grad():
        for conv in net.side.values():
            conv.weight.normal_(0, 0.5)
    assert not torch.allclose(net(images, masks)[0], net(images, 1.0 - masks)[0])


def test_side_conv_initialisation_follows_the_seed():
    add, mul = _net("multi", "add"), _net("multi", "mul")
    assert set(add.side) == {"stem", "layer1", "layer2", "layer3"}
    for conv in add.side.values():
        assert conv.in_channels == 1 and not conv.weight.any() and not conv.bias.any()
    for conv in mul.side.values():
        assert not conv.weight.any() and torch.equal(conv.bias, torch.ones_like(conv.bias))


def test_hard_attention_input_is_image_times_mask():
    net = _net("hard")
    seen = []
    net.stem.register_forward_pre_hook(lambda m, args: seen.append(args[0].detach().clone()))
    images, masks = _inputs()
    net(images, masks)
    mean, std = np.array([0.485, 0.456, 0.406])[:, None, None], np.array([0.229, 0.224, 0.225])[:, None, None]
    ref = (images.numpy() * masks.numpy() - mean) / std  # numpy reference: background blacked out, then normalised
    np.testing.assert_allclose(seen[0].numpy(), ref, rtol=1e-5, atol=1e-5)
    # and the no-mask net ignores the mask entirely
    plain = _net("none")
    assert torch.equal(plain(images, masks)[0], plain(images, torch.zeros_like(masks))[0])


def test_mask_is_resized_to_each_merge_layer():
    net = _net("multi")
    feats, masks_seen = {}, {}
    for name in ("stem", "layer1", "layer2", "layer3"):
        getattr(net, name).register_forward_hook(lambda m, a, out, n=name: feats.__setitem__(n, out.shape))
        net.side[name].register_forward_pre_hook(lambda m, a, n=name: masks_seen.__setitem__(n, a[0].detach()))
    images, masks = _inputs()
    net(images, masks)
    m = masks.numpy()
    for name, stride in (("stem", 2), ("layer1", 4), ("layer2", 8), ("layer3", 16)):
        assert masks_seen[name].shape[-2:] == feats[name][-2:] == (S // stride, S // stride)
        blocks = m.reshape(3, 1, S // stride, stride, S // stride, stride).mean(axis=(3, 5))  # area average
        np.testing.assert_allclose(masks_seen[name].numpy(), blocks, atol=1e-6)
    assert resize_mask(masks, (S, S)) is masks


@pytest.mark.parametrize("merge", ["first", "deep", "multi", "hard", "none"])
def test_output_shapes(merge):
    net = _net(merge)
    logits, emb = net(*_inputs(b=4))
    assert logits.shape == (4, 5) and emb.shape == (4, 128)
    np.testing.assert_allclose(emb.norm(dim=1).detach().numpy(), 1.0, atol=1e-5)


def test_bad_config_names_the_field():
    with pytest.raises(ValueError, match="merge_points"):
        RoiMaskNet(RoiMaskConfig(merge_points=("layer9",)))
    with pytest.raises(ValueError, match="merge"):
        variant_config("sideways")


def test_training_steps_reduce_the_loss_on_a_fixed_batch():
    net = _net("first").train()
    images, masks = _inputs(b=8)
    labels = torch.arange(8) % 5
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    losses = []
    for _ in range(15):
        loss = torch.nn.functional.cross_entropy(net(images, masks)[0], labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]
    assert any(c.weight.abs().sum() > 0 for c in net.side.values())  # the side branch learns too


def test_save_load_round_trip(tmp_path):
    net = _net("multi", "mul")
    with torch.no_grad():
        for conv in net.side.values():
            conv.weight.normal_(0, 0.1)
    images, masks = _inputs()
    uri = str(tmp_path / "m.safetensors")
    save_roimask(net, uri, dtype=None)
    loaded, meta = load_roimask(uri)
    assert loaded.cfg == net.cfg and "roiqa.roimask_config" in meta
    assert torch.equal(loaded(images, masks)[0], net(images, masks)[0])
    # fp16 file: identical to the model with its weights rounded to fp16
    save_roimask(net, uri)
    loaded, _ = load_roimask(uri)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(p.half().float())
    assert torch.equal(loaded(images, masks)[0], net(images, masks)[0])


def test_bad_checkpoints_give_clear_errors(tmp_path):
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a checkpoint at all")
    with pytest.raises(ValueError, match="junk.safetensors"):
        load_roimask(str(junk))
    with pytest.raises(ValueError, match="junk.safetensors"):
        Verifier(str(junk))
    other = tmp_path / "other.safetensors"
    other.write_bytes(st_save({"w": torch.zeros(2)}, metadata={"x": "1"}))
    with pytest.raises(ValueError, match="other.safetensors.*not a RoiMaskNet"):
        load_roimask(str(other))
    with pytest.raises(FileNotFoundError, match="missing.safetensors"):
        Verifier(str(tmp_path / "missing.safetensors"))
    plain = tmp_path / "plain.safetensors"  # a RoiMaskNet without calibration is no verifier
    save_roimask(_net("first"), str(plain))
    with pytest.raises(ValueError, match="plain.safetensors.*calibration"):
        Verifier(str(plain))


def test_roc_auc_against_pairwise_count_and_logistic_fit():
    rng = np.random.default_rng(0)
    scores, labels = rng.integers(0, 5, 40).astype(float), rng.random(40) < 0.4
    pos, neg = scores[labels], scores[~labels]
    ref = np.mean([(p > n) + 0.5 * (p == n) for p in pos for n in neg])
    assert roc_auc(scores, labels) == pytest.approx(ref)
    x = rng.normal(size=4000)
    y = rng.random(4000) < 1 / (1 + np.exp(-(4.0 * x - 1.0)))
    a, b = fit_logistic(x, y)  # balanced weighting moves b by log(n_neg / n_pos)
    assert a == pytest.approx(4.0, rel=0.15) and b == pytest.approx(-1.0 + np.log((~y).sum() / y.sum()), abs=0.2)


def test_views_put_the_box_where_the_mask_is():
    img = np.zeros((60, 80, 3), np.uint8)
    img[20:30, 40:60] = 255
    view, box = region_view(img, (40, 20, 60, 30), 32, 2.0)
    assert box[2] - box[0] == pytest.approx(16.0)  # long side = size / context
    mask = box_masks(box[None], 32)[0, 0].astype(bool)
    assert view[mask].mean() > 200 and view[~mask].mean() < 30
    q, qbox = query_view(np.full((10, 20, 3), 9, np.uint8), 32, 2.0)
    assert tuple(qbox) == (8, 12, 24, 20) and (q[12:20, 8:24] == 9).all() and q.sum() == 9 * 3 * 8 * 16


def test_verifier_shapes_and_probabilities():
    v = Verifier.from_model(_net("first"), a=5.0, b=-2.0, context=2.0)
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (50, 70, 3), dtype=np.uint8)
    query = rng.integers(0, 256, (12, 9, 3), dtype=np.uint8)
    boxes = np.array([[0, 0, 10, 10], [30, 20, 69, 49], [-5, -5, 3, 3], [10, 10, 10, 10]], np.float32)
    p = v.verify(query, image, boxes)
    assert p.shape == (4,) and p.dtype == np.float32 and ((p >= 0) & (p <= 1)).all()
    assert v.verify(query, image, np.zeros((0, 4), np.float32)).shape == (0,)
    with pytest.raises(ValueError, match="boxes"):
        v.verify(query, image, np.zeros((3,), np.float32))


def test_job_smoke_writes_a_loadable_verifier(tmp_path):
    from jobs.verifier import main

    out = str(tmp_path / "v.safetensors")
    argv = ["--out", out, "--steps", "3", "--instances", "4", "--holdout-instances", "3", "--eval-views", "8"]
    argv += ["--pool", "16", "--batch-size", "4", "--input-size", "32", "--merge", "deep", "--quiet"]
    assert main(argv) == 0
    log = json.loads((tmp_path / "v.train_log.json").read_text())
    assert log["merge"] == "deep" and {"heldout_acc", "heldout_acc_small", "verify_auc_holdout"} <= set(log)
    v = Verifier(out)
    assert v.model.cfg.merge_points == ("layer3",) and v.model.cfg.num_classes == 4


@pytest.mark.skipif(not os.path.isfile(SHIPPED), reason="no shipped verifier in this install")
def test_shipped_verifier_prefers_the_true_region():
    from roiqa.config import TrainConfig
    from roiqa.train.data import synthesize_pair
    from roiqa.train.verifier import training_photos

    v = Verifier()  # the shipped file
    assert os.path.getsize(SHIPPED) < 4 * 2**20
    photos, rng = training_photos(), np.random.default_rng(123)
    true_p, wrong_p = [], []
    for _ in range(8):
        s = synthesize_pair(photos, TrainConfig(), rng)
        h, w = s["query_hw"]
        query, box = s["query"][:h, :w], s["box"][None]
        true_p.append(v.verify(query, s["image"], box)[0])
        wrong_p.append(v.verify(query, s["negative"], box)[0])  # the same box in the image without the instance
    assert np.mean(true_p) > np.mean(wrong_p)
