"""The evaluation set (photographs, clutter) and the full `roiqa eval --out DIR` on a tiny one."""

from __future__ import annotations

import json
import math
import os

import numpy as np
import pyarrow.parquet as pq
import pytest
import yaml
from PIL import Image

from jobs import eval as eval_job
from roiqa import schema as S
from roiqa.config import to_dict
from roiqa.eval.demo_data import (
    EVAL_BACKGROUNDS,
    EVAL_OBJECTS,
    TRAINING_PHOTOS,
    build_demo_collection,
    build_eval_collection,
    clutter,
    eval_config,
)
from roiqa.eval.metrics import STRESS_BUCKETS, evaluate
from roiqa.results.output import open_results


def test_clutter_hand_values():
    # a horizontal ramp of 3 levels per pixel: every central and one-sided difference is 3 along x, 0 along y
    ramp = np.tile(np.arange(0, 30, 3, dtype=np.uint8), (6, 1))
    assert clutter(ramp) == pytest.approx(3.0)
    # the same ramp in colour: luma weights sum to 1, so the grey ramp is unchanged
    assert clutter(np.repeat(ramp[..., None], 3, axis=2)) == pytest.approx(3.0)
    # [[0, 0], [0, 4]]: one-sided differences give gy = [[0, 4], [0, 4]] (down the columns) and
    # gx = [[0, 0], [4, 4]] (along the rows), so |g| = [[0, 4], [4, 4 sqrt 2]]
    assert clutter(np.array([[0, 0], [0, 4]], np.uint8)) == pytest.approx((0 + 4 + 4 + 4 * 2**0.5) / 4)
    assert clutter(np.full((5, 7, 3), 200, np.uint8)) == 0.0
    with pytest.raises(ValueError, match="shape"):
        clutter(np.zeros((4, 4, 2)))


def test_eval_collection_photos_and_clutter(tmp_path):
    photos = {p for p, _ in EVAL_OBJECTS.values()} | set(EVAL_BACKGROUNDS)
    assert not photos & set(TRAINING_PHOTOS) and 8 <= len(EVAL_OBJECTS) <= 10
    cfg = eval_config(seed=1000, n_gallery=16)
    assert cfg.seed == 1000 and cfg.max_rotation_deg == 45.0 and cfg.scale_range == (32.0, 200.0)
    col = build_eval_collection(str(tmp_path), seed=1000, n_gallery=16)
    gt = pq.read_table(col.ground_truth_uri)
    assert gt.schema.equals(S.DEMO_GROUND_TRUTH_SCHEMA) and col.n_queries == len(EVAL_OBJECTS)
    df = gt.to_pandas()
    assert len(df) == len(EVAL_OBJECTS) * cfg.instances_per_object
    for uri, rows in df.groupby(S.URI):  # clutter is that of the written image (before JPEG: allow coding noise)
        with Image.open(uri) as im:
            decoded = clutter(np.asarray(im.convert("RGB")))
        assert rows[S.GT_CLUTTER].nunique() == 1
        assert rows[S.GT_CLUTTER].iloc[0] == pytest.approx(decoded, rel=0.15)
    with pytest.raises(ValueError, match="overlap in photo 'coins'"):
        build_demo_collection(
            str(tmp_path / "x"), objects={"a": ("coins", (0, 0, 50, 50)), "b": ("coins", (40, 40, 90, 90))}
        )
    with pytest.raises(ValueError, match="n_gallery 4"):
        eval_config(n_gallery=4)


@pytest.mark.usefixtures("ray_local")
def test_full_eval_main(tmp_path, tiny_cfg, capsys):
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(to_dict(tiny_cfg)))
    out = str(tmp_path / "eval")
    argv = ["--out", out, "--n-gallery", "12", "--config", str(config), "--baselines", "template,sift", "--rerank", "4"]
    argv += ["--model", "none"]
    assert eval_job.main(argv) == 0
    printed = capsys.readouterr().out
    assert "UNTRAINED" in printed and "| roiqa | all |" in printed

    for name in ("metrics.json", "metrics.md", "pr_curves.png", "heatmap_gallery.png"):
        assert os.path.isfile(os.path.join(out, name)), name
    for name in ("pr_curves.png", "heatmap_gallery.png"):
        with Image.open(os.path.join(out, name)) as im:
            im.load()
            assert im.format == "PNG" and im.width > 100 and im.height > 100
    metrics = json.loads(open(os.path.join(out, "metrics.json")).read())
    methods = ["roiqa", "template", "sift"]
    assert list(metrics) == methods
    md = open(os.path.join(out, "metrics.md")).read().strip().splitlines()
    assert len(md) == 2 + len(methods) * (1 + len(STRESS_BUCKETS))

    gt = pq.read_table(os.path.join(out, "collection", "ground_truth.parquet")).to_pandas()
    for method in methods:
        assert set(metrics[method]) >= {"all", *STRESS_BUCKETS, "latency"}
        folder = open_results(os.path.join(out, method)).folder if method == "roiqa" else os.path.join(out, method)
        res = pq.read_table(os.path.join(folder, "results.parquet"))
        assert res.schema.equals(S.RESULTS_SCHEMA)
        res = res.to_pandas()
        assert res.groupby(S.QUERY_ID).size().tolist() == [12] * len(EVAL_OBJECTS)  # top_k = the whole gallery
        want = evaluate(res, gt)
        got = metrics[method]["all"]
        for key, value in want.items():
            assert (got[key] is None and math.isnan(value)) or got[key] == pytest.approx(value), (method, key)
        assert got["n_positives"] == len(gt)
        for bucket in STRESS_BUCKETS:
            assert set(metrics[method][bucket]) == set(got), (method, bucket)
    assert metrics["roiqa"]["index_bytes_per_image"] > 0
    assert set(metrics["roiqa"]["latency"]) == {eval_job.COARSE_LATENCY, eval_job.RERANK_LATENCY}
    assert metrics["sift"]["latency"][eval_job.BASELINE_LATENCY] > 0
    # --rerank 4: the top 4 of each query's 12 were reranked (scored), the rest keep only their coarse score
    roiqa = open_results(os.path.join(out, "roiqa")).results().to_pandas()
    assert roiqa.groupby(S.QUERY_ID)[S.SCORE].count().tolist() == [4] * len(EVAL_OBJECTS)


def test_eval_argument_errors(tmp_path, capsys):
    assert eval_job.main(["--results", str(tmp_path)]) == 2
    assert "go together" in capsys.readouterr().err
    assert eval_job.main(["--results", "r.parquet", "--ground-truth", "g.parquet", "--seed", "3"]) == 2
    assert "--seed" in capsys.readouterr().err
    assert eval_job.main([]) == 2
    assert "--out DIR" in capsys.readouterr().err
    assert eval_job.main(["--out", str(tmp_path / "o"), "--baselines", "template,orb"]) == 2
    assert "orb" in capsys.readouterr().err
