"""`roiqa eval`: retrieval (mAP, Recall@K) and localization (AP at IoU 0.5) of results against ground truth.

Recall@K is the share of queries with a positive in their top K; positives found@K, reported beside it, the share
of each query's positives in its top K, averaged over queries.

Two modes. With --results and --ground-truth: the metrics of one results table (--out: a metrics.json URI).
Without them: the full evaluation under --out DIR: build the evaluation collection (photographs disjoint from
training), index and query it with the matcher (--model, default the shipped checkpoint), run the classical
baselines on the same gallery, and write per-method results, metrics.json (overall and stress buckets), metrics.md,
pr_curves.png and heatmap_gallery.png.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from typing import TYPE_CHECKING

import numpy as np

from jobs.common import (
    add_config_arg,
    add_model_arg,
    add_quiet_arg,
    add_stage_flags,
    config_from,
    job_parser,
    progress_for,
    run,
    stage_overrides,
)

STAGES = ("complexity", "masks", "refine", "verify", "geometry")

if TYPE_CHECKING:
    import pandas as pd

ROIQA = "roiqa"  # the learned method's name in metrics.json and its results folder
# roiqa's latency keys: the pipeline times its stages, not single queries, so these are stage wall time (actor
# start-up included) divided by the number of queries.
COARSE_LATENCY = "coarse_stage_seconds_per_query_mean"
RERANK_LATENCY = "rerank_stage_seconds_per_query_mean"
BASELINE_LATENCY = "seconds_per_query_median"  # roiqa.eval.baselines.run_baseline's per-query median
TIMING = "timing"  # per method: the other timings (seconds), kept out of the table


def parser() -> argparse.ArgumentParser:
    p = job_parser("eval", __doc__)
    p.add_argument("--results", default=None, help="results.parquet, or a query output (its published run is read)")
    p.add_argument("--ground-truth", default=None, help="Parquet of query_id, uri, x0, y0, x1, y1")
    p.add_argument(
        "--out",
        default=None,
        help="with --results: write metrics.json here (a file URI); otherwise the full evaluation's output folder",
    )
    add_model_arg(p, "full mode: ")
    p.add_argument(
        "--seed", type=int, default=None, help="full mode: random seed of the evaluation collection (default: 1000)"
    )
    p.add_argument("--n-gallery", type=int, default=None, help="full mode: gallery images to build (default: 64)")
    p.add_argument(
        "--baselines",
        default=None,
        help="full mode: comma-separated classical baselines; '' for none (default: template,sift)",
    )
    p.add_argument(
        "--rerank", type=int, default=None, help="full mode: images reranked per query (default: the whole gallery)"
    )
    add_stage_flags(p, *STAGES)
    add_config_arg(p)
    add_quiet_arg(p)
    return p


def evaluate_uris(results: str, ground_truth: str) -> dict:
    """Metrics of a results table (or a query output's published run) against a ground-truth table."""
    from roiqa.eval.metrics import evaluate
    from roiqa.index import store
    from roiqa.results.output import open_results

    if results.lower().endswith(".parquet"):
        table = store.read_table(results)
    else:
        table = open_results(results).results()
    return evaluate(table.to_pandas(), store.read_table(ground_truth).to_pandas())


def json_ready(value: object) -> object:
    """`value` with nan / inf floats as None and numpy scalars as Python ones, recursively (strict JSON)."""
    if isinstance(value, dict):
        return {str(k): json_ready(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_ready(v) for v in value]
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return float(value) if math.isfinite(float(value)) else None
    return value


def index_bytes(index: str) -> dict[str, float]:
    """Bytes per indexed image of the published version, by file: "embeddings" (the Parquet rows a rebuild reads),
    "faiss" (what a query searches) and "hubness" (its reference; 0 without one)."""
    from roiqa.index import store
    from roiqa.io import uri as uri_mod

    version = store.open_index(index)
    n = int(version.manifest["counts"]["indexed"])
    if n == 0:
        raise ValueError(f"{index}: the published version indexed no images")
    fs, faiss_path = uri_mod.filesystem(version.uri(store.FAISS))
    _, emb_path = uri_mod.filesystem(version.uri(store.EMBEDDINGS))
    out = {"embeddings": fs.du(emb_path, total=True) / n, "faiss": fs.size(faiss_path) / n, "hubness": 0.0}
    if version.manifest.get("hubness"):
        out["hubness"] = fs.size(uri_mod.filesystem(version.uri(store.HUBNESS))[1]) / n
    return out


def index_bytes_per_image(index: str) -> float:
    """(faiss index + embeddings Parquet + hubness reference bytes) / indexed images of the published version."""
    return sum(index_bytes(index).values())


def gallery_rows(results: pd.DataFrame, ground_truth: pd.DataFrame) -> list[dict]:
    """Tiles for `heatmap_gallery_png`: per query its rank-1 image and, if that is not one, its best-ranked positive."""
    import pandas as pd

    from roiqa import schema as S
    from roiqa.boxes import box_iou
    from roiqa.eval.report import IOU, PRED_BOX, TRUE_BOXES

    true = {k: g[S.BOX].to_numpy(np.float32) for k, g in ground_truth.groupby([S.QUERY_ID, S.URI])}
    rows = []
    for qid, res in results.sort_values([S.QUERY_ID, S.RANK]).groupby(S.QUERY_ID, sort=True):
        positive = res[[(qid, u) in true for u in res[S.URI]]]
        picks = [res.iloc[0]] + ([positive.iloc[0]] if len(positive) and positive.index[0] != res.index[0] else [])
        for r in picks:
            boxes = true.get((qid, r[S.URI]), np.zeros((0, 4), np.float32))
            pred = r[S.BOX].to_numpy(np.float32)
            iou = float(box_iou(pred[None], boxes).max()) if len(boxes) and np.isfinite(pred).all() else None
            heat = r[S.HEATMAP_URI] if isinstance(r[S.HEATMAP_URI], str) else None
            rows.append(
                {
                    S.QUERY_ID: qid,
                    S.RANK: int(r[S.RANK]),
                    S.SCORE: float(r[S.SCORE]) if pd.notna(r[S.SCORE]) else None,
                    S.URI: r[S.URI],
                    S.HEATMAP_URI: heat,
                    PRED_BOX: pred if np.isfinite(pred).all() else None,
                    TRUE_BOXES: list(boxes),
                    IOU: iou,
                }
            )
    return rows


def run_full(args: argparse.Namespace) -> int:
    """The full evaluation of the matcher and the baselines on the evaluation collection under args.out."""
    import pyarrow as pa

    from pipelines.index import run_index
    from pipelines.query import run_query
    from roiqa import schema as S
    from roiqa.eval.baselines import METHODS, run_baseline
    from roiqa.eval.demo_data import build_eval_collection
    from roiqa.eval.metrics import evaluate_buckets, pr_curve_points
    from roiqa.eval.report import INDEX_BYTES_PER_IMAGE, LATENCY, heatmap_gallery_png, markdown_table, pr_curves_png
    from roiqa.index import store
    from roiqa.io.queries import load_queries
    from roiqa.results.output import read_results
    from roiqa.results.ranking import index_config
    from roiqa.stages.rerank import load_patch
    from roiqa.weights import resolve_model

    seed = 1000 if args.seed is None else args.seed
    n_gallery = 64 if args.n_gallery is None else args.n_gallery
    baselines = [b.strip() for b in ("template,sift" if args.baselines is None else args.baselines).split(",")]
    baselines = [b for b in baselines if b]
    unknown = [b for b in baselines if b not in METHODS]
    if unknown:
        raise ValueError(f"--baselines: unknown method(s) {unknown}; choose from {sorted(METHODS)}")
    if ROIQA in baselines:
        raise ValueError(f"--baselines: {ROIQA!r} is the learned method, always run")
    rerank = n_gallery if args.rerank is None else args.rerank
    if rerank < 1:
        raise ValueError(f"--rerank must be >= 1, got {rerank}")

    out = os.path.abspath(args.out)
    t0 = time.perf_counter()
    col = build_eval_collection(os.path.join(out, "collection"), seed=seed, n_gallery=n_gallery)
    print(f"collection: {col.n_gallery} gallery images, {col.n_queries} queries ({time.perf_counter() - t0:.1f} s)")
    gt = store.read_table(col.ground_truth_uri).to_pandas()
    cfg = config_from(
        args, query={"top_k": n_gallery, "rerank": min(rerank, n_gallery)}, **stage_overrides(args, *STAGES)
    )
    index = os.path.join(out, "index")
    progress = progress_for("eval", args)
    ir = run_index(col.gallery_dir, index, cfg, resolve_model(args.model), progress)
    qr = run_query(index, col.queries_uri, os.path.join(out, ROIQA), cfg, progress)
    version = store.open_index(index)
    weights = version.manifest["model"]["weights"]
    results = {ROIQA: read_results(os.path.join(out, ROIQA))}
    n_q = max(qr.queries, 1)
    extra: dict[str, dict] = {
        ROIQA: {
            LATENCY: {COARSE_LATENCY: qr.coarse_seconds / n_q, RERANK_LATENCY: qr.rerank_seconds / n_q},
            INDEX_BYTES_PER_IMAGE: index_bytes_per_image(index),
            TIMING: {"index_seconds_total": ir.seconds, "query_seconds_total": qr.seconds},
        }
    }
    print(f"{ROIQA}: indexed {ir.indexed} images in {ir.seconds:.1f} s, {qr.queries} queries in {qr.seconds:.1f} s")

    if baselines:
        icfg = index_config(version, cfg)  # the preprocessing the index was built with
        qtable = load_queries(col.queries_uri)
        boxes = [qtable.column(c).to_pylist() for c in S.BOX]
        patches = {}
        for i, (qid, uri) in enumerate(zip(qtable.column(S.QUERY_ID).to_pylist(), qtable.column(S.URI).to_pylist())):
            box = [b[i] for b in boxes]
            box_arr = None if any(v is None for v in box) else np.asarray(box, np.float32)
            patches[qid] = load_patch(uri, box_arr, icfg.preprocess.max_pixels)
        gallery = sorted(store.image_uris(version).values())  # the images roiqa indexed, by the same URIs
        for method in baselines:
            res, timing = run_baseline(
                method,
                patches,
                gallery,
                icfg.preprocess.image_size,
                icfg.preprocess.max_pixels,
                query_sizes=icfg.query.query_sizes,
            )
            table = pa.Table.from_pandas(res, preserve_index=False)
            table = S.check_columns(table, S.RESULTS_SCHEMA, f"{method} results")
            store.write_table(table, os.path.join(out, method, "results.parquet"))
            results[method] = table.to_pandas()
            extra[method] = {
                LATENCY: {BASELINE_LATENCY: timing[BASELINE_LATENCY]},
                TIMING: {k: v for k, v in timing.items() if k != BASELINE_LATENCY},
            }
            print(f"{method}: {len(patches)} queries x {len(gallery)} images in {timing['seconds_total']:.1f} s")

    metrics = {m: {**evaluate_buckets(res, gt), **extra[m]} for m, res in results.items()}
    metrics = json_ready(metrics)
    with open(os.path.join(out, "metrics.json"), "w") as f:
        json.dump(metrics, f, indent=2, allow_nan=False)
    table_md = markdown_table(metrics)
    with open(os.path.join(out, "metrics.md"), "w") as f:
        f.write(table_md + "\n")
    pr_curves_png({m: pr_curve_points(res, gt) for m, res in results.items()}, os.path.join(out, "pr_curves.png"))
    heatmap_gallery_png(gallery_rows(results[ROIQA], gt), os.path.join(out, "heatmap_gallery.png"), columns=5)

    print()
    print(f"roiqa eval: {col.n_gallery} gallery images, {col.n_queries} queries, seed {seed}; matcher {weights}")
    if weights.startswith("random-init"):
        print("  note: no trained model was given: roiqa's figures are those of an UNTRAINED network (random weights)")
    print(f"  roiqa: top {n_gallery}, {cfg.query.rerank} reranked per query; latency = stage wall time / queries")
    print()
    print(table_md)
    print()
    for name in ("metrics.json", "metrics.md", "pr_curves.png", "heatmap_gallery.png"):
        print(f"  {os.path.join(out, name)}")
    where = {m: os.path.join(qr.run if m == ROIQA else os.path.join(out, m), "results.parquet") for m in results}
    print("  results: " + ", ".join(f"{m} {w}" for m, w in where.items()))
    print(f"  wall time {time.perf_counter() - t0:.1f} s")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)

    def go() -> int:
        from roiqa.io import uri as uri_mod

        if args.results is None and args.ground_truth is None:
            if not args.out:
                raise ValueError("give --results and --ground-truth, or --out DIR for the full evaluation")
            return run_full(args)
        if args.results is None or args.ground_truth is None:
            raise ValueError("--results and --ground-truth go together")
        full_only = {
            "--model": args.model,
            "--seed": args.seed,
            "--n-gallery": args.n_gallery,
            "--baselines": args.baselines,
            "--rerank": args.rerank,
            "--config": args.config,
            **{f"--{st}": getattr(args, st) for st in STAGES},
        }
        given = [k for k, v in full_only.items() if v is not None]
        if given:
            raise ValueError(f"{given} apply to the full evaluation only (without --results)")
        metrics = evaluate_uris(args.results, args.ground_truth)
        text = json.dumps(metrics, indent=2)
        if args.out:
            uri_mod.write_bytes(args.out, text.encode())
        print(text)
        return 0

    return run(go, "eval")


if __name__ == "__main__":
    raise SystemExit(main())
