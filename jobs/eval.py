"""`roiqa eval`: retrieval (mAP, Recall@K) and localization (AP at IoU 0.5) of results against ground truth."""

from __future__ import annotations

import argparse
import json

from jobs.common import run


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="roiqa eval", description=__doc__)
    p.add_argument("--results", required=True, help="results.parquet, or the query output folder holding it")
    p.add_argument("--ground-truth", required=True, help="Parquet of query_id, uri, x0, y0, x1, y1")
    p.add_argument("--out", default=None, help="write metrics.json here (a file URI)")
    return p


def evaluate_uris(results: str, ground_truth: str) -> dict:
    """Metrics of a results table (or a query output folder) against a ground-truth table."""
    from roiqa import index_store as store
    from roiqa import uri as uri_mod
    from roiqa.metrics import evaluate

    if not results.lower().endswith(".parquet"):
        results = uri_mod.join(results, "results.parquet")
    return evaluate(store.read_table(results).to_pandas(), store.read_table(ground_truth).to_pandas())


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)

    def go() -> int:
        from roiqa import uri as uri_mod

        metrics = evaluate_uris(args.results, args.ground_truth)
        text = json.dumps(metrics, indent=2)
        if args.out:
            uri_mod.write_bytes(args.out, text.encode())
        print(text)
        return 0

    return run(go, "eval")


if __name__ == "__main__":
    raise SystemExit(main())
