"""What a re-index can reuse of the published version: why it must embed everything again, which sources changed,
and the parent's rows and faiss index that it carries over (pipelines.reindex embeds the rest)."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from roiqa import schema as S
from roiqa.config import RoiqaConfig, to_dict
from roiqa.index import faiss_index, store
from roiqa.index.version import Carried, Plan
from roiqa.io import uri as uri_mod
from roiqa.io.listing import listing_made

# Config sections whose change makes every stored embedding stale.
EMBEDDING_SECTIONS = ("model", "preprocess", "complexity", "masks")


def full_reason(p: Plan, cfg: RoiqaConfig, parent: store.IndexVersion | None) -> str:
    """Why the parent's rows cannot be reused ("" when they can)."""
    if parent is None:
        return "no published version"
    old = parent.manifest
    if not uri_mod.exists(parent.uri(store.SOURCES)):
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


def signatures(parent: store.IndexVersion) -> dict[str, str | None]:
    """{uri: signature} of the sources the parent version was built from."""
    t = store.read_table(parent.uri(store.SOURCES))
    return dict(zip(t.column(S.URI).to_pylist(), t.column(S.SIGNATURE).to_pylist()))


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


def rows_of(table: pa.Table, sources: set[str]) -> pa.Array:
    """Mask of the rows of `table` whose URI came from one of `sources` (a file named `x.tar#y.png` is its own)."""
    return pa.array([u in sources or source_of(u) in sources for u in table.column(S.URI).to_pylist()], pa.bool_())


def listing_rows(errors: pa.Table) -> pa.Array:
    """Mask of the error rows that the listing gives (made anew every run, never carried over)."""
    pairs = zip(errors.column(S.REASON).to_pylist(), errors.column(S.MESSAGE).to_pylist())
    return pa.array([listing_made(r, m) for r, m in pairs], pa.bool_())


def listing_errors_unchanged(p: Plan, parent: store.IndexVersion) -> bool:
    """Whether this listing's unreadable inputs are the parent's, for the same reasons."""
    rows = parent.errors().to_pylist()
    old = sorted((r[S.URI], r[S.REASON]) for r in rows if listing_made(r[S.REASON], r[S.MESSAGE]))
    return old == sorted((u, e.reason) for u, e in p.listing.errors)


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


def carry(p: Plan, cfg: RoiqaConfig, d: dict[str, list[str]], info: dict, parent: store.IndexVersion) -> Carried:
    """The parent's rows of unchanged sources, and its faiss index minus the changed and deleted images."""
    keep = set(d["unchanged"])
    emb = faiss_index.with_current_regions(parent.embeddings(), p.dim).cast(p.schema)
    kept = emb.filter(rows_of(emb, keep))
    removed = emb.filter(pc.invert(rows_of(emb, keep))).column(S.IMAGE_ID).to_numpy()
    errors = parent.errors()
    errors = errors.filter(pc.and_(rows_of(errors, keep), pc.invert(listing_rows(errors))))
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
