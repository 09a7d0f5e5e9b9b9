"""Tests of roiqa.index.faiss_index, roiqa.config, roiqa.schema, roiqa.io.uri and roiqa.io.sources against brute
force and hand-built files."""

from __future__ import annotations

import io
import os
import re
import tarfile

import faiss
import numpy as np
import pyarrow as pa
import pytest

from roiqa import errors as row_errors
from roiqa import schema as S
from roiqa.config import (
    IndexConfig,
    ModelConfig,
    PreprocessConfig,
    QueryConfig,
    RoiqaConfig,
    from_dict,
    load_config,
    to_dict,
)
from roiqa.index import faiss_index as fi
from roiqa.io import uri
from roiqa.io.sources import expand_tar, read_files, safe_member_name

# --- faiss ----------------------------------------------------------------------------------------------------


def _unit(n: int, dim: int, seed: int) -> np.ndarray:
    v = np.random.default_rng(seed).standard_normal((n, dim)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def _ids(n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    ids = rng.choice(2**62, size=n, replace=False).astype(np.int64) + 2**40
    assert len(np.unique(ids)) == n
    return ids


def _brute(vectors: np.ndarray, ids: np.ndarray, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    sims = queries.astype(np.float64) @ vectors.astype(np.float64).T
    order = np.argsort(-sims, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(sims, order, axis=1), ids[order]


@pytest.fixture(scope="module")
def flat_data():
    vectors, ids, queries = _unit(500, 32, 0), _ids(500, 1), _unit(10, 32, 2)
    return vectors, ids, queries, fi.build_index(vectors, ids, "Flat")


def test_flat_search_equals_brute_force(flat_data) -> None:
    vectors, ids, queries, index = flat_data
    assert index.ntotal == 500
    scores, got = fi.search(index, queries, 8)
    ref_scores, ref_ids = _brute(vectors, ids, queries, 8)
    assert got.dtype == np.int64
    np.testing.assert_array_equal(got, ref_ids)
    np.testing.assert_allclose(scores, ref_scores, rtol=0, atol=1e-5)
    assert set(got.ravel()) <= set(ids.tolist())
    assert got.min() >= 2**40  # the given ids, not row numbers


def test_search_query_that_is_an_indexed_vector(flat_data) -> None:
    vectors, ids, _, index = flat_data
    scores, got = fi.search(index, vectors[[17, 333]], 1)
    assert got[:, 0].tolist() == [ids[17], ids[333]]
    np.testing.assert_allclose(scores[:, 0], 1.0, atol=1e-5)


def test_serialize_round_trip(flat_data, tmp_path) -> None:
    _, _, queries, index = flat_data
    data = fi.serialize(index)
    assert isinstance(data, bytes)
    again = fi.deserialize(data)
    s1, i1 = fi.search(index, queries, 5)
    s2, i2 = fi.search(again, queries, 5)
    np.testing.assert_array_equal(i1, i2)
    np.testing.assert_array_equal(s1, s2)
    path = str(tmp_path / "v1" / "index.faiss")
    assert fi.save(index, path) == data
    s3, i3 = fi.search(fi.load(path), queries, 5)
    np.testing.assert_array_equal(i1, i3)
    np.testing.assert_array_equal(s1, s3)


def test_deserialize_garbage_names_input(flat_data) -> None:
    with pytest.raises(ValueError, match="<bytes>: not a readable faiss index"):
        fi.deserialize(b"garbage")
    with pytest.raises(ValueError, match="idx.faiss: not a readable faiss index"):
        fi.deserialize(b"garbage", "idx.faiss")
    data = fi.serialize(flat_data[3])
    with pytest.raises(ValueError, match="cut.faiss"):
        fi.deserialize(data[: len(data) // 2], "cut.faiss")


def test_build_index_input_errors() -> None:
    v = _unit(4, 8, 0)
    with pytest.raises(ValueError, match="unique"):
        fi.build_index(v, np.array([5, 6, 5, 7]), "Flat")
    with pytest.raises(ValueError, match="must agree"):
        fi.build_index(v, np.array([1, 2, 3]), "Flat")
    with pytest.raises(ValueError, match="not valid for dimension 8"):
        fi.build_index(v, np.arange(4), "NotAFactory")


def test_choose_factory() -> None:
    assert fi.choose_factory("auto", 1000, 128) == "Flat"
    assert fi.choose_factory("auto", fi.AUTO_FLAT_LIMIT - 1, 128) == "Flat"
    assert fi.choose_factory("HNSW32", 10**7, 128) == "HNSW32"  # explicit specs pass through
    assert fi.choose_factory("auto", 200_000, 128) == "IVF2048,SQ8"  # 4 * sqrt(2e5) = 1789 -> 2**11
    for n in (fi.AUTO_FLAT_LIMIT, 10**6, 10**8):
        for dim in (16, 36, 50, 64, 70, 100, 128, 130, 256, 2048):
            spec = fi.choose_factory("auto", n, dim)
            m = re.fullmatch(r"IVF(\d+),SQ8", spec)
            assert m, spec
            nlist = int(m.group(1))
            assert nlist & (nlist - 1) == 0  # a power of two
            assert 0.5 * 4 * np.sqrt(n) <= nlist <= 2 * 4 * np.sqrt(n)
            faiss.index_factory(dim, spec, faiss.METRIC_INNER_PRODUCT)  # valid for every dimension


def test_ivf_indexes_keep_their_own_ids_without_an_id_map() -> None:
    vectors, ids = _unit(3000, 32, 11), _ids(3000, 12)
    ivf = fi.build_index(vectors, ids, "IVF16,SQ8")
    flat = fi.build_index(vectors, ids, "Flat")
    assert isinstance(flat, faiss.IndexIDMap2) and not isinstance(ivf, faiss.IndexIDMap2)
    _, got = fi.search(ivf, vectors[:5], 1, nprobe=16)
    assert got[:, 0].tolist() == ids[:5].tolist()  # each vector finds itself under its own id
    assert fi.deserialize(fi.serialize(ivf)).ntotal == 3000


def test_ivf_all_cells_matches_exact() -> None:
    vectors, ids, queries = _unit(2000, 16, 3), _ids(2000, 4), _unit(20, 16, 5)
    index = fi.build_index(vectors, ids, "IVF16,Flat")
    scores, got = fi.search(index, queries, 5, nprobe=16)
    ref_scores, ref_ids = _brute(vectors, ids, queries, 5)
    np.testing.assert_array_equal(got[:, 0], ref_ids[:, 0])
    np.testing.assert_array_equal(got, ref_ids)
    np.testing.assert_allclose(scores, ref_scores, atol=1e-5)
    # nprobe larger than nlist is clamped, not an error
    _, got_big = fi.search(index, queries, 5, nprobe=1000)
    np.testing.assert_array_equal(got_big, ref_ids)


def test_ivf_with_too_few_vectors() -> None:
    with pytest.raises(ValueError, match=r"'IVF64,Flat' needs at least 64 vectors"):
        fi.build_index(_unit(30, 8, 0), np.arange(30), "IVF64,Flat")
    with pytest.raises(ValueError, match="collection is empty"):
        fi.build_index(np.zeros((0, 8), np.float32), np.zeros(0, np.int64), "IVF4,Flat")


def test_search_k_larger_than_ntotal() -> None:
    v, ids = _unit(5, 8, 6), _ids(5, 7)
    index = fi.build_index(v, ids, "Flat")
    q = _unit(3, 8, 8)
    scores, got = fi.search(index, q, 10)
    assert got.shape == (3, 5) and scores.shape == (3, 5)
    for row in got:
        assert sorted(row.tolist()) == sorted(ids.tolist())
    ref_scores, ref_ids = _brute(v, ids, q, 5)
    np.testing.assert_array_equal(got, ref_ids)
    assert np.all(np.diff(scores, axis=1) <= 1e-7)  # best first


def test_search_empty_index() -> None:
    index = fi.build_index(np.zeros((0, 8), np.float32), np.zeros(0, np.int64), "Flat")
    scores, got = fi.search(index, _unit(2, 8, 0), 5)
    assert got.shape == (2, 1)
    assert np.all(got == -1) and np.all(np.isneginf(scores))


# --- config ---------------------------------------------------------------------------------------------------


def test_load_config_defaults() -> None:
    assert load_config(None) == RoiqaConfig()
    assert load_config(None).query == QueryConfig()


def test_load_config_yaml(tmp_path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("query:\n  top_k: 7\n  query_sizes: [32, 64]\nmodel:\n  gamma: 5\n")
    cfg = load_config(str(path))
    assert cfg.query.top_k == 7
    assert cfg.query.query_sizes == (32, 64) and isinstance(cfg.query.query_sizes, tuple)
    assert cfg.model.gamma == 5.0 and isinstance(cfg.model.gamma, float)  # int promoted to float
    assert cfg.query.rerank == QueryConfig().rerank  # untouched defaults
    assert cfg.index == IndexConfig()
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    assert load_config(str(empty)) == RoiqaConfig()


@pytest.mark.parametrize(
    "text, key",
    [("bogus: 1\n", "bogus"), ("query:\n  topk: 3\n", "topk"), ("model:\n  fpn_chanels: 8\n", "fpn_chanels")],
)
def test_load_config_unknown_key(tmp_path, text, key) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ValueError, match="unknown key") as err:
        load_config(str(path))
    assert key in str(err.value) and str(path) in str(err.value)


@pytest.mark.parametrize(
    "text",
    [
        'query:\n  top_k: "x"\n',
        "query:\n  top_k: true\n",
        "query:\n  query_sizes: 32\n",
        "model:\n  gamma: fast\n",
        "query: 3\n",
        "- a\n- b\n",
    ],
)
def test_load_config_wrong_type(tmp_path, text) -> None:
    path = tmp_path / "t.yaml"
    path.write_text(text)
    with pytest.raises(ValueError, match=re.escape(str(path))):
        load_config(str(path))


def test_wrong_type_message_names_field(tmp_path) -> None:
    path = tmp_path / "t.yaml"
    path.write_text('query:\n  top_k: "x"\n')
    with pytest.raises(ValueError, match=r"query\.top_k: expected int"):
        load_config(str(path))
    path.write_text("model:\n  gamma: fast\n")  # a string for a float field is an error, not stored as is
    with pytest.raises(ValueError, match=r"model\.gamma: expected float, got 'fast'"):
        load_config(str(path))
    path.write_text("query:\n  nms_iou: true\n")
    with pytest.raises(ValueError, match=r"query\.nms_iou: expected float"):
        load_config(str(path))
    path.write_text("query:\n  query_sizes: [32, x]\n")
    with pytest.raises(ValueError, match=r"query\.query_sizes: expected int"):
        load_config(str(path))


def test_overrides_win_over_yaml(tmp_path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("query:\n  top_k: 7\n  query_sizes: [32, 64]\n")
    cfg = load_config(str(path), overrides={"query": {"top_k": 9}, "index": {"batch_size": 3}})
    assert cfg.query.top_k == 9
    assert cfg.query.query_sizes == (32, 64)
    assert cfg.index.batch_size == 3
    assert load_config(None, {"model": {"seed": 4}}).model.seed == 4
    with pytest.raises(ValueError, match="nope"):
        load_config(None, {"query": {"nope": 1}})


def test_to_dict_from_dict_round_trip() -> None:
    cfg = RoiqaConfig(
        model=ModelConfig(backbone="resnet18", fpn_channels=16, levels=(3, 4), backbone_weights="/w.pth", seed=9),
        preprocess=PreprocessConfig(image_size=256),
        index=IndexConfig(faiss_factory="IVF16,Flat"),
        query=QueryConfig(top_k=5, query_sizes=(32, 64), nms_iou=0.5, overlays=False),
    )
    d = to_dict(cfg)
    assert d["query"]["query_sizes"] == [32, 64] and d["model"]["levels"] == [3, 4]
    assert from_dict(RoiqaConfig, d) == cfg
    assert from_dict(RoiqaConfig, to_dict(RoiqaConfig())) == RoiqaConfig()


def test_yaml_dump_round_trip(tmp_path) -> None:
    import yaml

    cfg = RoiqaConfig(query=QueryConfig(top_k=11, query_sizes=(8,)))
    path = tmp_path / "dump.yaml"
    path.write_text(yaml.safe_dump(to_dict(cfg)))
    assert load_config(str(path)) == cfg


# --- schema ---------------------------------------------------------------------------------------------------


def test_check_columns_missing_required() -> None:
    t = pa.table({S.URI: ["a.jpg"]})
    with pytest.raises(ValueError, match=r"queries\.parquet: missing required column\(s\) \['query_id'\]"):
        S.check_columns(t, S.QUERIES_SCHEMA, "queries.parquet")


def test_check_columns_nullable_become_null_and_cast() -> None:
    t = pa.table({S.QUERY_ID: ["q1", "q2"], S.URI: ["a.jpg", "b.jpg"], S.X0: pa.array([1, 2], pa.int64())})
    out = S.check_columns(t, S.QUERIES_SCHEMA, "queries")
    assert out.schema == S.QUERIES_SCHEMA
    assert out.column(S.X0).to_pylist() == [1.0, 2.0]
    assert out.column(S.X0).type == pa.float32()
    for c in (S.Y0, S.X1, S.Y1):
        assert out.column(c).null_count == 2
    assert out.column(S.QUERY_ID).to_pylist() == ["q1", "q2"]


def test_check_columns_uncastable_and_explicit_required() -> None:
    t = pa.table({S.QUERY_ID: ["q"], S.URI: ["a"], S.X0: ["not a number"]})
    with pytest.raises(ValueError, match=r"gt: column 'x0' cannot be read as float"):
        S.check_columns(t, S.QUERIES_SCHEMA, "gt")
    t2 = pa.table({S.QUERY_ID: ["q"], S.URI: ["a"]})
    with pytest.raises(ValueError, match=r"boxes: missing required column\(s\) \['x0', 'y0'\]"):
        S.check_columns(t2, S.QUERIES_SCHEMA, "boxes", required=[S.X0, S.Y0])


# --- uri ------------------------------------------------------------------------------------------------------


def test_normalize(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert uri.normalize("a/b.jpg") == str(tmp_path / "a" / "b.jpg")
    assert uri.normalize("./a/../c.jpg") == str(tmp_path / "c.jpg")
    assert uri.normalize("file:///data/x.jpg") == "/data/x.jpg"
    assert uri.normalize("file://rel/x.jpg") == str(tmp_path / "rel" / "x.jpg")
    assert uri.normalize("s3://bucket/prefix/") == "s3://bucket/prefix"
    assert uri.normalize("s3://bucket/prefix") == "s3://bucket/prefix"
    assert uri.is_local("file:///x") and uri.is_local("x/y") and not uri.is_local("s3://b/k")


def test_split_member() -> None:
    assert uri.split_member("a/b.tar#x/y.jpg") == ("a/b.tar", "x/y.jpg")
    assert uri.split_member("s3://b/s.TAR#m.png") == ("s3://b/s.TAR", "m.png")
    assert uri.split_member("a/b.jpg") == ("a/b.jpg", None)
    assert uri.split_member("a/b#1.jpg") == ("a/b#1.jpg", None)  # '#' in a plain file name
    assert uri.split_member("a/b.tar#") == ("a/b.tar#", None)


def test_join(tmp_path) -> None:
    assert uri.join("s3://bucket/root/", "v1", "/index.faiss") == "s3://bucket/root/v1/index.faiss"
    assert uri.join(str(tmp_path), "a", "b.txt") == os.path.join(str(tmp_path), "a", "b.txt")
    assert uri.join(f"file://{tmp_path}", "x") == str(tmp_path / "x")


def test_write_atomic_and_read_back(tmp_path) -> None:
    path = str(tmp_path / "sub" / "f.bin")
    uri.write_atomic(path, b"first")
    assert uri.read_bytes(path) == b"first"
    uri.write_atomic(path, b"second")
    assert uri.read_bytes(path) == b"second"
    assert os.listdir(tmp_path / "sub") == ["f.bin"]


def test_write_atomic_crash_keeps_old_content(tmp_path, monkeypatch) -> None:
    path = tmp_path / "manifest.json"
    path.write_bytes(b"old")

    def boom(src, dst):
        raise OSError("simulated crash before rename")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError, match="simulated crash"):
        uri.write_atomic(str(path), b"new content")
    monkeypatch.undo()
    assert path.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["manifest.json"]  # no temp file left behind


def test_list_files(tmp_path) -> None:
    for rel in ["a.jpg", "b.PNG", "c.txt", ".hidden.jpg", ".cache/d.jpg", "sub/e.jpeg", "sub/.x/f.png", "s.tar"]:
        p = tmp_path / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"x")
    got = uri.list_files(str(tmp_path), uri.IMAGE_EXTENSIONS)
    assert got == sorted(str(tmp_path / r) for r in ["a.jpg", "b.PNG", "sub/e.jpeg"])
    assert uri.list_files(str(tmp_path), uri.TAR_EXTENSIONS) == [str(tmp_path / "s.tar")]
    assert uri.list_files(str(tmp_path / "c.txt"), uri.IMAGE_EXTENSIONS) == [str(tmp_path / "c.txt")]
    with pytest.raises(FileNotFoundError, match="missing"):
        uri.list_files(str(tmp_path / "missing"), uri.IMAGE_EXTENSIONS)


def _tar_bytes(members: list[tuple[str, bytes]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _payload(n: int, seed: int) -> bytes:
    return np.random.default_rng(seed).integers(0, 256, size=n, dtype=np.uint8).tobytes()


def test_read_bytes_tar_member(tmp_path) -> None:
    a, b = _payload(700, 0), _payload(1500, 1)
    shard = tmp_path / "shard-000.tar"
    shard.write_bytes(_tar_bytes([("x/a.jpg", a), ("x/a.json", b"{}"), ("b.png", b)]))
    assert uri.read_bytes(f"{shard}#x/a.jpg") == a
    assert uri.read_bytes(f"{shard}#b.png") == b
    assert uri.read_bytes(f"{shard}#x/a.json") == b"{}"
    with pytest.raises(FileNotFoundError):  # neither a member of the shard nor a file of that name
        uri.read_bytes(f"{shard}#nope.jpg")


# --- sources --------------------------------------------------------------------------------------------------


def test_safe_member_name() -> None:
    for bad in ["../x.jpg", "/abs.jpg", "a/../../x.jpg", "", "\\x.jpg", "a\\..\\x.jpg", "C:/x.jpg", ".."]:
        assert not safe_member_name(bad), bad
    for good in ["a/b.jpg", "x.jpg", "a/./b.jpg", "a/b/../c.jpg", "a/..b.jpg"]:
        assert safe_member_name(good), good


def _batch(*uris: str) -> dict[str, np.ndarray]:
    arr = np.empty(len(uris), dtype=object)
    arr[:] = list(uris)
    return {S.URI: arr}


def test_expand_tar_good_evil_and_non_image(tmp_path) -> None:
    good1, good2, evil = _payload(600, 2), _payload(2000, 3), _payload(100, 4)
    shard = str(tmp_path / "s.tar")
    members = [("k1/img.jpg", good1), ("../evil.jpg", evil), ("k1/meta.json", b'{"a": 1}'), ("k2.png", good2)]
    with open(shard, "wb") as f:
        f.write(_tar_bytes(members))
    out = expand_tar(_batch(shard))
    assert out[S.URI].tolist() == [f"{shard}#k1/img.jpg", f"{shard}#../evil.jpg", f"{shard}#k2.png"]
    assert out[S.BYTES][0] == good1 and out[S.BYTES][2] == good2
    assert out[S.BYTES][1] == b""
    errs = row_errors.read(out)
    assert errs[0] is None and errs[2] is None
    assert (errs[1].stage, errs[1].reason) == ("read", "unsafe_member") and "refused" in errs[1].message


def test_expand_tar_truncated_shard(tmp_path) -> None:
    first, second = _payload(1000, 5), _payload(5000, 6)
    data = _tar_bytes([("a.jpg", first), ("b.jpg", second)])
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        info_b = tar.getmember("b.jpg")
    assert info_b.size == 5000
    cut = info_b.offset_data + 2500  # in the middle of the second member's data
    shard = str(tmp_path / "cut.tar")
    with open(shard, "wb") as f:
        f.write(data[:cut])
    out = expand_tar(_batch(shard))
    assert out[S.URI].tolist() == [f"{shard}#a.jpg", shard]
    errs = row_errors.read(out)
    assert out[S.BYTES][0] == first and errs[0] is None
    assert (errs[1].stage, errs[1].reason) == ("read", "corrupt_tar")


def test_expand_tar_missing_and_not_a_tar(tmp_path) -> None:
    junk = tmp_path / "junk.tar"
    junk.write_bytes(b"this is not a tar archive" * 40)
    missing = str(tmp_path / "missing.tar")
    out = expand_tar(_batch(missing, str(junk)))
    assert out[S.URI].tolist() == [missing, str(junk)]
    assert [(e.stage, e.reason) for e in row_errors.read(out)] == [("read", "read_failed"), ("read", "corrupt_tar")]


def test_read_files(tmp_path) -> None:
    good = tmp_path / "a.jpg"
    good.write_bytes(b"\xff\xd8abc")
    missing = str(tmp_path / "nope.jpg")
    out = read_files(_batch(str(good), missing))
    assert out[S.URI].tolist() == [str(good), missing]
    errs = row_errors.read(out)
    assert out[S.BYTES][0] == b"\xff\xd8abc" and errs[0] is None
    assert out[S.BYTES][1] == b""
    assert (errs[1].stage, errs[1].reason) == ("read", "not_found")
