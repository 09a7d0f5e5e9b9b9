"""What each optional stage costs: index stages against the plain Embedder, query stages against the plain rerank.

Index side, per batch of decoded 512 px images (the per-batch classes the pipeline runs, called directly):
complexity map + quadtree, + patch network, masks recorded, masks applied (with a confidence probe every batch or
every 4th). Query side, per (query, image) pair: the rerank alone, + ROI refinement, + ROI-mask verification.
Every figure is a median of repeats and is reported as a ratio to its reference measured in the same run.
`python -m benchmarks.bench_stages` (about 3 min on 2 CPUs); `--quick` is a smoke run.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import tempfile

import numpy as np
import torch

from benchmarks.common import machine, markdown, median, sample_images, timed, write_report


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=16, help="images per index batch and rerank candidates")
    p.add_argument("--repeats", type=int, default=5, help="timed repeats per variant (median reported)")
    p.add_argument("--out", default="benchmarks/results", help="folder for bench_stages.json / .md")
    p.add_argument("--quick", action="store_true", help="4 images, 1 repeat (smoke run)")
    args = p.parse_args(argv)
    if args.quick:
        args.images, args.repeats = 4, 1

    from roiqa import schema as S
    from roiqa.config import ComplexityConfig, MaskConfig, RefineConfig, RoiqaConfig, VerifyConfig, replace_section
    from roiqa.io.sources import read_files
    from roiqa.models.patchnet import PatchNet, PatchNetConfig, save_patchnet
    from roiqa.stages.complexity import ComplexityStage
    from roiqa.stages.embed import Decoder, Embedder, set_threads
    from roiqa.stages.rerank import Reranker
    from roiqa.weights import resolve_model

    set_threads(0)
    work = tempfile.mkdtemp(prefix="roiqa-bench-stages-")
    try:
        # the demo builder needs >= 12 images to place its 8 objects; the first `--images` of them are timed
        files = sample_images(os.path.join(work, "imgs"), max(args.images, 12))[: args.images]
        cfg = replace_section(replace_section(RoiqaConfig(), "query", overlays=False), "verify", enabled=False)
        model = resolve_model(None)
        batch = Decoder(cfg.preprocess)(read_files({S.URI: np.array(files, dtype=object)}))

        def per_image(fn) -> float:
            fn()  # warm-up (first-call allocations, lazy imports)
            return median([timed(fn)[0] for _ in range(args.repeats)]) / len(files)

        patchnet = os.path.join(work, "patchnet.safetensors")
        save_patchnet(PatchNet(PatchNetConfig()), patchnet)  # untrained: the cost does not depend on the weights
        plain = Embedder(cfg.model, model)
        index_rows = {"embed (reference)": per_image(lambda: plain(dict(batch)))}
        cx = ComplexityConfig(enabled=True)
        index_rows["complexity + quadtree"] = per_image(lambda: ComplexityStage(cx)(dict(batch)))
        cxm = dataclasses.replace(cx, model=patchnet)
        stage = ComplexityStage(cxm)
        index_rows["complexity + patch network"] = per_image(lambda: stage(dict(batch)))
        for name, mcfg in (
            ("masks recorded", MaskConfig(enabled=True, apply=False)),
            ("masks applied, probe every 4th batch", MaskConfig(enabled=True, apply=True, probe_every=4)),
            ("masks applied, probe every batch", MaskConfig(enabled=True, apply=True, probe_every=1)),
        ):
            emb = Embedder(cfg.model, model, masks=mcfg)
            cycle = mcfg.probe_every if mcfg.apply else 1  # time whole probe cycles: a median of single batches
            index_rows[f"embed + {name}"] = (
                per_image(  # would hide the probe batches
                    lambda emb=emb, cycle=cycle: [emb(dict(batch)) for _ in range(cycle)]
                )
                / cycle
            )
        ref = index_rows["embed (reference)"]

        # query side: one query (a crop of the first image) against every image
        from PIL import Image

        crop = np.asarray(Image.open(files[0]).convert("RGB"))[100:220, 150:270]
        qpath = os.path.join(work, "query.png")
        Image.fromarray(crop).save(qpath)
        cand = {
            S.IMAGE_ID: np.arange(len(files), dtype=np.int64),
            S.URI: np.array(files, dtype=object),
            S.QUERY_IDS: [["q"]] * len(files),
            S.COARSE_SCORES: [[0.0]] * len(files),
        }
        query_rows = {}
        for name, c in (
            ("rerank (reference)", cfg),
            ("rerank + refine", dataclasses.replace(cfg, refine=RefineConfig(enabled=True))),
            ("rerank + verify", dataclasses.replace(cfg, verify=VerifyConfig(enabled=True))),
        ):
            rr = Reranker(c, {"q": (qpath, None)}, model_uri=model)
            query_rows[name] = per_image(lambda rr=rr: rr(dict(cand)))
        qref = query_rows["rerank (reference)"]

        report = {
            "machine": machine(),
            "images": len(files),
            "repeats": args.repeats,
            "torch_threads": torch.get_num_threads(),
            "index_ms_per_image": {k: v * 1e3 for k, v in index_rows.items()},
            "index_ratio_to_embed": {k: v / ref for k, v in index_rows.items()},
            "query_ms_per_pair": {k: v * 1e3 for k, v in query_rows.items()},
            "query_ratio_to_rerank": {k: v / qref for k, v in query_rows.items()},
        }
        rows = [["index", k, v * 1e3, v / ref] for k, v in index_rows.items()]
        rows += [["query", k, v * 1e3, v / qref] for k, v in query_rows.items()]
        table = markdown(["side", "stage", "ms per image / pair (median)", "x reference"], rows)
        table += (
            f"\n\n{len(files)} images of 512 px (long side), median of {args.repeats} repeats, "
            f"{torch.get_num_threads()} torch threads; index stages are separate passes (complexity) or run inside "
            "the Embedder (masks), so 'x reference' of a complexity row is the extra cost on top of embedding."
        )
        write_report(args.out, "bench_stages", report, table)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
