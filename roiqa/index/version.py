"""One index version from start to publication, without Ray: the run's plan, the optional stages' settings, what
the version carries from its parent, its files and manifest, its publication, and the runs table's rows."""

from __future__ import annotations

import dataclasses
import datetime
import logging
import time
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from roiqa import schema as S
from roiqa.config import RoiqaConfig, to_dict
from roiqa.errors import errors_table
from roiqa.index import faiss_index, store
from roiqa.index.tables import final_thresholds, split_duplicates
from roiqa.io import uri as uri_mod
from roiqa.io.listing import Listing, list_images
from roiqa.io.redact import redact
from roiqa.io.sources import account_inputs
from roiqa.models.backbone import descriptor_dim
from roiqa.models.checkpoint import describe, model_config
from roiqa.progress import Progress


def stage_settings(cfg: RoiqaConfig) -> dict:
    """What the manifest records about the optional stages, and the stage columns they add ("fields")."""
    out: dict = {"fields": {"complexity": cfg.complexity.enabled, "patch_dim": None, "profiles": ()}}
    if cfg.complexity.enabled:
        out["complexity"] = to_dict(cfg.complexity)
        if cfg.complexity.model:
            from roiqa.models.patchnet import load_patchnet

            out["fields"]["patch_dim"] = load_patchnet(cfg.complexity.model).cfg.dim
    if cfg.masks.enabled:
        from roiqa.stages.masks import load_profile

        loaded = [(uri, load_profile(uri)[0]) for uri in cfg.masks.profiles]
        out["fields"]["profiles"] = tuple(p.name for _, p in loaded)
        out["masks"] = {
            **to_dict(cfg.masks),
            "profiles": [{"uri": uri, **dataclasses.asdict(p)} for uri, p in loaded],
        }
    return out


@dataclass
class Plan:
    """What an index run knows before reading any image bytes."""

    images: str  # canonical images URI
    index: str  # canonical index URI
    version: str  # the version it writes
    parent: str | None  # the published version when it started
    listing: Listing  # what `images` lists to
    dim: int  # embedding width
    stages_on: dict  # stage_settings(cfg)
    schema: pa.Schema  # the embeddings schema with its stage columns
    model: dict  # the manifest's description of the model (with its checkpoint's sha256)


@dataclass
class Embedded:
    """What embedding a list of URIs produced (the embeddings themselves are already written)."""

    errors: pa.Table  # rows that failed to read, decode or embed
    stages: dict  # stage_seconds of the run, + "write"
    seconds: float  # wall time of read -> decode -> embed -> write
    history: pa.Table | None  # the masks controller history (masks stage only)


@dataclass
class Carried:
    """Rows of the parent version that a re-index keeps, and the parent's faiss index to update in place."""

    embeddings: pa.Table
    errors: pa.Table
    faiss: object | None  # the parent's faiss index (None: rebuild from every vector)
    removed_ids: np.ndarray  # image ids to remove from it (changed and deleted images)
    info: dict  # what the manifest records under "reindex"
    hubness: pa.Table | None = None  # the parent's hubness reference (roiqa.index.hubness), when it has one
    regions_per_image: int = 0  # what the parent's faiss index kept of each image (index.regions_per_image)


def describe_model(model_uri: str | None, cfg: RoiqaConfig) -> dict:
    """describe() plus the checkpoint's sha256: a checkpoint replaced at the same URI counts as a new model."""
    out = describe(model_uri, cfg.model)
    if model_uri is not None:
        out["sha256"] = store.sha256(uri_mod.read_bytes(model_uri))
    return out


def plan(images: str, index: str, cfg: RoiqaConfig, model_uri: str | None) -> Plan:
    images, index = uri_mod.normalize(images), uri_mod.normalize(index)
    faiss_index.check_coarse(cfg.index.coarse)  # before any image is embedded
    if cfg.index.regions_per_image < 0:
        raise ValueError(f"index.regions_per_image must be >= 0 (0: every region), got {cfg.index.regions_per_image}")
    dim = descriptor_dim(model_config(model_uri, cfg.model))  # the checkpoint's own width when one is given
    stages_on = stage_settings(cfg)
    return Plan(
        images=images,
        index=index,
        version=uri_mod.new_version_id(),
        parent=store.current_version(index),
        listing=list_images(images, cfg.index.allowed_prefixes),
        dim=dim,
        stages_on=stages_on,
        schema=S.embeddings_schema(dim, S.stage_fields(**stages_on["fields"])),
        model=describe_model(model_uri, cfg),
    )


def write_version(
    p: Plan,
    cfg: RoiqaConfig,
    done: Embedded,
    carried: Carried | None = None,
    lock: store.IndexLock | None = None,
    progress: Progress | None = None,
) -> dict:
    """Write errors, sources, faiss and manifest of the new version (its new embeddings are already written; the
    carried rows are added), then publish it by replacing CURRENT last. Returns the manifest."""
    emb_uri = store.version_uri(p.index, p.version, store.EMBEDDINGS)
    if carried is not None and carried.embeddings.num_rows:
        store.write_table(carried.embeddings.cast(p.schema), uri_mod.join(emb_uri, f"carried-{p.parent}.parquet"))
    emb = store.read_table(emb_uri) if uri_mod.exists(emb_uri) else None
    if emb is None or emb.num_rows == 0:
        emb = p.schema.empty_table()
    emb, collided = split_duplicates(emb)
    if collided.num_rows:  # rewrite the embeddings without them, so that readers see exactly the indexed rows
        uri_mod.delete(emb_uri, recursive=True)
        store.write_table(emb, uri_mod.join(emb_uri, "deduplicated.parquet"))
    listing_errors = errors_table(p.listing.errors)
    read_errors = pa.concat_tables([done.errors, *([carried.errors] if carried else []), collided])
    counts = account_inputs(  # before faiss and the manifest are written: a lost input fails the run
        p.listing.uris,
        listing_errors.num_rows,
        emb.column(S.URI).to_pylist(),
        list(zip(read_errors.column(S.URI).to_pylist(), read_errors.column(S.REASON).to_pylist())),
    )
    errors = pa.concat_tables([listing_errors, read_errors]).cast(S.ERRORS_SCHEMA)
    mode, ic = cfg.index.coarse, cfg.index
    tf = time.perf_counter()
    parent = None
    if carried is not None and carried.faiss is not None:
        kept = np.asarray(carried.embeddings.column(S.IMAGE_ID).to_numpy(), np.int64)
        parent = faiss_index.Parent(
            carried.faiss, carried.removed_ids, kept, carried.hubness, carried.regions_per_image
        )
    coarse = faiss_index.build_coarse(
        emb, p.dim, mode, ic.faiss_factory, ic.hubness_k, ic.hubness_reference, parent, ic.regions_per_image
    )  # regions_per_image applies to a region index with hubness; others keep every vector
    index, factory = coarse.index, coarse.factory
    faiss_bytes = faiss_index.save(index, store.version_uri(p.index, p.version, store.FAISS))
    checksums = {store.FAISS: store.sha256(faiss_bytes)}
    if coarse.reference is not None:
        ref_bytes = store.write_table(coarse.reference, store.version_uri(p.index, p.version, store.HUBNESS))
        checksums[store.HUBNESS] = store.sha256(ref_bytes)
    (progress or Progress()).done(
        f"{coarse.how} faiss index ({int(index.ntotal):,} vectors, {factory})", time.perf_counter() - tf
    )
    errors_bytes = store.write_table(errors, store.version_uri(p.index, p.version, store.ERRORS))
    sig = p.listing.signatures
    sources = pa.table({S.URI: list(sig), S.SIGNATURE: list(sig.values())}, schema=S.SOURCES_SCHEMA)
    store.write_table(sources, store.version_uri(p.index, p.version, store.SOURCES))
    stages_on = {k: v for k, v in p.stages_on.items() if k != "fields"}
    if done.history is not None:
        store.write_table(done.history, store.version_uri(p.index, p.version, store.MASKS_CONTROLLER))
        stages_on["masks"]["final_thresholds"] = final_thresholds(done.history)
    manifest = {
        "version": p.version,
        "parent": p.parent,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(),
        "images": redact(p.images),
        "source_kind": p.listing.kind,
        "model": p.model,
        "config": to_dict(cfg),
        "counts": counts,
        "embedding_dim": p.dim,
        "stages": stages_on,
        "faiss_factory": factory,
        "coarse": mode,
        **(
            {
                "hubness": {
                    "k": ic.hubness_k,
                    "reference": coarse.reference.num_rows,
                    "regions_per_image": coarse.regions_per_image,
                }
            }
            if coarse.reference is not None
            else {}
        ),
        "faiss_vectors": int(index.ntotal),
        "checksums": {**checksums, store.ERRORS: store.sha256(errors_bytes)},
    }
    if carried is not None:
        manifest["reindex"] = carried.info
    store.write_manifest(p.index, p.version, manifest)
    store.publish(p.index, p.version, lock)
    (progress or Progress()).say(
        f"published version {p.version} ({counts['indexed']:,} indexed, {counts['errors']:,} errors)"
    )
    return manifest


def listed(p: Plan, progress: Progress | None, seconds: float) -> None:
    """The progress line of a finished listing: inputs found (shards count once) and listing errors."""
    errs = f" and {len(p.listing.errors):,} unreadable" if p.listing.errors else ""
    (progress or Progress()).done(f"listed {len(p.listing.uris):,} inputs{errs} under {redact(p.images)}", seconds)


def run_row(kind: str, run_id: str, started: datetime.datetime, p: Plan | None, **values) -> dict:
    """One row of the runs table (roiqa.schema.RUNS_SCHEMA)."""
    row = {
        S.RUN_ID: run_id,
        S.STARTED: started,
        S.KIND: kind,
        "images": redact(p.images) if p else None,
        S.PARENT: p.parent if p else None,
        S.SECONDS: (datetime.datetime.now(datetime.timezone.utc) - started).total_seconds(),
    }
    row.update(values)
    if row.get(S.MESSAGE):
        row[S.MESSAGE] = redact(str(row[S.MESSAGE]))[:2000]
    return row


def record_failure(index: str, row: dict) -> None:
    """Best effort: a failed run's row (the store may be the thing that failed)."""
    try:
        store.write_run(index, row)
    except Exception as exc:  # noqa: BLE001 - the original error is what the caller raises
        logging.getLogger(__name__).warning("could not record the failed run in %s: %s", index, redact(str(exc)))
