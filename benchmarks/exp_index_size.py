"""Experiment: how small the coarse index can get before it stops finding the positives, on a published index.

Reads an index that `bench_scale` left behind (`--work` of `python -m benchmarks.bench_scale --keep`), its
evaluation queries and ground truth, encodes the queries as the query pipeline does, and searches variants of the
region index with `roiqa.index.faiss_index.search_images` (an image scores its best region over every coarse view,
hubness as the index has it). The published index is the reference; every variant is built from the same regions:

- `regions R`: each image's whole-image region and its R other regions of lowest hubness h(r) (the ones least like
  other images' regions, the ones a query can single out): `roiqa.index.hubness.least_hub`, as
  `index.regions_per_image` R builds it;
- a faiss factory: `IVF...,SQ8` (the default's encoding, one byte per dimension) or product quantisation
  (`OPQm_d,IVF...,PQm`: m bytes per region after a learned rotation to d dimensions).

Bytes per image are the faiss file's (codes + 8-byte ids + the quantiser) over the images, the hubness reference
included; the embeddings Parquet (a second copy of the regions the index is rebuilt from) is reported apart.

    python -m benchmarks.bench_scale --distractors 10000 --work /tmp/scale10k --keep   # once, about an hour
    python -m benchmarks.exp_index_size --work /tmp/scale10k --variants 'all:published;32:Flat;32:auto-pq'
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np

from benchmarks.common import machine, write_report

DEFAULT_VARIANTS = (
    "all:published;all:Flat;128:Flat;64:Flat;32:Flat;"
    "all:OPQ32_128,IVF8192,PQ32;all:OPQ16_128,IVF8192,PQ16;"
    "64:IVF4096,SQ8;64:OPQ32_128,IVF4096,PQ32;64:OPQ16_128,IVF4096,PQ16;32:OPQ16_128,IVF2048,PQ16"
)


def recall_at(scores_ids: tuple[np.ndarray, np.ndarray], qids: list[str], gt: set[tuple[str, int]], k: int) -> float:
    _, ids = scores_ids
    found = {(q, int(i)) for q, row in zip(qids, ids) for i in row[:k] if i >= 0}
    return len(gt & found) / len(gt)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", required=True, help="a bench_scale --keep working folder (collection/ and index/)")
    p.add_argument("--variants", default=DEFAULT_VARIANTS, help="';'-separated REGIONS:FACTORY (REGIONS: all or R)")
    p.add_argument("--out", default="benchmarks/results", help="folder for exp_index_size.json / .md")
    args = p.parse_args(argv)

    from roiqa import schema as S
    from roiqa.config import RoiqaConfig
    from roiqa.index import faiss_index, hubness, store
    from roiqa.io.queries import load_queries
    from roiqa.models.regions import split_key
    from roiqa.stages.rerank import QueryEncoder, coarse_slots
    from roiqa.weights import resolve_model

    t0 = time.perf_counter()
    cfg = RoiqaConfig()
    qc = cfg.query
    version = store.open_index(os.path.join(args.work, "index"))
    man = version.manifest
    dim, n_images = int(man["embedding_dim"]), int(man["counts"]["indexed"])
    emb = version.embeddings([S.IMAGE_ID, S.URI, S.REGIONS_Q8])
    vectors, keys = faiss_index.coarse_vectors(emb, dim, "regions")
    emb_dir = version.uri(store.EMBEDDINGS)
    emb_bytes = sum(os.path.getsize(os.path.join(emb_dir, f)) for f in os.listdir(emb_dir))
    ref_table = version.hubness_reference()
    ref, ref_keys = hubness.reference_arrays(ref_table, dim)
    image_keys = split_key(keys)[0]
    th = time.perf_counter()
    h = hubness.hubness(vectors, image_keys, ref, ref_keys, int(man["hubness"]["k"]))
    print(f"{len(vectors):,} regions of {n_images:,} images; hubness in {time.perf_counter() - th:.0f} s", flush=True)
    rows = hubness.augment(vectors, h)
    ref_bytes = os.path.getsize(version.uri(store.HUBNESS))

    qtable = load_queries(os.path.join(args.work, "collection", "queries.parquet"))
    batch = {k: np.array(v, dtype=object) for k, v in qtable.to_pydict().items()}
    enc = QueryEncoder(cfg, resolve_model(None), threads=0, regions=True)(batch)
    qids = [str(q) for q in enc[S.QUERY_ID]]
    queries = hubness.augment_queries(enc[S.COARSE_QUERY].reshape(len(qids), coarse_slots(qc), dim), qc.hubness)
    uris = store.image_uris(version)
    by_uri = {u: i for i, u in uris.items()}
    gt_table = store.read_table(os.path.join(args.work, "collection", "ground_truth.parquet")).to_pandas()
    gt = {(str(q), by_uri[u]) for q, u in zip(gt_table[S.QUERY_ID], gt_table[S.URI])}
    image_ids = np.fromiter(uris, np.int64, len(uris))

    results = []
    for spec in [v for v in args.variants.split(";") if v.strip()]:
        regions, factory = spec.split(":", 1)
        tb = time.perf_counter()
        if factory == "published":
            index = version.faiss()
            n_rows = int(index.ntotal)
        else:
            mask = hubness.least_hub(keys, h, 0 if regions == "all" else int(regions))
            n_rows = int(mask.sum())
            index = faiss_index.build_index(rows[mask], keys[mask], factory)
        build_s = time.perf_counter() - tb
        faiss_bytes = len(faiss_index.serialize(index))
        ts = time.perf_counter()
        found = faiss_index.search_images(
            index, queries, qc.top_k, cfg.index.faiss_nprobe, image_ids, qc.coarse_regions
        )
        search_s = time.perf_counter() - ts
        r = {
            "regions": regions,
            "factory": factory,
            "regions_per_image": n_rows / n_images,
            "bytes_per_image": (faiss_bytes + ref_bytes) / n_images,
            "recall@20": recall_at(found, qids, gt, qc.rerank),
            "recall@100": recall_at(found, qids, gt, qc.top_k),
            "build_s": build_s,
            "search_s_per_query": search_s / len(qids),
        }
        results.append(r)
        print(
            f"{spec}: {r['regions_per_image']:.0f} regions/image, {r['bytes_per_image']:,.0f} B/image, "
            f"recall@20 {r['recall@20']:.3f} @100 {r['recall@100']:.3f} (build {build_s:.0f} s)",
            flush=True,
        )
        del index

    report = {
        "machine": machine(),
        "index": man["version"],
        "images": n_images,
        "queries": len(qids),
        "positives": len(gt),
        "regions": int(len(rows)),
        "embeddings_parquet_bytes_per_image": emb_bytes / n_images,
        "hubness_reference_bytes_per_image": ref_bytes / n_images,
        "seconds": time.perf_counter() - t0,
        "variants": results,
    }
    lines = [
        f"{n_images:,} images ({report['regions']:,} regions), {len(qids)} queries, {len(gt)} positives; "
        f"query.hubness {qc.hubness}, nprobe {cfg.index.faiss_nprobe}, {qc.coarse_regions} regions fetched per view.",
        "",
        "| regions kept | faiss factory | regions / image | bytes / image | coarse recall@20 | coarse recall@100 |",
        "|---|---|---|---|---|---|",
        *[
            f"| {r['regions']} | {r['factory']} | {r['regions_per_image']:.0f} | {r['bytes_per_image']:,.0f} | "
            f"{r['recall@20']:.3f} | {r['recall@100']:.3f} |"
            for r in results
        ],
        "",
        f"Bytes per image: the faiss file plus the hubness reference "
        f"({report['hubness_reference_bytes_per_image']:,.0f} B/image); the embeddings Parquet adds "
        f"{report['embeddings_parquet_bytes_per_image']:,.0f} B/image.",
    ]
    write_report(args.out, "exp_index_size", report, "\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
