"""Index pipeline: images URI -> read -> decode/resize (tasks) -> Embedder actors -> Parquet + faiss + CURRENT."""

from __future__ import annotations

import datetime
import time
from dataclasses import dataclass, field

import pyarrow as pa
import ray

from pipelines.runtime import actor_pool, actor_resources, init_ray, pool_size, stage_seconds
from pipelines.sources import uri_dataset
from roiqa import schema as S
from roiqa.config import RoiqaConfig
from roiqa.index import store
from roiqa.index.tables import batch_errors, controller_table, embeddings_table, merge_history
from roiqa.index.version import Embedded, Plan, listed, plan, record_failure, run_row, write_version
from roiqa.io import uri as uri_mod
from roiqa.io.sources import read_any
from roiqa.progress import Progress
from roiqa.stages.complexity import ComplexityStage
from roiqa.stages.embed import Embedder, decode


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
        hist = merge_history(ray.get(h.to_arrow_refs()))
    seconds, n = time.perf_counter() - t1, ds.count()  # rows: shards count as their members
    progress.done(
        f"embedded {n:,} images ({n - errors.num_rows:,} indexed, {errors.num_rows:,} errors)", seconds, n, "images"
    )
    return Embedded(errors.cast(S.ERRORS_SCHEMA), stages, seconds, hist)


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
