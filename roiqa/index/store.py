"""The published index layout: versions/<id>/{embeddings/, faiss.index, [hubness.parquet,] errors.parquet,
sources.parquet, manifest.json} + CURRENT, the runs table (runs/<run_id>.parquet) and the writers' LOCK
(roiqa.index.lock)."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.parquet as pq

from roiqa import schema as S
from roiqa.index import faiss_index
from roiqa.index.lock import LOCK, IndexBusy, IndexLock, LockLost  # noqa: F401 - part of this module's API
from roiqa.io import uri as uri_mod

CURRENT = "CURRENT"
VERSIONS = "versions"
EMBEDDINGS = "embeddings"
FAISS = "faiss.index"
ERRORS = "errors.parquet"
MANIFEST = "manifest.json"
MASKS_CONTROLLER = "masks_controller.parquet"  # the masks stage's threshold controller history (when masks are on)
HUBNESS = "hubness.parquet"  # the hubness reference of a region index (roiqa.index.hubness), when it has one
SOURCES = "sources.parquet"  # listed URI -> signature, what `roiqa reindex` compares against
RUNS = "runs"  # runs/<run_id>.parquet: one row per index / reindex run


def version_uri(root: str, version: str, *parts: str) -> str:
    """URI of a file or folder inside one version of the index at `root`."""
    return uri_mod.join(root, VERSIONS, version, *parts)


def current_version(root: str) -> str | None:
    """The published version named by `root`/CURRENT, or None when nothing is published yet."""
    pointer = uri_mod.join(root, CURRENT)
    if not uri_mod.exists(pointer):
        return None
    name = uri_mod.read_bytes(pointer).decode("utf-8").strip()
    if not name or "/" in name or name.startswith("."):
        raise ValueError(f"{pointer}: does not name a version: {name!r}")
    return name


def publish(root: str, version: str, lock: IndexLock | None = None) -> None:
    """Make `version` the published one: replace CURRENT last and atomically (readers see old or new, never half).
    With the writer's `lock`, first confirm that the run still holds it (LockLost otherwise)."""
    if not uri_mod.exists(version_uri(root, version, MANIFEST)):
        raise ValueError(f"{root}: version {version} has no manifest; refusing to publish it")
    if lock is not None:
        lock.confirm()
    uri_mod.write_atomic(uri_mod.join(root, CURRENT), (version + "\n").encode("utf-8"))


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def write_table(table: pa.Table, uri: str) -> bytes:
    """Write one Parquet file to `uri`; returns its bytes (for checksums)."""
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    data = sink.getvalue().to_pybytes()
    uri_mod.write_bytes(uri, data)
    return data


def read_table(uri: str) -> pa.Table:
    """Read one Parquet file or a folder of them through fsspec (retried while the store is unreachable)."""

    def read() -> pa.Table:
        fs, path = uri_mod.filesystem(uri)
        if fs.isdir(path):
            return pq.read_table(path, filesystem=fs)
        with fs.open(path, "rb") as f:
            return pq.read_table(f)

    return uri_mod.retrying(uri, "read", read)


def write_manifest(root: str, version: str, manifest: dict) -> None:
    uri_mod.write_bytes(version_uri(root, version, MANIFEST), json.dumps(manifest, indent=2, sort_keys=True).encode())


def read_manifest(root: str, version: str) -> dict:
    return json.loads(uri_mod.read_bytes(version_uri(root, version, MANIFEST)))


@dataclass(frozen=True)
class IndexVersion:
    """One published version of an index, opened for reading."""

    root: str  # the index URI
    version: str  # version id under versions/
    manifest: dict  # manifest.json contents

    def uri(self, *parts: str) -> str:
        return version_uri(self.root, self.version, *parts)

    def embeddings(self, columns: list[str] | None = None) -> pa.Table:
        return read_table(self.uri(EMBEDDINGS)).select(columns) if columns else read_table(self.uri(EMBEDDINGS))

    def errors(self) -> pa.Table:
        return read_table(self.uri(ERRORS))

    def faiss(self):
        """The faiss index, checked against the manifest's checksum before it is deserialised."""
        expected = (self.manifest.get("checksums") or {}).get(FAISS)
        if not isinstance(expected, str) or len(expected) != 64:
            raise ValueError(
                f"{self.uri(MANIFEST)}: no sha256 checksum of {FAISS}; an index without one is not trusted "
                "(re-index to write a complete manifest)"
            )
        data = uri_mod.read_bytes(self.uri(FAISS))
        if sha256(data) != expected:
            raise ValueError(f"{self.uri(FAISS)}: checksum mismatch with the manifest; the index is damaged")
        return faiss_index.deserialize(data, self.uri(FAISS))

    def hubness_reference(self) -> pa.Table | None:
        """The hubness reference (roiqa.index.hubness.REFERENCE_SCHEMA) of a version indexed with one, checked against
        the manifest's checksum; None for a version without one."""
        if not self.manifest.get("hubness"):
            return None
        expected = (self.manifest.get("checksums") or {}).get(HUBNESS)
        data = uri_mod.read_bytes(self.uri(HUBNESS))
        if sha256(data) != expected:
            raise ValueError(f"{self.uri(HUBNESS)}: checksum mismatch with the manifest; the index is damaged")
        return pq.read_table(pa.BufferReader(data))


def open_index(root: str, version: str | None = None) -> IndexVersion:
    """Open the published version of the index at `root` (or a named `version`)."""
    version = version or current_version(root)
    if version is None:
        raise FileNotFoundError(f"{root}: no published index (no {CURRENT} file); run `roiqa index` first")
    return IndexVersion(root=uri_mod.normalize(root), version=version, manifest=read_manifest(root, version))


def list_versions(root: str) -> list[str]:
    """Version ids present under `root`/versions, oldest first."""
    uri = uri_mod.join(root, VERSIONS)
    fs, path = uri_mod.filesystem(uri)
    if not uri_mod.retrying(uri, "exists", fs.exists, path):
        return []
    return sorted(p.rstrip("/").rsplit("/", 1)[-1] for p in uri_mod.retrying(uri, "list", fs.ls, path, detail=False))


def image_uris(version: IndexVersion) -> dict[int, str]:
    """{image_id: uri} of the indexed images."""
    t = version.embeddings([S.IMAGE_ID, S.URI])
    return dict(zip(t.column(S.IMAGE_ID).to_pylist(), t.column(S.URI).to_pylist()))


def published_chain(root: str, limit: int | None = None) -> list[str]:
    """The published versions, newest first: CURRENT, then each manifest's `parent` (what CURRENT was before)."""
    out: list[str] = []
    version = current_version(root)
    while version and (limit is None or len(out) < limit) and version not in out:
        if not uri_mod.exists(version_uri(root, version, MANIFEST)):
            break  # an older version already garbage-collected ends the chain
        out.append(version)
        version = read_manifest(root, version).get("parent")
    return out


def collect_garbage(root: str, keep: int, lock: IndexLock | None = None) -> list[str]:
    """Delete every version folder but the newest `keep` published ones (unpublished leftovers of failed runs
    included); returns the deleted ids. Only the lock holder may call it (a writer's new version is not yet kept):
    with its `lock`, it first confirms that the run still holds it (LockLost otherwise)."""
    if keep < 1:
        raise ValueError(f"keep_versions must be >= 1, got {keep}")
    if lock is not None:
        lock.confirm()
    kept = set(published_chain(root, keep))
    if not kept:
        return []
    doomed = [v for v in list_versions(root) if v not in kept]
    for v in doomed:
        uri_mod.delete(version_uri(root, v), recursive=True)
    return doomed


def write_run(root: str, row: dict) -> None:
    """Append one row to the index's runs table (runs/<run_id>.parquet); missing columns are null."""
    cols = {f.name: pa.array([row.get(f.name)], f.type) for f in S.RUNS_SCHEMA}
    write_table(pa.table(cols, schema=S.RUNS_SCHEMA), uri_mod.join(root, RUNS, f"{row[S.RUN_ID]}.parquet"))


def read_runs(root: str) -> pa.Table:
    """Every run recorded for the index at `root`, oldest first (an empty table when there is none)."""
    return uri_mod.retrying(uri_mod.join(root, RUNS), "read", _read_runs, root)


def _read_runs(root: str) -> pa.Table:
    fs, path = uri_mod.filesystem(uri_mod.join(root, RUNS))
    if not fs.exists(path):
        return S.RUNS_SCHEMA.empty_table()
    files = sorted(p for p in fs.ls(path, detail=False) if p.endswith(".parquet"))
    tables = []
    for p in files:
        with fs.open(p, "rb") as f:
            tables.append(pq.read_table(f).cast(S.RUNS_SCHEMA))
    return pa.concat_tables([S.RUNS_SCHEMA.empty_table(), *tables]).sort_by(S.RUN_ID)
