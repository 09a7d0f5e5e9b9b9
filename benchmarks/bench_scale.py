"""Scale: the evaluation objects hidden among many distractor images, searched the way a user runs roiqa.

Builds the evaluation collection (`roiqa eval`'s, 64 images, 10 queries) and `--distractors` more images (crops,
flips and colour changes of the bundled photographs that hold no evaluation object), indexes all of them with the
defaults, queries with the defaults (top_k 100, rerank 20) and reports:

- coarse recall@K of the positives: the share of ground-truth (query, image) pairs among the coarse stage's top K
  images (K = 20, the rerank budget, and K = top_k);
- end-to-end mAP and loc AP@0.5 (overall and per stress bucket) at the default rerank budget, and again with each
  of `--budgets` (a larger budget is the reference the default's loss is measured against);
- SIFT + RANSAC over the whole collection (`--sift`, on by default), the classical reference;
- index bytes per image, index seconds per image and query latency per stage (coarse, rerank), per query.

    python -m benchmarks.bench_scale --distractors 10000          # the figure docs/evaluation.md quotes; about an hour
    python -m benchmarks.bench_scale --distractors 2000 --budgets 100

Everything is written under --work (a temporary folder by default, removed unless --keep); the report goes to
--out as bench_scale.json / .md.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time

from benchmarks.common import machine, write_report


def coarse_recall(results, gt, k: int) -> float:
    """Share of ground-truth (query, uri) pairs among each query's k best rows by coarse score."""
    import pandas as pd

    top = (
        results.sort_values(["query_id", "coarse_score"], ascending=[True, False], kind="stable")
        .groupby("query_id")
        .head(k)
    )
    pairs = pd.MultiIndex.from_frame(gt[["query_id", "uri"]].drop_duplicates())
    return float(pairs.isin(pd.MultiIndex.from_frame(top[["query_id", "uri"]])).mean())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--distractors", type=int, default=10000, help="distractor images added to the collection")
    p.add_argument("--seed", type=int, default=1000, help="seed of the evaluation collection (distractors: +1)")
    p.add_argument("--budgets", default="100", help="comma-separated rerank budgets compared with the default")
    p.add_argument("--sift", action=argparse.BooleanOptionalAction, default=True, help="SIFT + RANSAC baseline")
    p.add_argument("--work", default=None, help="working folder (default: a new temporary one)")
    p.add_argument("--keep", action="store_true", help="keep the working folder")
    p.add_argument(
        "--reuse",
        action="store_true",
        help="with --work: reuse the collection and index a previous run left there (only the queries run again)",
    )
    p.add_argument("--out", default="benchmarks/results", help="folder for bench_scale.json / .md")
    p.add_argument(
        "--config", default=None, help="YAML config for the index and the queries (default: the built-in settings)"
    )
    p.add_argument(
        "--hubness", type=float, default=None, help="query.hubness for the queries (default: the config's default)"
    )
    p.add_argument(
        "--quick", action="store_true", help="24 evaluation images, 12 distractors, one budget, no SIFT (smoke test)"
    )
    args = p.parse_args(argv)
    budgets = [int(b) for b in args.budgets.split(",") if b.strip()]
    if args.quick:
        args.distractors, budgets, args.sift = 12, [], False

    import dataclasses

    import pyarrow as pa

    from jobs.eval import index_bytes, index_bytes_per_image
    from pipelines.index import run_index
    from pipelines.query import run_query
    from roiqa import schema as S
    from roiqa.config import load_config, to_dict
    from roiqa.eval.baselines import run_baseline
    from roiqa.eval.demo_data import build_distractors, build_eval_collection
    from roiqa.eval.metrics import evaluate_buckets
    from roiqa.index import store
    from roiqa.io.queries import load_queries
    from roiqa.results.output import read_results
    from roiqa.results.ranking import index_config
    from roiqa.stages.rerank import load_patch
    from roiqa.weights import resolve_model

    if args.reuse and not args.work:
        raise SystemExit("--reuse needs --work (the folder of the earlier run)")
    work = args.work or tempfile.mkdtemp(prefix="bench-scale-")
    os.makedirs(work, exist_ok=True)
    t0 = time.perf_counter()
    cfg = load_config(args.config)
    if args.hubness is not None:
        cfg = dataclasses.replace(cfg, query=dataclasses.replace(cfg.query, hubness=args.hubness))
    index = os.path.join(work, "index")
    index_json = os.path.join(work, "index_report.json")
    if args.reuse:
        with open(index_json) as f:
            index_report = json.load(f)
        gallery_dir = os.path.join(work, "collection", "gallery")
        n_distractors = sum(f.startswith("distractor_") for f in os.listdir(gallery_dir))
        gt = store.read_table(os.path.join(work, "collection", "ground_truth.parquet")).to_pandas()
        queries_uri = os.path.join(work, "collection", "queries.parquet")
        n_queries = store.read_table(queries_uri).num_rows
        index_report["bytes_per_image"] = index_bytes_per_image(index)  # the version published now (a re-index)
        print(f"reusing {index} ({index_report['indexed']} images)")
    else:
        n_gallery = 24 if args.quick else 64
        col = build_eval_collection(os.path.join(work, "collection"), seed=args.seed, n_gallery=n_gallery)
        build_distractors(col.gallery_dir, args.distractors, seed=args.seed + 1)
        n_distractors, queries_uri, n_queries = args.distractors, col.queries_uri, col.n_queries
        print(f"collection: {col.n_gallery} evaluation images + {n_distractors} distractors")
        gt = store.read_table(col.ground_truth_uri).to_pandas()
        ir = run_index(col.gallery_dir, index, cfg, resolve_model(None))
        print(f"indexed {ir.indexed} images ({ir.errors} errors) in {ir.seconds:.0f} s")
        index_report = {
            "indexed": ir.indexed,
            "errors": ir.errors,
            "seconds": ir.seconds,
            "seconds_per_image": ir.seconds / max(ir.indexed, 1),
            "bytes_per_image": index_bytes_per_image(index),
        }
        with open(index_json, "w") as f:
            json.dump(index_report, f)
    report: dict = {
        "machine": machine(),
        "images": index_report["indexed"] + index_report["errors"],
        "distractors": n_distractors,
        "queries": n_queries,
        "positives": len(gt),
        "top_k": cfg.query.top_k,
        "hubness": {"k": cfg.index.hubness_k, "weight": cfg.query.hubness},
        "config": args.config,
        "geometry": to_dict(cfg.geometry),
        "index": {**index_report, "bytes_per_image_by_file": index_bytes(index)},
        "runs": {},
    }
    for budget in [cfg.query.rerank, *budgets]:
        run_cfg = dataclasses.replace(cfg, query=dataclasses.replace(cfg.query, rerank=budget))
        out = os.path.join(work, f"query-rerank{budget}")
        qr = run_query(index, queries_uri, out, run_cfg)
        res = read_results(out)
        buckets = evaluate_buckets(res, gt)
        report["runs"][f"rerank{budget}"] = {
            "rerank": budget,
            "coarse_recall@20": coarse_recall(res, gt, 20),
            f"coarse_recall@{cfg.query.top_k}": coarse_recall(res, gt, cfg.query.top_k),
            "metrics": buckets,
            "coarse_seconds_per_query": qr.coarse_seconds / max(qr.queries, 1),
            "rerank_seconds_per_query": qr.rerank_seconds / max(qr.queries, 1),
            "query_seconds_total": qr.seconds,
        }
        print(f"rerank {budget}: mAP {buckets['all']['mAP']:.3f} loc AP {buckets['all']['loc_ap50']:.3f}")

    sift_results = os.path.join(work, "sift", "results.parquet")
    if args.sift and args.reuse and os.path.exists(sift_results):
        res = store.read_table(sift_results).to_pandas()
        with open(os.path.join(work, "sift", "timing.json")) as f:
            timing = json.load(f)
        report["sift"] = {"metrics": evaluate_buckets(res, gt), **timing}
    elif args.sift:
        version = store.open_index(index)
        icfg = index_config(version, cfg)
        qtable = load_queries(queries_uri)
        patches = {
            q: load_patch(u, None, icfg.preprocess.max_pixels)
            for q, u in zip(qtable.column(S.QUERY_ID).to_pylist(), qtable.column(S.URI).to_pylist())
        }
        gallery = sorted(store.image_uris(version).values())
        res, timing = run_baseline("sift", patches, gallery, icfg.preprocess.image_size, icfg.preprocess.max_pixels)
        res = S.check_columns(pa.Table.from_pandas(res, preserve_index=False), S.RESULTS_SCHEMA, "sift").to_pandas()
        res = res[res[S.RANK] <= cfg.query.top_k]  # the same result depth as roiqa's
        os.makedirs(os.path.dirname(sift_results), exist_ok=True)
        store.write_table(pa.Table.from_pandas(res, preserve_index=False), sift_results)
        with open(os.path.join(work, "sift", "timing.json"), "w") as f:
            json.dump(timing, f)
        report["sift"] = {"metrics": evaluate_buckets(res, gt), **timing}
        print(f"sift: mAP {report['sift']['metrics']['all']['mAP']:.3f} in {timing['seconds_total']:.0f} s")

    report["seconds_total"] = time.perf_counter() - t0
    write_report(args.out, "bench_scale", _json_ready(report), markdown(report))
    if not (args.keep or args.work):
        shutil.rmtree(work, ignore_errors=True)
    return 0


def _json_ready(value):
    from jobs.eval import json_ready

    return json_ready(value)


def markdown(report: dict) -> str:
    """The report as Markdown: one row per method and bucket, then the index and latency figures."""
    rows = ["| method | bucket | positives | mAP | loc AP@0.5 |", "|---|---|---|---|---|"]
    methods = [(f"roiqa, rerank {r['rerank']}", r["metrics"]) for r in report["runs"].values()]
    if "sift" in report:
        methods.append(("SIFT + RANSAC (every image)", report["sift"]["metrics"]))
    for name, m in methods:
        for bucket, v in m.items():
            rows.append(f"| {name} | {bucket} | {v['n_positives']} | {v['mAP']:.3f} | {v['loc_ap50']:.3f} |")
    ix = report["index"]
    lines = [
        f"{report['images']} images ({report['distractors']} distractors), {report['queries']} queries, "
        f"{report['positives']} positives; top_k {report['top_k']}; "
        f"hubness k {report['hubness']['k']}, weight {report['hubness']['weight']}.",
        "",
        *rows,
        "",
        "| rerank | coarse recall@20 | coarse recall@top_k | coarse s/query | rerank s/query |",
        "|---|---|---|---|---|",
    ]
    for r in report["runs"].values():
        recall_k = [v for k, v in r.items() if k.startswith("coarse_recall@") and k != "coarse_recall@20"][0]
        lines.append(
            f"| {r['rerank']} | {r['coarse_recall@20']:.3f} | {recall_k:.3f} | "
            f"{r['coarse_seconds_per_query']:.2f} | {r['rerank_seconds_per_query']:.2f} |"
        )
    lines += [
        "",
        f"Index: {ix['bytes_per_image']:.0f} bytes/image, {ix['seconds_per_image']:.3f} s/image "
        f"({ix['indexed']} indexed, {ix['errors']} errors).",
    ]
    if "bytes_per_image_by_file" in ix:
        by = ix["bytes_per_image_by_file"]
        lines.append(
            f"Bytes per image by file: faiss {by['faiss']:,.0f}, hubness reference {by['hubness']:,.0f} (what a query "
            f"reads), embeddings Parquet {by['embeddings']:,.0f} (the rows a rebuild reads)."
        )
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
