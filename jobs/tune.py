"""`roiqa tune`: a Ray Tune sweep over loss weights, temperatures, learning rate and ROI refinement parameters."""

from __future__ import annotations

import argparse
import json
import os
import sys

from jobs.common import add_config_arg, add_data_args, data_source, job_parser, run

DEFAULT_SPACE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs", "tune-space.yaml")


def parser() -> argparse.ArgumentParser:
    p = job_parser("tune", __doc__)
    add_data_args(p)
    p.add_argument("--out", required=True, help="output URI: trials.parquet, best.yaml, best/, plots, ray/<name>/")
    p.add_argument("--samples", type=int, default=4, help="trials (the population of PBT / PB2)")
    p.add_argument("--scheduler", default="pbt", help="pbt | pb2 | asha")
    p.add_argument("--search", default="random", help="random | optuna (optuna goes with asha)")
    p.add_argument("--space", default=DEFAULT_SPACE, help="search space YAML (default: jobs/configs/tune-space.yaml)")
    p.add_argument("--interval", type=int, default=1, help="PBT / PB2 perturbation interval in epochs")
    p.add_argument(
        "--epochs",
        type=int,
        default=None,
        help="epochs per trial, one report each (default: the config's train.epochs)",
    )
    p.add_argument(
        "--steps-per-epoch",
        type=int,
        default=None,
        help="optimiser steps per epoch (default: the config's train.steps_per_epoch)",
    )
    p.add_argument(
        "--batch-size",
        type=int,
        default=None,
        help="training triples per step (default: the config's train.batch_size)",
    )
    p.add_argument("--cpus-per-trial", type=float, default=1.0, help="CPUs per trial (its torch threads)")
    p.add_argument("--val-triples", type=int, default=8, help="validation triples per report")
    p.add_argument("--name", default="tune", help="experiment name: Tune's state goes to <out>/ray/<name>/")
    p.add_argument("--resume", action="store_true", help="restore the interrupted sweep of --out / --name")
    p.add_argument("--no-default", action="store_true", help="do not start one trial from the config's own values")
    p.add_argument(
        "--init",
        default=None,
        help="start every trial from this matcher checkpoint ('default': the shipped one; default: a new matcher "
        "built from the config's model section)",
    )
    p.add_argument("--max-failures", type=int, default=1, help="restarts per trial from its last checkpoint")
    add_config_arg(p)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)

    def go() -> int:
        from pipelines.tune import run_tune
        from roiqa.config import load_config
        from roiqa.weights import resolve_model

        over = {"epochs": args.epochs, "steps_per_epoch": args.steps_per_epoch, "batch_size": args.batch_size}
        over = {k: v for k, v in over.items() if v is not None}
        cfg = load_config(args.config, {"train": over} if over else None)
        images, manifest = data_source(args)
        r = run_tune(
            args.out,
            cfg,
            args.space,
            images=images,
            manifest=manifest,
            samples=args.samples,
            scheduler=args.scheduler,
            search=args.search,
            interval=args.interval,
            name=args.name,
            resume=args.resume,
            cpus_per_trial=args.cpus_per_trial,
            val_triples=args.val_triples,
            max_failures=args.max_failures,
            with_default=not args.no_default,
            init_model=resolve_model(args.init) if args.init else None,
        )
        print(
            json.dumps(
                {
                    "out": r.out,
                    "trials": r.trials,
                    "best_trial": r.best_trial,
                    "best_objective": None if r.trials == 0 else round(r.best_objective, 4),
                    "default_objective": None if r.default_objective is None else round(r.default_objective, 4),
                    "seconds": round(r.seconds, 1),
                }
            )
        )
        return 0

    try:
        return run(go, "tune")
    except KeyboardInterrupt:  # Ray Tune handles the first Ctrl+C itself; this is one during start-up or writing
        print("roiqa tune: interrupted; continue with the same arguments and --resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
