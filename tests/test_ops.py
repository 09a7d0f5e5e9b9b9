"""Tests of roiqa.ops (xcorr, fusion, GeM, peaks), roiqa.boxes and roiqa.io.ids against naive loops and hand values."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from roiqa import boxes as B
from roiqa.io.ids import image_id, image_ids
from roiqa.ops.fusion import lse_fuse, upsample_to
from roiqa.ops.gem import GeM, gem, valid_mask
from roiqa.ops.peaks import local_maxima, nms_peaks
from roiqa.ops.xcorr import cosine_xcorr, cosine_xcorr_naive, same_padding

# --- cosine cross-correlation -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kh, kw",
    [(1, 1), (2, 3), (3, 3), (4, 4), (3, 2), (7, 9)],  # (7, 9): kernel larger than the 5 x 6 search map
)
def test_cosine_xcorr_matches_naive_loop(kh: int, kw: int) -> None:
    g = torch.Generator().manual_seed(kh * 10 + kw)
    query = torch.randn(4, kh, kw, generator=g, dtype=torch.float64)
    search = torch.randn(3, 4, 5, 6, generator=g, dtype=torch.float64)
    fast = cosine_xcorr(query, search)
    ref = cosine_xcorr_naive(query, search)
    assert fast.shape == (3, 5, 6)
    torch.testing.assert_close(fast, ref, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("method", ["direct", "fft", "auto"])
@pytest.mark.parametrize("kh, kw", [(1, 1), (2, 3), (4, 4), (10, 12), (17, 19)])
def test_cosine_xcorr_methods_match_naive_loop(method: str, kh: int, kw: int) -> None:
    # the FFT path must give the convolution's answer for every kernel size, including kernels larger than the map
    g = torch.Generator().manual_seed(kh * 100 + kw)
    query = torch.randn(5, kh, kw, generator=g, dtype=torch.float64)
    search = torch.randn(2, 5, 14, 16, generator=g, dtype=torch.float64)
    fast = cosine_xcorr(query, search, method=method)
    torch.testing.assert_close(fast, cosine_xcorr_naive(query, search), rtol=1e-9, atol=1e-9)
    f32 = cosine_xcorr(query.float(), search.float(), method=method)
    torch.testing.assert_close(f32, fast.float(), rtol=1e-4, atol=1e-5)


def test_cosine_xcorr_rejects_unknown_method() -> None:
    with pytest.raises(ValueError, match="method"):
        cosine_xcorr(torch.randn(2, 2, 2), torch.randn(1, 2, 4, 4), method="winograd")


def test_cosine_xcorr_float32_matches_naive_and_is_bounded() -> None:
    g = torch.Generator().manual_seed(1)
    query = torch.randn(8, 3, 3, generator=g)
    search = torch.randn(2, 8, 9, 11, generator=g)
    fast = cosine_xcorr(query, search)
    torch.testing.assert_close(fast, cosine_xcorr_naive(query, search), rtol=1e-4, atol=1e-5)
    assert fast.abs().max() <= 1.0 + 1e-5
    assert fast.abs().max() > 0.1  # not trivially zero


@pytest.mark.parametrize("kh, kw", [(3, 3), (2, 4), (4, 3), (1, 1)])
def test_cosine_xcorr_finds_scaled_copy_at_same_padding_cell(kh: int, kw: int) -> None:
    g = torch.Generator().manual_seed(7)
    c, h, w = 5, 12, 14
    search = torch.rand(1, c, h, w, generator=g, dtype=torch.float64) - 0.5
    query = torch.rand(c, kh, kw, generator=g, dtype=torch.float64) - 0.5
    top, left = 4, 6  # top-left input cell of the planted copy (fully inside the map)
    search[0, :, top : top + kh, left : left + kw] = 3.7 * query  # cosine ignores the scale
    out = cosine_xcorr(query, search)[0]
    i, j = top + kh // 2, left + kw // 2  # same_padding: output (i, j) <- window at (i - kh//2, j - kw//2)
    assert out[i, j].item() == pytest.approx(1.0, abs=1e-9)
    flat = int(out.argmax())
    assert (flat // w, flat % w) == (i, j)
    # Independent of the library: the window whose top-left is (i - kh//2, j - kw//2) is the copy.
    win = search[0, :, i - kh // 2 : i - kh // 2 + kh, j - kw // 2 : j - kw // 2 + kw]
    assert torch.allclose(win, 3.7 * query)


def test_same_padding_values() -> None:
    assert same_padding(3, 3) == (1, 1, 1, 1)
    assert same_padding(4, 2) == (1, 0, 2, 1)  # (left, right, top, bottom)
    assert same_padding(1, 1) == (0, 0, 0, 0)
    for kh, kw in [(1, 4), (5, 2), (6, 7)]:
        left, right, top, bottom = same_padding(kh, kw)
        assert left + right == kw - 1 and top + bottom == kh - 1


def test_cosine_xcorr_zero_search_is_zero() -> None:
    query = torch.randn(4, 3, 3)
    out = cosine_xcorr(query, torch.zeros(2, 4, 6, 7))
    assert out.shape == (2, 6, 7)
    assert torch.equal(out, torch.zeros(2, 6, 7))


def test_cosine_xcorr_zero_window_scores_zero_elsewhere_not() -> None:
    query = torch.ones(2, 1, 1)
    search = torch.zeros(1, 2, 3, 3)
    search[0, :, 1, 1] = torch.tensor([2.0, 2.0])
    out = cosine_xcorr(query, search)[0]
    expected = torch.zeros(3, 3)
    expected[1, 1] = 1.0
    torch.testing.assert_close(out, expected)


def test_cosine_xcorr_rejects_channel_mismatch() -> None:
    with pytest.raises(ValueError, match="search must be"):
        cosine_xcorr(torch.randn(3, 2, 2), torch.randn(1, 4, 5, 5))
    with pytest.raises(ValueError):
        cosine_xcorr(torch.randn(3, 2, 2), torch.randn(3, 5, 5))


# --- LSE fusion -----------------------------------------------------------------------------------------------


def test_lse_fuse_equal_maps_returns_the_map() -> None:
    h = torch.randn(2, 5, 6, dtype=torch.float64)
    maps = torch.stack([h, h, h])
    alpha = torch.tensor([0.2, 0.5, 0.3], dtype=torch.float64)
    for gamma in (0.5, 10.0, 100.0):
        torch.testing.assert_close(lse_fuse(maps, alpha, gamma), h, rtol=1e-10, atol=1e-10)


def test_lse_fuse_large_gamma_is_max() -> None:
    g = torch.Generator().manual_seed(0)
    maps = torch.rand(3, 4, 5, generator=g, dtype=torch.float64)
    alpha = torch.tensor([0.3, 0.3, 0.4], dtype=torch.float64)
    out = lse_fuse(maps, alpha, 1e4)
    # error bound: |log(alpha)| / gamma <= log(1/0.3) / 1e4 ~ 1.2e-4
    torch.testing.assert_close(out, maps.max(dim=0).values, rtol=0, atol=2e-4)


def test_lse_fuse_small_gamma_is_weighted_mean() -> None:
    g = torch.Generator().manual_seed(1)
    maps = torch.rand(3, 4, 5, generator=g, dtype=torch.float64)
    alpha = torch.tensor([0.1, 0.6, 0.3], dtype=torch.float64)
    out = lse_fuse(maps, alpha, 1e-4)
    ref = (alpha[:, None, None] * maps).sum(dim=0)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-4)


def test_lse_fuse_hand_computed_two_levels() -> None:
    maps = torch.tensor([[0.0, 1.0], [1.0, 3.0]], dtype=torch.float64)  # level 0 = [0, 1], level 1 = [1, 3]
    alpha = torch.tensor([0.25, 0.75], dtype=torch.float64)
    out = lse_fuse(maps, alpha, 2.0)
    expected = [
        0.5 * math.log(0.25 * math.exp(0.0) + 0.75 * math.exp(2.0)),
        0.5 * math.log(0.25 * math.exp(2.0) + 0.75 * math.exp(6.0)),
    ]
    assert out.tolist() == pytest.approx(expected, rel=1e-12)


def test_lse_fuse_gamma_as_tensor() -> None:
    maps = torch.tensor([[0.0], [1.0]])
    out = lse_fuse(maps, torch.tensor([0.5, 0.5]), torch.tensor(1.0))
    assert out.item() == pytest.approx(math.log((1 + math.e) / 2), rel=1e-6)


def test_lse_fuse_wrong_alpha_shape() -> None:
    maps = torch.zeros(3, 2, 2)
    with pytest.raises(ValueError, match=r"alpha must have shape \(3,\)"):
        lse_fuse(maps, torch.ones(2) / 2, 1.0)
    with pytest.raises(ValueError):
        lse_fuse(maps, torch.ones(3, 1) / 3, 1.0)


def test_upsample_to_shape_and_constant() -> None:
    maps = [torch.randn(2, 8, 12), torch.full((2, 4, 6), 0.25), torch.randn(2, 2, 3)]
    out = upsample_to(maps, (8, 12))
    assert out.shape == (3, 2, 8, 12)
    torch.testing.assert_close(out[0], maps[0])  # already the right size: unchanged
    torch.testing.assert_close(out[1], torch.full((2, 8, 12), 0.25))  # bilinear keeps constants


# --- GeM ------------------------------------------------------------------------------------------------------


def test_gem_p1_is_mean() -> None:
    x = torch.rand(2, 3, 4, 5, dtype=torch.float64) + 0.1
    torch.testing.assert_close(gem(x, 1.0), x.mean(dim=(2, 3)))


def test_gem_large_p_approaches_max() -> None:
    x = torch.rand(2, 3, 4, 5, dtype=torch.float64) + 0.1
    out = gem(x, 200.0)
    mx = x.amax(dim=(2, 3))
    # (mean x^p)^(1/p) in [max * (1/20)^(1/p), max]: within 1.5 % of the max for p = 200 and 20 cells
    assert torch.all(out <= mx + 1e-12)
    assert torch.all(out >= mx * (1 / 20) ** (1 / 200) - 1e-12)
    torch.testing.assert_close(out, mx, rtol=0.016, atol=0)


def test_gem_constant_map() -> None:
    x = torch.full((1, 2, 3, 3), 0.7, dtype=torch.float64)
    for p in (1.0, 2.5, 3.0, 10.0):
        torch.testing.assert_close(gem(x, p), torch.full((1, 2), 0.7, dtype=torch.float64))


def test_gem_hand_computed_p3() -> None:
    x = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]]], dtype=torch.float64)
    expected = ((1 + 8 + 27 + 64) / 4) ** (1 / 3)  # 25 ** (1/3)
    assert gem(x, 3.0).item() == pytest.approx(expected, rel=1e-12)


def test_gem_clamps_negative_values_to_eps() -> None:
    x = torch.tensor([[[[-5.0, 2.0]]]], dtype=torch.float64)
    expected = ((1e-6) ** 2 + 4.0) / 2
    assert gem(x, 2.0).item() == pytest.approx(math.sqrt(expected), rel=1e-12)


def test_gem_masked_equals_cropped() -> None:
    g = torch.Generator().manual_seed(3)
    x = torch.rand(2, 3, 5, 6, generator=g, dtype=torch.float64)
    mask = torch.zeros(2, 1, 5, 6, dtype=torch.float64)
    mask[0, :, :3, :4] = 1
    mask[1, :, :5, :2] = 1
    out = gem(x, 3.0, mask=mask)
    torch.testing.assert_close(out[0], gem(x[:1, :, :3, :4], 3.0)[0])
    torch.testing.assert_close(out[1], gem(x[1:, :, :5, :2], 3.0)[0])
    # full mask equals no mask
    torch.testing.assert_close(gem(x, 3.0, mask=torch.ones(2, 1, 5, 6)), gem(x, 3.0))


def test_valid_mask_known_case() -> None:
    valid_hw = torch.tensor([[20, 40], [64, 64], [1, 1]])
    m = valid_mask(valid_hw, (4, 8), stride=8)
    assert m.shape == (3, 1, 4, 8)
    expected = torch.zeros(3, 1, 4, 8)
    expected[0, 0, :3, :5] = 1  # ceil(20 / 8) = 3 rows, ceil(40 / 8) = 5 cols
    expected[1, 0, :4, :8] = 1  # larger than the map: clamped to the map
    expected[2, 0, :1, :1] = 1  # at least one cell
    assert torch.equal(m, expected)


def test_gem_module_learnable_p() -> None:
    mod = GeM(p=2.0)
    assert isinstance(mod.p, torch.nn.Parameter) and mod.p.requires_grad
    assert any(p is mod.p for p in mod.parameters())
    x = torch.tensor([[[[1.0, 3.0]]]])
    out = mod(x)
    assert out.item() == pytest.approx(math.sqrt(5.0), rel=1e-6)
    out.sum().backward()
    assert mod.p.grad is not None and mod.p.grad.abs().item() > 0


# --- peaks ----------------------------------------------------------------------------------------------------


def test_local_maxima_planted_peaks() -> None:
    hm = torch.zeros(10, 12)
    hm[2, 3], hm[7, 8], hm[5, 0] = 0.9, 0.5, 0.7
    vals, rows, cols = local_maxima(hm, k=3)
    assert vals.tolist() == pytest.approx([0.9, 0.7, 0.5])
    assert rows.tolist() == [2, 5, 7]
    assert cols.tolist() == [3, 0, 8]


def _naive_local_maxima(hm: np.ndarray, window: int) -> list[tuple[float, int, int]]:
    r = window // 2
    h, w = hm.shape
    out = []
    for i in range(h):
        for j in range(w):
            nb = hm[max(0, i - r) : i + r + 1, max(0, j - r) : j + r + 1]
            if hm[i, j] >= nb.max():
                out.append((float(hm[i, j]), i, j))
    return sorted(out, reverse=True)


@pytest.mark.parametrize("window", [3, 5])
def test_local_maxima_k_larger_than_count_matches_naive(window: int) -> None:
    rng = np.random.default_rng(window)
    hm = rng.random((9, 11)).astype(np.float32)
    ref = _naive_local_maxima(hm, window)
    assert 0 < len(ref) < 50
    vals, rows, cols = local_maxima(torch.from_numpy(hm), k=1000, window=window)
    assert len(vals) == len(ref)
    assert list(zip(rows.tolist(), cols.tolist(), strict=True)) == [(i, j) for _, i, j in ref]
    assert vals.tolist() == pytest.approx([v for v, _, _ in ref])
    # k smaller: the best k of them
    vals2, rows2, _ = local_maxima(torch.from_numpy(hm), k=2, window=window)
    assert rows2.tolist() == [ref[0][1], ref[1][1]]


def test_nms_peaks_drops_overlapping_weaker_box() -> None:
    boxes = torch.tensor([[0.0, 0.0, 10.0, 10.0], [1.0, 0.0, 11.0, 10.0], [20.0, 20.0, 30.0, 30.0]])
    scores = torch.tensor([0.9, 0.8, 0.5])
    iou01 = 90.0 / 110.0  # intersection 9 x 10, union 100 + 100 - 90
    assert B.box_iou(boxes[:1].numpy(), boxes[1:2].numpy())[0, 0] == pytest.approx(iou01, rel=1e-6)
    assert nms_peaks(boxes, scores, iou=0.5, k=10).tolist() == [0, 2]
    assert nms_peaks(boxes, scores, iou=iou01 + 0.01, k=10).tolist() == [0, 1, 2]  # threshold above the IoU
    assert nms_peaks(boxes, scores, iou=0.5, k=1).tolist() == [0]
    # the stronger box wins whichever comes first
    assert nms_peaks(boxes, torch.tensor([0.8, 0.9, 0.5]), iou=0.5, k=10).tolist() == [1, 2]


# --- boxes ----------------------------------------------------------------------------------------------------


def _random_boxes(n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    xy = rng.uniform(0, 500, size=(n, 2))
    wh = rng.uniform(1, 200, size=(n, 2))
    return np.concatenate([xy, xy + wh], axis=1).astype(np.float32)


def test_box_format_round_trips() -> None:
    b = _random_boxes(50, 0)
    xywh = B.xyxy_to_xywh(b)
    np.testing.assert_allclose(xywh[:, 2:], b[:, 2:] - b[:, :2], rtol=1e-6)
    np.testing.assert_allclose(B.xywh_to_xyxy(xywh), b, atol=1e-4, rtol=1e-5)
    cxcywh = B.xyxy_to_cxcywh(b)
    np.testing.assert_allclose(cxcywh[:, :2], (b[:, :2] + b[:, 2:]) / 2, rtol=1e-6)
    np.testing.assert_allclose(B.cxcywh_to_xyxy(cxcywh), b, atol=1e-4, rtol=1e-5)


def test_box_format_hand_values() -> None:
    b = [[10, 20, 30, 60]]
    assert B.xyxy_to_xywh(b).tolist() == [[10, 20, 20, 40]]
    assert B.xyxy_to_cxcywh(b).tolist() == [[20, 40, 20, 40]]
    assert B.cxcywh_to_xyxy([[20, 40, 20, 40]]).tolist() == [[10, 20, 30, 60]]
    assert B.xyxy_to_xywh(b).dtype == np.float32


def test_scale_boxes_round_trip() -> None:
    b = _random_boxes(20, 1)
    s = 0.37
    scaled = B.scale_boxes(b, s)
    np.testing.assert_allclose(scaled, b * s, rtol=1e-6)
    np.testing.assert_allclose(B.scale_boxes(scaled, 1 / s), b, rtol=1e-5)
    per_axis = np.array([2.0, 0.5, 2.0, 0.5], dtype=np.float32)
    assert B.scale_boxes([[1, 2, 3, 4]], per_axis).tolist() == [[2, 1, 6, 2]]


def test_clip_boxes() -> None:
    b = np.array([[-5, -3, 50, 40], [10, 10, 20, 20], [90, 70, 130, 150]], dtype=np.float32)
    out = B.clip_boxes(b, height=60, width=100)
    assert out.tolist() == [[0, 0, 50, 40], [10, 10, 20, 20], [90, 60, 100, 60]]
    assert b[0, 0] == -5  # input left untouched


def test_box_iou_hand_values() -> None:
    a = np.array([[0, 0, 2, 2], [0, 0, 2, 2]], dtype=np.float32)
    b = np.array([[0, 0, 2, 2], [5, 5, 6, 6], [1, 0, 3, 2], [1, 1, 1, 1]], dtype=np.float32)
    iou = B.box_iou(a, b)
    assert iou.shape == (2, 4)
    # identical: 1; disjoint: 0; shifted by half a width: inter 2, union 4 + 4 - 2 -> 1/3; degenerate: 0
    np.testing.assert_allclose(iou[0], [1.0, 0.0, 1 / 3, 0.0], rtol=1e-6)
    assert B.box_iou([[1, 1, 1, 1]], [[1, 1, 1, 1]]).tolist() == [[0.0]]  # empty union
    # contained box: inter = area of small = 1, union = 4
    assert B.box_iou([[0, 0, 2, 2]], [[0.5, 0.5, 1.5, 1.5]])[0, 0] == pytest.approx(0.25)


def test_box_area() -> None:
    assert B.box_area([[0, 0, 3, 4], [5, 5, 2, 9]]).tolist() == [12.0, 0.0]


def test_as_boxes_shapes() -> None:
    assert B.as_boxes([1, 2, 3, 4]).shape == (1, 4)
    assert B.as_boxes(np.zeros((0, 4))).shape == (0, 4)
    assert B.as_boxes([[1, 2, 3, 4]]).dtype == np.float32
    for bad in ([1, 2, 3], np.zeros((2, 3)), np.zeros((2, 2, 4)), np.zeros(8)):
        with pytest.raises(ValueError, match=r"boxes must have shape \(N, 4\)"):
            B.as_boxes(bad)


def test_feature_window_to_boxes_hand_case() -> None:
    out = B.feature_window_to_boxes(
        torch.tensor([2, 2]), torch.tensor([3, 3]), torch.tensor([16.0, 13.0]), torch.tensor([24.0, 20.0]), stride=8
    )
    # 16x24 px -> kernel 2x3 cells: top-left cell (2 - 1, 3 - 1) = (1, 2) -> pixels (x 16, y 8), size 24x16
    # 13x20 px -> kernel 2x3 cells as well (ceil): same top-left, the box keeps the query's own 20x13 pixels
    assert out.dtype == torch.float32
    assert out.tolist() == [[16.0, 8.0, 40.0, 24.0], [16.0, 8.0, 36.0, 21.0]]


def test_feature_window_boxes_locate_a_planted_query() -> None:
    # reference: plant a query's features at a known cell offset, correlate, take the argmax, convert to a box
    torch.manual_seed(0)
    stride, (qh_px, qw_px) = 8, (20, 27)
    kh, kw = -(-qh_px // stride), -(-qw_px // stride)
    q = torch.randn(4, kh, kw)
    x = torch.randn(1, 4, 12, 14) * 0.1
    top, left = 5, 6
    x[0, :, top : top + kh, left : left + kw] = q
    from roiqa.ops.xcorr import cosine_xcorr

    h = cosine_xcorr(q, x)[0]
    r, c = divmod(int(h.argmax()), h.shape[1])
    box = B.feature_window_to_boxes(
        torch.tensor([r]), torch.tensor([c]), torch.tensor([float(qh_px)]), torch.tensor([float(qw_px)]), stride
    )[0]
    assert box.tolist() == [left * stride, top * stride, left * stride + qw_px, top * stride + qh_px]


# --- ids ------------------------------------------------------------------------------------------------------


def test_image_id_stable_positive_distinct() -> None:
    uris = [f"s3://bucket/img_{i:05d}.jpg" for i in range(2000)]
    ids = [image_id(u) for u in uris]
    assert ids == [image_id(u) for u in uris]
    assert all(0 <= i < 2**63 for i in ids)
    assert len(set(ids)) == len(ids)
    assert max(ids) > 2**62  # the top usable bit is used: ids span int63, not a narrower hash
    assert image_id("a.jpg") != image_id("a.jpg ")


def test_image_id_stable_across_processes() -> None:
    code = "from roiqa.io.ids import image_id; print(image_id('s3://bucket/x.jpg'))"
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        env={"PYTHONHASHSEED": "123"},
        cwd=Path(__file__).resolve().parents[1],
    )
    assert int(out.stdout.strip()) == image_id("s3://bucket/x.jpg")


def test_image_ids_matches_image_id() -> None:
    uris = ["a.jpg", "b/c.png", "s3://x/y.tar#m/1.jpg"]
    arr = image_ids(uris)
    assert arr.dtype == np.int64
    assert arr.tolist() == [image_id(u) for u in uris]
    assert image_ids(np.array(uris, dtype=object)).tolist() == arr.tolist()
    assert image_ids([]).shape == (0,)
