"""Soak: back-to-back index / reindex / query runs against an S3 server with random outages in between.

A moto S3 server behind a TCP relay (benchmarks/fault_relay.py); the collection lives in the bucket and changes
between runs (an image added, one rewritten, one deleted). Each run is `roiqa index`, `roiqa reindex` or
`roiqa query` through its command-line entry point; during about half of them the relay goes down at a random
moment, either for less than the retry window (`ROIQA_STORAGE_RETRY_S`: the run must retry and publish) or until
the run has given up (it must exit 3 and publish nothing), starting at the first request of a random kind
(listing, image reads, version writes, the faiss upload, CURRENT, the lock; for queries index and gallery reads,
results and overlay uploads, CURRENT). After every run:

- `CURRENT` names a complete version: its manifest, its faiss index (checked against the manifest's sha256) and
  its tables open;
- that version holds every input listed when it was made exactly once, indexed or in the errors table
  (`lost` counts the inputs missing or repeated, and must be 0);
- a run that exited 3 left `CURRENT` where it was; a query run that exited 3 published no results.

Prints one JSON object (runs, outages injected and felt, exit codes, inputs checked, lost) and writes
soak_faults.json / .md under --out.
"""

from __future__ import annotations

import argparse
import contextlib
import glob
import io
import json
import os
import random
import re
import shutil
import tempfile

from benchmarks.common import machine, markdown, write_report
from benchmarks.fault_relay import FlakyEndpoint, start_moto

BUCKET = "roiqa-soak"
_WRITER_TRIPS = {
    "listing": rb"GET /roiqa-soak\?list-type",
    "image read": rb"GET /roiqa-soak/images/",
    "version write": rb"PUT /roiqa-soak/index/versions/",
    "faiss upload": rb"PUT /roiqa-soak/index/versions/\S+/faiss\.index",
    "CURRENT": rb"PUT /roiqa-soak/index/CURRENT",
    "lock": rb"/roiqa-soak/index/LOCK",
}
TRIPS = {  # the requests an outage starts at, per kind of run
    "index": _WRITER_TRIPS,
    "reindex": _WRITER_TRIPS,
    "query": {
        "index read": rb"GET /roiqa-soak/index/",
        "gallery read": rb"GET /roiqa-soak/images/",
        "results upload": rb"PUT /roiqa-soak/query-out/\S+results\.parquet",
        "overlay upload": rb"PUT /roiqa-soak/query-out/\S+\.png",
        "CURRENT": rb"PUT /roiqa-soak/query-out/CURRENT",
    },
}


def _run_job(main, argv: list[str]) -> tuple[int, str, str]:
    """rc, stdout, stderr of one job's entry point, run in this process (Ray stays up between runs)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            rc = main(argv)
        except SystemExit as exc:
            rc = int(exc.code or 0)
        except Exception as exc:  # noqa: BLE001 - an uncaught failure is a finding of the soak (exit 1), not its end
            rc = 1
            print(f"uncaught {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}", file=err)
    return rc, out.getvalue(), err.getvalue()


def _listed(direct) -> list[str]:
    direct.invalidate_cache()
    return sorted(f"s3://{p}" for p in direct.find(f"{BUCKET}/images"))


def _check_index(index: str, expected: dict[str, list[str]]) -> tuple[str, int, int]:
    """(version, inputs, lost) of the published version: complete, and every input of its run exactly once."""
    from roiqa import schema as S
    from roiqa.index import store

    v = store.open_index(index)
    v.faiss()  # the checksum and the index itself
    rows = v.embeddings([S.URI]).column(S.URI).to_pylist() + v.errors().column(S.URI).to_pylist()
    want = expected[v.version]
    lost = len(set(want) - set(rows)) + (len(rows) - len(set(rows))) + len(set(rows) - set(want))
    return v.version, len(want), lost


def _mutate(direct, pool: list[str], step: int, rng: random.Random) -> None:
    """Between runs: add one image, rewrite one, delete one (never below 4 images)."""
    live = _listed(direct)
    direct.put_file(pool[step % len(pool)], f"{BUCKET}/images/added_{step:03d}.jpg")
    if live:
        direct.put_file(pool[(step * 7 + 3) % len(pool)], live[rng.randrange(len(live))][len("s3://") :])
    if len(live) > 4:
        direct.rm(live[rng.randrange(len(live))][len("s3://") :])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", type=int, default=20, help="index / reindex / query runs, back to back")
    p.add_argument("--images", type=int, default=12, help="images in the bucket at the start")
    p.add_argument("--outage-share", type=float, default=0.5, help="share of runs with an outage injected")
    p.add_argument("--retry-s", type=float, default=3.0, help="ROIQA_STORAGE_RETRY_S of the runs")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="benchmarks/results", help="folder for soak_faults.json / .md")
    args = p.parse_args(argv)

    import ray
    import s3fs

    from roiqa.eval.demo_data import DemoConfig, build_demo_collection
    from roiqa.index import store

    rng = random.Random(args.seed)
    work = tempfile.mkdtemp(prefix="roiqa-soak-")
    moto, endpoint = start_moto()
    host, port = endpoint.rsplit("//", 1)[1].split(":")
    relay = FlakyEndpoint((host, int(port)))
    os.environ.update(
        {
            "AWS_ENDPOINT_URL": relay.url,
            "AWS_ACCESS_KEY_ID": "soak",
            "AWS_SECRET_ACCESS_KEY": "soak-secret",
            "AWS_DEFAULT_REGION": "us-east-1",
            "ROIQA_STORAGE_RETRY_S": str(args.retry_s),
        }
    )
    try:
        col = build_demo_collection(
            os.path.join(work, "collection"),
            DemoConfig(
                n_gallery=args.images,
                instances_per_object=1,
                n_distractors=2,
                image_size=(96, 128),
                scale_range=(28.0, 48.0),
                seed=5,
            ),
        )
        pool = sorted(glob.glob(os.path.join(col.gallery_dir, "*")))
        direct = s3fs.S3FileSystem(client_kwargs={"endpoint_url": endpoint}, skip_instance_cache=True)
        direct.mkdir(BUCKET)
        for f in pool:
            direct.put_file(f, f"{BUCKET}/images/{os.path.basename(f)}")
        cfg = os.path.join(work, "tiny.yaml")
        with open(cfg, "w") as f:  # small and fast: the soak is about faults, not quality
            json.dump(
                {
                    "model": {"backbone": "resnet18", "backbone_weights": None, "fpn_channels": 32},
                    "preprocess": {"image_size": 128},
                    "index": {"batch_size": 8, "read_batch_size": 8, "keep_versions": 2},
                    "query": {"top_k": 6, "rerank": 3, "query_sizes": [24, 40], "overlay_size": 96},
                    "geometry": {"shortlist": 0},
                },
                f,
            )
        ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="warning")

        from jobs.index import main as index_main
        from jobs.query import main as query_main
        from jobs.reindex import main as reindex_main
        from roiqa.results.output import current_run

        index = f"s3://{BUCKET}/index"
        out = f"s3://{BUCKET}/query-out"
        expected: dict[str, list[str]] = {}  # version -> inputs listed when its run started
        rows, totals = [], {"inputs_checked": 0, "lost": 0, "outages_injected": 0, "outages_felt": 0}
        for run in range(args.runs):
            kind = "index" if run == 0 or run % 5 == 0 else ("query" if run % 3 == 2 else "reindex")
            if run and kind != "query":
                _mutate(direct, pool, run, rng)
            listed = _listed(direct)
            before = store.current_version(index) if run else None
            results_before = current_run(out) if kind == "query" else None
            outage = None
            if rng.random() < args.outage_share:  # down from the first request of a random kind, short or long
                long = rng.random() < 0.5
                what = rng.choice(sorted(TRIPS[kind]))
                down_s = 1e9 if long else rng.uniform(0.5, args.retry_s * 0.6)
                outage = {"at": what, "long": long, "down_s": None if long else round(down_s, 2)}
                relay.tripped.clear()
                relay.trip, relay.trip_down_s = re.compile(TRIPS[kind][what]), down_s
                totals["outages_injected"] += 1
            base = ["--config", cfg]
            if kind == "query":
                argv_ = ["--index", index, "--queries", col.queries_uri, "--out", out, *base]
                rc, so, se = _run_job(query_main, argv_)
            else:
                main_ = index_main if kind == "index" else reindex_main
                rc, so, se = _run_job(
                    main_, ["--images", f"s3://{BUCKET}/images", "--index", index, "--model", "none", *base]
                )
            if outage is not None:
                relay.trip = None
                relay.up()
                outage["felt"] = relay.tripped.is_set()
                totals["outages_felt"] += outage["felt"]
            version, inputs, lost = (None, 0, 0)
            if kind != "query" and rc == 0:
                line = json.loads(so.strip().splitlines()[-1])
                if line.get("version"):
                    expected.setdefault(line["version"], listed)
            if store.current_version(index) is not None:
                version, inputs, lost = _check_index(index, expected)
            problems = []
            if rc not in (0, 3):
                problems.append(f"exit {rc}: {se.strip().splitlines()[-1] if se.strip() else ''}")
            if rc == 3 and kind != "query" and version != before:
                problems.append(f"CURRENT moved from {before} to {version} on a failed run")
            if kind == "query":
                after = current_run(out)
                if rc == 3 and after != results_before:
                    problems.append("a failed query run published results")
                if rc == 0 and after is None:
                    problems.append("a query run exited 0 without published results")
            totals["inputs_checked"] += inputs
            totals["lost"] += lost
            rows.append(
                {"run": run, "kind": kind, "rc": rc, "outage": outage, "version": version, "inputs": inputs,
                 "lost": lost, "problems": problems}
            )  # fmt: skip
            print(json.dumps(rows[-1]), flush=True)
        rcs = [r["rc"] for r in rows]
        report = {
            "runs": len(rows),
            "by_kind": {k: sum(r["kind"] == k for r in rows) for k in ("index", "reindex", "query")},
            "exit_0": rcs.count(0),
            "exit_3": rcs.count(3),
            "other_exits": sum(rc not in (0, 3) for rc in rcs),
            **totals,
            "problems": [f"run {r['run']}: {x}" for r in rows for x in r["problems"]],
            "retry_s": args.retry_s,
            "seed": args.seed,
            "machine": machine(),
            "rows": rows,
        }
        table = markdown(
            ["runs", "index / reindex / query", "outages (felt)", "exit 0", "exit 3", "inputs checked", "lost"],
            [[
                report["runs"],
                " / ".join(str(report["by_kind"][k]) for k in ("index", "reindex", "query")),
                f"{report['outages_injected']} ({report['outages_felt']})",
                report["exit_0"], report["exit_3"], report["inputs_checked"], report["lost"],
            ]],
        )  # fmt: skip
        write_report(args.out, "soak_faults", report, table)
        return 0 if not report["problems"] and report["lost"] == 0 and not report["other_exits"] else 1
    finally:
        with contextlib.suppress(Exception):
            ray.shutdown()
        relay.close()
        moto.terminate()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
