"""Query encoding and dense reranking: multi-scale cross-correlation of query patches against candidate images."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from roiqa import errors as row_errors
from roiqa import schema as S
from roiqa.boxes import clip_boxes
from roiqa.config import RoiqaConfig
from roiqa.errors import RowError
from roiqa.io import uri as uri_mod
from roiqa.io.imageio import DecodeError, decode_image, encode_png, resize_long_side
from roiqa.io.sources import object_array
from roiqa.models.matcher import Matcher
from roiqa.stages import geometry
from roiqa.stages.embed import pick_device, set_threads

SCORES = ("peak", "regions")  # query.score: fused-heatmap maximum (eq. 4) or LSE over region similarities (eq. 5)


class BadBox(ValueError):
    """A query box that names no region: some coordinates missing, not finite, inverted, empty or off the image."""

    reason = "bad_box"


def check_box(box, name: str) -> np.ndarray | None:
    """The query box as float32 (x0, y0, x1, y1), or None when all four coordinates are missing (null or NaN:
    the whole image). A partial box, an infinite coordinate, x1 <= x0 or y1 <= y0 raise BadBox naming `name`."""
    if box is None:
        return None
    b = np.array([np.nan if v is None else v for v in box], dtype=np.float64)
    missing = np.isnan(b)
    if missing.all():
        return None
    if missing.any():
        raise BadBox(f"{name}: query box {b.tolist()} has missing coordinates; give all four or none")
    if not np.isfinite(b).all():
        raise BadBox(f"{name}: query box {b.tolist()} has an infinite coordinate")
    if b[2] <= b[0] or b[3] <= b[1]:
        raise BadBox(f"{name}: query box {b.tolist()} is inverted or empty (needs x0 < x1 and y0 < y1)")
    return b.astype(np.float32)


def crop_patch(image: np.ndarray, box: np.ndarray | None, name: str) -> np.ndarray:
    """The query patch: `image` cropped to `box` (x0, y0, x1, y1 pixels; None or all NaN: the whole image)."""
    box = check_box(box, name)
    if box is None:
        return image
    h, w = image.shape[:2]
    x0, y0, x1, y1 = (int(round(float(v))) for v in box)
    x0, y0, x1, y1 = max(0, x0), max(0, y0), min(w, x1), min(h, y1)
    if x1 - x0 < 2 or y1 - y0 < 2:
        raise BadBox(f"{name}: query box {list(map(float, box))} is empty inside the {w}x{h} image")
    return image[y0:y1, x0:x1]


def load_patch(uri: str, box: np.ndarray | None, max_pixels: int) -> np.ndarray:
    """Read, decode and crop a query patch (the whole image when `box` is None)."""
    return crop_patch(decode_image(uri_mod.read_bytes(uri), uri, max_pixels), box, uri)


@dataclass
class QueryFeatures:
    """Everything the reranker needs from one query patch."""

    z: torch.Tensor  # (C,) eq. 5 query descriptor
    scales: list[
        tuple[tuple[int, int], dict[int, torch.Tensor]]
    ]  # per query size: ((h, w) px, {level: (1, C, h_l, w_l)})
    patch: np.ndarray | None = None  # (h, w, 3) uint8 query patch as cropped (the verifier's input)
    resized: list[np.ndarray] | None = None  # the patch at each query size (the refinement's edge weights)
    edges: dict = field(default_factory=dict)  # query size index -> {level: (h_l, w_l)} edge weights (lazy)
    verify_embedding: np.ndarray | None = None  # the verifier's embedding of `patch` (lazy)
    sift: geometry.SiftFeatures | None = None  # SIFT features of `patch` for the geometric verification (lazy)


def pyramid(model: Matcher, image: np.ndarray, device: torch.device) -> dict[int, torch.Tensor]:
    """float32 FPN features of one (H, W, 3) uint8 image; on CUDA the backbone runs in bf16 autocast."""
    return model.pyramid(torch.from_numpy(np.ascontiguousarray(image[None])).to(device), bf16=device.type == "cuda")


def rotate_patch(patch: np.ndarray, degrees: float) -> np.ndarray:
    """The (h, w, 3) uint8 patch rotated counter-clockwise by `degrees` about its centre (bilinear), on a canvas
    grown to hold all of it, the corners filled with the patch's mean colour; the patch itself at 0."""
    if degrees % 360 == 0:
        return patch
    from PIL import Image

    fill = tuple(int(round(v)) for v in patch.reshape(-1, 3).mean(axis=0))
    out = Image.fromarray(np.ascontiguousarray(patch)).rotate(
        float(degrees), resample=Image.Resampling.BILINEAR, expand=True, fillcolor=fill
    )
    return np.asarray(out)


def coarse_views(qc) -> list[tuple[int, float]]:
    """(long side, rotation) of every coarse query descriptor: each `query.coarse_sizes` at each
    `query.coarse_rotations` (0 only when none are set), sizes outermost."""
    return [(size, rot) for size in qc.coarse_sizes for rot in (qc.coarse_rotations or (0.0,))]


MAX_PARTS = 4  # square parts of a long query (`query.coarse_parts`)
MIN_PART_SIDE = 48  # pixels: a part's coarse views are never smaller than this


def coarse_slots(qc) -> int:
    """Coarse query descriptors per query: every coarse view of the whole query and, with `query.coarse_parts`,
    of up to MAX_PARTS parts (unused slots are zero rows, which the search skips)."""
    if qc.coarse_parts and qc.coarse_parts <= 1.0:
        raise ValueError(f"query.coarse_parts: expected 0 (off) or an aspect ratio above 1, got {qc.coarse_parts}")
    return len(coarse_views(qc)) * (1 + (MAX_PARTS if qc.coarse_parts else 0))


def query_parts(patch: np.ndarray, min_aspect: float) -> list[np.ndarray]:
    """Square crops of a long query along its long axis: ceil(aspect) of them (at most MAX_PARTS), side its short
    side, the first and last flush with its ends; none when its aspect (long / short side) is `min_aspect` or less
    or `min_aspect` is 0."""
    h, w = patch.shape[:2]
    aspect = max(h, w) / max(1, min(h, w))
    if not min_aspect or aspect <= min_aspect:
        return []
    n, side = min(MAX_PARTS, int(np.ceil(aspect))), min(h, w)
    parts = []
    for j in range(n):
        o = int(round(j * (max(h, w) - side) / (n - 1)))
        parts.append(np.ascontiguousarray(patch[o : o + side] if h > w else patch[:, o : o + side]))
    return parts


def query_boxes(batch: dict[str, np.ndarray], i: int) -> np.ndarray | None:
    """The optional box of row i of a queries batch (None when the columns are absent)."""
    if S.X0 not in batch:
        return None
    return np.array([np.nan if batch[c][i] is None else batch[c][i] for c in S.BOX], dtype=np.float64)


class QueryEncoder:
    """{query_id, uri[, x0..y1]} -> {query_id, embedding, coarse_query, error columns}: the descriptors the coarse faiss
    search needs: the global one (`embedding`) for a global index, or one per coarse view (`coarse_views`: each
    size at each rotation, so objects turned in the image still find their region) in `coarse_query` for a region
    index (`regions`); the other column is zeros."""

    def __init__(
        self,
        cfg: RoiqaConfig,
        model_uri: str | None = None,
        device: str | None = None,
        threads: int = -1,
        regions: bool = False,
    ) -> None:
        from roiqa.models.checkpoint import load_matcher

        set_threads(threads)
        self.cfg = cfg
        self.regions = regions
        self.device = pick_device(device)
        self.model = load_matcher(model_uri, cfg.model).to(self.device).eval()

    @torch.inference_mode()
    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        n, dim = len(batch[S.QUERY_ID]), self.model.dim
        emb = np.zeros((n, dim), dtype=np.float32)
        coarse = np.zeros((n, coarse_slots(self.cfg.query) * dim), dtype=np.float32)
        errors = []
        for i, u in enumerate(batch[S.URI]):
            try:
                patch = load_patch(str(u), query_boxes(batch, i), self.cfg.preprocess.max_pixels)
                if self.regions:
                    d = self.coarse_descriptors(patch).reshape(-1)
                    coarse[i, : len(d)] = d
                else:
                    small, _ = resize_long_side(patch, self.cfg.query.descriptor_size)
                    emb[i] = self.model.global_descriptor(pyramid(self.model, small, self.device))[0].cpu().numpy()
                errors.append(None)
            except uri_mod.StorageUnavailable:
                raise  # the store is down, not this input bad: the run fails (exit 3) and publishes nothing
            except (DecodeError, ValueError, OSError) as exc:
                errors.append(RowError("query", getattr(exc, "reason", "bad_query"), str(exc)))
        return {
            S.QUERY_ID: batch[S.QUERY_ID],
            S.EMBEDDING: emb,
            S.COARSE_QUERY: coarse,
            **row_errors.columns(errors),
        }

    @torch.inference_mode()
    def coarse_descriptors(self, patch: np.ndarray) -> np.ndarray:
        """(V * (1 + P), D) whitened descriptors for the region index: the patch at each of the V coarse views, then
        each of its P square parts (`query_parts`, with `query.coarse_parts`) at the same views, scaled as the part
        is in the whole patch at that view (at least MIN_PART_SIDE pixels)."""
        qc = self.cfg.query
        h, w = patch.shape[:2]
        shrink = min(h, w) / max(h, w)  # a part's side over the patch's long side
        crops = [(patch, 1.0)] + [(part, shrink) for part in query_parts(patch, qc.coarse_parts)]
        out = []
        for crop, scale in crops:
            rotated: dict[float, np.ndarray] = {}
            for size, rot in coarse_views(qc):
                if rot not in rotated:
                    rotated[rot] = rotate_patch(crop, rot)
                side = size if scale == 1.0 else max(MIN_PART_SIDE, int(size * scale))
                p, _ = resize_long_side(rotated[rot], side)
                out.append(self.model.coarse_query_descriptor(pyramid(self.model, p, self.device))[0].cpu().numpy())
        return np.stack(out)


class GeometryCheck:
    """{image_id, uri, query_ids, coarse_scores} -> {query_id, image_id, inliers, x0..y1, resized_h, resized_w, error
    columns}: the geometric verification (`roiqa.stages.geometry.match`) of coarse candidates, so that a verified
    image is reranked wherever the coarse stage ranked it (DELG-style verification of the shortlist) and its box
    can expand the query (`query.expand`). The box (NaN without a fit) is in the pixels of the image resized as the
    index resized it (long side `preprocess.image_size`, size resized_h x resized_w), the frame of its regions.
    Cheap beside the dense rerank: per image a decode, a resize and SIFT once; per query a ratio test and RANSAC.
    An unreadable image gives error rows (inliers -1)."""

    def __init__(self, cfg: RoiqaConfig, queries: dict[str, tuple[str, list[float] | None]]) -> None:
        self.cfg = cfg
        self.queries = queries  # query_id -> (uri, box or None)
        self._sift: dict[str, geometry.SiftFeatures] = {}

    def query_sift(self, query_id: str) -> geometry.SiftFeatures:
        if query_id not in self._sift:
            uri, box = self.queries[query_id]
            box = None if box is None else np.asarray(box, np.float32)
            patch = load_patch(uri, box, self.cfg.preprocess.max_pixels)
            self._sift[query_id] = geometry.sift_features(patch, geometry.MIN_QUERY_SIDE)
        return self._sift[query_id]

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        gc = self.cfg.geometry
        qids_out, iids_out, inliers_out, boxes, sizes, errors = [], [], [], [], [], []
        for iid, u, qids in zip(batch[S.IMAGE_ID], batch[S.URI], batch[S.QUERY_IDS]):
            u = str(u)
            try:
                img = decode_image(uri_mod.read_bytes(u), u, self.cfg.preprocess.max_pixels)
                small = resize_long_side(img, self.cfg.preprocess.image_size)[0]  # as the index resized it
                feats, hw, err = geometry.sift_features(small), small.shape[:2], None
            except uri_mod.StorageUnavailable:
                raise  # the store is down, not this input bad: the run fails (exit 3) and publishes nothing
            except Exception as exc:  # noqa: BLE001 - the image changed or vanished since indexing
                feats, hw, err = None, (0, 0), RowError("geometry", "image_unreadable", str(exc))
            for qid in qids:
                n, box = -1, None
                if feats is not None:
                    try:
                        m = geometry.match(self.query_sift(str(qid)), feats, gc.ratio, gc.ransac_px)
                        n, box = m.inliers, m.box
                    except uri_mod.StorageUnavailable:
                        raise  # the store is down, not this input bad: the run fails (exit 3) and publishes nothing
                    except Exception as exc:  # noqa: BLE001 - a bad query is recorded, the rest goes on
                        err = RowError("geometry", "failed", str(exc))
                qids_out.append(str(qid))
                iids_out.append(int(iid))
                inliers_out.append(n)
                boxes.append(np.full(4, np.nan, np.float32) if box is None else np.asarray(box, np.float32))
                sizes.append(hw)
                errors.append(err if n < 0 else None)
        box_cols = np.stack(boxes) if boxes else np.zeros((0, 4), np.float32)
        hw_cols = np.array(sizes, dtype=np.int32).reshape(-1, 2)
        return {
            S.QUERY_ID: object_array(qids_out),
            S.IMAGE_ID: np.array(iids_out, dtype=np.int64),
            S.INLIERS: np.array(inliers_out, dtype=np.int32),
            **{c: box_cols[:, j] for j, c in enumerate(S.BOX)},
            S.RESIZED_H: hw_cols[:, 0],
            S.RESIZED_W: hw_cols[:, 1],
            **row_errors.columns(errors),
        }


class Reranker:
    """Scores candidate images against the query patches that shortlisted them (seed 003, eqs. 3-5).

    Input rows: {image_id, uri, query_ids (list), coarse_scores (list)}, one per candidate image, so the image's
    pyramid (and SIFT features) are computed once for all its queries. Output: one row per (query, image) with
    score, coarse score, box in original pixels and the heatmap overlay's URI (when `overlay_dir` is set);
    failures become error rows.

    Per pair: dense matching gives the heatmap, box and score; then, each when enabled, refinement moves the box,
    the geometric verification (`roiqa.stages.geometry`: SIFT + RANSAC homography) replaces the box with the
    homography's and adds its bonus when it has `geometry.min_inliers`, and the ROI-mask verifier adds its probability.
    """

    def __init__(
        self,
        cfg: RoiqaConfig,
        queries: dict[str, tuple[str, list[float] | None]],
        model_uri: str | None = None,
        overlay_dir: str | None = None,
        device: str | None = None,
        threads: int = -1,
    ) -> None:
        from roiqa.models.checkpoint import load_matcher

        set_threads(threads)
        self.cfg = cfg
        self.queries = queries  # query_id -> (uri, box or None)
        self.overlay_dir = overlay_dir
        self.device = pick_device(device)
        self.model: Matcher = load_matcher(model_uri, cfg.model).to(self.device).eval()
        coarsest = self.model.stride(self.model.cfg.levels[-1])
        if cfg.query.context_pad % coarsest:
            raise ValueError(f"query.context_pad must be a multiple of {coarsest} pixels, got {cfg.query.context_pad}")
        if cfg.query.score not in SCORES:
            raise ValueError(f"query.score must be one of {SCORES}, got {cfg.query.score!r}")
        gc = cfg.geometry
        if not (0 < gc.ratio <= 1 and gc.ransac_px > 0 and gc.min_inliers >= 4 and gc.saturation >= 1):
            raise ValueError(
                f"geometry: need 0 < ratio <= 1, ransac_px > 0, min_inliers >= 4 (a homography's sample) and "
                f"saturation >= 1; got {gc}"
            )
        self._cache: dict[str, QueryFeatures] = {}
        self.verifier = None
        if cfg.verify.enabled:
            from roiqa.stages.verify import Verifier

            self.verifier = Verifier(cfg.verify.model, device=str(self.device))

    # --- queries -------------------------------------------------------------------------------------------
    def query_features(self, query_id: str) -> QueryFeatures:
        """Pyramids of the query patch resized to every `query.query_sizes` (cached per actor)."""
        if query_id not in self._cache:
            uri, box = self.queries[query_id]
            patch = load_patch(
                uri, None if box is None else np.asarray(box, np.float32), self.cfg.preprocess.max_pixels
            )
            scales, resized = [], []
            for size in self.cfg.query.query_sizes:
                p, _ = resize_long_side(patch, size)
                scales.append((p.shape[:2], self.patch_pyramid(p)))
                resized.append(p)
            p, _ = resize_long_side(patch, self.cfg.query.descriptor_size)
            z = self.model.query_descriptor(self.patch_pyramid(p))[0]
            self._cache[query_id] = QueryFeatures(z=z, scales=scales, patch=patch, resized=resized)
        return self._cache[query_id]

    def patch_pyramid(self, patch: np.ndarray) -> dict[int, torch.Tensor]:
        """{level: (1, C, ceil(h / s), ceil(w / s))} features of a (h, w, 3) patch with `query.context_pad` pixels of
        mirrored context (`Matcher.patch_features`)."""
        return self.model.patch_features(patch, self.cfg.query.context_pad, bf16=self.device.type == "cuda")

    # --- one pair ------------------------------------------------------------------------------------------
    def match(self, q: QueryFeatures, feats: dict[int, torch.Tensor], valid_hw: tuple[int, int]):
        """Heatmap (H_f, W_f) over the valid region, best box (4,) in resized pixels, eq. 5 score, peak value, and
        the index of the query size whose correlation gave the best peak (`Matcher.localize`)."""
        qc = self.cfg.query
        loc = self.model.localize(q.scales, feats, q.z, qc.peaks, qc.nms_iou, valid_hw)
        return loc.heat, loc.boxes[0].numpy(), float(loc.score), float(loc.peaks[0]), int(loc.scales[0])

    # --- optional stages -----------------------------------------------------------------------------------
    def refine(
        self,
        q: QueryFeatures,
        scale_idx: int,
        feats: dict[int, torch.Tensor],
        box: np.ndarray,
        valid_hw: tuple[int, int],
        depth: np.ndarray | None,
    ):
        """Seed 000: the box (resized pixels) refined against the query at the size that matched best."""
        from roiqa.stages.refine import edge_pyramid, edge_weights, refine_box

        hw, qfeats = q.scales[scale_idx]
        query = {lv: f[0] for lv, f in qfeats.items()}  # {level: (C, h_l, w_l)}
        strides = {lv: self.model.stride(lv) for lv in query}
        if scale_idx not in q.edges:
            sizes = {lv: tuple(f.shape[-2:]) for lv, f in query.items()}
            q.edges[scale_idx] = edge_pyramid(edge_weights(q.resized[scale_idx]), sizes, strides, self.device)
        edge = q.edges[scale_idx]
        return refine_box(
            query, feats, strides, box, self.cfg.refine, edge, depth=depth, image_hw=valid_hw, query_hw=tuple(hw)
        )

    def verify_geometry(
        self, q: QueryFeatures, image: geometry.SiftFeatures, score: float, box: np.ndarray
    ) -> tuple[float, np.ndarray, int]:
        """(score, box in resized pixels, inliers) after the geometric verification of one pair: the homography's
        box and `geometry.fuse`'s bonus when it has `geometry.min_inliers` inliers, the inputs otherwise."""
        gc = self.cfg.geometry
        if q.sift is None:
            q.sift = geometry.sift_features(q.patch, geometry.MIN_QUERY_SIDE)
        g = geometry.match(q.sift, image, gc.ratio, gc.ransac_px)
        if g.box is not None and g.inliers >= gc.min_inliers:
            box = g.box
        return geometry.fuse(score, g.inliers, gc.min_inliers, gc.saturation, gc.weight), box, g.inliers

    def depth_map(self, uri: str) -> np.ndarray | None:
        """The image's depth map from the refine.depth template (any resolution), or None without one."""
        if not self.cfg.refine.depth:
            return None
        from roiqa.stages.refine import load_depth

        return load_depth(self.cfg.refine.depth, uri)

    # --- batch ---------------------------------------------------------------------------------------------
    @torch.inference_mode()
    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        cols = (S.QUERY_ID, S.IMAGE_ID, S.URI, S.SCORE, S.COARSE_SCORE, *S.BOX, S.HEATMAP_URI, "error")
        cols += (S.REFINE_STEPS, S.REFINE_LOSS, S.VERIFY_PROB, S.INLIERS)
        out: dict[str, list] = {k: [] for k in cols}

        def emit(qid, iid, u, score, coarse, box, heat_uri, err, steps=-1, loss=np.nan, prob=np.nan, inliers=-1):
            for k, v in zip(out, (qid, iid, u, score, coarse, *box, heat_uri, err, steps, loss, prob, inliers)):
                out[k].append(v)

        for iid, u, qids, coarse in zip(batch[S.IMAGE_ID], batch[S.URI], batch[S.QUERY_IDS], batch[S.COARSE_SCORES]):
            u = str(u)
            try:
                img = decode_image(uri_mod.read_bytes(u), u, self.cfg.preprocess.max_pixels)
            except uri_mod.StorageUnavailable:
                raise  # the store is down, not this input bad: the run fails (exit 3) and publishes nothing
            except Exception as exc:  # noqa: BLE001 - the image changed or vanished since indexing
                for qid, cs in zip(qids, coarse):
                    emit(qid, iid, u, np.nan, cs, [np.nan] * 4, None, RowError("rerank", "image_unreadable", str(exc)))
                continue
            resized, scale = resize_long_side(img, self.cfg.preprocess.image_size)
            valid = tuple(resized.shape[:2])
            feats = pyramid(self.model, resized, self.device)
            try:
                depth = self.depth_map(u) if self.cfg.refine.enabled else None
            except uri_mod.StorageUnavailable:
                raise  # the store is down, not this input bad: the run fails (exit 3) and publishes nothing
            except Exception as exc:  # noqa: BLE001 - a missing or bad depth map fails this image's rows, visibly
                for qid, cs in zip(qids, coarse):
                    emit(qid, iid, u, np.nan, cs, [np.nan] * 4, None, RowError("refine", "depth", str(exc)))
                continue
            image_sift = None  # SIFT of the resized image, computed for its first query
            for qid, cs in zip(qids, coarse):
                steps, loss, prob, inliers = -1, np.nan, np.nan, -1
                try:
                    q = self.query_features(str(qid))
                    heat, box, regions_score, peak, scale_idx = self.match(q, feats, valid)
                    score = peak if self.cfg.query.score == "peak" else regions_score
                    if self.cfg.refine.enabled:
                        r = self.refine(q, scale_idx, feats, box, valid, depth)
                        box, steps, loss = np.asarray(r.box, np.float32), r.steps, r.loss
                    if self.cfg.geometry.enabled:
                        if image_sift is None:
                            image_sift = geometry.sift_features(resized)
                        score, box, inliers = self.verify_geometry(q, image_sift, score, box)
                    box = clip_boxes(box / scale, img.shape[0], img.shape[1])[0]
                    if self.verifier is not None:
                        if q.verify_embedding is None:
                            q.verify_embedding = self.verifier.embed_query(q.patch)
                        prob = float(self.verifier.verify(q.patch, img, box[None], q.verify_embedding)[0])
                        score = score + self.cfg.verify.weight * (prob - 0.5)
                except uri_mod.StorageUnavailable:
                    raise  # the store is down, not this input bad: the run fails (exit 3) and publishes nothing
                except Exception as exc:  # noqa: BLE001 - a bad query is recorded, the rest goes on
                    emit(qid, iid, u, np.nan, cs, [np.nan] * 4, None, RowError("rerank", "failed", str(exc)))
                    continue
                heat_uri = self.write_overlay(str(qid), int(iid), img, heat, valid, box) if self.overlay_dir else None
                emit(qid, iid, u, score, cs, box, heat_uri, None, steps, loss, prob, inliers)
        return {
            S.QUERY_ID: object_array(out[S.QUERY_ID]),
            S.IMAGE_ID: np.array(out[S.IMAGE_ID], dtype=np.int64),
            S.URI: object_array(out[S.URI]),
            S.SCORE: np.array(out[S.SCORE], dtype=np.float32),
            S.COARSE_SCORE: np.array(out[S.COARSE_SCORE], dtype=np.float32),
            **{c: np.array(out[c], dtype=np.float32) for c in S.BOX},
            S.HEATMAP_URI: object_array(out[S.HEATMAP_URI]),
            **row_errors.columns(out["error"]),
            S.REFINE_STEPS: np.array(out[S.REFINE_STEPS], dtype=np.int32),  # -1: not refined (null when written)
            S.REFINE_LOSS: np.array(out[S.REFINE_LOSS], dtype=np.float32),
            S.VERIFY_PROB: np.array(out[S.VERIFY_PROB], dtype=np.float32),
            S.INLIERS: np.array(out[S.INLIERS], dtype=np.int32),  # -1: not verified (null when written)
        }

    def write_overlay(self, qid: str, iid: int, img: np.ndarray, heat: torch.Tensor, valid, box: np.ndarray) -> str:
        """Save the heatmap over the original image as PNG; returns its URI."""
        from roiqa.results.html import safe_name
        from roiqa.results.overlay import overlay

        h = heat.float().cpu().numpy()
        # The finest-level map covers ceil(valid / stride) cells: trim the part past the image before stretching.
        stride = self.model.stride(self.model.cfg.levels[0])
        h = h[: max(1, round(valid[0] / stride)), : max(1, round(valid[1] / stride))]
        png = encode_png(overlay(img, h, box=box, long_side=self.cfg.query.overlay_size), compress_level=1)
        target = uri_mod.join(self.overlay_dir, safe_name(qid), f"{iid}.png")
        uri_mod.write_bytes(target, png)
        return target
