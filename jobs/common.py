"""Shared command-line pieces of the jobs: config loading, logging, error reporting."""

from __future__ import annotations

import argparse
import logging
import sys

from roiqa.config import RoiqaConfig, load_config


def add_config_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default=None, help="YAML config (sections model, preprocess, index, query)")


def add_model_arg(p: argparse.ArgumentParser, prefix: str = "") -> None:
    """--model: a checkpoint URI; default the shipped checkpoint, 'none' a random init (roiqa.weights.resolve_model)."""
    p.add_argument(
        "--model",
        default=None,
        help=f"{prefix}matcher checkpoint (.safetensors URI); default: the shipped checkpoint; 'none': random init",
    )


def config_from(args: argparse.Namespace, **sections: dict | None) -> RoiqaConfig:
    """The YAML config with command-line overrides per section (only the options that were given)."""
    over = {name: {k: v for k, v in (values or {}).items() if v is not None} for name, values in sections.items()}
    return load_config(args.config, {k: v for k, v in over.items() if v})


def add_index_args(p: argparse.ArgumentParser, index_help: str) -> None:
    """The arguments `roiqa index` and `roiqa reindex` share: images, index, model, actors, batch size, stages,
    config."""
    p.add_argument("--images", required=True, help="folder/prefix of images or .tar shards, or a Parquet manifest")
    p.add_argument("--index", required=True, help=index_help)
    add_model_arg(p)
    p.add_argument("--actors", type=int, default=None, help="embedding actors (overrides index.actors)")
    p.add_argument("--batch-size", type=int, default=None, help="images per batch (overrides index.batch_size)")
    add_stage_flags(p, "complexity", "masks")
    add_config_arg(p)


def add_stage_flags(p: argparse.ArgumentParser, *stages: str) -> None:
    """--<stage> / --no-<stage> switches for the optional seed stages (override <stage>.enabled of the config)."""
    helps = {
        "complexity": "seed 001: complexity map, quadtree patch layout (and patch embedding with complexity.model)",
        "masks": "seed 002: confidence masks per task profile (masks.profiles)",
        "refine": "seed 000: iterative refinement of every reranked box",
        "verify": "seed 004: ROI-mask verification of every reranked region (verify_prob column)",
        "geometry": "SIFT + RANSAC homography verification of every reranked pair (inliers column)",
    }
    for stage in stages:
        p.add_argument(
            f"--{stage}", action=argparse.BooleanOptionalAction, default=None, help=f"{helps[stage]} (default: config)"
        )


def stage_overrides(args: argparse.Namespace, *stages: str) -> dict[str, dict]:
    """{stage: {"enabled": bool}} for the stage switches given on the command line."""
    return {s: {"enabled": getattr(args, s)} for s in stages if getattr(args, s, None) is not None}


EXIT_USER_ERROR = 2  # bad input, missing files, a busy index: fix the input and run again
EXIT_STORAGE_DOWN = 3  # the object store stayed unreachable: nothing was published; run again later


def _cause(exc: BaseException, kind: type) -> BaseException | None:
    """`exc` or the first exception of `kind` in its chain: `__cause__`, `__context__` and the `.cause` of Ray's
    RayTaskError (a task's exception as the driver sees it), followed breadth-first."""
    seen, todo = set(), [exc]
    while todo:
        exc = todo.pop(0)
        if exc is None or id(exc) in seen:
            continue
        cause = getattr(exc, "cause", None)
        if isinstance(exc, kind):
            return cause if isinstance(cause, kind) else exc  # Ray's wrapper prints a traceback, the cause one line
        seen.add(id(exc))
        todo += [exc.__cause__, exc.__context__, cause if isinstance(cause, BaseException) else None]
    return None


def run(fn, argv_name: str) -> int:
    """Run `fn()`; user errors (bad input, missing files) print one clear line and return 2; an unreachable
    object store returns 3. Credentials are masked in every message and log line."""
    from roiqa.redact import install_log_filter, redact
    from roiqa.uri import StorageUnavailable

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    install_log_filter()
    try:
        return fn()
    except Exception as exc:
        down = _cause(exc, StorageUnavailable)
        if down is not None:
            print(f"roiqa {argv_name}: error: {redact(str(down))}", file=sys.stderr)
            return EXIT_STORAGE_DOWN
        if isinstance(exc, (ValueError, FileNotFoundError)):
            print(f"roiqa {argv_name}: error: {redact(str(exc))}", file=sys.stderr)
            return EXIT_USER_ERROR
        raise


def add_data_args(p: argparse.ArgumentParser) -> None:
    """--images / --manifest / --data (one required): the training data of `roiqa train` and `roiqa tune`."""
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument(
        "--images",
        help="folder/prefix of unlabeled photographs: (query, positive) pairs are synthesised from them; "
        "'bundled' = the training photographs shipped inside scikit-image",
    )
    src.add_argument(
        "--manifest", help="Parquet of uri, instance_id, x0, y0, x1, y1 (roiqa.train_data.import_coco makes one)"
    )
    src.add_argument("--data", help="either of the above: a .parquet URI is a manifest, anything else images")


def data_source(args: argparse.Namespace) -> tuple[str | None, str | None]:
    """(images, manifest) from the arguments of `add_data_args`: --data by its suffix."""
    if args.data is not None:
        return (None, args.data) if args.data.lower().endswith(".parquet") else (args.data, None)
    return args.images, args.manifest
