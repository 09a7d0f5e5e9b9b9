"""Geometric verification: local features, Lowe's ratio test and a RANSAC homography from query patch to image.

The rerank's last word on a (query, image) pair, the way DELG and classic instance retrieval verify a shortlist:
SIFT keypoints of the query patch and of the candidate image (at the rerank's resolution), matched with the ratio
test, then a homography fitted by RANSAC. The number of inliers says whether the object is there; the query's
corners projected by the homography say where. Dense cross-correlation stays the score of pairs SIFT cannot see
(small, low-texture or blurred objects); a pair with enough inliers gets a bonus and the projected box
(`fuse`). The classical SIFT + RANSAC baseline of `roiqa eval` is `match` run over every gallery image.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from roiqa.boxes import clip_boxes

MIN_QUERY_SIDE = 64  # query patches with a shorter long side are upscaled to it before SIFT


def cv2_module():
    """The cv2 module, or an ImportError that says how to install it."""
    try:
        import cv2
    except ImportError as exc:
        raise ImportError("roiqa needs OpenCV (opencv-python-headless): pip install -e .") from exc
    return cv2


def to_gray(image: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8 RGB -> (H, W) uint8 grey with OpenCV's weights (0.299 R + 0.587 G + 0.114 B, rounded)."""
    cv2 = cv2_module()
    return cv2.cvtColor(np.ascontiguousarray(image), cv2.COLOR_RGB2GRAY)


@dataclass(frozen=True)
class SiftFeatures:
    """SIFT keypoints of one image: positions (N, 2) float32 x, y in its pixels, descriptors (N, 128), (h, w)."""

    xy: np.ndarray
    desc: np.ndarray
    hw: tuple[int, int]


def sift_features(image: np.ndarray, min_long_side: int = 0) -> SiftFeatures:
    """SIFT keypoints and descriptors of an (H, W, 3) uint8 RGB image.

    An image whose long side is under `min_long_side` is upscaled (bilinear) to it first so that tiny patches have
    keypoints; positions are reported in the pixels of the input either way.
    """
    cv2 = cv2_module()
    gray = to_gray(image)
    h, w = gray.shape
    factor = 1.0
    if max(h, w) < min_long_side:
        factor = min_long_side / max(h, w)
        gray = cv2.resize(gray, (max(1, round(w * factor)), max(1, round(h * factor))), interpolation=cv2.INTER_LINEAR)
    kps, desc = cv2.SIFT_create().detectAndCompute(gray, None)
    if desc is None or not kps:
        return SiftFeatures(np.zeros((0, 2), np.float32), np.zeros((0, 128), np.float32), (h, w))
    xy = np.array([kp.pt for kp in kps], dtype=np.float32).reshape(-1, 2)
    if factor != 1.0:
        # Pixel-centre convention: upscaled position p corresponds to (p + 0.5) / factor - 0.5 in the input.
        xy = (xy + 0.5) / np.float32(factor) - 0.5
    return SiftFeatures(xy, np.asarray(desc, dtype=np.float32), (h, w))


def ratio_matches(query: np.ndarray, image: np.ndarray, ratio: float) -> np.ndarray:
    """(M, 2) int64 (query index, image index) pairs whose nearest image descriptor (L2) is closer than `ratio`
    times the second nearest (Lowe's ratio test). Needs two image descriptors to compare; none otherwise."""
    if len(query) == 0 or len(image) < 2:
        return np.zeros((0, 2), np.int64)
    cv2 = cv2_module()
    good = [
        (pair[0].queryIdx, pair[0].trainIdx)
        for pair in cv2.BFMatcher(cv2.NORM_L2).knnMatch(query, image, k=2)
        if len(pair) == 2 and pair[0].distance < ratio * pair[1].distance
    ]
    return np.array(good, dtype=np.int64).reshape(-1, 2)


def project_box(homography: np.ndarray, query_hw: tuple[int, int], image_hw: tuple[int, int]) -> np.ndarray | None:
    """Bounds of the query rectangle's corners mapped by `homography`, clipped; None if a corner is at infinity."""
    h, w = query_hw
    corners = np.array([[0, 0, 1], [w, 0, 1], [w, h, 1], [0, h, 1]], dtype=np.float64)
    p = corners @ np.asarray(homography, dtype=np.float64).T
    if not np.all(np.isfinite(p)) or np.any(p[:, 2] <= 1e-9 * np.abs(p[:, :2]).max(initial=1.0)):
        return None  # a corner maps behind the camera or to infinity: the fit is degenerate
    xy = p[:, :2] / p[:, 2:]
    box = np.array([*xy.min(axis=0), *xy.max(axis=0)], dtype=np.float32)
    return clip_boxes(box, image_hw[0], image_hw[1])[0]


def points_box(xy: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
    """Axis-aligned box of points (whole image when there are none), clipped to an image of size hw."""
    if len(xy) == 0:
        return np.array([0, 0, hw[1], hw[0]], dtype=np.float32)
    box = np.array([*xy.min(axis=0), *xy.max(axis=0)], dtype=np.float32)
    return clip_boxes(box, hw[0], hw[1])[0]


@dataclass(frozen=True)
class GeometricMatch:
    """The outcome of `match`: RANSAC inliers (0 without a fit), the projected query box in image pixels (None
    without a non-degenerate fit) and the image positions of the ratio-test matches (M, 2)."""

    inliers: int
    box: np.ndarray | None
    matched_xy: np.ndarray


def match(query: SiftFeatures, image: SiftFeatures, ratio: float = 0.75, ransac_px: float = 5.0) -> GeometricMatch:
    """Ratio-test matches from query to image and a RANSAC homography (reprojection threshold `ransac_px` image
    pixels) over them. With fewer than 4 matches, no fit, or a degenerate fit (a corner mapped to infinity) the
    result has 0 inliers and no box."""
    pairs = ratio_matches(query.desc, image.desc, ratio)
    src, dst = query.xy[pairs[:, 0]], image.xy[pairs[:, 1]]
    if len(pairs) >= 4:
        cv2 = cv2_module()
        homography, mask = cv2.findHomography(src.reshape(-1, 1, 2), dst.reshape(-1, 1, 2), cv2.RANSAC, ransac_px)
        if homography is not None and mask is not None:
            box = project_box(homography, query.hw, image.hw)
            if box is not None:
                return GeometricMatch(int(mask.sum()), box, dst)
    return GeometricMatch(0, None, dst)


def fuse(score: float, inliers: int, min_inliers: int, saturation: int, weight: float) -> float:
    """The rerank score after verification: `score + weight * min(inliers, saturation) / saturation` when the
    homography has at least `min_inliers` inliers, `score` unchanged otherwise: among verified images more inliers
    rank higher up to `saturation`, past which the dense score decides."""
    if inliers < min_inliers:
        return score
    return score + weight * min(inliers, saturation) / saturation
