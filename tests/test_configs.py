"""Shipped YAML configs load strictly, and default.yaml documents exactly the defaults."""

from __future__ import annotations

import glob
import os

from roiqa.config import RoiqaConfig, load_config

CONFIGS = os.path.join(os.path.dirname(__file__), "..", "jobs", "configs")


def test_default_yaml_is_the_dataclass_defaults():
    assert load_config(os.path.join(CONFIGS, "default.yaml")) == RoiqaConfig()


def test_every_shipped_config_loads():
    # tune-space*.yaml are search spaces of `roiqa tune` (tests/test_tune_space.py loads them), not configs
    paths = sorted(p for p in glob.glob(os.path.join(CONFIGS, "*.yaml")) if not os.path.basename(p).startswith("tune-"))
    assert paths
    for p in paths:
        assert isinstance(load_config(p), RoiqaConfig)
