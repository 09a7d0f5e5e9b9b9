"""A query run's output, published like an index version: runs/<run_id>/{results.parquet, errors.parquet,
summary.json, report.html, heatmaps/} under the output URI, then CURRENT (naming the run) replaced last and
atomically."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass

import pandas as pd
import pyarrow as pa

from roiqa.index import store
from roiqa.io import uri as uri_mod
from roiqa.io.redact import redact

CURRENT = "CURRENT"  # names the published run
RUNS = "runs"  # runs/<run_id>/: one folder per query run
RESULTS = "results.parquet"
ERRORS = "errors.parquet"
SUMMARY = "summary.json"
HEATMAPS = "heatmaps"  # heatmaps/<query_id>/<rank>-<image_id>.png (roiqa.results.html.overlay_name)
REPORT = "report.html"  # the run's page (roiqa.results.html)
RUN_ID_KEY = b"roiqa.run_id"  # Parquet schema metadata: the run a results / errors table belongs to

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class QueryRun:
    """One query run's folder under an output URI (`run_id` "" : an output written before runs had folders, its
    files directly under `out`)."""

    out: str  # the output URI (`roiqa query --out`)
    run_id: str  # the folder's name under runs/

    @property
    def folder(self) -> str:
        return uri_mod.join(self.out, RUNS, self.run_id) if self.run_id else self.out

    def uri(self, *parts: str) -> str:
        return uri_mod.join(self.folder, *parts)

    def results(self) -> pa.Table:
        return self._table(RESULTS)

    def errors(self) -> pa.Table:
        return self._table(ERRORS)

    def summary(self) -> dict:
        return json.loads(uri_mod.read_bytes(self.uri(SUMMARY)))

    def _table(self, name: str) -> pa.Table:
        table = store.read_table(self.uri(name))
        written_by = (table.schema.metadata or {}).get(RUN_ID_KEY, b"").decode()
        if self.run_id and written_by != self.run_id:
            raise ValueError(f"{self.uri(name)}: written by run {written_by!r}, not by run {self.run_id!r}")
        return table


def new_run(out: str) -> QueryRun:
    """A fresh run folder under `out` (nothing is written yet): a sortable id, UTC start time first."""
    return QueryRun(uri_mod.normalize(out), uri_mod.new_version_id())


def current_run(out: str) -> str | None:
    """The run id named by `out`/CURRENT, or None when no run is published there."""
    pointer = uri_mod.join(out, CURRENT)
    if not uri_mod.exists(pointer):
        return None
    name = uri_mod.read_bytes(pointer).decode("utf-8").strip()
    if not name or "/" in name or name.startswith("."):
        raise ValueError(f"{pointer}: does not name a query run: {name!r}")
    return name


def open_results(out: str, run_id: str | None = None) -> QueryRun:
    """The published run of the query output at `out` (or a named `run_id`): read its files through the
    returned QueryRun, resolved once, so they all come from the same run."""
    out = uri_mod.normalize(out)
    run_id = run_id or current_run(out)
    if run_id is None:
        if uri_mod.exists(uri_mod.join(out, RESULTS)):
            return QueryRun(out, "")  # written before query runs were published
        raise FileNotFoundError(f"{out}: no published query run (no {CURRENT} file); run `roiqa query` first")
    run = QueryRun(out, run_id)
    if not uri_mod.exists(run.uri(SUMMARY)):
        raise FileNotFoundError(f"{run.folder}: not a finished query run (no {SUMMARY})")
    return run


def read_results(out: str) -> pd.DataFrame:
    """The results table of the query run published at `out` as a DataFrame."""
    return open_results(out).results().to_pandas()


def list_runs(out: str) -> list[str]:
    """Run ids present under `out`/runs, oldest first."""
    fs, path = uri_mod.filesystem(uri_mod.join(out, RUNS))
    if not uri_mod.retrying(out, "list", fs.exists, path):
        return []
    return sorted(p.rstrip("/").rsplit("/", 1)[-1] for p in uri_mod.retrying(out, "list", fs.ls, path, detail=False))


def published_chain(out: str, limit: int) -> list[str]:
    """Up to `limit` published runs, newest first: CURRENT, then each summary's `previous`."""
    chain: list[str] = []
    run_id = current_run(out)
    while run_id and len(chain) < limit and run_id not in chain:
        run = QueryRun(uri_mod.normalize(out), run_id)
        if not uri_mod.exists(run.uri(SUMMARY)):
            break  # already collected
        chain.append(run_id)
        run_id = run.summary().get("previous")
    return chain


def collect_runs(out: str, keep: int) -> list[str]:
    """Delete the run folders older than the oldest of the newest `keep` published runs (published ones and
    leftovers of failed runs alike); returns their ids. Newer unpublished folders (a run still writing) stay."""
    if keep < 1:
        raise ValueError(f"query.keep_runs must be >= 1, got {keep}")
    kept = published_chain(out, keep)
    if not kept:
        return []
    doomed = [r for r in list_runs(out) if r < min(kept) and r not in kept]
    for r in doomed:
        uri_mod.delete(QueryRun(uri_mod.normalize(out), r).folder, recursive=True)
    return doomed


def _tagged(table: pa.Table, run_id: str) -> pa.Table:
    return table.replace_schema_metadata({**(table.schema.metadata or {}), RUN_ID_KEY: run_id.encode()})


def publish(
    run: QueryRun, results: pa.Table, errors: pa.Table, summary: dict, keep: int, page: str | None = None
) -> dict:
    """Write the run's results, errors, report page (`page`, when given) and summary (its heatmaps are already in
    its folder), then replace CURRENT
    with its id: readers of `open_results` see this run whole, or the previous one. Then remove old runs (best
    effort: the run is published). Returns the summary as written (with `run_id` and `previous`)."""
    if keep < 1:
        raise ValueError(f"query.keep_runs must be >= 1, got {keep}")
    summary = {"run_id": run.run_id, "previous": current_run(run.out), **summary}
    store.write_table(_tagged(results, run.run_id), run.uri(RESULTS))
    store.write_table(_tagged(errors, run.run_id), run.uri(ERRORS))
    if page is not None:
        uri_mod.write_bytes(run.uri(REPORT), page.encode("utf-8"))
    uri_mod.write_bytes(run.uri(SUMMARY), json.dumps(summary, indent=2).encode())
    uri_mod.write_atomic(uri_mod.join(run.out, CURRENT), (run.run_id + "\n").encode("utf-8"))
    try:
        collect_runs(run.out, keep)
    except Exception as exc:  # noqa: BLE001 - old runs stay until the next run; this one is published
        log.warning("%s: could not remove old query runs: %s", redact(run.out), redact(str(exc)))
    return summary
