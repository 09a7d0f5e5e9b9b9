"""Index throughput: pipelines/index.py end to end against a bare single-process loop doing the same work."""

from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import tempfile

import numpy as np
import pyarrow as pa

from benchmarks.common import bar_chart_png, machine, markdown, median, sample_images, timed, write_report


def bare_loop(files: list[str], cfg, out: str) -> dict:
    """The same read -> decode -> resize -> model -> Parquet work in one process, each part timed apart."""
    from roiqa.index import store as index_store
    from roiqa.io import uri as uri_mod
    from roiqa.io.imageio import decode_image
    from roiqa.stages.embed import Embedder, prepare

    setup, emb = timed(lambda: Embedder(cfg.model, threads=0))
    t = {"read": 0.0, "decode": 0.0, "model": 0.0, "write": 0.0}
    vectors, bs, size = [], cfg.index.batch_size, cfg.preprocess.image_size
    for i in range(0, len(files), bs):
        chunk = files[i : i + bs]
        dt, blobs = timed(lambda c=chunk: [uri_mod.read_bytes(f) for f in c])
        t["read"] += dt
        dt, prepared = timed(lambda b=blobs, c=chunk: [prepare(decode_image(x, u), size) for x, u in zip(b, c)])
        t["decode"] += dt
        images = np.stack([p[0] for p in prepared])
        valid = np.array([p[1] for p in prepared], np.int32)
        dt, v = timed(lambda im=images, va=valid: emb.embed(im, va))
        t["model"] += dt
        vectors.append(v)
    table = pa.table({"uri": files, "embedding": list(np.concatenate(vectors))})
    dt, _ = timed(lambda: index_store.write_table(table, os.path.join(out, "bare.parquet")))
    t["write"] += dt
    total = sum(t.values())
    return {
        "setup_s": setup,
        "seconds": total,
        "images_per_s": len(files) / total,
        **{f"{k}_s": v for k, v in t.items()},
    }


def pipeline(folder: str, cfg, out: str) -> dict:
    from pipelines.index import run_index

    index = tempfile.mkdtemp(dir=out)
    r = run_index(folder, index, cfg)
    shutil.rmtree(index, ignore_errors=True)
    return {"seconds": r.seconds, "pipeline_seconds": r.pipeline_seconds, "images": r.inputs, "stages": r.stage_seconds}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--images", type=int, default=128, help="sample images to index")
    p.add_argument("--repeats", type=int, default=3, help="runs of each variant (medians are reported)")
    p.add_argument("--out", default="benchmarks/results", help="folder for bench_index.json / .md")
    p.add_argument("--quick", action="store_true", help="16 images, 1 repeat, one pipeline variant (smoke test)")
    args = p.parse_args(argv)
    if args.quick:
        args.images, args.repeats = 16, 1

    from pipelines.runtime import init_ray
    from roiqa.config import RoiqaConfig

    os.makedirs(args.out, exist_ok=True)
    work = tempfile.mkdtemp(prefix="bench-index-")
    files = sample_images(os.path.join(work, "collection"), args.images)
    folder = os.path.dirname(files[0])
    tiny = os.path.join(work, "tiny")
    os.makedirs(tiny)
    for f in files[:2]:
        shutil.copy(f, tiny)
    base = RoiqaConfig()
    variants = {"1 actor, batch 16": base}
    if not args.quick:
        variants["1 actor, batch 32"] = dataclasses.replace(base, index=dataclasses.replace(base.index, batch_size=32))
        variants["2 actors x 1 thread, batch 16"] = dataclasses.replace(
            base, index=dataclasses.replace(base.index, actors=2, torch_threads=1)
        )
    init_ray()
    bare = [bare_loop(files, base, work) for _ in range(args.repeats)]
    bare_ips = median([b["images_per_s"] for b in bare])
    rows, report = (
        [],
        {
            "machine": machine(),
            "images": len(files),
            "image_size": base.preprocess.image_size,
            "repeats": args.repeats,
            "bare_loop": {k: median([b[k] for b in bare]) for k in bare[0]},
            "pipeline": {},
        },
    )
    split = report["bare_loop"]
    rows.append(
        [
            "bare loop (reference)",
            bare_ips,
            1.0,
            "",
            f"read {split['read_s']:.2f} s, decode "
            f"{split['decode_s']:.2f} s, model {split['model_s']:.2f} s, write {split['write_s']:.2f} s",
        ]
    )
    for name, cfg in variants.items():
        runs = [pipeline(folder, cfg, work) for _ in range(args.repeats)]
        fixed = [pipeline(tiny, cfg, work) for _ in range(args.repeats)]
        end_to_end = len(files) / median([r["seconds"] for r in runs])
        in_pipeline = len(files) / median([r["pipeline_seconds"] for r in runs])
        marginal = (len(files) - 2) / max(
            1e-9, median([r["pipeline_seconds"] for r in runs]) - median([f["pipeline_seconds"] for f in fixed])
        )
        report["pipeline"][name] = {
            "end_to_end_images_per_s": end_to_end,
            "pipeline_images_per_s": in_pipeline,
            "marginal_images_per_s": marginal,
            "fixed_seconds": median([f["pipeline_seconds"] for f in fixed]),
            "ratio_end_to_end_vs_bare": end_to_end / bare_ips,
            "ratio_marginal_vs_bare": marginal / bare_ips,
            # summed remote wall time per Ray Data operator (tasks run in parallel, so these overlap in time)
            "stage_seconds": {k: median([r["stages"].get(k, 0.0) for r in runs]) for k in runs[0]["stages"]},
        }
        stages = report["pipeline"][name]["stage_seconds"]
        split = "; ".join(f"{k} {v:.2f} s" for k, v in stages.items() if v >= 0.01)
        rows.append(
            [
                f"pipeline: {name}",
                end_to_end,
                end_to_end / bare_ips,
                marginal / bare_ips,
                f"fixed start-up {report['pipeline'][name]['fixed_seconds']:.1f} s; {split}",
            ]
        )
    best = max(v["ratio_marginal_vs_bare"] for v in report["pipeline"].values())
    report["goal"] = {"pipeline >= 0.9x bare loop (marginal, start-up excluded)": best >= 0.9, "best_ratio": best}
    table = markdown(["variant", "images/s", "x bare (end to end)", "x bare (marginal)", "notes"], rows)
    write_report(args.out, "bench_index", report, table)
    labels = ["bare loop (reference)"] + [f"pipeline, marginal: {n}" for n in report["pipeline"]]
    values = [bare_ips] + [v["marginal_images_per_s"] for v in report["pipeline"].values()]
    bar_chart_png(
        os.path.join(args.out, "index_throughput.png"),
        labels,
        values,
        f"index throughput, {len(files)} images at {base.preprocess.image_size}px (medians)",
        "img/s",
    )
    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
