"""The benchmark scripts run end to end in their quick modes and write their reports (no figure is asserted)."""

from __future__ import annotations

import json
import os

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("ray_local")]  # one Ray for the module, shut down after


def test_bench_faiss_quick(tmp_path):
    from benchmarks import bench_faiss

    argv = ["--n", "5000", "--queries", "50", "--factories", "Flat;IVF16,SQ8;HNSW16", "--out", str(tmp_path)]
    assert bench_faiss.main(argv) == 0
    report = json.loads((tmp_path / "faiss_bench.json").read_text())
    flat = [r for r in report["results"] if r["factory"] == "Flat"]
    assert flat and all(r["recall@100"] == pytest.approx(1.0) for r in flat)  # exact search finds exact neighbours
    assert os.path.getsize(tmp_path / "faiss_recall_vs_bytes.png") > 1000


def test_bench_index_and_query_quick(tmp_path):
    from benchmarks import bench_index, bench_query

    assert bench_index.main(["--quick", "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "bench_index.json").read_text())
    assert report["bare_loop"]["images_per_s"] > 0 and report["pipeline"]
    assert os.path.exists(tmp_path / "index_throughput.png")
    assert bench_query.main(["--quick", "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "bench_query.json").read_text())
    assert set(report["latency_ms"]) >= {"encode", "coarse"} and report["batch_rerank"]["pairs"] > 0
