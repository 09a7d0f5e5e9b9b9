"""The code passes ruff (lint and format), and roiqa/ stays free of Ray (a banned-import rule in roiqa/ruff.toml)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _ruff() -> str:
    exe = os.path.join(os.path.dirname(sys.executable), "ruff")
    found = exe if os.path.exists(exe) else shutil.which("ruff")
    if found is None:
        if os.environ.get("CI"):
            pytest.fail("ruff is not installed (it is a dev dependency: pip install -e .[dev])")
        pytest.skip("ruff is not installed")
    return found


def _run(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([_ruff(), *args], cwd=ROOT, input=stdin, capture_output=True, text=True, timeout=120)


def test_the_code_passes_ruff_check_and_format():
    check = _run("check", ".")
    assert check.returncode == 0, check.stdout + check.stderr
    fmt = _run("format", "--check", ".")
    assert fmt.returncode == 0, fmt.stdout + fmt.stderr


@pytest.mark.parametrize("line", ["import ray", "import ray.data", "from ray import train"])
def test_importing_ray_in_the_library_is_an_error_and_in_the_pipelines_is_not(line):
    code = f"{line}\n\n__all__ = ['ray']\n" if "from" not in line else f"{line}\n\n__all__ = ['train']\n"
    lib = _run("check", "--select", "TID251", "--stdin-filename", "roiqa/probe.py", "-", stdin=code)
    assert lib.returncode == 1 and "TID251" in lib.stdout and "Ray-free" in lib.stdout
    pipe = _run("check", "--select", "TID251", "--stdin-filename", "pipelines/probe.py", "-", stdin=code)
    assert pipe.returncode == 0, pipe.stdout
