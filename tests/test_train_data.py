"""Tests for roiqa.train.data: manifests, the COCO importer, synthesized and labeled samples, photos and batching."""

from __future__ import annotations

import json
import math
import os
import pickle
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from PIL import Image
from scipy import ndimage
from skimage.feature import match_template

from roiqa.config import TrainConfig
from roiqa.eval import demo_data
from roiqa.eval.demo_data import load_photo
from roiqa.io.imageio import decode_image
from roiqa.train import data as td

CLEAN = TrainConfig(
    blur_prob=0.0, jpeg_prob=0.0, occlusion_prob=0.0, color_jitter=0.0, max_rotation_deg=0.0, perspective=0.0
)
SMALL = TrainConfig(image_size=64, query_size=32, object_scale=(16.0, 40.0))
RED, BLUE = (220, 30, 30), (30, 30, 220)


@pytest.fixture(scope="module")
def photos() -> list[np.ndarray]:
    return [load_photo(n) for n in ("camera", "horse", "grass", "immunohistochemistry")]


@pytest.fixture(scope="module")
def noise_photo() -> np.ndarray:
    """Smooth random texture: every region is unique, so only the query crop itself correlates with the query."""
    x = ndimage.gaussian_filter(np.random.default_rng(5).normal(size=(256, 256, 3)), (3, 3, 0))
    return ((x - x.min()) / (x.max() - x.min()) * 255).astype(np.uint8)


def _grey(a: np.ndarray) -> np.ndarray:
    return a.astype(np.float32).mean(axis=2)


def _query(sample: dict) -> np.ndarray:
    h, w = sample["query_hw"]
    return sample["query"][:h, :w]


def _resize(img: np.ndarray, w: int, h: int) -> np.ndarray:
    return np.asarray(Image.fromarray(img).resize((w, h), Image.Resampling.BILINEAR))


# --- synthesized samples ---------------------------------------------------------------------------------------


def test_synthesized_sample_shapes_and_dtypes(photos):
    cfg = TrainConfig()
    s = td.synthesize_pair(photos, cfg, np.random.default_rng(0))
    q, size = cfg.query_size, cfg.image_size
    expected = {
        "query": ((q, q, 3), np.uint8),
        "query_hw": ((2,), np.int32),
        "image": ((size, size, 3), np.uint8),
        "box": ((4,), np.float32),
        "negative": ((size, size, 3), np.uint8),
        "instance": ((), np.int64),
    }
    assert set(s) == set(expected) == set(td.SAMPLE_KEYS)
    for key, (shape, dtype) in expected.items():
        assert np.shape(s[key]) == shape and np.asarray(s[key]).dtype == dtype, key
    h, w = s["query_hw"]
    assert max(h, w) == q and min(h, w) >= 1
    assert not s["query"][h:].any() and not s["query"][:, w:].any()  # zero padding bottom/right
    x0, y0, x1, y1 = s["box"]
    assert 0 <= x0 < x1 <= size and 0 <= y0 < y1 <= size


@pytest.mark.parametrize("seed", range(6))
def test_box_holds_the_pasted_query(photos, seed):
    s = td.synthesize_pair(photos, CLEAN, np.random.default_rng(seed))
    x0, y0, x1, y1 = (int(v) for v in s["box"])
    assert s["box"].tolist() == [x0, y0, x1, y1]  # unrotated, integer placement: exact pixel edges
    bw, bh = x1 - x0, y1 - y0
    q = _query(s)
    qh, qw = q.shape[:2]
    lo, hi = CLEAN.object_scale
    assert lo - 1 <= max(bw, bh) <= hi + 1
    # Same aspect ratio as the query (up to rounding of the short side).
    if qw >= qh:
        assert abs(bh - qh * bw / qw) <= 2
    else:
        assert abs(bw - qw * bh / qh) <= 2
    inside = s["image"][y0:y1, x0:x1].astype(np.float32)
    diff = np.abs(_resize(q, bw, bh).astype(np.float32) - inside).mean()
    assert diff < 12, diff
    # ... and the match is specific: the same template one box-width away is far worse.
    shifted = np.roll(s["image"], (bh, bw), axis=(0, 1))[y0:y1, x0:x1].astype(np.float32)
    assert np.abs(_resize(q, bw, bh).astype(np.float32) - shifted).mean() > diff + 5


def test_synthesis_is_deterministic(photos):
    cfg = TrainConfig()
    a = td.synthesize_pair(photos, cfg, np.random.default_rng(7))
    b = td.synthesize_pair(photos, cfg, np.random.default_rng(7))
    c = td.synthesize_pair(photos, cfg, np.random.default_rng(8))
    for k in td.SAMPLE_KEYS:
        assert np.asarray(a[k]).tobytes() == np.asarray(b[k]).tobytes(), k
    assert a["image"].tobytes() != c["image"].tobytes()
    assert a["instance"] != c["instance"]


@pytest.mark.parametrize("which", ["real", "single_noise_photo"])
def test_negative_does_not_contain_the_query(photos, noise_photo, which):
    source = photos if which == "real" else [noise_photo]
    for seed in range(5):
        s = td.synthesize_pair(source, CLEAN, np.random.default_rng(seed))
        x0, y0, x1, y1 = (int(v) for v in s["box"])
        template = _grey(_resize(_query(s), x1 - x0, y1 - y0))
        pos = match_template(_grey(s["image"]), template).max()
        neg = match_template(_grey(s["negative"]), template).max()
        assert pos > 0.9 and neg < 0.8 and neg < pos - 0.25, (seed, pos, neg)


def test_full_augmentation_keeps_box_in_image(photos):
    cfg = TrainConfig(blur_prob=1.0, jpeg_prob=1.0, occlusion_prob=1.0, max_rotation_deg=90.0, perspective=0.25)
    for seed in range(5):
        s = td.synthesize_pair(photos, cfg, np.random.default_rng(seed))
        x0, y0, x1, y1 = s["box"]
        assert 0 <= x0 < x1 <= cfg.image_size and 0 <= y0 < y1 <= cfg.image_size


def test_warp_object_identity_is_exact():
    patch = np.random.default_rng(0).integers(0, 256, (17, 23, 3), dtype=np.uint8)
    rgba = td.warp_object(patch, 0.0)
    assert rgba.shape == (17, 23, 4)
    assert np.array_equal(rgba[..., :3], patch) and (rgba[..., 3] == 255).all()


@pytest.mark.parametrize("angle", [0.0, 30.0, 45.0, -60.0, 90.0])
def test_rotation_enlarges_the_box_as_expected(angle):
    w, h = (100, 100) if angle == 45.0 else (60, 100)
    rgba = td.warp_object(np.full((h, w, 3), 128, np.uint8), angle)
    rows = np.flatnonzero((rgba[..., 3] >= 128).any(axis=1))
    cols = np.flatnonzero((rgba[..., 3] >= 128).any(axis=0))
    bw, bh = cols[-1] - cols[0] + 1, rows[-1] - rows[0] + 1
    c, s = abs(math.cos(math.radians(angle))), abs(math.sin(math.radians(angle)))
    assert abs(bw - (w * c + h * s)) <= 2 and abs(bh - (w * s + h * c)) <= 2, (bw, bh)
    if angle == 45.0:  # a square of side a rotated by 45 degrees: box side a * sqrt(2)
        assert abs(bw - 100 * math.sqrt(2)) <= 2 and abs(bh - 100 * math.sqrt(2)) <= 2


def test_synthesize_rejects_bad_inputs(photos):
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match=r"photos\[1\]"):
        td.synthesize_pair([photos[0], np.zeros((32, 32, 3), np.uint8)], TrainConfig(), rng)
    with pytest.raises(ValueError, match=r"photos\[0\]"):
        td.synthesize_pair([np.zeros((100, 100), np.uint8)], TrainConfig(), rng)
    with pytest.raises(ValueError, match="train.object_scale"):
        td.synthesize_pair(photos, TrainConfig(image_size=128, object_scale=(32.0, 160.0)), rng)
    with pytest.raises(ValueError, match="train.jpeg_prob"):
        td.synthesize_pair(photos, TrainConfig(jpeg_prob=1.5), rng)


# --- streams and batches ---------------------------------------------------------------------------------------


def test_sample_stream_and_collate(photos):
    a = td.sample_stream(photos, SMALL, seed=3, worker=0)
    b = td.sample_stream(photos, SMALL, seed=3, worker=0)
    c = td.sample_stream(photos, SMALL, seed=3, worker=1)
    batch_a = td.collate([next(a) for _ in range(4)])
    batch_b = td.collate([next(b) for _ in range(4)])
    batch_c = td.collate([next(c) for _ in range(4)])
    assert batch_a["image"].shape == (4, 64, 64, 3) and batch_a["box"].shape == (4, 4)
    assert batch_a["instance"].shape == (4,) and batch_a["instance"].dtype == np.int64
    assert batch_a["query_hw"].dtype == np.int32
    for k in td.SAMPLE_KEYS:
        assert np.array_equal(batch_a[k], batch_b[k]), k
    assert not np.array_equal(batch_a["image"], batch_c["image"])
    with pytest.raises(ValueError, match="worker"):
        td.sample_stream(photos, SMALL, seed=0, worker=-1)
    with pytest.raises(ValueError, match="photos"):
        td.sample_stream("not photos", SMALL, seed=0)


def test_collate_errors():
    with pytest.raises(ValueError, match="empty"):
        td.collate([])
    with pytest.raises(ValueError, match="'box' of sample 1"):
        td.collate([{"box": np.zeros(4, np.float32)}, {"box": np.zeros(5, np.float32)}])


# --- manifests -------------------------------------------------------------------------------------------------


def _manifest(**overrides) -> dict:
    cols = {
        "uri": ["a.png", "b.png", "c.png"],
        "instance_id": ["cup", "cup", "pen"],
        "x0": [1.0, 2.0, 3.0],
        "y0": [1.0, 2.0, 3.0],
        "x1": [5.0, 6.0, 7.0],
        "y1": [5.0, 6.0, 7.0],
    }
    cols.update(overrides)
    return cols


def _write_manifest(path, cols: dict) -> str:
    pq.write_table(pa.table(cols), str(path))
    return str(path)


def test_read_manifest_valid(tmp_path):
    table = td.read_manifest(_write_manifest(tmp_path / "m.parquet", _manifest()))
    assert table.schema == td.TRAIN_MANIFEST_SCHEMA and table.num_rows == 3
    assert table.column("x1").to_pylist() == [5.0, 6.0, 7.0]


def test_read_manifest_errors_name_the_file(tmp_path):
    cols = _manifest()
    del cols["y1"]
    uri = _write_manifest(tmp_path / "missing.parquet", cols)
    with pytest.raises(ValueError, match=r"missing\.parquet.*missing required column.*y1"):
        td.read_manifest(uri)
    uri = _write_manifest(tmp_path / "flat.parquet", _manifest(x1=[5.0, 2.0, 7.0]))
    with pytest.raises(ValueError, match=r"flat\.parquet: row 1 .*'b\.png'.*x0 < x1"):
        td.read_manifest(uri)
    uri = _write_manifest(tmp_path / "single.parquet", _manifest(instance_id=["a", "b", "c"]))
    with pytest.raises(ValueError, match=r"single\.parquet: no instance_id has two or more rows"):
        td.read_manifest(uri)
    uri = _write_manifest(tmp_path / "empty.parquet", {k: v[:0] for k, v in _manifest().items()})
    with pytest.raises(ValueError, match=r"empty\.parquet: the manifest has no rows"):
        td.read_manifest(uri)
    (tmp_path / "junk.parquet").write_bytes(b"not parquet")
    with pytest.raises(ValueError, match=r"junk\.parquet"):
        td.read_manifest(str(tmp_path / "junk.parquet"))


# --- COCO ------------------------------------------------------------------------------------------------------


def _coco(tmp_path, annotations: list[dict]) -> str:
    doc = {
        "images": [{"id": 1, "file_name": "a.jpg"}, {"id": 2, "file_name": "sub/b.jpg"}],
        "annotations": annotations,
        "categories": [{"id": 5, "name": "cup"}],
    }
    path = tmp_path / "coco.json"
    path.write_text(json.dumps(doc))
    return str(path)


ANNOTATIONS = [
    {"id": 10, "image_id": 1, "bbox": [1, 2, 30, 40], "instance_id": "cup-1", "category_id": 5},
    {"id": 11, "image_id": 2, "bbox": [5, 6, 7, 8], "instance_id": "cup-1", "category_id": 5},
    {"id": 12, "image_id": 2, "bbox": [0, 0, 9, 9], "instance_id": "cup-2", "category_id": 5, "iscrowd": 1},
    {"id": 13, "image_id": 1, "bbox": [3, 3, 0, 5], "instance_id": "cup-2", "category_id": 5},  # zero area
    {"id": 14, "image_id": 2, "bbox": [10, 10, 5, 5], "track_id": 77, "category_id": 5},
]


def test_import_coco_round_trip(tmp_path):
    json_uri, out = _coco(tmp_path, ANNOTATIONS), str(tmp_path / "out" / "manifest.parquet")
    table = td.import_coco(json_uri, "/data/imgs", out)
    assert table.schema == td.TRAIN_MANIFEST_SCHEMA
    assert table.column("uri").to_pylist() == ["/data/imgs/a.jpg", "/data/imgs/sub/b.jpg", "/data/imgs/sub/b.jpg"]
    assert table.column("instance_id").to_pylist() == ["cup-1", "cup-1", "77"]
    boxes = [table.column(c).to_pylist() for c in ("x0", "y0", "x1", "y1")]
    assert [list(r) for r in zip(*boxes)] == [[1, 2, 31, 42], [5, 6, 12, 14], [10, 10, 15, 15]]
    assert td.read_manifest(out).equals(table)

    by_category = td.import_coco(json_uri, "s3://bucket/imgs/", str(tmp_path / "cat.parquet"), identity="category")
    assert by_category.column("instance_id").to_pylist() == ["5", "5", "5"]
    assert by_category.column("uri")[0].as_py() == "s3://bucket/imgs/a.jpg"


def test_import_coco_errors(tmp_path):
    anns = [dict(a) for a in ANNOTATIONS]
    del anns[4]["track_id"]
    json_uri = _coco(tmp_path, anns)
    with pytest.raises(ValueError, match=r"coco\.json: annotation 14: has no 'instance_id' or 'track_id'"):
        td.import_coco(json_uri, "/x", str(tmp_path / "m.parquet"))
    assert not os.path.exists(tmp_path / "m.parquet")
    with pytest.raises(ValueError, match="identity"):
        td.import_coco(json_uri, "/x", str(tmp_path / "m.parquet"), identity="track")
    json_uri = _coco(tmp_path, [{"id": 3, "image_id": 9, "bbox": [0, 0, 1, 1], "instance_id": "a"}])
    with pytest.raises(ValueError, match=r"coco\.json: annotation 3: image_id 9"):
        td.import_coco(json_uri, "/x", str(tmp_path / "m.parquet"))


# --- labeled pairs ---------------------------------------------------------------------------------------------


def _square_image(path, hw: tuple[int, int], box: tuple[int, int, int, int], color, bg=(120, 120, 120)) -> str:
    img = np.empty((*hw, 3), np.uint8)
    img[:] = bg
    x0, y0, x1, y1 = box
    img[y0:y1, x0:x1] = color
    Image.fromarray(img).save(path)
    return str(path)


@pytest.fixture()
def labeled(tmp_path):
    red_a, red_b = (20, 30, 50, 60), (70, 10, 100, 40)
    rows = [
        (_square_image(tmp_path / "a.png", (100, 200), red_a, RED), "red", red_a),
        (_square_image(tmp_path / "b.png", (150, 120), red_b, RED), "red", red_b),
        (_square_image(tmp_path / "c.png", (80, 80), (10, 10, 40, 40), BLUE), "blue", (10, 10, 40, 40)),
    ]
    cols = {
        "uri": [r[0] for r in rows],
        "instance_id": [r[1] for r in rows],
        **{c: [float(r[2][i]) for r in rows] for i, c in enumerate(("x0", "y0", "x1", "y1"))},
    }
    return pa.table(cols), {r[0]: (r[2], decode_image(Path(r[0]).read_bytes()).shape[:2]) for r in rows}


def test_labeled_pairs_box_maps_to_the_object(labeled):
    table, info = labeled
    pairs = td.LabeledPairs(table, SMALL, max_pixels=10**6)
    size = SMALL.image_size
    expected_boxes = []
    for uri in table.column("uri").to_pylist()[:2]:
        (x0, y0, x1, y1), (h, w) = info[uri]
        s = size / max(h, w)
        expected_boxes.append([x0 * s, y0 * s, x1 * s, y1 * s])
    seen = set()
    for seed in range(6):
        sample = pairs.sample(np.random.default_rng(seed))
        assert sample["image"].shape == (size, size, 3) and sample["negative"].shape == (size, size, 3)
        assert sample["query"].shape == (SMALL.query_size, SMALL.query_size, 3)
        assert int(sample["instance"]) == td.instance_hash("red")
        box = sample["box"]
        match = [i for i, e in enumerate(expected_boxes) if np.allclose(box, e, atol=1e-3)]
        assert match, (box, expected_boxes)
        seen.add(match[0])
        x0, y0, x1, y1 = (int(math.ceil(box[0])) + 1, int(math.ceil(box[1])) + 1, int(box[2]) - 1, int(box[3]) - 1)
        inside = sample["image"][y0:y1, x0:x1].reshape(-1, 3).astype(np.float32)
        assert np.abs(inside - RED).max() < 30
        h, w = sample["query_hw"]
        # The query is the red square (colour-jittered): red dominates.
        q = sample["query"][:h, :w].astype(np.float32).mean(axis=(0, 1))
        assert q[0] > 2 * q[2] and q[0] > 2 * q[1]
        # The negative is the blue-square image: no red anywhere.
        neg = sample["negative"].astype(np.int32)
        assert not ((neg[..., 0] > 150) & (neg[..., 2] < 80)).any()
        assert ((neg[..., 2] > 150) & (neg[..., 0] < 80)).any()
    assert seen == {0, 1}  # both rows serve as positives


def test_labeled_pairs_pickles_and_validates(labeled):
    table, _ = labeled
    pairs = td.LabeledPairs(table, SMALL, max_pixels=10**6)
    pairs.sample(np.random.default_rng(0))
    clone = pickle.loads(pickle.dumps(pairs))
    assert len(clone._cache) == 0
    a = td.collate([next(td.sample_stream(pairs, SMALL, seed=1)) for _ in range(2)])
    b = td.collate([next(td.sample_stream(clone, SMALL, seed=1)) for _ in range(2)])
    assert all(np.array_equal(a[k], b[k]) for k in td.SAMPLE_KEYS)
    only_red = table.filter(pc.equal(table.column("instance_id"), "red"))
    with pytest.raises(ValueError, match="two or more instances"):
        td.LabeledPairs(only_red, SMALL, max_pixels=10**6)


# --- photos ----------------------------------------------------------------------------------------------------


def test_train_and_eval_photos_are_disjoint_and_loadable():
    assert td.EVAL_PHOTOS == (
        "astronaut",
        "chelsea",
        "coffee",
        "rocket",
        "coins",
        "moon",
        "page",
        "hubble_deep_field",
        "brick",
    )
    assert not set(td.TRAIN_PHOTOS) & set(td.EVAL_PHOTOS)
    # roiqa.eval.demo_data may keep its own copies of the two lists (evaluation collections are built from them).
    for name, ours in (("EVAL_PHOTOS", td.EVAL_PHOTOS), ("TRAINING_PHOTOS", td.TRAIN_PHOTOS)):
        theirs = getattr(demo_data, name, None)
        assert theirs is None or set(theirs) == set(ours), name
    assert len(set(td.TRAIN_PHOTOS)) == len(td.TRAIN_PHOTOS) == 11
    for name in td.TRAIN_PHOTOS + td.EVAL_PHOTOS:
        img = load_photo(name)
        assert img.ndim == 3 and img.shape[2] == 3 and img.dtype == np.uint8, name
    for name in td.TRAIN_PHOTOS:
        assert min(load_photo(name).shape[:2]) >= td.MIN_PHOTO_SIDE, name


def test_write_train_photos_and_load_photos(tmp_path):
    out = str(tmp_path / "train")
    written = td.write_train_photos(out)
    assert [os.path.basename(p) for p in written] == [f"{n}.png" for n in td.TRAIN_PHOTOS]
    with open(written[0], "rb") as f:
        assert np.array_equal(decode_image(f.read()), load_photo(td.TRAIN_PHOTOS[0]))
    (tmp_path / "train" / "notes.txt").write_text("not an image, ignored")
    loaded = td.load_photos(out, max_pixels=10**7, max_side=256)
    assert len(loaded) == len(td.TRAIN_PHOTOS)
    assert all(max(p.shape[:2]) <= 256 and p.dtype == np.uint8 and p.shape[2] == 3 for p in loaded)
    s = td.synthesize_pair(loaded, SMALL, np.random.default_rng(0))
    assert s["image"].shape == (64, 64, 3)
    (tmp_path / "train" / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    with pytest.raises(ValueError, match=r"broken\.jpg"):
        td.load_photos(out, max_pixels=10**7)
    os.makedirs(tmp_path / "empty")
    with pytest.raises(ValueError, match="no image files"):
        td.load_photos(str(tmp_path / "empty"), max_pixels=10**7)


def test_load_photo_sources_concatenates_bundled_and_folders_in_order(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    rng = np.random.default_rng(3)
    for folder, n in ((a, 2), (b, 1)):
        os.makedirs(folder)
        for i in range(n):
            Image.fromarray(rng.integers(0, 256, (80, 120, 3), dtype=np.uint8)).save(folder / f"p{i}.png")
    got = td.load_photo_sources(f" {a} ,bundled,{b}", max_pixels=10**7)
    want = td.load_photos(str(a), 10**7) + [load_photo(n) for n in td.TRAIN_PHOTOS] + td.load_photos(str(b), 10**7)
    assert len(got) == len(want) == 3 + len(td.TRAIN_PHOTOS)
    assert all(np.array_equal(x, y) for x, y in zip(got, want))
    assert td.photo_sources(f"bundled,{a}") == ["bundled", str(a)]
    assert td.photo_sources("rel/photos") == [os.path.abspath("rel/photos")]  # workers resolve nothing themselves
    with pytest.raises(ValueError, match="no source"):
        td.photo_sources(" , ")
    with pytest.raises(FileNotFoundError, match="missing"):
        td.load_photo_sources(f"bundled,{tmp_path / 'missing'}", max_pixels=10**7)
