"""Entry points: `main([...])` of each job on tiny data, and the `roiqa` dispatcher."""

from __future__ import annotations

import json
import os
import re

import pyarrow.parquet as pq
import pytest
import yaml

from jobs import demo
from jobs import eval as eval_job
from jobs import index as index_job
from jobs import query as query_job
from roiqa import schema as S
from roiqa.config import to_dict
from roiqa.eval.metrics import evaluate
from roiqa.index.store import open_index
from roiqa.results.output import open_results

pytestmark = pytest.mark.usefixtures("ray_local")


@pytest.fixture()
def config_file(tiny_cfg, tmp_path) -> str:
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(to_dict(tiny_cfg)))
    return str(path)


def test_index_query_eval_mains(collection, config_file, tmp_path, capsys, monkeypatch):
    index, out = str(tmp_path / "index"), str(tmp_path / "out")
    monkeypatch.setenv("ROIQA_PROGRESS", "1")  # progress lines although stderr is not a terminal
    assert (
        index_job.main(
            ["--images", collection.gallery_dir, "--index", index, "--model", "none", "--config", config_file]
        )
        == 0
    )
    captured = capsys.readouterr()
    printed = json.loads(captured.out.strip().splitlines()[-1])
    assert printed["indexed"] == collection.n_gallery and printed["errors"] == 0
    n = collection.n_gallery
    where = f"into {printed['index']} version {printed['version']} in "
    assert f"roiqa index: indexed {n} of {n} images (0 errors) {where}" in captured.err
    # one progress line per stage, with the collection's counts, before the summary; stdout keeps the JSON last
    lines = [ln for ln in captured.err.splitlines() if ln.startswith("roiqa index: ")]
    assert lines[0].startswith(f"roiqa index: listed {n} inputs under ")
    assert f"roiqa index: embedded {n} images ({n} indexed, 0 errors) in " in captured.err
    assert re.search(rf"roiqa index: embedded {n} images .* in [\d.]+ s, [\d.]+ images/s", captured.err)
    vectors = open_index(index).manifest["faiss_vectors"]
    assert f"roiqa index: built faiss index ({vectors:,} vectors, " in captured.err
    assert f"roiqa index: published version {printed['version']} ({n} indexed, 0 errors)" in captured.err
    assert lines[-1].startswith("roiqa index: indexed ")
    argv = [
        "--index",
        index,
        "--queries",
        collection.queries_uri,
        "--out",
        out,
        "--config",
        config_file,
        "--top-k",
        "5",
        "--rerank",
        "2",
        "--no-overlays",
    ]
    assert query_job.main(argv) == 0
    run = open_results(out)
    captured = capsys.readouterr()
    printed = json.loads(captured.out.strip().splitlines()[-1])
    assert printed["run"] == run.folder
    q, rows = collection.n_queries, printed["results"]
    assert f"roiqa query: {q} queries, {rows} results, {printed['errors']} errors -> {run.folder} in " in captured.err
    assert f"roiqa query: read {q} queries; index version " in captured.err
    assert re.search(rf"roiqa query: encoded {q} queries \(0 errors\) in [\d.]+ s, [\d.]+ queries/s", captured.err)
    assert f"roiqa query: coarse search: top 5 of {n} images for {q} queries, {5 * q} candidates in " in captured.err
    reranked = 2 * q + run.summary()["verified_past_rerank"]
    assert re.search(rf"roiqa query: reranked {reranked} pairs in [\d.]+ s, [\d.]+ pairs/s", captured.err)
    assert f"roiqa query: published run {run.folder} ({rows} results, {printed['errors']} errors)" in captured.err
    res = run.results().to_pandas()
    assert res.groupby(S.QUERY_ID).size().max() == 5
    assert res[S.HEATMAP_URI].isna().all()  # --no-overlays
    summary = run.summary()
    # the budget of 2 per query, plus the images past it whose homography verified (geometry.shortlist)
    assert res[S.SCORE].notna().sum() == 2 * collection.n_queries + summary["verified_past_rerank"]
    assert (res[res[S.RANK] <= 2][S.SCORE].notna()).all()
    capsys.readouterr()
    metrics_path = str(tmp_path / "metrics.json")
    assert eval_job.main(["--results", out, "--ground-truth", collection.ground_truth_uri, "--out", metrics_path]) == 0
    got = json.loads(open(metrics_path).read())
    want = evaluate(res, pq.read_table(collection.ground_truth_uri).to_pandas())
    assert got == pytest.approx(want, nan_ok=True)


def test_index_with_a_checkpoint_and_query_uses_it(collection, tiny_cfg, tmp_path, capsys, monkeypatch):
    """--model: the index records the checkpoint, its embeddings are that model's, and the query reuses it."""
    import dataclasses

    import numpy as np

    from roiqa.io.sources import read_files
    from roiqa.models.checkpoint import save_matcher
    from roiqa.models.matcher import Matcher
    from roiqa.stages.embed import Decoder, Embedder

    monkeypatch.delenv("ROIQA_PROGRESS", raising=False)
    model_cfg = dataclasses.replace(tiny_cfg.model, seed=7, fpn_channels=24)
    ckpt = str(tmp_path / "model.safetensors")
    save_matcher(Matcher(model_cfg), ckpt)
    index, out = str(tmp_path / "index"), str(tmp_path / "out")
    cfg_path = tmp_path / "c.yaml"
    cfg_path.write_text(yaml.safe_dump(to_dict(tiny_cfg)))
    assert (
        index_job.main(
            ["--images", collection.gallery_dir, "--index", index, "--model", ckpt, "--config", str(cfg_path)]
        )
        == 0
    )
    from roiqa.index import store

    assert "roiqa index: listed" not in capsys.readouterr().err  # stderr is no terminal here: no progress lines
    v = store.open_index(index)
    assert v.manifest["model"]["uri"] == ckpt and v.manifest["embedding_dim"] == 24
    emb = v.embeddings().to_pandas().sort_values(S.URI)
    batch = Decoder(tiny_cfg.preprocess)(read_files({S.URI: np.array(emb[S.URI].tolist(), dtype=object)}))
    ref = Embedder(tiny_cfg.model, ckpt)(batch)[S.EMBEDDING]  # the checkpoint's own config wins (24 channels)
    np.testing.assert_allclose(np.stack(emb[S.EMBEDDING].to_numpy()), ref, atol=1e-5)
    monkeypatch.setenv("ROIQA_PROGRESS", "1")
    assert (
        query_job.main(
            [
                "--index",
                index,
                "--queries",
                collection.queries_uri,
                "--out",
                out,
                "--config",
                str(cfg_path),
                "--no-overlays",
                "--quiet",
            ]
        )
        == 0
    )
    assert "roiqa query: encoded" not in capsys.readouterr().err  # --quiet wins over ROIQA_PROGRESS=1
    summary = open_results(out).summary()
    assert summary["model"]["uri"] == ckpt


def test_bad_arguments_give_clear_errors(tmp_path, config_file, capsys):
    assert (
        index_job.main(["--images", str(tmp_path / "missing"), "--index", str(tmp_path / "i"), "--config", config_file])
        == 2
    )
    assert "missing" in capsys.readouterr().err
    assert (
        query_job.main(
            [
                "--index",
                str(tmp_path / "nothing"),
                "--queries",
                str(tmp_path),
                "--out",
                str(tmp_path / "o"),
                "--config",
                config_file,
            ]
        )
        == 2
    )
    assert "no published index" in capsys.readouterr().err
    bad_cfg = tmp_path / "bad.yaml"
    bad_cfg.write_text("query:\n  top_kk: 3\n")
    assert index_job.main(["--images", str(tmp_path), "--index", str(tmp_path / "i"), "--config", str(bad_cfg)]) == 2
    assert "top_kk" in capsys.readouterr().err


def test_demo_main(tmp_path, config_file, capsys):
    out = str(tmp_path / "demo")
    assert demo.main(["--out", out, "--n-gallery", "12", "--model", "none", "--config", config_file]) == 0
    text = capsys.readouterr().out
    assert "random-init" in text and "UNTRAINED" in text and "mAP" in text
    metrics = json.loads(open(os.path.join(out, "metrics.json")).read())
    assert metrics["index_images"] == 12 and 0 <= metrics["mAP"] <= 1
    run = open_results(os.path.join(out, "query"))
    assert f"{run.folder}/results.parquet" in text and run.results().num_rows > 0
    assert any(f.endswith(".png") for _, _, fs in os.walk(run.uri("heatmaps")) for f in fs)


def test_model_resolution_and_the_shipped_checkpoint():
    """--model: default -> the shipped checkpoint, none/random -> random init; the shipped file loads as float32."""
    import torch

    from roiqa.models.checkpoint import load_matcher, model_config
    from roiqa.weights import SHIPPED, resolve_model

    assert resolve_model("none") is None and resolve_model("Random") is None
    assert resolve_model("s3://bucket/m.safetensors") == "s3://bucket/m.safetensors"
    assert resolve_model(None) == SHIPPED == resolve_model("default")
    assert os.path.getsize(SHIPPED) < 25 * 2**20
    cfg = model_config(SHIPPED, None)
    assert (cfg.backbone, cfg.fpn_channels, tuple(cfg.levels)) == ("efficientnet_lite0", 0, (3, 4, 5))
    model = load_matcher(SHIPPED)
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert not torch.equal(model.whitening.proj, torch.eye(model.dim))  # fitted: the whitening is not the identity
