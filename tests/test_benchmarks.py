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


def test_bench_stages_quick(tmp_path):
    from benchmarks import bench_stages

    assert bench_stages.main(["--quick", "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "bench_stages.json").read_text())
    assert report["index_ratio_to_embed"]["embed (reference)"] == 1.0
    assert set(report["query_ratio_to_rerank"]) == {"rerank (reference)", "rerank + refine", "rerank + verify"}


def test_experiment_reranking_and_labels_against_worked_examples():
    import numpy as np
    import pandas as pd

    from benchmarks.exp_stages import pair_labels, rerank_by
    from roiqa import schema as S

    res = pd.DataFrame(
        {
            S.QUERY_ID: ["q", "q", "q", "r"],
            S.IMAGE_ID: [1, 2, 3, 1],
            S.URI: ["a", "b", "c", "a"],
            S.RANK: [1, 2, 3, 1],
            S.SCORE: [0.9, 0.5, 0.1, 0.3],
            S.X0: [0.0, 0.0, 0.0, 50.0],
            S.Y0: [0.0, 0.0, np.nan, 50.0],
            S.X1: [10.0, 10.0, 10.0, 60.0],
            S.Y1: [10.0, 10.0, 10.0, 60.0],
        }
    )
    out = rerank_by(res, np.array([0.2, 0.8, np.nan, 0.4]))
    assert out[out[S.QUERY_ID] == "q"][S.IMAGE_ID].tolist() == [2, 1, 3]  # nan last
    assert out[out[S.QUERY_ID] == "q"][S.RANK].tolist() == [1, 2, 3]
    gt = pd.DataFrame({S.QUERY_ID: ["q", "q", "r"], S.URI: ["a", "c", "a"], S.X0: [5.0, 0, 0], S.Y0: [0.0, 0, 0],
                       S.X1: [15.0, 10, 10], S.Y1: [10.0, 10, 10]})  # fmt: skip
    # (q, a): IoU 50 / 150 < 0.5; (q, b): not in the ground truth; (q, c): no box; (r, a): disjoint
    assert pair_labels(res, gt).tolist() == [False, False, False, False]
    assert pair_labels(res, gt, iou=0.3).tolist() == [True, False, False, False]


def test_coarse_recall_worked_example():
    import pandas as pd

    from benchmarks.bench_scale import coarse_recall

    results = pd.DataFrame(
        {
            "query_id": ["a", "a", "a", "b", "b"],
            "uri": ["x", "y", "z", "x", "w"],
            "coarse_score": [0.9, 0.5, 0.7, 0.2, 0.8],
        }
    )
    gt = pd.DataFrame({"query_id": ["a", "a", "b", "b"], "uri": ["y", "z", "x", "v"]})
    # top 2 by coarse score: a -> x, z; b -> w, x. Found: (a, z), (b, x) of 4 pairs.
    assert coarse_recall(results, gt, 2) == pytest.approx(0.5)
    assert coarse_recall(results, gt, 3) == pytest.approx(0.75)  # (a, y) too; (b, v) was never returned


def test_bench_scale_quick(tmp_path):
    from benchmarks import bench_scale

    assert bench_scale.main(["--quick", "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "bench_scale.json").read_text())
    assert report["images"] == 24 + 12 and report["index"]["indexed"] + report["index"]["errors"] == report["images"]
    run = report["runs"]["rerank20"]
    assert 0 <= run["coarse_recall@20"] <= run["coarse_recall@100"] <= 1
    assert run["metrics"]["all"]["n_positives"] == report["positives"] > 0
