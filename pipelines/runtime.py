"""Starting or joining Ray: the embedded default in-process, a cluster when RAY_ADDRESS is set or under `ray job`."""

from __future__ import annotations

import logging
import os
import re

import pyarrow as pa
import ray

# Non-secret variables the workers need to reach the same object store (credentials come from the nodes' own
# environment or instance roles and are never copied into a runtime environment).
FORWARDED_ENV = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_REGION", "AWS_DEFAULT_REGION")


def init_ray(num_cpus: int | None = None, dashboard: bool = False, progress_bars: bool = False) -> None:
    """Join the cluster named by RAY_ADDRESS (or the job's), else start Ray in this process; quiet logs.

    `dashboard`: start the dashboard (and with it the State API) in an embedded Ray; Ray Train and Tune query
    actor state through it and otherwise log a warning every second and may leak placement groups.
    `progress_bars`: Ray Data's own progress bars (the jobs turn them on with their progress lines). Ray draws
    them only when stdout is a terminal; otherwise it logs progress at INFO, which the ray.data level below hides.
    """
    if not ray.is_initialized():
        # Joining a cluster from a client: the workers get the endpoint through the runtime environment. Under
        # `ray job submit` the job's own runtime environment applies (Ray refuses a second one naming the same
        # variables), and an embedded Ray's workers inherit this process's environment anyway.
        joining = os.environ.get("RAY_ADDRESS") and not os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR")
        env = {k: os.environ[k] for k in FORWARDED_ENV if os.environ.get(k)} if joining else {}
        ray.init(
            # "local": a new in-process Ray even when a `ray start` cluster runs on this machine (Ray would join it)
            address=os.environ.get("RAY_ADDRESS") or "local",
            num_cpus=None if os.environ.get("RAY_ADDRESS") else num_cpus,
            include_dashboard=dashboard,
            logging_level=logging.WARNING,
            runtime_env={"env_vars": env} if env else None,
        )
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = progress_bars
    ctx.enable_auto_log_stats = False
    ctx.verbose_stats_logs = False
    # a stage's own exception (StorageUnavailable, ...) reaches the driver as itself, not as a UserCodeException
    # whose cause Ray drops on the way: the job's exit status depends on it (3: the store is down)
    ctx.raise_original_map_exception = True
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    # "Progress bars disabled. To enable, set ...": the job chose that (--quiet, or stderr not a terminal)
    logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR)


def cluster_gpus() -> int:
    """Number of GPUs the cluster reports (0 on CPU-only clusters such as CI)."""
    return int(ray.cluster_resources().get("GPU", 0))


def table_dataset(table: pa.Table, blocks: int = 1) -> ray.data.Dataset:
    """A dataset of `table`'s rows in `blocks` nearly equal blocks, built in the driver.

    `ray.data.from_arrow` computes each block's metadata in a remote task; the CPUs those tasks held still count as
    busy in `ray.available_resources()` a moment later, when the next dataset starts, and Ray Data then logs that
    "the Dataset job will hang unless more CPUs are freed up" though nothing waits. `from_blocks` reads the
    metadata in the driver."""
    blocks = max(1, min(blocks, table.num_rows))
    step = -(-table.num_rows // blocks) if table.num_rows else 1
    parts = [table.slice(i, step) for i in range(0, table.num_rows, step)] or [table]
    return ray.data.from_blocks(parts)


def actor_pool(actors: int, max_actors: int = 0) -> ray.data.ActorPoolStrategy:
    """The compute strategy of a model stage: `actors` fixed, or (max_actors > actors) an autoscaling pool from
    `actors` to `max_actors` that Ray Data grows while work waits; on a cluster with an autoscaler, the actors
    it cannot place bring up more nodes of their kind (the GPU group of cluster/kuberay)."""
    if actors < 1:
        raise ValueError(f"actors must be >= 1, got {actors}")
    if max_actors and max_actors < actors:
        raise ValueError(f"max_actors must be 0 (a fixed pool) or >= actors ({actors}), got {max_actors}")
    if max_actors > actors:
        return ray.data.ActorPoolStrategy(min_size=actors, max_size=max_actors)
    return ray.data.ActorPoolStrategy(size=actors)


def pool_size(actors: int, max_actors: int = 0) -> str:
    """The pool in words for progress lines: "1 actor", "4 actors", "1-8 actors"."""
    if max_actors > actors:
        return f"{actors}-{max_actors} actors"
    return f"{actors} actor{'s' * (actors != 1)}"


def actor_resources(cpus: float, gpu_share: float = 1.0) -> dict:
    """Resources per model actor: `gpu_share` of a GPU each when the cluster has GPUs (1: a whole one; two stages
    sharing the GPUs take 0.5 each), else a fraction of a CPU."""
    if cluster_gpus() > 0:
        return {"num_gpus": gpu_share, "num_cpus": 1}
    return {"num_gpus": 0, "num_cpus": cpus}


_OPERATOR = re.compile(r"^Operator \d+ (.+?):", re.M)
_WALL = re.compile(r"Remote wall time: .*?([\d.]+)(us|ms|s) total")
_UNIT = {"us": 1e-6, "ms": 1e-3, "s": 1.0}


def stage_seconds(stats: str) -> dict[str, float]:
    """{operator name: summed remote wall time in seconds} from `Dataset.stats()` text (tasks and actors alike)."""
    out: dict[str, float] = {}
    parts = _OPERATOR.split(stats)
    for name, body in zip(parts[1::2], parts[2::2]):
        m = _WALL.search(body)
        if m:
            out[name] = out.get(name, 0.0) + float(m.group(1)) * _UNIT[m.group(2)]
    return out
