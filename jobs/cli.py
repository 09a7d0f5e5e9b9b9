"""The `roiqa` command: one verb per job module (`roiqa index ...` == `python -m jobs.index ...`)."""

from __future__ import annotations

import importlib
import sys

VERBS = {
    "demo": ("jobs.demo", "build a sample collection from bundled photographs, index it, query it, print metrics"),
    "index": ("jobs.index", "embed an image collection into a new published index version"),
    "reindex": ("jobs.reindex", "incremental re-index: embed only new and changed images, drop deleted ones"),
    "query": ("jobs.query", "search an index for query patches: ranked images, scores, boxes, heatmaps"),
    "train": ("jobs.train", "train the matcher with Ray Train (self-supervised photographs or a box manifest)"),
    "tune": ("jobs.tune", "Ray Tune sweep (PBT / PB2 / ASHA) over loss weights, temperatures, lr, ROI refinement"),
    "eval": ("jobs.eval", "mAP, Recall@K and localization AP@0.5 of results against ground truth"),
    "profile": ("jobs.profile", "train a task profile (confidence estimator + thresholds) for the masks stage"),
    "verifier": ("jobs.verifier", "train the ROI-mask verifier used by the query pipeline's verify stage"),
    "coarse": ("jobs.coarse", "fit the coarse stage's regional whitening on training photographs; write a checkpoint"),
    "photos": ("jobs.photos", "fetch the photographs of Debian wallpaper packages into a local cache, for training"),
    "submit": ("jobs.submit", "submit a roiqa verb as a Ray job to a running cluster"),
}


def usage() -> str:
    lines = ["usage: roiqa [--version] <verb> [options]", "", "verbs:"]
    lines += [f"  {v:<9} {doc}" for v, (_, doc) in VERBS.items()]
    lines += ["", "options:", "  -h, --help  show this message", "  --version   print roiqa's version"]
    lines += ["", "`roiqa <verb> --help` for a verb's options."]
    return "\n".join(lines)


def version() -> str:
    """The installed package's version (importlib.metadata), else roiqa.__version__ (a source tree)."""
    from importlib import metadata

    try:
        return metadata.version("roiqa")
    except metadata.PackageNotFoundError:
        import roiqa

        return getattr(roiqa, "__version__", "unknown")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv:
        print(usage(), file=sys.stderr)
        return 2
    if argv[0] in ("-h", "--help"):
        print(usage())
        return 0
    if argv[0] in ("-V", "--version"):
        print(f"roiqa {version()}")
        return 0
    verb, rest = argv[0], argv[1:]
    if verb not in VERBS:
        print(f"roiqa: unknown verb {verb!r}\n\n{usage()}", file=sys.stderr)
        return 2
    return importlib.import_module(VERBS[verb][0]).main(rest)


if __name__ == "__main__":
    raise SystemExit(main())
