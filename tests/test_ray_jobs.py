"""roiqa verbs as Ray jobs on a real `ray start --head` (token auth on): through the job API (jobs.submit) and
through the documented commands (docs/operations.md, "Ray jobs")."""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from jobs.submit import client, submit, wait
from roiqa import schema as S
from roiqa.index import store

pytestmark = pytest.mark.cluster

REPO = Path(__file__).resolve().parents[1]
BIN = os.path.dirname(sys.executable)
JOB_TIMEOUT_S = 180.0
DOC_BLOCK = re.compile(r"<!-- ray-job-submit:begin -->\s*```bash\n(.*?)```\s*<!-- ray-job-submit:end -->", re.S)


@dataclass
class Head:
    address: str  # the job API (dashboard) URL
    env: dict[str, str]  # environment for job clients: auth variables, this venv first on PATH
    temp_dir: str
    proc: subprocess.Popen

    def state(self) -> str:
        """For failure messages: is the head alive, the end of its output and of its process-exit log."""
        text = [f"Ray head {'running' if self.proc.poll() is None else f'exited {self.proc.returncode}'}"]
        for name in ("head.log", "session_latest/logs/ray_process_exit.log"):
            try:
                with open(os.path.join(self.temp_dir, name)) as f:
                    text.append(f"--- {name}:\n{f.read()[-2000:]}")
            except OSError:
                pass
        return "\n".join(text)


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _processes() -> list[tuple[int, int, str]]:
    out = subprocess.run(["ps", "-eo", "pid=,ppid=,args="], capture_output=True, text=True, check=True).stdout
    rows = [line.split(None, 2) for line in out.splitlines()]
    return [(int(r[0]), int(r[1]), r[2] if len(r) > 2 else "") for r in rows]


def _descendants(pid: int) -> set[int]:
    children: dict[int, list[int]] = {}
    for p, pp, _ in _processes():
        children.setdefault(pp, []).append(p)
    found, todo = set(), [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            if c not in found:
                found.add(c)
                todo.append(c)
    return found


def _leftovers(known: dict[int, str], temp_dir: str) -> list[str]:
    """Processes of this head still alive: a recorded descendant (same pid and command, or a Ray worker, whose
    title changes), or one naming the head's temp dir."""
    return [
        f"{p} {a[:160]}"
        for p, _, a in _processes()
        if (p in known and (a == known[p] or a.startswith("ray::"))) or temp_dir in a
    ]


@pytest.fixture(scope="module")
def head():
    """A Ray head on 127.0.0.1 (free ports, its own short temp dir and token), stopped and checked at the end."""
    temp_dir = tempfile.mkdtemp(prefix="rq", dir="/tmp")  # short: Ray's unix sockets live under it (< 107 chars)
    token = os.path.join(temp_dir, "auth_token")
    with open(token, "w") as f:
        f.write(secrets.token_hex(32))
    auth = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": token}
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_TOKEN")}
    env.update(auth, PATH=BIN + os.pathsep + os.environ.get("PATH", ""))
    gcs, dashboard, client_server, agent = _free_ports(4)
    log_path = os.path.join(temp_dir, "head.log")
    cmd = [os.path.join(BIN, "ray"), "start", "--head", "--node-ip-address", "127.0.0.1", "--port", str(gcs)]
    cmd += ["--dashboard-host", "127.0.0.1", "--dashboard-port", str(dashboard), "--include-dashboard", "true"]
    cmd += ["--ray-client-server-port", str(client_server), "--dashboard-agent-listen-port", str(agent)]
    cmd += ["--num-cpus", "2", "--temp-dir", temp_dir, "--disable-usage-stats", "--block"]
    with open(log_path, "w") as log:
        # No drain on SIGTERM (Ray 2.60 waits up to 30 s for the node to go idle before stopping).
        head_env = {**env, "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0"}
        proc = subprocess.Popen(cmd, env=head_env, stdout=log, stderr=subprocess.STDOUT, cwd=temp_dir)
    address = f"http://127.0.0.1:{dashboard}"
    mp = pytest.MonkeyPatch()
    for k, v in auth.items():
        mp.setenv(k, v)
    mp.delenv("RAY_AUTH_TOKEN", raising=False)
    mp.delenv("RAY_ADDRESS", raising=False)
    head = Head(address, env, temp_dir, proc)
    try:
        # Up when the job API answers and the node's agent, which runs the jobs, serves HTTP (the job API waits
        # only 10 s for an agent before answering "No available agent to submit job").
        deadline, error = time.monotonic() + 90, None
        while True:
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"Ray head did not answer on {address} ({error!r})\n{head.state()}")
            try:
                client(address).list_jobs()
                try:
                    urllib.request.urlopen(f"http://127.0.0.1:{agent}/api/healthz", timeout=5).close()
                except urllib.error.HTTPError:
                    pass  # answering at all is enough
                break
            except Exception as exc:  # not up yet
                error = exc
                time.sleep(0.5)
        yield head
    finally:
        mp.undo()
        pids = _descendants(proc.pid) | {proc.pid}
        known = {p: a for p, _, a in _processes() if p in pids}
        proc.send_signal(signal.SIGTERM)  # `ray start --block` stops what it started
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        deadline = time.monotonic() + 20
        while (left := _leftovers(known, temp_dir)) and time.monotonic() < deadline:
            time.sleep(0.5)
        for line in left:  # only this head's own processes, by pid
            try:
                os.kill(int(line.split()[0]), signal.SIGKILL)
            except ProcessLookupError:
                pass
        shutil.rmtree(temp_dir, ignore_errors=True)
        assert not left, "processes of the test's Ray head outlived it:\n" + "\n".join(left)


@pytest.fixture(scope="module")
def tiny_yaml(tmp_path_factory) -> str:
    """The TINY config's model, preprocess and index values as a YAML file."""
    path = tmp_path_factory.mktemp("ray-jobs-config") / "tiny.yaml"
    cfg = {
        "model": {"fpn_channels": 32},
        "preprocess": {"image_size": 128},
        "index": {"batch_size": 8, "read_batch_size": 8},
    }
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def reports(logs: str) -> list[dict]:
    """The JSON lines `roiqa index` prints, in order."""
    return [json.loads(line) for line in logs.splitlines() if line.startswith('{"index"')]


def check_version(index: str, version: str, gallery_dir: str) -> None:
    """Every image of the folder in exactly one of the version's embeddings and errors tables."""
    v = store.open_index(index, version)
    counts, images = v.manifest["counts"], sorted(os.path.join(gallery_dir, f) for f in os.listdir(gallery_dir))
    assert counts["inputs"] == counts["indexed"] + counts["errors"] == len(images)
    uris = v.embeddings([S.URI]).column(S.URI).to_pylist() + v.errors().column(S.URI).to_pylist()
    assert sorted(uris) == images


def test_index_job_through_the_job_api(head, collection, tiny_yaml, tmp_path):
    index, missing = str(tmp_path / "index"), str(tmp_path / "no-such-folder")
    args = ["--images", collection.gallery_dir, "--index", index, "--config", tiny_yaml, "--model", "none"]
    good = submit("index", args, head.address, working_dir=str(REPO))
    bad_id = f"roiqa-test-{uuid.uuid4().hex[:8]}"
    bad_args = ["--images", missing, "--index", str(tmp_path / "bad"), "--config", tiny_yaml, "--model", "none"]
    assert submit("index", bad_args, head.address, working_dir=str(REPO), submission_id=bad_id) == bad_id
    with pytest.raises(RuntimeError, match=bad_id):  # a reused submission id is refused
        submit("index", bad_args, head.address, working_dir=str(REPO), submission_id=bad_id)

    status, logs = wait(head.address, good, JOB_TIMEOUT_S)
    assert str(status) == "SUCCEEDED", f"{logs[-3000:]}\n{head.state()}"
    (report,) = reports(logs)
    assert report["index"] == index and report["inputs"] == report["indexed"] + report["errors"]
    assert store.current_version(index) == report["version"]
    check_version(index, report["version"], collection.gallery_dir)

    status, logs = wait(head.address, bad_id, JOB_TIMEOUT_S)
    assert str(status) == "FAILED", f"{logs[-3000:]}\n{head.state()}"
    assert f"roiqa index: error: {missing}" in logs


def test_documented_job_commands(head, collection, tiny_yaml, tmp_path):
    block = DOC_BLOCK.search((REPO / "docs" / "operations.md").read_text())
    assert block, "docs/operations.md has no ```bash block between <!-- ray-job-submit:begin --> and <!-- ...:end -->"
    index = str(tmp_path / "index2")
    env = {**head.env, "RAY_ADDRESS": head.address, "IMAGES": collection.gallery_dir, "INDEX": index}
    env["CONFIG"] = tiny_yaml
    r = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", block.group(1)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=2 * JOB_TIMEOUT_S,
    )
    out = f"{r.stdout[-3000:]}\n{r.stderr[-3000:]}\n{head.state()}"
    assert r.returncode == 0, out
    runs = reports(r.stdout)  # `ray job submit` streams the job's logs, `jobs.submit --wait` prints their end
    assert len(runs) == 2 and len({x["version"] for x in runs}) == 2, out
    assert sorted(store.list_versions(index)) == sorted(x["version"] for x in runs)
    assert store.current_version(index) == runs[-1]["version"]
    for x in runs:
        check_version(index, x["version"], collection.gallery_dir)


def test_submit_refuses_credentials_and_unknown_verbs(monkeypatch):
    from jobs.submit import entrypoint, runtime_env
    from pipelines.runtime import FORWARDED_ENV

    for k in FORWARDED_ENV:
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9000")
    env = runtime_env(str(REPO), {"ROIQA_X": "1"})
    assert env["env_vars"] == {"AWS_ENDPOINT_URL": "http://127.0.0.1:9000", "ROIQA_X": "1"}
    assert env["working_dir"] == str(REPO) and ".venv" in env["excludes"]
    for key in ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "DB_PASSWORD", "my_secret"):
        with pytest.raises(ValueError, match=key) as err:
            runtime_env(str(REPO), {key: "hunter2"})
        assert "hunter2" not in str(err.value)
    assert entrypoint("index", ["--images", "a b"]) == "python -m jobs.index --images 'a b'"
    for verb in ("nope", "submit"):
        with pytest.raises(ValueError, match="unknown verb"):
            entrypoint(verb, [])
