"""Listing an images URI (folder/prefix of images, WebDataset .tar shards, or a Parquet manifest) into Ray Data."""

from __future__ import annotations

from dataclasses import dataclass

import pyarrow as pa
import pyarrow.parquet as pq
import ray

from roiqa import schema as S
from roiqa import uri as uri_mod
from roiqa.sources import error_string


@dataclass(frozen=True)
class Listing:
    """What an images URI expands to before any bytes are read."""

    kind: str  # "files" (images and/or .tar shards) or "manifest"
    uris: list[str]  # image file URIs and shard URIs to read
    errors: list[tuple[str, str]]  # (uri, error string) found while listing (duplicates in a manifest, ...)


def list_images(images: str) -> Listing:
    """Expand `images` into the URIs to read; a Parquet file (or folder of only Parquet files) is a manifest."""
    if images.lower().endswith(".parquet"):
        return _manifest(images)
    files = uri_mod.list_files(images, uri_mod.IMAGE_EXTENSIONS + uri_mod.TAR_EXTENSIONS + (".parquet",))
    parquet = [f for f in files if f.lower().endswith(".parquet")]
    if parquet and len(parquet) == len(files):
        return _manifest(images)
    files = [f for f in files if not f.lower().endswith(".parquet")]
    if not files:
        raise ValueError(f"{images}: no images ({', '.join(uri_mod.IMAGE_EXTENSIONS)}) or .tar shards found")
    return Listing(kind="files", uris=files, errors=[])


def _manifest(uri: str) -> Listing:
    """A Parquet manifest with a `uri` column; relative URIs are resolved against the manifest's folder."""
    fs, path = uri_mod.filesystem(uri)
    table = pq.read_table(path, filesystem=fs, columns=[S.URI]) if fs.isdir(path) else _read_one(fs, path)
    if S.URI not in table.column_names:
        raise ValueError(f"{uri}: a manifest needs a {S.URI!r} column; has {table.column_names}")
    base = uri_mod.normalize(uri) if fs.isdir(path) else uri_mod.normalize(uri).rsplit("/", 1)[0]
    seen: set[str] = set()
    uris, errors = [], []
    for raw in table.column(S.URI).to_pylist():
        if not raw:
            errors.append((str(raw), error_string("read", "empty_uri", "manifest row without a uri")))
            continue
        u = uri_mod.normalize(raw if ("://" in raw or raw.startswith("/")) else uri_mod.join(base, raw))
        if u in seen:
            errors.append((u, error_string("read", "duplicate_uri", "listed more than once in the manifest")))
            continue
        seen.add(u)
        uris.append(u)
    return Listing(kind="manifest", uris=uris, errors=errors)


def _read_one(fs, path: str) -> pa.Table:
    with fs.open(path, "rb") as f:
        return pq.read_table(f, columns=[S.URI])


def uri_dataset(uris: list[str], rows_per_block: int) -> ray.data.Dataset:
    """A dataset of {uri} rows split into blocks of `rows_per_block`, so reading runs in parallel tasks."""
    step = max(1, rows_per_block)
    tables = [pa.table({S.URI: pa.array(uris[i : i + step], pa.string())}) for i in range(0, len(uris), step)]
    return ray.data.from_arrow(tables or [pa.table({S.URI: pa.array([], pa.string())})])
