"""Losing a worker node in the middle of a job, on a simulated multi-node Ray cluster.

`ray.cluster_utils.Cluster` runs a head node and worker nodes (each its own raylet, object store and worker
processes) on this one machine. The head takes no work (`num_cpus=0`, as a production head node type does), so every
task and actor runs on a worker node. A fault is injected with `Cluster.remove_node(node, allow_graceful=False)`:
every process of that node (raylet, object store, workers) is killed at once, as when a machine disappears. Node
changes are made on the test's main thread; the job under test runs as its own driver process, the CLI joining the
cluster through RAY_ADDRESS.

test_index_survives_losing_a_worker_node
    Injected: `roiqa index` (2 embedding actors) over 360 images and 3 broken files (an empty file, a truncated JPEG, a
    text file named .jpg) runs on a head and two 2-CPU worker nodes; once an embedding actor is ALIVE on a worker node
    and has finished batches, while the driver still runs and no CURRENT exists, that worker node is killed. No
    replacement is added: the surviving worker node alone has the CPUs to finish (the lost actor restarts there and
    the lost blocks are recomputed).
    Checked: the driver exits 0; CURRENT names the version; every input file is in exactly one of the embeddings and
    errors tables (no duplicate, no loss); the broken files are decode errors with their reasons; embeddings equal a
    direct `roiqa.stages.embed.Embedder` call on the same images (atol 1e-4); the fault happened mid-run (driver
    running, no CURRENT, the killed node hosted an embedding actor that had finished batches, and that actor was
    restarted).

test_training_resumes_after_losing_a_worker_node
    Injected: `roiqa train` (two Ray Train workers, per-epoch checkpoints, 3 epochs) on a head and two 1-CPU worker
    nodes; once Ray Train has registered the first checkpoint, the worker node hosting the training workers (Ray
    Train packs both half-CPU workers onto one node) is killed and a replacement node is added (what an autoscaler
    does to restore a worker group's minimum size).
    Checked: the run exits 0 after exactly one restart; the workers on the killed node died; the restarted worker group
    restored the checkpoint Ray Train had registered last when it restarted (at least the one seen before the fault);
    every epoch appears exactly once in the history, the restart right after the restored epoch (no epoch before the
    fault is run again); the final model and the last checkpoint's files load with safetensors.
"""

from __future__ import annotations

import collections
import contextlib
import json
import os
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
import yaml

from roiqa import schema as S
from roiqa.index import store

pytestmark = pytest.mark.cluster

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The GCS declares a node dead after `threshold` failed health checks `period_ms` apart (defaults 5 x 3 s); a
# killed raylet fails each check at once, so this finds the loss in ~3 s. A live but busy raylet still has the default
# 10 s (health_check_timeout_ms) to answer each check.
HEALTH_CHECKS = {"health_check_period_ms": 1000, "health_check_failure_threshold": 3}
INDEX_CFG = {
    "model": {"fpn_channels": 32},
    "preprocess": {"image_size": 128},
    "index": {"batch_size": 4, "read_batch_size": 4, "actors": 2, "torch_threads": 1},
}
TRAIN_CFG = {
    "model": {"fpn_channels": 32},
    "train": {
        "epochs": 3,
        "steps_per_epoch": 2,
        "batch_size": 2,
        "image_size": 96,
        "query_size": 48,
        "object_scale": [24.0, 48.0],
    },
}
EMBED_TASK = "MapWorker(MapBatches(Embedder)).submit"
# Images to index. The two embedding actors start last (torch, the model) and then embed ~50 images/s here, so the
# time in which a node can be killed mid-embedding is ~N_IMAGES / 50 s: 72 images gave ~2 s, too short to hit
# reliably through the State API (whose view lags ~1 s); 360 give ~7 s.
N_IMAGES = 360
WAIT_S = 480  # upper bound for any one wait below: a loaded machine is slow, a hung job must still fail


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


@pytest.fixture
def start_cluster(monkeypatch):
    """start_cluster(worker_cpus): a head node (no CPUs; the dashboard, for the State API) and two worker nodes of
    `worker_cpus` logical CPUs; every node shut down at the end of the test.

    RAY_ADDRESS names this cluster in the environment every one of its processes inherits: Ray Train's placement
    group cleaner calls the State API without an address, and on a machine running more than one Ray cluster the
    automatic lookup may find another one (and then remove this run's placement group as if its controller were gone).
    """
    import ray
    from ray.cluster_utils import Cluster

    clusters = []

    def start(worker_cpus: int) -> Cluster:
        port = _free_port()
        address = f"{ray.util.get_node_ip_address()}:{port}"
        monkeypatch.setenv("RAY_ADDRESS", address)
        head = {"num_cpus": 0, "include_dashboard": True, "gcs_server_port": port, "_system_config": HEALTH_CHECKS}
        c = Cluster(initialize_head=True, head_node_args=head)
        clusters.append(c)
        assert c.address == address
        for _ in range(2):
            c.add_node(num_cpus=worker_cpus)
        c.wait_for_nodes()
        return c

    try:
        yield start
    finally:
        ray.shutdown()
        for c in clusters:
            c.shutdown()


@contextlib.contextmanager
def driver(args: list[str], address: str, log: str):
    """A `python -m jobs.<name>` driver joining the cluster at `address` (stdout to `log`.out, stderr to `log`.err);
    killed if still running at the end.

    It inherits this process's environment, authentication included: `Cluster` nodes use token authentication only
    when RAY_AUTH_MODE=token is set (a local `ray.init()` earlier in this process sets it), and the driver then reads
    the same token (~/.ray/auth_token).
    """
    env = {**os.environ, "RAY_ADDRESS": address}
    with open(log + ".out", "w") as out, open(log + ".err", "w") as err:
        proc = subprocess.Popen([sys.executable, "-m", *args], cwd=ROOT, env=env, stdout=out, stderr=err)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)


def finish(proc: subprocess.Popen, log: str) -> dict:
    """Wait for the driver; the JSON summary it prints last."""
    try:
        proc.wait(timeout=WAIT_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=30)
    with open(log + ".out") as f, open(log + ".err") as g:
        out, err = f.read(), g.read()
    assert proc.returncode == 0, f"driver exited {proc.returncode}:\n{out[-2000:]}\n{err[-4000:]}"
    # Ray's log monitor may append lines of the workers' logs after the summary: take the last JSON line.
    return json.loads([line for line in out.splitlines() if line.startswith("{")][-1])


def alive_actors(address: str, name: str) -> list[dict]:
    from ray.util.state import list_actors

    actors = list_actors(address=address, filters=[("state", "=", "ALIVE")], limit=1000, timeout=30)
    return [a for a in actors if name in (a["class_name"] or "")]


def worker_node(cluster, node_id: str):
    """The Cluster's worker node object with this node id (None: not a worker node)."""
    return next((n for n in cluster.worker_nodes if n.node_id == node_id), None)


def still_waiting(t_end: float, proc: subprocess.Popen, what: str) -> None:
    assert proc.poll() is None, f"the driver ended (exit {proc.returncode}) before {what}"
    assert time.monotonic() < t_end, f"timed out waiting for {what}"


# --- index ------------------------------------------------------------------------------------------------------------
def make_collection(collection, folder: str, n: int) -> tuple[list[str], dict[str, tuple[str, str]]]:
    """`n` variants of the collection's photographs (brightness shifts, JPEG and PNG re-encodings) and three broken
    files; (paths of the good images, {path of a broken file: its expected (stage, reason)})."""
    from PIL import Image

    os.makedirs(folder)
    src = sorted(os.path.join(collection.gallery_dir, f) for f in os.listdir(collection.gallery_dir))
    good = []
    for i in range(n):
        img = np.asarray(Image.open(src[i % len(src)]).convert("RGB"), np.int16)
        img = Image.fromarray(np.clip(img + 2 * ((i // len(src)) % 13) - 12, 0, 255).astype(np.uint8))
        path = os.path.join(folder, f"img_{i:03d}" + (".png" if i % 7 == 3 else ".jpg"))
        img.save(path, **({} if path.endswith(".png") else {"quality": 80 + i % 15}))
        good.append(path)
    with open(src[0], "rb") as f:
        jpeg = f.read()
    broken = {}
    for name, body, reason in [
        ("empty.jpg", b"", "empty_file"),
        ("truncated.jpg", jpeg[: len(jpeg) // 3], "truncated"),
        ("notes.jpg", b"an index of the photographs, not a photograph\n", "not_an_image"),
    ]:
        with open(os.path.join(folder, name), "wb") as f:
            f.write(body)
        broken[os.path.join(folder, name)] = ("decode", reason)
    return good, broken


def finished_embed_batches(address: str) -> collections.Counter:
    """{actor id: embedding batches it has finished} (the State API's view lags a second or so)."""
    from ray.util.state import list_tasks

    tasks = list_tasks(address=address, filters=[("name", "=", EMBED_TASK), ("state", "=", "FINISHED")], limit=10000)
    return collections.Counter(t["actor_id"] for t in tasks)


def test_index_survives_losing_a_worker_node(start_cluster, collection, tmp_path):
    from roiqa.config import load_config
    from roiqa.io.sources import read_files
    from roiqa.stages.embed import Decoder, Embedder

    # 2 logical CPUs per worker node (bookkeeping only): the surviving node alone fits both half-CPU embedding
    # actors and a 1-CPU read/decode task (lost blocks are read again). With 1 CPU per node the job never even
    # starts embedding: the two actors spread over both nodes and no node keeps a whole CPU for a read task.
    cluster = start_cluster(worker_cpus=2)
    images, index = str(tmp_path / "images"), str(tmp_path / "index")
    good, broken = make_collection(collection, images, N_IMAGES)
    config = str(tmp_path / "index.yaml")
    with open(config, "w") as f:
        yaml.safe_dump(INDEX_CFG, f)
    log = str(tmp_path / "index.log")
    args = ["jobs.index", "--images", images, "--index", index, "--config", config, "--model", "none"]
    t0 = time.monotonic()
    with driver(args, cluster.address, log) as proc:
        t_end = time.monotonic() + WAIT_S
        while True:  # mid-embedding: an Embedder actor on a worker node has finished batches, nothing published yet
            still_waiting(t_end, proc, "an embedding actor with finished batches on a worker node")
            on_workers = [a for a in alive_actors(cluster.address, "Embedder") if worker_node(cluster, a["node_id"])]
            done = finished_embed_batches(cluster.address) if on_workers else collections.Counter()
            if on_workers and sum(done.values()) >= 2:
                victim_actor = max(on_workers, key=lambda a: done[a["actor_id"]])
                if done[victim_actor["actor_id"]] >= 1:
                    break
            time.sleep(0.2)
        victim = worker_node(cluster, victim_actor["node_id"])
        running = proc.poll() is None
        published = store.current_version(index)
        t_kill = time.monotonic() - t0
        cluster.remove_node(victim, allow_graceful=False)
        # No replacement node: the remaining worker node has the CPUs to finish. A real cluster's autoscaler (the
        # cluster launcher, KubeRay) would also start a new worker node to restore the group's minimum size.
        report = finish(proc, log)
    t_done = time.monotonic() - t0
    print(
        f"index: killed a node after {t_kill:.1f} s, {sum(done.values())} batches embedded "
        f"({done[victim_actor['actor_id']]} by its actor); finished after {t_done:.1f} s"
    )

    assert running and published is None, "the node was not killed in the middle of the run"
    from ray.util.state import get_actor

    restarted = get_actor(victim_actor["actor_id"], address=cluster.address)
    assert restarted is not None and restarted.num_restarts >= 1, restarted

    version = store.current_version(index)
    assert version == report["version"]
    v = store.open_index(index)
    emb, err = v.embeddings().to_pandas(), v.errors().to_pandas()
    files = sorted(os.path.join(images, f) for f in os.listdir(images))
    assert sorted(emb[S.URI].tolist() + err[S.URI].tolist()) == files  # every input exactly once
    assert sorted(emb[S.URI]) == sorted(good)
    assert {u: (st, r) for u, st, r in zip(err[S.URI], err[S.STAGE], err[S.REASON])} == broken
    assert (report["inputs"], report["indexed"], report["errors"]) == (len(files), len(good), len(broken))
    assert v.faiss().ntotal == v.manifest["faiss_vectors"] > len(good)  # every good image's regions

    cfg = load_config(config)
    sample = good[:: len(good) // 6]
    batch = Decoder(cfg.preprocess)(read_files({S.URI: np.array(sample, dtype=object)}))
    direct = Embedder(cfg.model)(batch)
    ref = dict(zip(direct[S.URI], direct[S.EMBEDDING]))
    got = dict(zip(emb[S.URI], emb[S.EMBEDDING]))
    for uri in sample:
        np.testing.assert_allclose(np.asarray(got[uri]), ref[uri], atol=1e-4)


# --- training ---------------------------------------------------------------------------------------------------------
def registered_checkpoint(run_dir: str) -> dict | None:
    """The metrics of the checkpoint Ray Train has registered last (its checkpoint manager snapshot), or None."""
    path = os.path.join(run_dir, "checkpoint_manager_snapshot.json")
    try:
        with open(path) as f:
            latest = json.load(f)["latest_checkpoint_result"]
    except (FileNotFoundError, json.JSONDecodeError):  # not written yet, or being rewritten
        return None
    return latest["metrics"] if latest else None


def test_training_resumes_after_losing_a_worker_node(start_cluster, tmp_path):
    from safetensors.torch import load_file

    from roiqa.models.checkpoint import load_matcher

    # 1 CPU per worker node: run_train gives each of its 2 workers (cluster CPUs // 2) torch threads, and more threads
    # than this machine's 2 cores only slow training down. Both half-CPU workers fit on one node (Ray Train packs
    # them); the sample-making tasks of Ray Data run beside them or on the other node.
    cluster = start_cluster(worker_cpus=1)
    out = str(tmp_path / "run")
    run_dir = os.path.join(out, "train")
    config = str(tmp_path / "train.yaml")
    with open(config, "w") as f:
        yaml.safe_dump(TRAIN_CFG, f)
    epochs = TRAIN_CFG["train"]["epochs"]
    log = str(tmp_path / "train.log")
    args = ["jobs.train", "--images", "bundled", "--out", out, "--workers", "2", "--config", config]
    t0 = time.monotonic()
    with driver(args + ["--max-failures", "2"], cluster.address, log) as proc:
        t_end = time.monotonic() + WAIT_S
        first: list[dict] = []
        while True:  # the first worker group is up and Ray Train has registered a checkpoint
            still_waiting(t_end, proc, "the first registered checkpoint")
            if len(first) < 2:
                first = alive_actors(cluster.address, "RayTrainWorker")
            before = registered_checkpoint(run_dir) if len(first) == 2 else None
            if before is not None:
                break
            time.sleep(0.1)
        victim = next(worker_node(cluster, a["node_id"]) for a in first if worker_node(cluster, a["node_id"]))
        hosted = sum(a["node_id"] == victim.node_id for a in first)
        running = proc.poll() is None
        t_kill = time.monotonic() - t0
        cluster.remove_node(victim, allow_graceful=False)
        cluster.add_node(num_cpus=1)  # the replacement an autoscaler would start
        old = {a["actor_id"] for a in first}
        while True:  # the restarted group: its checkpoint is the one registered last when it started
            still_waiting(t_end, proc, "the restarted worker group")
            if any(a["actor_id"] not in old for a in alive_actors(cluster.address, "RayTrainWorker")):
                restored = registered_checkpoint(run_dir)
                if restored is not None:
                    break
            time.sleep(0.5)
        report = finish(proc, log)
    t_done = time.monotonic() - t0
    print(
        f"train: killed a node hosting {hosted} of 2 workers after {t_kill:.1f} s (checkpoint of epoch "
        f"{before['epoch']} registered); restored epoch {restored['epoch']}; finished after {t_done:.1f} s"
    )
    assert running and before["epoch"] < epochs - 1, "the node was not killed in the middle of training"
    from ray.util.state import get_actor

    lost = [get_actor(a["actor_id"], address=cluster.address) for a in first if a["node_id"] == victim.node_id]
    assert len(lost) == hosted >= 1 and all(a.state == "DEAD" for a in lost), lost

    with open(os.path.join(out, "train_history.json")) as f:
        history = json.load(f)
    resumed = [i for i, h in enumerate(history) if h.get("event") == "resumed"]
    assert len(resumed) == 1, f"expected one restart from a checkpoint: {history}"
    from_epoch = history[resumed[0]]["from_epoch"]
    assert from_epoch == restored["epoch"] >= before["epoch"]
    # Every epoch exactly once: the restarted group continued after the restored epoch instead of starting over.
    assert [h["epoch"] for h in history if "event" not in h] == list(range(epochs))
    assert history[resumed[0] - 1]["epoch"] == from_epoch
    assert report["epochs"] == epochs and report["last_epoch"]["epoch"] == epochs - 1
    for key in ("loss", "val_map", "val_loc50"):
        assert np.isfinite(history[-1][key]), key

    tensors = load_file(report["model"])
    assert tensors and all(np.isfinite(t.float().numpy()).all() for t in tensors.values())
    assert load_matcher(report["model"]).cfg.fpn_channels == 32
    last = sorted(n for n in os.listdir(run_dir) if os.path.isdir(os.path.join(run_dir, n)))[-1]
    assert load_file(os.path.join(run_dir, last, "model.safetensors")).keys() == tensors.keys()
    assert load_file(os.path.join(run_dir, last, "optimizer.safetensors"))
    with open(os.path.join(run_dir, last, "state.json")) as f:
        assert json.load(f)["epoch"] == epochs - 1
