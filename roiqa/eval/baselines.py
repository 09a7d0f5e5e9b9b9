"""Classical baselines for the evaluation: OpenCV multi-scale template matching and SIFT + RANSAC homography.

Both take a query patch and one image as (H, W, 3) uint8 RGB and return (score, box (4,) float32 x0, y0, x1, y1 in
the image's pixels). `run_baseline` scores every query against every gallery image with the same preprocessing
the learned pipeline sees (decode, resize the long side to `image_size`) and returns a RESULTS_SCHEMA table.

SIFT + RANSAC is `roiqa.stages.geometry.match` (the rerank's geometric verification) over every gallery image.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from roiqa import schema as S
from roiqa.boxes import clip_boxes
from roiqa.io import uri as uri_mod
from roiqa.io.ids import image_id
from roiqa.io.imageio import check_rgb_u8, decode_image, resize_long_side
from roiqa.stages import geometry
from roiqa.stages.geometry import SiftFeatures, cv2_module, sift_features, to_gray

DEFAULT_SCALES = tuple(float(2.0 ** (k / 4 - 1)) for k in range(9))  # 0.5x .. 2x of the query, step 2^(1/4), has 1x
MIN_TEMPLATE_SIDE = 8  # template-matching scales that shrink the query's short side below this are skipped
SIFT_MIN_QUERY_SIDE = geometry.MIN_QUERY_SIDE  # queries with a shorter long side are upscaled to it before SIFT


# --- template matching --------------------------------------------------------------------------------------


def _template_at(cv2, query: np.ndarray, image: np.ndarray, size: tuple[int, int]) -> tuple[float, np.ndarray]:
    """Best TM_CCOEFF_NORMED value and box of the grey `query` resized to `size` (h, w) inside grey `image`."""
    th, tw = size
    h, w = query.shape
    if (th, tw) == (h, w):
        templ = query
    else:
        interp = cv2.INTER_AREA if th * tw < h * w else cv2.INTER_LINEAR
        templ = cv2.resize(query, (tw, th), interpolation=interp)
    if templ.min() == templ.max():  # undefined correlation (OpenCV reports 1 everywhere): nothing matches it
        return 0.0, np.array([0, 0, tw, th], dtype=np.float32)
    res = cv2.matchTemplate(image, templ, cv2.TM_CCOEFF_NORMED)
    res = np.nan_to_num(res, nan=-1.0, posinf=1.0, neginf=-1.0)
    _, best, _, (x, y) = cv2.minMaxLoc(res)
    return float(np.clip(best, -1.0, 1.0)), np.array([x, y, x + tw, y + th], dtype=np.float32)


def _template_sizes(query_hw: tuple[int, int], image_hw: tuple[int, int], scales: Sequence[float]):
    """{scale: template (h, w)} for the scales whose template fits the image and keeps its short side >= 8 px.

    When none qualifies, one fallback scale: 1x pulled into that range, else the largest that fits the image.
    """
    (h, w), (ih, iw) = query_hw, image_hw
    out: dict[float, tuple[int, int]] = {}
    for s in sorted(float(s) for s in scales):
        if not np.isfinite(s) or s <= 0:
            raise ValueError(f"template_match: scales must be positive, got {s}")
        th, tw = max(1, round(h * s)), max(1, round(w * s))
        if th <= ih and tw <= iw and min(th, tw) >= MIN_TEMPLATE_SIDE and (th, tw) not in out.values():
            out[s] = (th, tw)
    if not out:
        s = min(max(1.0, MIN_TEMPLATE_SIDE / min(h, w)), ih / h, iw / w)
        out[s] = (min(ih, max(1, round(h * s))), min(iw, max(1, round(w * s))))
    return out


def _template_gray(
    query: np.ndarray, image: np.ndarray, scales: Sequence[float] | None = None, refine: int = 2
) -> tuple[float, np.ndarray]:
    """`template_match` on grey (H, W) uint8 arrays."""
    cv2 = cv2_module()
    sizes = _template_sizes(query.shape, image.shape, DEFAULT_SCALES if scales is None else scales)
    tried = sorted(sizes)
    results = {s: _template_at(cv2, query, image, sizes[s]) for s in tried}
    k = max(range(len(tried)), key=lambda i: results[tried[i]][0])  # first of equal maxima: the smallest scale
    best_score, best_box = results[tried[k]]
    # Refinement: `refine` geometric steps between the best scale and each neighbour it was compared with.
    done = set(sizes.values())
    for n in (k - 1, k + 1):
        if refine <= 0 or not 0 <= n < len(tried):
            continue
        for j in range(1, refine + 1):
            s = tried[k] * (tried[n] / tried[k]) ** (j / (refine + 1))
            size = (round(query.shape[0] * s), round(query.shape[1] * s))
            if size in done or size[0] > image.shape[0] or size[1] > image.shape[1] or min(size) < MIN_TEMPLATE_SIDE:
                continue
            done.add(size)
            score, box = _template_at(cv2, query, image, size)
            if score > best_score:
                best_score, best_box = score, box
    return best_score, best_box


def template_match(
    query: np.ndarray, image: np.ndarray, scales: Sequence[float] | None = None, *, refine: int = 2
) -> tuple[float, np.ndarray]:
    """Multi-scale template matching (OpenCV TM_CCOEFF_NORMED on grey): the query's best location and scale.

    The query is resized by each of `scales` (default `DEFAULT_SCALES`: 9 geometric steps from 0.5x to 2x of its
    own size, 1x included); scales whose template would be larger than the image or have a side under 8 px are
    skipped (if all are, one scale that fits is used). Then `refine` extra scales are tried geometrically between
    the best scale and each of its neighbours in the list (0: none), so an object between two listed scales is
    still boxed tightly. Returns (zero-mean normalised cross-correlation in [-1, 1] at the best location, box (4,)
    float32 x0, y0, x1, y1 in image pixels). A flat (constant) query or window correlates 0 (a flat query is then
    boxed at the top-left corner).
    """
    check_rgb_u8(query, "template_match: query")
    check_rgb_u8(image, "template_match: image")
    return _template_gray(to_gray(query), to_gray(image), scales, refine)


# --- SIFT + RANSAC ------------------------------------------------------------------------------------------


def _sift_pair(
    query: SiftFeatures, image: SiftFeatures, ratio: float = 0.75, min_inliers: int = 4
) -> tuple[float, np.ndarray]:
    """`sift_match` on precomputed features."""
    m = geometry.match(query, image, ratio, ransac_px=5.0)
    if m.box is not None and m.inliers >= max(4, min_inliers):
        return float(m.inliers), m.box
    return 0.0, geometry.points_box(m.matched_xy, image.hw)


def sift_match(
    query: np.ndarray, image: np.ndarray, ratio: float = 0.75, min_inliers: int = 4
) -> tuple[float, np.ndarray]:
    """SIFT keypoints, Lowe's ratio test and a RANSAC homography (reprojection threshold 5 px).

    Returns (number of RANSAC inliers, box (4,) float32 x0, y0, x1, y1): the axis-aligned bounds of the query's
    corners projected by the homography, clipped to the image. The score is 0 when there are fewer than
    `min_inliers` (and 4) good matches, no homography, fewer inliers than `min_inliers`, or a degenerate one (a
    corner mapped to infinity); the box is then that of the matched keypoints, or the whole image if none.
    Queries with a long side under 64 px are upscaled before SIFT.
    """
    check_rgb_u8(query, "sift_match: query")
    check_rgb_u8(image, "sift_match: image")
    return _sift_pair(sift_features(query, SIFT_MIN_QUERY_SIDE), sift_features(image), ratio, min_inliers)


METHODS: dict[str, Callable[[np.ndarray, np.ndarray], tuple[float, np.ndarray]]] = {
    "template": template_match,
    "sift": sift_match,
}


@dataclass(frozen=True)
class _Split:
    """A method as per-query and per-image preparation (done once each) plus the pairwise match."""

    whole: Callable[[np.ndarray, np.ndarray], tuple[float, np.ndarray]]  # the METHODS entry it is equivalent to
    query: Callable[[np.ndarray], Any]
    image: Callable[[np.ndarray], Any]
    match: Callable[[Any, Any], tuple[float, np.ndarray]]


_SPLITS = {
    "template": _Split(template_match, to_gray, to_gray, _template_gray),
    "sift": _Split(sift_match, lambda q: sift_features(q, SIFT_MIN_QUERY_SIDE), sift_features, _sift_pair),
}


# --- the whole gallery --------------------------------------------------------------------------------------


def _load_gallery(gallery: Sequence[str], image_size: int, max_pixels: int):
    """[(uri, original (h, w), resized image, resize scale)], each image decoded once; ValueError names a bad URI."""
    out = []
    for u in dict.fromkeys(str(g) for g in gallery):  # a URI listed twice is scored once
        try:
            img = decode_image(uri_mod.read_bytes(u), u, max_pixels)
        except (ValueError, OSError, KeyError) as exc:  # DecodeError is a ValueError; KeyError: missing tar member
            raise ValueError(f"run_baseline: cannot read gallery image {u!r}: {exc}") from exc
        resized, scale = resize_long_side(img, image_size)
        out.append((u, img.shape[:2], resized, scale))
    return out


def _results_frame(rows: dict[str, list]) -> pd.DataFrame:
    """Columns in RESULTS_SCHEMA order with its dtypes (strings as object)."""
    f32 = [S.SCORE, S.COARSE_SCORE, *S.BOX]
    df = pd.DataFrame(
        {
            S.QUERY_ID: pd.Series(rows[S.QUERY_ID], dtype=object),
            S.RANK: np.array(rows[S.RANK], dtype=np.int32),
            S.IMAGE_ID: np.array(rows[S.IMAGE_ID], dtype=np.int64),
            S.URI: pd.Series(rows[S.URI], dtype=object),
            **{c: np.array(rows[c], dtype=np.float32) for c in f32},
            S.HEATMAP_URI: pd.Series([None] * len(rows[S.QUERY_ID]), dtype=object),
            S.REFINE_STEPS: pd.Series([None] * len(rows[S.QUERY_ID]), dtype=object),
            S.REFINE_LOSS: np.full(len(rows[S.QUERY_ID]), np.nan, dtype=np.float32),
            S.VERIFY_PROB: np.full(len(rows[S.QUERY_ID]), np.nan, dtype=np.float32),
            S.INLIERS: pd.Series([None] * len(rows[S.QUERY_ID]), dtype=object),
        }
    )
    return df[[f.name for f in S.RESULTS_SCHEMA]]


def run_baseline(
    method: str,
    queries: dict[str, np.ndarray],
    gallery: Sequence[str],
    image_size: int,
    max_pixels: int,
    query_sizes: Sequence[int] | None = None,
) -> tuple[pd.DataFrame, dict[str, float]]:
    """Score every query patch against every gallery image with a classical method; one row per pair.

    `queries`: query id -> (h, w, 3) uint8 RGB patch, used as given (template matching searches 0.5x-2x of its
    size, so pass it at about the object's size in the resized gallery). Each gallery URI is read with
    `roiqa.io.uri.read_bytes`, decoded once (`decode_image` with `max_pixels`) and resized so its long side is
    `image_size`, as the learned pipeline does; per-image work of the method (grey conversion, SIFT features) is
    also done once. Boxes are mapped back to original-image pixels.

    Returns (results, timing). results has the RESULTS_SCHEMA columns: rank is 1-based by score descending, ties
    broken by URI; coarse_score = score; heatmap_uri is None. timing: ``seconds_total`` (everything, decoding
    included), ``seconds_gallery`` (decoding, resizing and per-image preparation) and ``seconds_per_query_median``
    (median over queries of the time to prepare one query and match it against the whole gallery; 0 with no
    queries). Raises ValueError for an unknown method, a malformed query or an unreadable gallery image.

    `query_sizes` (template matching only): search the template at these long sides in resized-gallery pixels
    instead of 0.5x-2x of the patch's own size, the same sizes the learned rerank tries (`query.query_sizes`), so
    both look for the object at the same scales whatever size the query patch was cropped at.
    """
    if method not in METHODS:
        raise ValueError(f"run_baseline: unknown method {method!r}; choose one of {sorted(METHODS)}")
    for qid, patch in queries.items():
        check_rgb_u8(patch, f"run_baseline: query {qid!r}")
    split = _SPLITS.get(method)
    if split is None or split.whole is not METHODS[method]:  # a method registered (or replaced) without a split
        split = _Split(METHODS[method], lambda q: q, lambda im: im, METHODS[method])
    if query_sizes and method == "template":
        sizes = sorted(float(v) for v in query_sizes)

        def match(gray_q: np.ndarray, gray_im: np.ndarray) -> tuple[float, np.ndarray]:
            return _template_gray(gray_q, gray_im, [v / max(gray_q.shape) for v in sizes], 2)

        split = _Split(template_match, to_gray, to_gray, match)
    t_start = time.perf_counter()
    images = _load_gallery(gallery, image_size, max_pixels)
    prepared = [split.image(resized) for _, _, resized, _ in images]
    seconds_gallery = time.perf_counter() - t_start

    rows: dict[str, list] = {k: [] for k in (S.QUERY_ID, S.RANK, S.IMAGE_ID, S.URI, S.SCORE, S.COARSE_SCORE, *S.BOX)}
    per_query = []
    for qid, patch in queries.items():
        t0 = time.perf_counter()
        q = split.query(patch)
        scored = []
        for (u, (h, w), _, scale), feats in zip(images, prepared):
            score, box = split.match(q, feats)
            scored.append((float(score), u, clip_boxes(np.asarray(box, np.float32) / np.float32(scale), h, w)[0]))
        per_query.append(time.perf_counter() - t0)
        scored.sort(key=lambda t: (-t[0], t[1]))
        for rank, (score, u, box) in enumerate(scored, start=1):
            for c, v in zip(rows, (str(qid), rank, image_id(u), u, score, score, *box)):
                rows[c].append(v)
    timing = {
        "seconds_total": time.perf_counter() - t_start,
        "seconds_gallery": seconds_gallery,
        "seconds_per_query_median": float(np.median(per_query)) if per_query else 0.0,
    }
    return _results_frame(rows), timing
