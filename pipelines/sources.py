"""Listing an images URI (folder/prefix of images, WebDataset .tar shards, or a Parquet manifest) into Ray Data."""

from __future__ import annotations

from dataclasses import dataclass, field

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
    # {uri: what identifies its stored version (ETag, or size + mtime); None: listed but not found}
    signatures: dict[str, str | None] = field(default_factory=dict)


LISTING_REASONS = ("empty_uri", "duplicate_uri")  # error reasons the listing itself gives (made anew every run)


def list_images(images: str, allowed_prefixes: tuple[str, ...] = ()) -> Listing:
    """Expand `images` into the URIs to read; a Parquet file (or folder of only Parquet files) is a manifest.

    A manifest may only point inside `allowed_prefixes` (default: the manifest's own folder); one row outside
    refuses the whole manifest.
    """
    if images.lower().endswith(".parquet"):
        return _manifest(images, allowed_prefixes)
    found = uri_mod.list_signatures(images, uri_mod.IMAGE_EXTENSIONS + uri_mod.TAR_EXTENSIONS + (".parquet",))
    files = sorted(found)
    parquet = [f for f in files if f.lower().endswith(".parquet")]
    if parquet and len(parquet) == len(files):
        return _manifest(images, allowed_prefixes)
    files = [f for f in files if not f.lower().endswith(".parquet")]
    if not files:
        raise ValueError(f"{images}: no images ({', '.join(uri_mod.IMAGE_EXTENSIONS)}) or .tar shards found")
    return Listing(kind="files", uris=files, errors=[], signatures={f: found[f] for f in files})


def _manifest(uri: str, allowed_prefixes: tuple[str, ...] = ()) -> Listing:
    """A Parquet manifest with a `uri` column; relative URIs are resolved against the manifest's folder."""
    fs, path = uri_mod.filesystem(uri)
    table = pq.read_table(path, filesystem=fs, columns=[S.URI]) if fs.isdir(path) else _read_one(fs, path)
    if S.URI not in table.column_names:
        raise ValueError(f"{uri}: a manifest needs a {S.URI!r} column; has {table.column_names}")
    base = uri_mod.normalize(uri) if fs.isdir(path) else uri_mod.normalize(uri).rsplit("/", 1)[0]
    allowed = tuple(allowed_prefixes) or (base,)
    seen: set[str] = set()
    uris, errors = [], []
    for row, raw in enumerate(table.column(S.URI).to_pylist()):
        if not raw:
            errors.append((str(raw), error_string("read", "empty_uri", "manifest row without a uri")))
            continue
        u = uri_mod.normalize(raw if ("://" in raw or raw.startswith("/")) else uri_mod.join(base, raw))
        if not any(uri_mod.inside(u, p) for p in allowed):
            raise ValueError(
                f"{uri}: row {row} points outside the allowed prefixes {list(allowed)}: {raw!r}; refusing the "
                "manifest (index.allowed_prefixes lists where a manifest may point)"
            )
        if u in seen:
            errors.append((u, error_string("read", "duplicate_uri", "listed more than once in the manifest")))
            continue
        seen.add(u)
        uris.append(u)
    return Listing(kind="manifest", uris=uris, errors=errors, signatures=uri_mod.stat_signatures(uris))


def _read_one(fs, path: str) -> pa.Table:
    with fs.open(path, "rb") as f:
        return pq.read_table(f, columns=[S.URI])


def uri_dataset(uris: list[str], rows_per_block: int) -> ray.data.Dataset:
    """A dataset of {uri} rows split into blocks of `rows_per_block`, so reading runs in parallel tasks."""
    step = max(1, rows_per_block)
    tables = [pa.table({S.URI: pa.array(uris[i : i + step], pa.string())}) for i in range(0, len(uris), step)]
    return ray.data.from_arrow(tables or [pa.table({S.URI: pa.array([], pa.string())})])
