"""Per-batch stages of the index pipeline: decode + resize (CPU tasks) and the embedding model (actors)."""

from __future__ import annotations

import os

import numpy as np
import torch

from roiqa import schema as S
from roiqa.config import ModelConfig, PreprocessConfig
from roiqa.ids import image_id
from roiqa.imageio import DecodeError, decode_image, pad_to_square, resize_long_side
from roiqa.sources import content_hash, error_string, object_array


def prepare(image: np.ndarray, size: int) -> tuple[np.ndarray, tuple[int, int], float]:
    """Resize so the long side is `size` and zero-pad to (size, size, 3); returns (image, valid (h, w), scale)."""
    resized, scale = resize_long_side(image, size)
    return pad_to_square(resized, size), resized.shape[:2], scale


class Decoder:
    """{uri, bytes, error} -> decoded, resized, padded images with their metadata; bad bytes become error rows."""

    def __init__(self, cfg: PreprocessConfig) -> None:
        self.cfg = cfg

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        n, size = len(batch[S.URI]), self.cfg.image_size
        images = np.zeros((n, size, size, 3), dtype=np.uint8)
        valid = np.zeros((n, 2), dtype=np.int32)
        scale = np.zeros(n, dtype=np.float32)
        width = np.zeros(n, dtype=np.int32)
        height = np.zeros(n, dtype=np.int32)
        nbytes = np.zeros(n, dtype=np.int64)
        hashes, errors = [], []
        for i, (u, data, err) in enumerate(zip(batch[S.URI], batch[S.BYTES], batch[S.ERROR])):
            data = data or b""
            nbytes[i] = len(data)
            hashes.append(content_hash(data) if data else "")
            if err:
                errors.append(err)
                continue
            try:
                img = decode_image(data, uri=str(u), max_pixels=self.cfg.max_pixels)
                images[i], valid[i], scale[i] = prepare(img, size)
                height[i], width[i] = img.shape[:2]
                errors.append("")
            except DecodeError as exc:
                errors.append(error_string("decode", exc.reason, str(exc)))
            except Exception as exc:  # noqa: BLE001 - an unexpected failure is still recorded against its input
                errors.append(error_string("decode", "corrupt", f"{type(exc).__name__}: {exc}"))
        return {
            S.IMAGE_ID: np.array([image_id(str(u)) for u in batch[S.URI]], dtype=np.int64),
            S.URI: batch[S.URI],
            S.WIDTH: width,
            S.HEIGHT: height,
            S.SIZE_BYTES: nbytes,
            S.CONTENT_HASH: object_array(hashes),
            S.IMAGE: images,
            S.VALID_HW: valid,
            S.SCALE: scale,
            S.ERROR: object_array(errors),
        }


def set_threads(threads: int) -> None:
    """torch intra-op threads: `threads` > 0 as given, 0 every core of this machine, < 0 leave as it is.

    Ray sets OMP_NUM_THREADS to an actor's CPU share (1 for a 0.5-CPU actor), which leaves a CPU model on one core.
    """
    if threads >= 0:
        torch.set_num_threads(threads or os.cpu_count() or 1)


def pick_device(device: str | None = None) -> torch.device:
    """`device` if given, else CUDA when available, else CPU."""
    if device:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


class Embedder:
    """Loads the matcher once; {image, valid_hw, error, ...} -> the same rows with `embedding`, without `image`.

    Error rows pass through with a zero embedding (the pipeline routes them to the errors table). Weights are
    channels_last (on CPU, batch 4-16 at 512x512, that measured 5-10% more images/s than NCHW weights in
    benchmarks/bench_model.py); on CUDA the model also runs in bf16 autocast.
    """

    def __init__(
        self, model_cfg: ModelConfig, model_uri: str | None = None, device: str | None = None, threads: int = -1
    ) -> None:
        from roiqa.models.checkpoint import load_matcher

        set_threads(threads)
        self.device = pick_device(device)
        self.model = load_matcher(model_uri, model_cfg).to(self.device).eval()
        self.model = self.model.to(memory_format=torch.channels_last)
        self.dim = self.model.cfg.fpn_channels

    @torch.inference_mode()
    def embed(self, images: np.ndarray, valid_hw: np.ndarray) -> np.ndarray:
        """(B, S, S, 3) uint8 + (B, 2) valid sizes -> (B, D) float32 L2-normalised global descriptors."""
        x = torch.from_numpy(np.ascontiguousarray(images)).to(self.device)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.device.type == "cuda"):
            feats = self.model.pyramid(x)
            g = self.model.global_descriptor(feats, torch.from_numpy(valid_hw))
        return g.float().cpu().numpy()

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        ok = np.array([not e for e in batch[S.ERROR]], dtype=bool)
        emb = np.zeros((len(ok), self.dim), dtype=np.float32)
        if ok.any():
            try:
                emb[ok] = self.embed(batch[S.IMAGE][ok], batch[S.VALID_HW][ok])
            except Exception as exc:  # noqa: BLE001 - a failing batch is recorded, not lost
                errors = list(batch[S.ERROR])
                for i in np.flatnonzero(ok):
                    errors[i] = error_string("embed", "model_failed", f"{type(exc).__name__}: {exc}")
                batch[S.ERROR] = object_array(errors)
        out = {k: v for k, v in batch.items() if k not in (S.IMAGE, S.VALID_HW, S.SCALE)}
        out[S.EMBEDDING] = emb
        return out
