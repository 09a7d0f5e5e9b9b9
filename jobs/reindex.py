"""`roiqa reindex`: bring an index up to date with its images, embedding only new and changed ones."""

from __future__ import annotations

import argparse
import json

from jobs.common import add_config_arg, add_model_arg, add_stage_flags, config_from, run, stage_overrides


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="roiqa reindex", description=__doc__)
    p.add_argument("--images", required=True, help="folder/prefix of images or .tar shards, or a Parquet manifest")
    p.add_argument("--index", required=True, help="index URI; its published version is the one compared against")
    add_model_arg(p)
    p.add_argument("--keep", type=int, default=None, help="published versions to keep (overrides index.keep_versions)")
    p.add_argument("--actors", type=int, default=None, help="embedding actors (overrides index.actors)")
    p.add_argument("--batch-size", type=int, default=None, help="images per batch (overrides index.batch_size)")
    add_stage_flags(p, "complexity", "masks")
    add_config_arg(p)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)

    def go() -> int:
        from pipelines.reindex import run_reindex
        from roiqa.weights import resolve_model

        if args.keep is not None and args.keep < 1:
            raise ValueError(f"--keep must be >= 1, got {args.keep}")
        cfg = config_from(
            args,
            index={"actors": args.actors, "batch_size": args.batch_size, "keep_versions": args.keep},
            **stage_overrides(args, "complexity", "masks"),
        )
        r = run_reindex(args.images, args.index, cfg, resolve_model(args.model))
        out = {
            "index": r.index,
            "run_id": r.run_id,
            "status": r.status,
            "mode": r.mode,
            "reason": r.reason,
            "parent": r.parent,
            "version": r.version,
            **r.counts,
            "seconds": round(r.seconds, 2),
        }
        print(json.dumps(out))
        return 0

    return run(go, "reindex")


if __name__ == "__main__":
    raise SystemExit(main())
