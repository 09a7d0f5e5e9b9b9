"""`roiqa reindex`: only new and changed images are embedded, the result equals a full index of the same folder,
no change publishes nothing, versions are garbage-collected, a crash before CURRENT leaves readers on the old
version, overlapping runs are refused, and manifests may not point outside their allowed prefixes."""

from __future__ import annotations

import dataclasses
import glob
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import threading
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipelines.index import run_index
from pipelines.reindex import run_reindex
from roiqa import schema as S
from roiqa.config import replace_section
from roiqa.index import faiss_index, hubness, store
from roiqa.index.incremental import diff
from roiqa.io.listing import list_images
from roiqa.io.sources import content_hash
from roiqa.models.regions import image_key, split_key

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _gallery(collection, folder) -> list[str]:
    """A copy of the collection's gallery plus one empty file (an errors-table row), sorted."""
    shutil.copytree(collection.gallery_dir, folder)
    with open(os.path.join(folder, "broken.jpg"), "wb"):
        pass
    return sorted(glob.glob(os.path.join(folder, "*")))


def _rows(version: store.IndexVersion) -> dict[str, np.ndarray]:
    t = version.embeddings([S.URI, S.EMBEDDING])
    rows = zip(t.column(S.URI).to_pylist(), t.column(S.EMBEDDING).to_pylist())
    return {u: np.asarray(e, np.float32) for u, e in rows}


def _uris_in_id_order(version: store.IndexVersion) -> list[str]:
    return version.embeddings([S.URI]).column(S.URI).to_pylist()


def _error_uris(version: store.IndexVersion) -> list[str]:
    return sorted(version.errors().column(S.URI).to_pylist())


def test_reindex_embeds_only_changes_and_equals_a_full_index(ray_local, collection, tiny_cfg, tmp_path):
    cfg = replace_section(tiny_cfg, "index", keep_versions=2)
    folder = str(tmp_path / "images")
    files = _gallery(collection, folder)
    index = str(tmp_path / "index")
    first = run_index(folder, index, cfg)
    v1 = store.open_index(index)
    assert first.inputs == len(files)

    # no change: nothing is published, CURRENT and the version folders stay as they were
    same = run_reindex(folder, index, cfg)
    assert (same.status, same.version, same.counts["new"], same.counts["unchanged"]) == ("unchanged", None, 0, 11)
    assert store.current_version(index) == first.version and store.list_versions(index) == [first.version]

    # one image deleted, one overwritten with other content, two added (one broken), one unchanged broken file kept
    images = [f for f in files if not f.endswith("broken.jpg")]
    os.remove(images[0])
    shutil.copyfile(images[5], images[1])
    shutil.copyfile(images[6], os.path.join(folder, "new_a.jpg"))
    with open(os.path.join(folder, "new_b.jpg"), "wb") as f:
        f.write(b"not an image")
    r = run_reindex(folder, index, cfg)
    assert (r.status, r.mode, r.parent) == ("published", "incremental", first.version)
    assert {k: r.counts[k] for k in ("listed", "new", "changed", "deleted", "unchanged")} == {
        "listed": 12, "new": 2, "changed": 1, "deleted": 1, "unchanged": 9,
    }  # fmt: skip
    v2 = store.open_index(index)
    assert v2.version == r.version and v2.manifest["parent"] == first.version

    # only the 3 new/changed images went through the embedding actors: the rest is the carried file, unchanged
    carried = pq.read_table(store.version_uri(index, r.version, store.EMBEDDINGS, f"carried-{first.version}.parquet"))
    assert carried.num_rows == 8
    old_rows = _rows(v1)
    for u, e in zip(carried.column(S.URI).to_pylist(), carried.column(S.EMBEDDING).to_pylist()):
        np.testing.assert_array_equal(np.asarray(e, np.float32), old_rows[u])
    assert v2.embeddings().num_rows == 8 + 2  # new_a and the overwritten image; new_b is an error

    # reference: a full index of the same folder
    ref_index = str(tmp_path / "reference")
    run_index(folder, ref_index, cfg)
    ref = store.open_index(ref_index)
    got, want = _rows(v2), _rows(ref)
    assert sorted(got) == sorted(want)
    for u in want:
        np.testing.assert_allclose(got[u], want[u], atol=1e-5)
    assert _error_uris(v2) == _error_uris(ref) == sorted([os.path.join(folder, "broken.jpg"), f"{folder}/new_b.jpg"])
    assert sorted([*got, *_error_uris(v2)]) == sorted(list_images(folder).uris)  # every input once

    # the faiss index updated in place answers like the rebuilt one (hubness weight 0: the inner products alone)
    dim = ref.manifest["embedding_dim"]
    vectors, keys = faiss_index.coarse_vectors(ref.embeddings(), dim, "regions")
    assert v2.faiss().ntotal == ref.faiss().ntotal == len(keys)
    q = hubness.augment_queries(vectors[::97][:4], 0.0)  # regional descriptors of the reference, as queries
    d1, i1 = faiss_index.search(v2.faiss(), q, 5)
    d2, _ = faiss_index.search(ref.faiss(), q, 5)
    np.testing.assert_allclose(d1, d2, atol=1e-3)  # the same scores (ids of near-ties may swap places)
    by_key = dict(zip(keys.tolist(), vectors))
    np.testing.assert_allclose([[q[i][:-1] @ by_key[j] for j in row] for i, row in enumerate(i1)], d1, atol=1e-3)

    # the update keeps the parent's hubness reference and measures the new regions against it, like a naive loop
    assert v2.manifest["hubness"] == v1.manifest["hubness"]
    assert v1.manifest["hubness"] == {
        "k": cfg.index.hubness_k,
        "reference": v1.manifest["faiss_vectors"],
        "regions_per_image": cfg.index.regions_per_image,
    }  # < 20000
    ref_v, ref_k = hubness.reference_arrays(v2.hubness_reference(), dim)
    np.testing.assert_array_equal(ref_v, hubness.reference_arrays(v1.hubness_reference(), dim)[0])
    new_uri = os.path.join(folder, "new_a.jpg")
    new_id = [i for i, u in store.image_uris(v2).items() if u == new_uri][0]
    new_keys = [k for k in keys.tolist() if split_key(k)[0] == image_key(np.array([new_id]))[0]]
    stored = np.stack([v2.faiss().reconstruct(k) for k in new_keys[:3]])  # Flat: exact
    for row, k in zip(stored, new_keys[:3]):
        own = split_key(k)[0]
        sims = sorted((float(by_key[k] @ rv) for rv, rk in zip(ref_v, ref_k) if rk != own), reverse=True)
        np.testing.assert_allclose(row[:-1], by_key[k], atol=1e-6)
        assert abs(row[-1] - np.mean(sims[: cfg.index.hubness_k])) < 1e-4

    # a third publish: keep_versions=2 garbage-collects the first version
    os.remove(os.path.join(folder, "new_a.jpg"))
    r3 = run_reindex(folder, index, cfg)
    assert (r3.counts["deleted"], r3.counts["gc_deleted"]) == (1, 1)
    assert store.list_versions(index) == sorted([r.version, r3.version])
    assert f"{folder}/new_a.jpg" not in _rows(store.open_index(index))

    runs = store.read_runs(index).to_pandas()
    assert runs[S.KIND].tolist() == ["index", "reindex", "reindex", "reindex"]
    assert runs[S.RUN_STATUS].tolist() == ["published", "unchanged", "published", "published"]
    assert runs["new"].tolist() == [11, 0, 2, 0] and runs["deleted"].tolist() == [0, 0, 1, 1]
    assert runs[S.VERSION].tolist()[2:] == [r.version, r3.version]


def test_reindex_is_full_when_the_model_changes(ray_local, collection, tiny_cfg, tmp_path):
    folder = str(tmp_path / "images")
    files = _gallery(collection, folder)
    index = str(tmp_path / "index")
    run_index(folder, index, tiny_cfg)
    other = replace_section(tiny_cfg, "model", seed=7)
    r = run_reindex(folder, index, other)
    assert (r.status, r.mode, r.reason) == ("published", "full", "the model changed")
    assert r.counts["new"] == len(files)
    assert store.open_index(index).manifest["config"]["model"]["seed"] == 7


def test_changed_coarse_settings_rebuild_faiss_from_the_stored_rows(ray_local, collection, tiny_cfg, tmp_path):
    """Images unchanged, index.regions_per_image changed: a new version, nothing embedded, faiss rebuilt from the
    carried rows with each image's least-hub regions (against a naive selection), the embeddings unchanged."""
    folder = str(tmp_path / "images")
    _gallery(collection, folder)
    index = str(tmp_path / "index")
    run_index(folder, index, tiny_cfg)
    first = store.open_index(index)
    assert run_reindex(folder, index, tiny_cfg).status == "unchanged"
    pruned = replace_section(tiny_cfg, "index", regions_per_image=3)
    r = run_reindex(folder, index, pruned)
    assert (r.status, r.mode, r.counts["unchanged"], r.pipeline_seconds) == ("published", "incremental", 11, 0.0)
    version = store.open_index(index)
    assert version.manifest["hubness"]["regions_per_image"] == 3
    assert version.embeddings().equals(first.embeddings())  # every stored row carried as it was
    dim = version.manifest["embedding_dim"]
    vectors, keys = faiss_index.coarse_vectors(version.embeddings(), dim, "regions")
    ref, ref_keys = hubness.reference_arrays(version.hubness_reference(), dim)
    h = hubness.hubness(vectors, split_key(keys)[0], ref, ref_keys, tiny_cfg.index.hubness_k)
    want = {int(k) for k, kept in zip(keys, hubness.least_hub(keys, h, 3)) if kept}
    got = {int(k) for k in keys if _holds(version.faiss(), int(k))}
    assert got == want and version.faiss().ntotal == len(want) < len(keys)
    assert run_reindex(folder, index, pruned).status == "unchanged"  # the same settings again: nothing to do


def _holds(index, key: int) -> bool:
    try:
        index.reconstruct(key)
        return True
    except RuntimeError:
        return False


_CRASH = """
import os, sys
from roiqa.index import store as index_store
def crash(root, version, lock=None):  # the process dies after the version is written, before CURRENT is replaced
    print("CRASHING", version, flush=True)
    os._exit(137)
index_store.publish = crash
from jobs.reindex import main
sys.exit(main(sys.argv[1:]))
"""


def test_crash_between_version_and_current_leaves_readers_on_the_old_version(ray_local, collection, tiny_cfg, tmp_path):
    folder = str(tmp_path / "images")
    _gallery(collection, folder)
    index = str(tmp_path / "index")
    old = run_index(folder, index, tiny_cfg).version
    shutil.copyfile(sorted(glob.glob(f"{folder}/img_*"))[0], f"{folder}/added.jpg")

    # the crashing run is a process of its own (os._exit: no cleanup, its lock left behind)
    config = tmp_path / "tiny.yaml"
    config.write_text(json.dumps({"model": {"fpn_channels": 32}, "preprocess": {"image_size": 128}}))
    argv = ["--images", folder, "--index", index, "--config", str(config), "--model", "none"]
    env = {**os.environ, "PYTHONPATH": REPO}
    crashed = subprocess.run([sys.executable, "-c", _CRASH, *argv], env=env, capture_output=True, text=True)
    assert crashed.returncode == 137 and "CRASHING" in crashed.stdout, crashed.stderr[-3000:]
    orphan = crashed.stdout.split("CRASHING", 1)[1].split()[0]
    assert os.path.exists(store.version_uri(index, orphan, store.MANIFEST))  # the version was written whole...
    assert store.current_version(index) == old  # ...but readers still get the old one
    reader = store.open_index(index)
    assert reader.version == old and reader.faiss().ntotal == reader.manifest["faiss_vectors"]
    assert f"{folder}/added.jpg" not in _rows(reader)
    assert os.path.exists(os.path.join(index, store.LOCK))  # the dead run's lock is left behind

    # the next run takes over the dead process's lock, completes, and garbage-collects the orphan
    done = run_reindex(folder, index, tiny_cfg)
    assert (done.status, done.counts["new"], done.parent) == ("published", 1, old)
    assert store.current_version(index) == done.version != orphan
    assert orphan not in store.list_versions(index)
    assert f"{folder}/added.jpg" in _rows(store.open_index(index))
    assert not os.path.exists(os.path.join(index, store.LOCK))


def test_a_live_lock_refuses_an_overlapping_run_and_a_stale_one_is_taken_over(tiny_cfg, tmp_path):
    index = str(tmp_path / "index")
    with store.IndexLock(index, ttl_s=60, what="roiqa reindex"):
        with pytest.raises(store.IndexBusy, match="locked by roiqa reindex"):
            run_reindex(str(tmp_path), index, tiny_cfg)  # refused before anything is listed or written
        with pytest.raises(store.IndexBusy):
            store.IndexLock(index, ttl_s=60).__enter__()
    assert not os.path.exists(os.path.join(index, store.LOCK))
    # expired lease: taken over
    stale = {"owner": "elsewhere:1:x", "host": "another-host", "pid": 1, "expires": time.time() - 1}
    with open(os.path.join(index, store.LOCK), "w") as f:
        json.dump(stale, f)
    with store.IndexLock(index, ttl_s=60) as lock:
        assert store.IndexLock(index, 60).held()["owner"] == lock.owner
    # a live lease on another host is respected
    live = {**stale, "expires": time.time() + 60}
    with open(os.path.join(index, store.LOCK), "w") as f:
        json.dump(live, f)
    with pytest.raises(store.IndexBusy, match="elsewhere:1:x"):
        store.IndexLock(index, ttl_s=60).__enter__()


def test_a_run_whose_lock_was_taken_over_neither_publishes_nor_collects(ray_local, collection, tiny_cfg, tmp_path):
    folder = str(tmp_path / "images")
    _gallery(collection, folder)
    index = str(tmp_path / "index")
    lock_file = os.path.join(index, store.LOCK)
    other = store.IndexLock(index, ttl_s=60, what="other run")

    def take_over() -> None:  # as soon as the run locks the index, its LOCK is deleted and another run takes it
        deadline = time.time() + 60
        while not os.path.exists(lock_file) and time.time() < deadline:
            time.sleep(0.002)
        os.unlink(lock_file)
        other.__enter__()

    thief = threading.Thread(target=take_over)
    thief.start()
    try:
        with pytest.raises(ValueError, match="no longer holds the index lock"):
            run_index(folder, index, tiny_cfg)
    finally:
        thief.join()
    assert store.current_version(index) is None  # nothing published
    assert len(store.list_versions(index)) == 1  # its version stays for the lock's holder to collect
    assert store.read_runs(index).column(S.RUN_STATUS).to_pylist() == ["failed"]
    assert other.held()["owner"] == other.owner  # the other run's lock is left alone
    other.__exit__(None, None, None)


def test_garbage_collection_keeps_the_published_chain_and_removes_orphans(tmp_path):
    root = str(tmp_path / "index")
    parent = None
    for v in ["v1", "v2", "v3"]:
        store.write_manifest(root, v, {"version": v, "parent": parent})
        store.publish(root, v)
        parent = v
    store.write_manifest(root, "v2b", {"version": "v2b", "parent": "v2"})  # written, never published
    os.makedirs(store.version_uri(root, "v0-partial", store.EMBEDDINGS))  # a run that died before its manifest
    assert store.published_chain(root) == ["v3", "v2", "v1"]
    assert sorted(store.collect_garbage(root, keep=2)) == ["v0-partial", "v1", "v2b"]
    assert store.list_versions(root) == ["v2", "v3"] and store.current_version(root) == "v3"
    with pytest.raises(ValueError, match="keep_versions"):
        store.collect_garbage(root, keep=0)


def test_diff_against_a_worked_example():
    old = {"a": "etag:1", "b": "etag:2", "c": "etag:3", "d": None}
    new = {"a": "etag:1", "b": "etag:9", "d": None, "e": "etag:5"}
    assert diff(old, new) == {"new": ["e"], "changed": ["b"], "deleted": ["c"], "unchanged": ["a", "d"]}


def test_faiss_update_in_place_equals_a_rebuild():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(50, 16)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    ids = np.arange(1000, 1050, dtype=np.int64)
    index = faiss_index.build_index(x[:40], ids[:40], "Flat")
    gone = ids[[3, 7, 20]]
    updated = faiss_index.update_index(index, gone, x[40:], ids[40:])
    keep = ~np.isin(ids, gone)
    rebuilt = faiss_index.build_index(x[keep], ids[keep], "Flat")
    d1, i1 = faiss_index.search(updated, x[:10], 8)
    d2, i2 = faiss_index.search(rebuilt, x[:10], 8)
    np.testing.assert_array_equal(i1, i2)
    np.testing.assert_allclose(d1, d2, atol=1e-6)
    assert not np.isin(i1, gone).any()


def test_a_manifest_pointing_outside_its_prefix_is_refused(tmp_path, tiny_cfg):
    inside = tmp_path / "data" / "a.jpg"
    inside.parent.mkdir()
    inside.write_bytes(b"x")
    outside = tmp_path / "secret.jpg"
    outside.write_bytes(b"x")
    manifest = tmp_path / "data" / "m.parquet"
    for rows in (["a.jpg", "../secret.jpg"], ["a.jpg", str(outside)], ["a.jpg", "sub/../../secret.jpg"]):
        pq.write_table(pa.table({S.URI: rows}), manifest)
        with pytest.raises(ValueError, match=r"m\.parquet: row 1 points outside the allowed prefixes"):
            list_images(str(manifest))
    # a symbolic link inside the folder that points out of it is outside (the check resolves links)
    os.symlink(outside, tmp_path / "data" / "link.jpg")
    pq.write_table(pa.table({S.URI: ["a.jpg", "link.jpg"]}), manifest)
    with pytest.raises(ValueError, match=r"m\.parquet: row 1 points outside the allowed prefixes"):
        list_images(str(manifest))
    # inside its folder, or inside a prefix the config allows, is accepted
    pq.write_table(pa.table({S.URI: ["a.jpg", "./sub/../a.jpg", str(outside)]}), manifest)
    listing = list_images(str(manifest), (str(tmp_path / "data"), str(tmp_path)))
    assert listing.uris == [str(inside), str(outside)] and [u for u, _ in listing.errors] == [str(inside)]
    assert set(listing.signatures) == {str(inside), str(outside)}
    cfg = dataclasses.replace(tiny_cfg)
    with pytest.raises(ValueError, match="outside the allowed prefixes"):
        run_reindex(str(manifest), str(tmp_path / "index"), cfg)


def test_odd_inputs_are_indexed_or_recorded_and_a_reindex_keeps_their_rows(ray_local, collection, tiny_cfg, tmp_path):
    """Odd names, a format outside the list, inputs over the byte limit, a tar member name twice and two inputs
    read as one URI: each is indexed or an errors row, none fails the run, and a re-index keeps the same rows."""
    cfg = replace_section(tiny_cfg, "index", max_image_bytes=100_000)
    photos = [open(f, "rb").read() for f in sorted(glob.glob(os.path.join(collection.gallery_dir, "*")))]
    assert all(len(p) < 100_000 for p in photos)
    folder = tmp_path / "images"
    folder.mkdir()
    (folder / "good.jpg").write_bytes(photos[0])
    (folder / "a::b.jpg").write_bytes(photos[1])  # '::' is fsspec's chain separator
    (folder / "x.tar#y.jpg").write_bytes(photos[2])  # named like a tar member; there is no x.tar
    fd = os.open(os.fsencode(str(folder)) + b"/bad\xffname.jpg", os.O_WRONLY | os.O_CREAT)
    os.write(fd, photos[3])
    os.close(fd)
    icon = io.BytesIO()
    Image.new("RGB", (16, 16)).save(icon, format="ICO")
    (folder / "icon.png").write_bytes(icon.getvalue())
    (folder / "big.jpg").write_bytes(photos[4] + b"\0" * 100_000)

    def add(tar, name, data):
        info = tarfile.TarInfo(name)
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))

    with tarfile.open(folder / "s.tar", "w") as tar:
        for name, data in [("dup.jpg", photos[5]), ("other.jpg", photos[6]), ("dup.jpg", photos[7])]:
            add(tar, name, data)
        add(tar, "huge.jpg", photos[8] + b"\0" * 100_000)
    with tarfile.open(folder / "z.tar", "w") as tar:
        add(tar, "w.jpg", photos[9])
    (folder / "z.tar#w.jpg").write_bytes(photos[9])  # a file and a tar member, both read as one URI

    def check(version: store.IndexVersion) -> None:
        emb, err = version.embeddings(), version.errors()
        indexed = dict(zip(emb.column(S.URI).to_pylist(), emb.column(S.CONTENT_HASH).to_pylist()))
        assert sorted(indexed) == sorted(
            str(folder / n) for n in ("good.jpg", "a::b.jpg", "x.tar#y.jpg", "s.tar#dup.jpg", "s.tar#other.jpg")
        )
        assert indexed[str(folder / "s.tar#dup.jpg")] == content_hash(photos[7])  # the last copy of the name
        rows = sorted(
            (u[len(str(folder)) + 1 :], r) for u, r in zip(err.column(S.URI).to_pylist(), err[S.REASON].to_pylist())
        )
        assert rows == [
            ("bad\\xffname.jpg", "undecodable_name"),
            ("big.jpg", "too_large"),
            ("icon.png", "unsupported_format"),
            ("s.tar#dup.jpg", "duplicate_uri"),
            ("s.tar#huge.jpg", "too_large"),
            ("z.tar#w.jpg", "duplicate_uri"),
            ("z.tar#w.jpg", "duplicate_uri"),
        ]
        assert all(err.column(S.MESSAGE).to_pylist())
        assert version.manifest["counts"] == {"listed": 9, "inputs": 12, "indexed": 5, "errors": 7}

    index = str(tmp_path / "index")
    run_index(str(folder), index, cfg)
    check(store.open_index(index))
    assert run_reindex(str(folder), index, cfg).status == "unchanged"
    (folder / "good.jpg").write_bytes(photos[9])  # changed: the shards' rows are carried over, the listing's made anew
    r = run_reindex(str(folder), index, cfg)
    assert (r.status, r.mode, r.counts["changed"], r.counts["unchanged"]) == ("published", "incremental", 1, 7)
    check(store.open_index(index))


def test_a_version_with_float16_regions_is_carried_over_in_the_stored_form_of_new_ones(
    ray_local, collection, tiny_cfg, tmp_path
):
    """Versions written before regions_q8 hold float16 regions (S.REGIONS): their faiss index is still read, and a
    re-index carries their rows over converted to regions_q8, equal to a fresh index's within the int8 step."""
    from roiqa.models.regions import decode_regions

    folder = str(tmp_path / "images")
    shutil.copytree(collection.gallery_dir, folder)
    index = str(tmp_path / "index")
    run_index(folder, index, tiny_cfg)
    v1 = store.open_index(index)
    dim = v1.manifest["embedding_dim"]
    # rewrite v1 as an older version: float16 regions under S.REGIONS
    for path in glob.glob(os.path.join(store.version_uri(index, v1.version, store.EMBEDDINGS), "*.parquet")):
        t = pq.read_table(path)
        old = [decode_regions(b, dim).astype(np.float16).tobytes() for b in t.column(S.REGIONS_Q8).to_pylist()]
        i = t.schema.get_field_index(S.REGIONS_Q8)
        pq.write_table(t.set_column(i, S.REGIONS, pa.array(old, pa.binary())), path)
    old_table = store.open_index(index).embeddings()
    assert S.REGIONS in old_table.column_names and S.REGIONS_Q8 not in old_table.column_names
    n_old = faiss_index.coarse_count(old_table, dim, "regions")
    assert n_old == store.open_index(index).faiss().ntotal  # the older version is read as it is

    shutil.copyfile(sorted(glob.glob(os.path.join(folder, "*")))[0], os.path.join(folder, "new.png"))
    r = run_reindex(folder, index, tiny_cfg)
    assert (r.status, r.mode, r.counts["new"]) == ("published", "incremental", 1)
    v2 = store.open_index(index)
    table = v2.embeddings()
    assert S.REGIONS_Q8 in table.column_names and S.REGIONS not in table.column_names
    got = dict(zip(table.column(S.URI).to_pylist(), faiss_index.region_arrays(table, dim)))
    want = dict(zip(old_table.column(S.URI).to_pylist(), faiss_index.region_arrays(old_table, dim)))
    for u, regions in want.items():  # carried rows: the float16 values, now in int8 steps of their row's scale
        step = np.abs(regions).max(axis=1, keepdims=True) / 127
        assert np.all(np.abs(got[u] - regions) <= step / 2 + 1e-3 * step + 1e-7), u
    assert v2.faiss().ntotal == faiss_index.coarse_count(table, dim, "regions") > n_old
