"""The matcher checkpoint that ships with roiqa (docs/model.md, "Model weights") and how `--model` resolves."""

from __future__ import annotations

import os

SHIPPED_NAME = "roiqa-effl0.safetensors"
WEIGHTS_DIR = os.path.dirname(os.path.abspath(__file__))  # the checkpoint, the verifier and the task profiles
SHIPPED = os.path.join(WEIGHTS_DIR, SHIPPED_NAME)
RANDOM = ("none", "random")  # --model values meaning: no checkpoint, a randomly initialised network (config seed)


def resolve_model(arg: str | None) -> str | None:
    """The checkpoint URI a `--model` value names: None or "default" -> the shipped checkpoint (None when this
    install has none), "none" / "random" -> None (random initialisation), anything else -> itself."""
    if arg is None or arg == "default":
        return SHIPPED if os.path.isfile(SHIPPED) else None
    if arg.lower() in RANDOM:
        return None
    return arg
