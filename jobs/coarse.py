"""`roiqa coarse`: fit the coarse stage's regional whitening on training photographs and write a checkpoint."""

from __future__ import annotations

import argparse

from jobs.common import add_config_arg, config_from, job_parser, run


def parser() -> argparse.ArgumentParser:
    p = job_parser("coarse", __doc__)
    p.add_argument("--out", required=True, help="checkpoint to write (.safetensors URI)")
    p.add_argument(
        "--photos",
        default="bundled",
        help="comma-separated: 'bundled' (roiqa.eval.demo_data.TRAINING_PHOTOS, disjoint from the evaluation "
        "photographs) "
        "and/or folders/prefixes of photographs (e.g. the cache of `roiqa photos`)",
    )
    p.add_argument("--shrink", type=float, default=0.1, help="eigenvalue shrinkage of the whitening")
    p.add_argument("--with-body", action="store_true", help="store the body's weights too (default: from the package)")
    p.add_argument(
        "--model",
        default=None,
        help="fit the whitening of this matcher checkpoint (a trained one, say), keeping its other weights "
        "(default: a new matcher from the config's model section)",
    )
    add_config_arg(p)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)

    def go() -> int:
        from roiqa.io import uri as uri_mod
        from roiqa.models.checkpoint import CONFIG_KEY, load_matcher, read_metadata, save_matcher
        from roiqa.train.coarse_fit import fit_coarse
        from roiqa.train.data import load_photo_sources

        cfg = config_from(args)
        photos = load_photo_sources(args.photos, cfg.preprocess.max_pixels)
        model = load_matcher(args.model, cfg.model)
        extra = {}
        if args.model:  # what else the checkpoint says about itself (its training run) is kept
            meta = read_metadata(uri_mod.read_bytes(args.model), args.model)
            extra = {k: v for k, v in meta.items() if k != CONFIG_KEY}
        n = fit_coarse(model, photos, cfg.preprocess.image_size, args.shrink)
        extra["roiqa.train.coarse_fit"] = f"{len(photos)} photos, {n} regions"
        data = save_matcher(
            model,
            args.out,
            extra=extra,
            # a body loaded from the checkpoint itself (not from a package) must be stored again
            include_body=args.with_body or not model.cfg.backbone_weights,
        )
        print(f"whitening fitted on {n} regional descriptors of {len(photos)} photos; {len(data)} bytes -> {args.out}")
        return 0

    return run(go, "coarse")


if __name__ == "__main__":
    raise SystemExit(main())
