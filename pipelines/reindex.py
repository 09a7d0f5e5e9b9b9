"""Incremental re-index: embed only new and changed images, carry the rest over, drop deleted ones, publish.

Compares the listing of the images URI (URI -> ETag, or size + mtime) with the published version's sources
table. New and changed sources (image files, .tar shards, manifest rows) are embedded; the parent's rows of
unchanged sources are carried over; the faiss index is updated in place (`remove_ids` + `add_with_ids`) when the
parent's can be, rebuilt otherwise. Nothing changed: nothing is published. The whole run holds the index's LOCK
(an overlapping nightly run fails fast), publishes by replacing CURRENT last, keeps the newest
`index.keep_versions` published versions and records one row in the index's runs table. What the parent
can give is decided in roiqa.index.incremental.
"""

from __future__ import annotations

import datetime
import time
from dataclasses import dataclass

import numpy as np

from pipelines.index import embed_uris
from roiqa import schema as S
from roiqa.config import RoiqaConfig
from roiqa.index import store
from roiqa.index.incremental import carry, diff, full_reason, listing_errors_unchanged, same_coarse, signatures
from roiqa.index.version import Carried, listed, plan, record_failure, run_row, write_version
from roiqa.io import uri as uri_mod
from roiqa.progress import Progress


@dataclass(frozen=True)
class ReindexReport:
    """What one run of `roiqa reindex` did."""

    index: str
    run_id: str
    status: str  # published | unchanged
    mode: str  # incremental | full
    reason: str  # why it was full ("" when incremental)
    parent: str | None  # the version published before
    version: str | None  # the version published by this run (None when unchanged)
    counts: dict  # listed, new, changed, deleted, unchanged, indexed, errors, gc_deleted
    seconds: float
    pipeline_seconds: float


def run_reindex(
    images: str, index: str, cfg: RoiqaConfig, model_uri: str | None = None, progress: Progress | None = None
) -> ReindexReport:
    """Bring `index` up to date with `images`, embedding only what changed (see the module docstring).
    `progress`: where the stages report; default none."""
    t0 = time.perf_counter()
    progress = progress or Progress()
    started = datetime.datetime.now(datetime.timezone.utc)
    run_id = uri_mod.new_version_id()
    index = uri_mod.normalize(index)
    p = None
    with store.IndexLock(index, cfg.index.lock_ttl_s, "roiqa reindex") as lock:
        try:
            p = plan(images, index, cfg, model_uri)
            listed(p, progress, time.perf_counter() - t0)
            parent = store.open_index(index, p.parent) if p.parent else None
            reason = full_reason(p, cfg, parent)
            d = diff(signatures(parent) if not reason else {}, p.listing.signatures)
            counts = {"listed": len(p.listing.uris), **{k: len(v) for k, v in d.items()}}
            mode = "full" if reason else "incremental"
            changes = ", ".join(f"{len(d[k]):,} {k}" for k in ("new", "changed", "deleted", "unchanged"))
            progress.say(f"{mode} against version {p.parent}: {changes}" + (f" ({reason})" if reason else ""))
            nothing = not reason and not (d["new"] or d["changed"] or d["deleted"])
            nothing = nothing and listing_errors_unchanged(p, parent)
            if nothing and not same_coarse(parent.manifest, cfg, len(p.listing.uris), p.dim):
                nothing = False  # the images did not change, the coarse index settings did: faiss is rebuilt
                progress.say("the coarse index settings changed: faiss is rebuilt from the stored rows")
            if nothing:
                gone = store.collect_garbage(index, cfg.index.keep_versions, lock)
                m = parent.manifest["counts"]
                counts.update(indexed=m["indexed"], errors=m["errors"], gc_deleted=len(gone))
                status, version, pipeline_s = "unchanged", None, 0.0
                progress.say(f"nothing changed; version {p.parent} stays published")
            else:
                info = {"run_id": run_id, "mode": mode, "reason": reason, **counts}
                todo = set(d["new"]) | set(d["changed"])
                done = embed_uris(p, [u for u in p.listing.uris if u in todo], cfg, model_uri, progress)
                carried = carry(p, cfg, d, info, parent) if not reason else None
                if carried is None:
                    carried = Carried(p.schema.empty_table(), S.ERRORS_SCHEMA.empty_table(), None, np.zeros(0), info)
                manifest = write_version(p, cfg, done, carried, lock, progress)
                gone = store.collect_garbage(index, cfg.index.keep_versions, lock)
                counts.update(
                    indexed=manifest["counts"]["indexed"], errors=manifest["counts"]["errors"], gc_deleted=len(gone)
                )
                status, version, pipeline_s = "published", p.version, done.seconds
        except BaseException as exc:
            record_failure(index, run_row("reindex", run_id, started, p, status="failed", message=f"{exc}"))
            raise
        store.write_run(
            index,
            run_row(
                "reindex", run_id, started, p, status=status, mode=mode, mode_reason=reason, version=version, **counts
            ),
        )
    return ReindexReport(
        index, run_id, status, mode, reason, p.parent, version, counts, time.perf_counter() - t0, pipeline_s
    )
