"""The pipelines' pure parts: final ranking, shortlists grouped by image, query tables, Ray Data stats parsing."""

from __future__ import annotations

import os

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from roiqa import schema as S
from roiqa.io.queries import load_queries, query_map
from roiqa.results.ranking import Coarse, rank_results, shortlist


def test_rank_results_reranked_first_by_score_then_coarse_order():
    reranked = pd.DataFrame(
        {
            S.QUERY_ID: ["a", "a", "a"],
            S.IMAGE_ID: [1, 2, 3],
            S.SCORE: [0.2, np.nan, 0.9],
            S.COARSE_SCORE: [0.9, 0.8, 0.7],
        }
    )
    coarse = pd.DataFrame(
        {S.QUERY_ID: ["a"] * 5, S.IMAGE_ID: [1, 2, 3, 4, 5], S.COARSE_SCORE: [0.9, 0.8, 0.7, 0.5, 0.6]}
    )
    out = rank_results(reranked, coarse)
    # reranked: 3 (0.9), 1 (0.2), 2 (NaN last); then the rest by coarse score: 5 (0.6), 4 (0.5)
    assert out.sort_values(S.RANK)[S.IMAGE_ID].tolist() == [3, 1, 2, 5, 4]
    assert out.sort_values(S.RANK)[S.RANK].tolist() == [1, 2, 3, 4, 5]
    assert out[S.SCORE].isna().sum() == 3  # the NaN rerank and the two coarse-only rows


def test_shortlist_groups_candidates_by_image():
    scores = np.array([[0.9, 0.8, 0.1], [0.7, 0.6, 0.5]], np.float32)
    ids = np.array([[10, 20, 30], [20, 40, -1]])
    t = shortlist(scores, ids, ["q1", "q2"], rerank=2).to_pydict()
    assert t[S.IMAGE_ID] == [10, 20, 40]
    assert t[S.QUERY_IDS] == [["q1"], ["q1", "q2"], ["q2"]]
    assert t[S.COARSE_SCORES] == [[pytest.approx(0.9)], [pytest.approx(0.8), pytest.approx(0.7)], [pytest.approx(0.6)]]


def test_load_queries_parquet_folder_and_errors(tmp_path):
    (tmp_path / "crops").mkdir()
    for name in ("b.png", "a.jpg", ".hidden.png"):
        (tmp_path / "crops" / name).write_bytes(b"x")
    t = load_queries(str(tmp_path / "crops"))
    assert t.column(S.QUERY_ID).to_pylist() == ["a", "b"]
    assert query_map(t)["a"] == (str(tmp_path / "crops" / "a.jpg"), None)
    pq.write_table(pa.table({S.QUERY_ID: ["x", "x"], S.URI: ["1.png", "2.png"]}), tmp_path / "dup.parquet")
    with pytest.raises(ValueError, match="unique"):
        load_queries(str(tmp_path / "dup.parquet"))
    pq.write_table(pa.table({S.URI: ["1.png"]}), tmp_path / "noid.parquet")
    with pytest.raises(ValueError, match="query_id"):
        load_queries(str(tmp_path / "noid.parquet"))
    pq.write_table(
        pa.table({S.QUERY_ID: ["q"], S.URI: ["sub/1.png"], S.X0: [1.0], S.Y0: [2.0], S.X1: [3.0], S.Y1: [4.0]}),
        tmp_path / "boxed.parquet",
    )
    t = load_queries(str(tmp_path / "boxed.parquet"))
    assert query_map(t)["q"] == (str(tmp_path / "sub" / "1.png"), [1.0, 2.0, 3.0, 4.0])


def test_query_images_outside_the_allowed_prefixes_are_refused(tmp_path):
    """Queries obey the manifests' rule: a query image outside the queries' folder (or query.allowed_prefixes),
    given as an absolute path, through '..' or through a symbolic link, refuses the queries before any read."""
    (tmp_path / "q").mkdir()
    (tmp_path / "q" / "a.png").write_bytes(b"x")
    (tmp_path / "secret.png").write_bytes(b"x")
    os.symlink(tmp_path / "secret.png", tmp_path / "q" / "link.png")
    for rows in (["a.png", "/etc/passwd"], ["a.png", "../secret.png"], ["a.png", "link.png"]):
        pq.write_table(pa.table({S.QUERY_ID: ["a", "b"], S.URI: rows}), tmp_path / "q" / "queries.parquet")
        with pytest.raises(ValueError, match=r"queries\.parquet: query 'b' points outside the allowed prefixes"):
            load_queries(str(tmp_path / "q" / "queries.parquet"))
    with pytest.raises(ValueError, match=r"query 'link' points outside the allowed prefixes"):
        load_queries(str(tmp_path / "q"))  # a folder of crops: the link is listed, its target is elsewhere
    t = load_queries(str(tmp_path / "q" / "queries.parquet"), (str(tmp_path),))  # allowed by the config
    assert t.column(S.URI).to_pylist() == [str(tmp_path / "q" / "a.png"), str(tmp_path / "q" / "link.png")]


def test_stage_seconds_parses_ray_data_stats():
    from pipelines.runtime import stage_seconds

    text = (
        "Operator 1 FromArrow: 0 tasks executed, 1 blocks produced in 0s\n\n"
        "Operator 2 MapBatches(read_any)->MapBatches(decode): 4 tasks executed, 4 blocks produced in 1.2s\n"
        "* Remote wall time: 100ms min, 300ms max, 250ms mean, 1.0s total\n"
        "* Remote cpu time: 90ms min, 280ms max, 240ms mean, 960ms total\n\n"
        "Operator 3 MapBatches(Embedder): 2 tasks executed, 2 blocks produced in 9s\n"
        "* Remote wall time: 4.1s min, 4.5s max, 4.3s mean, 8.6s total\n"
        "Operator 4 Limit: x\n* Remote wall time: 5us min, 9us max, 7us mean, 14us total\n"
    )
    got = stage_seconds(text)
    assert got == {"MapBatches(read_any)->MapBatches(decode)": 1.0, "MapBatches(Embedder)": 8.6, "Limit": 14e-6}


def test_shortlist_ranges_and_extra_pairs():
    scores = np.array([[0.9, 0.8, 0.1], [0.7, 0.6, 0.5]], np.float32)
    ids = np.array([[10, 20, 30], [20, 40, -1]])
    past = shortlist(scores, ids, ["q1", "q2"], rerank=3, start=1).to_pydict()  # ranks 1..2 of each query
    assert past[S.IMAGE_ID] == [20, 30, 40] and past[S.QUERY_IDS] == [["q1"], ["q1"], ["q2"]]
    t = shortlist(scores, ids, ["q1", "q2"], rerank=1, extra={("q1", 30), ("q2", 99)}).to_pydict()
    assert t[S.IMAGE_ID] == [10, 20, 30]  # q1's top 1, q2's top 1, and q1's verified rank-3 image
    assert t[S.QUERY_IDS] == [["q1"], ["q2"], ["q1"]]
    assert t[S.COARSE_SCORES][2] == [pytest.approx(0.1)]
    done = shortlist(scores, ids, ["q1", "q2"], rerank=3, exclude={("q1", 20), ("q2", 40)}).to_pydict()
    assert done[S.IMAGE_ID] == [10, 20, 30] and done[S.QUERY_IDS] == [["q1"], ["q2"], ["q1"]]  # pairs checked before
    top = Coarse(["q1", "q2"], scores, ids, pd.DataFrame()).top_pairs(2)
    assert top == {("q1", 10), ("q1", 20), ("q2", 20), ("q2", 40)}
    assert Coarse(["q1", "q2"], scores, ids, pd.DataFrame()).top_pairs(3) == top | {("q1", 30)}  # no -1
