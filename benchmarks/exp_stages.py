"""Experiments of the optional pipeline stages on the evaluation collection: does each one help, and at what cost?

- refine (seed 000): localization AP@0.5 and mean IoU of the reranked boxes with and without ROI refinement.
- verify (seed 004): how well the ROI-mask verifier's probability separates true regions (the instance, IoU >= 0.5)
  from the rest, and mAP / loc AP when it is mixed into the score with several weights.
- masks (seed 002): pixels masked (skipped) against coarse mAP (faiss ranking) and shortlist mAP, with masks off, a
  fixed threshold and the adaptive controller.

Every variant runs the real `run_index` / `run_query` on the same collection; figures are written as JSON + Markdown.
`python -m benchmarks.exp_stages --experiment all` (about 25 min on 2 CPUs); `--quick` is a smoke run.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile

import numpy as np
import pandas as pd

from benchmarks.common import machine, markdown, write_report
from roiqa.eval.metrics import roc_auc

EXPERIMENTS = ("refine", "verify", "masks")


def rerank_by(results: pd.DataFrame, score: np.ndarray) -> pd.DataFrame:
    """`results` with SCORE replaced by `score` and ranks recomputed per query (nan scores last)."""
    from roiqa import schema as S

    df = results.copy()
    df[S.SCORE] = score
    key = np.where(np.isnan(score), -np.inf, score)
    df = df.assign(_k=-key).sort_values([S.QUERY_ID, "_k", S.IMAGE_ID]).drop(columns="_k")
    df[S.RANK] = df.groupby(S.QUERY_ID).cumcount() + 1
    return df


def pair_labels(results: pd.DataFrame, gt: pd.DataFrame, iou: float = 0.5) -> np.ndarray:
    """Per result row: the image holds the query's instance and the row's box overlaps it with IoU >= `iou`."""
    from roiqa import schema as S
    from roiqa.boxes import box_iou

    truth = {k: g[S.BOX].to_numpy(np.float32) for k, g in gt.groupby([S.QUERY_ID, S.URI])}
    out = np.zeros(len(results), bool)
    boxes = results[S.BOX].to_numpy(np.float32)
    for i, (q, u) in enumerate(zip(results[S.QUERY_ID], results[S.URI])):
        t = truth.get((q, u))
        if t is not None and np.isfinite(boxes[i]).all():
            out[i] = float(box_iou(boxes[i : i + 1], t).max()) >= iou
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--experiment", default="all", choices=(*EXPERIMENTS, "all"))
    p.add_argument("--n-gallery", type=int, default=64, help="gallery images of the evaluation collection")
    p.add_argument("--seed", type=int, default=1000, help="seed of the evaluation collection")
    p.add_argument("--shortlist", type=int, default=8, help="masks: images reranked per query (coarse matters)")
    p.add_argument("--out", default="benchmarks/results", help="folder for exp_<experiment>.json / .md")
    p.add_argument("--quick", action="store_true", help="16 images, smoke run")
    args = p.parse_args(argv)
    if args.quick:
        args.n_gallery, args.shortlist = 16, 4

    import torch

    from pipelines.index import run_index
    from pipelines.query import run_query
    from roiqa import schema as S
    from roiqa.config import RoiqaConfig, replace_section
    from roiqa.eval.demo_data import build_eval_collection
    from roiqa.eval.metrics import MAP, evaluate
    from roiqa.index import store
    from roiqa.results.output import read_results
    from roiqa.weights import resolve_model

    torch.set_num_threads(os.cpu_count() or 1)
    experiments = EXPERIMENTS if args.experiment == "all" else (args.experiment,)
    work = tempfile.mkdtemp(prefix="roiqa-exp-")
    model = resolve_model(None)
    try:
        col = build_eval_collection(os.path.join(work, "collection"), seed=args.seed, n_gallery=args.n_gallery)
        gt = store.read_table(col.ground_truth_uri).to_pandas()
        base = replace_section(RoiqaConfig(), "query", top_k=args.n_gallery, rerank=args.n_gallery, overlays=False)
        base = replace_section(base, "verify", enabled=False)  # each experiment switches on only its own stage
        indexes: dict[str, str] = {}

        def index(name: str, cfg: RoiqaConfig) -> tuple[str, float]:
            uri = os.path.join(work, f"index-{name}")
            r = run_index(col.gallery_dir, uri, cfg, model)
            indexes[name] = uri
            return uri, r.pipeline_seconds

        def query(idx: str, name: str, cfg: RoiqaConfig) -> tuple[pd.DataFrame, float]:
            out = os.path.join(work, f"query-{name}")
            r = run_query(idx, col.queries_uri, out, cfg)
            return read_results(out), r.rerank_seconds

        default_index, _ = index("default", base)
        info = {"machine": machine(), "n_gallery": args.n_gallery, "seed": args.seed, "n_queries": col.n_queries}

        if "refine" in experiments:
            rows, report = [], dict(info)
            for name, on in (("off", False), ("on", True)):
                cfg = replace_section(base, "refine", enabled=on)
                res, secs = query(default_index, f"refine-{name}", cfg)
                m = evaluate(res, gt)
                steps = res[S.REFINE_STEPS].dropna()
                report[name] = {
                    **m,
                    "rerank_seconds": secs,
                    "mean_refine_steps": float(steps.mean()) if len(steps) else 0,
                }
                rows.append([f"refine {name}", m[MAP], m["loc_ap50"], m["mean_iou"], m["top10_iou50"], secs])
            table = markdown(["variant", "mAP", "loc AP@0.5", "mean IoU", "top-10 IoU>=0.5", "rerank s"], rows)
            write_report(args.out, "exp_refine", report, table)

        if "verify" in experiments:
            cfg = replace_section(base, "verify", enabled=True, weight=0.0)
            res, secs = query(default_index, "verify", cfg)
            _, plain_secs = query(default_index, "verify-off", base)
            labels = pair_labels(res, gt)
            prob = res[S.VERIFY_PROB].to_numpy(np.float64)
            report = {
                **info,
                "auc_verify_prob": roc_auc(prob, labels),
                "auc_rerank_score": roc_auc(res[S.SCORE], labels),
            }
            report["rerank_seconds"] = {"with_verify": secs, "without": plain_secs}
            rows = [["AUC, true region vs rest", report["auc_rerank_score"], report["auc_verify_prob"], "-", "-"]]
            for w in (0.0, 0.25, 0.5, 1.0):
                mixed = rerank_by(res, res[S.SCORE].to_numpy(np.float64) + w * (prob - 0.5))
                m = evaluate(mixed, gt)
                report[f"weight_{w}"] = m
                rows.append([f"score + {w} (p - 0.5)", m[MAP], m["loc_ap50"], m["top10_iou50"], m["mean_iou"]])
            table = markdown(
                ["variant", "mAP (or AUC of score)", "loc AP@0.5 (or AUC of p)", "top-10 IoU", "mean IoU"], rows
            )
            write_report(args.out, "exp_verify", report, table)

        if "masks" in experiments:
            rows, report = [], dict(info, shortlist=args.shortlist)
            short = replace_section(base, "query", top_k=args.n_gallery, rerank=args.shortlist, overlays=False)
            variants = [
                ("off", {"enabled": False}),
                ("recorded, not applied", {"enabled": True, "apply": False, "adaptive": False}),
                ("applied, fixed threshold", {"enabled": True, "apply": True, "adaptive": False}),
                ("applied, adaptive", {"enabled": True, "apply": True, "adaptive": True}),
            ]
            for name, over in variants:
                icfg = replace_section(short, "masks", **over)
                idx, isecs = index(name.replace(" ", "-").replace(",", ""), icfg)
                emb = store.open_index(idx).embeddings().to_pandas() if over["enabled"] else None
                cov_col = S.mask_columns("object-instance")[0]
                skipped = float(1 - emb[cov_col].mean()) if emb is not None and over.get("apply") else 0.0
                recorded = float(1 - emb[cov_col].mean()) if emb is not None else float("nan")
                res, secs = query(idx, f"masks-{len(rows)}", short)
                coarse = rerank_by(res, res[S.COARSE_SCORE].to_numpy(np.float64))
                mc, mf = evaluate(coarse, gt), evaluate(res, gt)
                entry = {"coarse": mc, "shortlist": mf, "index_seconds": isecs, "pixels_skipped": skipped}
                entry["mask_would_skip"] = recorded
                ctrl = store.open_index(idx).uri(store.MASKS_CONTROLLER)
                if os.path.exists(ctrl):
                    entry["controller"] = store.read_table(ctrl).to_pandas().to_dict(orient="list")
                report[name] = entry
                rows.append([name, recorded, skipped, mc[MAP], mf[MAP], mf["loc_ap50"], isecs])
            table = markdown(
                ["variant", "mask fraction", "pixels skipped", "coarse mAP", "shortlist mAP", "loc AP@0.5", "index s"],
                rows,
            )
            write_report(args.out, "exp_masks", report, table)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
