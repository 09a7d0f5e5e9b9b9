"""Shared command-line pieces of the jobs: config loading, logging, error reporting."""

from __future__ import annotations

import argparse
import logging
import sys

from roiqa.config import RoiqaConfig, load_config


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """--help of a job: the description as written, and "(default: X)" after each option's help unless the help
    already names its default or there is none to show (None, an off flag, an empty list). Options whose default is
    None say in words where the value then comes from, e.g. "(default: the config's query.top_k)"."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        d = action.default
        nothing = d is None or d is False or d is argparse.SUPPRESS or (isinstance(d, list) and not d)
        if nothing or not action.option_strings or "default" in text:
            return text
        return f"{text} (default: %(default)s)"


class JobParser(argparse.ArgumentParser):
    """A job's parser: after parsing, relative values of its URI options resolve under --root (`add_root_arg`)."""

    def parse_known_args(self, args=None, namespace=None):
        parsed, rest = super().parse_known_args(args, namespace)
        return under_root(parsed), rest


def job_parser(verb: str, description: str | None, **kwargs) -> argparse.ArgumentParser:
    """The argument parser of `roiqa <verb>` (prog "roiqa <verb>", defaults shown in --help)."""
    return JobParser(prog=f"roiqa {verb}", description=description, formatter_class=HelpFormatter, **kwargs)


# Values of URI options that name something other than a location, left as they are under --root.
NOT_LOCATIONS = {"bundled", "none"}


def add_root_arg(p: argparse.ArgumentParser, *names: str) -> None:
    """--root URI: the relative values of the options `names` (dest names) resolve under it, so a deployment sets
    its bucket once (cluster/kuberay writes it into every entrypoint) and names the rest relative to it."""
    flags = ", ".join("--" + n.replace("_", "-") for n in names)
    p.add_argument(
        "--root",
        default=None,
        help=f"a bucket or folder URI that relative values of {flags} resolve under (default: none; a relative "
        "value is a local path)",
    )
    p.set_defaults(uri_options=names)


def under_root(args: argparse.Namespace) -> argparse.Namespace:
    """`args` with every relative value of its URI options joined onto --root (absolute paths and URIs with a
    scheme stay as given)."""
    from roiqa.io import uri as uri_mod

    root = getattr(args, "root", None)
    if not root:
        return args

    def resolve(value: str) -> str:
        if value in NOT_LOCATIONS or "://" in value or value.startswith("/"):
            return value
        return uri_mod.join(root, value)

    lists = set(getattr(args, "list_options", ()))
    for name in getattr(args, "uri_options", ()):
        value = getattr(args, name, None)
        if isinstance(value, str) and value:
            parts = [x.strip() for x in value.split(",")] if name in lists else [value]
            setattr(args, name, ",".join(resolve(x) for x in parts))
    return args


def add_config_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--config",
        default=None,
        help="YAML config, one section per component (model, preprocess, index, query, ...); unknown keys are an "
        "error (default: the built-in settings, roiqa/config.py)",
    )


def add_model_arg(p: argparse.ArgumentParser, prefix: str = "") -> None:
    """--model: a checkpoint URI; default the shipped checkpoint, 'none' a random init (roiqa.weights.resolve_model)."""
    p.add_argument(
        "--model",
        default=None,
        help=f"{prefix}matcher checkpoint (.safetensors URI); default: the shipped checkpoint; 'none': random init",
    )


def add_quiet_arg(p: argparse.ArgumentParser) -> None:
    """--quiet: no progress lines on stderr (they are printed when stderr is a terminal, or with ROIQA_PROGRESS=1)."""
    p.add_argument(
        "--quiet",
        action="store_true",
        help="print no progress lines on stderr (shown on a terminal, or with ROIQA_PROGRESS=1, one line per stage)",
    )


def progress_for(verb: str, args: argparse.Namespace):
    """The `roiqa.progress.Progress` of a job: on as `--quiet`, ROIQA_PROGRESS and stderr being a terminal say."""
    from roiqa.progress import Progress, wanted

    return Progress(f"roiqa {verb}", wanted(getattr(args, "quiet", False)))


def config_from(args: argparse.Namespace, **sections: dict | None) -> RoiqaConfig:
    """The YAML config with command-line overrides per section (only the options that were given)."""
    over = {name: {k: v for k, v in (values or {}).items() if v is not None} for name, values in sections.items()}
    return load_config(args.config, {k: v for k, v in over.items() if v})


def add_index_args(p: argparse.ArgumentParser, index_help: str) -> None:
    """The arguments `roiqa index` and `roiqa reindex` share: images, index, model, actors, batch size, stages,
    config."""
    p.add_argument("--images", required=True, help="folder/prefix of images or .tar shards, or a Parquet manifest")
    p.add_argument("--index", required=True, help=index_help)
    add_root_arg(p, "images", "index", "model")
    add_model_arg(p)
    p.add_argument("--actors", type=int, default=None, help="embedding actors (default: the config's index.actors)")
    p.add_argument(
        "--batch-size", type=int, default=None, help="images per batch (default: the config's index.batch_size)"
    )
    add_stage_flags(p, "complexity", "masks")
    add_config_arg(p)
    add_quiet_arg(p)


def add_stage_flags(p: argparse.ArgumentParser, *stages: str) -> None:
    """--<stage> / --no-<stage> switches for the optional stages (override <stage>.enabled of the config)."""
    helps = {
        "complexity": "index: store each image's complexity map and quadtree patch layout (and a patch embedding "
        "with complexity.model)",
        "masks": "index: store a per-pixel confidence mask of each image for every task profile in masks.profiles",
        "refine": "query: refine every reranked box by adjusting its size against the query, step by step",
        "verify": "query: check every reranked region with the ROI-mask classifier (verify_prob column, mixed into "
        "the score)",
        "geometry": "query: check every reranked pair with SIFT + RANSAC homography (inliers column)",
    }
    for stage in stages:
        p.add_argument(
            f"--{stage}",
            action=argparse.BooleanOptionalAction,
            default=None,
            help=f"{helps[stage]} (default: the config's {stage}.enabled)",
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
    from roiqa.io.redact import install_log_filter, redact
    from roiqa.io.uri import StorageUnavailable

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
        help="unlabeled photographs, (query, positive) pairs are synthesised from them: comma-separated folders / "
        "prefixes and 'bundled' (the training photographs shipped inside scikit-image), e.g. bundled,.cache/photos",
    )
    src.add_argument(
        "--manifest", help="Parquet of uri, instance_id, x0, y0, x1, y1 (roiqa.train.data.import_coco makes one)"
    )
    src.add_argument("--data", help="either of the above: a .parquet URI is a manifest, anything else images")
    add_root_arg(p, "images", "manifest", "data", "out")
    p.set_defaults(list_options=("images",))


def data_source(args: argparse.Namespace) -> tuple[str | None, str | None]:
    """(images, manifest) from the arguments of `add_data_args`: --data by its suffix."""
    if args.data is not None:
        return (None, args.data) if args.data.lower().endswith(".parquet") else (args.data, None)
    return args.images, args.manifest
