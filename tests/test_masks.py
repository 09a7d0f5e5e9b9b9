"""Seed 002 dynamic masks: controller, RLE, threshold masks, task profiles, the shipped profile, Embedder columns."""

from __future__ import annotations

import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from roiqa import errors as row_errors
from roiqa import schema as S
from roiqa.config import MaskConfig, ModelConfig, TrainConfig
from roiqa.io.imageio import encode_png
from roiqa.io.sources import object_array
from roiqa.stages import masks as M
from roiqa.stages.embed import Embedder, probe_confidence
from roiqa.train import profile as PT

torch.set_num_threads(1)


# --- controller -----------------------------------------------------------------------------------------------


def test_controller_step_drop_response():
    c = M.ThresholdController(threshold=0.5, min_threshold=0.5, max_threshold=0.8, step=0.02, target=0.9)
    got = [c.update(0.95) for _ in range(10)] + [c.update(0.6) for _ in range(10)]
    rise = [0.52, 0.54, 0.56, 0.58, 0.60, 0.62, 0.64, 0.66, 0.68, 0.70]  # +step per batch at/above target
    fall = [0.66, 0.62, 0.58, 0.54, 0.50, 0.50, 0.50, 0.50, 0.50, 0.50]  # -2 step per batch below it, floor 0.5
    assert got == pytest.approx(rise + fall, abs=1e-9)
    assert c.batches == 20
    assert [h[0] for h in c.history] == list(range(1, 21))
    assert [h[1] for h in c.history] == [0.95] * 10 + [0.6] * 10
    assert [h[2] for h in c.history] == pytest.approx([0.5] + rise + fall[:-1], abs=1e-9)  # measured-at threshold


def test_controller_clamps_and_ignores_nan():
    c = M.ThresholdController(threshold=0.79, min_threshold=0.1, max_threshold=0.8, step=0.02, target=0.5)
    assert c.update(1.0) == pytest.approx(0.8)
    assert c.update(0.5) == pytest.approx(0.8)  # confidence == target counts as good: stays at the cap
    assert c.update(float("nan")) == pytest.approx(0.8) and c.batches == 2
    for _ in range(30):
        c.update(0.0)
    assert c.threshold == pytest.approx(0.1)
    assert M.ThresholdController(2.0, 0.1, 0.8, 0.02, 0.5).threshold == 0.8  # initial value clamped too
    with pytest.raises(ValueError):
        M.ThresholdController(0.5, 0.9, 0.1, 0.02, 0.5)


def test_controller_state_round_trip():
    c = M.ThresholdController(0.3, 0.0, 0.6, 0.01, 0.9)
    for v in (0.95, 0.97, 0.5, 0.92):
        c.update(v)
    state = json.loads(json.dumps(c.state_dict()))
    d = M.ThresholdController.from_state(state)
    assert d.state_dict() == c.state_dict()
    assert d.update(0.1) == c.update(0.1)


# --- masks and RLE --------------------------------------------------------------------------------------------


def naive_rle(mask: np.ndarray) -> str:
    runs, cur, n = [], False, 0
    for v in mask.ravel():
        if bool(v) != cur:
            runs.append(n)
            cur, n = bool(v), 0
        n += 1
    runs.append(n)
    return " ".join(str(x) for x in (*mask.shape, *runs))


def test_rle_worked_example_and_edges():
    assert M.rle_encode(np.array([[0, 1, 1], [1, 0, 0]], bool)) == "2 3 1 3 2"
    assert M.rle_encode(np.ones((2, 2), bool)) == "2 2 0 4"
    assert M.rle_encode(np.zeros((2, 2), bool)) == "2 2 4"
    assert M.rle_encode(np.ones((1, 1), bool)) == "1 1 0 1"
    assert M.rle_encode(np.zeros((1, 1), bool)) == "1 1 1"
    for m in (np.ones((2, 2), bool), np.zeros((2, 2), bool), np.ones((1, 1), bool), np.zeros((1, 1), bool)):
        np.testing.assert_array_equal(M.rle_decode(M.rle_encode(m)), m)
    for bad in ("", "2 2", "2 2 3", "2 2 -1 5", "a b c"):
        with pytest.raises(ValueError, match="rle_decode"):
            M.rle_decode(bad)


def test_rle_round_trip_random():
    rng = np.random.default_rng(0)
    for _ in range(50):
        h, w = (int(v) for v in rng.integers(1, 20, size=2))
        m = rng.random((h, w)) < rng.random()
        text = M.rle_encode(m)
        assert text == naive_rle(m)
        out = M.rle_decode(text)
        assert out.dtype == bool
        np.testing.assert_array_equal(out, m)


def test_threshold_mask_matches_loop_and_valid_rule():
    rng = np.random.default_rng(1)
    conf = rng.random((3, 7, 9)).astype(np.float32)
    conf[0, 0, 0] = 0.4  # exactly at the threshold: not kept
    valid = np.array([[7, 9], [3, 5], [0, 4]], np.int32)
    got = M.threshold_mask(conf, 0.4, valid)
    ref = np.zeros_like(got)
    for b in range(3):
        for y in range(7):
            for x in range(9):
                ref[b, y, x] = conf[b, y, x] > 0.4 and y < valid[b, 0] and x < valid[b, 1]
    np.testing.assert_array_equal(got, ref)
    assert not got[2].any() and not got[1, 3:].any() and not got[1, :, 5:].any()
    np.testing.assert_array_equal(M.threshold_mask(conf[1], 0.4, valid[1]), ref[1])
    np.testing.assert_array_equal(M.threshold_mask(conf, 0.4), conf > 0.4)
    cov = M.coverage(got, valid)
    assert cov[0] == pytest.approx(ref[0].sum() / 63) and cov[1] == pytest.approx(ref[1].sum() / 15)
    assert np.isnan(cov[2])
    images = rng.integers(1, 256, (3, 7, 9, 3)).astype(np.uint8)
    out = M.apply_mask(images, got)
    assert (out[~got] == 0).all() and (out[got] == images[got]).all() and (images > 0).all()


# --- profiles -------------------------------------------------------------------------------------------------


def random_profile(tmp_path, threshold: float = 0.12, **kw) -> str:
    """A profile file with a seeded, untrained estimator (confidence ~ sigmoid(-2) ~ 0.12 everywhere)."""
    torch.manual_seed(0)
    est = M.ConfidenceEstimator()
    with torch.no_grad():
        for p in est.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    prof = M.TaskProfile(name=kw.pop("name", "test-profile"), threshold=threshold, step=0.01, **kw)
    uri = str(tmp_path / f"{prof.name}.safetensors")
    M.save_profile(prof, est, uri)
    return uri


def test_profile_round_trip_and_errors(tmp_path):
    torch.manual_seed(3)
    est = M.ConfidenceEstimator().eval()
    prof = M.TaskProfile("round-trip", 2, "desc", 0.3, 0.1, 0.6, 0.05, "nothing")
    uri = str(tmp_path / "p.safetensors")
    M.save_profile(prof, est, uri)
    got, est2 = M.load_profile("file://" + uri)
    assert got == prof
    x = np.random.default_rng(0).integers(0, 256, (2, 40, 56, 3)).astype(np.uint8)
    with torch.no_grad():
        y = est(x)
        assert torch.equal(y, est2(x))
    assert y.shape == (2, 40, 56) and 0 <= float(y.min()) and float(y.max()) <= 1
    with pytest.raises(ValueError, match="unknown task profile 'no-such-profile'"):
        M.load_profile("no-such-profile")
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x00" * 4)
    with pytest.raises(ValueError, match="bad.safetensors"):
        M.load_profile(str(bad))
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(2)}, str(tmp_path / "plain.safetensors"))
    with pytest.raises(ValueError, match="plain.safetensors.*not a task profile"):
        M.load_profile(str(tmp_path / "plain.safetensors"))
    with pytest.raises(FileNotFoundError, match="missing.safetensors"):
        M.load_profile(str(tmp_path / "missing.safetensors"))
    with pytest.raises(ValueError, match="threshold"):
        M.TaskProfile("x", threshold=0.9, max_threshold=0.5)


def test_shipped_profile_separates_box_from_background():
    from roiqa.eval.demo_data import EVAL_PHOTOS, load_photo
    from roiqa.train.data import sample_stream

    prof, est = M.load_profile("object-instance")
    assert prof.name == "object-instance" and prof.min_threshold <= prof.threshold <= prof.max_threshold
    assert os.path.getsize(M.profile_uri("object-instance")) < 1 << 20
    it = sample_stream([load_photo(n) for n in EVAL_PHOTOS], TrainConfig(), seed=7)  # photos never trained on
    samples = [next(it) for _ in range(6)]
    with torch.no_grad():
        conf = est(np.stack([s["image"] for s in samples])).numpy()
    inside = np.stack([PT.box_mask(s["box"], *conf.shape[1:]) for s in samples]) > 0
    assert conf[inside].mean() > 2 * conf[~inside].mean()


def test_mask_curve_matches_threshold_mask():
    torch.manual_seed(1)
    est = M.ConfidenceEstimator().eval()
    rng = np.random.default_rng(2)
    samples = [{"image": rng.integers(0, 256, (32, 32, 3)).astype(np.uint8), "box": np.array([3, 4, 20, 30])}]
    samples.append({"image": samples[0]["image"][::-1].copy(), "box": np.array([[0, 0, 8, 8], [16, 16, 32, 24]])})
    with torch.no_grad():
        conf = est(np.stack([s["image"] for s in samples])).numpy()
    ts = [float(np.quantile(conf, q)) for q in (0.2, 0.5, 0.9)]
    curve = PT.mask_curve(est, samples, np.array(ts), batch_size=1)
    target = np.stack([PT.box_mask(s["box"], 32, 32) for s in samples]) > 0
    assert target[1, 16:24, 16:32].all() and target[1].sum() == 64 + 128
    for j, t in enumerate(ts):
        m = M.threshold_mask(conf, t)
        tp, fp, fn = (m & target).sum(), (m & ~target).sum(), (~m & target).sum()
        assert curve["iou"][j] == pytest.approx(tp / (tp + fp + fn))
        assert curve["precision"][j] == pytest.approx(tp / (tp + fp))
        assert curve["recall"][j] == pytest.approx(tp / (tp + fn))
        assert curve["coverage"][j] == pytest.approx(m.mean())
    assert curve["mean_conf_inside"][0] == pytest.approx(conf[target].mean(), rel=1e-5)


def test_profile_job_smoke(tmp_path):
    from jobs.profile import main

    # a tiny manifest: 3 images, instance "a" in two of them (boxes), "b" in the third
    rng = np.random.default_rng(0)
    uris = []
    for i in range(3):
        path = tmp_path / f"img{i}.png"
        path.write_bytes(encode_png(rng.integers(0, 256, (60, 80, 3)).astype(np.uint8)))
        uris.append(str(path))
    table = pa.table(
        {
            "uri": uris,
            "instance_id": ["a", "a", "b"],
            "x0": [1.0, 5.0, 10.0],
            "y0": [2.0, 5.0, 10.0],
            "x1": [30.0, 40.0, 50.0],
            "y1": [20.0, 30.0, 40.0],
        }
    )
    pq.write_table(table, str(tmp_path / "m.parquet"))
    splits = {}
    for held in (True, False):
        it = PT.manifest_samples(table, 64, 10**6, seed=0, holdout=held)
        splits[held] = {s["image"].tobytes(): s["box"].shape for s in (next(it) for _ in range(12))}
    assert len(splits[True]) == 1 and len(splits[False]) == 2 and not set(splits[True]) & set(splits[False])
    assert set(splits[True].values()) | set(splits[False].values()) == {(1, 4)}  # each image has one box
    out = str(tmp_path / "out" / "p.safetensors")
    args = ["--out", out, "--steps", "2", "--batch-size", "2", "--image-size", "64", "--eval-samples", "2"]
    assert main(args + ["--manifest", str(tmp_path / "m.parquet"), "--images", "bundled", "--name", "tiny"]) == 0
    prof, _ = M.load_profile(out)
    log = json.loads((tmp_path / "out" / "p.train_log.json").read_text())
    assert prof.name == "tiny" and len(log["loss"]) == 2
    assert set(log["curves"]) == {"training", "held_out", "eval_photos"}
    assert main(["--out", out, "--holdout", "nope", "--steps", "1"]) == 2


# --- Embedder -------------------------------------------------------------------------------------------------

MODEL = ModelConfig(backbone="resnet18", backbone_weights=None, fpn_channels=32)


def batch_of(n: int = 3, size: int = 64, error_row: int | None = None) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(5)
    images = rng.integers(0, 256, (n, size, size, 3)).astype(np.uint8)
    valid = np.array([[size, size - 16 * (i % 2)] for i in range(n)], np.int32)
    for i, (h, w) in enumerate(valid):
        images[i, h:], images[i, :, w:] = 0, 0
    errors = [None if i != error_row else row_errors.RowError("decode", "corrupt", "boom") for i in range(n)]
    return {
        S.URI: object_array([f"img{i}.png" for i in range(n)]),
        S.IMAGE: images,
        S.VALID_HW: valid,
        S.SCALE: np.ones(n, np.float32),
        **row_errors.columns(errors),
    }


@pytest.fixture(scope="module")
def embedder_off():
    return Embedder(MODEL, device="cpu")


def test_embedder_masks_off_unchanged(embedder_off):
    batch = batch_of()
    ref_keys = {S.URI, *row_errors.COLUMNS, S.EMBEDDING, S.REGIONS_Q8}
    out = embedder_off(dict(batch))
    assert set(out) == ref_keys
    np.testing.assert_array_equal(out[S.EMBEDDING], embedder_off.embed(batch[S.IMAGE], batch[S.VALID_HW]))
    off = Embedder(MODEL, device="cpu", masks=MaskConfig(enabled=False))
    out2 = off(dict(batch))
    assert set(out2) == ref_keys and off.controller_state() == {}
    np.testing.assert_array_equal(out2[S.EMBEDDING], out[S.EMBEDDING])


def test_embedder_mask_columns(tmp_path, embedder_off):
    uri = random_profile(tmp_path, threshold=0.12)
    e = Embedder(MODEL, device="cpu", masks=MaskConfig(enabled=True, profiles=(uri,)))
    batch = batch_of()
    out = e(dict(batch))
    cov_c, thr_c, rle_c = S.mask_columns("test-profile")
    extra = {cov_c, thr_c, rle_c, S.MASK_PROBE, S.ACTOR, S.BATCH}
    assert set(out) == {S.URI, *row_errors.COLUMNS, S.EMBEDDING, S.REGIONS_Q8, *extra}
    assert out[cov_c].dtype == np.float32 and out[thr_c].dtype == np.float32 and out[rle_c].dtype == object
    np.testing.assert_array_equal(out[S.EMBEDDING], embedder_off(dict(batch))[S.EMBEDDING])  # apply is off
    assert np.isnan(out[S.MASK_PROBE]).all() and (out[thr_c] == np.float32(0.12)).all()
    for i, (h, w) in enumerate(batch[S.VALID_HW]):
        m = M.rle_decode(out[rle_c][i])
        assert m.shape == (64, 64) and not m[h:].any() and not m[:, w:].any()
        assert out[cov_c][i] == pytest.approx(m.sum() / (h * w))
    assert 0 < out[cov_c].min() and out[cov_c].max() < 1  # the map is cut somewhere inside every image


def test_embedder_apply_adaptive_moves_controller(tmp_path):
    uri = random_profile(tmp_path, threshold=0.12)
    cfg = MaskConfig(enabled=True, profiles=(uri,), apply=True, adaptive=True, target=-1.0, probe_every=2)
    e = Embedder(MODEL, device="cpu", masks=cfg)
    batch = batch_of()
    out1 = e(dict(batch))
    mask = M.threshold_mask(e.masker.confidence("test-profile", batch[S.IMAGE]), 0.12, batch[S.VALID_HW])
    masked = e.embed(M.apply_mask(batch[S.IMAGE], mask), batch[S.VALID_HW])
    full = e.embed(batch[S.IMAGE], batch[S.VALID_HW])
    np.testing.assert_allclose(out1[S.EMBEDDING], masked, atol=1e-6)
    assert np.abs(out1[S.EMBEDDING] - full).max() > 1e-3  # the masked image embeds differently
    assert (out1[S.MASK_PROBE] == np.float32(probe_confidence(masked, full))).all()
    state = e.controller_state()["test-profile"]
    assert state["threshold"] == pytest.approx(0.13) and state["batches"] == 1  # confidence >= target: +step
    out2 = e(dict(batch))
    assert (out1[S.BATCH] == 1).all() and (out2[S.BATCH] == 2).all() and out2[S.ACTOR][0] == out1[S.ACTOR][0]
    assert np.isnan(out2[S.MASK_PROBE]).all()  # probe_every=2: no probe on the second batch
    assert e.controller_state()["test-profile"]["batches"] == 1
    assert out2[S.mask_columns("test-profile")[1]][0] == np.float32(0.13)
    e(dict(batch))
    assert e.controller_state()["test-profile"]["threshold"] == pytest.approx(0.14)


def test_embedder_error_row_passes_through(tmp_path):
    uri = random_profile(tmp_path, threshold=0.12)
    e = Embedder(MODEL, device="cpu", masks=MaskConfig(enabled=True, profiles=(uri,), apply=True))
    out = e(dict(batch_of(error_row=1)))
    cov_c, thr_c, rle_c = S.mask_columns("test-profile")
    assert row_errors.read(out)[1] == row_errors.RowError("decode", "corrupt", "boom")
    assert not out[S.EMBEDDING][1].any()
    assert np.isnan(out[cov_c][1]) and np.isnan(out[thr_c][1]) and out[rle_c][1] == ""
    assert np.isfinite(out[cov_c][[0, 2]]).all() and all(out[rle_c][[0, 2]])
    assert np.isfinite(out[S.MASK_PROBE]).all()  # the batch's probe is reported on every row


def test_probe_confidence_is_self_retrieval_in_the_batch():
    full = np.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]], np.float32)
    # masked 0 stays nearest its own image; masked 1 drifts towards image 2; masked 2 is only rescaled
    masked = np.array([[0.9, 0.1, 0.0], [0.0, 0.4, 0.6], [0.0, 0.0, 5.0]], np.float32)
    assert probe_confidence(masked, full) == pytest.approx(2 / 3)
    assert probe_confidence(full, full) == 1.0
    assert probe_confidence(masked[:1], full[:1]) == 1.0  # one image: cosine 0.994 > 0.5
    assert probe_confidence(-full[:1], full[:1]) == 0.0
