"""Matcher checkpoints: one safetensors file whose metadata holds the model config as JSON; loading never unpickles."""

from __future__ import annotations

import dataclasses
import json

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from roiqa import uri as uri_mod
from roiqa.config import ModelConfig, from_dict, to_dict
from roiqa.models.matcher import Matcher

CONFIG_KEY = "roiqa.model_config"


def save_matcher(
    model: Matcher, uri: str, extra: dict[str, str] | None = None, dtype: torch.dtype | None = None
) -> bytes:
    """Write the matcher's weights and config to `uri` (.safetensors); returns the bytes written.

    `dtype` (e.g. torch.float16) stores floating-point weights at that precision (half the bytes); loading casts
    them back to the model's float32.
    """
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    if dtype is not None:
        state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
    meta = {CONFIG_KEY: json.dumps(to_dict(model.cfg)), **(extra or {})}
    data = st_save(state, metadata=meta)
    uri_mod.write_bytes(uri, data)
    return data


def read_metadata(data: bytes, name: str) -> dict[str, str]:
    """The `__metadata__` of safetensors bytes (its JSON header), validated before anything else is read."""
    if len(data) < 8:
        raise ValueError(f"{name}: not a safetensors checkpoint (too short)")
    n = int.from_bytes(data[:8], "little")
    if n <= 0 or 8 + n > len(data):
        raise ValueError(f"{name}: not a safetensors checkpoint (bad header length)")
    try:
        header = json.loads(data[8 : 8 + n])
    except ValueError as exc:
        raise ValueError(f"{name}: not a safetensors checkpoint ({exc})") from exc
    return header.get("__metadata__", {}) or {}


def load_matcher(uri: str | None, cfg: ModelConfig | None = None) -> Matcher:
    """A Matcher from a checkpoint URI, or a randomly initialised one from `cfg` (seeded) when `uri` is None.

    The checkpoint's own config wins over `cfg`; weights must match it exactly.
    """
    if uri is None:
        return Matcher(cfg or ModelConfig())
    data = uri_mod.read_bytes(uri)
    model = Matcher(_config(read_metadata(data, uri), uri))
    state = st_load(data)
    ref = model.state_dict()
    state = {k: v.to(ref[k].dtype) if k in ref and v.is_floating_point() else v for k, v in state.items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"{uri}: weights do not match the config: missing {missing[:5]}, unexpected {unexpected[:5]}")
    return model


def _config(meta: dict[str, str], uri: str) -> ModelConfig:
    if CONFIG_KEY not in meta:
        raise ValueError(f"{uri}: safetensors file without {CONFIG_KEY!r} metadata is not a roiqa checkpoint")
    model_cfg = from_dict(ModelConfig, json.loads(meta[CONFIG_KEY]), where=f"{uri}:{CONFIG_KEY}")
    # The checkpoint carries every weight: skip any backbone_weights file the config names.
    return dataclasses.replace(model_cfg, backbone_weights=None)


def model_config(uri: str | None, cfg: ModelConfig) -> ModelConfig:
    """The config of the model `load_matcher(uri, cfg)` would build, reading only the checkpoint's header."""
    if uri is None:
        return cfg
    fs, path = uri_mod.filesystem(uri)
    with fs.open(path, "rb") as f:
        head = f.read(8)
        n = int.from_bytes(head, "little") if len(head) == 8 else 0
        head += f.read(n) if 0 < n < 100_000_000 else b""
    return _config(read_metadata(head, uri), uri)


def describe(uri: str | None, cfg: ModelConfig) -> dict:
    """What a manifest records about the model: its URI (or random init with seed) and config."""
    if uri is None:
        weights = f"random-init(seed={cfg.seed})" if not cfg.backbone_weights else f"backbone:{cfg.backbone_weights}"
        return {"uri": None, "weights": weights, "config": to_dict(cfg)}
    return {"uri": uri, "weights": "checkpoint", "config": to_dict(model_config(uri, cfg))}
