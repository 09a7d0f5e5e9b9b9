"""The `roiqa` command line: version, usage, every verb's --help, and errors caught before Ray starts."""

from __future__ import annotations

import os
import subprocess
import sys
from importlib import metadata

import pytest

from jobs import cli

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def roiqa(*args: str) -> subprocess.CompletedProcess:
    """`roiqa ARGS` as a separate process (this checkout first on the path)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([REPO, os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "jobs.cli", *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120, check=False)


def test_version_is_the_installed_package_version():
    p = roiqa("--version")
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip() == f"roiqa {metadata.version('roiqa')}"


def test_bare_command_prints_usage_on_stderr_and_exits_2():
    p = roiqa()
    assert p.returncode == 2
    assert p.stderr.startswith("usage: roiqa") and p.stdout == ""
    assert all(verb in p.stderr for verb in cli.VERBS)


def test_dispatch(capsys):
    assert cli.main(["--help"]) == 0
    assert "index" in capsys.readouterr().out
    assert cli.main(["nope"]) == 2
    assert "unknown verb 'nope'" in capsys.readouterr().err


@pytest.mark.parametrize("verb", list(cli.VERBS))
def test_every_verb_help_names_itself_and_reads_plainly(verb, capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main([verb, "--help"])
    assert exit_.value.code == 0
    text = capsys.readouterr().out
    assert text.startswith(f"usage: roiqa {verb} ")
    assert "seed 0" not in text  # no references to the design's source documents
    assert "default: None" not in text  # an option without a fixed default says where its value comes from


def test_help_shows_defaults(capsys):
    with pytest.raises(SystemExit):
        cli.main(["demo", "--help"])
    assert "(default: 48)" in capsys.readouterr().out  # --n-gallery
    with pytest.raises(SystemExit):
        cli.main(["query", "--help"])
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    assert "(default: the config's query.top_k)" in text
    assert "(default: the config's geometry.enabled)" in text


def test_query_on_a_missing_index_fails_before_ray_starts(tmp_path, monkeypatch, capsys):
    import ray

    import pipelines.query
    from jobs import query as query_job

    def no_ray(*args, **kwargs):
        raise AssertionError("Ray was started for a query whose index does not exist")

    monkeypatch.setattr(pipelines.query, "init_ray", no_ray)
    missing = str(tmp_path / "no-index")
    argv = ["--index", missing, "--queries", str(tmp_path), "--out", str(tmp_path / "out")]
    assert query_job.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("roiqa query: error: ") and missing in err[0]
    assert not ray.is_initialized()
    assert not os.path.exists(tmp_path / "out")  # nothing written either


def test_root_resolves_relative_locations_and_leaves_the_rest():
    from jobs import query, train

    args = query.parser().parse_args(
        ["--root", "s3://b/prefix/", "--index", "index", "--queries", "q/queries.parquet", "--out", "/abs/out"]
    )
    assert args.index == "s3://b/prefix/index" and args.queries == "s3://b/prefix/q/queries.parquet"
    assert args.out == "/abs/out"
    args = query.parser().parse_args(["--root", "s3://b", "--index", "file:///x/index", "--queries", "q", "--out", "o"])
    assert (args.index, args.queries, args.out) == ("file:///x/index", "s3://b/q", "s3://b/o")
    args = train.parser().parse_args(["--root", "/data", "--images", "bundled", "--out", "runs"])
    assert (args.images, args.out, args.config) == ("bundled", "/data/runs", None)  # not a location; not under root
    args = train.parser().parse_args(["--root", "s3://b", "--images", "bundled, photos,/abs/p", "--out", "runs"])
    assert args.images == "bundled,s3://b/photos,/abs/p"  # a list of photo sources: each part on its own
    args = query.parser().parse_args(["--index", "index", "--queries", "q", "--out", "o"])
    assert (args.index, args.queries, args.out) == ("index", "q", "o")  # without --root: as given


def test_reindex_ends_with_a_line_for_people():
    from jobs.reindex import summary_line
    from pipelines.reindex import ReindexReport

    counts = {"listed": 64, "new": 3, "changed": 1, "deleted": 0, "unchanged": 60, "indexed": 64, "errors": 0}
    r = ReindexReport("/i", "run", "published", "incremental", "", "v1", "v2", counts, 12.34, 10.0)
    assert summary_line(r) == (
        "roiqa reindex: incremental against version v1: 3 new, 1 changed, 0 deleted, 60 unchanged; "
        "published version v2: 64 images indexed, 0 errors in 12.3 s"
    )
    same = ReindexReport("/i", "run", "unchanged", "incremental", "", "v2", None, {**counts, "new": 0}, 1.0, 0.0)
    assert summary_line(same).endswith("nothing changed; version v2 stays published in 1.0 s")
    full = ReindexReport("/i", "run", "published", "full", "no published version", None, "v1", counts, 2.0, 1.0)
    assert summary_line(full).startswith("roiqa reindex: full (no published version): 3 new")
