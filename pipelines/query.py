"""Query pipeline: queries -> descriptors (actors) -> faiss top-K -> geometric check and Reranker actors -> results
Parquet, errors, overlays and report.html, published as one run."""

from __future__ import annotations

import time
from dataclasses import dataclass

import pandas as pd
import pyarrow as pa
import ray

from pipelines.runtime import actor_pool, actor_resources, init_ray, pool_size, table_dataset
from roiqa import errors as row_errors
from roiqa import schema as S
from roiqa.config import RoiqaConfig, to_dict
from roiqa.index import store
from roiqa.io import uri as uri_mod
from roiqa.io.queries import QueryMap, load_queries, query_map
from roiqa.models.matcher import Matcher
from roiqa.progress import Progress
from roiqa.results import expansion
from roiqa.results import html as report
from roiqa.results import output as query_output
from roiqa.results.ranking import (
    Coarse,
    coarse_search,
    index_config,
    is_region_index,
    query_errors,
    rank_results,
    search_views,
    split_failed,
    with_uris,
)
from roiqa.stages.rerank import GeometryCheck, QueryEncoder, Reranker, coarse_slots


@dataclass(frozen=True)
class QueryReport:
    """What one run of the query pipeline did."""

    out: str  # output URI
    queries: int  # queries read
    results: int  # rows in results.parquet
    errors: int  # rows in errors.parquet
    seconds: float  # wall time of the run
    coarse_seconds: float  # query descriptors + faiss search
    rerank_seconds: float  # dense reranking of the shortlists
    run: str  # the run's folder, out/runs/<run_id>, which out/CURRENT names
    report: str | None = None  # the run's report.html (None with query.report off)


def encode_stage(qtable: pa.Table, cfg: RoiqaConfig, model_uri: str | None, regions: bool, res: dict) -> pa.Table:
    """The query descriptors (one actor: queries are few), with their error columns."""
    qc = cfg.query
    qds = table_dataset(qtable).map_batches(
        QueryEncoder,
        fn_constructor_kwargs={"cfg": cfg, "model_uri": model_uri, "threads": qc.torch_threads, "regions": regions},
        compute=ray.data.ActorPoolStrategy(size=1),
        batch_size=32,
        batch_format="numpy",
        **res,
    )
    return pa.concat_tables(ray.get(qds.to_arrow_refs()))


def geometry_stage(
    coarse: Coarse, uris: dict[int, str], qmap: QueryMap, cfg: RoiqaConfig, res: dict, start: int, done=frozenset()
) -> pd.DataFrame:
    """GeometryCheck's rows for the coarse shortlist's ranks [start, geometry.shortlist), less the (query_id,
    image_id) pairs of `done`; empty with geometry off."""
    gc, qc = cfg.geometry, cfg.query
    past = coarse.shortlist(min(gc.shortlist, qc.top_k), start=start, exclude=done) if gc.enabled else None
    if past is None or not past.num_rows:
        return pd.DataFrame(columns=[S.QUERY_ID, S.IMAGE_ID, S.INLIERS, *S.BOX, *row_errors.COLUMNS])
    gds = table_dataset(with_uris(past, uris), 4 * max(qc.actors, qc.max_actors))
    gds = gds.map_batches(
        GeometryCheck,
        fn_constructor_kwargs={"cfg": cfg, "queries": qmap},
        compute=actor_pool(qc.actors, qc.max_actors),
        batch_size=16,
        batch_format="numpy",
        **res,
    )
    return pa.concat_tables(ray.get(gds.to_arrow_refs())).to_pandas()


def pairs(frame: pd.DataFrame) -> set[tuple[str, int]]:
    """The (query_id, image_id) pairs of a frame's rows."""
    return set(zip(frame[S.QUERY_ID].astype(str), frame[S.IMAGE_ID].astype(int)))


def expand_stage(
    coarse: Coarse, version: store.IndexVersion, index, uris: dict[int, str], checked: pd.DataFrame, cfg: RoiqaConfig
) -> tuple[Coarse, dict[str, int]]:
    """The coarse search again with each query's views expanded by its most strongly verified images' regions
    (roiqa.results.expansion); the search as it was for queries no image verified. Also: regions taken per query."""
    picks = expansion.strongest(checked, cfg.geometry.min_inliers, cfg.query.expand)
    if not picks:  # nothing verified: no need to list what faiss holds
        return coarse, {}
    stride = Matcher.stride(cfg.model.descriptor_level)
    source = expansion.RegionSource(index, coarse.views.shape[-1], stride)
    views, taken = expansion.expand_views(coarse.views, coarse.used, coarse.query_ids, picks, source)
    if not taken:
        return coarse, taken
    return search_views(version, index, uris, coarse.query_ids, views, coarse.used, cfg), taken


def rerank_stage(
    cand: pa.Table, qmap: QueryMap, cfg: RoiqaConfig, model_uri: str | None, overlays: str | None, res: dict
) -> pd.DataFrame:
    """One row per (query, candidate image) from the Reranker actors, with their error columns."""
    qc = cfg.query
    rds = table_dataset(cand, 4 * max(qc.actors, qc.max_actors))
    rds = rds.map_batches(
        Reranker,
        fn_constructor_kwargs={
            "cfg": cfg,
            "queries": qmap,
            "model_uri": model_uri,
            "overlay_dir": overlays,
            "threads": qc.torch_threads,
        },
        compute=actor_pool(qc.actors, qc.max_actors),
        batch_size=qc.batch_size,
        batch_format="numpy",
        **res,
    )
    reranked = pa.concat_tables(ray.get(rds.to_arrow_refs())).to_pandas()
    for c in (S.REFINE_STEPS, S.INLIERS):  # -1: not refined / not verified
        reranked[c] = reranked[c].where(reranked[c] >= 0)
    return reranked


def report_stage(
    results: pd.DataFrame, qmap: dict[str, tuple[str, list[float] | None]], run: query_output.QueryRun, cfg: RoiqaConfig
) -> tuple[pd.DataFrame, dict[tuple[str, str, int], bytes]]:
    """Rename the overlays by rank and draw report.html's thumbnails (Ray tasks); returns the results with the
    renamed heatmap_uri and {(kind, query_id, rank): JPEG bytes}."""
    qc = cfg.query
    work = report.plan(
        results, qmap, run.folder, qc.report_top if qc.report else 0, qc.report_queries if qc.report else 0
    )
    if not len(work):
        return results, {}
    ds = table_dataset(pa.Table.from_pandas(work, preserve_index=False), 16)
    ds = ds.map_batches(
        report.draw,
        fn_kwargs={"long_side": qc.report_thumb, "max_pixels": cfg.preprocess.max_pixels},
        batch_size=8,
        batch_format="numpy",
    )
    done = pa.concat_tables(ray.get(ds.to_arrow_refs())).to_pandas()
    moved = done[done[report.KIND] == "overlay"]
    renamed = {(q, int(r)): t for q, r, t in zip(moved[S.QUERY_ID], moved[S.RANK], moved[report.TARGET])}
    if renamed:
        keys = zip(results[S.QUERY_ID], results[S.RANK].astype(int))
        results = results.assign(**{S.HEATMAP_URI: [renamed.get(k, h) for k, h in zip(keys, results[S.HEATMAP_URI])]})
    drawn = done[done[report.KIND] != "overlay"]
    keys = zip(drawn[report.KIND], drawn[S.QUERY_ID], drawn[S.RANK].astype(int))
    thumbs = {k: bytes(t) for k, t in zip(keys, drawn[report.THUMB])}
    return results, thumbs


def run_query(index: str, queries: str, out: str, cfg: RoiqaConfig, progress: Progress | None = None) -> QueryReport:
    """Search the published version of `index` for every query; write results, errors and overlays to a new run
    folder under `out` and publish it (roiqa.results.output). `progress`: where the stages report; default none."""
    t0 = time.perf_counter()
    progress = progress or Progress()
    version = store.open_index(index)  # a missing index or queries table fails here, before Ray starts
    cfg = index_config(version, cfg)
    model_uri = version.manifest["model"]["uri"]
    qc = cfg.query
    qtable = load_queries(queries, qc.allowed_prefixes)
    if qtable.num_rows == 0:
        raise ValueError(f"{queries}: no queries")
    qmap = query_map(qtable)
    out = uri_mod.normalize(out)
    run = query_output.new_run(out)
    init_ray(progress_bars=progress.enabled)
    res = actor_resources(qc.actor_cpus)
    te = time.perf_counter()
    progress.say(f"read {qtable.num_rows:,} queries; index version {version.version}")

    # coarse: query descriptors on actors, then faiss in the driver (the index is one file)
    encoded = encode_stage(qtable, cfg, model_uri, is_region_index(version), res)
    tc = time.perf_counter()
    n_bad = int(row_errors.failed(encoded.select(row_errors.COLUMNS).to_pydict()).sum())
    n = encoded.num_rows
    progress.done(f"encoded {n - n_bad:,} queries ({n_bad:,} errors)", tc - te, n, "queries")
    uris = store.image_uris(version)
    index = version.faiss()
    coarse = coarse_search(version, uris, encoded, cfg, coarse_slots(qc), index)
    t1 = time.perf_counter()
    searched = f"top {qc.top_k} of {len(uris):,} images for {len(coarse.query_ids):,} queries"
    progress.done(f"coarse search: {searched}, {len(coarse.frame):,} candidates", t1 - tc)

    # geometric verification of the coarse shortlist: verified images join the rerank wherever they rank; with
    # query.expand, the whole shortlist is checked first and the verified images expand the coarse search
    # expansion finds images the coarse top_k missed; with every image in it already, it could only reorder it
    expanding = bool(qc.expand) and cfg.geometry.enabled and coarse.views is not None and len(uris) > qc.top_k
    taken: dict[str, int] = {}  # query_id -> verified regions its expanded search took
    first_budget: set[tuple[str, int]] = set()  # what the search before expansion sent to the rerank
    checked = geometry_stage(coarse, uris, qmap, cfg, res, start=0 if expanding else qc.rerank)
    if expanding:
        first_budget = coarse.top_pairs(qc.rerank)
        coarse, taken = expand_stage(coarse, version, index, uris, split_failed(checked)[0], cfg)
        progress.done(f"query expansion: {len(taken):,} queries expanded by verified regions", time.perf_counter() - t1)
        more = geometry_stage(coarse, uris, qmap, cfg, res, start=qc.rerank, done=pairs(checked))
        checked = pd.concat([f for f in (checked, more) if len(f)]) if len(more) else checked
    ok_rows, geo_failed = split_failed(checked)
    verified = pairs(ok_rows[ok_rows[S.INLIERS] >= cfg.geometry.min_inliers])
    if cfg.geometry.enabled:
        progress.done(f"geometric check ({len(verified):,} pairs verified)", time.perf_counter() - t1)
    reranked_anyway = coarse.top_pairs(qc.rerank)

    # rerank: the coarse top query.rerank, every verified pair, and (with expansion) what the first search ranked
    # in its top query.rerank, so the expansion adds candidates to the rerank but never takes one away
    cand = coarse.shortlist(qc.rerank, extra=verified | first_budget)
    reranked = pd.DataFrame(columns=[f.name for f in S.RESULTS_SCHEMA if f.name != S.RANK] + list(row_errors.COLUMNS))
    if cand is not None and cand.num_rows:
        tr = time.perf_counter()
        n_pairs = sum(len(q) for q in cand.column(S.QUERY_IDS).to_pylist())
        progress.say(f"reranking {n_pairs:,} pairs ({cand.num_rows:,} images, {pool_size(qc.actors, qc.max_actors)})")
        overlays = run.uri(query_output.HEATMAPS) if qc.overlays else None
        reranked = rerank_stage(with_uris(cand, uris), qmap, cfg, model_uri, overlays, res)
        progress.done(f"reranked {n_pairs:,} pairs", time.perf_counter() - tr, n_pairs, "pairs")
    t2 = time.perf_counter()

    ok, rerank_failed = split_failed(reranked)
    results = rank_results(ok, coarse.frame)
    tp = time.perf_counter()
    results, thumbs = report_stage(results, qmap, run, cfg)
    shown = len(report.shown_queries(list(qmap), qc.report_queries)) if qc.report else 0
    progress.done(f"named overlays by rank, drew the report's thumbnails ({shown:,} queries)", time.perf_counter() - tp)
    table = S.check_columns(pa.Table.from_pandas(results, preserve_index=False), S.RESULTS_SCHEMA, "results")
    errors = query_errors(qmap, encoded, rerank_failed, geo_failed, uris)
    summary = {
        "index": version.root,
        "version": version.version,
        "queries": qtable.num_rows,
        "results": table.num_rows,
        "errors": errors.num_rows,
        "model": version.manifest["model"],
        "seconds": {"total": time.perf_counter() - t0, "coarse": t1 - t0, "rerank": t2 - t1},
        # pairs past query.rerank that geometry verified and sent to the rerank
        "verified_past_rerank": len(verified - reranked_anyway),
        "expanded_queries": len(taken),  # queries whose coarse search ran again with verified regions
        "query_config": to_dict(qc),
        "stages": {
            name: to_dict(getattr(cfg, name)) for name in ("refine", "verify", "geometry") if getattr(cfg, name).enabled
        },
    }
    page = None
    if qc.report:
        summary["report"] = query_output.REPORT
        page = report.render(
            run.folder,
            {**summary, "run_id": run.run_id},
            qmap,
            results,
            errors.to_pandas(),
            thumbs,
            qc.report_top,
            qc.report_queries,
        )
    query_output.publish(run, table, errors, summary, qc.keep_runs, page)
    progress.say(f"published run {run.folder} ({table.num_rows:,} results, {errors.num_rows:,} errors)")
    return QueryReport(
        out,
        qtable.num_rows,
        table.num_rows,
        errors.num_rows,
        time.perf_counter() - t0,
        t1 - t0,
        t2 - t1,
        run.folder,
        run.uri(query_output.REPORT) if qc.report else None,
    )
