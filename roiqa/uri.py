"""URIs (local path, file://, s3://, any fsspec protocol) opened through fsspec; tar members as `<shard>.tar#<name>`."""

from __future__ import annotations

import functools
import os
import posixpath
import tarfile
import tempfile
import uuid

import fsspec

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif")
TAR_EXTENSIONS = (".tar",)


def is_local(uri: str) -> bool:
    """True for plain paths and file:// URIs."""
    return "://" not in uri or uri.startswith("file://")


def normalize(uri: str) -> str:
    """Canonical form used for ids: local URIs become absolute paths without scheme; others lose a trailing '/'."""
    if uri.startswith("file://"):
        uri = uri[len("file://") :]
    if "://" not in uri:
        return os.path.abspath(os.path.expanduser(uri))
    return uri.rstrip("/") if not uri.endswith("://") else uri


def storage_options(uri: str) -> dict:
    """fsspec options for `uri`: an S3-compatible endpoint from AWS_ENDPOINT_URL(_S3) when set."""
    if uri.startswith(("s3://", "s3a://")):
        endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        if endpoint:
            return {"client_kwargs": {"endpoint_url": endpoint}}
    return {}


def filesystem(uri: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """(filesystem, path inside it) for a URI."""
    uri = normalize(uri)
    fs, path = fsspec.core.url_to_fs(uri, **storage_options(uri))
    return fs, path


def join(base: str, *parts: str) -> str:
    """Join path components onto a URI with '/'."""
    base = normalize(base)
    if "://" in base:
        return "/".join([base.rstrip("/"), *[p.strip("/") for p in parts]])
    return os.path.join(base, *parts)


def to_uri(fs: fsspec.AbstractFileSystem, path: str) -> str:
    """Inverse of `filesystem`: a path returned by `fs` back to a canonical URI."""
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    if protocol in ("file", "local"):
        return normalize(path)
    return f"{protocol}://{path.lstrip('/')}" if protocol != "s3a" else f"s3://{path.lstrip('/')}"


def split_member(uri: str) -> tuple[str, str | None]:
    """`shard.tar#member` -> (shard URI, member name); any other URI -> (uri, None)."""
    head, sep, member = uri.rpartition("#")
    if sep and head.lower().endswith(TAR_EXTENSIONS) and member:
        return head, member
    return uri, None


def exists(uri: str) -> bool:
    fs, path = filesystem(uri)
    return fs.exists(path)


def read_bytes(uri: str) -> bytes:
    """The whole content of `uri` (a tar member when the URI is `<shard>.tar#<name>`)."""
    shard, member = split_member(uri)
    if member is not None:
        offset, size = _tar_members(shard)[member]
        fs, path = filesystem(shard)
        with fs.open(path, "rb") as f:
            f.seek(offset)
            return f.read(size)
    fs, path = filesystem(uri)
    return fs.cat_file(path)


@functools.lru_cache(maxsize=16)
def _tar_members(shard: str) -> dict[str, tuple[int, int]]:
    """{member name: (data offset, size)} of a tar shard's regular files, read once per process."""
    fs, path = filesystem(shard)
    out: dict[str, tuple[int, int]] = {}
    with fs.open(path, "rb") as f, tarfile.open(fileobj=f, mode="r:") as tar:
        for info in tar:
            if info.isfile():
                out[info.name] = (info.offset_data, info.size)
    return out


def write_bytes(uri: str, data: bytes) -> None:
    """Write `data` to `uri`, creating parent folders of local paths."""
    fs, path = filesystem(uri)
    if is_local(uri):
        os.makedirs(os.path.dirname(path), exist_ok=True)
    fs.pipe_file(path, data)


def write_atomic(uri: str, data: bytes) -> None:
    """Replace `uri` so readers see the old or the new content, never a mix.

    Local files: write a sibling temporary file, fsync, then os.replace (atomic on POSIX). Object stores: one PUT,
    which S3 makes visible whole or not at all.
    """
    if is_local(uri):
        path = normalize(uri)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=os.path.dirname(path))
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        return
    write_bytes(uri, data)


def list_files(uri: str, extensions: tuple[str, ...]) -> list[str]:
    """Sorted canonical URIs of files under `uri` (recursively) whose names end with one of `extensions`.

    A URI naming a single file returns just that file. Hidden files and folders (starting with '.') are skipped.
    """
    fs, path = filesystem(uri)
    if not fs.exists(path):
        raise FileNotFoundError(f"{uri}: no such file, folder or prefix")
    if fs.isfile(path):
        return [to_uri(fs, path)]
    out = []
    for p in fs.find(path):
        rel = posixpath.relpath(p, path) if not is_local(uri) else os.path.relpath(p, path)
        if any(part.startswith(".") for part in rel.replace(os.sep, "/").split("/")):
            continue
        if p.lower().endswith(extensions):
            out.append(to_uri(fs, p))
    return sorted(out)


def new_version_id() -> str:
    """A sortable unique version name: UTC time plus a random suffix."""
    import datetime

    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%S%fZ")
    return f"{now}-{uuid.uuid4().hex[:6]}"
