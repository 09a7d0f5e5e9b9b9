"""Conditional writes of one small object (compare-and-swap): create if absent, replace or delete if unchanged.

Each content read comes with a tag; a conditional write succeeds only while the object still has that tag, so of
several writers that read the same content exactly one replaces it.
- Local files: every operation holds an exclusive `flock` on a sibling guard file (`.<name>.guard`, never removed)
  while it reads, compares and writes; the kernel drops the flock when its process dies, so a crash leaves nothing
  stale. The tag is the content's sha256; new content lands by os.replace, so readers never see half a file.
- S3: conditional requests against the object's ETag (PUT with If-None-Match: * or If-Match, DELETE with If-Match);
  the store decides, one request each.
- Other fsspec stores: best effort (read, compare, write, read back); two writers racing can both succeed.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os

from roiqa.io import uri as uri_mod

_PRECONDITION_CODES = {"PreconditionFailed", "ConditionalRequestConflict", "412", "409"}


def _guard_path(path: str) -> str:
    head, name = os.path.split(path)
    return os.path.join(head, f".{name}.guard")


@contextlib.contextmanager
def _guarded(path: str):
    """Hold the exclusive flock of `path`'s guard file (created with its folder when missing)."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fd = os.open(_guard_path(path), os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing the last descriptor releases the flock


def _local_read(path: str) -> bytes | None:
    try:
        with open(path, "rb") as f:
            return f.read()
    except FileNotFoundError:
        return None


def _local_tag(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _is_s3(uri: str) -> bool:
    return uri.startswith(("s3://", "s3a://"))


def _precondition_failed(exc: BaseException) -> bool:
    """True when the store refused a conditional request because the object changed (HTTP 412 / 409)."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        error = (getattr(exc, "response", None) or {}).get("Error", {})
        status = str((getattr(exc, "response", None) or {}).get("ResponseMetadata", {}).get("HTTPStatusCode", ""))
        if error.get("Code") in _PRECONDITION_CODES or status in ("412", "409"):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def _s3_call(uri: str, what: str, method: str, **kwargs) -> dict | None:
    """One S3 request on `uri`'s object (retried while the store is unreachable); None when the store refused it
    for a failed precondition or a missing object."""
    fs, path = uri_mod.filesystem(uri)
    bucket, key, _ = fs.split_path(path)
    try:
        out = uri_mod.retrying(uri, what, fs.call_s3, method, Bucket=bucket, Key=key, **kwargs)
    except FileNotFoundError:
        return None
    except OSError as exc:
        if _precondition_failed(exc):
            return None
        raise
    fs.invalidate_cache(path)
    return out


def _s3_read(uri: str) -> tuple[bytes, str] | None:
    from fsspec.asyn import sync

    fs, path = uri_mod.filesystem(uri)
    bucket, key, _ = fs.split_path(path)

    async def get() -> tuple[bytes, str]:
        r = await fs._call_s3("get_object", Bucket=bucket, Key=key)
        async with r["Body"] as body:
            return await body.read(), r["ETag"]

    try:
        return uri_mod.retrying(uri, "read", sync, fs.loop, get)
    except FileNotFoundError:
        return None


def read(uri: str) -> tuple[bytes, str] | None:
    """(content, tag) of `uri`, or None when it does not exist."""
    if uri_mod.is_local(uri):
        path = uri_mod.normalize(uri)
        with _guarded(path):
            data = _local_read(path)
        return None if data is None else (data, _local_tag(data))
    if _is_s3(uri):
        return _s3_read(uri)
    if not uri_mod.exists(uri):
        return None
    data = uri_mod.read_bytes(uri)
    return data, _local_tag(data)


def create(uri: str, data: bytes) -> str | None:
    """Create `uri` with `data` only if it does not exist: its tag, or None when it already exists."""
    if uri_mod.is_local(uri):
        path = uri_mod.normalize(uri)
        with _guarded(path):
            if os.path.exists(path):
                return None
            uri_mod.write_atomic(path, data)
        return _local_tag(data)
    if _is_s3(uri):
        out = _s3_call(uri, "create", "put_object", Body=data, IfNoneMatch="*")
        return None if out is None else out["ETag"]
    return _local_tag(data) if uri_mod.create_exclusive(uri, data) else None


def replace(uri: str, data: bytes, tag: str) -> str | None:
    """Replace `uri` with `data` only if its tag is still `tag`: the new tag, or None when it changed or is gone.

    A request whose answer was lost may have succeeded: callers that get None re-read and compare the content.
    """
    if uri_mod.is_local(uri):
        path = uri_mod.normalize(uri)
        with _guarded(path):
            current = _local_read(path)
            if current is None or _local_tag(current) != tag:
                return None
            uri_mod.write_atomic(path, data)
        return _local_tag(data)
    if _is_s3(uri):
        out = _s3_call(uri, "replace", "put_object", Body=data, IfMatch=tag)
        return None if out is None else out["ETag"]
    current = read(uri)
    if current is None or current[1] != tag:
        return None
    uri_mod.write_bytes(uri, data)
    return _local_tag(data) if uri_mod.read_bytes(uri) == data else None


def delete(uri: str, tag: str) -> bool:
    """Delete `uri` only if its tag is still `tag`; False when it changed or is already gone."""
    if uri_mod.is_local(uri):
        path = uri_mod.normalize(uri)
        with _guarded(path):
            current = _local_read(path)
            if current is None or _local_tag(current) != tag:
                return False
            os.unlink(path)
        return True
    if _is_s3(uri):
        return _s3_call(uri, "delete", "delete_object", IfMatch=tag) is not None
    current = read(uri)
    if current is None or current[1] != tag:
        return False
    uri_mod.delete(uri)
    return True
