"""Experiment: fewer dimensions for the coarse stage's regional descriptors (a step toward a smaller index).

The whitening (`roiqa.models.regions.Whitening`) orders its output by PCA component, strongest first, so keeping
the first d components of a stored descriptor and L2-normalising again is PCA-whitening to d dimensions. This
builds the evaluation collection plus `--distractors` images, indexes them with the defaults (Ray), encodes the
queries' coarse views as the query pipeline does (`QueryEncoder`, called directly), and ranks every image for every
query by its best region over all views, by exact search (a labelled upper bound: the default index is IVF,SQ8),
for each d of `--dims`. Reports, per d: coarse recall@20 / @100 of the positives, coarse mAP, and the bytes per
region that d would take (stored int8 regions d + 2, faiss SQ8 code d + 8-byte id).

    python -m benchmarks.exp_region_dims --distractors 500 --dims 112,96,64,48,32
"""

from __future__ import annotations

import argparse
import os
import tempfile

import numpy as np

from benchmarks.common import machine, write_report


def truncate(x: np.ndarray, d: int) -> np.ndarray:
    """The first d whitened components, L2-normalised again (rows of zeros stay zero)."""
    y = x[..., :d]
    n = np.linalg.norm(y, axis=-1, keepdims=True)
    return y / np.where(n > 0, n, 1.0)


def average_precision(relevant: np.ndarray) -> float:
    """AP of a ranking given as a boolean relevance vector (all positives are in it)."""
    hits = np.flatnonzero(relevant)
    if len(hits) == 0:
        return 0.0
    return float(np.mean((np.arange(len(hits)) + 1) / (hits + 1)))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--distractors", type=int, default=500)
    p.add_argument("--seed", type=int, default=1000)
    p.add_argument("--dims", default="112,96,64,48,32")
    p.add_argument("--work", default=None)
    p.add_argument("--out", default="benchmarks/results")
    args = p.parse_args(argv)
    dims = [int(d) for d in args.dims.split(",")]

    from pipelines.index import run_index
    from roiqa import schema as S
    from roiqa.config import RoiqaConfig
    from roiqa.eval.demo_data import build_distractors, build_eval_collection
    from roiqa.index import faiss_index, store
    from roiqa.stages.rerank import QueryEncoder, coarse_slots
    from roiqa.weights import resolve_model

    work = args.work or tempfile.mkdtemp(prefix="exp-region-dims-")
    cfg = RoiqaConfig()
    col = build_eval_collection(os.path.join(work, "collection"), seed=args.seed)
    build_distractors(col.gallery_dir, args.distractors, seed=args.seed + 1)
    model = resolve_model(None)
    index = os.path.join(work, "index")
    run_index(col.gallery_dir, index, cfg, model)
    version = store.open_index(index)
    table = version.embeddings([S.URI, S.REGIONS_Q8])
    dim = version.manifest["embedding_dim"]
    regions = faiss_index.region_arrays(table, dim)
    uris = np.array(table.column(S.URI).to_pylist())
    counts = np.array([len(r) for r in regions])
    owner = np.repeat(np.arange(len(regions)), counts)
    vectors = np.concatenate(regions)

    queries = store.read_table(col.queries_uri)
    enc = QueryEncoder(cfg, model, regions=True)(
        {c: np.asarray(queries.column(c).to_pylist(), dtype=object) for c in queries.column_names}
    )
    views = coarse_slots(cfg.query)
    qvec = np.stack(enc[S.COARSE_QUERY]).reshape(len(queries), views, dim)
    gt = store.read_table(col.ground_truth_uri).to_pandas()
    positives = {q: set(g[S.URI]) for q, g in gt.groupby(S.QUERY_ID)}
    qids = queries.column(S.QUERY_ID).to_pylist()

    rows = []
    for d in dims:
        v = truncate(vectors, d).astype(np.float32)
        recall20 = recall100 = found = 0
        aps = []
        for qi, qid in enumerate(qids):
            s = truncate(qvec[qi], d).astype(np.float32) @ v.T  # (views, regions)
            best = np.full(len(uris), -np.inf, np.float32)
            np.maximum.at(best, owner, s.max(axis=0))
            order = np.argsort(-best, kind="stable")
            rel = np.isin(uris[order], list(positives.get(qid, ())))
            aps.append(average_precision(rel))
            recall20 += int(rel[:20].sum())
            recall100 += int(rel[:100].sum())
            found += int(rel.sum())
        rows.append(
            {
                "dims": d,
                "coarse_mAP": float(np.mean(aps)),
                "coarse_recall@20": recall20 / max(found, 1),
                "coarse_recall@100": recall100 / max(found, 1),
                "bytes_per_region": (d + 2) + (d + 8),
                "bytes_per_image": float(counts.mean()) * ((d + 2) + (d + 8)),
            }
        )
        print(rows[-1], flush=True)
    report = {
        "machine": machine(),
        "images": len(uris),
        "distractors": args.distractors,
        "queries": len(qids),
        "positives": int(found),
        "regions_per_image": float(counts.mean()),
        "search": "exact (numpy), best region over every coarse view",
        "rows": rows,
    }
    lines = [
        f"{len(uris)} images ({args.distractors} distractors), {len(qids)} queries, {found} positives; "
        f"{counts.mean():.0f} regions per image; exact search (the default index is IVF,SQ8).",
        "",
        "| dims | coarse mAP | coarse recall@20 | coarse recall@100 | bytes / region (q8 + SQ8 + id) | bytes / image |",
        "|---|---|---|---|---|---|",
        *[
            f"| {r['dims']} | {r['coarse_mAP']:.3f} | {r['coarse_recall@20']:.3f} | {r['coarse_recall@100']:.3f} | "
            f"{r['bytes_per_region']} | {r['bytes_per_image']:,.0f} |"
            for r in rows
        ],
    ]
    write_report(args.out, "exp_region_dims", report, "\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
