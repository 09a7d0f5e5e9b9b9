"""Geometric verification (roiqa.stages.geometry) and its place in the rerank: real photographs, known transforms."""

from __future__ import annotations

import dataclasses

import cv2
import numpy as np
import pytest
import skimage.data

from roiqa import errors as row_errors
from roiqa import schema as S
from roiqa.boxes import box_iou
from roiqa.config import GeometryConfig, ModelConfig, PreprocessConfig, QueryConfig, RoiqaConfig, VerifyConfig
from roiqa.io.imageio import encode_png
from roiqa.stages import geometry
from roiqa.stages.rerank import Reranker, coarse_views, rotate_patch

FACE = skimage.data.astronaut()[14:186, 150:304]  # 172 x 154, the astronaut's face
BRICK = np.repeat(skimage.data.brick()[:, :, None], 3, axis=2)  # 512 x 512
ROCKET = skimage.data.rocket()  # 427 x 640, no face in it


def warp_into(bg: np.ndarray, obj: np.ndarray, angle: float, scale: float, x0: int, y0: int):
    """`obj` rotated by `angle` degrees and scaled, pasted with its bounds' corner at (x0, y0); (image, bounds)."""
    h, w = obj.shape[:2]
    m = cv2.getRotationMatrix2D((w / 2, h / 2), angle, scale)
    corners = np.array([[0, 0], [w, 0], [w, h], [0, h]], np.float64) @ m[:, :2].T + m[:, 2]
    lo, hi = corners.min(axis=0), corners.max(axis=0)
    m[:, 2] -= lo
    size = tuple(int(v) for v in np.ceil(hi - lo))
    warped = cv2.warpAffine(obj, m, size, flags=cv2.INTER_LINEAR)
    mask = cv2.warpAffine(np.full((h, w), 255, np.uint8), m, size, flags=cv2.INTER_LINEAR) > 127
    out = bg.copy()
    out[y0 : y0 + size[1], x0 : x0 + size[0]][mask] = warped[mask]
    return out, np.array([x0, y0, x0 + hi[0] - lo[0], y0 + hi[1] - lo[1]], np.float32)


def test_ratio_matches_is_lowes_test_over_all_pairs():
    a = geometry.sift_features(FACE).desc
    b = geometry.sift_features(skimage.data.astronaut()).desc
    got = {tuple(p) for p in geometry.ratio_matches(a, b, 0.75).tolist()}
    d = np.sqrt(((a[:, None, :].astype(np.float64) - b[None, :, :]) ** 2).sum(-1))  # naive (Na, Nb) L2
    want = set()
    for i, row in enumerate(d):
        j1, j2 = np.argsort(row, kind="stable")[:2]
        if row[j1] < 0.75 * row[j2]:
            want.add((i, int(j1)))
    assert len(want) > 20  # the face is in the astronaut photograph
    assert len(got ^ want) <= 0.02 * len(want)  # float32 ties aside, the same pairs
    assert geometry.ratio_matches(a, b[:1], 0.75).shape == (0, 2)  # one image descriptor: nothing to compare


@pytest.mark.parametrize("angle,scale", [(0.0, 1.0), (25.0, 0.8), (-40.0, 1.3)])
def test_match_recovers_the_box_of_a_rotated_scaled_copy(angle, scale):
    image, truth = warp_into(BRICK, FACE, angle, scale, 150, 120)
    m = geometry.match(geometry.sift_features(FACE), geometry.sift_features(image))
    assert m.inliers >= 15
    assert box_iou(m.box, truth)[0, 0] >= 0.85
    miss = geometry.match(geometry.sift_features(FACE), geometry.sift_features(ROCKET))
    assert miss.inliers < GeometryConfig().min_inliers


def test_project_box_and_degenerate_homographies():
    shift_scale = np.array([[2.0, 0, 10], [0, 2.0, 20], [0, 0, 1]])
    np.testing.assert_allclose(geometry.project_box(shift_scale, (30, 40), (500, 500)), [10, 20, 90, 80])
    np.testing.assert_allclose(geometry.project_box(shift_scale, (30, 40), (50, 60)), [10, 20, 60, 50])  # clipped
    to_infinity = np.array([[1.0, 0, 0], [0, 1, 0], [-1 / 20, 0, 1]])  # x = 20 maps to the line at infinity
    assert geometry.project_box(to_infinity, (30, 40), (500, 500)) is None


def test_fuse_by_hand():
    assert geometry.fuse(0.3, 5, 6, 10, 1.0) == 0.3  # below min_inliers: unchanged
    assert geometry.fuse(0.3, 6, 6, 10, 1.0) == pytest.approx(0.9)
    assert geometry.fuse(0.3, 25, 6, 10, 2.0) == pytest.approx(2.3)  # saturated
    assert geometry.fuse(-0.1, 8, 6, 10, 0.0) == -0.1  # weight 0: ranking unchanged


def test_rotate_patch():
    p = FACE[:40, :60]
    assert rotate_patch(p, 0.0) is p
    np.testing.assert_array_equal(rotate_patch(p, 90.0), np.rot90(p))  # counter-clockwise, canvas grown
    r = rotate_patch(p, 30.0)
    c, s = np.cos(np.pi / 6), np.sin(np.pi / 6)
    assert abs(r.shape[1] - (60 * c + 40 * s)) <= 2 and abs(r.shape[0] - (60 * s + 40 * c)) <= 2
    assert r.dtype == np.uint8 and r.shape[2] == 3


def test_coarse_views_are_every_size_at_every_rotation():
    qc = QueryConfig(coarse_sizes=(64, 128), coarse_rotations=(0.0, 30.0))
    assert coarse_views(qc) == [(64, 0.0), (64, 30.0), (128, 0.0), (128, 30.0)]
    assert coarse_views(dataclasses.replace(qc, coarse_rotations=())) == [(64, 0.0), (128, 0.0)]


CFG = RoiqaConfig(
    model=ModelConfig(backbone="resnet18", backbone_weights=None, fpn_channels=64),
    preprocess=PreprocessConfig(image_size=512),
    query=QueryConfig(query_sizes=(64, 112), descriptor_size=64, peaks=3, overlays=False),
    verify=VerifyConfig(enabled=False),
)


def test_rerank_takes_the_homography_box_and_bonus(tmp_path):
    """With geometry on, a rotated copy gets the homography's box (the untrained dense match misses it) and
    exactly `fuse`'s bonus over the score with geometry off; the face-less image gets neither."""
    image, truth = warp_into(BRICK, FACE, 30.0, 0.7, 260, 40)
    paths = {"q": tmp_path / "q.png", "hit": tmp_path / "hit.png", "miss": tmp_path / "miss.png"}
    for k, img in (("q", FACE), ("hit", image), ("miss", ROCKET)):
        paths[k].write_bytes(encode_png(img))
    batch = {
        S.IMAGE_ID: np.arange(2, dtype=np.int64),
        S.URI: np.array([str(paths["hit"]), str(paths["miss"])], dtype=object),
        S.QUERY_IDS: [["face"]] * 2,
        S.COARSE_SCORES: [[0.0]] * 2,
    }
    queries = {"face": (str(paths["q"]), None)}
    on = Reranker(CFG, queries)(batch)
    off = Reranker(dataclasses.replace(CFG, geometry=GeometryConfig(enabled=False)), queries)(batch)
    assert row_errors.read(on) == [None, None]
    gc = CFG.geometry
    hit_box = np.array([on[c][0] for c in S.BOX])
    assert on[S.INLIERS][0] >= 15 and box_iou(hit_box, truth)[0, 0] >= 0.85
    want = geometry.fuse(float(off[S.SCORE][0]), int(on[S.INLIERS][0]), gc.min_inliers, gc.saturation, gc.weight)
    assert on[S.SCORE][0] == pytest.approx(want, abs=1e-5)
    assert on[S.INLIERS][1] < gc.min_inliers and on[S.SCORE][1] == pytest.approx(off[S.SCORE][1], abs=1e-6)
    np.testing.assert_allclose([on[c][1] for c in S.BOX], [off[c][1] for c in S.BOX])  # dense box kept
    assert list(off[S.INLIERS]) == [-1, -1]  # not verified


def test_bad_geometry_settings_are_refused():
    with pytest.raises(ValueError, match="min_inliers"):
        Reranker(dataclasses.replace(CFG, geometry=GeometryConfig(min_inliers=3)), {})


def test_geometry_check_rows(tmp_path):
    """GeometryCheck: one row per (query, image) with the inliers `geometry.match` finds; an unreadable image gives
    error rows with inliers -1."""
    from roiqa.stages.rerank import GeometryCheck

    image, _ = warp_into(BRICK, FACE, -20.0, 0.9, 100, 200)
    (tmp_path / "q.png").write_bytes(encode_png(FACE))
    (tmp_path / "hit.png").write_bytes(encode_png(image))
    (tmp_path / "miss.png").write_bytes(encode_png(ROCKET))
    check = GeometryCheck(CFG, {"face": (str(tmp_path / "q.png"), None), "rocket": (str(tmp_path / "miss.png"), None)})
    out = check(
        {
            S.IMAGE_ID: np.array([1, 2, 3], np.int64),
            S.URI: np.array([str(tmp_path / n) for n in ("hit.png", "miss.png", "gone.png")], dtype=object),
            S.QUERY_IDS: [["face", "rocket"], ["face"], ["face"]],
            S.COARSE_SCORES: [[0.0, 0.0], [0.0], [0.0]],
        }
    )
    assert list(out[S.QUERY_ID]) == ["face", "rocket", "face", "face"] and list(out[S.IMAGE_ID]) == [1, 1, 2, 3]
    face, hit = geometry.sift_features(FACE), geometry.sift_features(image)  # 512 px: the rerank's own size
    assert out[S.INLIERS][0] == geometry.match(face, hit).inliers >= 15
    assert out[S.INLIERS][1] < CFG.geometry.min_inliers and out[S.INLIERS][2] < CFG.geometry.min_inliers
    errs = row_errors.read(out)
    assert out[S.INLIERS][3] == -1 and (errs[3].stage, errs[3].reason) == ("geometry", "image_unreadable")
    assert errs[:3] == [None, None, None]
    # the fit's box, in the pixels of the image as the index resized it (512 px already), and that size
    box = np.array([out[c][0] for c in S.BOX])
    np.testing.assert_allclose(box, geometry.match(face, hit).box, atol=1e-4)
    assert (out[S.RESIZED_H][0], out[S.RESIZED_W][0]) == image.shape[:2] and np.isnan(out[S.X0][3])
