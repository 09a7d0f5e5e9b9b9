"""`roiqa train`: train the matcher with Ray Train on unlabeled photographs (self-supervised) or a box manifest."""

from __future__ import annotations

import argparse
import json

from jobs.common import add_config_arg, add_data_args, data_source, job_parser, run


def parser() -> argparse.ArgumentParser:
    p = job_parser("train", __doc__)
    add_data_args(p)
    p.add_argument("--out", required=True, help="output URI: checkpoints, model.safetensors, train_history.json")
    p.add_argument("--workers", type=int, default=2, help="Ray Train workers (data-parallel)")
    p.add_argument("--gpus", action="store_true", help="one GPU per worker (default: when the cluster has GPUs)")
    p.add_argument("--cpu", action="store_true", help="never use GPUs, even when the cluster has them")
    p.add_argument("--resume", action="store_true", help="continue the run of the same --out and --name")
    p.add_argument("--name", default="train", help="run name: checkpoints go to <out>/<name>/")
    p.add_argument(
        "--init",
        default=None,
        help="start from this matcher checkpoint (default: a new matcher built from the config's model section)",
    )
    p.add_argument("--epochs", type=int, default=None, help="training epochs (default: the config's train.epochs)")
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
        help="training triples per step and worker (default: the config's train.batch_size)",
    )
    p.add_argument("--lr", type=float, default=None, help="learning rate (default: the config's train.lr)")
    p.add_argument("--half", action="store_true", help="store the final model.safetensors in float16 (half size)")
    p.add_argument("--max-failures", type=int, default=2, help="worker-group restarts allowed (FailureConfig)")
    add_config_arg(p)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)

    def go() -> int:
        from pipelines.train import run_train
        from roiqa.config import load_config

        over = {"epochs": args.epochs, "steps_per_epoch": args.steps_per_epoch, "batch_size": args.batch_size}
        over["lr"] = args.lr
        over = {k: v for k, v in over.items() if v is not None}
        cfg = load_config(args.config, {"train": over} if over else None)
        use_gpu = True if args.gpus else (False if args.cpu else None)
        images, manifest = data_source(args)
        r = run_train(
            args.out,
            cfg,
            images=images,
            manifest=manifest,
            workers=args.workers,
            use_gpu=use_gpu,
            resume=args.resume,
            name=args.name,
            init_model=args.init,
            max_failures=args.max_failures,
            half=args.half,
        )
        last = [h for h in r.history if "event" not in h][-1]
        print(
            json.dumps(
                {
                    "model": r.model,
                    "run_dir": r.run_dir,
                    "epochs": r.epochs,
                    "seconds": round(r.seconds, 1),
                    "last_epoch": {k: round(v, 4) if isinstance(v, float) else v for k, v in last.items()},
                }
            )
        )
        return 0

    return run(go, "train")


if __name__ == "__main__":
    raise SystemExit(main())
