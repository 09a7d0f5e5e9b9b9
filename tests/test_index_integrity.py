"""The faiss index of a version is deserialised only after its sha256 matches the manifest's; a manifest without
that checksum (or with a malformed one) is refused, not trusted."""

from __future__ import annotations

import os

import numpy as np
import pytest

from roiqa.index import faiss_index, store


def _version(root: str, checksums: dict | None) -> store.IndexVersion:
    rng = np.random.default_rng(0)
    index = faiss_index.build_index(rng.standard_normal((20, 8)).astype(np.float32), np.arange(20), "Flat")
    data = faiss_index.save(index, store.version_uri(root, "v1", store.FAISS))
    manifest = {"model": {}, "config": {}}
    if checksums is not None:
        manifest["checksums"] = {k: (store.sha256(data) if v == "right" else v) for k, v in checksums.items()}
    store.write_manifest(root, "v1", manifest)
    store.publish(root, "v1")
    return store.open_index(root)


def test_a_matching_checksum_opens_the_index(tmp_path):
    assert _version(str(tmp_path), {store.FAISS: "right"}).faiss().ntotal == 20


@pytest.mark.parametrize(
    "checksums",
    [None, {}, {store.FAISS: ""}, {store.FAISS: None}, {store.FAISS: "abc"}, {store.ERRORS: "right"}],
    ids=["no-checksums", "empty", "empty-string", "null", "malformed", "other-file-only"],
)
def test_a_manifest_without_the_faiss_checksum_is_refused(tmp_path, checksums):
    version = _version(str(tmp_path), checksums)
    with pytest.raises(ValueError, match=r"manifest\.json: no sha256 checksum of faiss\.index; .* not trusted"):
        version.faiss()


def test_a_changed_index_file_is_refused(tmp_path):
    version = _version(str(tmp_path), {store.FAISS: "right"})
    with open(version.uri(store.FAISS), "ab") as f:
        f.write(b"\0")
    with pytest.raises(ValueError, match="checksum mismatch with the manifest"):
        version.faiss()


def test_account_inputs_worked_example():
    from roiqa.io.sources import account_inputs

    listed = ["/d/a.jpg", "/d/b.jpg", "/d/s.tar", "/d/t.tar"]
    indexed = ["/d/a.jpg", "/d/s.tar#1.jpg", "/d/s.tar#2.jpg"]
    errors = [("/d/b.jpg", "corrupt"), ("/d/s.tar#3.jpg", "too_large"), ("/d/t.tar", "corrupt_tar")]
    errors += [("/d/s.tar#1.jpg", "duplicate_uri")]  # the shard held two members named 1.jpg; the last is read
    # 4 listed + 2 rows the listing refused; inputs: a, b, 4 members, shard t, and the 2 refused rows
    assert account_inputs(listed, 2, indexed, errors) == {"listed": 6, "inputs": 9, "indexed": 3, "errors": 6}
    # a URI that only duplicate_uri rows stand for (two inputs read as one URI) is accounted for
    assert account_inputs(["/d/x.jpg"], 0, [], [("/d/x.jpg", "duplicate_uri")])["errors"] == 1


@pytest.mark.parametrize(
    "indexed, errors, what",
    [
        (["/d/a.jpg", "/d/s.tar#1.jpg"], [], r"lost 1: \['/d/b.jpg'\]"),  # b vanished between stages
        (["/d/a.jpg", "/d/b.jpg"], [], r"lost 1: \['/d/s.tar'\]"),  # a shard with no row at all
        (["/d/a.jpg", "/d/b.jpg", "/d/s.tar#1.jpg"], [("/d/a.jpg", "corrupt")], r"repeated 1: \['/d/a.jpg'\]"),
        (["/d/a.jpg", "/d/b.jpg", "/d/s.tar#1.jpg", "/d/s.tar#1.jpg"], [], r"repeated 1: \['/d/s.tar#1.jpg'\]"),
        (["/d/a.jpg", "/d/b.jpg", "/d/s.tar#1.jpg", "/e/x.jpg"], [], r"not listed 1: \['/e/x.jpg'\]"),
    ],
    ids=["lost-file", "lost-shard", "file-twice", "member-twice", "not-listed"],
)
def test_account_inputs_refuses_rows_that_do_not_match_the_listing(indexed, errors, what):
    from roiqa.io.sources import InputsLost, account_inputs

    with pytest.raises(InputsLost, match=what):
        account_inputs(["/d/a.jpg", "/d/b.jpg", "/d/s.tar"], 0, indexed, errors)


@pytest.mark.usefixtures("ray_local")
def test_an_input_lost_between_listing_and_publishing_fails_the_run(collection, tiny_cfg, tmp_path):
    """The embedding stage is given one input fewer than the listing holds (as a dropped block would): the version
    is not published and the error names the lost image."""
    from pipelines.index import embed_uris
    from roiqa.index.version import plan, write_version
    from roiqa.io.sources import InputsLost

    index = str(tmp_path / "index")
    p = plan(collection.gallery_dir, index, tiny_cfg, None)
    done = embed_uris(p, p.listing.uris[1:], tiny_cfg, None)
    with pytest.raises(InputsLost, match=f"lost 1: .*{os.path.basename(p.listing.uris[0])}"):
        write_version(p, tiny_cfg, done)
    assert store.current_version(index) is None


@pytest.mark.usefixtures("ray_local")
def test_signed_urls_in_a_manifest_are_rows_and_their_credentials_are_stored_nowhere(collection, tiny_cfg, tmp_path):
    """A manifest row whose URL carries a signature is a `signed_uri` row (the index would store
    the URL in embeddings/ and sources.parquet, and read it again at query time); the rest is indexed; no file of the
    index holds the credentials."""
    import dataclasses
    import glob
    import shutil

    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipelines.index import run_index
    from roiqa import schema as S

    sig, key = "SIG" + "5e1f" * 8, "AKIA" + "ROWKEY0123"
    data = tmp_path / "data"
    data.mkdir()
    good = sorted(glob.glob(os.path.join(collection.gallery_dir, "*")))[:2]
    for f in good:
        shutil.copy(f, data)
    signed = [
        f"https://store.example/bucket/x.jpg?X-Amz-Algorithm=AWS4&X-Amz-Credential={key}&X-Amz-Signature={sig}",
        f"https://store.example/bucket/y.jpg?sv=2024&sig={sig}",
    ]  # user:password@ in a URL is outside every allowed prefix: it refuses the manifest (test_storage_faults)
    rows = [os.path.basename(f) for f in good] + signed
    pq.write_table(pa.table({S.URI: rows}), data / "m.parquet")
    allowed = (str(data), "https://store.example/bucket")
    cfg = dataclasses.replace(tiny_cfg, index=dataclasses.replace(tiny_cfg.index, allowed_prefixes=allowed))
    index = str(tmp_path / "index")
    report = run_index(str(data / "m.parquet"), index, cfg)
    assert (report.indexed, report.errors) == (2, 2)
    err = store.open_index(index).errors().to_pydict()
    assert err[S.REASON] == ["signed_uri"] * 2 and all("***" in u for u in err[S.URI])
    leaks = []
    for path in glob.glob(os.path.join(index, "**", "*"), recursive=True):
        if os.path.isfile(path):
            body = open(path, "rb").read()
            leaks += [f"{path}: {s}" for s in (sig, key) if s.encode() in body]
    assert not leaks
