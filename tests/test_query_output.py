"""Query runs are published like index versions: CURRENT names one whole run, old runs are removed only once they
fall behind the newest `keep` published ones, and a table copied in from another run is refused."""

from __future__ import annotations

import os
import shutil

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from roiqa import schema as S
from roiqa.results import output as qo


def _publish(out: str, keep: int, n_results: int) -> qo.QueryRun:
    run = qo.new_run(out)
    os.makedirs(run.uri(qo.HEATMAPS, "q"))
    with open(run.uri(qo.HEATMAPS, "q", "1.png"), "wb") as f:
        f.write(b"png of " + run.run_id.encode())
    results = pa.table({S.QUERY_ID: [run.run_id] * n_results})  # rows that say which run wrote them
    qo.publish(run, results, S.ERRORS_SCHEMA.empty_table(), {"queries": n_results}, keep)
    return run


def test_runs_are_published_whole_and_old_ones_collected_after_the_pointer_moved(tmp_path):
    out = str(tmp_path / "out")
    with pytest.raises(FileNotFoundError, match="no published query run"):
        qo.open_results(out)
    r1 = _publish(out, keep=2, n_results=1)
    leftover = qo.new_run(out)  # a run that died before publishing
    os.makedirs(leftover.uri(qo.HEATMAPS))
    r2 = _publish(out, keep=2, n_results=2)
    reader = qo.open_results(out)  # resolved now, read after two more runs
    r3 = _publish(out, keep=2, n_results=3)
    writing = qo.new_run(out)  # a run still writing when a later one publishes
    os.makedirs(writing.uri(qo.HEATMAPS))
    r4 = _publish(out, keep=2, n_results=4)

    run = qo.open_results(out)
    assert run == r4 and run.summary() == {"run_id": r4.run_id, "previous": r3.run_id, "queries": 4}
    assert run.results().column(S.QUERY_ID).to_pylist() == [r4.run_id] * 4
    assert qo.published_chain(out, 10) == [r4.run_id, r3.run_id]  # r2's folder is gone: the chain ends there
    assert qo.list_runs(out) == sorted([r3.run_id, writing.run_id, r4.run_id])
    assert reader == r2 and not os.path.exists(reader.folder)  # fell behind the kept two
    for gone in (r1, leftover, r2):
        with pytest.raises(FileNotFoundError, match="not a finished query run"):
            qo.open_results(out, gone.run_id)
    assert qo.open_results(out, r3.run_id).results().num_rows == 3  # kept, readable by id

    shutil.copyfile(r3.uri(qo.RESULTS), r4.uri(qo.RESULTS))  # a table of another run is refused
    with pytest.raises(ValueError, match="written by run"):
        qo.open_results(out).results()
    with pytest.raises(ValueError, match="keep_runs"):
        _publish(out, keep=0, n_results=1)


def test_an_output_written_before_runs_had_folders_is_still_read(tmp_path):
    table = pa.table({S.QUERY_ID: ["a"]})
    pq.write_table(table, tmp_path / qo.RESULTS)
    run = qo.open_results(str(tmp_path))
    assert run.folder == str(tmp_path) and run.results().equals(table)
