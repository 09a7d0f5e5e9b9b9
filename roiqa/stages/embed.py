"""Per-batch stages of the index pipeline: decode + resize (CPU tasks) and the embedding model (actors)."""

from __future__ import annotations

import os
import socket
import uuid

import numpy as np
import torch

from roiqa import errors as row_errors
from roiqa import schema as S
from roiqa.config import MaskConfig, ModelConfig, PreprocessConfig
from roiqa.errors import RowError
from roiqa.io.ids import image_id
from roiqa.io.imageio import DecodeError, decode_image, pad_to_square, resize_long_side
from roiqa.io.sources import content_hash, object_array
from roiqa.models.regions import encode_regions


def prepare(image: np.ndarray, size: int) -> tuple[np.ndarray, tuple[int, int], float]:
    """Resize so the long side is `size` and zero-pad to (size, size, 3); returns (image, valid (h, w), scale)."""
    resized, scale = resize_long_side(image, size)
    return pad_to_square(resized, size), resized.shape[:2], scale


class Decoder:
    """{uri, bytes, error columns} -> decoded, resized, padded images with their metadata; bad bytes become error
    rows."""

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
        for i, (u, data, err) in enumerate(zip(batch[S.URI], batch[S.BYTES], row_errors.read(batch))):
            data = data or b""
            nbytes[i] = len(data)
            hashes.append(content_hash(data) if data else "")
            if err is not None:
                errors.append(err)
                continue
            try:
                img = decode_image(data, uri=str(u), max_pixels=self.cfg.max_pixels)
                images[i], valid[i], scale[i] = prepare(img, size)
                height[i], width[i] = img.shape[:2]
                errors.append(None)
            except DecodeError as exc:
                errors.append(RowError("decode", exc.reason, str(exc)))
            except Exception as exc:  # noqa: BLE001 - an unexpected failure is still recorded against its input
                errors.append(RowError.raised("decode", "corrupt", exc))
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
            **row_errors.columns(errors),
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


def probe_confidence(masked: np.ndarray, full: np.ndarray) -> float:
    """The primary model's confidence in masked inputs: the fraction of a batch's images whose masked descriptor
    retrieves its own whole-image descriptor first among the batch's (B, D) whole-image descriptors.

    A plain cosine of masked vs whole descriptors is no signal here: the global descriptors share a large common
    component, so it stays near 1 however much is masked (benchmarks/RESULTS.md). Self-retrieval asks what the
    index needs, that a masked image is still found as itself. With one image it is 1.0 when the
    cosine beats 0.5.
    """
    m = masked / np.maximum(np.linalg.norm(masked, axis=1, keepdims=True), 1e-12)
    f = full / np.maximum(np.linalg.norm(full, axis=1, keepdims=True), 1e-12)
    sims = m @ f.T  # (B, B): row i = masked image i against every whole image
    if len(sims) == 1:
        return float(sims[0, 0] > 0.5)
    return float(np.mean(sims.argmax(axis=1) == np.arange(len(sims))))


class Embedder:
    """Loads the matcher once; {image, valid_hw, error, ...} -> the same rows with `embedding`, without `image`.

    Error rows pass through with a zero embedding (the pipeline routes them to the errors table). Weights are
    channels_last (faster than NCHW in benchmarks/bench_model.py); on CUDA the model also runs in bf16 autocast.

    With `masks` enabled (seed 002, roiqa.stages.masks), every profile's confidence map is thresholded at its
    controller's current threshold and three columns per profile are added (S.mask_columns: coverage, threshold,
    RLE; nan / "" on error rows), plus the transient S.MASK_PROBE. With `masks.apply` the embedding is that of the FIRST
    profile's masked image, and every `probe_every`-th batch also embeds the unmasked images: the probe's
    confidence (`probe_confidence` over the good rows, in S.MASK_PROBE of every row of that batch, nan otherwise)
    drives the first profile's controller when `masks.adaptive`. The other profiles' masks are not applied, so
    nothing measures them and their controllers keep their initial thresholds. A probe batch costs two matcher
    passes. The transient S.ACTOR (this Embedder's id) and S.BATCH (its call number) let the pipeline rebuild
    each actor's controller history from the rows.
    """

    def __init__(
        self,
        model_cfg: ModelConfig,
        model_uri: str | None = None,
        device: str | None = None,
        threads: int = -1,
        masks: MaskConfig | None = None,
    ) -> None:
        from roiqa.models.checkpoint import load_matcher

        set_threads(threads)
        self.device = pick_device(device)
        self.model = load_matcher(model_uri, model_cfg).to(self.device).eval()
        self.model = self.model.to(memory_format=torch.channels_last)
        self.dim = self.model.dim
        self.masker = None
        if masks is not None and masks.enabled:
            from roiqa.stages.masks import Masker

            if masks.probe_every < 1:
                raise ValueError(f"masks.probe_every must be >= 1, got {masks.probe_every}")
            self.masker = Masker(masks, self.device)
        self.batches = 0  # batches with good rows seen with masks enabled (probe schedule)
        self.calls = 0  # batches seen (S.BATCH)
        self.actor = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"  # S.ACTOR

    def embed(self, images: np.ndarray, valid_hw: np.ndarray) -> np.ndarray:
        """(B, S, S, 3) uint8 + (B, 2) valid sizes -> (B, D) float32 L2-normalised global descriptors."""
        return self.embed_regions(images, valid_hw, regions=False)[0]

    @torch.inference_mode()
    def embed_regions(
        self, images: np.ndarray, valid_hw: np.ndarray, regions: bool = True
    ) -> tuple[np.ndarray, list[bytes]]:
        """`embed`'s global descriptors and, from the same forward pass, each image's regional descriptors as
        stored bytes (S.REGIONS_Q8, roiqa.models.regions.encode_regions; empty list when `regions` is False)."""
        x = torch.from_numpy(np.ascontiguousarray(images)).to(self.device)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.device.type == "cuda"):
            feats = self.model.pyramid(x)
            g = self.model.global_descriptor(feats, torch.from_numpy(valid_hw))
        blobs = []
        if regions:
            pairs = self.model.regional_descriptors(feats, valid_hw)
            blobs = [encode_regions(d.float().cpu().numpy()) for d, _ in pairs]
        return g.float().cpu().numpy(), blobs

    def controller_state(self) -> dict[str, dict]:
        """{profile name: ThresholdController.state_dict()}; empty when masks are off."""
        return self.masker.state() if self.masker is not None else {}

    def _embed_masked(
        self, images: np.ndarray, valid_hw: np.ndarray, cols: dict, ok: np.ndarray
    ) -> tuple[np.ndarray, list[bytes]]:
        """Embedding and regions of the good rows `images`; fills the mask columns `cols` at rows `ok` in place."""
        from roiqa.stages.masks import apply_mask, coverage, rle_encode

        res = self.masker.masks(images, valid_hw)
        for name, (_conf, mask, threshold) in res.items():
            cov_c, thr_c, rle_c = S.mask_columns(name)
            cols[cov_c][ok] = coverage(mask, valid_hw)
            cols[thr_c][ok] = threshold
            cols[rle_c][ok] = [rle_encode(m) for m in mask]
        cfg = self.masker.cfg
        if not cfg.apply:
            return self.embed_regions(images, valid_hw)
        first = self.masker.names[0]
        emb, regions = self.embed_regions(apply_mask(images, res[first][1]), valid_hw)
        self.batches += 1
        if (self.batches - 1) % cfg.probe_every == 0:
            conf = probe_confidence(emb, self.embed(images, valid_hw))
            cols[S.MASK_PROBE][:] = conf
            if cfg.adaptive:
                self.masker.update(first, conf)
        return emb, regions

    def _mask_columns(self, n: int) -> dict[str, np.ndarray]:
        cols: dict[str, np.ndarray] = {}
        for name in self.masker.names:
            cov_c, thr_c, rle_c = S.mask_columns(name)
            cols[cov_c] = np.full(n, np.nan, np.float32)
            cols[thr_c] = np.full(n, np.nan, np.float32)
            cols[rle_c] = object_array([""] * n)
        cols[S.MASK_PROBE] = np.full(n, np.nan, np.float32)
        cols[S.ACTOR] = object_array([self.actor] * n)
        cols[S.BATCH] = np.full(n, self.calls, np.int32)
        return cols

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        ok = ~row_errors.failed(batch)
        emb = np.zeros((len(ok), self.dim), dtype=np.float32)
        regions = [b""] * len(ok)
        self.calls += 1
        cols = self._mask_columns(len(ok)) if self.masker is not None else {}
        if ok.any():
            try:
                if self.masker is None:
                    emb[ok], good = self.embed_regions(batch[S.IMAGE][ok], batch[S.VALID_HW][ok])
                else:
                    emb[ok], good = self._embed_masked(batch[S.IMAGE][ok], batch[S.VALID_HW][ok], cols, ok)
                for i, r in zip(np.flatnonzero(ok), good):
                    regions[i] = r
            except Exception as exc:  # noqa: BLE001 - a failing batch is recorded, not lost
                errors = row_errors.read(batch)
                for i in np.flatnonzero(ok):
                    errors[i] = RowError.raised("embed", "model_failed", exc)
                batch.update(row_errors.columns(errors))
                cols = self._mask_columns(len(ok)) if self.masker is not None else {}
                emb[:] = 0
                regions = [b""] * len(ok)
        out = {k: v for k, v in batch.items() if k not in (S.IMAGE, S.VALID_HW, S.SCALE)}
        out[S.EMBEDDING] = emb
        out[S.REGIONS_Q8] = object_array(regions)
        out.update(cols)
        return out


def decode(batch: dict[str, np.ndarray], cfg) -> dict[str, np.ndarray]:
    """`Decoder(cfg)` on one batch, for a Ray Data task (the decoder holds no model)."""
    return Decoder(cfg)(batch)
