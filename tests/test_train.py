"""Ray Train: two CPU workers, per-epoch checkpoints, a killed worker resumed from its checkpoint, --resume, S3."""

from __future__ import annotations

import json
import os
import signal
import threading
import time

import numpy as np
import pytest
import torch

from roiqa.config import ModelConfig, RoiqaConfig, TrainConfig

CFG = RoiqaConfig(
    model=ModelConfig(fpn_channels=32),
    train=TrainConfig(
        epochs=4, steps_per_epoch=3, batch_size=2, image_size=96, query_size=48, object_scale=(24.0, 48.0)
    ),
)


@pytest.fixture(scope="module")
def ray_train(s3_server):
    """Ray with its dashboard (Ray Train's controller queries the State API through it)."""
    import ray

    ray.init(num_cpus=2, include_dashboard=True, logging_level="warning")
    yield
    ray.shutdown()


def _epochs(history: list[dict]) -> list[int]:
    return [h["epoch"] for h in history if "event" not in h]


def _kill_a_worker_after_first_checkpoint(run_dir: str, done: threading.Event, killed: list) -> None:
    """SIGKILL one Ray Train worker process as soon as the first checkpoint is on disk."""
    from ray.util.state import list_actors

    while not done.is_set():
        if os.path.isdir(run_dir) and any(n.startswith("checkpoint_") for n in os.listdir(run_dir)):
            workers = list_actors(filters=[("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")])
            if workers:
                pid = int(workers[-1]["pid"])
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
                return
        time.sleep(0.1)


@pytest.mark.slow
def test_two_workers_killed_worker_resumes_from_checkpoint(ray_train, tmp_path):
    from pipelines.train import run_train
    from roiqa.models.checkpoint import load_matcher

    out = str(tmp_path / "run")
    done, killed = threading.Event(), []
    killer = threading.Thread(
        target=_kill_a_worker_after_first_checkpoint, args=(os.path.join(out, "train"), done, killed), daemon=True
    )
    killer.start()
    try:
        report = run_train(out, CFG, images="bundled", workers=2, max_failures=2)
    finally:
        done.set()
        killer.join(timeout=5)
    assert killed, "no worker was killed (training ended before the first checkpoint was seen)"
    resumed = [h for h in report.history if h.get("event") == "resumed"]
    assert resumed, "the worker group did not restart from a checkpoint"
    # Every epoch exactly once: the restarted group continued after the checkpointed epoch instead of starting over.
    assert _epochs(report.history) == list(range(CFG.train.epochs))
    assert resumed[0]["from_epoch"] < CFG.train.epochs - 1
    assert report.epochs == CFG.train.epochs
    last = report.history[-1]
    for key in ("loss", "nce", "dense", "trip", "scale", "val_map", "val_loc50"):
        assert np.isfinite(last[key]), key
    model = load_matcher(report.model)
    assert model.cfg.fpn_channels == 32
    with open(os.path.join(out, "train_history.json")) as f:
        assert json.load(f) == report.history


@pytest.mark.slow
def test_resume_continues_a_run_on_s3(ray_train, s3_server):
    import s3fs

    from pipelines.train import load_state, run_train
    from roiqa.models.checkpoint import load_matcher
    from roiqa.models.matcher import Matcher

    s3fs.S3FileSystem(client_kwargs={"endpoint_url": s3_server}).mkdir("train-bucket")
    out = "s3://train-bucket/runs/a"
    one = RoiqaConfig(model=CFG.model, train=TrainConfig(**{**CFG.train.__dict__, "epochs": 1}))
    first = run_train(out, one, images="bundled", workers=2)
    assert _epochs(first.history) == [0]
    with pytest.raises(ValueError, match="--resume"):
        run_train(out, one, images="bundled", workers=2)
    two = RoiqaConfig(model=CFG.model, train=TrainConfig(**{**CFG.train.__dict__, "epochs": 2}))
    second = run_train(out, two, images="bundled", workers=2, resume=True)
    assert _epochs(second.history) == [0, 1]
    assert [h["from_epoch"] for h in second.history if h.get("event") == "resumed"][:1] == [0]
    # The published model differs from the first run's: training went on from its weights.
    a, b = load_matcher(first.model).state_dict(), load_matcher(second.model).state_dict()
    assert any(not torch.equal(a[k], b[k]) for k in a)
    # A checkpoint directory restores model and optimizer without unpickling anything.
    import s3fs as _s3fs

    fs = _s3fs.S3FileSystem(client_kwargs={"endpoint_url": s3_server})
    ckpts = sorted(p for p in fs.ls("train-bucket/runs/a/train") if "checkpoint_" in p)
    assert ckpts
    local = os.path.join(os.environ.get("TMPDIR", "/tmp"), f"ckpt-{os.getpid()}")
    fs.get(ckpts[-1], local, recursive=True)
    model = Matcher(CFG.model)
    opt = torch.optim.AdamW(model.parameters())
    state = load_state(local, model, opt)
    assert state["epoch"] == 1 and len(opt.state) > 0


def test_bad_sources_are_clear_errors(tmp_path):
    from pipelines.train import run_train

    with pytest.raises(ValueError, match="exactly one"):
        run_train(str(tmp_path), CFG)
    with pytest.raises(ValueError, match="workers"):
        run_train(str(tmp_path), CFG, images="bundled", workers=0)
