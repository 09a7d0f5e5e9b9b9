"""Seed 001: LoG complexity map, quadtree layout, statistics, map PNG, the per-batch stage and the patch network."""

from __future__ import annotations

import dataclasses
import io
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from scipy import ndimage

from roiqa import errors as row_errors
from roiqa import schema as S
from roiqa.config import ComplexityConfig
from roiqa.eval.demo_data import load_photo
from roiqa.models.patchnet import (
    PatchNet,
    PatchNetConfig,
    fit_images,
    flops_per_image,
    leaf_weights,
    load_patchnet,
    node_stats,
    save_patchnet,
    subdivision_cost,
)
from roiqa.ops.complexity import (
    complexity_map,
    complexity_png,
    complexity_stats,
    gaussian_kernel1d,
    log_response,
    patch_counts,
    quadtree,
)
from roiqa.stages.complexity import ComplexityStage
from roiqa.stages.embed import prepare
from roiqa.train.patchnet import context_crop, make_optimizer, patchnet_loss, train_patchnet

THR = (0.25, 0.35, 0.45)  # ComplexityConfig's default thresholds
SMALL = PatchNetConfig(image_size=128, dim=32, patch_dim=32)  # the network at 128 px: quick on one CPU thread


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _grey(img: np.ndarray) -> np.ndarray:
    return (img.astype(np.float64) @ np.array([0.299, 0.587, 0.114])) / 255.0


def _prepared(names: list[str], size: int) -> tuple[torch.Tensor, torch.Tensor]:
    out = [prepare(np.asarray(load_photo(n)), size) for n in names]
    return torch.from_numpy(np.stack([o[0] for o in out])), torch.tensor([o[1] for o in out])


# --- complexity map ----------------------------------------------------------------------------------------------


def test_log_matches_scipy_filters_exactly_and_gaussian_laplace_within_its_discretisation_bound():
    img = np.ascontiguousarray(load_photo("camera")[40:296, 100:300])  # (256, 200, 3), a real photograph
    sigma = 1.5
    g = _grey(img)
    ours = log_response(torch.from_numpy(g.astype(np.float32))[None], sigma)[0].numpy().astype(np.float64)
    # Same discretisation (sampled Gaussian, 3x3 Laplacian, torch "reflect" = scipy "mirror"): float32 rounding only.
    same = sigma**2 * ndimage.laplace(ndimage.gaussian_filter(g, sigma, mode="mirror"), mode="mirror")
    np.testing.assert_allclose(ours, same, atol=1e-5)
    # Against the continuous LoG kernel. Per axis the two differ by the 1-D kernel dk = G * [1, -2, 1] - G'' (the
    # other axis' Gaussian has L1 norm 1), so |ours - ref| <= sigma^2 * sum_axes (0.5 ||dk||_1 + 0.5 |sum dk|)
    # for grey in [0, 1] (grey - 0.5 is in [-0.5, 0.5]). That bound is rigorous but loose; the relative L2 error
    # is small because the 3-point second difference's relative error, ~w^2 / 12, only matters at frequencies
    # the sigma = 1.5 Gaussian has removed (measured 0.049 on this photo; a missing sigma^2 or a wrong sigma
    # gives > 0.3).
    ref = sigma**2 * ndimage.gaussian_laplace(g, sigma, mode="mirror")
    k0 = gaussian_kernel1d(sigma).numpy()
    r = (len(k0) - 1) // 2
    x = np.arange(-r, r + 1)
    k2 = k0 * (x**2 - sigma**2) / sigma**4  # scipy's order-2 kernel: d^2/dx^2 of the normalised sampled Gaussian
    dk = np.convolve(k0, [1.0, -2.0, 1.0]) - np.pad(k2, 1)
    bound = sigma**2 * (np.abs(dk).sum() + abs(dk.sum()))
    assert np.abs(ours - ref).max() <= bound
    assert np.linalg.norm(ours - ref) / np.linalg.norm(ref) < 0.1
    cmap = complexity_map(img[None], sigma, 0.05)[0].numpy()
    assert cmap.dtype == np.float32 and cmap.shape == img.shape[:2]
    np.testing.assert_allclose(cmap, np.tanh(np.abs(same) / 0.05), atol=1e-4)
    assert cmap.min() >= 0 and cmap.max() < 1


def test_complexity_map_with_valid_hw_is_the_map_of_the_crop():
    img = np.zeros((2, 96, 96, 3), np.uint8)
    img[0, :80, :60] = load_photo("astronaut")[:80, :60]
    img[1] = load_photo("coffee")[:96, :96]
    maps = complexity_map(img, 1.5, 0.05, np.array([[80, 60], [96, 96]])).numpy()
    crop = complexity_map(np.ascontiguousarray(img[:1, :80, :60]), 1.5, 0.05)[0].numpy()
    np.testing.assert_allclose(maps[0, :80, :60], crop, atol=1e-6)
    assert (maps[0, 80:] == 0).all() and (maps[0, :, 60:] == 0).all()
    np.testing.assert_allclose(maps[1], complexity_map(img[1:], 1.5, 0.05)[0].numpy(), atol=1e-6)


# --- quadtree ----------------------------------------------------------------------------------------------------


def _grid(x0: int, y0: int, x1: int, y1: int, size: int) -> set[tuple[int, int, int]]:
    return {(x, y, size) for y in range(y0, y1, size) for x in range(x0, x1, size)}


def test_quadtree_splits_exactly_the_two_textured_quadrants():
    rng = np.random.default_rng(0)
    img = np.full((256, 256, 3), 128, np.uint8)
    img[0:128, 128:256] = rng.integers(0, 256, (128, 128, 3))  # top-right quadrant: noise
    img[128:256, 0:128] = rng.integers(0, 256, (128, 128, 3))  # bottom-left quadrant: noise
    cmap = complexity_map(img[None], 1.5, 0.05)[0].numpy()
    layout = quadtree(cmap, (256, 256), 64, 8, THR)
    # By hand: noise has complexity ~1 everywhere, above every threshold, so its quadrants end as 8x8 cells; the
    # LoG reaches at most 7 px (kernel radius 6, Laplacian 1) into a flat 64-cell, a mean <= 7 / 64 < 0.25: no split.
    expected = _grid(0, 0, 128, 128, 64) | _grid(128, 128, 256, 256, 64)
    expected |= _grid(128, 0, 256, 128, 8) | _grid(0, 128, 128, 256, 8)
    assert layout.dtype == np.int32 and layout.shape == (len(expected), 3)
    assert {tuple(r) for r in layout.tolist()} == expected
    assert (np.diff(-layout[:, 2]) >= 0).all()  # largest first
    assert patch_counts(layout, 64, 8) == [8, 0, 0, 512]
    assert patch_counts(layout.ravel(), 64, 8) == [8, 0, 0, 512]


def test_flat_image_keeps_only_64_cells():
    img = np.full((1, 256, 256, 3), 77, np.uint8)
    cmap = complexity_map(img, 1.5, 0.05)[0].numpy()
    assert cmap.max() == 0
    layout = quadtree(cmap, (256, 256), 64, 8, THR)
    assert {tuple(r) for r in layout.tolist()} == _grid(0, 0, 256, 256, 64)


def test_quadtree_hand_map_levels_edges_and_strict_threshold():
    cmap = np.zeros((100, 150), np.float32)  # valid region (100, 150): a 2 x 3 grid of 64-cells, edges clipped
    cmap[0:32, 0:32] = 0.5  # top-left 64-cell: mean 0.125
    cmap[64:100, 128:150] = 0.3  # bottom-right clipped cell (36 x 22 valid pixels): mean 0.3 == threshold
    lay = quadtree(cmap, (100, 150), 64, 8, (0.1, 0.4, 0.45))
    got = {tuple(r) for r in lay.tolist()}
    # (0, 0, 64): mean 0.125 > 0.1 splits; its child (0, 0, 32) has mean 0.5 > 0.4 splits; the 16-children have
    # mean 0.5 > 0.45 and split to 8. The clipped (128, 64, 64) cell's mean is exactly 0.3 > 0.1: it splits; its
    # children (128, 64, 32) (mean 0.3, not > 0.4) stay, (160, 64), (160, 96) lie outside x < 150 and are dropped,
    # (128, 96, 32) (rows 96..99, mean 0.3) stays.
    expected = {(64, 0, 64), (128, 0, 64), (0, 64, 64), (64, 64, 64)}
    expected |= {(32, 0, 32), (0, 32, 32), (32, 32, 32), (128, 64, 32), (128, 96, 32)}
    expected |= _grid(0, 0, 32, 32, 8)
    assert got == expected
    # a mean equal to the threshold does not split (strictly above splits)
    flat = quadtree(np.full((64, 64), 0.25, np.float32), (64, 64), 64, 8, (0.25, 0.0, 0.0))
    assert flat.tolist() == [[0, 0, 64]]


@pytest.mark.parametrize(
    ("cell", "min_cell", "thresholds", "match"),
    [
        (64, 8, (0.2, 0.3), "thresholds"),
        (64, 8, (0.2, 0.3, 0.4, 0.5), "thresholds"),
        (48, 8, (0.2,), "powers of two"),
        (64, 12, (0.2,), "powers of two"),
        (8, 64, (), "powers of two"),
    ],
)
def test_quadtree_rejects_bad_arguments(cell, min_cell, thresholds, match):
    with pytest.raises(ValueError, match=match):
        quadtree(np.zeros((64, 64), np.float32), (64, 64), cell, min_cell, thresholds)


def test_quadtree_rejects_bad_valid_region_and_patch_counts_unknown_sizes():
    with pytest.raises(ValueError, match="valid_hw"):
        quadtree(np.zeros((64, 64), np.float32), (65, 64), 64, 8, THR)
    with pytest.raises(ValueError, match="valid_hw"):
        quadtree(np.zeros((64, 64), np.float32), (0, 64), 64, 8, THR)
    with pytest.raises(ValueError, match=r"\[12\]"):
        patch_counts(np.array([[0, 0, 12]]), 64, 8)


# --- statistics, PNG ---------------------------------------------------------------------------------------------


def test_stats_against_numpy_on_the_valid_region():
    rng = np.random.default_rng(1)
    cmap = np.full((64, 64), 5.0, np.float32)  # outside the valid region: a value that would show in any stat
    cmap[:30, :40] = rng.random((30, 40), dtype=np.float32)
    mean, std, p90 = complexity_stats(cmap, (30, 40))
    v = cmap[:30, :40].astype(np.float64)
    assert mean == pytest.approx(v.mean(), abs=1e-9)
    assert std == pytest.approx(v.std(), abs=1e-9)
    srt = np.sort(v.ravel())  # 1200 values: the 90th percentile sits at position 0.9 * 1199 = 1079.1
    assert p90 == pytest.approx(0.9 * srt[1079] + 0.1 * srt[1080], abs=1e-9)


def test_png_decodes_to_the_requested_size_and_values():
    cmap = np.zeros((64, 64), np.float32)
    cmap[:30, :40] = 0.5
    png = complexity_png(cmap, (30, 40), 64)
    im = Image.open(io.BytesIO(png))
    assert im.format == "PNG" and im.mode == "L"
    assert im.size == (64, 48)  # long side 64; short side 30 * 64 / 40 = 48
    assert (np.asarray(im) == 128).all()  # round(0.5 * 255) = 128 (the padding outside is not in the image)
    tall = Image.open(io.BytesIO(complexity_png(np.zeros((100, 10), np.float32), (100, 10), 20)))
    assert tall.size == (2, 20)


# --- the stage ---------------------------------------------------------------------------------------------------


def _batch(size: int = 128) -> dict[str, np.ndarray]:
    images, hw = _prepared(["astronaut", "coffee", "rocket", "moon"], size)
    errors = row_errors.columns([None, row_errors.RowError("decode", "corrupt", "bad bytes"), None, None])
    hw = hw.numpy().astype(np.int32)
    hw[3] = (0, 0)  # a good row whose valid size is broken: it must fail alone
    return {
        S.URI: np.array(["a", "b", "c", "d"], dtype=object),
        S.IMAGE: images.numpy(),
        S.VALID_HW: hw,
        S.SCALE: np.ones(4, np.float32),
        **errors,
    }


def test_stage_keeps_columns_and_marks_error_rows(tmp_path):
    batch = _batch()
    model = PatchNet(SMALL).eval()
    uri = str(tmp_path / "patchnet.safetensors")
    save_patchnet(model, uri)
    cfg = ComplexityConfig(enabled=True, map_size=32, model=uri)
    out = ComplexityStage(cfg, device="cpu")(dict(batch))
    for k, v in batch.items():
        if k not in row_errors.COLUMNS:
            assert out[k] is v  # every input column passes through (the next stage needs IMAGE)
    errs = row_errors.read(out)
    assert errs[:3] == [None, row_errors.RowError("decode", "corrupt", "bad bytes"), None]
    assert (errs[3].stage, errs[3].reason) == ("complexity", "failed")
    for col in (S.COMPLEXITY_MEAN, S.COMPLEXITY_STD, S.COMPLEXITY_P90):
        assert out[col].dtype == np.float32 and out[col].shape == (4,)
        assert np.isfinite(out[col][[0, 2]]).all() and np.isnan(out[col][[1, 3]]).all()
    emb = out[S.PATCH_EMBEDDING]
    assert emb.shape == (4, SMALL.dim) and emb.dtype == np.float32
    assert (emb[[1, 3]] == 0).all()
    np.testing.assert_allclose(np.linalg.norm(emb[[0, 2]], axis=1), 1.0, atol=1e-5)
    ref = model.embed_images(batch[S.IMAGE][[0, 2]], batch[S.VALID_HW][[0, 2]])
    np.testing.assert_allclose(emb[[0, 2]], ref, atol=1e-5)
    for i in (0, 2):
        vh, vw = batch[S.VALID_HW][i]
        counts, layout = out[S.PATCH_COUNTS][i], out[S.PATCH_LAYOUT][i]
        assert counts.dtype == np.int32 and layout.dtype == np.int32 and len(counts) == 4
        assert counts.sum() * 3 == len(layout)
        cmap = complexity_map(batch[S.IMAGE][i : i + 1], cfg.sigma, cfg.scale, batch[S.VALID_HW][i : i + 1])[0]
        np.testing.assert_array_equal(layout, quadtree(cmap.numpy(), (vh, vw), 64, 8, cfg.thresholds).ravel())
        assert out[S.COMPLEXITY_MEAN][i] == pytest.approx(complexity_stats(cmap.numpy(), (vh, vw))[0], abs=1e-6)
        assert max(Image.open(io.BytesIO(out[S.COMPLEXITY_PNG][i])).size) == 32
    for i in (1, 3):
        assert out[S.COMPLEXITY_PNG][i] == b"" and len(out[S.PATCH_LAYOUT][i]) == 0 and len(out[S.PATCH_COUNTS][i]) == 0


def test_stage_without_model_has_no_embedding_column():
    out = ComplexityStage(ComplexityConfig(enabled=True), device="cpu")(_batch())
    assert S.PATCH_EMBEDDING not in out and len(out[S.ERROR_STAGE]) == 4


# --- the patch network -------------------------------------------------------------------------------------------


def test_patchnet_shapes_and_hard_layout_is_the_library_quadtree():
    images, hw = _prepared(["astronaut", "coffee", "grass"], 128)
    model = PatchNet(SMALL).eval()
    with torch.no_grad():
        emb, aux = model(images, hw)
    assert emb.shape == (3, SMALL.dim)
    torch.testing.assert_close(emb.norm(dim=1), torch.ones(3))
    cmaps = complexity_map(images, SMALL.sigma, SMALL.scale, hw).numpy()
    layouts = model.layout(images, hw)
    for i in range(3):
        ref = quadtree(cmaps[i], hw[i].tolist(), SMALL.cell, SMALL.min_cell, SMALL.thresholds)
        np.testing.assert_array_equal(layouts[i], ref)
        assert aux["leaves"][i] == len(ref) == aux["embedded"][i]
    fixed = PatchNet(dataclasses.replace(SMALL, layout="fixed")).eval()
    lay = fixed.layout(images, hw)
    for i in range(3):  # every 16-cell that starts inside the valid region
        vh, vw = hw[i].tolist()
        assert {tuple(r) for r in lay[i].tolist()} == _grid(0, 0, vw, vh, 16)


def test_soft_leaf_weights_two_levels_by_hand():
    t = torch.tensor([0.4])
    means = [torch.tensor([[[0.5]]]), torch.zeros(1, 2, 2)]
    exists = [torch.ones(1, 1, 1, dtype=torch.bool), torch.tensor([[[True, True], [True, False]]])]
    w = leaf_weights(means, exists, t, temperature=0.1)
    p = 1 / (1 + math.exp(-1.0))  # sigmoid((0.5 - 0.4) / 0.1)
    assert w[0].item() == pytest.approx(1 - p)
    np.testing.assert_allclose(w[1][0].numpy(), [[p, p], [p, 0.0]], rtol=1e-6)
    # expected leaves: 1 - p + 3 p (the missing child removes one of the 4); cost divides by the 3 last-level cells
    assert sum(x.sum() for x in w).item() == pytest.approx(1 + 2 * p)
    assert subdivision_cost(w, exists).item() == pytest.approx((1 + 2 * p) / 3)


def test_soft_leaf_weights_three_levels_and_cost_by_hand():
    t = torch.tensor([0.4, 0.5])
    means = [torch.tensor([[[0.5]]]), torch.tensor([[[0.6, 0.2], [0.45, 0.5]]]), torch.zeros(1, 4, 4)]
    ex1 = torch.tensor([[[True, True], [True, False]]])
    ex2 = ex1.repeat_interleave(2, 1).repeat_interleave(2, 2)
    exists = [torch.ones(1, 1, 1, dtype=torch.bool), ex1, ex2]
    w = leaf_weights(means, exists, t, temperature=0.1)

    def sig(v: float) -> float:
        return 1 / (1 + math.exp(-v))

    p0 = sig(1.0)
    p1 = [sig(1.0), sig(-3.0), sig(-0.5)]  # children (0, 0), (0, 1), (1, 0); (1, 1) is outside
    assert w[0].item() == pytest.approx(1 - p0)
    np.testing.assert_allclose(
        w[1][0].numpy(), [[p0 * (1 - p1[0]), p0 * (1 - p1[1])], [p0 * (1 - p1[2]), 0]], rtol=1e-6
    )
    np.testing.assert_allclose(w[2][0, 0:2, 0:2].numpy(), np.full((2, 2), p0 * p1[0]), rtol=1e-6)
    np.testing.assert_allclose(w[2][0, 2:4, 0:2].numpy(), np.full((2, 2), p0 * p1[2]), rtol=1e-6)
    assert w[2][0, 2:4, 2:4].abs().sum() == 0
    leaves = (1 - p0) + sum(p0 * (1 - q) + 4 * p0 * q for q in p1)
    assert sum(x.sum() for x in w).item() == pytest.approx(leaves)
    assert subdivision_cost(w, exists).item() == pytest.approx(leaves / 12)
    # the hard tree (temperature None) on the same means: 0.5 > 0.4 splits; 0.6 > 0.5 splits; the rest stay
    hard = leaf_weights(means, exists, t, temperature=None)
    assert hard[0].item() == 0 and hard[1][0].tolist() == [[0, 1], [1, 0]] and hard[2].sum().item() == 4


def test_fixed_layout_cost_and_soft_equals_hard_as_temperature_goes_to_zero():
    images, hw = _prepared(["astronaut", "coffee"], 128)
    hw[0] = torch.tensor([128, 128])
    fixed = PatchNet(dataclasses.replace(SMALL, layout="fixed")).eval()
    with torch.no_grad():
        _, aux = fixed(images, hw, soft=True)
    assert aux["cost"][0].item() == pytest.approx(0.25)  # 64 cells of 16 / 256 cells of 8
    model = PatchNet(dataclasses.replace(SMALL, temperature=1e-6)).eval()
    with torch.no_grad():
        hard, aux_h = model(images, hw, soft=False)
        soft, aux_s = model(images, hw, soft=True)
        cmap = complexity_map(images, SMALL.sigma, SMALL.scale, hw)
        means, exists = node_stats(cmap, hw, model.sizes)
        w_hard = leaf_weights(means, exists, model.thresholds, None)
        w_soft = leaf_weights(means, exists, model.thresholds, 1e-6)
        w_warm = leaf_weights(means, exists, model.thresholds, 0.1)
    for a, b in zip(w_hard, w_soft):
        torch.testing.assert_close(a, b)
    assert any((a - b).abs().max() > 0.1 for a, b in zip(w_hard, w_warm))  # a real temperature does differ
    torch.testing.assert_close(soft, hard, atol=1e-5, rtol=0)
    torch.testing.assert_close(aux_s["leaves"], aux_h["leaves"])


def test_save_load_round_trip_gives_identical_embeddings(tmp_path):
    images, hw = _prepared(["astronaut", "rocket"], 128)
    model = PatchNet(SMALL)
    model.train()
    with torch.no_grad():
        model.thresholds.add_(torch.tensor([0.01, -0.02, 0.03]))
        model(images, hw, soft=True)  # moves BatchNorm running statistics away from their initial values
    model.eval()
    uri = str(tmp_path / "pn.safetensors")
    data = save_patchnet(model, uri)
    assert b"roiqa.patchnet_config" in data[:4096]
    loaded = load_patchnet(uri)
    assert loaded.cfg == model.cfg and not loaded.training
    torch.testing.assert_close(loaded.thresholds, model.thresholds)
    np.testing.assert_array_equal(
        loaded.embed_images(images.numpy(), hw.numpy()), model.embed_images(images.numpy(), hw.numpy())
    )
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(1)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ValueError, match="not a patch network"):
        load_patchnet(str(tmp_path / "other.safetensors"))


def test_fit_images_matches_resizing_the_photo_directly():
    big, big_hw = _prepared(["coffee"], 256)  # 400 x 600 photo -> 171 x 256 inside a 256 square
    small, small_hw = _prepared(["coffee"], 128)  # -> 85 x 128
    x, hw = fit_images(big, big_hw, 128)
    assert x.shape == (1, 128, 128, 3) and x.dtype == torch.uint8
    assert abs(hw[0, 0].item() - small_hw[0, 0].item()) <= 1 and hw[0, 1].item() == 128
    diff = (x[0, :85].float() - small[0, :85].float()).abs()
    assert diff.mean() < 3.0  # antialiased bilinear vs PIL's bilinear from the original: a few grey levels
    assert (x[0, 87:] == 0).all()  # padding stays zero


def test_one_training_step_decreases_the_loss_on_a_fixed_batch():
    images, hw = _prepared(["astronaut", "coffee", "rocket", "chelsea"], 128)
    queries = (images.float() * 0.8).to(torch.uint8)  # darker views as the queries
    model = PatchNet(SMALL).train()
    opt = make_optimizer(model, lr=1e-3, threshold_lr=1e-2)
    loss0, parts0 = patchnet_loss(model, queries, hw, images, hw, lambda_cost=1.0)
    opt.zero_grad()
    loss0.backward()
    assert model.thresholds.grad is not None and model.thresholds.grad.abs().sum() > 0
    opt.step()
    loss1, _ = patchnet_loss(model, queries, hw, images, hw, lambda_cost=1.0)
    assert loss1.item() < loss0.item()
    assert parts0["loss"] == pytest.approx(parts0["nce"] + parts0["cost"], rel=1e-5)


def test_flops_per_image_matches_the_hand_count():
    model = PatchNet(PatchNetConfig())
    # multiply-adds of one 16x16 patch in the default config (see PatchNetConfig):
    attention = 3 * 8 * 9 * 16 * 16 + 8 * 16 * 9 * 8 * 8 + 16  # conv 3->8 at 16x16, conv 8->16 at 8x8, linear
    stem = 3 * 16 * 9 * 8 * 8  # stride 2 -> 8x8
    blocks = 16 * 64 * 64 + 64 * 9 * 16 + 64 * 24 * 16  # 16->24, stride 2 (hidden 64): 8x8 -> 4x4
    blocks += 24 * 96 * 16 + 96 * 9 * 16 + 96 * 24 * 16  # 24->24 at 4x4 (hidden 96)
    blocks += 24 * 96 * 16 + 96 * 9 * 4 + 96 * 48 * 4  # 24->48, stride 2: 4x4 -> 2x2
    blocks += 48 * 192 * 4 + 192 * 9 * 4 + 192 * 48 * 4  # 48->48 at 2x2 (hidden 192)
    head = 48 * 64 * 4
    per_patch = 2 * (attention + stem + blocks + head)
    f10, f11 = flops_per_image(model, 10), flops_per_image(model, 11)
    assert f11 - f10 == per_patch
    log = 2 * 256 * 256 * (13 + 13 + 9)  # two 13-tap passes and the 3x3 Laplacian on the 256 x 256 map
    assert flops_per_image(model, 0) == log + 2 * 4 * 64 * 128
    fixed = PatchNet(PatchNetConfig(layout="fixed"))  # no complexity map
    assert flops_per_image(fixed, 0) == 2 * 4 * 64 * 128 and flops_per_image(fixed, 11) == f11 - log


def test_forward_matches_a_naive_loop_over_the_leaves():
    cfg = dataclasses.replace(SMALL, min_cell=16, thresholds=(0.3, 0.4))  # sizes 64, 32, 16: no upsampling
    images, hw = _prepared(["astronaut", "coffee"], 128)
    model = PatchNet(cfg).eval()
    with torch.no_grad():
        emb, _ = model(images, hw)
        layouts = model.layout(images, hw)
        x = (images.permute(0, 3, 1, 2).float() / 255 - model.mean) / model.std  # (B, 3, 128, 128)
        for b, layout in enumerate(layouts):
            assert len({int(s) for s in layout[:, 2]}) >= 2  # the example mixes cell sizes
            per_size = {s: [] for s in model.sizes}
            for cx, cy, s in layout.tolist():
                patch = F.avg_pool2d(x[b : b + 1, :, cy : cy + s, cx : cx + s], s // cfg.patch_side)
                a = model.attention(patch)
                per_size[s].append(a[0] * model.embedder(patch * a)[0])
            pooled = [torch.stack(v).mean(0) if v else torch.zeros(cfg.patch_dim) for v in per_size.values()]
            ref = F.normalize(model.proj(torch.cat(pooled)), dim=0)
            torch.testing.assert_close(emb[b], ref, atol=1e-5, rtol=1e-4)


def test_context_crop_by_hand_and_a_short_training_run():
    img = np.arange(100 * 80 * 3, dtype=np.int64).reshape(100, 80, 3).astype(np.uint8)
    crop = context_crop(img, np.array([10.0, 20.0, 30.0, 60.0]), 2.0)  # centre (20, 40), 40 x 80 -> clipped
    np.testing.assert_array_equal(crop, img[0:80, 0:40])
    np.testing.assert_array_equal(context_crop(img, np.array([10.0, 20.0, 30.0, 60.0]), 1.0), img[20:60, 10:30])
    photos = [load_photo(n) for n in ("camera", "horse", "grass")]
    model, hist = train_patchnet(photos, 2, SMALL, batch_size=2, log_every=1)
    assert [h["step"] for h in hist] == [1, 2] and not model.training
    assert all(np.isfinite(h["loss"]) and len(h["thresholds"]) == 3 for h in hist)
