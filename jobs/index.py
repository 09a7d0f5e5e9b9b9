"""`roiqa index`: embed every image under an images URI into a new, atomically published index version."""

from __future__ import annotations

import argparse
import json
import sys

from jobs.common import add_index_args, config_from, job_parser, progress_for, run, stage_overrides


def parser() -> argparse.ArgumentParser:
    p = job_parser("index", __doc__)
    add_index_args(p, "index URI (local path, file:// or s3://)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)

    def go() -> int:
        from pipelines.index import run_index
        from roiqa.weights import resolve_model

        cfg = config_from(
            args,
            index={"actors": args.actors, "batch_size": args.batch_size},
            **stage_overrides(args, "complexity", "masks"),
        )
        r = run_index(args.images, args.index, cfg, resolve_model(args.model), progress_for("index", args))
        # a line for people on stderr; stdout's last line stays the JSON report scripts read
        print(
            f"roiqa index: indexed {r.indexed} of {r.inputs} images ({r.errors} errors) into {r.index} "
            f"version {r.version} in {r.seconds:.1f} s",
            file=sys.stderr,
        )
        print(
            json.dumps(
                {
                    "index": r.index,
                    "version": r.version,
                    "inputs": r.inputs,
                    "indexed": r.indexed,
                    "errors": r.errors,
                    "seconds": round(r.seconds, 2),
                    "images_per_s": round(r.inputs / max(r.pipeline_seconds, 1e-9), 2),
                }
            )
        )
        return 0

    return run(go, "index")


if __name__ == "__main__":
    raise SystemExit(main())
