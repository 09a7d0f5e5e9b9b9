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
        help="comma-separated: 'bundled' (roiqa.demo_data.TRAINING_PHOTOS, disjoint from the evaluation photographs) "
        "and/or folders/prefixes of photographs (e.g. the cache of `roiqa photos`)",
    )
    p.add_argument("--shrink", type=float, default=0.1, help="eigenvalue shrinkage of the whitening")
    p.add_argument("--with-body", action="store_true", help="store the body's weights too (default: from the package)")
    add_config_arg(p)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)

    def go() -> int:
        from roiqa import uri as uri_mod
        from roiqa.coarse_fit import fit_coarse
        from roiqa.demo_data import TRAINING_PHOTOS, load_photo
        from roiqa.imageio import decode_image
        from roiqa.models.checkpoint import save_matcher
        from roiqa.models.matcher import Matcher

        cfg = config_from(args)
        photos = []
        for source in [x.strip() for x in args.photos.split(",") if x.strip()]:
            if source == "bundled":
                photos += [load_photo(n) for n in TRAINING_PHOTOS]
                continue
            files = uri_mod.list_files(source, uri_mod.IMAGE_EXTENSIONS)
            if not files:
                raise ValueError(f"{source}: no images found")
            photos += [decode_image(uri_mod.read_bytes(f), f, cfg.preprocess.max_pixels) for f in files]
        model = Matcher(cfg.model)
        n = fit_coarse(model, photos, cfg.preprocess.image_size, args.shrink)
        data = save_matcher(
            model,
            args.out,
            extra={"roiqa.coarse_fit": f"{len(photos)} photos, {n} regions"},
            include_body=args.with_body,
        )
        print(f"whitening fitted on {n} regional descriptors of {len(photos)} photos; {len(data)} bytes -> {args.out}")
        return 0

    return run(go, "coarse")


if __name__ == "__main__":
    raise SystemExit(main())
