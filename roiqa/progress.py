"""Progress lines of the long steps: one line per finished stage on stderr, with counts, seconds and rates."""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from typing import TextIO

# ROIQA_PROGRESS=1 prints the lines although stderr is not a terminal (logs, tests); 0 silences them on a terminal.
ENV = "ROIQA_PROGRESS"


def wanted(quiet: bool = False, stream: TextIO | None = None) -> bool:
    """Whether a job prints progress lines: never with --quiet, else as ROIQA_PROGRESS says (1 on, 0 off), else
    when `stream` (default: stderr) is a terminal."""
    if quiet:
        return False
    env = os.environ.get(ENV, "").strip().lower()
    if env:
        return env not in ("0", "false", "no", "off")
    stream = sys.stderr if stream is None else stream
    return bool(getattr(stream, "isatty", lambda: False)())


def rate(count: float, seconds: float) -> float | None:
    """Items per second; None when no time was measured."""
    return count / seconds if seconds > 0 else None


def timed(text: str, seconds: float, count: float | None = None, unit: str = "") -> str:
    """'<text> in 21.3 s, 3.0 images/s': the rate is that of `count` `unit` over `seconds` (left off without a
    count or when no time was measured)."""
    out = f"{text} in {seconds:.1f} s"
    r = rate(count, seconds) if count is not None else None
    return out if r is None else f"{out}, {r:,.1f} {unit}/s"


@dataclass(frozen=True)
class Progress:
    """Where a job's progress lines go: `prefix: text` on `stream` when `enabled`, nothing otherwise."""

    prefix: str = "roiqa"  # the command, e.g. "roiqa index"
    enabled: bool = False  # print the lines (jobs: `wanted(args.quiet)`)
    stream: TextIO | None = None  # where to print them; None: sys.stderr at the time of printing

    def say(self, text: str) -> None:
        """Print one line (flushed: the stages between lines can take minutes)."""
        if self.enabled:
            print(f"{self.prefix}: {text}", file=self.stream or sys.stderr, flush=True)

    def done(self, text: str, seconds: float, count: float | None = None, unit: str = "") -> None:
        """Print one finished stage with its time and rate (see `timed`)."""
        self.say(timed(text, seconds, count, unit))
