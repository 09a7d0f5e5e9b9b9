"""`roiqa submit`: run a roiqa verb as a Ray job on a running cluster (`ray job submit`, from Python)."""

from __future__ import annotations

import argparse
import os
import re
import shlex
import sys
import time

from jobs.cli import VERBS
from jobs.common import job_parser

# Never uploaded with --working-dir (on top of what .gitignore already keeps out).
EXCLUDES = [".venv", "out", "demo-out", ".git", "**/__pycache__"]
# Names that look like credentials: the job server stores the runtime environment, so they must not go into it.
SECRET = re.compile(r"TOKEN|SECRET|PASSWORD|PASSWD|CREDENTIAL|ACCESS_KEY|API_KEY|PRIVATE_KEY", re.IGNORECASE)


def auth_headers() -> dict[str, str]:
    """The Authorization header for a token-authenticated cluster (RAY_AUTH_MODE=token), with the token from
    RAY_AUTH_TOKEN, the file named by RAY_AUTH_TOKEN_PATH, or ~/.ray/auth_token (Ray's own order). Read at every
    call, unlike Ray's process-wide token cache."""
    if os.environ.get("RAY_AUTH_MODE", "").lower() != "token":
        return {}
    token = os.environ.get("RAY_AUTH_TOKEN", "").strip()
    if not token:
        path = os.environ.get("RAY_AUTH_TOKEN_PATH") or os.path.join(os.path.expanduser("~"), ".ray", "auth_token")
        try:
            with open(path) as f:
                token = f.read().strip()
        except OSError:
            token = ""
        if not token:
            raise ValueError(
                f"RAY_AUTH_MODE=token but no token: set RAY_AUTH_TOKEN or RAY_AUTH_TOKEN_PATH, or create {path} "
                "(`ray get-auth-token --generate`)"
            )
    return {"Authorization": f"Bearer {token}"}


def client(address: str | None = None):
    """A JobSubmissionClient for the cluster's dashboard address (default RAY_ADDRESS), token included if enabled."""
    from ray.job_submission import JobSubmissionClient

    return JobSubmissionClient(address, headers=auth_headers())


def entrypoint(verb: str, args: list[str], python: str = "python") -> str:
    """The job's shell command: `python -m jobs.<verb> <args>`, arguments quoted."""
    if verb not in VERBS or verb == "submit":
        raise ValueError(f"unknown verb {verb!r}; one of: {', '.join(v for v in VERBS if v != 'submit')}")
    return " ".join([shlex.quote(python), "-m", VERBS[verb][0], *map(shlex.quote, args)])


def runtime_env(working_dir: str = ".", env_vars: dict | None = None) -> dict:
    """working_dir (uploaded, minus EXCLUDES and .gitignore) and the non-secret variables the workers need: those
    of pipelines.runtime.FORWARDED_ENV set here, then `env_vars`. A credential-like name is refused."""
    from pipelines.runtime import FORWARDED_ENV

    env = {k: os.environ[k] for k in FORWARDED_ENV if os.environ.get(k)}
    env.update({str(k): str(v) for k, v in (env_vars or {}).items()})
    secret = sorted(k for k in env if SECRET.search(k))
    if secret:
        raise ValueError(
            f"refusing to put {', '.join(secret)} into the job's runtime environment (the job server stores it); "
            "credentials must come from the nodes' own environment or instance roles"
        )
    return {"working_dir": os.path.abspath(working_dir), "env_vars": env, "excludes": list(EXCLUDES)}


def submit(
    verb: str,
    args: list[str],
    address: str | None = None,
    working_dir: str = ".",
    env_vars: dict | None = None,
    submission_id: str | None = None,
    python: str = "python",
) -> str:
    """Submit `roiqa <verb> <args>` as a Ray job; returns the submission id (a reused id is refused by Ray)."""
    cmd, env = entrypoint(verb, args, python), runtime_env(working_dir, env_vars)
    return client(address).submit_job(entrypoint=cmd, runtime_env=env, submission_id=submission_id)


def wait(client_or_address, submission_id: str, timeout_s: float = 3600.0, poll_s: float = 1.0):
    """Poll until the job is SUCCEEDED, FAILED or STOPPED: (JobStatus, logs). TimeoutError if it runs longer."""
    c = client_or_address
    if c is None or isinstance(c, str):
        c = client(c)
    deadline = time.monotonic() + timeout_s
    while not (status := c.get_job_status(submission_id)).is_terminal():
        if time.monotonic() > deadline:
            raise TimeoutError(f"Ray job {submission_id} still {status} after {timeout_s:g} s")
        time.sleep(poll_s)
    return status, c.get_job_logs(submission_id)


def parser() -> argparse.ArgumentParser:
    p = job_parser(
        "submit",
        __doc__,
        usage="roiqa submit [--address URL] [--wait] [options] -- <verb> [verb options]",
    )
    p.add_argument("--address", default=None, help="the cluster's dashboard URL (default: RAY_ADDRESS)")
    p.add_argument("--wait", action="store_true", help="wait for the job; print its status and the end of its logs")
    p.add_argument("--timeout", type=float, default=3600.0, help="seconds --wait waits")
    p.add_argument(
        "--submission-id", default=None, help="job id; Ray refuses one already used on the cluster (default: a new one)"
    )
    p.add_argument("--python", default="python", help="interpreter the job runs on the cluster")
    p.add_argument("--working-dir", default=".", help="folder uploaded as the job's working directory")
    p.add_argument("--env", action="append", default=[], metavar="KEY=VALUE", help="extra non-secret variable")
    p.add_argument("--tail", type=int, default=40, help="log lines printed with --wait")
    p.add_argument("verb", help=f"one of: {', '.join(v for v in VERBS if v != 'submit')}")
    p.add_argument("args", nargs=argparse.REMAINDER, help="the verb's own options")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)

    def go() -> int:
        from ray.exceptions import AuthenticationError

        bad = [kv for kv in args.env if "=" not in kv]
        if bad:
            raise ValueError(f"--env {bad[0]!r}: expected KEY=VALUE")
        env = dict(kv.split("=", 1) for kv in args.env)
        address = args.address or os.environ.get("RAY_ADDRESS")
        cmd, renv = entrypoint(args.verb, args.args, args.python), runtime_env(args.working_dir, env)
        try:
            c = client(address)
            sid = c.submit_job(entrypoint=cmd, runtime_env=renv, submission_id=args.submission_id)
            print(sid, flush=True)
            if not args.wait:
                return 0
            status, logs = wait(c, sid, args.timeout)
        except (RuntimeError, OSError, AuthenticationError) as exc:  # refused, timed out, unreachable
            print(f"roiqa submit: error: {exc}", file=sys.stderr)
            return 1
        print("\n".join(logs.rstrip("\n").splitlines()[-args.tail :]))
        print(f"{sid}: {status}")
        return 0 if str(status) == "SUCCEEDED" else 1

    from jobs.common import run

    return run(go, "submit")


if __name__ == "__main__":
    raise SystemExit(main())
