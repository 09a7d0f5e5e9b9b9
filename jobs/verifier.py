"""`roiqa verifier`: train one variant of the ROI-mask verifier (the query's verify stage); write checkpoint and log."""

from __future__ import annotations

import argparse
import json
import sys

from jobs.common import job_parser, run


def parser() -> argparse.ArgumentParser:
    from roiqa.models.roimask import MERGE_OPS, MERGES

    p = job_parser("verifier", __doc__)
    p.add_argument(
        "--out",
        required=True,
        help="checkpoint URI (.safetensors); the log goes to <out minus .safetensors>.train_log.json",
    )
    p.add_argument("--merge", default="first", choices=sorted(MERGES), help="where the mask enters the classifier")
    p.add_argument("--op", default="add", choices=MERGE_OPS, help="merge of the attention map (side variants)")
    p.add_argument("--steps", type=int, default=None, help="optimiser steps (default: 800)")
    p.add_argument(
        "--pool",
        type=int,
        default=None,
        help="views drawn once, then resampled; 0: fresh views every step (default: 12288)",
    )
    p.add_argument("--batch-size", type=int, default=None, help="views per step (default: 32)")
    p.add_argument("--instances", type=int, default=None, help="training instances = classes (default: 100)")
    p.add_argument("--holdout-instances", type=int, default=None, help="held-out crops for calibration (default: 48)")
    p.add_argument("--eval-views", type=int, default=None, help="held-out views for accuracy (default: 512)")
    p.add_argument("--input-size", type=int, default=96, help="side of the net's square input (pixels)")
    p.add_argument(
        "--seed", type=int, default=None, help="random seed of instances, views and initialisation (default: 0)"
    )
    p.add_argument("--threads", type=int, default=1, help="torch threads")
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    return p


def log_uri(out: str) -> str:
    """Where the JSON log of the checkpoint `out` goes."""
    return (out[: -len(".safetensors")] if out.endswith(".safetensors") else out) + ".train_log.json"


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)

    def go() -> int:
        import dataclasses

        import torch

        from roiqa.io import uri as uri_mod
        from roiqa.models.roimask import variant_config
        from roiqa.stages.verify import save_verifier
        from roiqa.train.verifier import VerifierTrainConfig, train_verifier

        torch.set_num_threads(max(1, args.threads))
        over = {"steps": args.steps, "batch_size": args.batch_size, "instances": args.instances, "seed": args.seed}
        over.update(holdout_instances=args.holdout_instances, eval_views=args.eval_views, pool=args.pool)
        cfg = dataclasses.replace(VerifierTrainConfig(), **{k: v for k, v in over.items() if v is not None})
        model_cfg = variant_config(args.merge, args.op, input_size=args.input_size, num_classes=cfg.instances)
        progress = None if args.quiet else (lambda line: print(line, file=sys.stderr, flush=True))
        model, report = train_verifier(model_cfg, cfg, log=progress)
        command = ["python", "-m", "jobs.verifier", *(sys.argv[1:] if argv is None else argv)]
        report = {"merge": args.merge, "op": args.op, "command": command, **report}
        data = save_verifier(model, args.out, model.calibration, report)
        report["checkpoint_bytes"] = len(data)
        uri_mod.write_bytes(log_uri(args.out), (json.dumps(report, indent=2) + "\n").encode("utf-8"))
        summary = {k: report[k] for k in ("loss_last", "heldout_acc", "heldout_acc_small", "verify_auc_holdout")}
        print(json.dumps({"out": args.out, **summary, "checkpoint_bytes": len(data)}))
        return 0

    return run(go, "verifier")


if __name__ == "__main__":
    sys.exit(main())
