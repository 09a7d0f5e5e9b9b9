"""The one-writer lock of an index (`LOCK`): taken, taken over and released by conditional writes, renewed by a
heartbeat while its run lives."""

from __future__ import annotations

import datetime
import json
import logging
import os
import socket
import threading
import time
import uuid

from roiqa.io import cas
from roiqa.io import uri as uri_mod
from roiqa.io.redact import redact

LOCK = "LOCK"  # held by the one writer of an index (index, reindex) while it runs

log = logging.getLogger(__name__)


class IndexBusy(ValueError):
    """Another writer holds the index's lock."""


class LockLost(IndexBusy):
    """This run no longer holds the index's lock (another run took it over): it must not publish or collect
    garbage."""


_HELD: set[str] = set()  # owners of the locks this process holds now


class IndexLock:
    """The one-writer lock of an index: `LOCK` = {owner, what, host, pid, acquired, renewed, expires}.

    Taken by a conditional create; a stale lock is taken over by a conditional replace of the very content that was
    read, so of several runs that find the same stale lock exactly one wins (roiqa.io.cas: flock-guarded on local
    folders, If-None-Match / If-Match on S3). A lock is stale when its lease has expired (`ttl_s`), when its holder
    ran on this host and that process is gone, or when it was taken by this very process and is no longer held (a
    run whose release failed because the store was down). While held, a daemon thread renews the lease every
    `ttl_s / 3` by the same conditional replace; if it finds the lock changed, the run has lost it, and `confirm()`
    (called before publishing and before garbage collection) raises LockLost. Overlapping scheduled runs (a
    nightly job that ran long) fail fast with IndexBusy.
    """

    def __init__(self, root: str, ttl_s: float, what: str = "index"):
        if not ttl_s > 0:
            raise ValueError(f"lock_ttl_s must be > 0, got {ttl_s}")
        self.uri = uri_mod.join(root, LOCK)
        self.ttl_s, self.what = float(ttl_s), what
        self.owner = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.acquired = 0.0  # when this run took the lock (time.time())
        self.expires = 0.0  # the end of the lease this run last wrote
        self.lost: str | None = None  # why this run no longer holds the lock, once it does not
        self._tag: str | None = None  # the tag (roiqa.io.cas) of the content this run last wrote
        self._mutex = threading.Lock()  # the heartbeat, confirm() and the release write one at a time
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _body(self, now: float) -> bytes:
        return json.dumps(
            {
                "owner": self.owner,
                "what": self.what,
                "host": socket.gethostname(),
                "pid": os.getpid(),
                "acquired": self.acquired,
                "renewed": now,
                "expires": now + self.ttl_s,
                "acquired_utc": datetime.datetime.fromtimestamp(self.acquired, datetime.timezone.utc).isoformat(),
            }
        ).encode()

    @staticmethod
    def _parse(data: bytes) -> dict:
        try:
            holder = json.loads(data)
        except ValueError:
            holder = None
        return holder if isinstance(holder, dict) else {"owner": "?", "expires": 0}  # unreadable: expired

    def held(self) -> dict | None:
        """The current holder's record, or None when the index is not locked."""
        current = cas.read(self.uri)
        return None if current is None else self._parse(current[0])

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

    def _written(self, body: bytes, tag: str | None) -> str | None:
        """`tag` of a conditional write, or, when the write answered None, the current tag if the content is
        `body` all the same (the request succeeded but its answer was lost)."""
        if tag is not None:
            return tag
        current = cas.read(self.uri)
        return current[1] if current is not None and current[0] == body else None

    def __enter__(self) -> IndexLock:
        for _ in range(5):
            now = time.time()
            self.acquired = now
            body = self._body(now)
            tag = cas.create(self.uri, body)
            current = None if tag is not None else cas.read(self.uri)
            if current is not None and current[0] == body:
                tag = current[1]  # created, but the answer was lost
            elif tag is None:
                if current is None:
                    continue  # released meanwhile: create again
                holder = self._parse(current[0])
                if not self.stale(holder):
                    raise IndexBusy(
                        f"{self.uri}: the index is locked by {holder.get('what', 'a writer')} {holder.get('owner')} "
                        f"since {holder.get('acquired_utc', '?')} (until {holder.get('expires')}); another run is "
                        "writing it. If that run died on another host, delete the LOCK file"
                    )
                tag = self._written(body, cas.replace(self.uri, body, current[1]))
                if tag is None:
                    continue  # another run took the stale lock first: the next round sees its live lease
                log.warning("%s: took over the stale lock of %s", redact(self.uri), holder.get("owner"))
            self._tag, self.expires, self.lost = tag, now + self.ttl_s, None
            _HELD.add(self.owner)
            self._stop.clear()
            self._thread = threading.Thread(target=self._heartbeat, name="roiqa-index-lock", daemon=True)
            self._thread.start()
            return self
        raise IndexBusy(f"{self.uri}: could not take the index lock (contended)")

    def renew(self) -> None:
        """Extend the lease to `ttl_s` from now if this run still holds the lock; else record that it lost it."""
        with self._mutex:
            if self.lost is not None or self._tag is None:
                return
            now = time.time()
            body = self._body(now)
            tag = self._written(body, cas.replace(self.uri, body, self._tag))
            if tag is not None:
                self._tag, self.expires = tag, now + self.ttl_s
                return
            current = cas.read(self.uri)
            holder = None if current is None else self._parse(current[0])
            self.lost = (
                "the LOCK file was removed"
                if holder is None
                else f"it is now held by {holder.get('what', 'a writer')} {holder.get('owner')}"
            )
            log.error("%s: this run lost the index lock: %s", redact(self.uri), self.lost)

    def _heartbeat(self) -> None:
        while not self._stop.wait(self.ttl_s / 3):
            try:
                self.renew()
            except Exception as exc:  # noqa: BLE001 - the store may be down; confirm() decides before publishing
                log.warning("%s: could not renew the index lock: %s", redact(self.uri), redact(str(exc)))
            if self.lost is not None:
                return

    def confirm(self) -> None:
        """Raise LockLost unless this run still holds the lock; renews the lease (a conditional write: what
        follows has a full `ttl_s` before anyone may take it over)."""
        if self._tag is None:
            raise LockLost(f"{self.uri}: this run never took the index lock")
        self.renew()
        if self.lost is not None:
            raise LockLost(
                f"{self.uri}: this run no longer holds the index lock ({self.lost}); it did not publish or delete "
                "anything. Its lease (index.lock_ttl_s) ran out while the run was stalled, or its LOCK was deleted"
            )

    def __exit__(self, exc_type, exc, tb) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        _HELD.discard(self.owner)
        try:
            with self._mutex:
                if self.lost is None and self._tag is not None:
                    cas.delete(self.uri, self._tag)  # never someone else's lock: only the content this run wrote
                self._tag = None
        except uri_mod.StorageUnavailable:
            if exc is None:
                raise
            # the run is failing anyway (often for the same reason): keep its error; the lock is stale from now on
