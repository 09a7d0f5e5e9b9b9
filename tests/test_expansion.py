"""Spatially verified query expansion (roiqa.results.expansion) and the faiss helpers it reads regions with,
against naive references."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from roiqa import schema as S
from roiqa.index import faiss_index
from roiqa.index.hubness import augment
from roiqa.models.regions import REGION_BITS, image_key, region_grid, region_keys
from roiqa.results import expansion

DIM = 8


def _unit(rng, n: int) -> np.ndarray:
    x = rng.normal(size=(n, DIM)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.mark.parametrize("factory", ["Flat", "IVF4,Flat"])
def test_held_ids_and_reconstruct_give_back_what_was_added(factory):
    rng = np.random.default_rng(0)
    vec = _unit(rng, 200)
    ids = rng.choice(1 << 40, size=200, replace=False).astype(np.int64)
    index = faiss_index.build_index(vec, ids, factory)
    assert sorted(faiss_index.held_ids(index).tolist()) == sorted(ids.tolist())
    pick = ids[[5, 0, 199]]
    np.testing.assert_allclose(faiss_index.reconstruct(index, pick), vec[[5, 0, 199]], atol=1e-6)
    with pytest.raises(ValueError, match="no vector with id"):
        faiss_index.reconstruct(index, np.array([int(ids.max()) + 1]))


def test_strongest_takes_the_most_inliers_per_query_with_a_box():
    checked = pd.DataFrame(
        {
            S.QUERY_ID: ["a", "a", "a", "a", "b", "b"],
            S.IMAGE_ID: [7, 3, 9, 4, 1, 2],
            S.INLIERS: [12, 30, 12, 40, 4, 8],
            S.X0: [0.0, 0.0, 0.0, np.nan, 0.0, 0.0],
            S.Y0: 0.0,
            S.X1: 1.0,
            S.Y1: 1.0,
        }
    )
    got = expansion.strongest(checked, min_inliers=5, n=2)
    assert got["a"][S.IMAGE_ID].tolist() == [3, 7]  # 4 has no box; 7 before 9 at 12 inliers (smaller id)
    assert got["b"][S.IMAGE_ID].tolist() == [2]  # 1 is under min_inliers


def _region_index(rng, images: dict[int, tuple[int, int]], stride: int, keep: int):
    """A region index as `roiqa index` builds one: per image its grid's regions, [r, h] rows, the whole image and
    `keep` others held. Returns (index, {image_id: (all vectors, held region numbers)})."""
    vecs, keys, truth = [], [], {}
    for iid, (h, w) in images.items():
        n = len(region_grid(-(-h // stride), -(-w // stride)))
        v = _unit(rng, n)
        held = np.r_[0, rng.choice(np.arange(1, n), size=min(keep, n - 1), replace=False)]
        k = region_keys(np.array([iid]), np.array([n]))[held]
        vecs.append(augment(v[held], rng.uniform(0.3, 0.6, len(held)).astype(np.float32)))
        keys.append(k)
        truth[iid] = (v, held)
    index = faiss_index.build_index(np.concatenate(vecs), np.concatenate(keys), "Flat")
    return index, truth


def test_box_region_is_the_best_held_region_centred_in_the_box():
    rng = np.random.default_rng(1)
    stride = 16
    index, truth = _region_index(rng, {11: (96, 128), 12: (128, 80)}, stride, keep=40)
    source = expansion.RegionSource(index, DIM, stride)
    views = _unit(rng, 3)
    box = (20.0, 10.0, 100.0, 70.0)
    row = pd.Series({S.IMAGE_ID: 11, S.RESIZED_H: 96, S.RESIZED_W: 128, **dict(zip(S.BOX, box))})
    got = expansion.box_region(source, views, row)
    # naive reference: every held region but the whole image, its box from the grid, centre inside, best score
    v, held = truth[11]
    cells = region_grid(96 // stride, 128 // stride).numpy() * stride
    best, want = -np.inf, None
    for r in held:
        if r == 0:
            continue
        x0, y0, x1, y1 = np.minimum(cells[r], [128, 96, 128, 96])
        cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
        if box[0] <= cx <= box[2] and box[1] <= cy <= box[3]:
            s = (views @ v[r]).max()
            if s > best:
                best, want = s, v[r]
    assert want is not None
    np.testing.assert_allclose(got, want, atol=1e-5)
    # with min_cover: only regions the verified box covers at least that much of (naive overlap over area)
    covered = []
    for r in held[held > 0]:
        x0, y0, x1, y1 = np.minimum(cells[r], [128, 96, 128, 96])
        iw = max(0.0, min(x1, box[2]) - max(x0, box[0]))
        ih = max(0.0, min(y1, box[3]) - max(y0, box[1]))
        cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
        inside = box[0] <= cx <= box[2] and box[1] <= cy <= box[3]
        if inside and iw * ih / ((x1 - x0) * (y1 - y0)) >= 0.75:
            covered.append(r)
    got_cover = expansion.box_region(source, views, row, min_cover=0.75)
    assert covered  # the case is exercised
    want = v[max(covered, key=lambda r: (views @ v[r]).max())]
    np.testing.assert_allclose(got_cover, want, atol=1e-5)
    far = row.copy()
    far[S.X0], far[S.X1] = 500.0, 600.0
    assert expansion.box_region(source, views, far) is None  # no held region centred there
    boxes, _ = source.regions(12, (128, 80))
    assert len(boxes) == len(truth[12][1]) - 1 and boxes[:, 2].max() <= 80  # whole image left out, clipped
    assert (faiss_index.held_ids(index) >> REGION_BITS == image_key(np.array([12]))[0]).sum() == len(truth[12][1])


def test_expand_views_adds_the_regions_to_each_used_view():
    rng = np.random.default_rng(2)
    stride = 16
    index, truth = _region_index(rng, {21: (64, 64)}, stride, keep=8)
    source = expansion.RegionSource(index, DIM, stride)
    views = np.zeros((2, 3, DIM), np.float32)
    views[0, :2], views[1, :1] = _unit(rng, 2), _unit(rng, 1)
    used = np.any(views != 0, axis=-1)
    picks = {
        "q": pd.DataFrame(
            {
                S.IMAGE_ID: [21],
                S.RESIZED_H: [64],
                S.RESIZED_W: [64],
                S.X0: [0.0],
                S.Y0: [0.0],
                S.X1: [64.0],
                S.Y1: [64.0],
            }
        )
    }
    out, taken = expansion.expand_views(views, used, ["q", "other"], picks, source)
    region = expansion.box_region(source, views[0][used[0]], picks["q"].iloc[0])
    want = views[0, :2] + region
    np.testing.assert_allclose(out[0, :2], want / np.linalg.norm(want, axis=1, keepdims=True), atol=1e-6)
    assert not out[0, 2].any()  # an unused slot stays empty
    np.testing.assert_array_equal(out[1], views[1])  # no verified image: unchanged
    assert taken == {"q": 1}
