"""`roiqa query`: search a published index for query patches; write ranked results, boxes and heatmap overlays."""

from __future__ import annotations

import argparse
import json
import sys

from jobs.common import (
    add_config_arg,
    add_quiet_arg,
    add_root_arg,
    add_stage_flags,
    config_from,
    job_parser,
    progress_for,
    run,
    stage_overrides,
)


def parser() -> argparse.ArgumentParser:
    p = job_parser("query", __doc__)
    p.add_argument("--index", required=True, help="index URI written by `roiqa index`")
    p.add_argument("--queries", required=True, help="Parquet of query_id, uri[, x0, y0, x1, y1] or a folder of crops")
    p.add_argument(
        "--out",
        required=True,
        help="output URI: each run writes runs/<run_id>/{results.parquet, errors.parquet, summary.json, report.html, "
        "heatmaps/}, then CURRENT names it",
    )
    p.add_argument(
        "--top-k",
        type=int,
        default=None,
        help="images per query from the coarse search (default: the config's query.top_k)",
    )
    p.add_argument(
        "--rerank",
        type=int,
        default=None,
        help="of those, how many to rerank densely (default: the config's query.rerank)",
    )
    add_root_arg(p, "index", "queries", "out")
    p.add_argument("--no-overlays", action="store_true", help="do not write heatmap overlay PNGs")
    add_stage_flags(p, "refine", "verify", "geometry")
    add_config_arg(p)
    add_quiet_arg(p)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)

    def go() -> int:
        from pipelines.query import run_query

        cfg = config_from(
            args,
            query={"top_k": args.top_k, "rerank": args.rerank, "overlays": False if args.no_overlays else None},
            **stage_overrides(args, "refine", "verify", "geometry"),
        )
        r = run_query(args.index, args.queries, args.out, cfg, progress_for("query", args))
        # a line for people on stderr; stdout's last line stays the JSON report scripts read
        print(
            f"roiqa query: {r.queries} queries, {r.results} results, {r.errors} errors -> {r.run} in {r.seconds:.1f} s",
            file=sys.stderr,
        )
        if r.report:
            print(f"roiqa query: open {r.report} to look at the results", file=sys.stderr)
        print(
            json.dumps(
                {
                    "out": r.out,
                    "run": r.run,
                    "report": r.report,
                    "queries": r.queries,
                    "results": r.results,
                    "errors": r.errors,
                    "seconds": round(r.seconds, 2),
                }
            )
        )
        return 0

    return run(go, "query")


if __name__ == "__main__":
    raise SystemExit(main())
