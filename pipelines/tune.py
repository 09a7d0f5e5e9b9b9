"""Tune pipeline: Ray Tune sweeps (PBT, PB2, ASHA with random or Optuna search) over loss weights, temperatures, the
learning rate and the ROI refinement's adjustment rate; every trial trains the matcher and reports validation
metrics each epoch; the sweep lands as a trials table, the best config as YAML and the best checkpoint."""

from __future__ import annotations

import os
import tempfile
import time
from dataclasses import dataclass

import numpy as np

from pipelines.runtime import cluster_gpus, init_ray
from pipelines.train import VAL_SEED_OFFSET, make_samples, storage
from roiqa import schema as S
from roiqa.config import RoiqaConfig, from_dict, to_dict
from roiqa.io import uri as uri_mod
from roiqa.train import data as train_data

RAY_DIR = "ray"  # Ray Tune's own experiment folder (trial checkpoints, experiment state) under --out


@dataclass(frozen=True)
class TuneReport:
    """What one sweep produced."""

    out: str  # output URI
    trials: int  # trials in the sweep
    best_trial: str  # id of the best trial (by the objective of its last report)
    best_objective: float  # that objective
    default_objective: float | None  # the objective of a trial run with the untouched defaults (None: not run)
    seconds: float  # wall time of the sweep


# --- one trial (runs in a Tune actor) -------------------------------------------------------------------------------
def run_trial(
    config: dict,
    base: dict,
    keys: list[str],
    weights: dict[str, float],
    kind: str,
    uri: str,
    val_triples: int,
    threads: int,
    init_model: str | None = None,
) -> None:
    """Train the matcher with the base config plus this trial's values of `keys`; report each epoch.

    Training batches are a pure function of (seed, epoch, step), so a trial restored from a checkpoint (Tune's
    fault tolerance, PBT's exploit, `Tuner.restore`) continues with the batches it would have seen. Each report
    carries the validation metrics, the weighted objective and the parameter values in force (PBT and PB2 change
    them between reports), with a checkpoint of model, AdamW moments and state (safetensors + JSON).
    """
    import ray.tune
    import torch

    from roiqa.models.checkpoint import load_matcher
    from roiqa.stages.embed import set_threads
    from roiqa.train.matcher import TrainStep, center_head, load_state, refined_localization, save_state, validate
    from roiqa.train.tune_space import apply_overrides, objective

    set_threads(threads)
    params = {k: config[k] for k in keys}
    cfg = apply_overrides(from_dict(RoiqaConfig, base), params)
    t = cfg.train
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = load_matcher(init_model, cfg.model).to(device)
    train = TrainStep(model, cfg, device)
    val = make_samples(kind, uri, cfg, np.arange(val_triples) + VAL_SEED_OFFSET, t.seed)
    start, resumed_from = 0, -1
    ckpt = ray.tune.get_checkpoint()
    if ckpt is not None:
        with ckpt.as_directory() as d:
            state = load_state(d, model, train.optimizer)
        start = resumed_from = int(state["epoch"]) + 1
    elif init_model is None:
        center_head(model, val, device)
    t_start = time.perf_counter()
    for epoch in range(start, t.epochs):
        first = epoch * t.steps_per_epoch * t.batch_size
        batches = (
            make_samples(kind, uri, cfg, first + s * t.batch_size + np.arange(t.batch_size), t.seed)
            for s in range(t.steps_per_epoch)
        )
        metrics = {f"train_{k}": v for k, v in train.epoch(batches, epoch).items()}
        metrics.update(validate(model, val, cfg, device))
        metrics.update(refined_localization(model, val, cfg, device))
        metrics[S.OBJECTIVE] = objective(metrics, weights)
        metrics.update({"epoch": epoch, S.RESUMED_FROM: resumed_from, S.SECONDS: time.perf_counter() - t_start})
        metrics.update({S.param_column(k): float(v) for k, v in params.items()})
        with tempfile.TemporaryDirectory() as d:
            save_state(d, model, train.optimizer, {"epoch": epoch, "config": to_dict(cfg), "params": params})
            ray.tune.report(metrics, checkpoint=ray.tune.Checkpoint.from_directory(d))


# --- the sweep (driver) -------------------------------------------------------------------------------------------
def ray_space(space) -> dict:
    """The search space as Ray Tune sampling objects, keyed by dotted config key."""
    from ray import tune

    def one(p):
        if p.kind == "uniform":
            return tune.uniform(p.low, p.high)
        if p.kind == "loguniform":
            return tune.loguniform(p.low, p.high)
        if p.kind == "quniform":
            return tune.quniform(p.low, p.high, p.q)
        return tune.choice(list(p.values))

    return {p.key: one(p) for p in space.params}


def make_scheduler(name: str, space, epochs: int, interval: int):
    """PBT (random perturbation / resampling of the space), PB2 (GP-bandit exploration inside the space's bounds)
    or ASHA (early stopping), all on training iterations (= epochs)."""
    from ray.tune.schedulers import ASHAScheduler, PopulationBasedTraining
    from ray.tune.schedulers.pb2 import PB2

    if name == "pbt":
        return PopulationBasedTraining(
            time_attr="training_iteration",
            perturbation_interval=interval,
            hyperparam_mutations=ray_space(space),
            quantile_fraction=0.25,
        )
    if name == "pb2":
        space.continuous_only()
        return PB2(time_attr="training_iteration", perturbation_interval=interval, hyperparam_bounds=space.bounds())
    return ASHAScheduler(time_attr="training_iteration", max_t=epochs, grace_period=1, reduction_factor=2)


def run_tune(
    out: str,
    cfg: RoiqaConfig,
    space_uri: str,
    images: str | None = None,
    manifest: str | None = None,
    samples: int = 4,
    scheduler: str = "pbt",
    search: str = "random",
    interval: int = 1,
    name: str = "tune",
    resume: bool = False,
    cpus_per_trial: float = 1.0,
    val_triples: int = 8,
    max_failures: int = 1,
    with_default: bool = True,
    init_model: str | None = None,
) -> TuneReport:
    """Run (or, with `resume`, restore and finish) a sweep and write its outputs under `out`.

    `out`/ray/<name> holds Tune's experiment (trial checkpoints and state; `Tuner.restore` reads it);
    `out`/trials.parquet, trials.md, best.yaml (a full config `roiqa train` and `roiqa query` read), best/ (the best
    trial's last checkpoint: model.safetensors is a matcher checkpoint), curves_<metric>.png, schedule_<param>.png
    and summary.json are written when it finishes. `with_default`: the first trial starts from the config's own
    values (the reference the best config is compared with; PBT and PB2 may still perturb it later).
    `init_model`: every trial starts from this matcher checkpoint (fine-tuning sweeps) instead of random weights.
    """
    from ray import tune

    from roiqa.train.tune_space import check_sweep, default_point, load_search_space

    t0 = time.perf_counter()
    check_sweep(scheduler, search, samples, cfg)
    space = load_search_space(space_uri)
    if (images is None) == (manifest is None):
        raise ValueError("give exactly one of images (a folder / prefix, or 'bundled') and manifest")
    kind, uri = ("manifest", uri_mod.normalize(manifest)) if manifest else ("photos", images)
    if kind == "photos":
        uri = ",".join(train_data.photo_sources(uri))
    out = uri_mod.normalize(out)
    init_ray(dashboard=True)
    gpus = 1 if cluster_gpus() > 0 else 0
    trainable = tune.with_resources(
        tune.with_parameters(
            run_trial,
            base=to_dict(cfg),
            keys=[p.key for p in space.params],
            weights=dict(space.objective),
            kind=kind,
            uri=uri,
            val_triples=val_triples,
            threads=0 if gpus else max(1, int(cpus_per_trial)),
            init_model=init_model,
        ),
        {"cpu": cpus_per_trial, "gpu": gpus},
    )
    path, fs = storage(uri_mod.join(out, RAY_DIR))
    experiment = os.path.join(path, name)
    if resume:
        if not tune.Tuner.can_restore(experiment, storage_filesystem=fs):
            raise FileNotFoundError(f"{uri_mod.join(out, RAY_DIR, name)}: no Tune experiment to resume")
        tuner = tune.Tuner.restore(
            experiment, trainable, resume_unfinished=True, resume_errored=True, storage_filesystem=fs
        )
    else:
        points = [default_point(cfg, space)] if with_default else None
        if search == "optuna":
            from ray.tune.search.optuna import OptunaSearch

            search_alg = OptunaSearch(seed=cfg.train.seed, points_to_evaluate=points)
        else:
            from ray.tune.search import BasicVariantGenerator

            search_alg = BasicVariantGenerator(points_to_evaluate=points, random_state=cfg.train.seed)
        tuner = tune.Tuner(
            trainable,
            param_space=ray_space(space),
            tune_config=tune.TuneConfig(
                metric=S.OBJECTIVE,
                mode="max",
                num_samples=samples,
                scheduler=make_scheduler(scheduler, space, cfg.train.epochs, interval),
                search_alg=search_alg,
                reuse_actors=False,
            ),
            run_config=tune.RunConfig(
                name=name,
                storage_path=path,
                storage_filesystem=fs,
                stop={"training_iteration": cfg.train.epochs},
                checkpoint_config=tune.CheckpointConfig(num_to_keep=4),  # PBT exploits others' recent ones
                failure_config=tune.FailureConfig(max_failures=max_failures),
                verbose=0,
            ),
        )
    results = tuner.fit()
    default = default_point(cfg, space)
    return write_outputs(results, out, cfg, space, scheduler, search, default, time.perf_counter() - t0)


def write_outputs(
    results, out: str, cfg: RoiqaConfig, space, scheduler: str, search: str, default: dict, seconds: float
) -> TuneReport:
    """trials.parquet / .md, best.yaml, best/, plots and summary.json from a finished ResultGrid."""
    from roiqa.eval import tune_report

    keys = [p.key for p in space.params]
    rows, checkpoints, errors = [], {}, {}
    for res in results:
        df = res.metrics_dataframe
        trial_id = str(res.metrics.get("trial_id")) if res.metrics else None
        if df is None or len(df) == 0 or trial_id is None:
            errors[trial_id or f"#{len(errors)}"] = str(res.error)
            continue
        last_iter = int(df["training_iteration"].max())
        status = "ERROR" if res.error else ("COMPLETE" if last_iter >= cfg.train.epochs else "STOPPED")
        checkpoints[trial_id] = res.checkpoint
        rows += tune_report.trial_rows(trial_id, df, status, keys)
    summary = {"scheduler": scheduler, "search": search, "objective_weights": dict(space.objective)}
    summary.update({"errors": errors, "seconds": seconds})
    if not rows:  # interrupted before any trial reported (or every trial failed at once): nothing to rank yet
        tune_report.write_summary(out, {**summary, "trials": 0})
        return TuneReport(out, 0, "", float("nan"), None, seconds)
    summary = tune_report.write_sweep(rows, out, cfg, keys, default, summary)
    best = summary["best"]
    ckpt = checkpoints.get(best["trial_id"])
    if ckpt is not None:
        with ckpt.as_directory() as d:
            for fname in ("model.safetensors", "state.json"):
                with open(os.path.join(d, fname), "rb") as f:
                    uri_mod.write_bytes(uri_mod.join(out, tune_report.BEST, fname), f.read())
    tune_report.write_summary(out, summary)
    ref = summary["default_trial"]
    ref_value = None if ref is None else ref[S.OBJECTIVE]
    return TuneReport(out, summary["trials"], best["trial_id"], float(best[S.OBJECTIVE]), ref_value, seconds)
