"""The index and query pipelines end to end on Ray: local folder, WebDataset shards, s3://, bad inputs, re-runs."""

from __future__ import annotations

import dataclasses
import io
import os
import shutil
import tarfile

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipelines.index import run_index
from pipelines.query import run_query
from roiqa import schema as S
from roiqa.eval.metrics import evaluate
from roiqa.index import faiss_index, store
from roiqa.io.ids import image_id
from roiqa.io.imageio import encode_png
from roiqa.io.sources import read_files
from roiqa.results.output import open_results, read_results
from roiqa.stages.embed import Decoder, Embedder
from roiqa.stages.rerank import Reranker

pytestmark = pytest.mark.usefixtures("ray_local")


def gallery_files(collection) -> list[str]:
    return sorted(os.path.join(collection.gallery_dir, f) for f in os.listdir(collection.gallery_dir))


def reference_embeddings(cfg, uris: list[str]) -> dict[str, np.ndarray]:
    """Embeddings computed by calling the per-batch classes directly, without Ray."""
    batch = Decoder(cfg.preprocess)(read_files({S.URI: np.array(uris, dtype=object)}))
    out = Embedder(cfg.model)(batch)
    return dict(zip(out[S.URI], out[S.EMBEDDING]))


def check_version_consistent(index: str) -> store.IndexVersion:
    v = store.open_index(index)
    emb, err = v.embeddings(), v.errors()
    counts = v.manifest["counts"]
    assert counts["indexed"] == emb.num_rows and counts["errors"] == err.num_rows
    assert counts["inputs"] == emb.num_rows + err.num_rows
    vectors, keys = faiss_index.coarse_vectors(emb, v.manifest["embedding_dim"], v.manifest["coarse"])
    assert v.faiss().ntotal == v.manifest["faiss_vectors"] == len(keys) > emb.num_rows  # every image's regions
    assert len(set(emb.column(S.IMAGE_ID).to_pylist())) == emb.num_rows
    assert emb.column(S.IMAGE_ID).to_pylist() == [image_id(u) for u in emb.column(S.URI).to_pylist()]
    return v


@pytest.fixture(scope="module")
def folder_index(collection, tiny_cfg, tmp_path_factory):
    """The collection's gallery folder indexed once for the tests of this module: (index URI, report)."""
    index = str(tmp_path_factory.mktemp("folder") / "index")
    return index, run_index(collection.gallery_dir, index, tiny_cfg)


def test_local_folder_index_and_query(collection, tiny_cfg, folder_index, tmp_path):
    out = str(tmp_path / "out")
    files = gallery_files(collection)
    index, report = folder_index
    assert (report.inputs, report.indexed, report.errors) == (len(files), len(files), 0)
    v = check_version_consistent(index)
    emb = v.embeddings().to_pandas()
    assert sorted(emb[S.URI]) == files
    ref = reference_embeddings(tiny_cfg, files)
    for u, e in zip(emb[S.URI], emb[S.EMBEDDING]):
        np.testing.assert_allclose(np.asarray(e), ref[u], atol=1e-5)

    qr = run_query(index, collection.queries_uri, out, tiny_cfg)
    res = read_results(out)
    qc = tiny_cfg.query
    assert qr.errors == 0 and qr.queries == collection.n_queries
    assert len(res) == collection.n_queries * min(qc.top_k, len(files))
    for _, g in res.groupby(S.QUERY_ID):
        assert list(g.sort_values(S.RANK)[S.RANK]) == list(range(1, len(g) + 1))
        top = g.sort_values(S.RANK).head(qc.rerank)
        assert top[S.SCORE].notna().all() and top[S.HEATMAP_URI].notna().all()
        assert (np.diff(top[S.SCORE].to_numpy()) <= 1e-7).all()  # reranked part sorted by score
        for p in top[S.HEATMAP_URI]:
            assert os.path.getsize(p) > 100
    # The pipeline's reranked scores and boxes equal a direct call of the reranker on the same pair.
    row = res.sort_values([S.QUERY_ID, S.RANK]).iloc[0]
    queries = pq.read_table(collection.queries_uri).to_pandas().set_index(S.QUERY_ID)
    rr = Reranker(tiny_cfg, {row[S.QUERY_ID]: (queries.loc[row[S.QUERY_ID], S.URI], None)})
    direct = rr(
        {
            S.IMAGE_ID: np.array([row[S.IMAGE_ID]]),
            S.URI: np.array([row[S.URI]], dtype=object),
            S.QUERY_IDS: [[row[S.QUERY_ID]]],
            S.COARSE_SCORES: [[row[S.COARSE_SCORE]]],
        }
    )
    assert direct[S.SCORE][0] == pytest.approx(row[S.SCORE], abs=1e-5)
    np.testing.assert_allclose([direct[c][0] for c in S.BOX], [row[c] for c in S.BOX], atol=1e-3)
    # metrics run on the real output (values depend on the untrained model; only their ranges are checked here)
    m = evaluate(res, pq.read_table(collection.ground_truth_uri).to_pandas())
    assert 0.0 <= m["mAP"] <= 1.0 and m["n_queries"] == collection.n_queries


def test_an_autoscaling_actor_pool_embeds_the_same_as_a_fixed_one(collection, tiny_cfg, folder_index, tmp_path):
    from pipelines.runtime import actor_pool

    pool = actor_pool(1, 2)
    assert (pool.min_size, pool.max_size) == (1, 2) and actor_pool(2).min_size == actor_pool(2).max_size == 2
    with pytest.raises(ValueError, match="max_actors"):
        actor_pool(3, 2)
    cfg = dataclasses.replace(tiny_cfg, index=dataclasses.replace(tiny_cfg.index, actors=1, max_actors=2))
    report = run_index(collection.gallery_dir, str(tmp_path / "index"), cfg)
    grown = store.open_index(str(tmp_path / "index")).embeddings().to_pandas().set_index(S.URI)
    fixed = store.open_index(folder_index[0]).embeddings().to_pandas().set_index(S.URI)
    assert report.indexed == len(fixed) and sorted(grown.index) == sorted(fixed.index)
    for u in fixed.index:
        np.testing.assert_allclose(np.asarray(grown.loc[u, S.EMBEDDING]), fixed.loc[u, S.EMBEDDING], atol=1e-5)


def test_table_dataset_keeps_the_rows_in_order_in_the_blocks_asked_for():
    from pipelines.runtime import table_dataset

    t = pa.table({"a": list(range(10)), "b": [str(i) for i in range(10)]})
    for blocks, expected in ((4, 4), (1, 1), (30, 10)):
        ds = table_dataset(t, blocks)
        assert ds.num_blocks() == expected
        assert pa.concat_tables(ray_get_tables(ds)).equals(t)
    assert pa.concat_tables(ray_get_tables(table_dataset(t.slice(0, 0), 3))).num_rows == 0


def ray_get_tables(ds) -> list[pa.Table]:
    import ray

    return ray.get(ds.to_arrow_refs())


def test_query_box_equals_the_cropped_patch(collection, tiny_cfg, folder_index, tmp_path):
    """A query given as (photo, box) gives the same results as the crop of that box given as its own image."""
    index, _ = folder_index
    queries = pq.read_table(collection.queries_uri).to_pandas()
    crop_uri = queries[S.URI].iloc[0]
    crop = np.asarray(__import__("PIL.Image").Image.open(crop_uri).convert("RGB"))
    h, w = crop.shape[:2]
    canvas = np.full((h + 30, w + 40, 3), 127, np.uint8)
    canvas[7 : 7 + h, 10 : 10 + w] = crop
    (tmp_path / "photo.png").write_bytes(encode_png(canvas))
    table = pa.table(
        {
            S.QUERY_ID: ["crop", "boxed"],
            S.URI: [crop_uri, "photo.png"],  # relative to the table
            S.X0: [None, 10.0],
            S.Y0: [None, 7.0],
            S.X1: [None, 10.0 + w],
            S.Y1: [None, 7.0 + h],
        }
    )
    pq.write_table(table, tmp_path / "queries.parquet")
    allowed = (str(tmp_path), os.path.dirname(crop_uri))
    cfg = dataclasses.replace(tiny_cfg, query=dataclasses.replace(tiny_cfg.query, allowed_prefixes=allowed))
    run_query(index, str(tmp_path / "queries.parquet"), str(tmp_path / "out"), cfg)
    res = read_results(str(tmp_path / "out"))
    a = res[res[S.QUERY_ID] == "crop"].sort_values(S.RANK).reset_index(drop=True)
    b = res[res[S.QUERY_ID] == "boxed"].sort_values(S.RANK).reset_index(drop=True)
    assert len(a) == len(b) > 0
    assert a[S.IMAGE_ID].tolist() == b[S.IMAGE_ID].tolist()
    np.testing.assert_allclose(a[S.SCORE], b[S.SCORE], atol=1e-5)
    np.testing.assert_allclose(a[S.COARSE_SCORE], b[S.COARSE_SCORE], atol=1e-5)
    np.testing.assert_allclose(a[S.BOX].to_numpy(), b[S.BOX].to_numpy(), atol=1e-3)


def write_shards(files: list[str], folder: str, per_shard: int) -> list[str]:
    os.makedirs(folder, exist_ok=True)
    shards = []
    for n, i in enumerate(range(0, len(files), per_shard)):
        path = os.path.join(folder, f"shard-{n:04d}.tar")
        with tarfile.open(path, "w") as tar:
            for f in files[i : i + per_shard]:
                key = os.path.splitext(os.path.basename(f))[0]
                tar.add(f, arcname=f"{key}.jpg")
                meta = b'{"source": "test"}'
                info = tarfile.TarInfo(f"{key}.json")
                info.size = len(meta)
                tar.addfile(info, io.BytesIO(meta))
        shards.append(path)
    return shards


def test_webdataset_shards_match_folder_embeddings(collection, tiny_cfg, tmp_path):
    files = gallery_files(collection)
    shards = write_shards(files, str(tmp_path / "shards"), per_shard=4)
    # one more shard with a corrupt member (bytes that are not an image) next to a good one
    bad = os.path.join(str(tmp_path / "shards"), "shard-bad.tar")
    with tarfile.open(bad, "w") as tar:
        tar.add(files[0], arcname="good-copy.jpg")
        junk = b"\xff\xd8\xff\xe0 not really a jpeg" * 10
        info = tarfile.TarInfo("corrupt.jpg")
        info.size = len(junk)
        tar.addfile(info, io.BytesIO(junk))
    index = str(tmp_path / "index")
    report = run_index(str(tmp_path / "shards"), index, tiny_cfg)
    assert report.inputs == len(files) + 2 and report.errors == 1
    v = check_version_consistent(index)
    err = v.errors().to_pandas()
    assert err[S.URI].tolist() == [f"{bad}#corrupt.jpg"] and err[S.STAGE].tolist() == ["decode"]
    emb = v.embeddings().to_pandas()
    ref = reference_embeddings(tiny_cfg, files)
    by_name = {os.path.splitext(os.path.basename(f))[0]: ref[f] for f in files}
    for u, e in zip(emb[S.URI], emb[S.EMBEDDING]):
        shard, member = u.split("#")
        assert shard in shards + [bad]
        key = "img_" + member.split("img_")[-1][:-4] if member != "good-copy.jpg" else None
        expected = by_name[key] if key else ref[files[0]]
        np.testing.assert_allclose(np.asarray(e), expected, atol=1e-5)


def test_s3_index_and_query(collection, tiny_cfg, s3_server, tmp_path):
    import s3fs

    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": s3_server})
    fs.mkdir("roiqa-test")
    files = gallery_files(collection)
    for f in files:
        fs.put_file(f, f"roiqa-test/gallery/{os.path.basename(f)}")
    qdir = os.path.join(os.path.dirname(collection.queries_uri), "queries")
    for f in sorted(os.listdir(qdir)):
        fs.put_file(os.path.join(qdir, f), f"roiqa-test/queries/{f}")
    report = run_index("s3://roiqa-test/gallery", "s3://roiqa-test/index", tiny_cfg)
    assert (report.indexed, report.errors) == (len(files), 0)
    assert fs.cat_file("roiqa-test/index/CURRENT").decode().strip() == report.version
    v = check_version_consistent("s3://roiqa-test/index")
    assert all(u.startswith("s3://roiqa-test/gallery/") for u in v.embeddings().column(S.URI).to_pylist())
    run_query("s3://roiqa-test/index", "s3://roiqa-test/queries", "s3://roiqa-test/out", tiny_cfg)
    res = read_results("s3://roiqa-test/out")
    assert set(res[S.QUERY_ID]) == {os.path.splitext(f)[0] for f in os.listdir(qdir)}
    heat = res[S.HEATMAP_URI].dropna()
    run = open_results("s3://roiqa-test/out")
    assert len(heat) and all(u.startswith(f"{run.folder}/heatmaps/") for u in heat)
    assert run.folder.startswith("s3://roiqa-test/out/runs/")
    assert fs.exists(heat.iloc[0][len("s3://") :])


def bad_inputs(folder: str, good: list[str]) -> dict[str, str]:
    """Write bad files next to good ones; returns {file name: expected reason}."""
    os.makedirs(folder, exist_ok=True)
    for f in good:
        shutil.copy(f, folder)
    jpeg = open(good[0], "rb").read()
    png = encode_png(np.zeros((8, 8, 3), np.uint8))
    huge = bytearray(png)
    huge[16:24] = (200_000).to_bytes(4, "big") + (200_000).to_bytes(4, "big")  # IHDR width, height
    import zlib

    huge[29:33] = zlib.crc32(bytes(huge[12:29])).to_bytes(4, "big")
    cases = {
        "zero.jpg": (b"", "empty_file"),
        "truncated.jpg": (jpeg[: len(jpeg) // 2], "truncated"),
        "text.jpg": (b"this is a text file, not a picture\n" * 4, "not_an_image"),
        "huge.png": (bytes(huge), "too_large"),
    }
    for name, (data, _) in cases.items():
        with open(os.path.join(folder, name), "wb") as f:
            f.write(data)
    return {name: reason for name, (_, reason) in cases.items()}


def test_bad_inputs_land_in_errors_and_counts_add_up(collection, tiny_cfg, tmp_path):
    good = gallery_files(collection)[:3]
    folder = str(tmp_path / "mixed")
    expected = bad_inputs(folder, good)
    # a corrupt tar member and a member escaping the folder, in a shard beside the files
    with tarfile.open(os.path.join(folder, "shard.tar"), "w") as tar:
        for name, data in (
            ("ok.jpg", open(good[0], "rb").read()),
            ("bad.jpg", b"garbage" * 50),
            ("../escape.jpg", open(good[1], "rb").read()),
        ):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    index = str(tmp_path / "index")
    report = run_index(folder, index, tiny_cfg)
    v = check_version_consistent(index)
    err = v.errors().to_pandas()
    reasons = {u[len(folder) + 1 :]: r for u, r in zip(err[S.URI], err[S.REASON])}
    for name, reason in expected.items():
        assert reasons[name] == reason, (name, reasons)
    assert reasons["shard.tar#bad.jpg"] in ("not_an_image", "corrupt")
    assert reasons["shard.tar#../escape.jpg"] == "unsafe_member"
    assert report.indexed == len(good) + 1  # the good files and the good tar member
    assert report.inputs == len(good) + len(expected) + 3
    assert all(m for m in err[S.MESSAGE])


def test_rerun_publishes_new_version_and_keeps_old(collection, tiny_cfg, tmp_path):
    index = str(tmp_path / "index")
    first = run_index(collection.gallery_dir, index, tiny_cfg)
    v1 = store.open_index(index)
    emb1 = v1.embeddings()
    second = run_index(collection.gallery_dir, index, tiny_cfg)
    assert second.version != first.version
    assert store.current_version(index) == second.version
    assert store.list_versions(index) == sorted([first.version, second.version])
    old = store.open_index(index, first.version)
    assert old.embeddings().equals(emb1)  # untouched
    assert old.faiss().ntotal == old.manifest["faiss_vectors"]  # checksum still matches
    new = check_version_consistent(index)
    assert new.manifest["parent"] == first.version


def _pngs(folder: str) -> dict[str, bytes]:
    """{path under folder: bytes} of the PNGs below a local folder."""
    out = {}
    for root, _, names in os.walk(folder):
        for name in names:
            if name.endswith(".png"):
                with open(os.path.join(root, name), "rb") as f:
                    out[os.path.relpath(os.path.join(root, name), folder)] = f.read()
    return out


def test_a_query_run_is_published_whole_and_never_mixed_with_the_previous_one(
    collection, tiny_cfg, folder_index, tmp_path
):
    index, _ = folder_index
    out = str(tmp_path / "out")
    queries = pq.read_table(collection.queries_uri)
    pq.write_table(queries.slice(2, 2), tmp_path / "first.parquet")
    allowed = (os.path.dirname(collection.queries_uri),)  # the query images stay beside the collection
    tiny_cfg = dataclasses.replace(tiny_cfg, query=dataclasses.replace(tiny_cfg.query, allowed_prefixes=allowed))
    first = run_query(index, str(tmp_path / "first.parquet"), out, tiny_cfg)
    earlier = open_results(out)  # a reader that resolved the first run before the second one started
    earlier_results = earlier.results()
    two = queries.slice(0, 2)  # other queries: none of the first run's overlays may show up in the second run
    pq.write_table(two, tmp_path / "two.parquet")
    second = run_query(index, str(tmp_path / "two.parquet"), out, tiny_cfg)

    res = read_results(out)
    assert set(res[S.QUERY_ID]) == set(two.column(S.QUERY_ID).to_pylist())
    heat = res[S.HEATMAP_URI].dropna()
    folders = {os.path.dirname(os.path.dirname(u)) for u in heat}
    assert len(heat) and len(folders) == 1  # every overlay of the published results in one heatmaps folder...
    drawn = {k.split(os.sep)[0] for k in _pngs(folders.pop())}
    assert drawn == set(two.column(S.QUERY_ID).to_pylist())  # ...which holds no overlay of the first run

    run = open_results(out)
    assert run.folder == second.run != first.run and earlier.folder == first.run
    summary, results, errors = run.summary(), run.results(), run.errors()
    assert summary["run_id"] == run.run_id and summary["previous"] == earlier.run_id
    for table in (results, errors):
        assert table.schema.metadata[b"roiqa.run_id"].decode() == run.run_id
    assert all(u.startswith(run.folder + os.sep) for u in heat)
    # the first run stays readable, whole, for the reader that had resolved it
    assert earlier.results().equals(earlier_results) and earlier.summary()["run_id"] == earlier.run_id
    assert sorted(os.listdir(os.path.join(out, "runs"))) == sorted([earlier.run_id, run.run_id])


def test_bad_query_is_recorded_and_the_rest_answered(collection, tiny_cfg, folder_index, tmp_path):
    index, _ = folder_index
    queries = pq.read_table(collection.queries_uri).to_pandas()
    (tmp_path / "not-an-image.png").write_bytes(b"plain text")
    good = queries[S.URI].iloc[0]
    nan = float("nan")
    # one query image with several boxes: each failure is keyed by its query_id, not only by the shared uri
    rows = {
        "good": (good, None, None, None, None),
        "boxed": (good, 2.0, 2.0, 20.0, 18.0),
        "partial": (good, 2.0, None, 20.0, 18.0),
        "nan": (good, 2.0, 2.0, nan, 18.0),
        "inverted": (good, 20.0, 2.0, 2.0, 18.0),
        "zero": (good, 5.0, 5.0, 5.0, 18.0),
        "outside": (good, 5000.0, 5000.0, 5100.0, 5100.0),
        "missing": (str(tmp_path / "nope.png"), None, None, None, None),
        "garbage": (str(tmp_path / "not-an-image.png"), None, None, None, None),
    }
    cols = [S.URI, *S.BOX]
    table = pa.table({S.QUERY_ID: list(rows), **{c: [r[i] for r in rows.values()] for i, c in enumerate(cols)}})
    pq.write_table(table, tmp_path / "queries.parquet")
    allowed = (str(tmp_path), os.path.dirname(good))  # the query images live beside the collection
    cfg = dataclasses.replace(tiny_cfg, query=dataclasses.replace(tiny_cfg.query, allowed_prefixes=allowed))
    report = run_query(index, str(tmp_path / "queries.parquet"), str(tmp_path / "out"), cfg)
    res = read_results(str(tmp_path / "out"))
    assert set(res[S.QUERY_ID]) == {"good", "boxed"} and report.errors == 7
    err = open_results(str(tmp_path / "out")).errors()
    assert err.schema.equals(S.QUERY_ERRORS_SCHEMA)
    err = err.to_pandas().set_index(S.QUERY_ID)
    assert sorted(err.index) == sorted(set(rows) - {"good", "boxed"})
    assert err.loc["garbage", S.REASON] == "not_an_image" and err.loc["missing", S.STAGE] == "query"
    for qid in ("partial", "nan", "inverted", "zero", "outside"):
        assert (err.loc[qid, S.STAGE], err.loc[qid, S.REASON], err.loc[qid, S.URI]) == ("query", "bad_box", good)
    assert "missing coordinates" in err.loc["partial", S.MESSAGE] and "missing" in err.loc["nan", S.MESSAGE]
    assert "inverted or empty" in err.loc["inverted", S.MESSAGE] and "inverted" in err.loc["zero", S.MESSAGE]
    assert "empty inside the" in err.loc["outside", S.MESSAGE]


def test_geometry_sends_verified_images_past_the_budget_to_the_rerank(tiny_cfg, tmp_path):
    """Two images hold the (rotated) query, the rerank budget is 1: the one the coarse stage ranks second or lower
    is reranked anyway because its homography verifies (and gets the geometry's inliers); without geometry only
    the budget is reranked. The verified images expand the coarse search unless every image is in its top_k."""
    import dataclasses

    import cv2
    import skimage.data

    face = skimage.data.astronaut()[14:186, 150:304]
    bg = np.repeat(skimage.data.brick()[:256, :256, None], 3, axis=2)

    def rotated_into(angle: float, x0: int, y0: int) -> np.ndarray:
        m = cv2.getRotationMatrix2D((77.0, 86.0), angle, 0.6)
        warped = cv2.warpAffine(face, m, (154, 172))
        mask = cv2.warpAffine(np.full(face.shape[:2], 255, np.uint8), m, (154, 172)) > 127
        out = bg.copy()
        out[y0 : y0 + 172, x0 : x0 + 154][mask] = warped[mask]
        return out

    gallery = tmp_path / "gallery"
    gallery.mkdir()
    images = {
        "pos_a.png": rotated_into(15.0, 20, 30),
        "pos_b.png": rotated_into(-25.0, 90, 60),
        "rocket.png": np.ascontiguousarray(skimage.data.rocket()[:256, 200:456]),
        "coffee.png": np.ascontiguousarray(skimage.data.coffee()[100:356, 200:456]),
    }
    for name, img in images.items():
        (gallery / name).write_bytes(encode_png(img))
    (tmp_path / "face.png").write_bytes(encode_png(face))
    pq.write_table(
        pa.table({S.QUERY_ID: ["face"], S.URI: [str(tmp_path / "face.png")]}), str(tmp_path / "queries.parquet")
    )
    cfg = dataclasses.replace(
        tiny_cfg,
        preprocess=dataclasses.replace(tiny_cfg.preprocess, image_size=256),
        query=dataclasses.replace(tiny_cfg.query, top_k=3, rerank=1, overlays=False),
        geometry=dataclasses.replace(tiny_cfg.geometry, shortlist=100),
    )
    index = str(tmp_path / "index")
    run_index(str(gallery), index, cfg)
    on = read_results_of(run_query(index, str(tmp_path / "queries.parquet"), str(tmp_path / "on"), cfg))
    off_cfg = dataclasses.replace(cfg, geometry=dataclasses.replace(cfg.geometry, enabled=False))
    off = read_results_of(run_query(index, str(tmp_path / "queries.parquet"), str(tmp_path / "off"), off_cfg))
    pos = {str(gallery / "pos_a.png"), str(gallery / "pos_b.png")}
    reranked = on[on[S.SCORE].notna()]
    assert pos <= set(reranked[S.URI])  # both positives reranked although the budget is 1
    assert (reranked[reranked[S.URI].isin(pos)][S.INLIERS] >= cfg.geometry.min_inliers).all()
    assert set(on.sort_values(S.RANK).head(2)[S.URI]) == pos  # and ranked first
    assert off[S.SCORE].notna().sum() == 1 and off[S.INLIERS].isna().all()
    # query.expand (on by default; top_k 3 of 4 images): the verified images' regions expanded the coarse search
    assert open_results(str(tmp_path / "on")).summary()["expanded_queries"] == 1
    assert open_results(str(tmp_path / "off")).summary()["expanded_queries"] == 0
    every = dataclasses.replace(cfg, query=dataclasses.replace(cfg.query, top_k=4))  # every image in the top_k
    run_query(index, str(tmp_path / "queries.parquet"), str(tmp_path / "every"), every)
    assert open_results(str(tmp_path / "every")).summary()["expanded_queries"] == 0


def read_results_of(report):
    return read_results(report.out)
