"""Index pipeline: images URI -> read -> decode/resize (tasks) -> Embedder actors -> Parquet + faiss + CURRENT."""

from __future__ import annotations

import dataclasses
import datetime
import logging
import re
import time
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import ray

from pipelines.runtime import actor_pool, actor_resources, init_ray, pool_size
from pipelines.sources import Listing, list_images, uri_dataset
from roiqa import schema as S
from roiqa.config import RoiqaConfig, to_dict
from roiqa.index import faiss_index, store
from roiqa.io import uri as uri_mod
from roiqa.io.redact import redact
from roiqa.io.sources import account_inputs, errors_table, expand_tar, parse_error, read_files
from roiqa.models.backbone import descriptor_dim
from roiqa.models.checkpoint import describe, model_config
from roiqa.progress import Progress
from roiqa.stages.complexity import ComplexityStage
from roiqa.stages.embed import Decoder, Embedder


@dataclass(frozen=True)
class IndexReport:
    """What one run of the index pipeline did."""

    index: str  # index URI
    version: str  # the version written and published
    inputs: int  # images found (members of shards included)
    indexed: int  # rows in the embeddings table
    errors: int  # rows in the errors table
    seconds: float  # wall time of the whole run
    pipeline_seconds: float  # wall time of read -> decode -> embed -> write
    stage_seconds: dict = field(default_factory=dict)  # summed remote wall time per Ray Data operator, + "write"


_OPERATOR = re.compile(r"^Operator \d+ (.+?):", re.M)
_WALL = re.compile(r"Remote wall time: .*?([\d.]+)(us|ms|s) total")
_UNIT = {"us": 1e-6, "ms": 1e-3, "s": 1.0}


def stage_seconds(stats: str) -> dict[str, float]:
    """{operator name: summed remote wall time in seconds} from `Dataset.stats()` text (tasks and actors alike)."""
    out: dict[str, float] = {}
    parts = _OPERATOR.split(stats)
    for name, body in zip(parts[1::2], parts[2::2]):
        m = _WALL.search(body)
        if m:
            out[name] = out.get(name, 0.0) + float(m.group(1)) * _UNIT[m.group(2)]
    return out


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


def decode(batch: dict[str, np.ndarray], cfg) -> dict[str, np.ndarray]:
    return Decoder(cfg)(batch)


def _column(values: np.ndarray, field: pa.Field) -> pa.Array:
    """One numpy batch column as the Arrow type of `field` (fixed-size lists from 2-D arrays, lists from objects)."""
    t = field.type
    if pa.types.is_fixed_size_list(t):
        flat = np.ascontiguousarray(np.stack(list(values)) if values.dtype == object else values, np.float32)
        return pa.FixedSizeListArray.from_arrays(pa.array(flat.reshape(-1), t.value_type), t.list_size)
    if pa.types.is_list(t):
        return pa.array([np.asarray(v).tolist() for v in values], t)
    if pa.types.is_binary(t) or pa.types.is_string(t):
        return pa.array(list(values), t)
    return pa.array(values, t)


def embeddings_table(batch: dict[str, np.ndarray], schema: pa.Schema) -> pa.Table:
    """Good rows of an embedded batch as a table of `schema` (the embeddings schema with its stage columns)."""
    ok = np.array([not e for e in batch[S.ERROR]], dtype=bool)
    return pa.table({f.name: _column(batch[f.name][ok], f) for f in schema}, schema=schema)


def controller_table(batch: dict[str, np.ndarray], profiles: tuple[str, ...]) -> pa.Table:
    """The masks controller's history: one row per (actor, batch, profile) seen in an embedded batch."""
    rows: dict[tuple, tuple] = {}
    for i in range(len(batch[S.ERROR])):
        for p in profiles:
            key = (str(batch[S.ACTOR][i]), int(batch[S.BATCH][i]), p)
            thr = float(batch[S.mask_columns(p)[1]][i])
            if key not in rows or np.isnan(rows[key][1]):
                rows[key] = (float(batch[S.MASK_PROBE][i]) if p == profiles[0] else np.nan, thr)
    cols = list(zip(*[(*k, *v) for k, v in sorted(rows.items())])) or [[]] * 5
    return pa.table(dict(zip(S.MASKS_CONTROLLER_SCHEMA.names, cols)), schema=S.MASKS_CONTROLLER_SCHEMA)


def batch_errors(batch: dict[str, np.ndarray]) -> pa.Table:
    """Failed rows of a batch as an errors-schema table."""
    rows = [(str(u), *parse_error(str(e))) for u, e in zip(batch[S.URI], batch[S.ERROR]) if e]
    return errors_table(rows)


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


def final_thresholds(hist: pa.Table) -> dict[str, list[float]]:
    """{profile: [last threshold of each actor]} from a masks controller history table."""
    df = hist.to_pandas()
    last = df.sort_values(S.BATCH).groupby([S.PROFILE, S.ACTOR])[S.THRESHOLD].last()
    return {p: [float(v) for v in last[p].to_numpy()] for p in last.index.get_level_values(0).unique()}


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


def describe_model(model_uri: str | None, cfg: RoiqaConfig) -> dict:
    """describe() plus the checkpoint's sha256: a checkpoint replaced at the same URI counts as a new model."""
    out = describe(model_uri, cfg.model)
    if model_uri is not None:
        out["sha256"] = store.sha256(uri_mod.read_bytes(model_uri))
    return out


def plan(images: str, index: str, cfg: RoiqaConfig, model_uri: str | None) -> Plan:
    images, index = uri_mod.normalize(images), uri_mod.normalize(index)
    faiss_index.check_coarse(cfg.index.coarse)  # before any image is embedded
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


def embed_uris(
    p: Plan, uris: list[str], cfg: RoiqaConfig, model_uri: str | None, progress: Progress | None = None
) -> Embedded:
    """Read, decode and embed `uris` with Ray Data actors; write the good rows under the version's embeddings/."""
    t1 = time.perf_counter()
    progress = progress or Progress()
    if not uris:
        return Embedded(S.ERRORS_SCHEMA.empty_table(), {}, 0.0, None)
    init_ray(progress_bars=progress.enabled)
    ic = cfg.index
    progress.say(f"embedding {len(uris):,} inputs ({pool_size(ic.actors, ic.max_actors)}, batches of {ic.batch_size})")
    masks = cfg.masks if cfg.masks.enabled else None
    pool = {"compute": actor_pool(ic.actors, ic.max_actors)}
    # With the complexity stage on, its actors and the embedding actors take half a GPU each: halves always pack
    # N + N actors onto N GPUs (a 0.25 / 0.75 split can strand a 0.75 actor when two quarters share one GPU).
    share = 0.5 if cfg.complexity.enabled else 0.0
    ds = uri_dataset(uris, ic.read_batch_size, [p.listing.sizes.get(u) for u in uris])
    read_kwargs = {"max_bytes": ic.max_image_bytes}
    ds = ds.map_batches(read_any, fn_kwargs=read_kwargs, batch_size=ic.read_batch_size, batch_format="numpy")
    ds = ds.map_batches(decode, fn_kwargs={"cfg": cfg.preprocess}, batch_size=ic.read_batch_size, batch_format="numpy")
    if cfg.complexity.enabled:
        ds = ds.map_batches(
            ComplexityStage,
            fn_constructor_kwargs={"cfg": cfg.complexity, "threads": ic.torch_threads},
            batch_size=ic.batch_size,
            batch_format="numpy",
            **pool,
            **actor_resources(ic.actor_cpus, share),
        )
    ds = ds.map_batches(
        Embedder,
        fn_constructor_kwargs={
            "model_cfg": cfg.model,
            "model_uri": model_uri,
            "threads": ic.torch_threads,
            "masks": masks,
        },
        batch_size=ic.batch_size,
        batch_format="numpy",
        **pool,
        **actor_resources(ic.actor_cpus, 1.0 - share),
    )
    ds = ds.materialize()  # rows are small once embedded; both tables below read this one result
    stages = stage_seconds(ds.stats())

    good = ds.map_batches(embeddings_table, fn_kwargs={"schema": p.schema}, batch_format="numpy", batch_size=1024)
    emb_uri = store.version_uri(p.index, p.version, store.EMBEDDINGS)
    fs, emb_path = uri_mod.filesystem(emb_uri)
    tw = time.perf_counter()

    def write() -> None:  # a write cut off by an outage is removed whole before it is retried (no repeated rows)
        try:
            good.write_parquet(emb_path, filesystem=fs)
        except Exception:
            uri_mod.delete(emb_uri, recursive=True)
            raise

    uri_mod.retrying(emb_uri, "write", write)
    stages["write"] = time.perf_counter() - tw
    bad = ds.map_batches(batch_errors, batch_format="numpy", batch_size=1024)
    errors = pa.concat_tables([S.ERRORS_SCHEMA.empty_table(), *[t for t in ray.get(bad.to_arrow_refs()) if t.num_rows]])
    hist = None
    if masks is not None:
        profiles = tuple(p.stages_on["fields"]["profiles"])
        h = ds.map_batches(controller_table, fn_kwargs={"profiles": profiles}, batch_format="numpy", batch_size=None)
        parts = pa.concat_tables([S.MASKS_CONTROLLER_SCHEMA.empty_table(), *ray.get(h.to_arrow_refs())])
        keys = [S.ACTOR, S.BATCH, S.PROFILE]  # a batch split over blocks appears once per block: merge (max skips nan)
        df = parts.to_pandas().groupby(keys, as_index=False).max().sort_values(keys)
        hist = pa.Table.from_pandas(df, schema=S.MASKS_CONTROLLER_SCHEMA, preserve_index=False)
    seconds, n = time.perf_counter() - t1, ds.count()  # rows: shards count as their members
    progress.done(
        f"embedded {n:,} images ({n - errors.num_rows:,} indexed, {errors.num_rows:,} errors)", seconds, n, "images"
    )
    return Embedded(errors.cast(S.ERRORS_SCHEMA), stages, seconds, hist)


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
    listing_errors = errors_table([(u, *parse_error(e)) for u, e in p.listing.errors])
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
        parent = faiss_index.Parent(carried.faiss, carried.removed_ids, kept, carried.hubness)
    coarse = faiss_index.build_coarse(emb, p.dim, mode, ic.faiss_factory, ic.hubness_k, ic.hubness_reference, parent)
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
            {"hubness": {"k": ic.hubness_k, "reference": coarse.reference.num_rows}}
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


def run_index(
    images: str, index: str, cfg: RoiqaConfig, model_uri: str | None = None, progress: Progress | None = None
) -> IndexReport:
    """Index every image under `images` into a new version of `index` and publish it.

    The new version is written under versions/<id>/ and CURRENT is replaced only after everything (embeddings,
    errors, sources, faiss index, manifest) is written, so readers keep the old version until the new one is whole.
    Every input ends up in exactly one of the embeddings and errors tables. The index's LOCK is held throughout;
    afterwards only the newest `index.keep_versions` published versions are kept. `progress`: where the stages
    report (listed, embedded, faiss written, published); default none.
    """
    t0 = time.perf_counter()
    started = datetime.datetime.now(datetime.timezone.utc)
    run_id = uri_mod.new_version_id()
    index = uri_mod.normalize(index)
    p = None
    with store.IndexLock(index, cfg.index.lock_ttl_s, "roiqa index") as lock:
        try:
            p = plan(images, index, cfg, model_uri)
            listed(p, progress, time.perf_counter() - t0)
            done = embed_uris(p, p.listing.uris, cfg, model_uri, progress)
            manifest = write_version(p, cfg, done, lock=lock, progress=progress)
            gone = store.collect_garbage(index, cfg.index.keep_versions, lock)
        except BaseException as exc:
            record_failure(index, run_row("index", run_id, started, p, status="failed", message=f"{exc}"))
            raise
        counts = manifest["counts"]
        n = len(p.listing.uris)
        store.write_run(
            index,
            run_row(
                "index", run_id, started, p, status="published", mode="full", version=p.version, listed=n, new=n,
                changed=0, deleted=0, unchanged=0, indexed=counts["indexed"], errors=counts["errors"],
                gc_deleted=len(gone),
            ),
        )  # fmt: skip
    return IndexReport(
        index, p.version, counts["inputs"], counts["indexed"], counts["errors"], time.perf_counter() - t0,
        done.seconds, done.stages,
    )  # fmt: skip


def split_duplicates(emb: pa.Table) -> tuple[pa.Table, pa.Table]:
    """(embeddings rows kept, `duplicate_uri` error rows) where several rows share an image id.

    Rows of one URI (a file named `x.tar#y.png` beside a shard `x.tar` that holds `y.png`; a manifest listing a
    shard and one of its members) are all refused: reading that URI back could not tell which one was meant.
    Different URIs with one id (a 64-bit hash collision) keep the first URI in sort order.
    """
    ids = emb.column(S.IMAGE_ID).to_numpy()
    uniq, counts = np.unique(ids, return_counts=True)
    if (counts == 1).all():
        return emb, S.ERRORS_SCHEMA.empty_table()
    shared = set(uniq[counts > 1].tolist())
    uris = emb.column(S.URI).to_pylist()
    groups: dict[int, list[int]] = {}
    for row, i in enumerate(ids.tolist()):
        if i in shared:
            groups.setdefault(i, []).append(row)
    keep = np.ones(len(ids), dtype=bool)
    rows = []
    for i, members in groups.items():
        per_uri = Counter(uris[r] for r in members)
        alone = sorted(u for u, c in per_uri.items() if c == 1)
        first = alone[0] if alone else None
        for r in members:
            if uris[r] == first:
                continue
            keep[r] = False
            n = per_uri[uris[r]]
            if n > 1:
                message = f"{n} inputs (a file and a tar member, ...) are read as this URI; none is indexed"
            else:
                message = f"its image id {i} is already that of {first}"
            rows.append((uris[r], "read", "duplicate_uri", message))
    return emb.filter(pa.array(keep)), errors_table(rows)
