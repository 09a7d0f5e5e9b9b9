"""Tests of roiqa.eval.report: the PNGs decode at the expected size with the boxes where they belong; the table."""

from __future__ import annotations

import math

import numpy as np
import pytest
from PIL import Image

from roiqa import schema as S
from roiqa.eval.report import (
    _PALETTE,
    INDEX_BYTES_PER_IMAGE,
    IOU,
    LATENCY,
    PRED_BOX,
    PRED_COLOUR,
    TRUE_BOXES,
    TRUE_COLOUR,
    heatmap_gallery_png,
    markdown_table,
    pr_curves_png,
)


def _rgb(path: str) -> np.ndarray:
    with Image.open(path) as im:
        assert im.format == "PNG"
        return np.asarray(im.convert("RGB"))


def test_pr_curves_png(tmp_path):
    path = str(tmp_path / "pr.png")
    curves = {
        "flat": (np.array([0.5, 0.5, 0.5]), np.array([0.2, 0.6, 1.0])),  # precision 1/2 up to recall 1
        "other": (np.array([1.0, 0.5]), np.array([0.5, 0.5])),
        "empty": (np.zeros(0), np.zeros(0)),
    }
    pr_curves_png(curves, path, size=(640, 480))
    img = _rgb(path)
    assert img.shape == (480, 640, 3)
    # The flat curve is one horizontal line across the plot (recall 0 to 1: the 410-pixel plot width of the 640):
    # some row holds over 350 of its pixels, far more than the 22-pixel legend swatch.
    is_flat = (img == np.array(_PALETTE[0], np.uint8)).all(axis=2)
    assert is_flat.sum(axis=1).max() > 350
    assert (img == np.array(_PALETTE[1], np.uint8)).all(axis=2).any()
    with pytest.raises(ValueError, match="'bad'"):
        pr_curves_png({"bad": (np.zeros(2), np.zeros(3))}, str(tmp_path / "bad.png"))


def test_heatmap_gallery_png(tmp_path):
    # a 200 x 100 (W x H) grey gallery image and a blue 100 x 50 overlay of it (long side 100)
    gallery = str(tmp_path / "g.png")
    Image.fromarray(np.full((100, 200, 3), 128, np.uint8)).save(gallery)
    heat = str(tmp_path / "h.png")
    Image.fromarray(np.tile(np.array([0, 0, 255], np.uint8), (50, 100, 1))).save(heat)
    rows = [
        {
            S.QUERY_ID: "q1",
            S.RANK: 1,
            S.SCORE: 0.9,
            S.URI: gallery,
            S.HEATMAP_URI: heat,
            PRED_BOX: [40.0, 20.0, 120.0, 80.0],
            TRUE_BOXES: [[100.0, 10.0, 190.0, 90.0]],
            IOU: 0.1,
        },
        {S.QUERY_ID: "q2", S.RANK: 3, S.SCORE: float("nan"), S.URI: gallery, S.HEATMAP_URI: None, PRED_BOX: None},
        {S.QUERY_ID: "q3", S.RANK: 7, S.SCORE: 0.1, S.URI: gallery, S.HEATMAP_URI: None},
    ]
    path = str(tmp_path / "gallery.png")
    heatmap_gallery_png(rows, path, tile=64, columns=2)
    img = _rgb(path)
    assert img.shape == (2 * (64 + 34), 2 * 64, 3)  # 3 tiles in 2 columns: 2 rows of tile + caption

    # Tile 1: the overlay (100 x 50) is shown at 64 x 32, i.e. 0.32 shown pixels per original pixel.
    # Predicted box [40, 20, 120, 80] -> x 12.8 .. 38.4, y 6.4 .. 25.6; true box x0 100 -> 32, y 10 .. 90 -> 3 .. 29.
    def near(colour, xs, ys) -> bool:
        return bool((img[ys[0] : ys[1], xs[0] : xs[1]] == np.array(colour, np.uint8)).all(axis=2).any())

    assert near(PRED_COLOUR, (11, 15), (14, 18))  # the left edge of the predicted box, half way down
    assert not near(PRED_COLOUR, (20, 30), (12, 20))  # the box's inside stays overlay blue
    assert near(TRUE_COLOUR, (30, 35), (12, 20))  # the left edge of the true box
    # Tile 2 (no overlay): the grey gallery image, no boxes drawn.
    tile2 = img[:32, 64:128]
    assert (tile2 == 128).all()
    with pytest.raises(ValueError, match="row 0 lacks"):
        heatmap_gallery_png([{S.QUERY_ID: "q"}], str(tmp_path / "x.png"))
    with pytest.raises(ValueError, match="no rows"):
        heatmap_gallery_png([], str(tmp_path / "x.png"))


def test_markdown_table_rows_and_numbers():
    metrics = {
        "roiqa": {
            "all": {"mAP": 0.5, "recall@1": 0.5, "recall@5": 1.0, "recall@10": 1.0, "positives_found@1": 0.25,
                    "positives_found@5": 0.875, "positives_found@10": 1.0, "loc_ap50": 0.125, "top10_iou50": 0.75,
                    "mean_iou": 0.6, "n_positives": 8},
            "small": {"mAP": math.nan, "recall@1": math.nan, "recall@5": math.nan, "recall@10": math.nan,
                      "loc_ap50": math.nan, "top10_iou50": math.nan, "n_positives": 0},
            LATENCY: {"coarse_seconds_per_query_run_mean": 0.01234, "rerank_seconds_per_query_run_mean": 1.5},
            INDEX_BYTES_PER_IMAGE: 1536.4,
        },
        "sift": {
            "all": {"mAP": 0.3333333, "recall@1": 0.0, "recall@5": 0.5, "recall@10": 0.5, "loc_ap50": 0.2,
                    "top10_iou50": 0.5, "n_positives": 8},
            "small": {"mAP": 1.0, "recall@1": 1.0, "recall@5": 1.0, "recall@10": 1.0, "loc_ap50": 1.0,
                      "top10_iou50": 1.0, "n_positives": 0},
            LATENCY: {"seconds_per_query_median": 0.2},
        },
    }  # fmt: skip
    lines = markdown_table(metrics).splitlines()
    assert len(lines) == 2 + 4  # header, rule, one row per method x bucket
    cells = [[c.strip() for c in ln.strip("|").split("|")] for ln in lines]
    assert cells[0] == [
        "method", "bucket", "positives", "mAP", "R@1", "R@5", "R@10", "found@1", "found@5", "found@10", "loc AP@0.5",
        "top-10 IoU>=0.5", "mean IoU", "coarse_seconds_per_query_run_mean (s)", "rerank_seconds_per_query_run_mean (s)",
        "seconds_per_query_median (s)", "index bytes/image",
    ]  # fmt: skip
    assert all(len(c) == len(cells[0]) for c in cells)
    assert cells[2] == ["roiqa", "all", "8", "0.500", "0.500", "1.000", "1.000", "0.250", "0.875", "1.000", "0.125",
                        "0.750", "0.600", "0.0123", "1.5000", "-", "1536"]  # fmt: skip
    assert cells[3] == ["roiqa", "small", "0"] + ["-"] * 14
    # no positives_found figures: "-"
    assert cells[4] == ["sift", "all", "8", "0.333", "0.000", "0.500", "0.500", "-", "-", "-", "0.200", "0.500", "-",
                        "-", "-", "0.2000", "-"]  # fmt: skip
    assert cells[5][:4] == ["sift", "small", "0", "1.000"] and cells[5][12:] == ["-"] * 5
