"""Incremental re-index against a full index of the same collection, in the same run.

A collection of N photographs is indexed once; then a share of it changes (half rewritten, a quarter added, a
quarter deleted) and `roiqa reindex` brings the index up to date. The reference is `roiqa index` of the changed
collection into a fresh index: what a nightly job without incremental re-indexing would do. Also timed: a re-index
with nothing changed (the steady state of a quiet night).
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile

from benchmarks.common import machine, markdown, median, sample_images, timed, write_report


def change(folder: str, size: int, share: float, round_: int, pool: list[str]) -> dict:
    """Rewrite, add and delete `share` of the collection (1/2, 1/4, 1/4 of the changes); returns the counts."""
    n = max(4, int(size * share))
    live = sorted(os.path.join(folder, f) for f in os.listdir(folder))
    rewritten = live[: n // 2]
    for i, f in enumerate(rewritten):
        shutil.copyfile(pool[(i + round_) % len(pool)], f)
    deleted = live[n // 2 : n // 2 + n // 4]
    for f in deleted:
        os.remove(f)
    added = n - len(rewritten) - len(deleted)
    for i in range(added):
        shutil.copyfile(pool[(i * 7 + round_) % len(pool)], os.path.join(folder, f"added_{round_}_{i}.jpg"))
    return {"changed": len(rewritten), "deleted": len(deleted), "new": added}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--images", type=int, default=96, help="collection size")
    p.add_argument("--share", type=float, default=0.1, help="share of the collection that changes between runs")
    p.add_argument("--repeats", type=int, default=3, help="rounds of change -> reindex vs full index (medians)")
    p.add_argument("--out", default="benchmarks/results", help="folder for bench_reindex.json / .md")
    args = p.parse_args(argv)

    from pipelines.index import run_index
    from pipelines.reindex import run_reindex
    from pipelines.runtime import init_ray
    from roiqa.config import RoiqaConfig

    os.makedirs(args.out, exist_ok=True)
    work = tempfile.mkdtemp(prefix="bench-reindex-")
    files = sample_images(os.path.join(work, "pool"), args.images * 2)
    folder = os.path.join(work, "collection")
    os.makedirs(folder)
    for f in files[: args.images]:
        shutil.copy(f, folder)
    pool = files[args.images :]
    cfg = RoiqaConfig()
    init_ray()
    index = os.path.join(work, "index")
    first, _ = timed(lambda: run_index(folder, index, cfg))
    rounds = []
    for r in range(args.repeats):
        counts = change(folder, args.images, args.share, r, pool)
        t_re, rep = timed(lambda: run_reindex(folder, index, cfg))
        ref_index = os.path.join(work, f"reference-{r}")
        t_full, full = timed(lambda ri=ref_index: run_index(folder, ri, cfg))
        shutil.rmtree(ref_index, ignore_errors=True)
        t_same, same = timed(lambda: run_reindex(folder, index, cfg))
        assert rep.status == "published" and same.status == "unchanged"
        assert {k: rep.counts[k] for k in counts} == counts, (rep.counts, counts)
        rounds.append(
            {"reindex_s": t_re, "full_s": t_full, "unchanged_s": t_same, "embedded": counts["new"] + counts["changed"]}
        )
    med = {k: median([x[k] for x in rounds]) for k in rounds[0]}
    report = {
        "machine": machine(),
        "images": args.images,
        "share_changed": args.share,
        "repeats": args.repeats,
        "first_index_s": first,
        "rounds": rounds,
        "median": med,
        "ratio_reindex_vs_full": med["reindex_s"] / med["full_s"],
        "ratio_unchanged_vs_full": med["unchanged_s"] / med["full_s"],
    }
    rows = [
        ["full index of the changed collection (reference)", f"{med['full_s']:.1f}", "1.00", args.images],
        ["incremental reindex", f"{med['reindex_s']:.1f}", f"{report['ratio_reindex_vs_full']:.2f}", med["embedded"]],
        ["reindex, nothing changed", f"{med['unchanged_s']:.2f}", f"{report['ratio_unchanged_vs_full']:.3f}", 0],
    ]
    table = markdown(["run", "seconds (median)", "vs full", "images embedded"], rows)
    write_report(args.out, "bench_reindex", report, table)
    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
