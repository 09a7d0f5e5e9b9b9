"""`roiqa demo`: a sample collection from bundled photographs, indexed and queried on the embedded default."""

from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np

from jobs.common import add_config_arg, add_model_arg, add_quiet_arg, config_from, job_parser, progress_for, run


def parser() -> argparse.ArgumentParser:
    p = job_parser("demo", __doc__)
    p.add_argument("--out", default="demo-out", help="output folder (collection, index, results, overlays)")
    p.add_argument("--n-gallery", type=int, default=48, help="gallery images to build")
    p.add_argument("--seed", type=int, default=0, help="seed of the sample collection")
    p.add_argument("--top-k", type=int, default=None, help="images per query (default: the whole gallery)")
    p.add_argument(
        "--rerank", type=int, default=24, help="of those, how many are reranked densely (dense matching, slower)"
    )
    add_model_arg(p)
    add_config_arg(p)
    add_quiet_arg(p)
    return p


def demo_config(n_gallery: int, seed: int):
    """The sample collection's settings: 4 instances per object at the default size, fewer in smaller galleries."""
    from roiqa.eval.demo_data import OBJECTS, DemoConfig

    distractors = max(2, n_gallery // 6)
    capacity = (n_gallery - distractors) * DemoConfig.max_objects_per_image
    instances = max(1, min(4, capacity // len(OBJECTS)))
    if n_gallery - distractors < 1 or instances * len(OBJECTS) > capacity:
        raise ValueError(f"--n-gallery {n_gallery} is too small for {len(OBJECTS)} objects; use at least 12")
    return DemoConfig(n_gallery=n_gallery, instances_per_object=instances, n_distractors=distractors, seed=seed)


def chance_map(results, ground_truth, draws: int = 50, seed: int = 0) -> float:
    """mAP of a random ordering of each query's returned images (the floor a model must beat)."""
    from roiqa import schema as S
    from roiqa.eval.metrics import retrieval_metrics

    rng = np.random.default_rng(seed)
    vals = []
    for _ in range(draws):
        shuffled = results.copy()
        shuffled[S.RANK] = shuffled.groupby(S.QUERY_ID)[S.RANK].transform(lambda r: rng.permutation(r.values))
        vals.append(retrieval_metrics(shuffled, ground_truth)["mAP"])
    return float(np.mean(vals))


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)

    def go() -> int:
        from pipelines.index import run_index
        from pipelines.query import run_query
        from roiqa.eval.demo_data import build_demo_collection
        from roiqa.eval.metrics import MAP, N_QUERIES, evaluate, positives_found_key, recall_key
        from roiqa.index import store
        from roiqa.results.output import read_results
        from roiqa.weights import resolve_model

        out = os.path.abspath(args.out)
        cfg = config_from(args, query={"top_k": args.top_k or args.n_gallery, "rerank": args.rerank})
        t0 = time.perf_counter()
        col = build_demo_collection(os.path.join(out, "collection"), demo_config(args.n_gallery, args.seed))
        print(
            f"collection: {col.n_gallery} gallery images, {col.n_queries} queries in {out}/collection "
            f"({time.perf_counter() - t0:.1f} s)"
        )
        index_uri, query_out = os.path.join(out, "index"), os.path.join(out, "query")
        progress = progress_for("demo", args)
        ir = run_index(col.gallery_dir, index_uri, cfg, resolve_model(args.model), progress)
        qr = run_query(index_uri, col.queries_uri, query_out, cfg, progress)
        results, gt = read_results(query_out), store.read_table(col.ground_truth_uri).to_pandas()
        m = evaluate(results, gt)
        model = store.open_index(index_uri).manifest["model"]
        report = {
            "weights": model["weights"],
            "model": model["config"]["backbone"],
            **{k: round(v, 4) if isinstance(v, float) else v for k, v in m.items()},
            "chance_mAP": round(chance_map(results, gt), 4),
            "index_images": ir.inputs,
            "index_errors": ir.errors,
            "index_seconds": round(ir.seconds, 2),
            "index_images_per_s": round(ir.inputs / max(ir.pipeline_seconds, 1e-9), 2),
            "query_seconds": round(qr.seconds, 2),
            "rerank_seconds": round(qr.rerank_seconds, 2),
        }
        with open(os.path.join(out, "metrics.json"), "w") as f:
            json.dump(report, f, indent=2)
        print()
        print("roiqa demo")
        print(f"  weights           {report['weights']} ({report['model']})")
        if model["weights"].startswith("random-init"):
            print("  note              no trained model was given: these figures are those of an UNTRAINED network")
            print("                    (random weights); pass --model CHECKPOINT for a trained one")
        ks = (1, 5, 10)
        print(f"  retrieval         mAP {m[MAP]:.3f} (chance {report['chance_mAP']:.3f}) over {m[N_QUERIES]} queries")
        print(
            f"                    Recall@1/5/10 {' / '.join(f'{m[recall_key(k)]:.3f}' for k in ks)} "
            "(share of queries with a positive in the top K)"
        )
        print(
            f"                    positives found@1/5/10 {' / '.join(f'{m[positives_found_key(k)]:.3f}' for k in ks)} "
            "(share of each query's positives in its top K)"
        )
        print(
            f"  localization      AP@0.5 {m['loc_ap50']:.3f}; positives in top 10 with IoU>=0.5: {m['top10_iou50']:.3f}"
        )
        print(
            f"  index             {ir.inputs} images, {ir.errors} errors, {ir.seconds:.1f} s "
            f"({report['index_images_per_s']:.2f} images/s over the pipeline wall time, actor start-up included)"
        )
        print(
            f"  query             {qr.queries} queries, top {cfg.query.top_k}, {cfg.query.rerank} reranked per query "
            f"(score: {cfg.query.score}); {qr.seconds:.1f} s, of which rerank {qr.rerank_seconds:.1f} s"
        )
        print(f"  results           {qr.run}/results.parquet")
        print(f"  overlays          {qr.run}/heatmaps/<query_id>/<rank>-<image_id>.png")
        if qr.report:
            print(f"  report            {qr.report} (open it in a browser)")
        print(f"  metrics           {out}/metrics.json")
        return 0

    return run(go, "demo")


if __name__ == "__main__":
    raise SystemExit(main())
