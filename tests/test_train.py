"""Ray Train: two CPU workers, per-epoch checkpoints, --resume, S3. (A worker node lost mid-training and the run
resumed from its checkpoint: tests/test_faults.py.)"""

from __future__ import annotations

import os

import pytest
import torch

from roiqa.config import ModelConfig, RoiqaConfig, TrainConfig

CFG = RoiqaConfig(
    model=ModelConfig(backbone="resnet18", backbone_weights=None, fpn_channels=32),
    train=TrainConfig(
        epochs=4, steps_per_epoch=3, batch_size=2, image_size=96, query_size=48, object_scale=(24.0, 48.0)
    ),
)


@pytest.fixture(scope="module")
def ray_train(s3_server):
    """Ray with its dashboard (Ray Train's controller queries the State API through it)."""
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=True, logging_level="warning")
    yield
    ray.shutdown()


def _epochs(history: list[dict]) -> list[int]:
    return [h["epoch"] for h in history if "event" not in h]


@pytest.mark.slow
def test_resume_continues_a_run_on_s3(ray_train, s3_server):
    import s3fs

    from pipelines.train import run_train
    from roiqa.models.checkpoint import load_matcher

    s3fs.S3FileSystem(client_kwargs={"endpoint_url": s3_server}).mkdir("train-bucket")
    out = "s3://train-bucket/runs/a"
    one = RoiqaConfig(model=CFG.model, train=TrainConfig(**{**CFG.train.__dict__, "epochs": 1}))
    first = run_train(out, one, images="bundled", workers=2)
    assert _epochs(first.history) == [0]
    a = load_matcher(first.model).state_dict()  # read now: the second run writes the same URI
    with pytest.raises(ValueError, match="--resume"):
        run_train(out, one, images="bundled", workers=2)
    two = RoiqaConfig(model=CFG.model, train=TrainConfig(**{**CFG.train.__dict__, "epochs": 2}))
    second = run_train(out, two, images="bundled", workers=2, resume=True)
    assert _epochs(second.history) == [0, 1]
    assert [h["from_epoch"] for h in second.history if h.get("event") == "resumed"][:1] == [0]
    # The published model differs from the first run's: training went on from its weights.
    b = load_matcher(second.model).state_dict()
    assert any(not torch.equal(a[k], b[k]) for k in a)
    # The checkpoints on S3 hold only safetensors and JSON (restoring them above unpickled nothing).
    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": s3_server})
    names = {os.path.basename(p) for p in fs.find("train-bucket/runs/a/train") if "checkpoint_" in p}
    assert {"model.safetensors", "optimizer.safetensors", "state.json"} <= names, names
    assert not {n for n in names if n.endswith((".pkl", ".pt", ".pth"))}


def test_bad_sources_are_clear_errors(tmp_path):
    from pipelines.train import run_train

    with pytest.raises(ValueError, match="exactly one"):
        run_train(str(tmp_path), CFG)
    with pytest.raises(ValueError, match="workers"):
        run_train(str(tmp_path), CFG, images="bundled", workers=0)


def test_checkpoint_state_round_trip(tmp_path):
    """save_state / load_state restore weights and AdamW moments exactly, from safetensors and JSON only."""
    from roiqa.models.matcher import Matcher
    from roiqa.train.matcher import load_state, save_state

    model = Matcher(CFG.model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model.head.fc2.bias.sum().backward()
    opt.step()
    save_state(str(tmp_path), model, opt, {"epoch": 3, "history": [{"epoch": 3, "loss": 1.5}]})
    assert sorted(os.listdir(tmp_path)) == ["model.safetensors", "optimizer.safetensors", "state.json"]
    fresh = Matcher(ModelConfig(backbone="resnet18", backbone_weights=None, fpn_channels=32, seed=9))
    fresh_opt = torch.optim.AdamW(fresh.parameters(), lr=1e-3)
    state = load_state(str(tmp_path), fresh, fresh_opt)
    assert state == {"epoch": 3, "history": [{"epoch": 3, "loss": 1.5}]}
    for (k, a), b in zip(model.state_dict().items(), fresh.state_dict().values(), strict=True):
        assert torch.equal(a, b), k
    p_old, p_new = model.head.fc2.bias, fresh.head.fc2.bias
    for key in ("exp_avg", "exp_avg_sq", "step"):
        assert torch.equal(torch.as_tensor(opt.state[p_old][key]).float(), fresh_opt.state[p_new][key].float()), key


def test_published_model_leaves_out_a_frozen_packaged_body(tmp_path):
    """A run that kept a packaged body frozen publishes only what it trained; the file loads to the same weights.
    A body that trained, or one from a random initialisation, is stored."""
    import dataclasses

    from pipelines.train import publish_model
    from roiqa.models.checkpoint import load_matcher, save_matcher
    from roiqa.models.matcher import Matcher

    init = str(tmp_path / "init.safetensors")
    save_matcher(Matcher(ModelConfig()), init, include_body=False)
    trained = load_matcher(init)  # what a worker's checkpoint gives back: body included, backbone_weights dropped
    with torch.no_grad():
        trained.psi["4"].weight.mul_(0.5)
    full = str(tmp_path / "full.safetensors")
    save_matcher(trained, full)
    trained = load_matcher(full)
    assert trained.cfg.backbone_weights is None
    frozen = RoiqaConfig(train=dataclasses.replace(CFG.train, freeze="body"))
    lean = str(tmp_path / "lean.safetensors")
    n = len(publish_model(trained, lean, frozen, init, epochs=4, half=False))
    assert n < os.path.getsize(full) // 5
    back = load_matcher(lean)
    assert back.cfg == dataclasses.replace(trained.cfg, backbone_weights=ModelConfig().backbone_weights)
    sa, sb = trained.state_dict(), back.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    for train_cfg, init_model in ((CFG.train, init), (frozen.train, None)):  # body trained; random-init body
        cfg = RoiqaConfig(model=CFG.model if init_model is None else ModelConfig(), train=train_cfg)
        model = load_matcher(full) if init_model else Matcher(CFG.model)
        publish_model(model, str(tmp_path / "kept.safetensors"), cfg, init_model, epochs=1, half=False)
        kept = load_matcher(str(tmp_path / "kept.safetensors")).state_dict()
        assert any(k.startswith("body.") for k in kept)


def test_train_job_bad_data_is_a_clear_error_before_ray_starts(tmp_path, capsys):
    from jobs import train as train_job

    bad = tmp_path / "photos"
    bad.mkdir()
    (bad / "broken.jpg").write_bytes(b"not a jpeg")
    assert train_job.main(["--data", str(bad), "--out", str(tmp_path / "o")]) == 2
    assert "broken.jpg" in capsys.readouterr().err
    assert train_job.main(["--data", str(tmp_path / "m.parquet"), "--out", str(tmp_path / "o")]) == 2
    assert "m.parquet" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()  # nothing was started or written
