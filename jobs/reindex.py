"""`roiqa reindex`: bring an index up to date with its images, embedding only new and changed ones."""

from __future__ import annotations

import argparse
import json
import sys

from jobs.common import add_index_args, config_from, job_parser, progress_for, run, stage_overrides


def parser() -> argparse.ArgumentParser:
    p = job_parser("reindex", __doc__)
    add_index_args(p, "index URI; its published version is the one compared against")
    p.add_argument(
        "--keep", type=int, default=None, help="published versions to keep (default: the config's index.keep_versions)"
    )
    return p


def summary_line(r) -> str:
    """One line for people: what changed and what was published (a pipelines.reindex.ReindexReport)."""
    c = r.counts
    how = f"{r.mode}" + (f" ({r.reason})" if r.reason else "") + (f" against version {r.parent}" if r.parent else "")
    seen = (
        f"{c.get('new', 0)} new, {c.get('changed', 0)} changed, {c.get('deleted', 0)} deleted, "
        f"{c.get('unchanged', 0)} unchanged"
    )
    if r.status == "unchanged":
        done = f"nothing changed; version {r.parent} stays published"
    else:
        done = f"published version {r.version}: {c.get('indexed', 0)} images indexed, {c.get('errors', 0)} errors"
    return f"roiqa reindex: {how}: {seen}; {done} in {r.seconds:.1f} s"


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
        r = run_reindex(args.images, args.index, cfg, resolve_model(args.model), progress_for("reindex", args))
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
        print(summary_line(r), file=sys.stderr)  # for people; stdout's last line stays the JSON report
        print(json.dumps(out))
        return 0

    return run(go, "reindex")


if __name__ == "__main__":
    raise SystemExit(main())
