"""Shared fixtures: a tiny config, a small real-photo collection, an S3-compatible server, one Ray per module."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from roiqa.config import GeometryConfig, IndexConfig, ModelConfig, PreprocessConfig, QueryConfig, RoiqaConfig

TINY = RoiqaConfig(
    model=ModelConfig(backbone="resnet18", backbone_weights=None, fpn_channels=32),
    preprocess=PreprocessConfig(image_size=128),
    index=IndexConfig(batch_size=8, read_batch_size=8),
    query=QueryConfig(top_k=6, rerank=4, query_sizes=(24, 40), descriptor_size=40, peaks=3, overlay_size=96),
    # No geometric shortlist: its actor pool adds ~5 s to every query run; tests/test_pipelines.py covers it.
    geometry=GeometryConfig(shortlist=0),
)


@pytest.fixture(scope="session")
def tiny_cfg() -> RoiqaConfig:
    """A small, fast configuration for pipeline tests."""
    return TINY


@pytest.fixture(scope="session")
def collection(tmp_path_factory):
    """A 10-image collection of real photographs (skimage.data) with 8 query crops and known boxes."""
    from roiqa.eval.demo_data import DemoConfig, build_demo_collection

    out = tmp_path_factory.mktemp("collection")
    cfg = DemoConfig(
        n_gallery=10, instances_per_object=1, n_distractors=2, image_size=(96, 128), scale_range=(28.0, 48.0), seed=3
    )
    return build_demo_collection(str(out), cfg)


@pytest.fixture
def run_measured():
    """run(code, *args) -> the JSON object `code` prints last, run in a fresh interpreter with the repository on
    its path; there `after()` gives the growth of the peak resident memory (MiB) since `before()`."""

    def run(code: str, *args: str) -> dict:
        prelude = (
            "import json, resource, sys\n"
            "def before():\n    global _r0\n    _r0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
            "def after():\n    return (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - _r0) / 1024\n"
        )
        env = {**os.environ, "PYTHONPATH": os.path.dirname(os.path.dirname(os.path.abspath(__file__)))}
        done = subprocess.run([sys.executable, "-c", prelude + code, *args], capture_output=True, text=True, env=env)
        assert done.returncode == 0, done.stderr
        return json.loads(done.stdout.strip().splitlines()[-1])

    return run


@pytest.fixture(scope="session")
def s3_server():
    """An S3-compatible server (moto) on 127.0.0.1, with the standard AWS_* variables pointing at it."""
    from benchmarks.fault_relay import start_moto

    proc, endpoint = start_moto()
    env = {
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    yield endpoint
    proc.terminate()
    proc.wait(timeout=10)
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture(scope="module")
def ray_local(s3_server):
    """One Ray per module (2 CPUs), started after the S3 server so its workers see the endpoint."""
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="warning")
    yield
    ray.shutdown()


def pytest_collection_modifyitems(config, items):
    """`gpu` tests are skipped on machines without CUDA (CI never has one)."""
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
