"""The faiss index of a version is deserialised only after its sha256 matches the manifest's; a manifest without
that checksum (or with a malformed one) is refused, not trusted."""

from __future__ import annotations

import numpy as np
import pytest

from roiqa import faiss_index
from roiqa import index_store as store


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
