"""roiqa.progress: the stage lines' times and rates, and when a job prints them."""

from __future__ import annotations

import io

import pytest

from roiqa.progress import Progress, rate, timed, wanted


class _Stream(io.StringIO):
    def __init__(self, tty: bool):
        super().__init__()
        self.tty = tty

    def isatty(self) -> bool:
        return self.tty


def test_rate_and_line_against_hand_computed_values():
    assert rate(64, 21.3) == pytest.approx(3.004694835680751)  # 64 / 21.3
    assert rate(5, 0.0) is None
    assert timed("embedded 64 images", 21.3, 64, "images") == "embedded 64 images in 21.3 s, 3.0 images/s"
    assert timed("reranked 19200 pairs", 0.4, 19200, "pairs") == "reranked 19200 pairs in 0.4 s, 48,000.0 pairs/s"
    assert timed("wrote faiss index", 0.04) == "wrote faiss index in 0.0 s"  # no count: no rate
    assert timed("listed 3 inputs", 0.0, 3, "inputs") == "listed 3 inputs in 0.0 s"  # no time measured: no rate


def test_progress_prints_prefixed_lines_only_when_enabled():
    out = _Stream(False)
    Progress("roiqa index", True, out).done("embedded 10 images", 2.5, 10, "images")
    Progress("roiqa index", False, out).say("hidden")
    assert out.getvalue() == "roiqa index: embedded 10 images in 2.5 s, 4.0 images/s\n"


def test_wanted_follows_quiet_env_and_terminal(monkeypatch):
    monkeypatch.delenv("ROIQA_PROGRESS", raising=False)
    assert wanted(False, _Stream(True)) and not wanted(False, _Stream(False))
    assert not wanted(True, _Stream(True))  # --quiet
    monkeypatch.setenv("ROIQA_PROGRESS", "1")
    assert wanted(False, _Stream(False)) and not wanted(True, _Stream(False))
    monkeypatch.setenv("ROIQA_PROGRESS", "0")
    assert not wanted(False, _Stream(True))
