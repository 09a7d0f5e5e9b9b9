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


def config_from(args: argparse.Namespace, query: dict | None = None, index: dict | None = None) -> RoiqaConfig:
    """The YAML config with command-line overrides (only the options that were given)."""
    over = {}
    if query:
        over["query"] = {k: v for k, v in query.items() if v is not None}
    if index:
        over["index"] = {k: v for k, v in index.items() if v is not None}
    return load_config(args.config, {k: v for k, v in over.items() if v})


def run(fn, argv_name: str) -> int:
    """Run `fn()`; user errors (bad input, missing files) print one clear line and return 2."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        return fn()
    except (ValueError, FileNotFoundError) as exc:
        print(f"roiqa {argv_name}: error: {exc}", file=sys.stderr)
        return 2
