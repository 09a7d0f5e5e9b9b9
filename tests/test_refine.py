"""Seed 000 ROI refinement: the loss against hand-computed values, the depth factor, and boxes converging."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch
from PIL import Image

from roiqa.boxes import box_iou
from roiqa.config import RefineConfig
from roiqa.io.imageio import encode_png, resize_long_side
from roiqa.stages import refine as R


def scaled(box: np.ndarray, factor: float, dx: float = 0.0, dy: float = 0.0) -> np.ndarray:
    """`box` scaled by `factor` about its centre, the centre moved by (dx, dy) times its width and height."""
    w, h = box[2] - box[0], box[3] - box[1]
    cx, cy = (box[0] + box[2]) / 2 + dx * w, (box[1] + box[3]) / 2 + dy * h
    return np.array([cx - w * factor / 2, cy - h * factor / 2, cx + w * factor / 2, cy + h * factor / 2], np.float32)


def long_side(box) -> float:
    return max(box[2] - box[0], box[3] - box[1])


# --- a real pair: the astronaut's face pasted into the coffee photo, features from the shipped matcher -----------


@pytest.fixture(scope="module")
def pair():
    """Query features of the face (96 px, its true size in the search image) and the search image's pyramid."""
    import skimage.data

    from roiqa.models.checkpoint import load_matcher
    from roiqa.weights import resolve_model

    uri = resolve_model(None)
    assert uri is not None, "the shipped matcher checkpoint is missing (roiqa/weights/, tracked in git)"
    torch.set_num_threads(1)
    model = load_matcher(uri).eval()
    face, _ = resize_long_side(skimage.data.astronaut()[14:186, 150:304], 96)
    image = np.ascontiguousarray(skimage.data.coffee()[:320, :320])
    x0, y0 = 150, 120
    image[y0 : y0 + face.shape[0], x0 : x0 + face.shape[1]] = face
    truth = np.array([x0, y0, x0 + face.shape[1], y0 + face.shape[0]], np.float32)
    with torch.inference_mode():
        query = model.patch_features(face, pad=32)
        feats = model.pyramid(torch.from_numpy(image[None]))
    strides = {lv: model.stride(lv) for lv in model.cfg.levels}
    edge = R.edge_pyramid(R.edge_weights(face), {lv: tuple(q.shape[-2:]) for lv, q in query.items()}, strides)
    return {
        "query": query,
        "feats": feats,
        "strides": strides,
        "edge": edge,
        "truth": truth,
        "image_hw": image.shape[:2],
        "query_hw": face.shape[:2],
        "model": model,
    }


def refine(pair, start: np.ndarray, cfg: RefineConfig, **kw) -> R.RefineResult:
    p = pair
    hw = {"image_hw": p["image_hw"], "query_hw": p["query_hw"]}
    return R.refine_box(p["query"], p["feats"], p["strides"], start, cfg, p["edge"], **hw, **kw)


@pytest.mark.parametrize(
    ("factor", "dx", "dy", "move"),
    [(1.3, 0, 0, False), (0.75, 0, 0, False), (1.3, 0, 0, True), (0.75, 0, 0, True), (1.3, 0.15, -0.15, True),
     (0.75, -0.15, 0.15, True)],
)  # fmt: skip
def test_refinement_converges_to_the_pasted_box(pair, factor, dx, dy, move):
    start = scaled(pair["truth"], factor, dx, dy)
    res = refine(pair, start, RefineConfig(move_center=move))
    iou0, iou = box_iou(start, pair["truth"])[0, 0], box_iou(res.box, pair["truth"])[0, 0]
    assert iou >= 0.8 and iou > iou0 + 0.2, (iou0, iou, res.history)
    assert res.steps >= 1 and res.steps == sum(h["accepted"] for h in res.history)
    losses = [h["loss"] for h in res.history]
    assert all(b <= a for a, b in zip(losses, losses[1:]))  # a step is only accepted if the loss does not increase
    ref = R.box_loss(pair["query"], pair["feats"], pair["strides"], res.box[None], start, RefineConfig(), pair["edge"],
                     query_hw=pair["query_hw"])  # fmt: skip
    assert res.loss == pytest.approx(float(ref[0]), rel=1e-5)


def test_each_iteration_is_clamped_to_max_change_and_the_size_range(pair):
    truth = pair["truth"]
    cfg = RefineConfig(rate=1e6, max_change=0.1, iterations=6, move_center=False)
    start = scaled(truth, 1.3)
    res = refine(pair, start, cfg)
    sides = [long_side(start)] + [long_side(h["box"]) for h in res.history]
    ratios = np.array(sides[1:]) / np.array(sides[:-1])
    assert np.all(ratios <= 1.1 + 1e-4) and np.all(ratios >= 1 / 1.1 - 1e-4), ratios
    assert ratios[0] == pytest.approx(1 / 1.1, abs=1e-4)  # with this rate the first step sits on the clamp
    # The box wants to reach the truth (96 px); the size range stops it at its bound.
    grow = refine(pair, scaled(truth, 0.75), dataclasses.replace(cfg, rate=0.5, max_change=0.15, max_size=80.0))
    assert long_side(grow.box) == pytest.approx(80.0, abs=1e-3)
    shrink = refine(pair, scaled(truth, 1.3), dataclasses.replace(cfg, rate=0.5, max_change=0.15, min_size=115.0))
    assert long_side(shrink.box) == pytest.approx(115.0, abs=1e-3)
    capped = refine(pair, scaled(truth, 1.3), dataclasses.replace(cfg, max_size=100.0))  # start above the range
    assert max(long_side(h["box"]) for h in capped.history) <= 100.0 + 1e-3
    with pytest.raises(ValueError, match="min_size"):
        refine(pair, start, dataclasses.replace(cfg, min_size=50.0, max_size=40.0))
    with pytest.raises(ValueError, match="empty"):
        refine(pair, np.array([10, 10, 10, 30], np.float32), cfg)


@pytest.mark.gpu
def test_cuda_refines_like_cpu(pair):
    cuda = torch.device("cuda")
    p = dict(pair)
    p["query"] = {lv: q.to(cuda) for lv, q in pair["query"].items()}
    p["feats"] = {lv: f.to(cuda) for lv, f in pair["feats"].items()}
    p["edge"] = {lv: e.to(cuda) for lv, e in pair["edge"].items()}
    start = scaled(pair["truth"], 1.3, 0.15, -0.15)
    cpu, gpu = refine(pair, start, RefineConfig()), refine(p, start, RefineConfig())
    assert box_iou(cpu.box, gpu.box)[0, 0] > 0.99 and gpu.loss == pytest.approx(cpu.loss, rel=1e-3)


# --- the loss on tiny tensors ------------------------------------------------------------------------------------


def test_perceptual_loss_matches_hand_computed_parts():
    # Level 3: C = 2, 2x2 maps. Query mean feature mu = (0.5, 0.5); centred, the maps differ in cells (0,1), (1,1).
    q3 = torch.tensor([[[2.0, 0.0], [0.0, 0.0]], [[0.0, 0.0], [0.0, 2.0]]])  # (C, h, w)
    r3 = torch.tensor([[[2.0, 0.0], [0.0, 0.0]], [[0.0, 2.0], [0.0, 0.0]]])
    # centred dot product 2, both squared norms 6: cos = 1/3. In cells (0,1) and (1,1) the unit vectors are
    # (-1,-1)/sqrt2 and (-1,3)/sqrt10: L1 = 2/sqrt2 + 2/sqrt10, over sqrt(C) = sqrt2: 1 + 1/sqrt5.
    d_cell = 1 + 1 / math.sqrt(5)
    edge3 = torch.tensor([[0.0, 2.0], [1.0, 1.0]])  # weighted mean: (2 * d + 1 * d) / 4
    q4 = torch.randn(2, 3, 3)  # level 4: identical maps, so both of its terms are 0
    query, roi = {3: q3, 4: q4}, {3: r3, 4: q4.clone()}
    edge = {3: edge3, 4: torch.rand(3, 3) + 0.5}
    total, parts = R.perceptual_loss(query, roi, edge, (3.0, 1.0), 1.0, 0.5, size_weight=2.0)
    assert float(parts["similarity_l3"]) == pytest.approx(2.0 * (1 - 1 / 3), rel=1e-5)
    assert float(parts["dissimilarity_l3"]) == pytest.approx(3 * d_cell / 4, rel=1e-5)
    assert float(parts["similarity_l4"]) == pytest.approx(0.0, abs=1e-6)
    assert float(parts["dissimilarity_l4"]) == pytest.approx(0.0, abs=1e-6)
    # level weights (3, 1) are normalised to (0.75, 0.25)
    assert float(parts["similarity"]) == pytest.approx(0.75 * 2.0 * 2 / 3, rel=1e-5)
    assert float(parts["dissimilarity"]) == pytest.approx(0.75 * 3 * d_cell / 4, rel=1e-5)
    assert float(total) == pytest.approx(1.0 * 0.75 * 4 / 3 + 0.5 * 0.75 * 3 * d_cell / 4, rel=1e-5)
    # a batch of ROIs gives one loss per ROI, equal to the single-ROI values
    batch = {lv: torch.stack([roi[lv], query[lv]]) for lv in query}
    totals, _ = R.perceptual_loss(query, batch, edge, (3.0, 1.0), 1.0, 0.5, size_weight=torch.tensor([2.0, 2.0]))
    assert totals.shape == (2,) and float(totals[0]) == pytest.approx(float(total), rel=1e-5)
    assert float(totals[1]) == pytest.approx(0.0, abs=1e-5)
    with pytest.raises(ValueError, match="level 3"):
        R.perceptual_loss(query, {3: r3[:, :1], 4: q4}, edge, (1.0, 1.0), 1.0, 1.0)


def flat_scene(seed: int = 0, c: int = 8):
    """Query maps (C, 2, 2) and (C, 1, 1) against spatially constant 64x64-pixel search maps (strides 8, 16): every
    box inside the image has the same ROI features, so only the size weight and depth change the loss."""
    g = torch.Generator().manual_seed(seed)
    query = {3: torch.randn(c, 2, 2, generator=g), 4: torch.randn(c, 1, 1, generator=g)}
    vec = torch.randn(c, generator=g)
    feats = {3: vec.view(1, c, 1, 1).expand(1, c, 8, 8).clone(), 4: vec.view(1, c, 1, 1).expand(1, c, 4, 4).clone()}
    edge = {3: torch.ones(2, 2), 4: torch.ones(1, 1)}
    return query, feats, {3: 8, 4: 16}, edge


def test_size_weight_favours_smaller_rois():
    assert R.size_weight(50.0, 100.0, 0.25) == pytest.approx(2**0.25)
    assert R.size_weight(np.array([100.0, 200.0]), 100.0, 0.25) == pytest.approx([1.0, 2**-0.25])
    query, feats, strides, edge = flat_scene()
    cfg = RefineConfig(w_dissimilarity=0.0, level_weights=(0.5, 0.5), size_power=0.25)
    ref = np.array([16, 16, 48, 48], np.float32)
    small = np.array([24, 24, 40, 40], np.float32)  # half the side
    loss = R.box_loss(query, feats, strides, np.stack([ref, small]), ref, cfg, edge)
    assert loss[0] > 0 and loss[1] / loss[0] == pytest.approx(2**0.25, rel=1e-5)


# --- depth ---------------------------------------------------------------------------------------------------


def test_depth_scales_the_loss_by_the_median_difference():
    query, feats, strides, edge = flat_scene(1)
    cfg = RefineConfig()
    ref = np.array([4, 4, 20, 20], np.float32)  # columns 4..19, all at depth 1000
    half = np.array([24, 4, 40, 20], np.float32)  # columns 24..39: 8 at 1000, 8 at 2000 -> median 1500
    most = np.array([28, 4, 44, 20], np.float32)  # columns 28..43: 4 at 1000, 12 at 2000 -> median 2000
    boxes = np.stack([ref, half, most])
    depth = np.full((64, 64), 1000.0, np.float32)
    depth[:, 32:] = 2000.0
    plain = R.box_loss(query, feats, strides, boxes, ref, cfg, edge)
    assert plain[1] == pytest.approx(plain[0]) and plain[2] == pytest.approx(plain[0])  # same size, same features
    constant = R.box_loss(query, feats, strides, boxes, ref, cfg, edge, depth=np.full((64, 64), 3.0, np.float32))
    np.testing.assert_allclose(constant, plain, rtol=1e-12)
    scaled_loss = R.box_loss(query, feats, strides, boxes, ref, cfg, edge, depth=depth)
    np.testing.assert_allclose(scaled_loss / plain, [1.0, 1.5, 2.0], rtol=1e-6)
    # a depth map at half the image's resolution: boxes are mapped onto it through image_hw
    small = depth[::2, ::2]
    np.testing.assert_allclose(
        R.box_loss(query, feats, strides, boxes, ref, cfg, edge, depth=small, image_hw=(64, 64)), scaled_loss
    )
    assert R.depth_difference(depth, most, ref) == pytest.approx(1.0)
    unknown = depth.copy()
    unknown[:, 32:] = 0.0  # 0 = no measurement: no penalty
    assert R.depth_difference(unknown, np.array([40, 4, 56, 20]), ref) == 0.0


def test_load_depth_reads_png16_and_npy_and_refuses_pickles(tmp_path):
    arr = np.array([[1000, 40000, 0], [65535, 1, 500]], np.uint16)
    Image.fromarray(arr).save(tmp_path / "img01.depth.png")
    png = R.load_depth(str(tmp_path / "{stem}.depth.png"), "s3://bucket/photos/img01.jpg")
    assert png.dtype == np.float32 and png.shape == (2, 3)
    np.testing.assert_array_equal(png, arr.astype(np.float32))
    metres = np.random.default_rng(0).uniform(0.5, 10, (4, 5)).astype(np.float32)
    np.save(tmp_path / "img02.png.npy", metres)
    np.testing.assert_array_equal(R.load_depth(str(tmp_path / "{name}.npy"), "/data/shard.tar#a/img02.png"), metres)
    assert R.load_depth(str(tmp_path / "{stem}.npy"), "/data/missing.jpg") is None
    np.save(tmp_path / "evil.npy", np.array([{"x": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(ValueError, match="evil.npy"):
        R.load_depth(str(tmp_path / "{stem}.npy"), "evil.jpg")
    (tmp_path / "rgb.png").write_bytes(encode_png(np.zeros((4, 4, 3), np.uint8)))
    with pytest.raises(ValueError, match="single-channel"):
        R.load_depth(str(tmp_path / "{stem}.png"), "rgb.jpg")
    with pytest.raises(ValueError, match="template"):
        R.load_depth(str(tmp_path / "{basename}.png"), "rgb.jpg")


# --- the edge mask and ROI sampling --------------------------------------------------------------------------


def test_edge_weights_emphasise_edges_and_cover_partial_cells():
    assert np.array_equal(R.edge_weights(np.full((20, 30, 3), 77, np.uint8)), np.ones((20, 30), np.float32))
    step = np.zeros((32, 64, 3), np.uint8)
    step[:, 32:] = 255
    w = R.edge_weights(step)
    assert w.mean() == pytest.approx(1.0, rel=1e-5)
    assert w[:, 0] == pytest.approx(R.EDGE_FLOOR) and w[16, 32] > 3 * w[16, 0]  # far from the edge: the floor only
    # A 40-px patch at stride 32 has 2 cells per side; the second covers 8 of its 32 pixels.
    grid = R.edge_pyramid(np.ones((40, 40), np.float32), {5: (2, 2)}, {5: 32})[5]
    cover = np.array([[1.0, 0.25], [0.25, 0.0625]])
    np.testing.assert_allclose(grid.numpy(), cover / cover.mean(), rtol=1e-6)


def test_roi_features_align_cells_with_the_query_grid():
    ramp = torch.arange(16, dtype=torch.float32).view(1, 1, 1, 16).expand(1, 1, 16, 16)  # value = column index
    box = np.array([16, 8, 48, 40], np.float32)
    # Exact grid (no query_hw): bin centres 16 + (j + 0.5) * 32 / 3 px -> cell coordinate centre / 8 - 0.5.
    exact = R.roi_features({3: ramp}, box, {3: (3, 3)}, {3: 8})[3]
    centres = 16 + (np.arange(3) + 0.5) * 32 / 3
    np.testing.assert_allclose(exact[0, 0].numpy(), centres / 8 - 0.5, atol=1e-5)
    # A 20x20-px query has 3 cells of 8 px = 24 px: the region is stretched by 24 / 20 from the top-left corner.
    stretched = R.roi_features({3: ramp}, box, {3: (3, 3)}, {3: 8}, query_hw=(20, 20))[3]
    centres = 16 + (np.arange(3) + 0.5) * 32 * 1.2 / 3
    np.testing.assert_allclose(stretched[0, 0].numpy(), centres / 8 - 0.5, atol=1e-5)
    assert stretched.shape == (1, 3, 3)
    many = R.roi_features({3: ramp}, np.stack([box, box + 8]), {3: (3, 3)}, {3: 8}, query_hw=(20, 20))[3]
    assert many.shape == (2, 1, 3, 3) and torch.allclose(many[0], stretched)
