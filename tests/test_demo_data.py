"""Tests for roiqa.eval.demo_data: files, counts, boxes, determinism and that boxes point at the pasted objects."""

from __future__ import annotations

import os
import socket

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from roiqa.eval import demo_data
from roiqa.eval.demo_data import BACKGROUNDS, OBJECTS, DemoConfig, build_demo_collection
from roiqa.schema import (
    BOX,
    DEMO_GROUND_TRUTH_SCHEMA,
    GT_OCCLUSION,
    GT_ROTATION,
    GT_SCALE,
    QUERIES_SCHEMA,
    QUERY_ID,
    URI,
    X0,
    X1,
    Y0,
    Y1,
)

SMALL = DemoConfig(n_gallery=12, instances_per_object=2, n_distractors=2)


def _read_all(out_dir: str) -> dict[str, bytes]:
    files = {}
    for root, _, names in os.walk(out_dir):
        for n in names:
            path = os.path.join(root, n)
            with open(path, "rb") as f:
                files[os.path.relpath(path, out_dir)] = f.read()
    return files


def _load(path: str) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"), dtype=np.float32)


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory):
    out = str(tmp_path_factory.mktemp("demo"))
    return build_demo_collection(out, SMALL)


def test_photos_ship_with_scikit_image(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_network(*args, **kwargs):
        raise OSError("network disabled in this test")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    demo_data.load_photo.cache_clear()
    for photo in {p for p, _ in OBJECTS.values()} | set(BACKGROUNDS):
        img = demo_data.load_photo(photo)
        assert img.dtype == np.uint8 and img.ndim == 3 and img.shape[2] == 3
    with pytest.raises(ValueError, match="eagle"):
        demo_data.load_photo("eagle")  # fetched through pooch: refused


def test_files_counts_and_boxes(small) -> None:
    gallery = sorted(os.listdir(small.gallery_dir))
    assert gallery == [f"img_{i:04d}.jpg" for i in range(SMALL.n_gallery)]
    assert small.n_gallery == SMALL.n_gallery and small.n_queries == len(OBJECTS)
    H, W = SMALL.image_size
    for name in gallery:
        with Image.open(os.path.join(small.gallery_dir, name)) as im:
            assert im.format == "JPEG" and im.size == (W, H)

    q = pq.read_table(small.queries_uri)
    assert q.schema.equals(QUERIES_SCHEMA)
    assert sorted(q.column(QUERY_ID).to_pylist()) == sorted(OBJECTS)
    for col in BOX:
        assert q.column(col).null_count == q.num_rows
    for qid, uri in zip(q.column(QUERY_ID).to_pylist(), q.column(URI).to_pylist(), strict=True):
        assert uri == os.path.abspath(os.path.join(os.path.dirname(small.queries_uri), "queries", f"{qid}.png"))
        photo, (x0, y0, x1, y1) = OBJECTS[qid]
        np.testing.assert_array_equal(_load(uri), demo_data.load_photo(photo)[y0:y1, x0:x1])

    gt = pq.read_table(small.ground_truth_uri)
    assert gt.schema.equals(DEMO_GROUND_TRUTH_SCHEMA)
    df = gt.to_pandas()
    assert len(df) == len(OBJECTS) * SMALL.instances_per_object
    listed = {os.path.abspath(os.path.join(small.gallery_dir, n)) for n in gallery}
    assert set(df[URI]) <= listed
    assert (df.groupby(QUERY_ID)[URI].nunique() == SMALL.instances_per_object).all()
    assert (df.groupby(URI).size() <= SMALL.max_objects_per_image).all()
    assert len(listed - set(df[URI])) >= SMALL.n_distractors
    boxes = df[BOX].to_numpy()
    assert (boxes[:, 0] >= 0).all() and (boxes[:, 1] >= 0).all()
    assert (boxes[:, 2] <= W).all() and (boxes[:, 3] <= H).all()
    assert (boxes[:, 2] > boxes[:, 0]).all() and (boxes[:, 3] > boxes[:, 1]).all()
    assert (np.abs(df[GT_ROTATION]) <= SMALL.max_rotation_deg).all()
    assert df[GT_OCCLUSION].between(0, SMALL.max_occlusion).all()
    for _, rows in df.groupby(URI):  # objects in one image do not overlap
        b = rows[BOX].to_numpy()
        for i in range(len(b)):
            for j in range(i + 1, len(b)):
                assert min(b[i, 2], b[j, 2]) <= max(b[i, 0], b[j, 0]) or min(b[i, 3], b[j, 3]) <= max(b[i, 1], b[j, 1])


def test_deterministic(tmp_path) -> None:
    out = str(tmp_path / "a")
    build_demo_collection(out, SMALL)
    first = _read_all(out)
    build_demo_collection(out, SMALL)  # rebuild in place: same paths, so the Parquet URIs match too
    assert _read_all(out) == first
    other = str(tmp_path / "b")
    build_demo_collection(other, DemoConfig(n_gallery=12, instances_per_object=2, n_distractors=2, seed=1))
    changed = _read_all(other)
    assert changed.keys() == first.keys()
    assert any(changed[k] != first[k] for k in first if k.startswith("gallery"))
    assert changed["ground_truth.parquet"] != first["ground_truth.parquet"]


def test_boxes_point_at_pasted_object(tmp_path) -> None:
    cfg = DemoConfig(n_gallery=10, instances_per_object=2, n_distractors=1, max_rotation_deg=0, max_occlusion=0)
    col = build_demo_collection(str(tmp_path), cfg)
    df = pq.read_table(col.ground_truth_uri).to_pandas()
    queries = {qid: _load(os.path.join(tmp_path, "queries", f"{qid}.png")) for qid in OBJECTS}
    assert (df[GT_ROTATION] == 0).all() and (df[GT_OCCLUSION] == 0).all()
    for row in df.itertuples(index=False):
        r = row._asdict()
        x0, y0, x1, y1 = (int(r[c]) for c in (X0, Y0, X1, Y1))
        q = queries[r[QUERY_ID]]
        assert r[GT_SCALE] == pytest.approx(max(x1 - x0, y1 - y0) / max(q.shape[:2]), abs=1e-6)
        img = _load(r[URI])
        size = (x1 - x0, y1 - y0)
        ref = np.asarray(Image.fromarray(q.astype(np.uint8)).resize(size, Image.Resampling.BILINEAR), np.float32)
        # JPEG noise, resampling and the paste's brightness/contrast jitter (<= ~10 levels) stay well under 20.
        at_box = float(np.abs(img[y0:y1, x0:x1] - ref).mean())
        dx = max(8, size[0] // 3)  # the same comparison a third of the box to the side
        sx = x0 + dx if x1 + dx <= img.shape[1] else x0 - dx
        shifted = float(np.abs(img[y0:y1, sx : sx + size[0]] - ref).mean())
        assert at_box < 20 and shifted > max(25.0, 2 * at_box), (r[QUERY_ID], at_box, shifted)


def test_bad_crop_box_names_photo(tmp_path) -> None:
    with pytest.raises(ValueError, match="coffee"):
        build_demo_collection(str(tmp_path), SMALL, objects={"cup": ("coffee", (0, 0, 5000, 10))})
    with pytest.raises(ValueError, match="both"):
        build_demo_collection(str(tmp_path), SMALL, objects={"cup": ("coffee", (0, 0, 50, 50))}, backgrounds=["coffee"])
