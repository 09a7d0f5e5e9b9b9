"""The optional seed stages inside the real pipelines: their Parquet columns equal the library run without Ray."""

from __future__ import annotations

import dataclasses
import os

import numpy as np
import pytest
import yaml

from pipelines.index import run_index
from pipelines.query import run_query
from roiqa import schema as S
from roiqa.config import ComplexityConfig, MaskConfig, RefineConfig, VerifyConfig, replace_section, to_dict
from roiqa.index import store
from roiqa.io.sources import read_files
from roiqa.results.output import open_results, read_results
from roiqa.stages.embed import Decoder, Embedder

pytestmark = pytest.mark.usefixtures("ray_local")

PROFILE = "object-instance"


def staged(cfg, patchnet: str | None = None):
    """`cfg` with the index stages on: complexity (32 px cells at this image size, the patch network `patchnet`)
    and applied, adaptive masks."""
    cfg = dataclasses.replace(
        cfg,
        complexity=ComplexityConfig(
            enabled=True, cell=32, min_cell=8, thresholds=(0.2, 0.3), map_size=32, model=patchnet
        ),
        masks=MaskConfig(enabled=True, profiles=(PROFILE,), apply=True, adaptive=True, probe_every=1),
    )
    return replace_section(cfg, "index", batch_size=4, actors=1)


def small_patchnet(path: str) -> str:
    """An untrained, small patch network saved as a checkpoint (the stage loads it like a trained one)."""
    from roiqa.models.patchnet import PatchNet, PatchNetConfig, save_patchnet

    save_patchnet(PatchNet(PatchNetConfig(image_size=128, patch_dim=16, dim=24)), path)
    return path


def decoded(cfg, uris: list[str]) -> dict[str, np.ndarray]:
    return Decoder(cfg.preprocess)(read_files({S.URI: np.array(uris, dtype=object)}))


@pytest.fixture(scope="module")
def staged_index(collection, tiny_cfg, tmp_path_factory):
    folder = tmp_path_factory.mktemp("staged")
    cfg = staged(tiny_cfg, small_patchnet(str(folder / "patchnet.safetensors")))
    index = str(folder / "index")
    return cfg, index, run_index(collection.gallery_dir, index, cfg)


def test_complexity_columns_equal_the_stage_run_directly(collection, staged_index):
    from roiqa.stages.complexity import ComplexityStage

    cfg, index, report = staged_index
    v = store.open_index(index)
    emb = v.embeddings().to_pandas().set_index(S.URI)
    assert report.indexed == len(emb) and report.errors == 0
    uris = sorted(emb.index)
    ref = ComplexityStage(cfg.complexity)(decoded(cfg, uris))
    for i, u in enumerate(uris):
        row = emb.loc[u]
        assert row[S.COMPLEXITY_MEAN] == pytest.approx(ref[S.COMPLEXITY_MEAN][i], abs=1e-5)
        assert row[S.COMPLEXITY_P90] == pytest.approx(ref[S.COMPLEXITY_P90][i], abs=1e-5)
        assert list(row[S.PATCH_LAYOUT]) == list(ref[S.PATCH_LAYOUT][i])
        assert list(row[S.PATCH_COUNTS]) == list(ref[S.PATCH_COUNTS][i])
        # the layout tiles the valid image: leaf areas add up to the cells' area (whole 32 px cells over 96 x 128)
        layout = np.asarray(row[S.PATCH_LAYOUT]).reshape(-1, 3)
        assert int((layout[:, 2] ** 2).sum()) == 96 * 128
        assert bytes(row[S.COMPLEXITY_PNG])[:8] == b"\x89PNG\r\n\x1a\n"
        np.testing.assert_allclose(row[S.PATCH_EMBEDDING], ref[S.PATCH_EMBEDDING][i], atol=1e-5)
        assert len(row[S.PATCH_EMBEDDING]) == 24 and np.linalg.norm(row[S.PATCH_EMBEDDING]) == pytest.approx(1, 1e-4)
    assert v.manifest["stages"]["complexity"]["cell"] == 32


def test_masked_embeddings_and_controller_history(collection, staged_index):
    from roiqa.stages.masks import apply_mask, rle_decode

    cfg, index, _ = staged_index
    v = store.open_index(index)
    emb = v.embeddings().to_pandas().set_index(S.URI)
    cov_c, thr_c, rle_c = S.mask_columns(PROFILE)
    uris = sorted(emb.index)
    batch = decoded(cfg, uris)
    plain = Embedder(cfg.model)
    for i, u in enumerate(uris):
        mask = rle_decode(emb.loc[u, rle_c])
        h, w = batch[S.VALID_HW][i]
        assert mask.shape == batch[S.IMAGE][i].shape[:2] and not mask[h:, :].any() and not mask[:, w:].any()
        assert emb.loc[u, cov_c] == pytest.approx(mask.sum() / (h * w), abs=1e-6)
        # the published embedding is the matcher's descriptor of the masked image, computed here without Ray
        masked = apply_mask(batch[S.IMAGE][i : i + 1], mask[None])
        ref = plain.embed(masked, batch[S.VALID_HW][i : i + 1])[0]
        np.testing.assert_allclose(emb.loc[u, S.EMBEDDING], ref, atol=2e-4)
    hist = store.read_table(v.uri(store.MASKS_CONTROLLER)).to_pandas()
    n_batches = -(-len(uris) // cfg.index.batch_size)
    assert len(hist) >= n_batches and set(hist[S.PROFILE]) == {PROFILE}
    assert hist[S.CONFIDENCE].notna().all()  # probe_every=1: every batch probed
    assert set(np.round(emb[thr_c].unique(), 6)) <= set(np.round(hist[S.THRESHOLD].unique(), 6))
    # the controller's rule between successive batches of one actor: +step while confidence >= target, else -2 step
    profile = v.manifest["stages"]["masks"]["profiles"][0]
    for _, g in hist.sort_values(S.BATCH).groupby(S.ACTOR):
        thr, conf = g[S.THRESHOLD].to_numpy(), g[S.CONFIDENCE].to_numpy()
        for k in range(1, len(g)):
            step = profile["step"] if conf[k - 1] >= cfg.masks.target else -2 * profile["step"]
            expected = min(max(thr[k - 1] + step, profile["min_threshold"]), profile["max_threshold"])
            assert thr[k] == pytest.approx(expected, abs=1e-6)
    assert v.manifest["stages"]["masks"]["final_thresholds"][PROFILE]


def test_bad_inputs_still_land_in_errors_with_stages_on(collection, tiny_cfg, tmp_path):
    import shutil

    folder = tmp_path / "imgs"
    shutil.copytree(collection.gallery_dir, folder)
    (folder / "empty.png").write_bytes(b"")
    (folder / "junk.jpg").write_bytes(b"not an image at all")
    r = run_index(str(folder), str(tmp_path / "index"), staged(tiny_cfg))
    v = store.open_index(str(tmp_path / "index"))
    errs = v.errors().to_pandas()
    assert r.inputs == r.indexed + r.errors and r.errors == 2
    assert sorted(os.path.basename(u) for u in errs[S.URI]) == ["empty.png", "junk.jpg"]
    assert v.embeddings().to_pandas()[S.COMPLEXITY_MEAN].notna().all()


def test_query_with_refinement_and_verification(collection, tiny_cfg, staged_index, tmp_path):
    from roiqa.io.queries import load_queries, query_map
    from roiqa.stages.rerank import Reranker

    _, index, _ = staged_index  # the stages of the index do not change how queries run against it
    cfg = dataclasses.replace(
        tiny_cfg,
        refine=RefineConfig(enabled=True, iterations=3),
        verify=VerifyConfig(enabled=True, weight=0.5),
    )
    cfg = replace_section(cfg, "query", overlays=False)
    out = str(tmp_path / "out")
    run_query(index, collection.queries_uri, out, cfg)
    res = read_results(out)
    reranked = res[res[S.REFINE_STEPS].notna()]
    assert len(reranked) == res[S.SCORE].notna().sum() > 0
    assert reranked[S.VERIFY_PROB].between(0, 1).all() and res.loc[res[S.SCORE].isna(), S.VERIFY_PROB].isna().all()
    summary = open_results(out).summary()
    assert set(summary["stages"]) == {"refine", "verify", "geometry"}
    # the same rows from the reranker called directly, without Ray
    row = reranked.iloc[0]
    qmap = query_map(load_queries(collection.queries_uri))
    rr = Reranker(cfg, qmap)
    direct = rr(
        {
            S.IMAGE_ID: np.array([row[S.IMAGE_ID]], np.int64),
            S.URI: np.array([row[S.URI]], dtype=object),
            S.QUERY_IDS: [[row[S.QUERY_ID]]],
            S.COARSE_SCORES: [[row[S.COARSE_SCORE]]],
        }
    )
    np.testing.assert_allclose([direct[c][0] for c in S.BOX], row[S.BOX].to_numpy(np.float32), atol=1e-3)
    assert direct[S.VERIFY_PROB][0] == pytest.approx(row[S.VERIFY_PROB], abs=1e-5)
    assert direct[S.SCORE][0] == pytest.approx(row[S.SCORE], abs=1e-5)
    assert int(direct[S.REFINE_STEPS][0]) == int(row[S.REFINE_STEPS])


def test_stage_switches_on_the_command_line(collection, tiny_cfg, tmp_path, capsys):
    from jobs import index as index_job
    from jobs import query as query_job

    cfg_path = tmp_path / "tiny.yaml"
    cfg_path.write_text(yaml.safe_dump(to_dict(tiny_cfg)))
    index = str(tmp_path / "index")
    argv = ["--images", collection.gallery_dir, "--index", index, "--model", "none", "--config", str(cfg_path)]
    assert index_job.main([*argv, "--complexity", "--masks"]) == 0
    v = store.open_index(index)
    assert set(v.manifest["stages"]) == {"complexity", "masks"}
    assert {S.COMPLEXITY_MEAN, S.mask_columns(PROFILE)[0]} <= set(v.embeddings().column_names)
    out = str(tmp_path / "out")
    qargv = ["--index", index, "--queries", collection.queries_uri, "--out", out, "--config", str(cfg_path)]
    assert query_job.main([*qargv, "--refine", "--no-verify", "--no-overlays"]) == 0
    res = read_results(out)
    assert res[S.REFINE_STEPS].notna().any() and res[S.VERIFY_PROB].isna().all()
