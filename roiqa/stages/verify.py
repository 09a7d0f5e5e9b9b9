"""Seed 004: the ROI-mask verifier: the probability that a region of an image shows a query's instance.

Trained on views of training-photo crops by roiqa.train.verifier (see there).

Verification. A query patch and each region are embedded by the same net: the region as a square window of
`context` times its box's long side around the box (zero beyond the image), resized to the input, the box as mask;
the query as the patch scaled to the same size a region's box gets, centred on black, its extent as mask. The
probability is sigmoid(a * cos + b), with a, b fitted on held-out instances (crops never trained on) and stored in
the checkpoint's metadata.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image

from roiqa.config import VerifyConfig
from roiqa.io.imageio import check_rgb_u8, resize_long_side
from roiqa.models.roimask import RoiMaskNet, load_roimask, save_roimask
from roiqa.weights import WEIGHTS_DIR

# train_data's augmentation helpers (private there, reused here rather than copied).

SHIPPED = os.path.join(WEIGHTS_DIR, "verifier-roimask.safetensors")
VERIFIER_KEY = "roiqa.verifier"  # checkpoint metadata: JSON {"a", "b", "context"}
SMALL = 0.25  # a region is "small" when its box's long side is below this fraction of the net's input side


def box_masks(boxes: np.ndarray, size: int) -> np.ndarray:
    """(N, 4) boxes in pixels of a size x size input -> (N, 1, size, size) float32 binary masks (pixel centres in)."""
    centres = np.arange(size, dtype=np.float32) + 0.5
    b = np.asarray(boxes, np.float32).reshape(-1, 4)
    inside_x = (centres[None] >= b[:, 0:1]) & (centres[None] < b[:, 2:3])  # (N, W)
    inside_y = (centres[None] >= b[:, 1:2]) & (centres[None] < b[:, 3:4])  # (N, H)
    masks = inside_y[:, :, None] & inside_x[:, None, :]  # (N, H, W)
    empty = ~masks.any(axis=(1, 2))  # a box thinner than a pixel: its nearest pixel
    for i in np.flatnonzero(empty):
        cx = int(np.clip((b[i, 0] + b[i, 2]) / 2, 0, size - 1))
        cy = int(np.clip((b[i, 1] + b[i, 3]) / 2, 0, size - 1))
        masks[i, cy, cx] = True
    return masks[:, None].astype(np.float32)


def to_tensors(images: np.ndarray, boxes: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, S, S, 3) uint8 and (N, 4) boxes -> the net's inputs: (N, 3, S, S) float in [0, 1], (N, 1, S, S) masks."""
    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float().div_(255.0)  # (N, 3, S, S)
    return x, torch.from_numpy(box_masks(boxes, images.shape[1]))


def region_view(image: np.ndarray, box: Sequence[float], size: int, context: float) -> tuple[np.ndarray, np.ndarray]:
    """(size, size, 3) uint8 window of `context` x the box's long side around `box`, and the box in its pixels."""
    x0, y0, x1, y1 = (float(v) for v in box)
    side = max(8, round(context * max(x1 - x0, y1 - y0, 1.0)))
    wx, wy = round((x0 + x1 - side) / 2), round((y0 + y1 - side) / 2)
    window = Image.fromarray(image).crop((wx, wy, wx + side, wy + side))  # zero outside the image
    out = np.asarray(window.resize((size, size), Image.Resampling.BILINEAR))
    s = size / side
    return out, np.array([(x0 - wx) * s, (y0 - wy) * s, (x1 - wx) * s, (y1 - wy) * s], np.float32)


def query_view(patch: np.ndarray, size: int, context: float) -> tuple[np.ndarray, np.ndarray]:
    """(size, size, 3) uint8: `patch` scaled to the size a region's box gets (long side size / context), centred on
    black; and its extent as the box."""
    scaled, _ = resize_long_side(np.ascontiguousarray(patch), max(1, round(size / context)))
    h, w = scaled.shape[:2]
    y, x = (size - h) // 2, (size - w) // 2
    out = np.zeros((size, size, 3), np.uint8)
    out[y : y + h, x : x + w] = scaled
    return out, np.array([x, y, x + w, y + h], np.float32)


def save_verifier(model: RoiMaskNet, uri: str, calibration: dict, log: dict | None = None) -> bytes:
    """Write a trained verifier (fp16 weights, config, calibration {"a", "b", "context"}) to `uri`."""
    extra = {VERIFIER_KEY: json.dumps({k: float(calibration[k]) for k in ("a", "b", "context")})}
    if log is not None:
        extra["roiqa.verifier_log"] = json.dumps({k: v for k, v in log.items() if k != "loss_curve"})
    return save_roimask(model, uri, extra=extra)


class Verifier:
    """Probability that a region of an image shows the same instance as a query patch (see the module docstring)."""

    def __init__(self, uri: str | None = None, batch_size: int = 64, device: str | None = None):
        """Load the checkpoint at `uri`; None or "default": the shipped roiqa/weights/verifier-roimask.safetensors.
        `device`: where the network runs (None: CPU)."""
        self.uri = SHIPPED if uri in (None, "default") else uri
        self.device = torch.device(device or "cpu")
        model, meta = load_roimask(self.uri)
        if VERIFIER_KEY not in meta:
            raise ValueError(f"{self.uri}: RoiMaskNet checkpoint without {VERIFIER_KEY!r} calibration metadata")
        try:
            cal = json.loads(meta[VERIFIER_KEY])
            self._setup(model, float(cal["a"]), float(cal["b"]), float(cal["context"]), batch_size)
        except (ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"{self.uri}: bad {VERIFIER_KEY} metadata {meta[VERIFIER_KEY]!r} ({exc})") from exc

    @classmethod
    def from_config(cls, cfg: VerifyConfig) -> Verifier:
        """The verifier `cfg.model` names (None: the shipped one)."""
        return cls(cfg.model)

    @classmethod
    def from_model(cls, model: RoiMaskNet, a: float, b: float, context: float, batch_size: int = 64) -> Verifier:
        """A verifier around an in-memory model (training, tests)."""
        self = cls.__new__(cls)
        self.uri, self.device = None, torch.device("cpu")
        self._setup(model, a, b, context, batch_size)
        return self

    def _setup(self, model: RoiMaskNet, a: float, b: float, context: float, batch_size: int) -> None:
        if not (math.isfinite(a) and math.isfinite(b) and context >= 1.0):
            raise ValueError(f"calibration a={a}, b={b}, context={context}: need finite a, b and context >= 1")
        self.model, self.a, self.b, self.context, self.batch_size = (
            model.to(self.device).eval(),
            a,
            b,
            context,
            batch_size,
        )
        self.size = model.cfg.input_size

    def _embed(self, images: np.ndarray, boxes: np.ndarray) -> np.ndarray:
        out = []
        for i in range(0, len(images), self.batch_size):
            x, m = to_tensors(images[i : i + self.batch_size], boxes[i : i + self.batch_size])
            out.append(self.model.embed(x.to(self.device), m.to(self.device)).float().cpu().numpy())
        return np.concatenate(out) if out else np.zeros((0, self.model.cfg.widths[-1]), np.float32)

    def embed_query(self, query_patch: np.ndarray) -> np.ndarray:
        """(D,) float32 L2-normalised embedding of an (h, w, 3) uint8 query patch."""
        check_rgb_u8(query_patch, "Verifier query_patch")
        img, box = query_view(query_patch, self.size, self.context)
        return self._embed(img[None], box[None])[0]

    def embed_regions(self, image: np.ndarray, boxes: np.ndarray) -> np.ndarray:
        """(K, D) float32 L2-normalised embeddings of the regions `boxes` (K, 4) x0, y0, x1, y1 of `image`."""
        check_rgb_u8(image, "Verifier image")
        boxes = np.asarray(boxes, np.float32)
        if boxes.ndim != 2 or boxes.shape[1] != 4 or not np.isfinite(boxes).all():
            raise ValueError(f"Verifier boxes: expected a finite (K, 4) array, got shape {boxes.shape}")
        if len(boxes) == 0:
            return np.zeros((0, self.model.cfg.widths[-1]), np.float32)
        views = [region_view(image, b, self.size, self.context) for b in boxes]
        return self._embed(np.stack([v[0] for v in views]), np.stack([v[1] for v in views]))

    def verify(
        self, query_patch: np.ndarray, image: np.ndarray, boxes: np.ndarray, query_embedding: np.ndarray | None = None
    ) -> np.ndarray:
        """(K,) float32 probabilities that each box of `image` shows the instance of `query_patch`
        (`query_embedding`: its `embed_query`, when the caller keeps it between images)."""
        q = self.embed_query(query_patch) if query_embedding is None else query_embedding  # (D,)
        cos = self.embed_regions(image, boxes) @ q  # (K,)
        return (1.0 / (1.0 + np.exp(-(self.a * cos + self.b)))).astype(np.float32)
