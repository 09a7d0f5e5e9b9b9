"""Training on Ray: (query, positive, negative) triples streamed by Ray Data into a data-parallel Ray Train run.

Ray Data makes the samples (`roiqa.train.data`: self-supervised composites from unlabeled photographs, or pairs from
a labelled manifest) in tasks beside training; each of N `TorchTrainer` workers (one GPU each when asked, gloo on
CPU) reads its shard, takes `roiqa.train.matcher.TrainStep`s (the seed-003 objective), averaging gradients through DDP.
Every epoch rank 0 writes a checkpoint directory (model.safetensors, optimizer.safetensors, state.json; nothing is
pickled) that Ray persists under `<out>/<name>/`; a failed worker restarts the group from the last one
(`FailureConfig`), and running again with `resume=True` continues the same run. At the end the final weights are
written to `<out>/model.safetensors` and every epoch's metrics to `<out>/train_history.json`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
import time
from dataclasses import dataclass, field

import numpy as np

from roiqa.config import RoiqaConfig, from_dict, to_dict

VAL_TRIPLES = 16  # held-in validation triples per epoch (rank 0)
VAL_SEED_OFFSET = 1_000_003  # validation samples use seeds disjoint from the training rows


@dataclass(frozen=True)
class TrainReport:
    """What one `run_train` did."""

    out: str  # output URI
    model: str  # URI of the final weights (safetensors)
    run_dir: str  # Ray Train run directory holding the per-epoch checkpoints
    epochs: int  # epochs completed in total (a resumed run counts the earlier ones)
    seconds: float  # wall time of this call
    history: list[dict] = field(default_factory=list)  # one dict of metrics per epoch


# --- samples -----------------------------------------------------------------------------------------------------
_SOURCES: dict[tuple, object] = {}  # per worker process: decoded photographs or a LabeledPairs, by source


def _source(kind: str, uri: str, cfg: RoiqaConfig):
    """The photographs (self-supervised) or LabeledPairs (manifest) of a source, loaded once per process."""
    key = (kind, uri, cfg.train.image_size, cfg.train.query_size)
    if key not in _SOURCES:
        from roiqa.train import data as train_data

        if kind == "manifest":
            _SOURCES[key] = train_data.LabeledPairs(train_data.read_manifest(uri), cfg.train, cfg.preprocess.max_pixels)
        else:
            _SOURCES[key] = train_data.load_photo_sources(uri, cfg.preprocess.max_pixels)
    return _SOURCES[key]


def make_samples(kind: str, uri: str, cfg: RoiqaConfig, ids: np.ndarray, seed: int) -> dict[str, np.ndarray]:
    """The batch of samples for row ids `ids`: sample i is a pure function of (seed, id), wherever it is made."""
    from roiqa.train import data as train_data

    src = _source(kind, uri, cfg)
    out = []
    for i in np.asarray(ids, dtype=np.int64):
        rng = np.random.default_rng(np.random.SeedSequence([seed, int(i)]))
        out.append(src.sample(rng) if kind == "manifest" else train_data.synthesize_pair(src, cfg.train, rng))
    return train_data.collate(out)


class _SampleMaker:
    """Ray Data batch function: {"id"} -> stacked samples."""

    def __init__(self, kind: str, uri: str, cfg: dict) -> None:
        self.kind, self.uri, self.cfg = kind, uri, from_dict(RoiqaConfig, cfg)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return make_samples(self.kind, self.uri, self.cfg, batch["id"], self.cfg.train.seed)


def sample_dataset(kind: str, uri: str, cfg: RoiqaConfig, rows: int):
    """A Ray Dataset of `rows` training samples made in Ray Data tasks."""
    import ray

    maker = _SampleMaker(kind, uri, to_dict(cfg))
    return ray.data.range(rows).map_batches(maker, batch_size=cfg.train.batch_size, num_cpus=0.5)


# --- the loop each worker runs --------------------------------------------------------------------------------------
def train_loop(config: dict) -> None:
    """The per-worker training function handed to `TorchTrainer`: `roiqa.train.matcher.TrainStep` on this worker's
    shard, its objective wrapped by `prepare_model` (DDP: gradients averaged across workers in the backward)."""
    import ray.train
    import ray.train.torch

    from roiqa.models.checkpoint import load_matcher
    from roiqa.stages.embed import set_threads
    from roiqa.train.matcher import TrainStep, center_head, load_state, save_state, validate

    cfg = from_dict(RoiqaConfig, config["cfg"])
    t = cfg.train
    set_threads(config.get("threads", 0))
    ctx = ray.train.get_context()
    rank = ctx.get_world_rank()
    device = ray.train.torch.get_device()

    model = load_matcher(config.get("init_model"), cfg.model).to(device)
    train = TrainStep(model, cfg, device)
    start_epoch, history = 0, []
    ckpt = ray.train.get_checkpoint()
    if ckpt is not None:
        with ckpt.as_directory() as d:
            state = load_state(d, model, train.optimizer)
        start_epoch, history = int(state["epoch"]) + 1, list(state["history"])
        history.append({"event": "resumed", "from_epoch": int(state["epoch"]), "rank": rank})

    ids = np.arange(VAL_TRIPLES) + VAL_SEED_OFFSET
    val = make_samples(config["kind"], config["uri"], cfg, ids, t.seed)  # the same on every rank
    if ckpt is None and config.get("init_model") is None:
        center_head(model, val, device)  # identical on every rank: the replicas stay equal
    train.objective = ray.train.torch.prepare_model(train.objective, move_to_device=False)

    def shard():  # read again from the start when it ends (a restarted worker's shard does)
        while True:
            n = 0
            for batch in ray.train.get_dataset_shard("train").iter_batches(batch_size=t.batch_size):
                n += 1
                yield batch
            if n == 0:
                raise RuntimeError(f"rank {rank}: its training shard is empty")

    batches = shard()
    for epoch in range(start_epoch, t.epochs):
        t0 = time.perf_counter()
        metrics = train.epoch(batches, epoch)
        metrics.update(epoch=epoch, steps=(epoch + 1) * t.steps_per_epoch, lr=train.optimizer.param_groups[0]["lr"])
        metrics["epoch_seconds"] = time.perf_counter() - t0
        if rank == 0:
            metrics.update(validate(model, val, cfg, device))
            history.append(dict(metrics))
            with tempfile.TemporaryDirectory() as d:
                save_state(d, model, train.optimizer, {"epoch": epoch, "history": history, "config": to_dict(cfg)})
                ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d))
        else:
            ray.train.report(metrics)


# --- the driver -------------------------------------------------------------------------------------------------------
def storage(out: str):
    """(storage_path, pyarrow filesystem or None) for Ray Train's RunConfig: local paths as they are, s3:// through
    the same fsspec filesystem (endpoint, credentials) roiqa uses everywhere else."""
    from roiqa.io import uri as uri_mod

    out = uri_mod.normalize(out)
    if "://" not in out or out.startswith("file://"):
        path = out[len("file://") :] if out.startswith("file://") else out
        return os.path.abspath(path), None
    import pyarrow.fs as pafs

    fs, path = uri_mod.filesystem(out)
    return path, pafs.PyFileSystem(pafs.FSSpecHandler(fs))


def publish_model(model, uri: str, cfg: RoiqaConfig, init_model: str | None, epochs: int, half: bool) -> bytes:
    """Write a run's final model to `uri`. A body trained frozen (`train.freeze: body`) whose weights come from a
    file (a pinned package's, say) is not stored again: the checkpoint names that file and keeps what was trained."""
    import torch

    from roiqa.models.checkpoint import model_config, save_matcher

    body_weights = model_config(init_model, cfg.model).backbone_weights
    lean = cfg.train.freeze == "body" and bool(body_weights)
    if lean:
        model.cfg = dataclasses.replace(model.cfg, backbone_weights=body_weights)
    return save_matcher(
        model,
        uri,
        extra={"roiqa.train": json.dumps({"epochs": epochs})},
        dtype=torch.float16 if half else None,
        include_body=not lean,
    )


def run_train(
    out: str,
    cfg: RoiqaConfig,
    images: str | None = None,
    manifest: str | None = None,
    workers: int = 2,
    use_gpu: bool | None = None,
    resume: bool = False,
    name: str = "train",
    init_model: str | None = None,
    max_failures: int = 2,
    half: bool = False,
) -> TrainReport:
    """Train the matcher with `workers` Ray Train workers; see the module docstring for what is written where."""
    import ray
    import ray.train
    from ray.train.torch import TorchTrainer

    from pipelines.runtime import cluster_gpus, init_ray
    from roiqa.io import uri as uri_mod
    from roiqa.models.checkpoint import load_matcher

    if (images is None) == (manifest is None):
        raise ValueError("give exactly one of --images (unlabeled photographs, self-supervised) and --manifest")
    if workers < 1:
        raise ValueError(f"--workers must be >= 1, got {workers}")
    t = cfg.train
    if t.epochs < 1 or t.steps_per_epoch < 1 or t.batch_size < 2:
        raise ValueError("train.epochs and train.steps_per_epoch must be >= 1 and train.batch_size >= 2")
    from roiqa.train.data import photo_sources

    # Workers run in their own folders: every local path is made absolute here, on the driver.
    kind, uri = ("manifest", uri_mod.normalize(manifest)) if manifest else ("images", ",".join(photo_sources(images)))
    init_model = uri_mod.normalize(init_model) if init_model else None
    t0 = time.perf_counter()
    make_samples(kind, uri, cfg, np.arange(2), t.seed)  # fail here, clearly and before Ray starts, on a bad source
    init_ray(dashboard=True)
    gpu = cluster_gpus() > 0 if use_gpu is None else use_gpu
    path, fs = storage(out)
    run_dir = uri_mod.join(out, name)
    rfs, rpath = uri_mod.filesystem(run_dir)
    if rfs.exists(rpath) and not resume:
        raise ValueError(f"{run_dir} already holds a training run; pass --resume to continue it or a new --name")

    rows = t.epochs * t.steps_per_epoch * t.batch_size * workers
    threads = max(1, int(ray.cluster_resources().get("CPU", 1)) // workers) if not gpu else 0
    trainer = TorchTrainer(
        train_loop,
        train_loop_config={"cfg": to_dict(cfg), "kind": kind, "uri": uri, "init_model": init_model, "threads": threads},
        scaling_config=ray.train.ScalingConfig(
            num_workers=workers, use_gpu=gpu, resources_per_worker=None if gpu else {"CPU": 0.5}
        ),
        run_config=ray.train.RunConfig(
            name=name,
            storage_path=path,
            storage_filesystem=fs,
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
            failure_config=ray.train.FailureConfig(max_failures=max_failures),
        ),
        datasets={"train": sample_dataset(kind, uri, cfg, rows)},
    )
    result = trainer.fit()
    if result.error is not None:
        raise RuntimeError(f"training failed: {result.error}")
    if result.checkpoint is None:
        raise RuntimeError("training finished without a checkpoint")
    with result.checkpoint.as_directory() as d:
        model = load_matcher(os.path.join(d, "model.safetensors"))
        with open(os.path.join(d, "state.json")) as f:
            state = json.load(f)
    model_uri = uri_mod.join(out, "model.safetensors")
    publish_model(model, model_uri, cfg, init_model, state["epoch"] + 1, half)
    history = state["history"]
    uri_mod.write_bytes(uri_mod.join(out, "train_history.json"), json.dumps(history, indent=1).encode())
    epochs = sum(1 for h in history if "event" not in h)
    return TrainReport(out, model_uri, run_dir, epochs, time.perf_counter() - t0, history)
