"""Per-batch readers of image sources: file URIs -> bytes, WebDataset tar shards -> members; failures become rows."""

from __future__ import annotations

import hashlib
import io
import posixpath
import tarfile

import numpy as np
import pyarrow as pa

from roiqa import schema as S
from roiqa import uri as uri_mod
from roiqa.uri import IMAGE_EXTENSIONS


def error_string(stage: str, reason: str, message: str) -> str:
    """The transient `error` column's format: "<stage>:<reason>:<message>"; "" means no error."""
    return f"{stage}:{reason}:{message}"


def parse_error(value: str) -> tuple[str, str, str]:
    """Inverse of `error_string`."""
    stage, reason, message = (value.split(":", 2) + ["", ""])[:3]
    return stage, reason, message


def errors_table(rows: list[tuple[str, ...]], schema: pa.Schema = S.ERRORS_SCHEMA) -> pa.Table:
    """An errors table from (uri, stage, reason, message[, query_id]) rows, in `schema`'s column order."""
    from roiqa.redact import redact

    rows = [(redact(u), st, r, redact(m), *rest) for u, st, r, m, *rest in rows]  # no credentials in a table
    cols = list(zip(*rows)) if rows else [[] for _ in schema.names]
    return pa.table({n: pa.array(list(c), pa.string()) for n, c in zip(schema.names, cols)}, schema=schema)


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


def _rows(uris: list[str], payloads: list[bytes], errors: list[str]) -> dict[str, np.ndarray]:
    return {
        S.URI: object_array(uris),
        S.BYTES: object_array(payloads),
        S.ERROR: object_array(errors),
    }


def read_files(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """{uri} -> {uri, bytes, error}: each URI's bytes, or an error row (stage "read") when it cannot be read."""
    uris, payloads, errors = [], [], []
    for u in batch[S.URI]:
        u = str(u)
        try:
            data = uri_mod.read_bytes(u)
            err = ""
        except FileNotFoundError:
            data, err = b"", error_string("read", "not_found", "no such file or object")
        except uri_mod.StorageUnavailable:
            raise  # the store is down, not the input bad: fail the run (nothing is published) rather than record it
        except Exception as exc:  # noqa: BLE001 - any other storage failure is recorded against its input
            data, err = b"", error_string("read", "read_failed", f"{type(exc).__name__}: {exc}")
        uris.append(u)
        payloads.append(data)
        errors.append(err)
    return _rows(uris, payloads, errors)


def expand_tar(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """{uri of .tar shards} -> one row per image member, URI `<shard>#<member>` (WebDataset layout).

    Members with image extensions are yielded; other members (.json, .txt, ...) belong to the sample but are not
    images. Members with unsafe names (absolute, '..') are error rows ("read", "unsafe_member"). A shard that cannot
    be opened, or that is corrupt or truncated part-way, gives an error row for the shard itself after the members
    read before the damage.
    """
    uris, payloads, errors = [], [], []
    for shard in batch[S.URI]:
        shard = str(shard)
        try:
            data = uri_mod.read_bytes(shard)
        except uri_mod.StorageUnavailable:
            raise
        except Exception as exc:  # noqa: BLE001
            uris.append(shard)
            payloads.append(b"")
            errors.append(error_string("read", "read_failed", f"{type(exc).__name__}: {exc}"))
            continue
        try:
            with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
                for info in tar:
                    if not info.name.lower().endswith(IMAGE_EXTENSIONS):
                        continue
                    member_uri = f"{shard}#{info.name}"
                    if not safe_member_name(info.name) or not info.isfile():
                        kind = "unsafe_member" if not safe_member_name(info.name) else "not_a_file"
                        uris.append(member_uri)
                        payloads.append(b"")
                        errors.append(error_string("read", kind, f"tar member {info.name!r} refused"))
                        continue
                    f = tar.extractfile(info)
                    body = f.read() if f is not None else b""
                    if len(body) != info.size:
                        raise tarfile.ReadError(f"member {info.name!r} truncated ({len(body)} of {info.size} bytes)")
                    uris.append(member_uri)
                    payloads.append(body)
                    errors.append("")
        except (tarfile.TarError, EOFError, OSError) as exc:
            uris.append(shard)
            payloads.append(b"")
            errors.append(error_string("read", "corrupt_tar", f"{type(exc).__name__}: {exc}"))
    return _rows(uris, payloads, errors)


class InputsLost(RuntimeError):
    """The indexed and error rows do not account for the listed inputs exactly once: a defect, never published."""


def account_inputs(
    listed: list[str], listing_errors: int, indexed: list[str], errors: list[tuple[str, str]]
) -> dict[str, int]:
    """Check that every listed input is accounted for exactly once, independently of how the rows were made.

    `listed`: the URIs the listing gave (image files and .tar shards); `listing_errors`: rows the listing itself
    refused (empty or duplicate manifest rows, already among `errors`); `indexed`: the URIs of the embeddings rows;
    `errors`: (uri, reason) of the error rows. A listed image file must have exactly one row; a shard at least one
    (a row per member, or one for the shard); a member exactly one; a `duplicate_uri` row repeats a URI on purpose.
    Raises InputsLost naming the inputs that are missing, repeated, or not listed at all. Returns {listed, inputs,
    indexed, errors}: `inputs` counts the images found (listed files, members of shards, refused listing rows).
    """
    files = {u for u in listed if not u.lower().endswith(uri_mod.TAR_EXTENSIONS)}
    shards = {u for u in listed if u.lower().endswith(uri_mod.TAR_EXTENSIONS)}
    seen: dict[str, int] = {}
    extra, shard_rows = [], dict.fromkeys(shards, 0)
    rows = [(u, "") for u in indexed] + list(errors)
    for u, reason in rows:
        if reason in ("duplicate_uri", "empty_uri"):
            continue  # listed again on purpose, or a row without a URI: counted, never indexed
        head = uri_mod.split_member(u)[0]
        if u in files:
            seen[u] = seen.get(u, 0) + 1
        elif head in shards:
            shard_rows[head] += 1
            seen[u] = seen.get(u, 0) + 1
        else:
            extra.append(u)
    lost = sorted(files - set(seen)) + sorted(s for s, n in shard_rows.items() if n == 0)
    repeated = sorted(u for u, n in seen.items() if n > 1)
    if lost or repeated or extra:
        parts = [
            f"{what} {len(us)}: {us[:3]}"
            for what, us in (("lost", lost), ("repeated", repeated), ("not listed", sorted(extra)))
            if us
        ]
        raise InputsLost(f"the rows do not account for the listed inputs exactly once ({'; '.join(parts)})")
    return {"listed": len(listed) + listing_errors, "inputs": len(rows), "indexed": len(indexed), "errors": len(errors)}
