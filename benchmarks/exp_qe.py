"""Experiment: spatially verified query expansion of the coarse search (Chum et al., "Total Recall", 2007).

Takes an index and a query run that `bench_scale.py --keep` left in `--work`. For each query, the images the run
verified geometrically (inliers >= geometry.min_inliers) show the object; each gives the stored region of that
image whose box centre lies in the verified box and that scores best against the query. The coarse search then runs
again with those regions added to the query's descriptors, and the coarse recall of the positives is compared:

- `baseline`: the query's own coarse views (what the run searched);
- `union N`: plus the regions of the N best verified images as extra views (an image scores its best region over
  every view);
- `average N`: each view replaced by L2(view + sum of the regions) (average query expansion);
- `crop union N`: instead of stored regions, the verified boxes cut from the images (resized as indexed) and
  described as query views are, added as extra views.

Coarse-stage only (the rerank is not run again); the verified pairs come from the run itself.

    python -m benchmarks.exp_qe --work /tmp/scale10k
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np
import torch

from benchmarks.common import machine, write_report


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", required=True, help="bench_scale.py's working folder (index, collection, query runs)")
    p.add_argument("--run", default="query-rerank20", help="the query run under --work whose verified pairs expand")
    p.add_argument("--expand", default="1,3,5", help="comma-separated numbers of verified images used")
    p.add_argument("--cover", default="0,0.5,0.75", help="comma-separated least shares of a region in the box")
    p.add_argument(
        "--variants", action=argparse.BooleanOptionalAction, default=True, help="the union/average/crop ones"
    )
    p.add_argument("--out", default="benchmarks/results")
    p.add_argument("--name", default="exp_qe")
    args = p.parse_args(argv)

    import pyarrow as pa

    from benchmarks.bench_scale import coarse_recall
    from roiqa import schema as S
    from roiqa.config import RoiqaConfig
    from roiqa.index import faiss_index, hubness, store
    from roiqa.io import uri as uri_mod
    from roiqa.io.imageio import decode_image, resize_long_side
    from roiqa.models.regions import decode_regions, region_grid
    from roiqa.results import expansion
    from roiqa.results.output import read_results
    from roiqa.results.ranking import coarse_search, index_config
    from roiqa.stages.rerank import MIN_PART_SIDE, QueryEncoder, coarse_slots, pyramid

    t0 = time.perf_counter()
    version = store.open_index(os.path.join(args.work, "index"))
    cfg = index_config(version, RoiqaConfig())
    qc = cfg.query
    queries = store.read_table(os.path.join(args.work, "collection", "queries.parquet"))
    gt = store.read_table(os.path.join(args.work, "collection", "ground_truth.parquet")).to_pandas()
    run = read_results(os.path.join(args.work, args.run))
    enc = QueryEncoder(cfg, version.manifest["model"]["uri"], threads=2, regions=True)
    batch = {c: np.array(queries.column(c).to_pylist(), dtype=object) for c in queries.column_names}
    encoded = pa.table(
        {k: (list(v) if getattr(v, "ndim", 1) > 1 else v) for k, v in enc(batch).items()}  # (Q, S*D) -> list rows
    )
    uris = store.image_uris(version)
    first = coarse_search(version, uris, encoded, cfg, coarse_slots(qc))
    dim = enc.model.dim
    views = np.stack(encoded.column(S.COARSE_QUERY).to_numpy(zero_copy_only=False)).reshape(len(encoded), -1, dim)
    qids = encoded.column(S.QUERY_ID).to_pylist()

    # each query's verified images, best first (the run's final order)
    verified = run[run[S.INLIERS].fillna(0) >= cfg.geometry.min_inliers].sort_values([S.QUERY_ID, S.RANK])
    emb = version.embeddings([S.IMAGE_ID, S.WIDTH, S.HEIGHT, S.REGIONS_Q8])
    row_of = {int(i): r for r, i in enumerate(emb.column(S.IMAGE_ID).to_pylist())}
    stride = enc.model.stride(cfg.model.descriptor_level)
    size = cfg.preprocess.image_size

    def chosen_region(query_views: np.ndarray, image_id: int, box: np.ndarray) -> np.ndarray | None:
        r = row_of[image_id]
        w, h = emb.column(S.WIDTH)[r].as_py(), emb.column(S.HEIGHT)[r].as_py()
        scale = size / max(w, h)
        vh, vw = round(h * scale), round(w * scale)
        regions = decode_regions(emb.column(S.REGIONS_Q8)[r].as_py(), dim)
        cells = region_grid(max(1, -(-vh // stride)), max(1, -(-vw // stride))).numpy().astype(np.float32) * stride
        cells = np.minimum(cells, [vw, vh, vw, vh])
        assert len(cells) == len(regions), (image_id, len(cells), len(regions))
        cx, cy = (cells[:, 0] + cells[:, 2]) / 2 / scale, (cells[:, 1] + cells[:, 3]) / 2 / scale
        inside = (cx >= box[0]) & (cx <= box[2]) & (cy >= box[1]) & (cy <= box[3])
        inside[0] = False  # not the whole image
        if not inside.any():
            return None
        s = (regions @ query_views.T).max(1)
        s[~inside] = -np.inf
        return regions[int(np.argmax(s))]

    # the run's verified rows, boxes in the pixels of the image as the index resized it (GeometryCheck's frame)
    index = version.faiss()
    source = expansion.RegionSource(index, dim, stride)
    resized = verified.copy()
    wh = {int(i): (emb.column(S.WIDTH)[r].as_py(), emb.column(S.HEIGHT)[r].as_py()) for i, r in row_of.items()}
    scale = np.array([size / max(wh[int(i)]) for i in resized[S.IMAGE_ID]])
    for c in S.BOX:
        resized[c] = resized[c].to_numpy() * scale
    resized[S.RESIZED_W] = [round(wh[int(i)][0] * f) for i, f in zip(resized[S.IMAGE_ID], scale)]
    resized[S.RESIZED_H] = [round(wh[int(i)][1] * f) for i, f in zip(resized[S.IMAGE_ID], scale)]

    def crop_descriptor(image_id: int, box: np.ndarray) -> np.ndarray | None:
        """The verified box cut from the image (resized as the index resizes it), described as a query view."""
        u = uris[image_id]
        img = decode_image(uri_mod.read_bytes(u), u, cfg.preprocess.max_pixels)
        small, scale = resize_long_side(img, size)
        x0, y0, x1, y1 = (int(round(v * scale)) for v in box)
        crop = small[max(0, y0) : max(0, y1), max(0, x0) : max(0, x1)]
        if min(crop.shape[:2]) < 8:
            return None
        if max(crop.shape[:2]) < MIN_PART_SIDE:
            crop, _ = resize_long_side(np.ascontiguousarray(crop), MIN_PART_SIDE)
        with torch.inference_mode():
            feats = pyramid(enc.model, np.ascontiguousarray(crop), enc.device)
            return enc.model.coarse_query_descriptor(feats)[0].numpy()

    expansions: dict[str, list[np.ndarray]] = {}
    from_faiss: dict[str, list[np.ndarray]] = {}
    crops: dict[str, list[np.ndarray]] = {}
    for qi, q in enumerate(qids):
        used = np.any(views[qi] != 0, axis=-1)
        rows = verified[verified[S.QUERY_ID] == q]
        got, cut, ff = [], [], []
        for label, row in rows.iterrows():
            box = np.array([row[S.X0], row[S.Y0], row[S.X1], row[S.Y1]], np.float64)
            if args.variants and np.isfinite(box).all():
                reg = chosen_region(views[qi][used], int(row[S.IMAGE_ID]), box)
                if reg is not None:
                    got.append(reg)
                f = expansion.box_region(source, views[qi][used], resized.loc[label])  # as the product picks it
                if f is not None:
                    ff.append(f)
                c = crop_descriptor(int(row[S.IMAGE_ID]), box)
                if c is not None:
                    cut.append(c)
        expansions[q], crops[q], from_faiss[q] = got, cut, ff

    image_ids = np.fromiter(uris, np.int64, len(uris))

    def search(qviews: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        n = max(len(v) for v in qviews)
        arr = np.zeros((len(qviews), n, dim), np.float32)
        for i, v in enumerate(qviews):
            arr[i, : len(v)] = v
        used = np.any(arr != 0, axis=-1)
        arr = hubness.augment_queries(arr, qc.hubness) if version.manifest.get("hubness") else arr
        return faiss_index.search_images(
            index, arr, qc.top_k, cfg.index.faiss_nprobe, image_ids, qc.coarse_regions, used
        )

    def frame(scores: np.ndarray, ids: np.ndarray):
        import pandas as pd

        rows = [(q, uris[int(i)], float(s)) for q, sr, ir in zip(qids, scores, ids) for s, i in zip(sr, ir) if i >= 0]
        return pd.DataFrame(rows, columns=[S.QUERY_ID, S.URI, S.COARSE_SCORE])

    base_views = [views[i][np.any(views[i] != 0, axis=-1)] for i in range(len(qids))]
    report: dict = {"machine": machine(), "images": len(uris), "positives": len(gt), "variants": {}}

    def record(name: str, res) -> None:
        r20, r100 = coarse_recall(res, gt, 20), coarse_recall(res, gt, qc.top_k)
        pos = gt.merge(res, on=[S.QUERY_ID, S.URI], how="left")
        missed = sorted(pos[pos[S.COARSE_SCORE].isna()][S.QUERY_ID].tolist())
        report["variants"][name] = {"recall@20": r20, f"recall@{qc.top_k}": r100, "missed": missed}
        print(f"{name}: recall@20 {r20:.3f} @{qc.top_k} {r100:.3f} missed {missed}", flush=True)

    def averaged(regions: dict[str, list[np.ndarray]], n: int) -> list[np.ndarray]:
        """Each query's views replaced by L2(view + the sum of its first n regions)."""
        out = []
        for q, b in zip(qids, base_views):
            v = b + np.sum(regions[q][:n], axis=0) if regions[q] else b
            out.append(v / np.linalg.norm(v, axis=1, keepdims=True))
        return out

    record("baseline (the run's coarse search)", first.frame)
    record("baseline (searched again)", frame(*search(base_views)))
    for n in [int(x) for x in args.expand.split(",") if x.strip()] if args.variants else []:
        union = [np.concatenate([b, *(e[None] for e in expansions[q][:n])]) for q, b in zip(qids, base_views)]
        record(f"union {n}", frame(*search([u.reshape(-1, dim) for u in union])))
        record(f"average {n}", frame(*search(averaged(expansions, n))))
        record(f"average {n}, regions faiss keeps", frame(*search(averaged(from_faiss, n))))
        cu = [np.concatenate([b, *(e[None] for e in crops[q][:n])]) for q, b in zip(qids, base_views)]
        record(f"crop union {n}", frame(*search(cu)))
    # the product's own expansion (roiqa.results.expansion) on the run's verified rows
    padded = np.zeros((len(qids), max(len(b) for b in base_views), dim), np.float32)
    for i, b in enumerate(base_views):
        padded[i, : len(b)] = b
    used = np.any(padded != 0, axis=-1)
    for n in [int(x) for x in args.expand.split(",") if x.strip()]:
        picks = expansion.strongest(resized, cfg.geometry.min_inliers, n)
        for cover in [float(x) for x in args.cover.split(",") if x.strip()]:
            out, _ = expansion.expand_views(padded, used, qids, picks, source, cover)
            record(f"query.expand {n}, min cover {cover}", frame(*search([o[u] for o, u in zip(out, used)])))
    report["expanded_queries"] = {q: len(v) for q, v in expansions.items()}
    report["seconds"] = time.perf_counter() - t0
    lines = ["| variant | recall@20 | recall@top_k | missed positives (query) |", "|---|---|---|---|"]
    for name, v in report["variants"].items():
        r = [x for k, x in v.items() if k.startswith("recall@") and k != "recall@20"][0]
        lines.append(f"| {name} | {v['recall@20']:.3f} | {r:.3f} | {', '.join(v['missed'])} |")
    lines += ["", f"Verified images per query: {report['expanded_queries']}"]
    write_report(args.out, args.name, report, "\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
