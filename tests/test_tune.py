"""`roiqa tune` end to end on a tiny model: PBT, PB2 and ASHA + Optuna sweeps, their outputs, and Tuner.restore."""

from __future__ import annotations

import glob
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pandas as pd
import pytest
import yaml
from PIL import Image

from roiqa import schema as S
from roiqa.config import ModelConfig, RoiqaConfig, TrainConfig, load_config, to_dict
from roiqa.index import store
from roiqa.train.tune_space import apply_overrides, load_search_space

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SPACE = os.path.join(ROOT, "jobs", "configs", "tune-space.yaml")


def tiny(epochs: int) -> RoiqaConfig:
    train = TrainConfig(
        epochs=epochs, steps_per_epoch=1, batch_size=2, image_size=96, query_size=48, object_scale=(24.0, 48.0)
    )
    return RoiqaConfig(model=ModelConfig(backbone="resnet18", backbone_weights=None, fpn_channels=32), train=train)


def config_file(tmp_path, epochs: int) -> str:
    path = tmp_path / f"tiny{epochs}.yaml"
    path.write_text(yaml.safe_dump(to_dict(tiny(epochs))))
    return str(path)


def argv(out: str, cfg_path: str, *extra: str) -> list[str]:
    return ["--images", "bundled", "--out", out, "--config", cfg_path, "--val-triples", "2", *extra]


def reference_best(trials: pd.DataFrame) -> pd.Series:
    """The best trial's last row, recomputed from the table: max objective of each trial's last report."""
    last = trials.sort_values(S.ITERATION).groupby(S.TRIAL_ID).tail(1)
    return last.sort_values([S.OBJECTIVE, S.TRIAL_ID], ascending=[False, True]).iloc[0]


@pytest.fixture(scope="module")
def ray_tune():
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=True, logging_level="warning")
    yield
    ray.shutdown()


def test_pbt_sweep_writes_trials_best_config_checkpoint_and_plots(tmp_path, ray_tune, capsys):
    from jobs import tune as tune_job
    from roiqa.models.checkpoint import load_matcher

    out = str(tmp_path / "out")
    assert tune_job.main([*argv(out, config_file(tmp_path, 2)), "--samples", "2", "--scheduler", "pbt"]) == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    trials = store.read_table(os.path.join(out, "trials.parquet")).to_pandas()
    space = load_search_space(SPACE)
    assert trials[S.TRIAL_ID].nunique() == 2 and printed["trials"] == 2
    for _, g in trials.groupby(S.TRIAL_ID):
        assert sorted(g[S.ITERATION]) == [1, 2] and set(g[S.STATUS]) == {"COMPLETE"}
        assert g[[S.OBJECTIVE, S.VAL_MAP, S.VAL_LOC50_REFINED]].notna().all().all()
    # the objective is the weighted sum of the reported metrics (weights from the space's YAML)
    expected = sum(w * trials[m] for m, w in space.objective.items())
    np.testing.assert_allclose(trials[S.OBJECTIVE], expected, rtol=1e-5)
    # the parameter columns and the JSON config agree, and every value lies in its range
    for _, row in trials.iterrows():
        params = json.loads(row[S.TRIAL_CONFIG])
        for p in space.params:
            assert row[S.param_column(p.key)] == pytest.approx(params[p.key])
            assert p.low - 1e-12 <= params[p.key] <= p.high + 1e-12
    # one trial started from the config's own values (the reference the sweep is compared with)
    summary = json.loads(open(os.path.join(out, "summary.json")).read())
    first = trials.sort_values(S.ITERATION).groupby(S.TRIAL_ID).head(1)
    default = summary["default_trial"]
    assert default is not None
    row = first[first[S.TRIAL_ID] == default["trial_id"]].iloc[0]
    assert row[S.param_column("train.lr")] == pytest.approx(tiny(2).train.lr)
    # best.yaml is the best trial's config (by the objective of its last report) and loads as a roiqa config
    best = reference_best(trials)
    assert printed["best_trial"] == best[S.TRIAL_ID] and summary["best"]["trial_id"] == best[S.TRIAL_ID]
    loaded = load_config(os.path.join(out, "best.yaml"))
    assert loaded == apply_overrides(tiny(2), json.loads(best[S.TRIAL_CONFIG]))
    # best/ holds that trial's last checkpoint: the matcher loads from it and equals Tune's own copy
    ckpt_dirs = sorted(glob.glob(os.path.join(out, "ray", "tune", f"*{best[S.TRIAL_ID]}*", "checkpoint_*")))
    with open(os.path.join(ckpt_dirs[-1], "model.safetensors"), "rb") as f:
        assert open(os.path.join(out, "best", "model.safetensors"), "rb").read() == f.read()
    assert load_matcher(os.path.join(out, "best", "model.safetensors")).cfg.fpn_channels == 32
    for name in ("curves_objective.png", "curves_val_map.png", "schedule_refine_rate.png", "schedule_train_lr.png"):
        with Image.open(os.path.join(out, name)) as im:
            assert im.size[0] >= 400 and np.asarray(im.convert("L")).min() < 128
    assert len(open(os.path.join(out, "trials.md")).read().strip().splitlines()) == 2 + 2


@pytest.mark.slow
@pytest.mark.parametrize("scheduler,search", [("pb2", "random"), ("asha", "optuna")])
def test_pb2_and_asha_optuna_sweeps_run(tmp_path, ray_tune, scheduler, search):
    from jobs import tune as tune_job

    out = str(tmp_path / "out")
    extra = ["--samples", "2", "--scheduler", scheduler, "--search", search]
    assert tune_job.main([*argv(out, config_file(tmp_path, 2)), *extra]) == 0
    trials = store.read_table(os.path.join(out, "trials.parquet")).to_pandas()
    assert trials[S.TRIAL_ID].nunique() == 2 and trials[S.OBJECTIVE].notna().all()
    summary = json.loads(open(os.path.join(out, "summary.json")).read())
    assert summary["scheduler"] == scheduler and summary["search"] == search


def test_bad_arguments_name_the_input(tmp_path, capsys):
    from jobs import tune as tune_job

    cfg_path = config_file(tmp_path, 2)
    out = str(tmp_path / "out")
    assert tune_job.main([*argv(out, cfg_path), "--scheduler", "hyperband"]) == 2
    assert "--scheduler" in capsys.readouterr().err
    assert tune_job.main([*argv(out, cfg_path), "--scheduler", "pbt", "--search", "optuna"]) == 2
    assert "optuna" in capsys.readouterr().err
    bad = tmp_path / "space.yaml"
    bad.write_text("train.nope: {uniform: [0.0, 1.0]}\nobjective: {val_map: 1.0}\n")
    assert tune_job.main([*argv(out, cfg_path), "--space", str(bad)]) == 2
    assert "train.nope" in capsys.readouterr().err
    assert tune_job.main([*argv(str(tmp_path / "none"), cfg_path), "--resume"]) == 2
    assert "no Tune experiment" in capsys.readouterr().err


def test_interrupted_sweep_resumes_from_checkpoints(tmp_path, ray_tune):
    """Ctrl+C (SIGINT) a sweep once a trial has checkpointed; `--resume` restores it with Tuner.restore and every
    trial finishes (or is stopped by ASHA) with each epoch reported once, restored trials from their checkpoints."""
    from jobs import tune as tune_job

    out = str(tmp_path / "out")
    args = [*argv(out, config_file(tmp_path, 3)), "--samples", "2", "--scheduler", "asha"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "jobs.tune", *args], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.time() + 300
    # the second epoch's checkpoint on disk: by then Tune's experiment state records the first one
    while not glob.glob(os.path.join(out, "ray", "tune", "*", "checkpoint_000001")):
        assert time.time() < deadline and proc.poll() is None, "the sweep ended or stalled before a checkpoint"
        time.sleep(0.5)
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=180) in (0, 130)  # Tune saves its state and stops (130: Ctrl+C outside Tune's loop)
    partial = os.path.join(out, "trials.parquet")
    if os.path.exists(partial):  # written when some trial had reported before the interruption
        assert (store.read_table(partial).to_pandas()[S.STATUS] != "COMPLETE").any()
    dirs = glob.glob(os.path.join(out, "ray", "tune", "run_trial_*"))  # run_trial_<experiment>_<n>_<i>_...
    ids = {"_".join(os.path.basename(d).split("_")[2:4]) for d in dirs}

    assert tune_job.main([*args, "--resume"]) == 0
    after = store.read_table(os.path.join(out, "trials.parquet")).to_pandas()
    assert set(after[S.TRIAL_ID]) <= ids  # the trials of the interrupted run, none started anew
    for _, g in after.groupby(S.TRIAL_ID):
        its = sorted(g[S.ITERATION])
        assert its == list(range(1, len(its) + 1))  # every epoch once, no gaps
    assert (after[S.RESUMED_FROM] >= 1).any()  # restored from a checkpoint, not retrained from scratch
    assert (after.groupby(S.TRIAL_ID)[S.ITERATION].max() == 3).any()  # at least one trial ran every epoch
