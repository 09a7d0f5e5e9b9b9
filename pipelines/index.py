"""Index pipeline: images URI -> read -> decode/resize (tasks) -> Embedder actors -> Parquet + faiss + CURRENT."""

from __future__ import annotations

import datetime
import re
import time
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import ray

from pipelines.runtime import actor_resources, init_ray
from pipelines.sources import list_images, uri_dataset
from roiqa import faiss_index
from roiqa import index_store as store
from roiqa import schema as S
from roiqa import uri as uri_mod
from roiqa.config import RoiqaConfig, to_dict
from roiqa.embed import Decoder, Embedder
from roiqa.models.checkpoint import describe, model_config
from roiqa.sources import errors_table, expand_tar, parse_error, read_files


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


def read_any(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Dispatch each URI of the batch to the shard expander or the file reader, keeping one output table."""
    uris = [str(u) for u in batch[S.URI]]
    tars = [u for u in uris if u.lower().endswith(uri_mod.TAR_EXTENSIONS)]
    files = [u for u in uris if not u.lower().endswith(uri_mod.TAR_EXTENSIONS)]
    parts = []
    if files:
        parts.append(read_files({S.URI: np.array(files, dtype=object)}))
    if tars:
        parts.append(expand_tar({S.URI: np.array(tars, dtype=object)}))
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def decode(batch: dict[str, np.ndarray], cfg) -> dict[str, np.ndarray]:
    return Decoder(cfg)(batch)


def embeddings_table(batch: dict[str, np.ndarray], dim: int) -> pa.Table:
    """Good rows of an embedded batch as an embeddings-schema table (Arrow fixed-size lists, not objects)."""
    ok = np.array([not e for e in batch[S.ERROR]], dtype=bool)
    emb = np.ascontiguousarray(batch[S.EMBEDDING][ok], dtype=np.float32)
    cols = {
        S.IMAGE_ID: pa.array(batch[S.IMAGE_ID][ok], pa.int64()),
        S.URI: pa.array(list(batch[S.URI][ok]), pa.string()),
        S.WIDTH: pa.array(batch[S.WIDTH][ok], pa.int32()),
        S.HEIGHT: pa.array(batch[S.HEIGHT][ok], pa.int32()),
        S.SIZE_BYTES: pa.array(batch[S.SIZE_BYTES][ok], pa.int64()),
        S.CONTENT_HASH: pa.array(list(batch[S.CONTENT_HASH][ok]), pa.string()),
        S.EMBEDDING: pa.FixedSizeListArray.from_arrays(pa.array(emb.reshape(-1), pa.float32()), dim),
    }
    return pa.table(cols, schema=S.embeddings_schema(dim))


def batch_errors(batch: dict[str, np.ndarray]) -> pa.Table:
    """Failed rows of a batch as an errors-schema table."""
    rows = [(str(u), *parse_error(str(e))) for u, e in zip(batch[S.URI], batch[S.ERROR]) if e]
    return errors_table(rows)


def run_index(images: str, index: str, cfg: RoiqaConfig, model_uri: str | None = None) -> IndexReport:
    """Index every image under `images` into a new version of `index` and publish it.

    The new version is written under versions/<id>/ and CURRENT is replaced only after everything (embeddings,
    errors, faiss index, manifest) is written, so readers keep the old version until the new one is whole.
    Every input ends up in exactly one of the embeddings and errors tables.
    """
    t0 = time.perf_counter()
    init_ray()
    images, index = uri_mod.normalize(images), uri_mod.normalize(index)
    parent = store.current_version(index)
    version = uri_mod.new_version_id()
    listing = list_images(images)
    ic = cfg.index
    dim = model_config(model_uri, cfg.model).fpn_channels  # the checkpoint's own width when one is given

    t1 = time.perf_counter()
    ds = uri_dataset(listing.uris, ic.read_batch_size)
    ds = ds.map_batches(read_any, batch_size=ic.read_batch_size, batch_format="numpy")
    ds = ds.map_batches(decode, fn_kwargs={"cfg": cfg.preprocess}, batch_size=ic.read_batch_size, batch_format="numpy")
    ds = ds.map_batches(
        Embedder,
        fn_constructor_kwargs={"model_cfg": cfg.model, "model_uri": model_uri, "threads": ic.torch_threads},
        compute=ray.data.ActorPoolStrategy(size=ic.actors),
        batch_size=ic.batch_size,
        batch_format="numpy",
        **actor_resources(ic.actor_cpus),
    )
    ds = ds.materialize()  # rows are small once embedded; both tables below read this one result
    stages = stage_seconds(ds.stats())

    good = ds.map_batches(embeddings_table, fn_kwargs={"dim": dim}, batch_format="numpy", batch_size=1024)
    fs, emb_path = uri_mod.filesystem(store.version_uri(index, version, store.EMBEDDINGS))
    tw = time.perf_counter()
    good.write_parquet(emb_path, filesystem=fs)
    stages["write"] = time.perf_counter() - tw
    bad = ds.map_batches(batch_errors, batch_format="numpy", batch_size=1024)
    err_tables = [t for t in ray.get(bad.to_arrow_refs()) if t.num_rows]
    errors = pa.concat_tables([errors_table([(u, *parse_error(e)) for u, e in listing.errors]), *err_tables])
    errors = errors.cast(S.ERRORS_SCHEMA)
    t2 = time.perf_counter()

    emb = store.read_table(store.version_uri(index, version, store.EMBEDDINGS)) if fs.exists(emb_path) else None
    if emb is None or emb.num_rows == 0:
        emb = S.embeddings_schema(dim).empty_table()
    vectors = np.asarray(emb.column(S.EMBEDDING).combine_chunks().flatten(), np.float32).reshape(-1, dim)
    ids = emb.column(S.IMAGE_ID).to_numpy()
    dup = _duplicates(emb)
    if dup:
        raise ValueError(f"{images}: two inputs map to one image id (same URI listed twice?): {dup[:3]}")
    factory = faiss_index.choose_factory(ic.faiss_factory, len(ids), dim)
    faiss_bytes = faiss_index.save(
        faiss_index.build_index(vectors, ids, factory), store.version_uri(index, version, store.FAISS)
    )
    errors_bytes = store.write_table(errors, store.version_uri(index, version, store.ERRORS))
    inputs = emb.num_rows + errors.num_rows
    manifest = {
        "version": version,
        "parent": parent,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(),
        "images": images,
        "source_kind": listing.kind,
        "model": describe(model_uri, cfg.model),
        "config": to_dict(cfg),
        "counts": {"inputs": inputs, "indexed": emb.num_rows, "errors": errors.num_rows},
        "embedding_dim": dim,
        "faiss_factory": factory,
        "checksums": {store.FAISS: store.sha256(faiss_bytes), store.ERRORS: store.sha256(errors_bytes)},
    }
    store.write_manifest(index, version, manifest)
    store.publish(index, version)
    return IndexReport(index, version, inputs, emb.num_rows, errors.num_rows, time.perf_counter() - t0, t2 - t1, stages)


def _duplicates(emb: pa.Table) -> list[str]:
    ids = emb.column(S.IMAGE_ID).to_numpy()
    uniq, counts = np.unique(ids, return_counts=True)
    if (counts == 1).all():
        return []
    bad = set(uniq[counts > 1].tolist())
    return [u for i, u in zip(ids, emb.column(S.URI).to_pylist()) if i in bad]
