"""URIs (local path, file://, s3://, any fsspec protocol) opened through fsspec; tar members as `<shard>.tar#<name>`."""

from __future__ import annotations

import errno
import functools
import os
import posixpath
import random
import tarfile
import tempfile
import time
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
    if uri.endswith("://"):
        return uri
    scheme, _, rest = uri.partition("://")
    if "/" in rest.strip("/"):  # "s3://b/x/../y" -> "s3://b/y": '..' never survives into an id or a prefix check
        bucket, _, key = rest.partition("/")
        key = posixpath.normpath("/" + key).lstrip("/")
        rest = f"{bucket}/{key}" if key else bucket
    return f"{scheme}://{rest}".rstrip("/")


def storage_options(uri: str) -> dict:
    """fsspec options for `uri`: an S3-compatible endpoint from AWS_ENDPOINT_URL(_S3) when set."""
    if uri.startswith(("s3://", "s3a://")):
        endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        if endpoint:
            return {"client_kwargs": {"endpoint_url": endpoint}}
    return {}


def _chained(uri: str) -> bool:
    """True for fsspec chained URLs (`simplecache::s3://...`): the part before the first '::' is a protocol name."""
    head, sep, _ = uri.partition("::")
    return bool(sep) and head in fsspec.available_protocols()


def filesystem(uri: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """(filesystem, path inside it) for a URI.

    '::' inside a path or key (`/data/a::b.png`) is part of the name; only a URI that starts with a protocol name
    and '::' is an fsspec chain.
    """
    uri = normalize(uri)
    if _chained(uri):
        return fsspec.core.url_to_fs(uri, **storage_options(uri))
    protocol = fsspec.core.split_protocol(uri)[0] or "file"
    cls = fsspec.get_filesystem_class(protocol)
    fs = fsspec.filesystem(protocol, **{**cls._get_kwargs_from_urls(uri), **storage_options(uri)})
    return fs, cls._strip_protocol(uri)


def join(base: str, *parts: str) -> str:
    """Join path components onto a URI with '/'."""
    base = normalize(base)
    if "://" in base:
        return "/".join([base.rstrip("/"), *[p.strip("/") for p in parts]])
    return os.path.join(base, *parts)


def inside(uri: str, prefix: str) -> bool:
    """True when `uri` lies under `prefix` (or is it). Local paths are compared after resolving symbolic links, so
    a link inside an allowed folder that points out of it is outside."""
    uri, prefix = normalize(uri), normalize(prefix)
    if is_local(uri) and is_local(prefix):
        uri, prefix = os.path.realpath(uri), os.path.realpath(prefix)
    return uri == prefix or uri.startswith(prefix.rstrip("/") + "/")


def to_uri(fs: fsspec.AbstractFileSystem, path: str) -> str:
    """Inverse of `filesystem`: a path returned by `fs` back to a canonical URI."""
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    if protocol in ("file", "local"):
        return normalize(path)
    return f"{protocol}://{path.lstrip('/')}" if protocol != "s3a" else f"s3://{path.lstrip('/')}"


def split_member(uri: str) -> tuple[str, str | None]:
    """`shard.tar#member` -> (shard URI, member name); any other URI -> (uri, None).

    Only the form is looked at: a file really named `x.tar#y.png` splits too, and `read_bytes` falls back to it
    when `x.tar` is not a shard holding `y.png`.
    """
    head, sep, member = uri.rpartition("#")
    if sep and head.lower().endswith(TAR_EXTENSIONS) and member:
        return head, member
    return uri, None


def undecodable(name: str) -> bool:
    """True for names that are not valid UTF-8 (the OS layer gives their bytes as lone surrogates)."""
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def printable(name: str) -> str:
    """`name` with the bytes that are not UTF-8 written as `\\xNN`, for messages and error rows."""
    try:
        raw = name.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:
        return name.encode("utf-8", "backslashreplace").decode("utf-8")
    return raw.decode("utf-8", "backslashreplace")


class TooLarge(ValueError):
    """An input over a byte limit, refused without reading it; `.size` is None when only "more than" is known."""

    def __init__(self, uri: str, size: int | None, limit: int):
        self.uri, self.size, self.limit = uri, size, limit
        if size is None:
            self.message = f"more than the limit of {limit} bytes"
        else:
            self.message = f"{size} bytes exceeds the limit of {limit} bytes"
        super().__init__(f"{uri}: {self.message}")

    def __reduce__(self):  # picklable across processes despite the three-argument constructor
        return type(self), (self.uri, self.size, self.limit)


class StorageUnavailable(ConnectionError):
    """The object store could not be reached for a while: retried, then given up (nothing is half-published)."""


_TRANSIENT_NAMES = {
    "EndpointConnectionError",
    "ConnectionClosedError",
    "ConnectTimeoutError",
    "ReadTimeoutError",
    "ClientConnectorError",
    "ServerDisconnectedError",
    "ClientOSError",
    "FSTimeoutError",
}
_TRANSIENT_ERRNOS = {errno.ECONNREFUSED, errno.ECONNRESET, errno.ETIMEDOUT, errno.EHOSTUNREACH, errno.ENETUNREACH}


def is_transient(exc: BaseException) -> bool:
    """True for failures to reach the store (connection refused / reset / timed out), not for missing objects."""
    if isinstance(exc, StorageUnavailable):
        return False  # already retried
    if any(c.__name__ in _TRANSIENT_NAMES for c in type(exc).__mro__):
        return True
    if isinstance(exc, (ConnectionError, TimeoutError)):
        return True
    return isinstance(exc, OSError) and exc.errno in _TRANSIENT_ERRNOS


def retry_seconds() -> float:
    """How long one storage operation keeps retrying an unreachable store: ROIQA_STORAGE_RETRY_S, default 120 s."""
    raw = os.environ.get("ROIQA_STORAGE_RETRY_S", "120")
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"ROIQA_STORAGE_RETRY_S: not a number of seconds: {raw!r}") from None
    return max(0.0, value)


def retrying(uri: str, what: str, fn, *args, **kwargs):
    """`fn(*args, **kwargs)`, retried with exponential backoff (1 s doubling to 30 s, jittered) while the store is
    unreachable, for up to `retry_seconds()`; then StorageUnavailable naming `uri` and the last error."""
    deadline = time.monotonic() + retry_seconds()
    delay, attempts = 1.0, 0
    while True:
        attempts += 1
        try:
            return fn(*args, **kwargs)
        except Exception as exc:  # noqa: BLE001 - classified below; anything else propagates unchanged
            if not is_transient(exc):
                raise
            left = deadline - time.monotonic()
            if left <= 0:
                from roiqa.io.redact import redact

                raise StorageUnavailable(
                    f"{redact(uri)}: object store unreachable; {what} failed {attempts} times over "
                    f"{retry_seconds():.0f} s (ROIQA_STORAGE_RETRY_S); last error: "
                    f"{type(exc).__name__}: {redact(str(exc))}"
                ) from None
            time.sleep(min(delay * (0.5 + random.random() / 2), left))
            delay = min(delay * 2, 30.0)


def exists(uri: str) -> bool:
    fs, path = filesystem(uri)
    return retrying(uri, "exists", fs.exists, path)


def read_bytes(uri: str, max_bytes: int | None = None) -> bytes:
    """The whole content of `uri`: a tar member when the URI is `<shard>.tar#<name>` and that shard holds it, else
    the file or object of that name.

    With `max_bytes`, TooLarge instead of any read of a member whose tar header says it is bigger, and a file is
    read no further than `max_bytes + 1` bytes.
    """
    shard, member = split_member(uri)
    if member is not None:
        where = _member_location(shard, member)
        if where is not None:
            offset, size = where
            if max_bytes is not None and size > max_bytes:
                raise TooLarge(uri, size, max_bytes)
            fs, path = filesystem(shard)
            return retrying(uri, "read", fs.cat_file, path, start=offset, end=offset + size)
    fs, path = filesystem(uri)
    if max_bytes is None:
        return retrying(uri, "read", fs.cat_file, path)
    data = retrying(uri, "read", _read_head, fs, path, max_bytes + 1)
    if len(data) > max_bytes:
        raise TooLarge(uri, None, max_bytes)
    return data


def _read_head(fs: fsspec.AbstractFileSystem, path: str, n: int) -> bytes:
    with fs.open(path, "rb") as f:
        return f.read(n)


def _member_location(shard: str, member: str) -> tuple[int, int] | None:
    """(data offset, size) of `member` in `shard`; None when `shard` is no tar file or does not hold it."""
    try:
        return retrying(shard, "tar listing", _tar_members, shard).get(member)
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError, tarfile.TarError, EOFError):
        return None


@functools.lru_cache(maxsize=16)
def _tar_members(shard: str) -> dict[str, tuple[int, int]]:
    """{member name: (data offset, size)} of a tar shard's regular files, read once per process.

    A name that appears more than once maps to its last copy, the one tar extraction leaves.
    """
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
    retrying(uri, "write", fs.pipe_file, path, data)


def create_exclusive(uri: str, data: bytes) -> bool:
    """Create `uri` with `data` only if it does not exist; False when it already does.

    Local files: O_EXCL. Object stores: a conditional PUT (If-None-Match: *) where the filesystem supports it,
    else write-then-read-back (the last writer wins, and the loser sees someone else's content).
    """
    if is_local(uri):
        path = normalize(uri)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        return True
    fs, path = filesystem(uri)
    try:
        retrying(uri, "create", fs.pipe_file, path, data, mode="create")
        return True
    except FileExistsError:
        return False
    except (TypeError, NotImplementedError):
        pass
    except OSError as exc:  # a precondition failure surfaces as an OSError subclass in some versions
        if "PreconditionFailed" in str(exc) or "412" in str(exc):
            return False
        raise
    if exists(uri):
        return False
    write_bytes(uri, data)
    return read_bytes(uri) == data


def delete(uri: str, recursive: bool = False) -> None:
    """Remove a file (or a folder / prefix with `recursive`); a missing one is not an error."""
    fs, path = filesystem(uri)
    if retrying(uri, "exists", fs.exists, path):
        retrying(uri, "delete", fs.rm, path, recursive=recursive)


def move(src: str, dst: str) -> None:
    """Rename `src` to `dst` (same filesystem): os.replace for local files, a copy then delete on object stores."""
    if is_local(src) and is_local(dst):
        target = normalize(dst)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        os.replace(normalize(src), target)
        return
    fs, path = filesystem(src)
    _, target = filesystem(dst)
    retrying(src, "move", fs.mv, path, target)


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
    return sorted(list_signatures(uri, extensions))


def signature(info: dict) -> str:
    """What identifies one version of a stored file: its ETag on object stores, else size and mtime."""
    etag = info.get("ETag") or info.get("etag")
    if etag:
        return f"etag:{str(etag).strip(chr(34))}"
    mtime = info.get("mtime") or info.get("LastModified") or info.get("last_modified") or info.get("created")
    if hasattr(mtime, "timestamp"):
        mtime = mtime.timestamp()
    return f"size:{info.get('size')}:mtime:{mtime}"


def list_signatures(uri: str, extensions: tuple[str, ...]) -> dict[str, str]:
    """{canonical URI: signature} of the files under `uri` (recursively) whose names end with `extensions`.

    A URI naming a single file gives just that file. Hidden files and folders (starting with '.') are skipped.
    """
    return {u: signature(info) for u, info in list_infos(uri, extensions).items()}


def list_infos(uri: str, extensions: tuple[str, ...]) -> dict[str, dict]:
    """{canonical URI: fsspec info (size, ETag or mtime, ...)} of the files `list_signatures` lists, from one
    listing (no request per file)."""
    fs, path = filesystem(uri)
    if not retrying(uri, "exists", fs.exists, path):
        raise FileNotFoundError(f"{uri}: no such file, folder or prefix")
    if retrying(uri, "stat", fs.isfile, path):
        return {to_uri(fs, path): retrying(uri, "stat", fs.info, path)}
    out = {}
    for p, info in retrying(uri, "list", fs.find, path, detail=True).items():
        rel = posixpath.relpath(p, path) if not is_local(uri) else os.path.relpath(p, path)
        if any(part.startswith(".") for part in rel.replace(os.sep, "/").split("/")):
            continue
        if p.lower().endswith(extensions):
            out[to_uri(fs, p)] = info
    return out


def stat_infos(uris: list[str], threads: int = 32) -> dict[str, dict | None]:
    """{uri: fsspec info} of listed URIs (None: missing); many object-store HEAD requests in parallel.

    A `<shard>.tar#<name>` URI gets its shard's info, or, when there is no such shard, that of a file of that name.
    """
    from concurrent.futures import ThreadPoolExecutor

    def one(u: str) -> dict | None:
        shard, member = split_member(u)
        for candidate in (shard, u) if member is not None else (u,):
            fs, path = filesystem(candidate)
            try:
                return retrying(u, "stat", fs.info, path)
            except FileNotFoundError:
                continue
        return None

    with ThreadPoolExecutor(max_workers=max(1, min(threads, len(uris)))) as pool:
        return dict(zip(uris, pool.map(one, uris)))


def new_version_id() -> str:
    """A sortable unique version name: UTC time plus a random suffix."""
    import datetime

    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%S%fZ")
    return f"{now}-{uuid.uuid4().hex[:6]}"
