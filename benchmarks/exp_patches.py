"""Experiment (seed 001): fixed 16x16 patches vs the dynamic complexity quadtree, retrieval mAP against compute.

Both variants of roiqa.models.patchnet are trained the same number of steps on the same batches of TRAINING_PHOTOS,
then embed the evaluation collection (roiqa.eval.demo_data.build_eval_collection: disjoint photographs): every gallery
image and every query crop, resized so the long side is the network's image_size. Queries rank the gallery by
cosine similarity; the figures are retrieval mAP, leaves (patches) per gallery image, FLOPs per image
(FlopCounterMode, convolutions and matrix multiplies) and the measured time per image (batch 1, median of
repeats, the variants interleaved), each also as a ratio to the fixed variant measured in the same run.

    .venv/bin/python -m benchmarks.exp_patches --steps 60 --out benchmarks/results
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import numpy as np
import pyarrow.parquet as pq
import torch

from benchmarks.common import machine, markdown, median, write_report
from roiqa import schema as S
from roiqa.config import to_dict
from roiqa.eval.demo_data import build_eval_collection, load_photo
from roiqa.eval.metrics import average_precision, positives_found_at_k, recall_at_k
from roiqa.io.imageio import decode_image
from roiqa.models.patchnet import (
    PatchNet,
    PatchNetConfig,
    fit_images,
    flops_per_image,
    save_patchnet,
)
from roiqa.stages.embed import prepare
from roiqa.train.data import TRAIN_PHOTOS
from roiqa.train.patchnet import train_patchnet

VARIANTS = ("fixed", "dynamic")


def _load(paths: list[str], size: int) -> tuple[np.ndarray, np.ndarray]:
    """(N, size, size, 3) uint8 images (long side resized to `size`, zero-padded) and (N, 2) valid sizes."""
    out = [prepare(decode_image(open(p, "rb").read(), p), size) for p in paths]
    return np.stack([o[0] for o in out]), np.array([o[1] for o in out], np.int32)


def _embed(model: PatchNet, images: np.ndarray, hw: np.ndarray, batch: int = 16) -> np.ndarray:
    parts = [model.embed_images(images[i : i + batch], hw[i : i + batch]) for i in range(0, len(hw), batch)]
    return np.concatenate(parts)


def _retrieval(q: np.ndarray, g: np.ndarray, qids: list[str], gallery: list[str], truth: dict) -> dict[str, float]:
    """mAP, Recall@5 (queries with a positive in the top 5) and positives found@5 (share of a query's positives in
    its top 5) of ranking the gallery by cosine for every query; chance: mean AP of random rankings."""
    sims = q @ g.T  # (Q, N)
    aps, r5, f5, chance = [], [], [], []
    rng = np.random.default_rng(0)
    for i, qid in enumerate(qids):
        rel = np.array([u in truth[qid] for u in gallery])
        order = np.argsort(-sims[i], kind="stable")
        aps.append(average_precision(rel[order], int(rel.sum())))
        r5.append(recall_at_k(rel[order], int(rel.sum()), 5))
        f5.append(positives_found_at_k(rel[order], int(rel.sum()), 5))
        chance.append(np.mean([average_precision(rel[rng.permutation(len(rel))], int(rel.sum())) for _ in range(50)]))
    return {
        "mAP": float(np.mean(aps)),
        "recall@5": float(np.mean(r5)),
        "positives_found@5": float(np.mean(f5)),
        "chance_mAP": float(np.mean(chance)),
    }


def _time_per_image(models: dict[str, PatchNet], images: np.ndarray, hw: np.ndarray, repeats: int) -> dict:
    """Per variant: median over repeats of the mean seconds per image (batch 1), split into the complexity map +
    layout and the whole embedding; the variants alternate inside every repeat."""
    times = {v: {"total": [], "layout": []} for v in models}
    for _ in range(repeats):
        for v, model in models.items():
            total = layout = 0.0
            for i in range(len(hw)):
                x = torch.from_numpy(images[i : i + 1])
                t0 = time.perf_counter()
                with torch.inference_mode():
                    xs, hs = fit_images(x, torch.from_numpy(hw[i : i + 1]).long(), model.cfg.image_size)
                    model.weights(xs, hs, soft=False)
                t1 = time.perf_counter()
                model.embed_images(images[i : i + 1], hw[i : i + 1])
                t2 = time.perf_counter()
                layout += t1 - t0
                total += t2 - t1
            times[v]["total"].append(total / len(hw))
            times[v]["layout"].append(layout / len(hw))
    return {v: {k: median(x) for k, x in d.items()} for v, d in times.items()}


def run(args: argparse.Namespace, command: str) -> tuple[dict, str]:
    torch.set_num_threads(args.threads)
    cfg = PatchNetConfig(image_size=args.image_size)
    photos = [load_photo(n) for n in TRAIN_PHOTOS]
    models, train = {}, {}
    for v in VARIANTS:
        t0 = time.perf_counter()
        model, hist = train_patchnet(
            photos, args.steps, cfg, args.batch_size, lambda_cost=args.lambda_cost, layout=v, seed=args.seed
        )
        train[v] = {"seconds": time.perf_counter() - t0, "first": hist[0], "last": hist[-1]}
        models[v] = model
        print(f"trained {v}: {train[v]['seconds']:.0f} s, last {hist[-1]}", file=sys.stderr)
        if args.save:  # a checkpoint the index's complexity stage takes as complexity.model
            save_patchnet(model, os.path.join(args.save, f"patchnet-{v}.safetensors"))

    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        col = build_eval_collection(tmp, n_gallery=args.gallery)
        gallery = sorted(os.path.join(col.gallery_dir, f) for f in os.listdir(col.gallery_dir))
        queries = pq.read_table(col.queries_uri).to_pylist()
        truth: dict[str, set[str]] = {}
        for row in pq.read_table(col.ground_truth_uri).to_pylist():
            truth.setdefault(row[S.QUERY_ID], set()).add(row[S.URI])
        g_img, g_hw = _load(gallery, args.image_size)
        q_img, q_hw = _load([r[S.URI] for r in queries], args.image_size)
        read_s = time.perf_counter() - t0
    qids = [r[S.QUERY_ID] for r in queries]

    results = {}
    for v, model in models.items():
        t0 = time.perf_counter()
        g, q = _embed(model, g_img, g_hw), _embed(model, q_img, q_hw)
        embed_s = time.perf_counter() - t0
        leaves = [len(lay) for lay in model.layout(torch.from_numpy(g_img), torch.from_numpy(g_hw).long())]
        f0, f1 = flops_per_image(model, 0), flops_per_image(model, 1)
        results[v] = {
            **_retrieval(q, g, qids, gallery, truth),
            "patches_per_image": float(np.mean(leaves)),
            "flops_per_image": float(f0 + (f1 - f0) * np.mean(leaves)),  # FLOPs are linear in the leaf count
            "embed_all_s": embed_s,
            "thresholds": model.thresholds.tolist(),
        }
    timing = _time_per_image(models, g_img, g_hw, args.repeats)
    ref = results["fixed"]
    for v, r in results.items():
        r["ms_per_image"] = 1000 * timing[v]["total"]
        r["layout_ms_per_image"] = 1000 * timing[v]["layout"]
        r["patches_ratio"] = r["patches_per_image"] / ref["patches_per_image"]
        r["flops_ratio"] = r["flops_per_image"] / ref["flops_per_image"]
        r["time_ratio"] = timing[v]["total"] / timing["fixed"]["total"]
        r["mAP_minus_fixed"] = r["mAP"] - ref["mAP"]

    report = {
        "experiment": "seed 001: fixed 16x16 patches vs dynamic complexity quadtree",
        "command": command,
        "args": vars(args),
        "config": to_dict(cfg),
        "gallery_images": len(gallery),
        "queries": len(qids),
        "read_and_build_s": read_s,
        "train": train,
        "results": results,
        "reference": "fixed (same run, same training batches and steps)",
        "machine": machine(),
    }
    rows = [
        [
            v,
            r["mAP"],
            r["recall@5"],
            r["positives_found@5"],
            r["patches_per_image"],
            r["patches_ratio"],
            r["flops_per_image"] / 1e6,
            r["flops_ratio"],
            r["ms_per_image"],
            r["layout_ms_per_image"],
            r["time_ratio"],
            train[v]["seconds"],
        ]
        for v, r in results.items()
    ]
    headers = ["variant", "mAP", "R@5", "found@5", "patches/img", "x fixed", "MFLOPs/img", "x fixed", "ms/img"]
    headers += ["of which map+layout", "x fixed"]
    table = markdown(headers + ["train s"], rows)
    table += (
        f"\n\n{len(qids)} queries, {len(gallery)} gallery images at {args.image_size} px; chance mAP "
        f"{results['fixed']['chance_mAP']:.3f}; {args.steps} steps x {args.batch_size} pairs per variant; "
        f"learned dynamic thresholds {[round(t, 3) for t in results['dynamic']['thresholds']]} "
        f"(initial {list(cfg.thresholds)}); ms/img: batch 1, median of {args.repeats} repeats, "
        f"{args.threads} torch thread(s).\n\nCommand: `{command}`"
    )
    return report, table


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=60, help="training steps per variant")
    p.add_argument("--batch-size", type=int, default=8, help="(query, image) pairs per step")
    p.add_argument("--lambda-cost", type=float, default=1.0, help="weight of the subdivision cost")
    p.add_argument("--image-size", type=int, default=PatchNetConfig.image_size, help="network image side")
    p.add_argument("--gallery", type=int, default=64, help="evaluation gallery images")
    p.add_argument("--repeats", type=int, default=3, help="timing repeats (median)")
    p.add_argument("--threads", type=int, default=1, help="torch threads")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    p.add_argument("--save", default=None, help="folder for patchnet-<variant>.safetensors (complexity.model)")
    args = p.parse_args(argv)
    command = " ".join([".venv/bin/python -m benchmarks.exp_patches", *(sys.argv[1:] if argv is None else argv)])
    report, table = run(args, command)
    write_report(args.out, "exp_patches", report, table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
