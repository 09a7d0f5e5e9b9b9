"""Listing an images URI (a folder or prefix of images, WebDataset .tar shards, or a Parquet manifest) into the
URIs an index run reads, with what identifies each one's stored version."""

from __future__ import annotations

from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.parquet as pq

from roiqa import schema as S
from roiqa.errors import RowError
from roiqa.io import uri as uri_mod
from roiqa.io.redact import has_credentials, redact


@dataclass(frozen=True)
class Listing:
    """What an images URI expands to before any bytes are read."""

    kind: str  # "files" (images and/or .tar shards) or "manifest"
    uris: list[str]  # image file URIs and shard URIs to read
    errors: list[tuple[str, RowError]]  # (uri, why) found while listing (duplicates in a manifest, ...)
    # {uri: what identifies its stored version (ETag, or size + mtime); None: listed but not found}
    signatures: dict[str, str | None] = field(default_factory=dict)
    sizes: dict[str, int | None] = field(default_factory=dict)  # {uri: bytes when the listing says; None: unknown}


# The rows the listing itself gives, (reason, message), made anew every run. Other stages give some of the same
# reasons (a tar member name that appears twice is also `duplicate_uri`) with other messages.
LISTING_ERRORS = {
    "empty_uri": "manifest row without a uri",
    "duplicate_uri": "listed more than once in the manifest",
    "undecodable_name": "file name is not valid UTF-8 (its bytes are shown as \\xNN); rename it to index it",
    "signed_uri": "the URL carries credentials (a signature, token or user:password) that the index would store; "
    "list the object's own URI and give credentials through the environment",
}
LISTING_REASONS = tuple(LISTING_ERRORS)


def listing_error(uri: str, reason: str) -> tuple[str, RowError]:
    """A (uri, error) the listing gives."""
    return uri, RowError("read", reason, LISTING_ERRORS[reason])


def listing_made(reason: str, message: str) -> bool:
    """True for an errors-table row that the listing gave (not carried over by a re-index: listed anew)."""
    return LISTING_ERRORS.get(reason) == message


def list_images(images: str, allowed_prefixes: tuple[str, ...] = ()) -> Listing:
    """Expand `images` into the URIs to read; a Parquet file (or folder of only Parquet files) is a manifest.

    A manifest may only point inside `allowed_prefixes` (default: the manifest's own folder); one row outside
    refuses the whole manifest.
    """
    if images.lower().endswith(".parquet"):
        return _manifest(images, allowed_prefixes)
    found = uri_mod.list_infos(images, uri_mod.IMAGE_EXTENSIONS + uri_mod.TAR_EXTENSIONS + (".parquet",))
    files = sorted(found)
    parquet = [f for f in files if f.lower().endswith(".parquet")]
    if parquet and len(parquet) == len(files):
        return _manifest(images, allowed_prefixes)
    files = [f for f in files if not f.lower().endswith(".parquet")]
    if not files:
        raise ValueError(f"{images}: no images ({', '.join(uri_mod.IMAGE_EXTENSIONS)}) or .tar shards found")
    # A name that is not UTF-8 cannot be a Parquet string nor give an image id: a row shows its bytes escaped.
    errors = [listing_error(uri_mod.printable(f), "undecodable_name") for f in files if uri_mod.undecodable(f)]
    files = [f for f in files if not uri_mod.undecodable(f)]
    return Listing(
        kind="files",
        uris=files,
        errors=errors,
        signatures={f: uri_mod.signature(found[f]) for f in files},
        sizes={f: _size(found[f]) for f in files},
    )


def _size(info: dict | None) -> int | None:
    size = (info or {}).get("size")
    return int(size) if isinstance(size, int) and size >= 0 else None


def _manifest(uri: str, allowed_prefixes: tuple[str, ...] = ()) -> Listing:
    """A Parquet manifest with a `uri` column; relative URIs are resolved against the manifest's folder."""
    fs, path = uri_mod.filesystem(uri)
    folder = uri_mod.retrying(uri, "stat", fs.isdir, path)
    table = uri_mod.retrying(
        uri, "read", lambda: pq.read_table(path, filesystem=fs, columns=[S.URI]) if folder else _read_one(fs, path)
    )
    if S.URI not in table.column_names:
        raise ValueError(f"{uri}: a manifest needs a {S.URI!r} column; has {table.column_names}")
    base = uri_mod.normalize(uri) if folder else uri_mod.normalize(uri).rsplit("/", 1)[0]
    allowed = tuple(allowed_prefixes) or (base,)
    seen: set[str] = set()
    uris, errors = [], []
    for row, raw in enumerate(table.column(S.URI).to_pylist()):
        if not raw:
            errors.append(listing_error(str(raw), "empty_uri"))
            continue
        u = uri_mod.normalize(raw if ("://" in raw or raw.startswith("/")) else uri_mod.join(base, raw))
        if not any(uri_mod.inside(u, p) for p in allowed):
            raise ValueError(
                f"{uri}: row {row} points outside the allowed prefixes {list(allowed)}: {raw!r}; refusing the "
                "manifest (index.allowed_prefixes lists where a manifest may point)"
            )
        if has_credentials(u):  # stored in embeddings/ and sources.parquet otherwise; read later by the rerank
            errors.append(listing_error(redact(u), "signed_uri"))
            continue
        if u in seen:
            errors.append(listing_error(u, "duplicate_uri"))
            continue
        seen.add(u)
        uris.append(u)
    infos = uri_mod.stat_infos(uris)
    return Listing(
        kind="manifest",
        uris=uris,
        errors=errors,
        signatures={u: None if i is None else uri_mod.signature(i) for u, i in infos.items()},
        # a member's size is in its shard's tar header, not in the shard's info
        sizes={u: None if uri_mod.split_member(u)[1] is not None else _size(i) for u, i in infos.items()},
    )


def _read_one(fs, path: str) -> pa.Table:
    with fs.open(path, "rb") as f:
        return pq.read_table(f, columns=[S.URI])
