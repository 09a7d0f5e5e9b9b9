"""Incremental re-index: embed only new and changed images, carry the rest over, drop deleted ones, publish.

Compares the listing of the images URI (URI -> ETag, or size + mtime) with the published version's sources
table. New and changed sources (image files, .tar shards, manifest rows) are embedded; the parent's rows of
unchanged sources are carried over; the faiss index is updated in place (`remove_ids` + `add_with_ids`) when the
parent's can be, rebuilt otherwise. Nothing changed: nothing is published. The whole run holds the index's LOCK
(an overlapping nightly run fails fast), publishes by replacing CURRENT last, keeps the newest
`index.keep_versions` published versions and records one row in the index's runs table.
"""

from __future__ import annotations

import datetime
import json
import time
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipelines.index import embed_uris
from roiqa import schema as S
from roiqa.config import RoiqaConfig, to_dict
from roiqa.index import faiss_index, store
from roiqa.index.version import Carried, Plan, listed, plan, record_failure, run_row, write_version
from roiqa.io import uri as uri_mod
from roiqa.io.listing import listing_made
from roiqa.progress import Progress

# Config sections whose change makes every stored embedding stale.
EMBEDDING_SECTIONS = ("model", "preprocess", "complexity", "masks")


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


def full_reason(p: Plan, cfg: RoiqaConfig) -> str:
    """Why the parent's rows cannot be reused ("" when they can)."""
    if p.parent is None:
        return "no published version"
    old = store.read_manifest(p.index, p.parent)
    if not uri_mod.exists(store.version_uri(p.index, p.parent, store.SOURCES)):
        return "the published version has no sources table"
    if old.get("images") != p.images:
        return f"the images URI changed (was {old.get('images')})"
    if old.get("model") != p.model:
        return "the model changed"
    if old.get("embedding_dim") != p.dim:
        return "the embedding width changed"
    now = json.loads(json.dumps(to_dict(cfg)))
    for section in EMBEDDING_SECTIONS:
        if old.get("config", {}).get(section) != now[section]:
            return f"config section {section!r} changed"
    return ""


def source_of(uri: str) -> str:
    """The listed URI a row came from: the shard of a tar member, else the URI itself."""
    return uri_mod.split_member(uri)[0]


def diff(old: dict[str, str | None], new: dict[str, str | None]) -> dict[str, list[str]]:
    """{new, changed, deleted, unchanged: sorted URIs} between two {uri: signature} listings."""
    return {
        "new": sorted(u for u in new if u not in old),
        "changed": sorted(u for u in new if u in old and old[u] != new[u]),
        "deleted": sorted(u for u in old if u not in new),
        "unchanged": sorted(u for u in new if u in old and old[u] == new[u]),
    }


def _rows_of(table: pa.Table, sources: set[str]) -> pa.Array:
    """Mask of the rows of `table` whose URI came from one of `sources` (a file named `x.tar#y.png` is its own)."""
    return pa.array([u in sources or source_of(u) in sources for u in table.column(S.URI).to_pylist()], pa.bool_())


def _listing_made(errors: pa.Table) -> pa.Array:
    """Mask of the error rows that the listing gives (made anew every run, never carried over)."""
    pairs = zip(errors.column(S.REASON).to_pylist(), errors.column(S.MESSAGE).to_pylist())
    return pa.array([listing_made(r, m) for r, m in pairs], pa.bool_())


def same_coarse(manifest: dict, cfg: RoiqaConfig, images: int, dim: int) -> bool:
    """Whether a version's coarse index (its manifest) is what `cfg` would build for `images` images: the same kind,
    faiss factory, hubness and regions kept. Otherwise a re-index rebuilds faiss from every row."""
    hub_k = cfg.index.hubness_k if cfg.index.coarse == "regions" else 0
    hub = manifest.get("hubness") or {}
    per_image = manifest.get("faiss_vectors", 0) / max(1, manifest.get("counts", {}).get("indexed", 0) or 1)
    factory = faiss_index.choose_factory(cfg.index.faiss_factory, round(images * per_image), dim + int(hub_k > 0))
    # regions_per_image applies to a region index with hubness (roiqa.index.faiss_index.build_coarse)
    return (
        manifest.get("coarse", "global") == cfg.index.coarse
        and manifest.get("faiss_factory") == factory
        and hub.get("k", 0) == hub_k
        and hub.get("regions_per_image", 0) == (cfg.index.regions_per_image if hub_k else 0)
    )


def carry(p: Plan, cfg: RoiqaConfig, d: dict[str, list[str]], info: dict) -> Carried:
    """The parent's rows of unchanged sources, and its faiss index minus the changed and deleted images."""
    parent = store.open_index(p.index, p.parent)
    keep = set(d["unchanged"])
    emb = faiss_index.with_current_regions(parent.embeddings(), p.dim).cast(p.schema)
    errors = parent.errors()
    kept = emb.filter(_rows_of(emb, keep))
    removed = emb.filter(pc.invert(_rows_of(emb, keep))).column(S.IMAGE_ID).to_numpy()
    errors = errors.filter(pc.and_(_rows_of(errors, keep), pc.invert(_listing_made(errors))))
    n_after = kept.num_rows + len(d["new"]) + len(d["changed"])  # an upper bound of the new row count
    same_kind = same_coarse(parent.manifest, cfg, n_after, p.dim)
    return Carried(
        kept,
        errors,
        parent.faiss() if same_kind else None,
        np.asarray(removed, np.int64),
        info,
        parent.hubness_reference() if same_kind else None,
        (parent.manifest.get("hubness") or {}).get("regions_per_image", 0),
    )


def _listing_errors_unchanged(p: Plan) -> bool:
    parent_errors = store.open_index(p.index, p.parent).errors().to_pylist()
    old = sorted((r[S.URI], r[S.REASON]) for r in parent_errors if listing_made(r[S.REASON], r[S.MESSAGE]))
    return old == sorted((u, e.reason) for u, e in p.listing.errors)


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
            reason = full_reason(p, cfg)
            old = {}
            if not reason:
                t = store.read_table(store.version_uri(index, p.parent, store.SOURCES))
                old = dict(zip(t.column(S.URI).to_pylist(), t.column(S.SIGNATURE).to_pylist()))
            d = diff(old, p.listing.signatures)
            counts = {"listed": len(p.listing.uris), **{k: len(v) for k, v in d.items()}}
            mode = "full" if reason else "incremental"
            changes = ", ".join(f"{len(d[k]):,} {k}" for k in ("new", "changed", "deleted", "unchanged"))
            progress.say(f"{mode} against version {p.parent}: {changes}" + (f" ({reason})" if reason else ""))
            nothing = not reason and not (d["new"] or d["changed"] or d["deleted"]) and _listing_errors_unchanged(p)
            if nothing and not same_coarse(store.read_manifest(index, p.parent), cfg, len(p.listing.uris), p.dim):
                nothing = False  # the images did not change, the coarse index settings did: faiss is rebuilt
                progress.say("the coarse index settings changed: faiss is rebuilt from the stored rows")
            if nothing:
                gone = store.collect_garbage(index, cfg.index.keep_versions, lock)
                m = store.read_manifest(index, p.parent)["counts"]
                counts.update(indexed=m["indexed"], errors=m["errors"], gc_deleted=len(gone))
                status, version, pipeline_s = "unchanged", None, 0.0
                progress.say(f"nothing changed; version {p.parent} stays published")
            else:
                info = {"run_id": run_id, "mode": mode, "reason": reason, **counts}
                todo = d["new"] + d["changed"]
                done = embed_uris(p, [u for u in p.listing.uris if u in set(todo)], cfg, model_uri, progress)
                carried = carry(p, cfg, d, info) if not reason else None
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
