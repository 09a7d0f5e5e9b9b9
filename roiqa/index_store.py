"""The published index layout: versions/<id>/{embeddings/, faiss.index, errors.parquet, sources.parquet,
manifest.json} + CURRENT, the runs table (runs/<run_id>.parquet) and the writers' LOCK."""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import socket
import time
import uuid
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.parquet as pq

from roiqa import faiss_index
from roiqa import schema as S
from roiqa import uri as uri_mod

CURRENT = "CURRENT"
VERSIONS = "versions"
EMBEDDINGS = "embeddings"
FAISS = "faiss.index"
ERRORS = "errors.parquet"
MANIFEST = "manifest.json"
MASKS_CONTROLLER = "masks_controller.parquet"  # the masks stage's threshold controller history (when masks are on)
SOURCES = "sources.parquet"  # listed URI -> signature, what `roiqa reindex` compares against
RUNS = "runs"  # runs/<run_id>.parquet: one row per index / reindex run
LOCK = "LOCK"  # held by the one writer of an index (index, reindex) while it runs


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


def publish(root: str, version: str) -> None:
    """Make `version` the published one: replace CURRENT last and atomically (readers see old or new, never half)."""
    if not uri_mod.exists(version_uri(root, version, MANIFEST)):
        raise ValueError(f"{root}: version {version} has no manifest; refusing to publish it")
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
    """Read one Parquet file or a folder of them through fsspec."""
    fs, path = uri_mod.filesystem(uri)
    if fs.isdir(path):
        return pq.read_table(path, filesystem=fs)
    with fs.open(path, "rb") as f:
        return pq.read_table(f)


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


def open_index(root: str, version: str | None = None) -> IndexVersion:
    """Open the published version of the index at `root` (or a named `version`)."""
    version = version or current_version(root)
    if version is None:
        raise FileNotFoundError(f"{root}: no published index (no {CURRENT} file); run `roiqa index` first")
    return IndexVersion(root=uri_mod.normalize(root), version=version, manifest=read_manifest(root, version))


def list_versions(root: str) -> list[str]:
    """Version ids present under `root`/versions, oldest first."""
    fs, path = uri_mod.filesystem(uri_mod.join(root, VERSIONS))
    if not fs.exists(path):
        return []
    return sorted(p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(path, detail=False))


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


def collect_garbage(root: str, keep: int) -> list[str]:
    """Delete every version folder but the newest `keep` published ones (unpublished leftovers of failed runs
    included); returns the deleted ids. Only the lock holder may call it (a writer's new version is not yet kept)."""
    if keep < 1:
        raise ValueError(f"keep_versions must be >= 1, got {keep}")
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
    fs, path = uri_mod.filesystem(uri_mod.join(root, RUNS))
    if not fs.exists(path):
        return S.RUNS_SCHEMA.empty_table()
    files = sorted(p for p in fs.ls(path, detail=False) if p.endswith(".parquet"))
    tables = []
    for p in files:
        with fs.open(p, "rb") as f:
            tables.append(pq.read_table(f).cast(S.RUNS_SCHEMA))
    return pa.concat_tables([S.RUNS_SCHEMA.empty_table(), *tables]).sort_by(S.RUN_ID)


class IndexBusy(ValueError):
    """Another writer holds the index's lock."""


_HELD: set[str] = set()  # owners of the locks this process holds now


class IndexLock:
    """The one-writer lock of an index: `LOCK` = {owner, host, pid, acquired, expires}.

    A lock is stale, and taken over, when it has expired (`ttl_s`), when its holder ran on this host and that
    process is gone, or when it was taken by this very process and is no longer held (a run whose release failed
    because the store was down). Overlapping scheduled runs (a nightly job that ran long) fail fast with IndexBusy.
    """

    def __init__(self, root: str, ttl_s: float, what: str = "index"):
        self.uri = uri_mod.join(root, LOCK)
        self.ttl_s, self.what = float(ttl_s), what
        self.owner = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"

    def _body(self) -> bytes:
        now = time.time()
        return json.dumps(
            {
                "owner": self.owner,
                "what": self.what,
                "host": socket.gethostname(),
                "pid": os.getpid(),
                "acquired": now,
                "expires": now + self.ttl_s,
                "acquired_utc": datetime.datetime.fromtimestamp(now, datetime.timezone.utc).isoformat(),
            }
        ).encode()

    def held(self) -> dict | None:
        """The current holder's record, or None when the index is not locked."""
        try:
            return json.loads(uri_mod.read_bytes(self.uri))
        except FileNotFoundError:
            return None
        except ValueError:
            return {"owner": "?", "expires": 0}  # unreadable: treat as expired

    @staticmethod
    def stale(holder: dict) -> bool:
        if float(holder.get("expires", 0)) < time.time():
            return True
        if holder.get("host") == socket.gethostname():
            if holder.get("pid") == os.getpid():
                return holder.get("owner") not in _HELD
            try:
                os.kill(int(holder.get("pid", -1)), 0)
            except ProcessLookupError:
                return True
            except (PermissionError, ValueError, OverflowError):
                return False
        return False

    def __enter__(self) -> IndexLock:
        for _ in range(3):
            if uri_mod.create_exclusive(self.uri, self._body()):
                holder = self.held()
                if holder and holder.get("owner") == self.owner:
                    _HELD.add(self.owner)
                    return self
            holder = self.held()
            if holder is None:
                continue
            if not self.stale(holder):
                raise IndexBusy(
                    f"{self.uri}: the index is locked by {holder.get('what', 'a writer')} {holder.get('owner')} "
                    f"since {holder.get('acquired_utc', '?')} (until {holder.get('expires')}); another run is "
                    "writing it. If that run died on another host, delete the LOCK file"
                )
            uri_mod.delete(self.uri)  # stale: the holder died or overran its lease
        raise IndexBusy(f"{self.uri}: could not take the index lock (contended)")

    def __exit__(self, exc_type, exc, tb) -> None:
        _HELD.discard(self.owner)
        try:
            holder = self.held()
            if holder and holder.get("owner") == self.owner:
                uri_mod.delete(self.uri)
        except uri_mod.StorageUnavailable:
            if exc is None:
                raise
            # the run is failing anyway (often for the same reason): keep its error; the lock is stale from now on
