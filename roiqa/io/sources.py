"""Per-batch readers of image sources: file URIs -> bytes, WebDataset tar shards -> members; failures become rows."""

from __future__ import annotations

import hashlib
import posixpath
import tarfile

import numpy as np

from roiqa import schema as S
from roiqa.errors import RowError, columns
from roiqa.io import uri as uri_mod
from roiqa.io.uri import IMAGE_EXTENSIONS


def content_hash(data: bytes) -> str:
    """BLAKE2b-128 of encoded bytes, hex: identifies unchanged content across re-indexing."""
    return hashlib.blake2b(data, digest_size=16).hexdigest()


def safe_member_name(name: str) -> bool:
    """False for absolute paths, '..' components and other names that could escape an extraction folder."""
    if not name or name.startswith(("/", "\\")) or "\\" in name or ":" in name.split("/")[0]:
        return False
    return ".." not in posixpath.normpath(name).split("/") and not posixpath.normpath(name).startswith("..")


def object_array(values: list) -> np.ndarray:
    """A 1-D object array of `values` (bytes, strings, lists), never broadcast into more dimensions."""
    out = np.empty(len(values), dtype=object)
    out[:] = values
    return out


def _rows(uris: list[str], payloads: list[bytes], errors: list[RowError | None]) -> dict[str, np.ndarray]:
    return {S.URI: object_array(uris), S.BYTES: object_array(payloads), **columns(errors)}


def read_files(batch: dict[str, np.ndarray], max_bytes: int | None = None) -> dict[str, np.ndarray]:
    """{uri[, size_bytes]} -> {uri, bytes, error columns}: each URI's bytes, or an error row (stage "read") when
    it cannot be read.

    With `max_bytes`, an input over it is a `too_large` row and is not read: decided from the listed `size_bytes`
    when the batch has it (>= 0), else by reading no more than `max_bytes + 1` bytes.
    """
    uris, payloads, errors = [], [], []
    sizes = batch.get(S.SIZE_BYTES)
    for i, u in enumerate(batch[S.URI]):
        u = str(u)
        listed = int(sizes[i]) if sizes is not None else -1
        try:
            if max_bytes is not None and listed > max_bytes:
                raise uri_mod.TooLarge(u, listed, max_bytes)
            data = uri_mod.read_bytes(u, max_bytes if listed < 0 else None)
            err = None
        except FileNotFoundError:
            data, err = b"", RowError("read", "not_found", "no such file or object")
        except uri_mod.TooLarge as exc:
            data, err = b"", RowError("read", "too_large", f"{exc.message} (index.max_image_bytes); not read")
        except uri_mod.StorageUnavailable:
            raise  # the store is down, not the input bad: fail the run (nothing is published) rather than record it
        except Exception as exc:  # noqa: BLE001 - any other storage failure is recorded against its input
            data, err = b"", RowError.raised("read", "read_failed", exc)
        uris.append(u)
        payloads.append(data)
        errors.append(err)
    return _rows(uris, payloads, errors)


def expand_tar(batch: dict[str, np.ndarray], max_bytes: int | None = None) -> dict[str, np.ndarray]:
    """{uri of .tar shards} -> one row per image member, URI `<shard>#<member>` (WebDataset layout).

    Each shard is streamed from its store (headers, then each member's data on its own; never the whole shard in
    memory). Members with image extensions are yielded; other members (.json, .txt, ...) belong to the sample but
    are not images. Error rows (stage "read"): `unsafe_member` (absolute names, '..'), `not_a_file`, `too_large`
    (the tar header says more than `max_bytes`; not read), `undecodable_name` (not UTF-8; the URI shows the bytes
    as \\xNN) and `duplicate_uri` for every copy of a name but the last (the one tar extraction and
    `roiqa.io.uri.read_bytes` give). A shard that cannot be opened, or that is corrupt or truncated part-way, gives an
    error row for the shard itself after the members read before the damage.
    """
    uris, payloads, errors = [], [], []
    for shard in batch[S.URI]:
        shard = str(shard)
        try:
            rows = uri_mod.retrying(shard, "read", _expand_one, shard, max_bytes)
        except uri_mod.StorageUnavailable:
            raise
        except Exception as exc:  # noqa: BLE001
            rows = [(shard, b"", RowError.raised("read", "read_failed", exc))]
        for u, data, err in rows:
            uris.append(u)
            payloads.append(data)
            errors.append(err)
    return _rows(uris, payloads, errors)


def _expand_one(shard: str, max_bytes: int | None) -> list[tuple[str, bytes, RowError | None]]:
    """(uri, bytes, error) rows of one shard; a failure to reach the store propagates (the whole shard is retried)."""
    fs, path = uri_mod.filesystem(shard)
    rows: list[tuple[str, bytes, RowError | None]] = []
    last: dict[str, int] = {}  # member name -> the row of its latest copy
    with fs.open(path, "rb") as f:
        try:
            with tarfile.open(fileobj=f, mode="r:") as tar:  # on a seekable file: skipping data is a seek
                for info in tar:
                    if not info.name.lower().endswith(IMAGE_EXTENSIONS):
                        continue
                    if info.name in last:  # an earlier copy: the later one stands for the URI
                        u = rows[last[info.name]][0]
                        message = f"tar member {info.name!r} appears again later in the shard; its last copy is read"
                        rows[last[info.name]] = (u, b"", RowError("read", "duplicate_uri", message))
                    last[info.name] = len(rows)
                    rows.append(_member_row(shard, tar, info, max_bytes))
        except (tarfile.TarError, EOFError, OSError) as exc:
            if uri_mod.is_transient(exc):
                raise
            rows.append((shard, b"", RowError.raised("read", "corrupt_tar", exc)))
    return rows


def _member_row(shard: str, tar: tarfile.TarFile, info: tarfile.TarInfo, max_bytes: int | None) -> tuple:
    """(uri, bytes, error) of one image member; reads its data only when it is accepted."""
    name = info.name
    if uri_mod.undecodable(name):
        message = "tar member name is not valid UTF-8 (its bytes are shown as \\xNN)"
        return f"{shard}#{uri_mod.printable(name)}", b"", RowError("read", "undecodable_name", message)
    u = f"{shard}#{name}"
    if not safe_member_name(name):
        return u, b"", RowError("read", "unsafe_member", f"tar member {name!r} refused")
    if not info.isfile():
        return u, b"", RowError("read", "not_a_file", f"tar member {name!r} refused")
    if max_bytes is not None and info.size > max_bytes:
        message = f"tar member {name!r}: {info.size} bytes exceeds the limit of {max_bytes} bytes"
        return u, b"", RowError("read", "too_large", f"{message} (index.max_image_bytes); not read")
    f = tar.extractfile(info)
    body = f.read() if f is not None else b""
    if len(body) != info.size:
        raise tarfile.ReadError(f"member {name!r} truncated ({len(body)} of {info.size} bytes)")
    return u, body, None


class InputsLost(RuntimeError):
    """The indexed and error rows do not account for the listed inputs exactly once: a defect, never published."""


def account_inputs(
    listed: list[str], listing_rows: int, indexed: list[str], errors: list[tuple[str, str]]
) -> dict[str, int]:
    """Check that every listed input is accounted for exactly once, independently of how the rows were made.

    `listed`: the URIs the listing gave to read (image files and .tar shards); `listing_rows`: the error rows the
    listing itself made (empty, repeated or unprintable entries); `indexed`: the URIs of the embeddings rows;
    `errors`: (uri, reason) of every other error row. A listed image file must have exactly one row; a shard at
    least one (a row per member, or one for the shard); a member exactly one; besides those, `duplicate_uri` rows
    (inputs that read as one URI) may repeat a URI, or stand alone for it. Raises InputsLost naming the inputs that
    are missing, repeated, or not listed at all. Returns {listed, inputs, indexed, errors}: `inputs` counts the
    images found (listed files, members of shards, the listing's rows).
    """
    listed = [uri_mod.printable(u) for u in listed]  # a name that is not UTF-8 is a row under its printable form
    files = {u for u in listed if not u.lower().endswith(uri_mod.TAR_EXTENSIONS)}
    shards = {u for u in listed if u.lower().endswith(uri_mod.TAR_EXTENSIONS)}
    seen: dict[str, list[int]] = {}  # uri -> [rows, duplicate_uri rows]
    extra, shard_rows = [], dict.fromkeys(shards, 0)
    rows = [(u, "") for u in indexed] + list(errors)
    for u, reason in rows:
        head = uri_mod.split_member(u)[0]
        if u not in files and head not in shards:
            extra.append(u)
            continue
        if head in shards:  # a member (or a file named like one, `x.tar#y.png`, that reads as the same URI)
            shard_rows[head] += 1
        seen.setdefault(u, [0, 0])[reason == "duplicate_uri"] += 1
    lost = sorted(u for u in files if u not in seen) + sorted(s for s, n in shard_rows.items() if n == 0)
    repeated = sorted(u for u, (n, _) in seen.items() if n > 1)  # duplicate_uri rows repeat a URI on purpose
    if lost or repeated or extra:
        parts = [
            f"{what} {len(us)}: {us[:3]}"
            for what, us in (("lost", lost), ("repeated", repeated), ("not listed", sorted(extra)))
            if us
        ]
        raise InputsLost(f"the rows do not account for the listed inputs exactly once ({'; '.join(parts)})")
    n_errors = listing_rows + len(errors)
    return {
        "listed": len(listed) + listing_rows,
        "inputs": len(indexed) + n_errors,
        "indexed": len(indexed),
        "errors": n_errors,
    }


def read_any(batch: dict[str, np.ndarray], max_bytes: int | None = None) -> dict[str, np.ndarray]:
    """Dispatch each URI of the batch to the shard expander or the file reader, keeping one output table; image
    files and tar members over `max_bytes` become `too_large` rows unread."""
    is_tar = np.array([str(u).lower().endswith(uri_mod.TAR_EXTENSIONS) for u in batch[S.URI]], dtype=bool)
    parts = []
    if (~is_tar).any():
        parts.append(read_files({k: v[~is_tar] for k, v in batch.items()}, max_bytes))
    if is_tar.any():
        parts.append(expand_tar({S.URI: batch[S.URI][is_tar]}, max_bytes))
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
