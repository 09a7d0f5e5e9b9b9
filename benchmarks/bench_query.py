"""Query latency: coarse search + dense rerank of the top 20 / 100 per query, and rerank throughput in pairs/s."""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile

import numpy as np
import pyarrow.parquet as pq
import torch

from benchmarks.common import machine, markdown, median, sample_images, timed, write_report


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--images", type=int, default=128, help="gallery images (at least the largest rerank depth)")
    p.add_argument("--queries", type=int, default=16, help="queries timed at rerank depth 20")
    p.add_argument("--deep-queries", type=int, default=4, help="queries timed at rerank depth 100")
    p.add_argument("--out", default="benchmarks/results", help="folder for bench_query.json / .md")
    p.add_argument("--quick", action="store_true", help="24 images, 3 queries, depths 5 / 20 (smoke test)")
    args = p.parse_args(argv)
    depths = (20, 100)
    if args.quick:
        args.images, args.queries, args.deep_queries, depths = 24, 3, 1, (5, 20)

    from roiqa import schema as S
    from roiqa.config import RoiqaConfig
    from roiqa.index import faiss_index
    from roiqa.io.ids import image_ids
    from roiqa.io.sources import read_files
    from roiqa.stages.embed import Decoder, Embedder, set_threads
    from roiqa.stages.rerank import QueryEncoder, Reranker

    set_threads(0)
    cfg = RoiqaConfig()
    work = tempfile.mkdtemp(prefix="bench-query-")
    files = sample_images(os.path.join(work, "collection"), args.images)
    qtable = pq.read_table(os.path.join(work, "collection", "queries.parquet")).to_pandas()
    gt = pq.read_table(os.path.join(work, "collection", "ground_truth.parquet")).to_pandas()
    # queries: the clean crops, then crops of pasted instances (photo + box), as many as asked
    queries = [(r[S.QUERY_ID], r[S.URI], None) for _, r in qtable.iterrows()]
    queries += [(f"{r[S.QUERY_ID]}@{i}", r[S.URI], [float(r[c]) for c in S.BOX]) for i, r in gt.iterrows()]
    queries = queries[: max(args.queries, args.deep_queries)]

    # gallery: embedded once by the library (the reference per-image forward is timed here too)
    emb = Embedder(cfg.model)
    batch = Decoder(cfg.preprocess)(read_files({S.URI: np.array(files, dtype=object)}))
    forward = []
    vectors = []
    for i in range(0, len(files), 16):
        dt, v = timed(lambda i=i: emb.embed(batch[S.IMAGE][i : i + 16], batch[S.VALID_HW][i : i + 16]))
        forward.append(dt / len(v))
        vectors.append(v)
    ids = image_ids(files)
    index = faiss_index.build_index(np.concatenate(vectors), ids, "Flat")
    uris = dict(zip(ids.tolist(), files))
    enc = QueryEncoder(cfg)
    rr = Reranker(cfg, {q: (u, b) for q, u, b in queries})

    lat: dict[str, list[float]] = {"encode": [], "coarse": []}
    for d in depths:
        lat[f"rerank{d}"] = []
    for n, (qid, u, box) in enumerate(queries):
        qb = {S.QUERY_ID: np.array([qid], dtype=object), S.URI: np.array([u], dtype=object)}
        if box is not None:
            qb.update({c: np.array([v], np.float32) for c, v in zip(S.BOX, box)})
        dt, out = timed(lambda qb=qb: enc(qb))
        lat["encode"].append(dt)
        dt, (scores, found) = timed(lambda out=out: faiss_index.search(index, out[S.EMBEDDING], max(depths)))
        lat["coarse"].append(dt)
        rr.query_features(qid)  # per-query set-up (pyramids at every size) is part of encode in a long run
        for d in depths:
            if d == max(depths) and n >= args.deep_queries:
                continue
            if d != max(depths) and n >= args.queries:
                continue
            cand = [int(i) for i in found[0][:d] if i >= 0]
            rb = {
                S.IMAGE_ID: np.array(cand, np.int64),
                S.URI: np.array([uris[i] for i in cand], dtype=object),
                S.QUERY_IDS: [[qid]] * len(cand),
                S.COARSE_SCORES: [[0.0]] * len(cand),
            }
            with torch.inference_mode():
                dt, _ = timed(lambda rb=rb: rr(rb))
            lat[f"rerank{d}"].append(dt)

    # batch mode, as the query pipeline runs it: each candidate image once, with every query that shortlisted it
    shortlist: dict[int, list[str]] = {}
    for qid, u, box in queries[: args.queries]:
        qb = {S.QUERY_ID: np.array([qid], dtype=object), S.URI: np.array([u], dtype=object)}
        if box is not None:
            qb.update({c: np.array([v], np.float32) for c, v in zip(S.BOX, box)})
        _, found = faiss_index.search(index, enc(qb)[S.EMBEDDING], min(depths))
        for i in found[0]:
            shortlist.setdefault(int(i), []).append(qid)
    keys = sorted(shortlist)
    rb = {
        S.IMAGE_ID: np.array(keys, np.int64),
        S.URI: np.array([uris[i] for i in keys], dtype=object),
        S.QUERY_IDS: [shortlist[i] for i in keys],
        S.COARSE_SCORES: [[0.0] * len(shortlist[i]) for i in keys],
    }
    n_pairs = sum(len(v) for v in shortlist.values())
    with torch.inference_mode():
        batch_s, _ = timed(lambda: rr(rb))

    per_image = median(forward)
    report = {
        "machine": machine(),
        "images": len(files),
        "image_size": cfg.preprocess.image_size,
        "query_sizes": list(cfg.query.query_sizes),
        "reference_forward_ms_per_image": per_image * 1e3,
        "latency_ms": {},
        "rerank_pairs_per_s": {},
    }
    rows = [["gallery forward per image (reference)", per_image * 1e3, "", 1.0, ""]]
    for k, v in lat.items():
        report["latency_ms"][k] = {"median": median(v) * 1e3, "p99": percentile(v, 99) * 1e3, "n": len(v)}
        pairs = int(k[len("rerank") :]) if k.startswith("rerank") else None
        if pairs:
            report["rerank_pairs_per_s"][k] = pairs / median(v)
        rows.append(
            [
                k,
                median(v) * 1e3,
                percentile(v, 99) * 1e3,
                median(v) / per_image,
                f"{pairs / median(v):.1f} pairs/s" if pairs else "",
            ]
        )
    report["batch_rerank"] = {
        "pairs": n_pairs,
        "images": len(keys),
        "seconds": batch_s,
        "pairs_per_s": n_pairs / batch_s,
    }
    rows.append(
        [
            f"batch rerank: {n_pairs} pairs over {len(keys)} images",
            batch_s * 1e3,
            "",
            batch_s / per_image,
            f"{n_pairs / batch_s:.1f} pairs/s",
        ]
    )
    table = markdown(["stage (per query)", "median ms", "p99 ms", "x one gallery forward", "throughput"], rows)
    write_report(args.out, "bench_query", report, table)
    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
