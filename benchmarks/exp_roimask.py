"""Seed 004 experiment: where and how the ROI mask enters the classifier (first-layer add / mul, stage-3 add,
multi-layer add, hard attention, no mask), trained on the same batches with the same seed.

Per variant: held-out classification accuracy (fresh views of the training instances) overall, for small regions
(box long side < 1/4 of the input) and large ones; verification AUC on held-out training-photo crops; and
verification AUC on the evaluation objects (roiqa.eval.demo_data.EVAL_OBJECTS in build_eval_collection's gallery, whose
photographs training never sees): every query patch against every ground-truth box, positive when the box shows the
query's object. Writes exp_roimask.json and exp_roimask.md under --out.

    python -m benchmarks.exp_roimask --out benchmarks/results [--steps 800] [--variants first-add,deep-add,...]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import tempfile
import time

import numpy as np
import pyarrow.parquet as pq
import torch

VARIANTS = ("first-add", "first-mul", "deep-add", "multi-add", "hard", "none")
EVAL_SMALL = 64.0  # evaluation boxes whose long side is below this (gallery pixels) count as small
SEED_CLAIMS = (
    "attention-map merging beats hard attention, most of all for small regions; merging at the first layer beats "
    "deeper layers; several merge layers are the same or worse than the first layer alone"
)


def eval_pairs(folder: str, n_gallery: int, seed: int) -> dict:
    """Query patches and every ground-truth box of the evaluation collection (built under `folder`)."""
    from roiqa.eval.demo_data import build_eval_collection
    from roiqa.io.imageio import decode_image
    from roiqa.schema import BOX, QUERY_ID, URI

    col = build_eval_collection(folder, seed=seed, n_gallery=n_gallery)
    queries = pq.read_table(col.queries_uri).to_pydict()
    gt = pq.read_table(col.ground_truth_uri).to_pydict()
    patches = {q: decode_image(open(u, "rb").read(), u) for q, u in zip(queries[QUERY_ID], queries[URI])}
    images = {u: decode_image(open(u, "rb").read(), u) for u in sorted(set(gt[URI]))}
    boxes = np.stack([np.asarray(gt[c], np.float32) for c in BOX], axis=1)  # (R, 4)
    return {"patches": patches, "images": images, "uris": gt[URI], "owners": gt[QUERY_ID], "boxes": boxes}


def eval_auc(verifier, pairs: dict) -> dict:
    """AUC of cos(query, region) over every (query, ground-truth box) pair, overall and by the box's size."""
    from roiqa.eval.metrics import roc_auc

    names = list(pairs["patches"])
    q = np.stack([verifier.embed_query(pairs["patches"][n]) for n in names])  # (Q, D)
    regions = np.zeros((len(pairs["boxes"]), q.shape[1]), np.float32)  # (R, D)
    uris = np.array(pairs["uris"])
    for u in sorted(set(pairs["uris"])):
        rows = np.flatnonzero(uris == u)
        regions[rows] = verifier.embed_regions(pairs["images"][u], pairs["boxes"][rows])
    cos = q @ regions.T  # (Q, R)
    labels = np.array(names)[:, None] == np.array(pairs["owners"])[None, :]
    b = pairs["boxes"]
    small = np.broadcast_to((np.maximum(b[:, 2] - b[:, 0], b[:, 3] - b[:, 1]) < EVAL_SMALL)[None], cos.shape)
    prob = 1 / (1 + np.exp(-(verifier.a * cos + verifier.b)))
    return {
        "eval_auc": roc_auc(cos, labels),
        "eval_auc_small": roc_auc(cos[small], labels[small]),
        "eval_auc_large": roc_auc(cos[~small], labels[~small]),
        "eval_pairs": [int(labels.sum()), int((~labels).sum())],
        "eval_small_positives": int(labels[small].sum()),
        "eval_mean_prob_pos_neg": [float(prob[labels].mean()), float(prob[~labels].mean())],
    }


def _compare(result: dict, better: str, worse: str, metric: str) -> tuple[str, float]:
    """'better x vs worse y (+d, z SE)' for an accuracy metric and the difference in standard errors."""
    a, b = result["variants"][better], result["variants"][worse]
    n = a["heldout_n_small"] if metric.endswith("small") else a["heldout_n_small"] + a["heldout_n_large"]
    n = a["heldout_n_large"] if metric.endswith("large") else n
    x, y = a[metric], b[metric]
    se = math.sqrt(max(x * (1 - x) + y * (1 - y), 1e-9) / n)  # of the difference of two independent proportions
    return f"{better} {x:.3f} vs {worse} {y:.3f} ({x - y:+.3f}, {(x - y) / se:+.1f} SE)", (x - y) / se


def verdicts(result: dict) -> list[str]:
    """One line per seed claim: held-out accuracy differences in standard errors, the AUCs beside them."""
    v = result["variants"]

    def word(z: float, no_worse: bool) -> str:
        if no_worse:  # the claim "a is the same or better than b" fails only when b wins by 2 SE
            return "**reproduced**" if z > -2 else "**contradicted**"
        return "**reproduced**" if z > 2 else ("**contradicted**" if z < -2 else "**not resolved** (within 2 SE)")

    def aucs(*names: str) -> str:
        return ", ".join(f"{n} {v[n]['eval_auc']:.3f} / {v[n]['verify_auc_holdout']:.3f}" for n in names)

    lines = []
    claims = [
        ("Attention map (first-layer add) beats hard attention", "first-add", "hard", False),
        ("Merging at the first layer beats merging at stage 3", "first-add", "deep-add", False),
        ("Several merge layers are the same or worse than the first layer alone", "first-add", "multi-add", True),
    ]
    for text, a, b, no_worse in claims:
        if a not in v or b not in v:
            continue
        overall, z = _compare(result, a, b, "heldout_acc")
        small, z_small = _compare(result, a, b, "heldout_acc_small")
        lines.append(
            f"- {text}: {word(z, no_worse)} on held-out accuracy: {overall}; small regions {small} "
            f"({word(z_small, no_worse)}); eval AUC / held-out-crop AUC: {aucs(a, b)}."
        )
    if {"first-add", "hard"} <= set(v):
        gap = {n: v[n]["heldout_acc_large"] - v[n]["heldout_acc_small"] for n in ("first-add", "hard")}
        lines.append(
            f"- Large-minus-small accuracy gap: first-add {gap['first-add']:+.3f}, hard {gap['hard']:+.3f} (the seed "
            "expects attention's advantage over hard attention to be largest on small regions)."
        )
    return lines


def markdown(result: dict) -> str:
    rows = [
        "| variant | loss (last 20 steps) | held-out acc | acc small | acc large | verify AUC held-out crops | "
        "eval AUC | eval AUC small | eval AUC large | seconds (train + eval) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in result["variants"].items():
        rows.append(
            f"| {name} | {r['loss_last']:.2f} | {r['heldout_acc']:.3f} | {r['heldout_acc_small']:.3f} | "
            f"{r['heldout_acc_large']:.3f} | {r['verify_auc_holdout']:.3f} | {r['eval_auc']:.3f} | "
            f"{r['eval_auc_small']:.3f} | {r['eval_auc_large']:.3f} | {r['seconds']['total']:.0f} |"
        )
    for name, r in result.get("checkpoints", {}).items():
        rows.append(
            f"| {name} (checkpoint) | | | | | | {r['eval_auc']:.3f} | {r['eval_auc_small']:.3f} | "
            f"{r['eval_auc_large']:.3f} | |"
        )
    t = result["train"]
    v = next(iter(result["variants"].values()))
    return "\n".join(
        [
            "# Seed 004: ROI mask as input (exp_roimask)",
            "",
            f"Command: `{result['command']}`",
            "",
            f"Every variant: {t['steps']} steps x {t['batch_size']} views (the same batches, seed {t['seed']}), "
            f"{t['instances']} instances (crops of TRAINING_PHOTOS), input {result['input_size']} px, 1 torch thread. "
            f"Held-out accuracy: {t['eval_views']} fresh scene views of the training instances ({v['heldout_n_small']} "
            f"small: box long side < 1/4 of the input; {v['heldout_n_large']} large). Held-out AUC: "
            f"{t['holdout_instances']} crops never trained on, clean crop vs 2 pasted copies each. Eval AUC: the "
            f"{len(result['eval']['objects'])} EVAL_OBJECTS in a {result['eval']['n_gallery']}-image evaluation "
            f"gallery, every query vs every ground-truth box ({v['eval_pairs'][0]} positive, {v['eval_pairs'][1]} "
            f"negative pairs; small: box long side < {EVAL_SMALL:.0f} px, {v['eval_small_positives']} positives).",
            "",
            *rows,
            "",
            f"Seed claims: {SEED_CLAIMS}. Verdicts: a difference counts when it exceeds 2 standard errors of the "
            "held-out accuracy (independent proportions: conservative, the views are the same for every variant); "
            "the eval AUCs rest on 40 positive pairs: differences of a few hundredths are noise.",
            "",
            *verdicts(result),
            "",
            "Data generation for all variants (once): {:.0f} s; total run {:.0f} s.".format(
                result["seconds"]["data"], result["seconds"]["total"]
            ),
            "",
        ]
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="benchmarks/results", help="folder for exp_roimask.json / .md")
    p.add_argument("--steps", type=int, default=800, help="optimiser steps per variant (the same for all)")
    p.add_argument("--pool", type=int, default=12288, help="training views drawn once, shared by all variants")
    p.add_argument("--instances", type=int, default=100, help="training instances (classes)")
    p.add_argument("--input-size", type=int, default=96, help="side of the nets' input")
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated subset of {VARIANTS}")
    p.add_argument("--checkpoints", nargs="*", default=[], help="trained verifier files to score on the eval pairs")
    p.add_argument("--n-gallery", type=int, default=64, help="evaluation gallery images")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--report-only", action="store_true", help="train nothing: score --checkpoints into the JSON, rewrite the .md"
    )
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    if args.report_only:
        return report_only(args.out, args.checkpoints, args.n_gallery)

    from benchmarks.common import machine
    from roiqa.config import to_dict
    from roiqa.models.roimask import variant_config
    from roiqa.stages.verify import Verifier
    from roiqa.train.verifier import VerifierTrainConfig, train_verifier, training_batches, training_views

    t0 = time.perf_counter()
    cfg = VerifierTrainConfig(steps=args.steps, instances=args.instances, seed=args.seed, pool=args.pool)
    views, _ = training_views(cfg, args.input_size)
    batches = list(training_batches(cfg, views))  # shared by every variant
    with tempfile.TemporaryDirectory() as tmp:
        pairs = eval_pairs(tmp, args.n_gallery, seed=1000)
    t_data = time.perf_counter() - t0
    print(f"data: {t_data:.0f} s", file=sys.stderr, flush=True)

    results, checkpoints = {}, {}
    for name in args.variants.split(","):
        if name not in VARIANTS:
            raise SystemExit(f"--variants: unknown {name!r}; choose from {VARIANTS}")
        merge, op = (name.split("-") + ["add"])[:2]
        model_cfg = variant_config(merge, op, input_size=args.input_size, num_classes=cfg.instances)
        model, report = train_verifier(model_cfg, cfg, batches=batches)
        verifier = Verifier.from_model(model, **model.calibration)
        report.update(eval_auc(verifier, pairs))
        results[name] = {k: v for k, v in report.items() if k not in ("train",)}
        keys = ("loss_last", "heldout_acc", "heldout_acc_small", "verify_auc_holdout", "eval_auc", "eval_auc_small")
        print(name, json.dumps({k: round(report[k], 3) for k in keys}), file=sys.stderr, flush=True)
    for uri in args.checkpoints:
        checkpoints[os.path.basename(uri)] = eval_auc(Verifier(uri), pairs)

    result = {
        "command": "python -m benchmarks.exp_roimask " + " ".join(sys.argv[1:] if argv is None else argv),
        "machine": machine(),
        "train": to_dict(dataclasses.replace(cfg)),
        "input_size": args.input_size,
        "eval": {"objects": sorted(pairs["patches"]), "n_gallery": args.n_gallery, "small_below_px": EVAL_SMALL},
        "variants": results,
        "checkpoints": checkpoints,
        "seed_claims": SEED_CLAIMS,
        "seconds": {"data": t_data, "total": time.perf_counter() - t0},
    }
    write(args.out, result)
    return 0


def write(out: str, result: dict) -> None:
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "exp_roimask.json"), "w") as f:
        json.dump(result, f, indent=2)
    with open(os.path.join(out, "exp_roimask.md"), "w") as f:
        f.write(markdown(result))
    print(markdown(result))


def report_only(out: str, checkpoints: list[str], n_gallery: int) -> int:
    """Score `checkpoints` on the same evaluation pairs and rewrite the results of an earlier run under `out`."""
    from roiqa.stages.verify import Verifier

    with open(os.path.join(out, "exp_roimask.json")) as f:
        result = json.load(f)
    if checkpoints:
        with tempfile.TemporaryDirectory() as tmp:
            pairs = eval_pairs(tmp, result["eval"]["n_gallery"], seed=1000)
        for uri in checkpoints:
            result["checkpoints"][os.path.basename(uri)] = eval_auc(Verifier(uri), pairs)
    write(out, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
