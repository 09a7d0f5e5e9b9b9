"""The seed-001 complexity stage of the index: complexity columns (and patch embeddings) added to a decoded batch."""

from __future__ import annotations

import numpy as np
import torch

from roiqa import errors as row_errors
from roiqa import schema as S
from roiqa.config import ComplexityConfig
from roiqa.errors import RowError
from roiqa.io.sources import object_array
from roiqa.models.patchnet import load_patchnet
from roiqa.ops.complexity import (
    check_quadtree,
    complexity_map,
    complexity_png,
    complexity_stats,
    patch_counts,
    quadtree,
)
from roiqa.stages.embed import pick_device, set_threads


def _failure(exc: BaseException) -> RowError:
    return RowError.raised("complexity", "failed", exc)


class ComplexityStage:
    """Adds the seed-001 columns to a batch of decoded images; every input column is kept.

    Good rows get COMPLEXITY_MEAN / STD / P90, PATCH_COUNTS, PATCH_LAYOUT (the quadtree of `cfg`'s thresholds),
    COMPLEXITY_PNG and, when `cfg.model` names a patch network, PATCH_EMBEDDING (computed with the network's own
    layout: its learned thresholds and complexity settings, at its training resolution). Error rows get nan,
    empty arrays, b"" and zero embeddings; a row that fails here gets a ("complexity", "failed") error.
    """

    def __init__(self, cfg: ComplexityConfig, device: str | None = None, threads: int = -1) -> None:
        check_quadtree(cfg.cell, cfg.min_cell, cfg.thresholds)
        set_threads(threads)
        self.cfg = cfg
        self.device = pick_device(device)
        self.model = None
        if cfg.model:
            self.model = load_patchnet(cfg.model).to(self.device).eval()

    def _maps(self, images: np.ndarray, valid: np.ndarray, rows: list[int], errors: list) -> dict[int, np.ndarray]:
        """Complexity maps of `rows`, the batch at once; on failure row by row so one bad row fails alone."""
        cfg = self.cfg
        x = torch.from_numpy(np.ascontiguousarray(images[rows])).to(self.device)
        try:
            maps = complexity_map(x, cfg.sigma, cfg.scale, valid[rows]).cpu().numpy()
            return dict(zip(rows, maps))
        except Exception:  # noqa: BLE001 - retried per row below
            pass
        out = {}
        for i in rows:
            try:
                x = torch.from_numpy(np.ascontiguousarray(images[i : i + 1])).to(self.device)
                out[i] = complexity_map(x, cfg.sigma, cfg.scale, valid[i : i + 1])[0].cpu().numpy()
            except Exception as exc:  # noqa: BLE001 - recorded against its row
                errors[i] = _failure(exc)
        return out

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        cfg = self.cfg
        errors = row_errors.read(batch)
        n = len(errors)
        images, valid = np.asarray(batch[S.IMAGE]), np.asarray(batch[S.VALID_HW]).reshape(n, 2)
        stats = np.full((n, 3), np.nan, np.float32)
        counts = [np.zeros(0, np.int32)] * n
        layouts = [np.zeros(0, np.int32)] * n
        pngs = [b""] * n
        maps = self._maps(images, valid, [i for i in range(n) if errors[i] is None], errors)
        for i, cmap in maps.items():
            try:
                lay = quadtree(cmap, valid[i], cfg.cell, cfg.min_cell, cfg.thresholds)
                row_stats = complexity_stats(cmap, valid[i])
                png = complexity_png(cmap, valid[i], cfg.map_size)
                counts[i] = np.asarray(patch_counts(lay, cfg.cell, cfg.min_cell), np.int32)
                layouts[i], pngs[i], stats[i] = lay.ravel(), png, row_stats
            except Exception as exc:  # noqa: BLE001 - recorded against its row
                errors[i] = _failure(exc)
        out = dict(batch)
        if self.model is not None:
            out[S.PATCH_EMBEDDING] = self._embed(images, valid, errors)
        for i in [i for i, e in enumerate(errors) if e is not None]:  # every error row, whichever step failed it
            counts[i], layouts[i], pngs[i], stats[i] = np.zeros(0, np.int32), np.zeros(0, np.int32), b"", np.nan
        out[S.COMPLEXITY_MEAN], out[S.COMPLEXITY_STD], out[S.COMPLEXITY_P90] = stats[:, 0], stats[:, 1], stats[:, 2]
        out[S.PATCH_COUNTS] = object_array(counts)
        out[S.PATCH_LAYOUT] = object_array(layouts)
        out[S.COMPLEXITY_PNG] = object_array(pngs)
        out.update(row_errors.columns(errors))
        return out

    def _embed(self, images: np.ndarray, valid: np.ndarray, errors: list[RowError | None]) -> np.ndarray:
        emb = np.zeros((len(errors), self.model.cfg.dim), np.float32)
        rows = [i for i, e in enumerate(errors) if e is None]
        if not rows:
            return emb
        try:
            emb[rows] = self.model.embed_images(images[rows], valid[rows], device=self.device)
        except Exception as exc:  # noqa: BLE001 - a failing batch is recorded, not lost
            for i in rows:
                errors[i] = RowError.raised("complexity", "model_failed", exc)
        return emb
