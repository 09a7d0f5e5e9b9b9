"""Query pipeline: queries -> descriptors (actors) -> faiss top-K -> Reranker actors -> results Parquet + overlays."""

from __future__ import annotations

import dataclasses
import time
from collections import defaultdict
from dataclasses import dataclass

import numpy as np
import pandas as pd
import pyarrow as pa
import ray

from pipelines.runtime import actor_pool, actor_resources, init_ray, pool_size, table_dataset
from roiqa import schema as S
from roiqa.config import ModelConfig, PreprocessConfig, RoiqaConfig, from_dict, to_dict
from roiqa.index import faiss_index, hubness, store
from roiqa.io import uri as uri_mod
from roiqa.io.sources import errors_table, parse_error
from roiqa.progress import Progress
from roiqa.results import html as report
from roiqa.results import output as query_output
from roiqa.stages.rerank import GeometryCheck, QueryEncoder, Reranker, coarse_views


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


def load_queries(queries: str, allowed_prefixes: tuple[str, ...] = ()) -> pa.Table:
    """Queries as QUERIES_SCHEMA: a Parquet file of query_id, uri[, box] or a folder of crops (id = file stem).

    Every query image must lie inside `allowed_prefixes` (default: the Parquet's folder, or the folder of crops),
    symbolic links resolved; one outside refuses the queries, as `index.allowed_prefixes` does for manifests."""
    if queries.lower().endswith(".parquet"):
        table = store.read_table(queries)
        table = S.check_columns(table, S.QUERIES_SCHEMA, queries)
        base = uri_mod.normalize(queries).rsplit("/", 1)[0]
        uris = [
            uri_mod.normalize(u if ("://" in u or u.startswith("/")) else uri_mod.join(base, u))
            for u in table.column(S.URI).to_pylist()
        ]
        table = table.set_column(table.schema.get_field_index(S.URI), S.URI, pa.array(uris, pa.string()))
    else:
        files = uri_mod.list_files(queries, uri_mod.IMAGE_EXTENSIONS)
        if not files:
            raise ValueError(f"{queries}: no query images found")
        ids = [f.rsplit("/", 1)[-1].rsplit(".", 1)[0] for f in files]
        table = pa.table({S.QUERY_ID: ids, S.URI: files})
        table = S.check_columns(table, S.QUERIES_SCHEMA, queries)
    folder = uri_mod.normalize(queries)
    if queries.lower().endswith(".parquet"):
        folder = folder.rsplit("/", 1)[0]
    allowed = tuple(allowed_prefixes) or (folder,)
    for qid, u in zip(table.column(S.QUERY_ID).to_pylist(), table.column(S.URI).to_pylist()):
        if not any(uri_mod.inside(u, p) for p in allowed):
            raise ValueError(
                f"{queries}: query {qid!r} points outside the allowed prefixes {list(allowed)}: {u!r}; refusing the "
                "queries (query.allowed_prefixes lists where query images may be read from)"
            )
    ids = pd.Series(table.column(S.QUERY_ID).to_pylist())
    if ids.duplicated().any():
        repeated = sorted(set(ids[ids.duplicated()]))[:5]
        raise ValueError(f"{queries}: query_id values must be unique; repeated: {repeated}")
    return table


def query_map(qtable: pa.Table) -> dict[str, tuple[str, list[float] | None]]:
    """{query_id: (uri, box or None)} for the rerank actors."""
    boxes = [qtable.column(c).to_pylist() for c in S.BOX]
    out = {}
    for i, (q, u) in enumerate(zip(qtable.column(S.QUERY_ID).to_pylist(), qtable.column(S.URI).to_pylist())):
        b = [col[i] for col in boxes]
        out[q] = (u, None if all(v is None or v != v for v in b) else b)  # no box: the whole image
    return out


def index_config(version: store.IndexVersion, cfg: RoiqaConfig) -> RoiqaConfig:
    """The user's settings with the model and preprocessing the index was built with."""
    conf = version.manifest["config"]
    return dataclasses.replace(
        cfg,
        model=from_dict(ModelConfig, conf["model"], "manifest.config.model"),
        preprocess=from_dict(PreprocessConfig, conf["preprocess"], "manifest.config.preprocess"),
    )


def shortlist(
    scores: np.ndarray,
    ids: np.ndarray,
    query_ids: list[str],
    rerank: int,
    start: int = 0,
    extra: frozenset[tuple[str, int]] | set[tuple[str, int]] = frozenset(),
) -> pa.Table:
    """Candidate images grouped by image: {image_id, query_ids, coarse_scores}: each query's coarse ranks
    [start, rerank), plus the (query_id, image_id) pairs of `extra` wherever they rank."""
    by_image: dict[int, tuple[list, list]] = defaultdict(lambda: ([], []))
    for qid, srow, irow in zip(query_ids, scores, ids):
        for rank, (s, i) in enumerate(zip(srow, irow)):
            if i >= 0 and (start <= rank < rerank or (qid, int(i)) in extra):
                by_image[int(i)][0].append(qid)
                by_image[int(i)][1].append(float(s))
    keys = sorted(by_image)
    return pa.table(
        {
            S.IMAGE_ID: pa.array(keys, pa.int64()),
            S.QUERY_IDS: pa.array([by_image[k][0] for k in keys], pa.list_(pa.string())),
            S.COARSE_SCORES: pa.array([by_image[k][1] for k in keys], pa.list_(pa.float32())),
        }
    )


def rank_results(reranked: pd.DataFrame, coarse: pd.DataFrame) -> pd.DataFrame:
    """Final ranking per query: reranked images by score, then the rest of the coarse top-K by coarse score."""
    rest = coarse.merge(reranked[[S.QUERY_ID, S.IMAGE_ID]], on=[S.QUERY_ID, S.IMAGE_ID], how="left", indicator=True)
    rest = rest[rest["_merge"] == "left_only"].drop(columns="_merge")
    reranked = reranked.assign(_tier=0, _key=-reranked[S.SCORE].fillna(-np.inf))
    rest = rest.assign(_tier=1, _key=-rest[S.COARSE_SCORE])
    both = pd.concat([reranked, rest], ignore_index=True).sort_values([S.QUERY_ID, "_tier", "_key", S.IMAGE_ID])
    both[S.RANK] = both.groupby(S.QUERY_ID).cumcount().astype(np.int32) + 1
    return both.drop(columns=["_tier", "_key"])


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
    out = uri_mod.normalize(out)
    run = query_output.new_run(out)
    init_ray(progress_bars=progress.enabled)
    res = actor_resources(qc.actor_cpus)
    te = time.perf_counter()
    progress.say(f"read {qtable.num_rows:,} queries; index version {version.version}")

    # coarse: query descriptors on actors, then faiss in the driver (the index is one file)
    regions = version.manifest.get("coarse", "global") == "regions"  # versions before region indexes: global
    qds = table_dataset(qtable).map_batches(
        QueryEncoder,
        fn_constructor_kwargs={"cfg": cfg, "model_uri": model_uri, "threads": qc.torch_threads, "regions": regions},
        compute=ray.data.ActorPoolStrategy(size=1),
        batch_size=32,
        batch_format="numpy",
        **res,
    )
    enc = pa.concat_tables(ray.get(qds.to_arrow_refs()))
    qids = enc.column(S.QUERY_ID).to_pylist()
    qerr = [str(e) for e in enc.column(S.ERROR).to_pylist()]
    good = [i for i, e in enumerate(qerr) if not e]
    tc = time.perf_counter()
    progress.done(f"encoded {len(good):,} queries ({len(qerr) - len(good):,} errors)", tc - te, len(qerr), "queries")
    uris = store.image_uris(version)
    column = S.COARSE_QUERY if regions else S.EMBEDDING
    emb = np.stack(enc.column(column).to_numpy(zero_copy_only=False))
    if regions:
        emb = emb.reshape(len(emb), len(coarse_views(qc)), -1)  # (Q, S, D)
        if version.manifest.get("hubness"):  # regions indexed as [r, h(r)]: score <q, r> - weight * h(r)
            emb = hubness.augment_queries(emb, qc.hubness)
    image_ids = np.fromiter(uris, np.int64, len(uris)) if regions else None
    scores, ids = (
        faiss_index.search_images(
            version.faiss(), emb[good], qc.top_k, cfg.index.faiss_nprobe, image_ids, qc.coarse_regions
        )
        if good
        else ([], [])
    )
    good_ids = [qids[i] for i in good]
    coarse = pd.DataFrame(
        [
            (q, int(i), uris[int(i)], float(s))
            for q, srow, irow in zip(good_ids, scores, ids)
            for s, i in zip(srow, irow)
            if i >= 0
        ],
        columns=[S.QUERY_ID, S.IMAGE_ID, S.URI, S.COARSE_SCORE],
    )
    t1 = time.perf_counter()
    searched = f"top {qc.top_k} of {len(uris):,} images for {len(good):,} queries"
    progress.done(f"coarse search: {searched}, {len(coarse):,} candidates", t1 - tc)

    # geometric verification of the coarse shortlist past the rerank budget: verified images join the rerank
    gc = cfg.geometry
    qmap = query_map(qtable)
    most = max(qc.actors, qc.max_actors)  # the rerank pools' largest size: blocks enough to keep them busy
    verified: set[tuple[str, int]] = set()
    geo_errors = pd.DataFrame(columns=[S.QUERY_ID, S.IMAGE_ID, S.ERROR])
    n_geo = min(gc.shortlist, qc.top_k) if gc.enabled else 0
    past = shortlist(np.asarray(scores), np.asarray(ids), good_ids, n_geo, start=qc.rerank) if good else None
    if past is not None and past.num_rows:
        past = past.append_column(S.URI, pa.array([uris[i] for i in past.column(S.IMAGE_ID).to_pylist()]))
        gds = table_dataset(past, 4 * most)
        gds = gds.map_batches(
            GeometryCheck,
            fn_constructor_kwargs={"cfg": cfg, "queries": qmap},
            compute=actor_pool(qc.actors, qc.max_actors),
            batch_size=16,
            batch_format="numpy",
            **res,
        )
        checked = pa.concat_tables(ray.get(gds.to_arrow_refs())).to_pandas()
        ok_rows = checked[checked[S.INLIERS] >= gc.min_inliers]
        verified = set(zip(ok_rows[S.QUERY_ID], ok_rows[S.IMAGE_ID].astype(int)))
        geo_errors = checked[checked[S.ERROR].astype(str) != ""]
        n = len(checked)
        progress.done(
            f"geometric check of {n:,} pairs ({len(verified):,} verified)", time.perf_counter() - t1, n, "pairs"
        )

    # rerank: one row per candidate image, with every query that shortlisted it
    cand = shortlist(np.asarray(scores), np.asarray(ids), good_ids, qc.rerank, extra=verified) if good else None
    reranked = pd.DataFrame(columns=[f.name for f in S.RESULTS_SCHEMA if f.name != S.RANK] + [S.ERROR])
    if cand is not None and cand.num_rows:
        tr = time.perf_counter()
        pairs = sum(len(q) for q in cand.column(S.QUERY_IDS).to_pylist())
        progress.say(f"reranking {pairs:,} pairs ({cand.num_rows:,} images, {pool_size(qc.actors, qc.max_actors)})")
        cand = cand.append_column(S.URI, pa.array([uris[i] for i in cand.column(S.IMAGE_ID).to_pylist()]))
        rds = table_dataset(cand, 4 * most)
        rds = rds.map_batches(
            Reranker,
            fn_constructor_kwargs={
                "cfg": cfg,
                "queries": qmap,
                "model_uri": model_uri,
                "overlay_dir": run.uri(query_output.HEATMAPS) if qc.overlays else None,
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
        progress.done(f"reranked {pairs:,} pairs", time.perf_counter() - tr, pairs, "pairs")
    t2 = time.perf_counter()

    rerr = reranked[reranked[S.ERROR].astype(str) != ""] if len(reranked) else reranked
    ok = reranked[reranked[S.ERROR].astype(str) == ""].drop(columns=[S.ERROR]) if len(reranked) else reranked
    results = rank_results(ok.drop(columns=[S.ERROR], errors="ignore"), coarse)
    tp = time.perf_counter()
    results, thumbs = report_stage(results, qmap, run, cfg)
    shown = len(report.shown_queries(list(qmap), qc.report_queries)) if qc.report else 0
    progress.done(f"named overlays by rank, drew the report's thumbnails ({shown:,} queries)", time.perf_counter() - tp)
    table = S.check_columns(pa.Table.from_pandas(results, preserve_index=False), S.RESULTS_SCHEMA, "results")
    query_uri = dict(zip(qtable.column(S.QUERY_ID).to_pylist(), qtable.column(S.URI).to_pylist()))
    err_rows = [(query_uri[q], *parse_error(e), q) for q, e in zip(qids, qerr) if e]
    err_rows += [(r[S.URI], *parse_error(r[S.ERROR]), r[S.QUERY_ID]) for _, r in rerr.iterrows()]
    err_rows += [(uris[int(r[S.IMAGE_ID])], *parse_error(r[S.ERROR]), r[S.QUERY_ID]) for _, r in geo_errors.iterrows()]
    errors = errors_table(err_rows, S.QUERY_ERRORS_SCHEMA)
    summary = {
        "index": version.root,
        "version": version.version,
        "queries": qtable.num_rows,
        "results": table.num_rows,
        "errors": errors.num_rows,
        "model": version.manifest["model"],
        "seconds": {"total": time.perf_counter() - t0, "coarse": t1 - t0, "rerank": t2 - t1},
        "verified_past_rerank": len(verified),  # pairs past query.rerank that geometry verified and sent to the rerank
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


def read_results(out: str) -> pd.DataFrame:
    """The results table of the query run published at `out` as a DataFrame."""
    return query_output.open_results(out).results().to_pandas()
