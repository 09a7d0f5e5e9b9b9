"""Experiment: which regional descriptors let the coarse stage find small objects among many distractors.

Builds the evaluation collection plus `--distractors` images, runs the shipped model's body once per image (each
image resized and padded as the index does) and keeps its descriptor-level map, encodes every query's coarse views
(`query.coarse_sizes` x `query.coarse_rotations`, as `QueryEncoder` does), then scores variants of the regional
descriptors by exact search: an image's score is its best region over every view, as in the query pipeline.
Exact search is a labelled upper bound (the default index is IVF,SQ8).

Variants (one change each against the shipped one):
- `shipped`: GeM (p 3) over the windows of `roiqa.models.regions.WINDOWS`, whitening fitted on the training photos;
- `collection whitening`: the whitening fitted on a sample of the collection's own regions;
- `hubness k K, weight W`: each region's score less W x its hubness (`roiqa.index.hubness.hubness`: the mean of its
  K best inner products with `--hub-sample` regions of other images of the collection), as the index now does;
- `windows ...`: another window grid;
- `gem p P`: another GeM exponent (whitening fitted on the collection, since the shipped one fits p 3).

Reports per variant: coarse recall@20 / @100 of the positives, coarse mAP, regions per image, and each missed
positive's rank.

    python -m benchmarks.exp_coarse --distractors 2000
    python -m benchmarks.exp_coarse --distractors 2000 --only-hubness --hub-k 5,10,30 --hub-weights 0.25,0.5,0.75,1
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import numpy as np
import torch

from benchmarks.common import machine, write_report
from benchmarks.exp_region_dims import average_precision


def rank_images(qvec: np.ndarray, vectors: np.ndarray, offsets: np.ndarray, penalty: np.ndarray | None) -> np.ndarray:
    """Per image, its best region's score over every view: (views, D) x (N regions, D) -> (images,)."""
    s = torch.from_numpy(vectors) @ torch.from_numpy(qvec).T  # (N, views)
    best = s.max(1).values.numpy()
    if penalty is not None:
        best = best - penalty
    return np.maximum.reduceat(best, offsets)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--distractors", type=int, default=2000)
    p.add_argument("--seed", type=int, default=1000)
    p.add_argument("--hub-k", default="10", help="comma-separated neighbour counts k of the hubness")
    p.add_argument("--hub-weights", default="0.5,1.0", help="comma-separated hubness weights")
    p.add_argument("--only-hubness", action="store_true", help="only the shipped and hubness variants")
    p.add_argument(
        "--windows",
        default=None,
        help="';'-separated window sets to try with hubness (k 10, weight 0.5), each ','-separated 'WxH/STEP' cells, "
        "e.g. '3x3/2,5x5/3,8x8/4;3x3/2,5x5/3,8x8/4,3x8/2,8x3/2'",
    )
    p.add_argument(
        "--parts",
        action="store_true",
        help="also try query parts: a query whose long side is over 1.6x its short side adds views of square crops "
        "along its long axis (hubness k 10, weight 0.5)",
    )
    p.add_argument("--hub-sample", type=int, default=20000)
    p.add_argument("--model", default=None, help="checkpoint whose whitening is tried (default: the shipped one)")
    p.add_argument("--work", default=None)
    p.add_argument("--out", default="benchmarks/results")
    p.add_argument("--name", default="exp_coarse", help="report file name (without extension)")
    args = p.parse_args(argv)

    from roiqa import schema as S
    from roiqa.config import RoiqaConfig
    from roiqa.eval.demo_data import build_distractors, build_eval_collection
    from roiqa.index import hubness as hub
    from roiqa.index import store
    from roiqa.io.imageio import decode_image, pad_to_square, resize_long_side
    from roiqa.models.checkpoint import load_matcher
    from roiqa.models.regions import WINDOWS, Whitening, box_gem, region_grid
    from roiqa.stages.rerank import MIN_PART_SIDE, coarse_views, load_patch, query_parts, rotate_patch
    from roiqa.weights import resolve_model

    torch.set_num_threads(os.cpu_count() or 1)
    cfg = RoiqaConfig()
    work = args.work or tempfile.mkdtemp(prefix="exp-coarse-")
    col_dir = os.path.join(work, "collection")
    if not os.path.exists(os.path.join(col_dir, "ground_truth.parquet")):
        col = build_eval_collection(col_dir, seed=args.seed)
        build_distractors(col.gallery_dir, args.distractors, seed=args.seed + 1)
    gallery_dir = os.path.join(col_dir, "gallery")
    model = load_matcher(resolve_model(args.model), cfg.model).eval()
    lv, stride, size = model.cfg.descriptor_level, model.stride(model.cfg.descriptor_level), cfg.preprocess.image_size

    # --- the descriptor-level map of every image (cached) --------------------------------------------------
    names = sorted(os.listdir(gallery_dir))
    cache = os.path.join(work, f"level{lv}.npz")
    t0 = time.perf_counter()
    if os.path.exists(cache):
        z = np.load(cache)
        maps = [z[f"m{i}"] for i in range(len(names))]
    else:
        maps = []
        batch: list[np.ndarray] = []
        valid: list[tuple[int, int]] = []

        def flush() -> None:
            with torch.inference_mode():
                f = model.pyramid(np.stack(batch))[lv].float()
            for b, (h, w) in enumerate(valid):
                maps.append(f[b, :, : -(-h // stride), : -(-w // stride)].half().numpy())
            batch.clear()
            valid.clear()

        for n in names:
            with open(os.path.join(gallery_dir, n), "rb") as fh:
                img, _ = resize_long_side(decode_image(fh.read(), n), size)
            batch.append(pad_to_square(img, size))
            valid.append(img.shape[:2])
            if len(batch) == 16:
                flush()
        if batch:
            flush()
        np.savez(cache, **{f"m{i}": m for i, m in enumerate(maps)})
    print(f"{len(names)} images embedded in {time.perf_counter() - t0:.0f} s", flush=True)

    # --- queries: the raw (unwhitened) GeM of each coarse view, per GeM exponent --------------------------
    queries = store.read_table(os.path.join(col_dir, "queries.parquet"))
    qids = queries.column(S.QUERY_ID).to_pylist()
    qmaps, pmaps = [], []
    for u in queries.column(S.URI).to_pylist():
        patch = load_patch(u, None, cfg.preprocess.max_pixels)
        views = []
        for vsize, rot in coarse_views(cfg.query):
            pv, _ = resize_long_side(rotate_patch(patch, rot), vsize)
            with torch.inference_mode():
                views.append(model.pyramid(pv[None])[lv][0].float())
            del pv
        qmaps.append(views)
        parts = []
        h, w = patch.shape[:2]
        shrink = min(h, w) / max(h, w)
        for crop in query_parts(patch, 1.6 if args.parts else 0.0):  # as QueryEncoder.coarse_descriptors
            for vsize, rot in coarse_views(cfg.query):
                pv, _ = resize_long_side(rotate_patch(crop, rot), max(MIN_PART_SIDE, int(vsize * shrink)))
                with torch.inference_mode():
                    parts.append(model.pyramid(pv[None])[lv][0].float())
        pmaps.append(parts)
    gt = store.read_table(os.path.join(col_dir, "ground_truth.parquet")).to_pandas()
    positives = {q: set(os.path.basename(u) for u in g[S.URI]) for q, g in gt.groupby(S.QUERY_ID)}
    names_arr = np.array(names)

    def gem(x: torch.Tensor, pw: float) -> torch.Tensor:
        return x.clamp(min=1e-6).pow(pw).mean(dim=(-2, -1)).pow(1.0 / pw)

    def regions(windows, pw: float) -> tuple[np.ndarray, np.ndarray]:
        out, counts = [], []
        for m in maps:
            x = torch.from_numpy(m).float()
            cells = region_grid(x.shape[1], x.shape[2], windows)
            out.append(box_gem(x, cells, pw))
            counts.append(len(cells))
        return torch.cat(out), np.asarray(counts)

    def evaluate(name: str, vectors: torch.Tensor, counts, qraw, white, pen=None) -> dict:
        v = white(vectors).numpy().astype(np.float32)
        offsets = np.concatenate([[0], np.cumsum(counts)[:-1]])
        aps, r20, r100, found, missed = [], 0, 0, 0, []
        for qi, qid in enumerate(qids):
            qv = white(qraw[qi]).numpy().astype(np.float32)
            score = rank_images(qv, v, offsets, pen)
            order = np.argsort(-score, kind="stable")
            rel = np.isin(names_arr[order], list(positives.get(qid, ())))
            aps.append(average_precision(rel))
            ranks = np.flatnonzero(rel) + 1
            r20 += int((ranks <= 20).sum())
            r100 += int((ranks <= 100).sum())
            found += len(ranks)
            missed += [f"{qid}:{r}" for r in ranks if r > 100]
        row = {
            "variant": name,
            "coarse_mAP": float(np.mean(aps)),
            "coarse_recall@20": r20 / max(found, 1),
            "coarse_recall@100": r100 / max(found, 1),
            "regions_per_image": float(np.mean(counts)),
            "missed@100": missed,
        }
        print(row, flush=True)
        return row

    def rows_out(rows: list[dict]) -> None:
        report = {
            "machine": machine(),
            "images": len(names),
            "distractors": args.distractors,
            "queries": len(qids),
            "search": "exact (torch), best region over every coarse view",
            "rows": rows,
        }
        lines = [
            f"{len(names)} images ({args.distractors} distractors), {len(qids)} queries; exact search.",
            "",
            "| variant | coarse mAP | coarse recall@20 | coarse recall@100 | regions / image |",
            "|---|---|---|---|---|",
            *[
                f"| {r['variant']} | {r['coarse_mAP']:.3f} | {r['coarse_recall@20']:.3f} | "
                f"{r['coarse_recall@100']:.3f} | {r['regions_per_image']:.0f} |"
                for r in rows
            ],
        ]
        write_report(args.out, args.name, report, "\n".join(lines))

    rng = np.random.default_rng(0)
    rows = []
    base, counts = regions(WINDOWS, 3.0)
    qraw3 = [torch.stack([gem(v, 3.0) for v in views]) for views in qmaps]
    shipped = model.whitening
    rows.append(evaluate("shipped", base, counts, qraw3, shipped))

    sample = base[rng.choice(len(base), min(len(base), 200_000), replace=False)]
    cw = Whitening(base.shape[1])
    cw.fit(sample)
    rows.append(evaluate("collection whitening", base, counts, qraw3, cw))

    # hubness as the index measures it (roiqa.index.hubness: the reference's regions of the same image left out)
    v = shipped(base).numpy().astype(np.float32)
    owner = np.repeat(np.arange(len(counts)), counts)
    ref = np.sort(rng.choice(len(base), min(len(base), args.hub_sample), replace=False))
    hubs = {}  # k -> hubness of every region
    for k in (int(x) for x in args.hub_k.split(",")):
        h = hubs[k] = hub.hubness(v, owner, v[ref], owner[ref], k)
        for lam in (float(x) for x in args.hub_weights.split(",")):
            rows.append(evaluate(f"hubness k {k}, weight {lam}", base, counts, qraw3, shipped, lam * h))
    if args.parts:
        h = hubs[10] if 10 in hubs else hub.hubness(v, owner, v[ref], owner[ref], 10)
        qparts = [torch.stack([gem(x, 3.0) for x in views + parts]) for views, parts in zip(qmaps, pmaps)]
        rows.append(
            evaluate("hubness k 10, weight 0.5, + square parts of long queries", base, counts, qparts, shipped, 0.5 * h)
        )
        rows_out(rows)
        return 0
    del v
    if args.only_hubness:
        rows_out(rows)
        return 0
    if args.windows:
        for spec in args.windows.split(";"):
            windows = tuple(
                (int(wh.split("x")[0]), int(wh.split("x")[1]), int(st))
                for wh, st in (w.split("/") for w in spec.split(","))
            )
            vec, cnt = regions(windows, 3.0)
            v = shipped(vec).numpy().astype(np.float32)
            own = np.repeat(np.arange(len(cnt)), cnt)
            pick = np.sort(rng.choice(len(v), min(len(v), args.hub_sample), replace=False))
            h = hub.hubness(v, own, v[pick], own[pick], 10)
            rows.append(evaluate(f"windows {spec}, hubness k 10, weight 0.5", vec, cnt, qraw3, shipped, 0.5 * h))
            del vec, v
        rows_out(rows)
        return 0

    for windows in (((2, 1), (3, 2), (5, 3), (8, 4)), ((3, 1), (5, 2), (8, 4))):
        vec, cnt = regions(windows, 3.0)
        rows.append(evaluate(f"windows {windows}", vec, cnt, qraw3, shipped))
        del vec

    for pw in (2.0, 5.0):
        vec, cnt = regions(WINDOWS, pw)
        qraw = [torch.stack([gem(v, pw) for v in views]) for views in qmaps]
        w = Whitening(vec.shape[1])
        w.fit(vec[rng.choice(len(vec), min(len(vec), 200_000), replace=False)])
        rows.append(evaluate(f"gem p {pw} (collection whitening)", vec, cnt, qraw, w))
        del vec

    rows_out(rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
