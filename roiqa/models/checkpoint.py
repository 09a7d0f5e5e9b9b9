"""Checkpoints: safetensors files whose string metadata holds the model's config as JSON; loading never unpickles.

`save_weights` / `load_weights` are the one way every model's weights are written and read (the matcher, the patch
network, the ROI-mask verifier, task profiles, training state); the rest of this module is the matcher's.
"""

from __future__ import annotations

import dataclasses
import json

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from roiqa.config import ModelConfig, from_dict, to_dict
from roiqa.io import uri as uri_mod
from roiqa.models.matcher import Matcher

CONFIG_KEY = "roiqa.model_config"
BODY = "body.body."  # state-dict prefix of the backbone's body (what a body-less checkpoint leaves out)
OPTIONAL = ("whitening.",)  # weights older checkpoints lack: they keep their initial (identity) values


def save_weights(
    state: dict[str, torch.Tensor], uri: str, metadata: dict[str, str], dtype: torch.dtype | None = None
) -> bytes:
    """Write a state dict with string `metadata` as safetensors to `uri`; returns the bytes written. `dtype`
    stores floating-point tensors at that precision (`load_weights` casts them back to the module's)."""
    state = {k: v.detach().contiguous().cpu() for k, v in state.items()}
    if dtype is not None:
        state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
    data = st_save(state, metadata=metadata)
    uri_mod.write_bytes(uri, data)
    return data


def read_tensors(data: bytes, name: str) -> dict[str, torch.Tensor]:
    """The tensors of safetensors `data`; a ValueError naming `name` when it is not one."""
    try:
        return st_load(data)
    except Exception as exc:  # noqa: BLE001 - safetensors raises its own SafetensorError
        raise ValueError(f"{name}: not a safetensors checkpoint ({exc})") from exc


def load_weights(module: torch.nn.Module, data: bytes, name: str, may_miss=None) -> torch.nn.Module:
    """Load safetensors `data` into `module`, every tensor cast to the dtype of the module's own; `may_miss(key)`:
    weights the file may lack (they keep their initial values). Errors are ValueErrors naming `name`."""
    state = read_tensors(data, name)
    ref = module.state_dict()
    state = {k: v.to(ref[k].dtype) if k in ref and v.is_floating_point() else v for k, v in state.items()}
    try:
        missing, unexpected = module.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # a shape mismatch
        raise ValueError(f"{name}: weights do not match the config ({exc})") from exc
    missing = [k for k in missing if not (may_miss and may_miss(k))]
    if missing or unexpected:
        raise ValueError(f"{name}: weights do not match the config: missing {missing[:5]}, unexpected {unexpected[:5]}")
    return module


def save_matcher(
    model: Matcher,
    uri: str,
    extra: dict[str, str] | None = None,
    dtype: torch.dtype | None = None,
    include_body: bool = True,
) -> bytes:
    """Write the matcher's weights and config to `uri` (.safetensors); returns the bytes written.

    `dtype` (e.g. torch.float16) stores floating-point weights at that precision (half the bytes); loading casts
    them back to the model's float32. `include_body=False` leaves the backbone's body out: loading then takes it
    from the config's `backbone_weights` (a pinned package's file), so a checkpoint of a frozen pretrained body
    holds only what was trained.
    """
    if not include_body and not model.cfg.backbone_weights:
        raise ValueError("include_body=False needs model.backbone_weights to load the body from")
    state = model.state_dict()
    if not include_body:
        state = {k: v for k, v in state.items() if not k.startswith(BODY)}
    return save_weights(state, uri, {CONFIG_KEY: json.dumps(to_dict(model.cfg)), **(extra or {})}, dtype)


def read_metadata(data: bytes, name: str) -> dict[str, str]:
    """The `__metadata__` of safetensors bytes (its JSON header), validated before anything else is read."""
    return read_header(data, name).get("__metadata__", {}) or {}


def read_header(data: bytes, name: str) -> dict:
    """The JSON header of safetensors bytes (tensor names -> dtype, shape, offsets; and `__metadata__`)."""
    if len(data) < 8:
        raise ValueError(f"{name}: not a safetensors checkpoint (too short)")
    n = int.from_bytes(data[:8], "little")
    if n <= 0 or 8 + n > len(data):
        raise ValueError(f"{name}: not a safetensors checkpoint (bad header length)")
    try:
        header = json.loads(data[8 : 8 + n])
    except ValueError as exc:
        raise ValueError(f"{name}: not a safetensors checkpoint ({exc})") from exc
    if not isinstance(header, dict):
        raise ValueError(f"{name}: not a safetensors checkpoint (header is not a JSON object)")
    return header


def load_matcher(uri: str | None, cfg: ModelConfig | None = None) -> Matcher:
    """A Matcher from a checkpoint URI, or a randomly initialised one from `cfg` (seeded) when `uri` is None.

    The checkpoint's own config wins over `cfg`; weights must match it exactly.
    """
    if uri is None:
        return Matcher(cfg or ModelConfig())
    data = uri_mod.read_bytes(uri)
    header = read_header(data, uri)  # validated before safetensors parses anything
    with_body = _has_body(header)
    model_cfg = _config(header.get("__metadata__", {}) or {}, uri, keep_weights=not with_body)
    if not with_body and not model_cfg.backbone_weights:
        raise ValueError(f"{uri}: checkpoint without body weights and without model.backbone_weights to load them")
    model = Matcher(model_cfg)

    def may_miss(k: str) -> bool:
        return k.startswith(OPTIONAL) or (not with_body and k.startswith(BODY))

    return load_weights(model, data, uri, may_miss)


def _has_body(names) -> bool:
    """Whether tensor names (a state dict's or a safetensors header's keys) include the backbone's body."""
    return any(k.startswith(BODY) for k in names)


def _config(meta: dict[str, str], uri: str, keep_weights: bool = False) -> ModelConfig:
    if CONFIG_KEY not in meta:
        raise ValueError(f"{uri}: safetensors file without {CONFIG_KEY!r} metadata is not a roiqa checkpoint")
    model_cfg = from_dict(ModelConfig, json.loads(meta[CONFIG_KEY]), where=f"{uri}:{CONFIG_KEY}")
    if keep_weights:  # a body-less checkpoint: the body comes from the backbone_weights its config names
        return model_cfg
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
    header = read_header(head, uri)
    return _config(header.get("__metadata__", {}) or {}, uri, keep_weights=not _has_body(header))


def describe(uri: str | None, cfg: ModelConfig) -> dict:
    """What a manifest records about the model: its URI (or random init with seed) and config."""
    if uri is None:
        weights = f"random-init(seed={cfg.seed})" if not cfg.backbone_weights else f"backbone:{cfg.backbone_weights}"
        return {"uri": None, "weights": weights, "config": to_dict(cfg)}
    return {"uri": uri, "weights": "checkpoint", "config": to_dict(model_config(uri, cfg))}
