"""Classical baselines (roiqa.eval.baselines) on real photographs with pasted objects at known boxes."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
import skimage.data

cv2 = pytest.importorskip("cv2")

from roiqa import schema as S  # noqa: E402
from roiqa.boxes import box_iou  # noqa: E402
from roiqa.eval.baselines import METHODS, run_baseline, sift_features, sift_match, template_match, to_gray  # noqa: E402
from roiqa.io.ids import image_id  # noqa: E402
from roiqa.io.imageio import encode_jpeg, resize_long_side  # noqa: E402

FACE = skimage.data.astronaut()[14:186, 150:304]  # 172 x 154, the astronaut's face
COFFEE = skimage.data.coffee()  # 400 x 600
CHELSEA = skimage.data.chelsea()  # 300 x 451
ROCKET = skimage.data.rocket()  # 427 x 640
BRICK = np.repeat(skimage.data.brick()[:, :, None], 3, axis=2)  # 512 x 512, grey as RGB


def iou(a: np.ndarray, b: np.ndarray) -> float:
    return float(box_iou(a, b)[0, 0])


def paste(bg: np.ndarray, obj: np.ndarray, x0: int, y0: int) -> tuple[np.ndarray, np.ndarray]:
    """`obj` pasted into a copy of `bg` with its top-left corner at (x0, y0); returns (image, true box)."""
    out = bg.copy()
    h, w = obj.shape[:2]
    out[y0 : y0 + h, x0 : x0 + w] = obj
    return out, np.array([x0, y0, x0 + w, y0 + h], np.float32)


def paste_warped(bg: np.ndarray, obj: np.ndarray, angle: float, scale: float, x0: int, y0: int):
    """`obj` rotated by `angle` degrees (counter-clockwise) and scaled, pasted with its bounds' corner at (x0, y0).

    Returns (image, axis-aligned bounds of the transformed object's corners).
    """
    h, w = obj.shape[:2]
    m = cv2.getRotationMatrix2D((w / 2, h / 2), angle, scale)
    corners = np.array([[0, 0], [w, 0], [w, h], [0, h]], np.float64) @ m[:, :2].T + m[:, 2]
    lo, hi = corners.min(axis=0), corners.max(axis=0)
    m[:, 2] -= lo
    size = tuple(int(v) for v in np.ceil(hi - lo))
    warped = cv2.warpAffine(obj, m, size, flags=cv2.INTER_LINEAR)
    mask = cv2.warpAffine(np.full((h, w), 255, np.uint8), m, size, flags=cv2.INTER_LINEAR) > 127
    out = bg.copy()
    region = out[y0 : y0 + size[1], x0 : x0 + size[0]]
    region[mask] = warped[mask]
    return out, np.array([x0, y0, x0 + hi[0] - lo[0], y0 + hi[1] - lo[1]], np.float32)


def naive_zncc(template: np.ndarray, window: np.ndarray) -> float:
    """Zero-mean normalised cross-correlation of two equal-size grey arrays, in float64."""
    t = template.astype(np.float64) - template.mean()
    w = window.astype(np.float64) - window.mean()
    return float((t * w).sum() / np.sqrt((t * t).sum() * (w * w).sum()))


# --- template matching --------------------------------------------------------------------------------------


@pytest.mark.parametrize("scale", [1.0, 1.5])
def test_template_match_finds_paste(scale):
    query, _ = resize_long_side(FACE, 64)
    obj, _ = resize_long_side(query, round(64 * scale))
    image, truth = paste(COFFEE, obj, 300, 150)
    score, box = template_match(query, image)
    assert box.shape == (4,) and box.dtype == np.float32
    assert iou(box, truth) >= 0.9
    assert score > 0.95


def test_template_match_score_is_zncc_at_true_location():
    query, _ = resize_long_side(FACE, 64)
    image, truth = paste(COFFEE, query, 123, 77)
    noise = np.random.default_rng(0).normal(0, 50, image.shape)
    image = np.clip(image + noise, 0, 255).astype(np.uint8)  # the correlation is well below 1
    score, box = template_match(query, image, scales=[1.0])
    np.testing.assert_array_equal(box, truth)
    x0, y0, x1, y1 = truth.astype(int)
    expected = naive_zncc(to_gray(query), to_gray(image)[y0:y1, x0:x1])
    assert 0.5 < expected < 0.95
    assert score == pytest.approx(expected, abs=1e-3)
    # to_gray is OpenCV's RGB -> grey conversion
    np.testing.assert_array_equal(to_gray(query), cv2.cvtColor(query, cv2.COLOR_RGB2GRAY))


def test_template_match_prefers_positive_and_handles_big_query():
    query, _ = resize_long_side(FACE, 64)
    image, _ = paste(COFFEE, query, 40, 200)
    pos, _ = template_match(query, image)
    neg, _ = template_match(query, ROCKET)
    assert pos > 0.95 > neg + 0.3
    # a query bigger than the image at every listed scale still gets one (fitting) scale and a box inside the image
    small = COFFEE[:50, :60]
    score, box = template_match(FACE, small)
    assert -1.0 <= score <= 1.0
    assert 0 <= box[0] < box[2] <= 60 and 0 <= box[1] < box[3] <= 50


# --- SIFT ---------------------------------------------------------------------------------------------------


def test_sift_match_finds_rotated_scaled_paste():
    bg = cv2.resize(COFFEE, (700, 500), interpolation=cv2.INTER_AREA)
    image, truth = paste_warped(bg, FACE, angle=20.0, scale=1.3, x0=250, y0=80)
    score, box = sift_match(FACE, image)
    assert box.shape == (4,) and box.dtype == np.float32
    assert iou(box, truth) >= 0.7
    assert score >= 20
    neg_score, neg_box = sift_match(FACE, bg)
    assert neg_score < score
    assert 0 <= neg_box[0] <= neg_box[2] <= 700 and 0 <= neg_box[1] <= neg_box[3] <= 500


def test_sift_tiny_query_is_upscaled_and_no_match_gives_zero():
    tiny, _ = resize_long_side(FACE, 40)
    assert len(sift_features(tiny, 64).xy) > len(sift_features(tiny).xy)
    xy = sift_features(tiny, 64).xy
    assert xy.min() >= -1 and xy[:, 0].max() <= tiny.shape[1] and xy[:, 1].max() <= tiny.shape[0]
    flat = np.full((100, 120, 3), 128, np.uint8)  # no keypoints at all: score 0, the whole image
    score, box = sift_match(FACE, flat)
    assert score == 0.0
    np.testing.assert_array_equal(box, [0, 0, 120, 100])


# --- the whole gallery --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def gallery(tmp_path_factory):
    """Two positives (a larger and a smaller-than-image_size photo) and two negatives, as JPEG files."""
    d = tmp_path_factory.mktemp("gallery")
    query, _ = resize_long_side(FACE, 96)
    # coffee 400 x 600 -> 320 px long side (scale 0.533): the 172 px face appears at ~92 px
    pos1, box1 = paste(COFFEE, FACE, 380, 120)
    # chelsea cropped to 240 x 280 -> upscaled (scale 1.14): a 90 px face appears at ~103 px
    small, _ = resize_long_side(FACE, 90)
    pos2, box2 = paste(np.ascontiguousarray(CHELSEA[30:270, 100:380]), small, 20, 100)
    items = {"pos1.jpg": pos1, "pos2.jpg": pos2, "neg1.jpg": ROCKET, "neg2.jpg": BRICK}
    uris = {}
    for name, img in items.items():
        (d / name).write_bytes(encode_jpeg(img, quality=92))
        uris[name] = str(d / name)
    truth = {uris["pos1.jpg"]: box1, uris["pos2.jpg"]: box2}
    # neg1 first so that the ranking is not the listing order
    order = [uris["neg1.jpg"], uris["pos2.jpg"], uris["neg2.jpg"], uris["pos1.jpg"]]
    return {"query": query, "uris": order, "truth": truth}


@pytest.mark.parametrize("method", sorted(METHODS))
def test_run_baseline_ranks_positives_first(gallery, method):
    queries = {"face": gallery["query"], "face_copy": gallery["query"].copy()}
    df, timing = run_baseline(method, queries, gallery["uris"], image_size=320, max_pixels=10_000_000)
    assert list(df.columns) == [f.name for f in S.RESULTS_SCHEMA]
    table = pa.Table.from_pandas(df, preserve_index=False)
    assert table.cast(S.RESULTS_SCHEMA).schema.equals(S.RESULTS_SCHEMA)
    for c in (S.SCORE, S.COARSE_SCORE, *S.BOX):
        assert df[c].dtype == np.float32
    assert df[S.RANK].dtype == np.int32 and df[S.IMAGE_ID].dtype == np.int64
    assert df[S.HEATMAP_URI].isna().all()
    np.testing.assert_array_equal(df[S.SCORE], df[S.COARSE_SCORE])

    assert len(df) == 2 * 4 and not df.duplicated([S.QUERY_ID, S.URI]).any()
    for qid, g in df.groupby(S.QUERY_ID):
        assert list(g[S.RANK]) == [1, 2, 3, 4]
        assert (np.diff(g[S.SCORE].to_numpy()) <= 0).all()
        assert set(g[S.URI].head(2)) == set(gallery["truth"]), (qid, g[[S.URI, S.SCORE]])
        assert g[S.SCORE].iloc[1] > g[S.SCORE].iloc[2]
        for row in g.head(2).itertuples():
            assert row.image_id == image_id(row.uri)
            box = np.array([row.x0, row.y0, row.x1, row.y1], np.float32)
            assert iou(box, gallery["truth"][row.uri]) >= 0.7, (method, row.uri, box)
    # the two identical queries give identical results
    a, b = (df[df[S.QUERY_ID] == q].drop(columns=S.QUERY_ID).reset_index(drop=True) for q in queries)
    assert a.equals(b)

    assert set(timing) >= {"seconds_total", "seconds_per_query_median"}
    assert 0 < timing["seconds_per_query_median"] <= timing["seconds_total"]


def test_run_baseline_ties_broken_by_uri_and_errors(gallery, tmp_path):
    flat = np.full((32, 32, 3), 7, np.uint8)  # constant query: template correlation 0 everywhere, all tied
    df, _ = run_baseline("template", {"q": flat}, gallery["uris"][::-1], image_size=320, max_pixels=10_000_000)
    assert (df[S.SCORE] == 0).all()
    assert list(df[S.URI]) == sorted(gallery["uris"])

    with pytest.raises(ValueError, match=r"'orb'.*sift.*template"):
        run_baseline("orb", {"q": flat}, gallery["uris"], image_size=320, max_pixels=10_000_000)
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"not an image")
    with pytest.raises(ValueError, match="bad.jpg"):
        run_baseline("sift", {"q": gallery["query"]}, [*gallery["uris"], str(bad)], 320, 10_000_000)
    with pytest.raises(ValueError, match="missing.jpg"):
        run_baseline("sift", {"q": gallery["query"]}, [str(tmp_path / "missing.jpg")], 320, 10_000_000)
