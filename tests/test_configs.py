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


def test_the_cpu_torch_build_has_the_versions_pyproject_pins():
    """`make demo` on a machine without a GPU installs torch's CPU build (Makefile TORCH_CPU_PINS); it must be the
    torch and torchvision pyproject.toml pins, or `pip install -e .` would swap the build under torchvision."""
    import re

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    with open(os.path.join(root, "Makefile")) as f:
        line = re.search(r"^TORCH_CPU_PINS := (.*)$", f.read(), re.M).group(1)
    cpu = dict(re.findall(r"\b(torch|torchvision)==([\d.]+)\+cpu\b", line))
    with open(os.path.join(root, "pyproject.toml")) as f:
        pinned = dict(re.findall(r'"(torch|torchvision)==([\d.]+); platform_machine != \'aarch64\'"', f.read()))
    assert set(cpu) == {"torch", "torchvision"} and cpu == pinned, (cpu, pinned)
