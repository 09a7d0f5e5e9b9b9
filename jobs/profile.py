"""`roiqa profile`: train a task profile for the masks stage (confidence estimator + thresholds) from object boxes."""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from collections.abc import Iterator

from jobs.common import job_parser, run

DEFAULT_HOLDOUT = "camera,retina"  # bundled photographs kept out of training for the held-out curve


def parser() -> argparse.ArgumentParser:
    p = job_parser("profile", __doc__)
    p.add_argument("--out", required=True, help="profile URI (.safetensors); the log goes to <stem>.train_log.json")
    p.add_argument(
        "--images",
        default=None,
        help="photographs for self-supervised pastes: 'bundled' (scikit-image training photographs) or a "
        "folder/prefix URI; default 'bundled' unless --manifest is given",
    )
    p.add_argument("--manifest", default=None, help="Parquet training manifest (uri, instance_id, x0, y0, x1, y1)")
    p.add_argument(
        "--holdout",
        default=None,
        help=f"comma-separated photo names (bundled names or file stems) kept for the held-out curve; default "
        f"{DEFAULT_HOLDOUT!r} for bundled, none for a folder (then held-out = fresh samples of the training photos)",
    )
    p.add_argument("--name", default="object-instance", help="profile name")
    p.add_argument("--version", type=int, default=1, help="profile version")
    p.add_argument("--description", default=None, help="profile description")
    p.add_argument("--steps", type=int, default=600, help="optimiser steps")
    p.add_argument(
        "--max-seconds",
        type=float,
        default=None,
        help="training time budget in seconds: ends early, fully decayed (default: no budget)",
    )
    p.add_argument("--batch-size", type=int, default=8, help="images per step")
    p.add_argument("--lr", type=float, default=3e-3, help="AdamW learning rate (cosine-decayed to 5%%)")
    p.add_argument("--image-size", type=int, default=320, help="side of the square training images")
    p.add_argument("--eval-samples", type=int, default=96, help="samples per curve split")
    p.add_argument("--seed", type=int, default=0, help="random seed of sampling and initialisation")
    p.add_argument("--threads", type=int, default=1, help="torch threads")
    p.add_argument("--max-pixels", type=int, default=100_000_000, help="images with more pixels are refused")
    p.add_argument(
        "--init-recall",
        type=float,
        default=0.8,
        help="initial threshold: the largest keeping this share of held-out box pixels",
    )
    p.add_argument(
        "--max-recall",
        type=float,
        default=0.5,
        help="max threshold: the largest keeping this share of held-out box pixels",
    )
    p.add_argument("--step", type=float, default=0.01, help="threshold controller step")
    return p


def _photos(spec: str, max_pixels: int) -> tuple[list[str], list]:
    from roiqa.eval.demo_data import TRAINING_PHOTOS, load_photo
    from roiqa.io import uri as uri_mod
    from roiqa.train.data import load_photos

    if spec == "bundled":
        return list(TRAINING_PHOTOS), [load_photo(n) for n in TRAINING_PHOTOS]
    files = uri_mod.list_files(spec, uri_mod.IMAGE_EXTENSIONS)
    names = [f.rsplit("/", 1)[-1].rsplit(".", 1)[0] for f in files]
    return names, load_photos(spec, max_pixels)


def choose_thresholds(curve: dict, init_recall: float, max_recall: float) -> tuple[float, float, float, str]:
    """(initial, min, max threshold, the rule in words) from a held-out curve (roiqa.train.profile.mask_curve)."""
    ts, rec = curve["threshold"], curve["recall"]
    ok_init = [t for t, r in zip(ts, rec) if r >= init_recall]
    ok_max = [t for t, r in zip(ts, rec) if r >= max_recall]
    init = max(ok_init) if ok_init else min(ts)
    hi = max(max(ok_max) if ok_max else init, init)
    rule = (
        f"initial = largest threshold keeping >= {init_recall:.0%} of held-out box pixels (recall), so the masked "
        f"embedding starts from nearly the whole object; max = largest threshold still keeping >= {max_recall:.0%} "
        f"(beyond it most of the object is gone); min = 0 (the controller may back off to the whole image)"
    )
    return init, 0.0, hi, rule


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)

    def go() -> int:
        import itertools

        import numpy as np
        import torch

        from roiqa.config import TrainConfig
        from roiqa.eval.demo_data import EVAL_PHOTOS, load_photo
        from roiqa.io import uri as uri_mod
        from roiqa.stages import masks
        from roiqa.train.data import read_manifest, sample_stream
        from roiqa.train.profile import manifest_samples, mask_curve, train_profile

        torch.set_num_threads(max(1, args.threads))
        images = args.images or (None if args.manifest else "bundled")
        tc = TrainConfig(image_size=args.image_size, object_scale=(max(8.0, args.image_size / 10), args.image_size / 2))
        train_src, held_src, test_src, trained_on = [], [], [], []
        if images:
            names, photos = _photos(images, args.max_pixels)
            default = DEFAULT_HOLDOUT if images == "bundled" else ""
            held = {h for h in (args.holdout if args.holdout is not None else default).split(",") if h}
            unknown = held - set(names)
            if unknown:
                raise ValueError(f"--holdout: {sorted(unknown)} not among the photos {names}")
            train_p = [p for n, p in zip(names, photos) if n not in held]
            held_p = [p for n, p in zip(names, photos) if n in held] or train_p
            if not train_p:
                raise ValueError(f"--holdout {sorted(held)} leaves no training photos")
            # Positives only: a sample's `box` is its pasted object; the negative's decoy paste is an object
            # instance too but synthesize_pair does not return its box, and an empty target there would teach the
            # estimator to suppress a pasted object.
            train_src.append(sample_stream(train_p, tc, args.seed))
            held_src.append(sample_stream(held_p, tc, args.seed + 1))
            if images == "bundled":
                test_src.append(sample_stream([load_photo(n) for n in EVAL_PHOTOS], tc, args.seed + 2))
            trained_on.append(f"self-supervised pastes into {images} photos {[n for n in names if n not in held]}")
        if args.manifest:
            table = read_manifest(args.manifest)
            train_src.append(manifest_samples(table, args.image_size, args.max_pixels, args.seed, False))
            held_src.append(manifest_samples(table, args.image_size, args.max_pixels, args.seed + 1, True))
            trained_on.append(f"boxes of manifest {args.manifest} (4/5 of its images)")

        def mix(sources: list) -> Iterator[dict]:
            return (next(s) for s in itertools.cycle(sources))

        t0 = time.perf_counter()
        est, losses = train_profile(
            mix(train_src),
            args.steps,
            lr=args.lr,
            batch_size=args.batch_size,
            seed=args.seed,
            max_seconds=args.max_seconds,
        )
        train_s = time.perf_counter() - t0
        thresholds = np.round(np.arange(0.01, 1.0, 0.01), 2)
        fresh = [sample_stream(train_p, tc, args.seed + 3)] if images else []
        if args.manifest:
            fresh.append(manifest_samples(table, args.image_size, args.max_pixels, args.seed + 3, False))
        splits = {"training": fresh, "held_out": held_src, "eval_photos": test_src}
        curves = {}
        for split, sources in splits.items():
            if sources:
                it = mix(sources)
                curves[split] = mask_curve(est, [next(it) for _ in range(args.eval_samples)], thresholds)
        init, lo, hi, rule = choose_thresholds(curves["held_out"], args.init_recall, args.max_recall)
        profile = masks.TaskProfile(
            name=args.name,
            version=args.version,
            description=args.description
            or "relevance of each pixel to finding an object instance: high on pasted/labelled object boxes",
            threshold=init,
            min_threshold=lo,
            max_threshold=hi,
            step=args.step,
            trained_on="; ".join(trained_on) + f"; {len(losses)} steps x {args.batch_size} at {args.image_size} px",
        )
        data = masks.save_profile(profile, est, args.out)
        stem = args.out[: -len(".safetensors")] if args.out.endswith(".safetensors") else args.out
        log = {
            "profile": dataclasses.asdict(profile),
            "threshold_rule": rule,
            "args": vars(args),
            "parameters": sum(p.numel() for p in est.parameters()),
            "bytes": len(data),
            "steps_done": len(losses),
            "train_seconds": round(train_s, 1),
            "loss": [round(v, 5) for v in losses],
            "curves": curves,
        }
        uri_mod.write_bytes(f"{stem}.train_log.json", json.dumps(log, indent=1).encode("utf-8"))
        held = curves["held_out"]
        j = held["threshold"].index(min(held["threshold"], key=lambda t: abs(t - init)))
        print(
            f"profile {args.name} v{args.version} -> {args.out} ({len(data)} bytes, {train_s:.0f} s); loss "
            f"{np.mean(losses[:20]):.3f} -> {np.mean(losses[-20:]):.3f}; threshold {init} in [{lo}, {hi}]: held-out "
            f"IoU {held['iou'][j]:.3f} P {held['precision'][j]:.3f} R {held['recall'][j]:.3f}"
        )
        return 0

    return run(go, "profile")


if __name__ == "__main__":
    raise SystemExit(main())
