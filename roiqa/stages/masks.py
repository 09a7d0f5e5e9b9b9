"""Seed 002 dynamic masking: a light per-pixel confidence CNN per task profile, threshold masks, RLE, and the
feedback controller that adapts a profile's threshold from the primary model's confidence.

Shapes: images (B, H, W, 3) uint8, confidence maps (B, H, W) float32 in [0, 1], masks (B, H, W) bool, valid sizes
(B, 2) int32 (h, w) of the image inside its zero-padded square (pixels outside are padding, never kept).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from roiqa.config import MaskConfig
from roiqa.io import uri as uri_mod
from roiqa.models.checkpoint import load_weights, read_metadata, save_weights
from roiqa.weights import WEIGHTS_DIR

PROFILES_DIR = os.path.join(WEIGHTS_DIR, "profiles")
PROFILE_KEY = "roiqa.task_profile"  # safetensors metadata: the TaskProfile as JSON
ESTIMATOR_KEY = "roiqa.confidence_estimator"  # safetensors metadata: the estimator's constructor arguments as JSON
_BARE_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]*$")  # a shipped profile's name; anything else is a URI


# =============================================================================================================
# Confidence estimator and task profiles
# =============================================================================================================


class ConfidenceEstimator(nn.Module):
    """(B, H, W, 3) uint8 -> (B, H, W) per-pixel relevance in [0, 1].

    Four stride-2 3x3 convs (1/2 .. 1/16) and one dilated conv for context (receptive field ~190 px), the 1/16 map
    upsampled to 1/4 and fused with the 1/4 map, a 1-channel logit at 1/4 resolution, bilinearly upsampled to the
    input size. ~65k parameters; at 512 x 512 about 0.25 GMAC per image (ResNet-18's trunk: ~9.5).
    """

    def __init__(self, widths: tuple[int, int, int, int] = (16, 32, 48, 48), fuse: int = 16) -> None:
        super().__init__()
        self.widths, self.fuse = tuple(int(w) for w in widths), int(fuse)
        w1, w2, w3, w4 = self.widths

        def block(cin: int, cout: int, stride: int = 2, dilation: int = 1) -> nn.Sequential:
            conv = nn.Conv2d(cin, cout, 3, stride, padding=dilation, dilation=dilation, bias=False)
            return nn.Sequential(conv, nn.GroupNorm(4, cout), nn.SiLU(inplace=True))

        self.down = nn.ModuleList([block(3, w1), block(w1, w2), block(w2, w3), block(w3, w4)])
        self.context = block(w4, w4, stride=1, dilation=2)
        self.fuse_conv = nn.Sequential(
            nn.Conv2d(w2 + w4, fuse, 1, bias=False), nn.GroupNorm(4, fuse), nn.SiLU(inplace=True)
        )
        self.head = nn.Sequential(block(fuse, fuse, stride=1), nn.Conv2d(fuse, 1, 1))
        nn.init.constant_(self.head[1].bias, -2.0)  # prior ~0.12: objects cover a small part of an image
        self.register_buffer("mean", torch.tensor([0.45, 0.45, 0.45]).view(1, 3, 1, 1) * 255.0, persistent=False)
        self.register_buffer("std", torch.tensor([0.25, 0.25, 0.25]).view(1, 3, 1, 1) * 255.0, persistent=False)

    def logits(self, images: torch.Tensor | np.ndarray) -> torch.Tensor:
        """(B, H, W, 3) uint8 -> (B, H, W) float32 logits (the training loss reads these)."""
        x = torch.as_tensor(images).to(self.mean.device)
        h, w = x.shape[1:3]
        x = (x.permute(0, 3, 1, 2).float() - self.mean) / self.std  # (B, 3, H, W)
        x = self.down[0](x)
        quarter = self.down[1](x)  # (B, w2, H/4, W/4)
        deep = self.context(self.down[3](self.down[2](quarter)))  # (B, w4, H/16, W/16)
        deep = F.interpolate(deep, size=quarter.shape[-2:], mode="bilinear", align_corners=False)
        z = self.head(self.fuse_conv(torch.cat([quarter, deep], dim=1)))  # (B, 1, H/4, W/4)
        return F.interpolate(z, size=(h, w), mode="bilinear", align_corners=False)[:, 0]

    def forward(self, images: torch.Tensor | np.ndarray) -> torch.Tensor:
        return torch.sigmoid(self.logits(images))

    def arch(self) -> dict:
        """Constructor arguments, as stored with a profile."""
        return {"widths": list(self.widths), "fuse": self.fuse}


@dataclass(frozen=True)
class TaskProfile:
    """How one task reads the confidence maps: the estimator weights live beside it in the same profile file."""

    name: str  # profile name (columns are derived from it by roiqa.schema.mask_columns)
    version: int = 1  # bumped whenever the weights or the thresholds change
    description: str = ""  # what "relevant" means for this task
    threshold: float = 0.5  # initial threshold: pixels with confidence above it are kept
    min_threshold: float = 0.0  # the controller never goes below this (0: may keep the whole image)
    max_threshold: float = 1.0  # the controller never goes above this
    step: float = 0.02  # controller step per probe (raise by step, lower by 2 * step)
    trained_on: str = ""  # data the estimator was trained on (free text)

    def __post_init__(self) -> None:
        if not self.name:
            raise ValueError("TaskProfile: name must be non-empty")
        if not 0.0 <= self.min_threshold <= self.threshold <= self.max_threshold <= 1.0:
            raise ValueError(
                f"TaskProfile {self.name!r}: need 0 <= min_threshold <= threshold <= max_threshold <= 1, got "
                f"{self.min_threshold}, {self.threshold}, {self.max_threshold}"
            )
        if not self.step > 0:
            raise ValueError(f"TaskProfile {self.name!r}: step must be > 0, got {self.step}")


def profile_uri(name_or_uri: str) -> str:
    """A bare name (lower-case letters, digits, '-', '_') -> the shipped file; anything else is a URI already."""
    if _BARE_NAME.match(name_or_uri):
        return os.path.join(PROFILES_DIR, f"{name_or_uri}.safetensors")
    return name_or_uri


def shipped_profiles() -> list[str]:
    """Names of the profiles shipped in roiqa/weights/profiles/."""
    if not os.path.isdir(PROFILES_DIR):
        return []
    return sorted(f[: -len(".safetensors")] for f in os.listdir(PROFILES_DIR) if f.endswith(".safetensors"))


def save_profile(profile: TaskProfile, estimator: ConfidenceEstimator, uri: str) -> bytes:
    """Write the estimator's weights with the profile (and estimator arch) as JSON metadata to `uri`."""
    meta = {PROFILE_KEY: json.dumps(dataclasses.asdict(profile)), ESTIMATOR_KEY: json.dumps(estimator.arch())}
    return save_weights(estimator.state_dict(), uri, meta)


def load_profile(name_or_uri: str) -> tuple[TaskProfile, ConfidenceEstimator]:
    """(profile, estimator in eval mode on CPU) from a shipped profile name or a profile file URI."""
    uri = profile_uri(name_or_uri)
    if uri != name_or_uri and not os.path.isfile(uri):
        raise ValueError(f"unknown task profile {name_or_uri!r}; shipped profiles: {shipped_profiles()}")
    try:
        data = uri_mod.read_bytes(uri)
    except FileNotFoundError as exc:
        raise FileNotFoundError(f"{name_or_uri}: task profile file not found") from exc
    meta = read_metadata(data, name_or_uri)
    if PROFILE_KEY not in meta or ESTIMATOR_KEY not in meta:
        raise ValueError(f"{name_or_uri}: safetensors file without {PROFILE_KEY!r} metadata is not a task profile")
    try:
        fields = json.loads(meta[PROFILE_KEY])
        arch = json.loads(meta[ESTIMATOR_KEY])
        profile = TaskProfile(**fields)
        estimator = ConfidenceEstimator(**arch)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{name_or_uri}: bad task profile metadata: {exc}") from exc
    return profile, load_weights(estimator, data, name_or_uri).eval()


# =============================================================================================================
# Masks and their text encoding
# =============================================================================================================


def threshold_mask(conf: np.ndarray, threshold: float, valid_hw: np.ndarray | None = None) -> np.ndarray:
    """Bool mask of `conf` (H, W) or (B, H, W): pixels strictly above `threshold` kept, padding outside the valid
    (h, w) top-left region (valid_hw (2,) or (B, 2)) never kept."""
    mask = np.asarray(conf) > threshold
    if valid_hw is not None:
        rows = np.arange(mask.shape[-2])
        cols = np.arange(mask.shape[-1])
        hw = np.asarray(valid_hw).reshape(-1, 2)  # (B or 1, 2)
        inside = (rows[None, :, None] < hw[:, 0, None, None]) & (cols[None, None, :] < hw[:, 1, None, None])
        mask &= inside if mask.ndim == 3 else inside[0]
    return mask


def apply_mask(images: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """A copy of `images` (..., H, W, 3) with the pixels where `mask` (..., H, W) is False set to 0 (black)."""
    return np.where(mask[..., None], images, np.zeros((), images.dtype))


def coverage(mask: np.ndarray, valid_hw: np.ndarray) -> np.ndarray:
    """(B,) float32 fraction of each image's valid pixels that `mask` (B, H, W) keeps; nan for an empty image."""
    hw = np.asarray(valid_hw).reshape(-1, 2).astype(np.float64)
    area = hw[:, 0] * hw[:, 1]
    kept = mask.reshape(mask.shape[0], -1).sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(area > 0, kept / area, np.nan).astype(np.float32)


def rle_encode(mask: np.ndarray) -> str:
    """(H, W) bool -> "H W c0 c1 ...": row-major run lengths, alternating off/on, the first run off (maybe 0)."""
    mask = np.asarray(mask, dtype=bool)
    if mask.ndim != 2:
        raise ValueError(f"rle_encode: expected an (H, W) mask, got shape {mask.shape}")
    flat = mask.ravel()
    change = np.flatnonzero(flat[1:] != flat[:-1]) + 1  # indices where a new run starts
    edges = np.concatenate([[0], change, [flat.size]])
    runs = np.diff(edges)
    if flat.size and flat[0]:
        runs = np.concatenate([[0], runs])
    if flat.size == 0:
        runs = np.array([0])
    return " ".join(str(int(v)) for v in (*mask.shape, *runs))


def rle_decode(text: str) -> np.ndarray:
    """Inverse of `rle_encode`; ValueError quoting the text when it is not a valid encoding."""
    head = text if len(text) <= 60 else text[:57] + "..."
    try:
        values = np.array([int(v) for v in text.split()], dtype=np.int64)
    except ValueError as exc:
        raise ValueError(f"rle_decode: {head!r} is not a list of integers") from exc
    if values.size < 3 or (values < 0).any():
        raise ValueError(f"rle_decode: {head!r} needs non-negative 'H W c0 ...'")
    h, w, runs = int(values[0]), int(values[1]), values[2:]
    if int(runs.sum()) != h * w:
        raise ValueError(f"rle_decode: {head!r}: runs sum to {int(runs.sum())}, expected H * W = {h * w}")
    flat = np.repeat(np.arange(runs.size) % 2 == 1, runs)
    return flat.reshape(h, w)


# =============================================================================================================
# Adaptive threshold
# =============================================================================================================


class ThresholdController:
    """Feedback loop on one profile's threshold (seed 002, "Adaptive Thresholding").

    `update(c)`: while the primary model's confidence c >= target, raise the threshold by `step` (mask more); when
    it drops below target, lower it by 2 * step: backing off twice as fast as it advances, so a drop in quality
    is corrected in half the batches it took to cause it. Always clamped to [min_threshold, max_threshold]. A nan
    confidence (no good rows) leaves it unchanged. `history` holds (probe number, confidence, threshold the
    confidence was measured at), the last `max_history` probes.
    """

    def __init__(
        self, threshold: float, min_threshold: float, max_threshold: float, step: float, target: float
    ) -> None:
        if not min_threshold <= max_threshold or not step > 0:
            raise ValueError(
                f"ThresholdController: need min <= max and step > 0, got {min_threshold}, {max_threshold}, {step}"
            )
        self.min_threshold, self.max_threshold = float(min_threshold), float(max_threshold)
        self.threshold = float(np.clip(threshold, self.min_threshold, self.max_threshold))
        self.step, self.target = float(step), float(target)
        self.batches = 0  # probes seen (updates with a finite confidence)
        self.history: list[tuple[int, float, float]] = []
        self.max_history = 10_000

    @classmethod
    def for_profile(cls, profile: TaskProfile, target: float) -> ThresholdController:
        return cls(profile.threshold, profile.min_threshold, profile.max_threshold, profile.step, target)

    def update(self, confidence: float) -> float:
        """Feed one probe's confidence; returns the threshold for the next batches."""
        if not np.isfinite(confidence):
            return self.threshold
        self.batches += 1
        self.history.append((self.batches, float(confidence), self.threshold))
        del self.history[: -self.max_history]
        delta = self.step if confidence >= self.target else -2.0 * self.step
        self.threshold = float(np.clip(self.threshold + delta, self.min_threshold, self.max_threshold))
        return self.threshold

    def state_dict(self) -> dict:
        """JSON-able state (saved with the results)."""
        keys = ("threshold", "min_threshold", "max_threshold", "step", "target", "batches")
        return {**{k: getattr(self, k) for k in keys}, "history": [list(h) for h in self.history]}

    @classmethod
    def from_state(cls, state: dict) -> ThresholdController:
        c = cls(state["threshold"], state["min_threshold"], state["max_threshold"], state["step"], state["target"])
        c.batches = int(state["batches"])
        c.history = [(int(b), float(conf), float(t)) for b, conf, t in state["history"]]
        return c


# =============================================================================================================
# Per-batch helper
# =============================================================================================================


class Masker:
    """Loads every profile of `cfg.profiles` once, with one threshold controller each; computes maps and masks."""

    def __init__(self, cfg: MaskConfig, device: str | torch.device | None = None) -> None:
        if not cfg.profiles:
            raise ValueError("masks.profiles: at least one task profile is needed when masks are enabled")
        self.cfg = cfg
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.profiles: dict[str, TaskProfile] = {}
        self.estimators: dict[str, ConfidenceEstimator] = {}
        self.controllers: dict[str, ThresholdController] = {}
        for ref in cfg.profiles:
            profile, est = load_profile(ref)
            if profile.name in self.profiles:
                raise ValueError(f"masks.profiles: {ref!r} repeats profile name {profile.name!r}")
            self.profiles[profile.name] = profile
            self.estimators[profile.name] = est.to(self.device)
            self.controllers[profile.name] = ThresholdController.for_profile(profile, cfg.target)

    @property
    def names(self) -> list[str]:
        return list(self.profiles)

    @torch.inference_mode()
    def confidence(self, name: str, images: np.ndarray) -> np.ndarray:
        """(B, H, W) float32 confidence map of profile `name`."""
        return self.estimators[name](np.ascontiguousarray(images)).float().cpu().numpy()

    def masks(self, images: np.ndarray, valid_hw: np.ndarray) -> dict[str, tuple[np.ndarray, np.ndarray, float]]:
        """{profile name: (confidence (B, H, W), mask (B, H, W) bool, threshold used)} at the current thresholds."""
        out = {}
        for name in self.profiles:
            conf = self.confidence(name, images)
            t = self.controllers[name].threshold
            out[name] = (conf, threshold_mask(conf, t, valid_hw), t)
        return out

    def update(self, name: str, confidence: float) -> float:
        return self.controllers[name].update(confidence)

    def state(self) -> dict[str, dict]:
        return {name: c.state_dict() for name, c in self.controllers.items()}
