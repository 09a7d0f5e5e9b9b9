"""Tests of roiqa.eval.metrics against hand-worked examples and an independent naive implementation."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from roiqa.eval.metrics import (
    LOC_AP50,
    MAP,
    MEAN_IOU,
    N_QUERIES,
    TOP10_IOU50,
    average_precision,
    evaluate,
    hit_rate_iou,
    interpolated_ap,
    localization_ap,
    match_detections,
    mean_iou,
    positives_found_at_k,
    positives_found_key,
    precision_recall_curve,
    recall_at_k,
    recall_key,
    retrieval_metrics,
)
from roiqa.schema import BOX, QUERY_ID, RANK, SCORE, URI, X0, X1, Y0, Y1

FAR = [900.0, 900.0, 910.0, 910.0]  # a box overlapping nothing in these tests


def results_df(rows: list[tuple]) -> pd.DataFrame:
    """rows: (query_id, rank, uri, score, box)."""
    return pd.DataFrame([(q, r, u, s, *box) for q, r, u, s, box in rows], columns=[QUERY_ID, RANK, URI, SCORE, *BOX])


def gt_df(rows: list[tuple]) -> pd.DataFrame:
    """rows: (query_id, uri, box)."""
    return pd.DataFrame([(q, u, *box) for q, u, box in rows], columns=[QUERY_ID, URI, *BOX])


# --- retrieval: pure functions ----------------------------------------------------------------------------


def test_average_precision_hand_examples():
    # hits at ranks 1 and 3: precision@1 = 1/1, precision@3 = 2/3 -> (1 + 2/3) / 2
    assert average_precision(np.array([1, 0, 1, 0, 0], bool), 2) == pytest.approx((1 + 2 / 3) / 2)
    assert average_precision(np.array([1, 0, 1, 0, 0], bool), 2) == pytest.approx(0.8333333333)
    # a third relevant item never retrieved is a miss: same sum, divided by 3
    assert average_precision(np.array([1, 0, 1, 0, 0], bool), 3) == pytest.approx((1 + 2 / 3) / 3)
    assert average_precision(np.ones(4, bool), 4) == 1.0
    # only hit at rank 3: precision@3 = 1/3
    assert average_precision(np.array([0, 0, 1], bool), 1) == pytest.approx(1 / 3)
    assert average_precision(np.zeros(3, bool), 2) == 0.0
    assert average_precision(np.zeros(0, bool), 2) == 0.0
    assert math.isnan(average_precision(np.zeros(3, bool), 0))


def test_average_precision_rejects_more_hits_than_relevant():
    with pytest.raises(ValueError):
        average_precision(np.ones(3, bool), 2)


def test_recall_at_k_is_a_hit():
    rel = np.array([0, 1, 0, 1, 1], bool)
    assert recall_at_k(rel, 4, 1) == 0.0
    assert recall_at_k(rel, 4, 2) == 1.0  # one relevant item in the top 2 is a hit, whatever the other three do
    assert recall_at_k(rel, 4, 5) == 1.0
    assert recall_at_k(rel, 3, 10) == 1.0  # k beyond the list
    assert recall_at_k(np.zeros(5, bool), 2, 5) == 0.0  # nothing relevant retrieved
    assert math.isnan(recall_at_k(rel[:0], 0, 5))
    with pytest.raises(ValueError):
        recall_at_k(rel, 3, 0)
    with pytest.raises(ValueError):
        recall_at_k(rel, 1, 5)  # 3 relevant items found but only 1 exists


def test_positives_found_at_k():
    rel = np.array([0, 1, 0, 1, 1], bool)
    assert positives_found_at_k(rel, 4, 1) == 0.0
    assert positives_found_at_k(rel, 4, 2) == 0.25  # one of four in the top 2
    assert positives_found_at_k(rel, 4, 5) == 0.75  # the fourth relevant item was never retrieved
    assert positives_found_at_k(rel, 3, 10) == 1.0  # k beyond the list
    assert positives_found_at_k(np.array([1, 0], bool), 4, 1) == 0.25  # a right first result: at most 1/4 at k = 1
    assert math.isnan(positives_found_at_k(rel[:0], 0, 5))
    with pytest.raises(ValueError):
        positives_found_at_k(rel, 3, 0)


# --- retrieval: DataFrame level ---------------------------------------------------------------------------


def _retrieval_example() -> tuple[pd.DataFrame, pd.DataFrame]:
    box = [0.0, 0.0, 1.0, 1.0]
    results = results_df(
        [
            # q1 retrieves a, z, b, w, v -> relevant [1, 0, 1, 0, 0]; c never retrieved (3 relevant)
            ("q1", 3, "b", 0.7, box),
            ("q1", 1, "a", 0.9, box),
            ("q1", 5, "v", 0.5, box),
            ("q1", 2, "z", 0.8, box),
            ("q1", 4, "w", 0.6, box),
            # q2 retrieves p, x -> relevant [0, 1] (1 relevant)
            ("q2", 2, "x", 0.4, box),
            ("q2", 1, "p", 0.5, box),
            # q4 has no ground truth: ignored
            ("q4", 1, "a", 0.9, box),
        ]
    )
    gt = gt_df(
        [
            ("q1", "a", box),
            ("q1", "b", box),
            ("q1", "c", box),
            ("q2", "x", box),
            ("q2", "x", [5.0, 5.0, 6.0, 6.0]),  # a second instance in the same image: still one relevant image
        ]
    )
    return results, gt


def test_retrieval_metrics_two_queries():
    results, gt = _retrieval_example()
    m = retrieval_metrics(results, gt, ks=(1, 5))
    # AP(q1) = (1/1 + 2/3) / 3 = 5/9; AP(q2) = (1/2) / 1 = 1/2; mAP = (5/9 + 1/2) / 2 = 19/36
    assert m[MAP] == pytest.approx(19 / 36)
    # recall@1: q1 hit (a), q2 miss -> 1/2; recall@5: both hit -> 1
    assert m[recall_key(1)] == pytest.approx(1 / 2)
    assert m[recall_key(5)] == pytest.approx(1.0)
    # positives found@1: q1 1/3, q2 0 -> 1/6; @5: q1 2/3, q2 1 -> 5/6
    assert m[positives_found_key(1)] == pytest.approx(1 / 6)
    assert m[positives_found_key(5)] == pytest.approx(5 / 6)
    assert m[N_QUERIES] == 2
    assert set(m) == {MAP, recall_key(1), recall_key(5), positives_found_key(1), positives_found_key(5), N_QUERIES}


def test_recall_is_the_share_of_queries_with_a_hit():
    """Four queries, hand-counted: Recall@K counts queries, positives found@K counts positives."""
    box = [0.0, 0.0, 1.0, 1.0]
    results = results_df(
        [
            # q1 (4 positives a-d) retrieves a, x, b: right at rank 1
            ("q1", 1, "a", 0.9, box),
            ("q1", 2, "x", 0.8, box),
            ("q1", 3, "b", 0.7, box),
            # q2 (2 positives e, f) retrieves x, e, y: first positive at rank 2
            ("q2", 1, "x", 0.9, box),
            ("q2", 2, "e", 0.8, box),
            ("q2", 3, "y", 0.7, box),
            # q3 (1 positive g) retrieves x, y, z: never found
            ("q3", 1, "x", 0.9, box),
            ("q3", 2, "y", 0.8, box),
            ("q3", 3, "z", 0.7, box),
            # q4 (4 positives h-k) retrieves h, i, j: right at ranks 1-3
            ("q4", 1, "h", 0.9, box),
            ("q4", 2, "i", 0.8, box),
            ("q4", 3, "j", 0.7, box),
        ]
    )
    positives = {"q1": "abcd", "q2": "ef", "q3": "g", "q4": "hijk"}
    gt = gt_df([(q, u, box) for q, uris in positives.items() for u in uris])
    m = retrieval_metrics(results, gt, ks=(1, 2, 3))
    # queries with a positive in the top 1: q1, q4 -> 2/4; top 2 and top 3: q1, q2, q4 -> 3/4
    assert m[recall_key(1)] == pytest.approx(2 / 4)
    assert m[recall_key(2)] == pytest.approx(3 / 4)
    assert m[recall_key(3)] == pytest.approx(3 / 4)
    # positives found: @1 (1/4 + 0 + 0 + 1/4) / 4 = 1/8 although half the queries are right at rank 1;
    # @2 (1/4 + 1/2 + 0 + 2/4) / 4 = 5/16; @3 (2/4 + 1/2 + 0 + 3/4) / 4 = 7/16
    assert m[positives_found_key(1)] == pytest.approx(1 / 8)
    assert m[positives_found_key(2)] == pytest.approx(5 / 16)
    assert m[positives_found_key(3)] == pytest.approx(7 / 16)


def test_retrieval_metrics_query_without_results_counts_as_zero():
    results, gt = _retrieval_example()
    gt = pd.concat([gt, gt_df([("q3", "y", [0.0, 0.0, 1.0, 1.0])])], ignore_index=True)
    m = retrieval_metrics(results, gt, ks=(1, 5))
    # q3 has AP 0, no hit and no positive found: mAP = (5/9 + 1/2 + 0) / 3 = 19/54
    assert m[MAP] == pytest.approx(19 / 54)
    assert m[recall_key(1)] == pytest.approx(1 / 3)
    assert m[recall_key(5)] == pytest.approx(2 / 3)
    assert m[positives_found_key(1)] == pytest.approx((1 / 3) / 3)
    assert m[positives_found_key(5)] == pytest.approx((2 / 3 + 1) / 3)
    assert m[N_QUERIES] == 3


def test_retrieval_metrics_repeated_image_counts_once():
    box = [0.0, 0.0, 1.0, 1.0]
    # "a" appears at ranks 1 and 2 (two boxes): only rank 1 counts, so the list is [a, b] -> AP = (1 + 2/2) / 2 = 1
    results = results_df([("q", 1, "a", 0.9, box), ("q", 2, "a", 0.8, box), ("q", 3, "b", 0.7, box)])
    gt = gt_df([("q", "a", box), ("q", "b", box)])
    assert retrieval_metrics(results, gt, ks=(2,))[MAP] == 1.0
    assert retrieval_metrics(results, gt, ks=(2,))[recall_key(2)] == 1.0
    assert retrieval_metrics(results, gt, ks=(2,))[positives_found_key(2)] == 1.0


def test_retrieval_metrics_empty_inputs():
    results, gt = _retrieval_example()
    m = retrieval_metrics(results, gt.iloc[:0])
    assert math.isnan(m[MAP]) and math.isnan(m[recall_key(10)]) and math.isnan(m[positives_found_key(10)])
    assert m[N_QUERIES] == 0
    m = retrieval_metrics(results.iloc[:0], gt)
    assert m[MAP] == 0.0 and m[recall_key(1)] == 0.0 and m[positives_found_key(1)] == 0.0 and m[N_QUERIES] == 2


# --- localization -----------------------------------------------------------------------------------------


def test_precision_recall_curve_and_interpolated_ap():
    # scores out of order: by score the sequence is TP, FP, TP with 4 positives
    precision, recall = precision_recall_curve(np.array([0.5, 0.9, 0.7]), np.array([True, True, False]), 4)
    np.testing.assert_allclose(precision, [1.0, 0.5, 2 / 3])
    np.testing.assert_allclose(recall, [0.25, 0.25, 0.5])
    # envelope: 1 at recall .25, 2/3 at recall .5 -> .25 * 1 + .25 * 2/3
    assert interpolated_ap(precision, recall) == pytest.approx(0.25 + 0.25 * 2 / 3)
    assert interpolated_ap(np.zeros(0), np.zeros(0)) == 0.0


def test_match_detections_takes_best_unmatched_box():
    gt = np.array([[0, 0, 10, 10], [4, 0, 14, 10]], np.float32)
    # det 0 has IoU 70/130 = .54 with gt 0 and 90/110 = .82 with gt 1 -> takes gt 1; det 1 then takes gt 0 (IoU 1).
    # Taking the first box above threshold instead would leave det 1 with gt 1 at IoU 60/140 = .43: a FP.
    det = np.array([[3, 0, 13, 10], [0, 0, 10, 10], [0, 0, 10, 10]], np.float32)
    np.testing.assert_array_equal(match_detections(det, gt, 0.5), [True, True, False])
    assert not match_detections(det, gt[:0], 0.5).any()


def test_localization_ap_hand_example():
    gt = gt_df(
        [
            ("q1", "a.jpg", [0, 0, 10, 10]),  # G1
            ("q1", "a.jpg", [20, 20, 30, 30]),  # G2: second instance in a.jpg, never detected
            ("q1", "b.jpg", [0, 0, 10, 10]),  # G3
            ("q2", "c.jpg", [0, 0, 10, 10]),  # G4: only a poor detection
            ("q2", "d.jpg", [50, 50, 60, 60]),  # G5
        ]
    )
    results = results_df(
        [
            ("q1", 1, "a.jpg", 0.9, [0, 0, 10, 10]),  # TP: G1 (IoU 1)
            ("q1", 2, "a.jpg", 0.8, [1, 0, 11, 10]),  # FP: IoU 90/110 with G1, already matched; 0 with G2
            ("q2", 1, "d.jpg", 0.7, [50, 50, 60, 60]),  # TP: G5
            ("q1", 3, "e.jpg", 0.6, [0, 0, 10, 10]),  # FP: e.jpg is not relevant to q1
            ("q1", 4, "b.jpg", 0.5, [0, 0, 10, 20]),  # TP: IoU 100/200 = 0.5 with G3 (threshold is inclusive)
            ("q2", 2, "c.jpg", 0.4, [5, 5, 15, 15]),  # FP: IoU 25/175 with G4
        ]
    )
    # 5 positives. In score order: TP FP TP FP TP FP
    #   precision 1/1 1/2 2/3 2/4 3/5 3/6
    #   recall    .2  .2  .4  .4  .6  .6
    #   envelope  1   2/3 2/3 3/5 3/5 1/2   (max precision at this point or later)
    # recall steps: 0 -> .2 (envelope 1), .2 -> .4 (2/3), .4 -> .6 (3/5)
    # AP = .2 * (1 + 2/3 + 3/5) = .2 * 34/15 = 34/75
    assert localization_ap(results, gt, 0.5) == pytest.approx(34 / 75)
    # order of rows does not matter
    assert localization_ap(results.iloc[::-1], gt, 0.5) == pytest.approx(34 / 75)
    # a stricter threshold turns the b.jpg detection into a FP: TP FP TP FP FP FP -> .2 * 1 + .2 * 2/3
    assert localization_ap(results, gt, 0.6) == pytest.approx(0.2 + 0.2 * 2 / 3)


def test_localization_ap_perfect_all_fp_and_empty():
    gt = gt_df([("q1", "a", [0, 0, 10, 10]), ("q1", "a", [4, 0, 14, 10]), ("q2", "b", [5, 5, 20, 20])])
    perfect = results_df(
        [("q1", 1, "a", 0.9, [3, 0, 13, 10]), ("q1", 2, "a", 0.8, [0, 0, 10, 10]), ("q2", 1, "b", 0.7, [5, 5, 20, 20])]
    )
    assert localization_ap(perfect, gt) == pytest.approx(1.0)
    all_fp = results_df([("q1", 1, "a", 0.9, FAR), ("q2", 1, "x", 0.8, [5, 5, 20, 20]), ("q3", 1, "b", 0.7, FAR)])
    assert localization_ap(all_fp, gt) == 0.0
    assert localization_ap(perfect.iloc[:0], gt) == 0.0
    assert math.isnan(localization_ap(perfect, gt.iloc[:0]))


def test_localization_ap_ties_broken_by_rank():
    gt = gt_df([("q", "a", [0, 0, 10, 10])])
    # equal scores: rank 1 (a FP box) goes first, then rank 2 (the TP) -> precision 1/2 at recall 1
    results = results_df([("q", 2, "a", 0.5, [0, 0, 10, 10]), ("q", 1, "a", 0.5, FAR)])
    assert localization_ap(results, gt) == pytest.approx(0.5)
    assert localization_ap(results.iloc[::-1], gt) == pytest.approx(0.5)


def test_localization_ap_missing_box_is_false_positive():
    gt = gt_df([("q", "a", [0, 0, 10, 10])])
    results = results_df([("q", 1, "a", 0.9, [np.nan] * 4), ("q", 2, "a", 0.8, [0, 0, 10, 10])])
    assert localization_ap(results, gt) == pytest.approx(0.5)


def _naive_iou(a: list[float], b: list[float]) -> float:
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def _naive_localization_ap(dets: list[tuple], gts: list[tuple], thr: float) -> float:
    """Plain-loop VOC2010-style all-point AP; dets (query, rank, uri, score, box), gts (query, uri, box)."""
    dets = sorted(dets, key=lambda d: (-d[3], d[1], d[0]))
    used = [False] * len(gts)
    flags = []
    for query, _, uri, _, box in dets:
        best, best_j = -1.0, -1
        for j, (g_query, g_uri, g_box) in enumerate(gts):
            if g_query == query and g_uri == uri and not used[j]:
                iou = _naive_iou(box, g_box)
                if iou > best:
                    best, best_j = iou, j
        if best_j >= 0 and best >= thr:
            used[best_j] = True
            flags.append(True)
        else:
            flags.append(False)
    points = []
    tp = fp = 0
    for flag in flags:
        tp, fp = tp + flag, fp + (not flag)
        points.append((tp / (tp + fp), tp / len(gts)))
    ap, prev_recall = 0.0, 0.0
    for recall in sorted({r for _, r in points}):
        if recall == 0:
            continue
        ap += (recall - prev_recall) * max(p for p, r in points if r >= recall)
        prev_recall = recall
    return ap


def _random_case(seed: int) -> tuple[list[tuple], list[tuple]]:
    # integer coordinates in [0, 40]: float32 and float64 IoUs agree on every comparison made
    rng = np.random.default_rng(seed)

    def rand_box() -> list[float]:
        x0, y0 = (int(v) for v in rng.integers(0, 30, 2))
        w, h = (int(v) for v in rng.integers(3, 11, 2))
        return [float(x0), float(y0), float(x0 + w), float(y0 + h)]

    queries = [f"q{i}" for i in range(6)]
    uris = [f"img{i}.jpg" for i in range(8)]
    gts = []
    for q in queries:
        for u in rng.choice(uris, size=int(rng.integers(1, 4)), replace=False):
            gts.extend((q, str(u), rand_box()) for _ in range(int(rng.integers(1, 3))))
    raw = []
    for _ in range(50):
        if rng.random() < 0.6:
            q, u, box = gts[int(rng.integers(len(gts)))]
            d = rng.integers(-2, 3, 4)
            x0, y0 = box[0] + d[0], box[1] + d[1]
            box = [x0, y0, max(box[2] + d[2], x0 + 1), max(box[3] + d[3], y0 + 1)]
        else:
            q, u, box = str(rng.choice(queries)), str(rng.choice(uris)), rand_box()
        raw.append((q, u, round(float(rng.random()), 1), [float(v) for v in box]))  # 1 decimal: many ties
    dets = []
    for q in queries:
        mine = [r for r in raw if r[0] == q]
        for rank, (qq, u, s, box) in zip(rng.permutation(len(mine)) + 1, mine, strict=True):
            dets.append((qq, int(rank), u, s, box))
    return dets, gts


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("thr", [0.3, 0.5, 0.7])
def test_localization_ap_matches_naive_implementation(seed: int, thr: float):
    dets, gts = _random_case(seed)
    expected = _naive_localization_ap(dets, gts, thr)
    results = results_df(dets).sample(frac=1.0, random_state=seed)
    got = localization_ap(results, gt_df(gts), thr)
    assert abs(got - expected) <= 1e-9
    if thr == 0.5:
        assert 0.0 < got < 1.0  # the case is not trivial


# --- hit rate, evaluate, validation -----------------------------------------------------------------------


def _hit_rate_example() -> tuple[pd.DataFrame, pd.DataFrame]:
    gt = gt_df(
        [
            ("q1", "a", [0, 0, 10, 10]),
            ("q1", "b", [0, 0, 10, 10]),
            ("q1", "b", [50, 50, 60, 60]),  # b contains the instance twice: either box counts
            ("q2", "c", [0, 0, 10, 10]),
            ("q2", "d", [0, 0, 10, 10]),
        ]
    )
    results = results_df(
        [
            ("q1", 1, "a", 0.9, [0, 0, 10, 10]),  # hit
            ("q1", 2, "b", 0.8, [50, 50, 60, 60]),  # hit, through its second box
            ("q2", 1, "c", 0.9, [20, 20, 30, 30]),  # retrieved, wrong box: miss
            ("q2", 2, "x", 0.8, [0, 0, 10, 10]),  # not relevant
            ("q2", 3, "d", 0.7, [0, 0, 10, 10]),  # right box but rank 3
        ]
    )
    return results, gt


def test_hit_rate_iou():
    results, gt = _hit_rate_example()
    # 4 ground-truth (query, uri) pairs: (q1, a), (q1, b) hit in the top 2; (q2, c) wrong box; (q2, d) rank 3
    assert hit_rate_iou(results, gt, k=2) == pytest.approx(2 / 4)
    assert hit_rate_iou(results, gt, k=3) == pytest.approx(3 / 4)
    assert hit_rate_iou(results, gt, k=1) == pytest.approx(1 / 4)
    assert math.isnan(hit_rate_iou(results, gt.iloc[:0]))


def test_evaluate_combines_metrics():
    results, gt = _hit_rate_example()
    m = evaluate(results, gt, ks=(1, 5))
    assert m[TOP10_IOU50] == pytest.approx(3 / 4)
    assert m[LOC_AP50] == pytest.approx(localization_ap(results, gt, 0.5))
    assert m[MAP] == pytest.approx(retrieval_metrics(results, gt, ks=(1, 5))[MAP])
    assert m[MEAN_IOU] == pytest.approx(mean_iou(results, gt))
    retrieval = {MAP, recall_key(1), recall_key(5), positives_found_key(1), positives_found_key(5), N_QUERIES}
    assert set(m) == {*retrieval, LOC_AP50, TOP10_IOU50, MEAN_IOU}


def test_mean_iou_worked_example():
    results, gt = _hit_rate_example()
    # (q1, a) 1, (q1, b) 1 through its second box, (q2, c) 0 (disjoint box), (q2, d) 1; (q2, x) has no ground truth
    assert mean_iou(results, gt) == pytest.approx(3 / 4)
    shifted = results.copy()
    shifted.loc[0, ["x0", "x1"]] = [5, 15]  # (q1, a): [5, 0, 15, 10] vs [0, 0, 10, 10]: IoU 50 / 150
    assert mean_iou(shifted, gt) == pytest.approx((1 / 3 + 1 + 0 + 1) / 4)
    no_box = results.copy()
    no_box.loc[2, ["x0", "y0", "x1", "y1"]] = np.nan  # (q2, c) unboxed: not counted
    assert mean_iou(no_box, gt) == pytest.approx(1.0)
    assert math.isnan(mean_iou(results.iloc[:0], gt))


def test_missing_columns_name_the_table():
    results, gt = _hit_rate_example()
    with pytest.raises(ValueError, match=rf"^results: .*'{SCORE}'"):
        localization_ap(results.drop(columns=[SCORE]), gt)
    with pytest.raises(ValueError, match=rf"^ground_truth: .*'{X1}'.*'{Y1}'"):
        evaluate(results, gt.drop(columns=[X1, Y1]))
    with pytest.raises(ValueError, match=rf"^ground_truth: .*'{URI}'"):
        retrieval_metrics(results, gt.drop(columns=[URI]))
    with pytest.raises(ValueError, match=rf"^results: .*'{RANK}'"):
        hit_rate_iou(results.drop(columns=[RANK]), gt)
    with pytest.raises(ValueError, match=rf"^results: .*'{X0}'.*'{Y0}'"):
        evaluate(results.drop(columns=[X0, Y0]), gt)
    with pytest.raises(ValueError, match=rf"^ground_truth: .*'{QUERY_ID}'"):
        hit_rate_iou(results, gt.drop(columns=[QUERY_ID]))


# --- stress buckets ---------------------------------------------------------------------------------------


def _bucket_example() -> tuple[pd.DataFrame, pd.DataFrame]:
    """Two queries, five instances spread over the buckets; results with hits, misses and negatives."""
    from roiqa.schema import GT_CLUTTER, GT_OCCLUSION, GT_ROTATION

    # (query, uri, box, occlusion, rotation, clutter); long sides a 50, b 100, c 200, d 60, e 130
    rows = [
        ("q1", "a", [0.0, 0.0, 50.0, 40.0], 0.0, 0.0, 1.0),  # small
        ("q1", "b", [0.0, 0.0, 100.0, 80.0], 0.3, 20.0, 2.0),  # mid, occluded, rotated
        ("q1", "c", [0.0, 0.0, 200.0, 150.0], 0.0, -30.0, 3.0),  # large, rotated
        ("q2", "d", [10.0, 10.0, 70.0, 70.0], 0.5, 5.0, 4.0),  # small, occluded, cluttered
        ("q2", "e", [0.0, 0.0, 130.0, 60.0], 0.1, 0.0, 5.0),  # large, cluttered
    ]
    gt = gt_df([(q, u, box) for q, u, box, *_ in rows])
    gt[GT_OCCLUSION] = [r[3] for r in rows]
    gt[GT_ROTATION] = [r[4] for r in rows]
    gt[GT_CLUTTER] = [r[5] for r in rows]
    boxes = dict(zip("abcde", [r[2] for r in rows]))
    results = results_df(
        [
            ("q1", 1, "x", 0.9, FAR),  # negative image
            ("q1", 2, "a", 0.8, boxes["a"]),  # hit
            ("q1", 3, "b", 0.7, boxes["b"]),  # hit
            ("q1", 4, "c", 0.6, FAR),  # retrieved, wrong box
            ("q2", 1, "e", 0.95, boxes["e"]),  # hit
            ("q2", 2, "y", 0.5, FAR),  # negative image
            ("q2", 3, "d", 0.4, boxes["d"]),  # hit
        ]
    )
    return results, gt


def test_stress_masks_hand_example():
    from roiqa.eval.metrics import STRESS_BUCKETS, stress_masks

    _, gt = _bucket_example()
    m = stress_masks(gt)
    assert tuple(m) == STRESS_BUCKETS
    # clutter [1, 2, 3, 4, 5]: the 2/3 quantile sits at position 4 * 2/3 = 2.67 -> 3.67, so d and e are cluttered
    want = {
        "small": [1, 0, 0, 1, 0],
        "mid": [0, 1, 0, 0, 0],
        "large": [0, 0, 1, 0, 1],
        "occluded": [0, 1, 0, 1, 0],
        "rotated": [0, 1, 1, 0, 0],
        "cluttered": [0, 0, 0, 1, 1],
    }
    for name, mask in want.items():
        np.testing.assert_array_equal(m[name], np.array(mask, bool), err_msg=name)


def test_stress_masks_edges():
    from roiqa.eval.metrics import stress_masks
    from roiqa.schema import GT_CLUTTER, GT_OCCLUSION, GT_ROTATION

    # long sides exactly 64 and 128 go up a bucket; occlusion 0.2 and |rotation| 15 are not above their thresholds
    gt = gt_df([("q", "a", [0.0, 0.0, 64.0, 10.0]), ("q", "b", [0.0, 0.0, 10.0, 128.0]), ("q", "c", [0, 0, 63.9, 1])])
    gt[GT_OCCLUSION] = [0.2, 0.21, 0.0]
    gt[GT_ROTATION] = [-15.0, -15.5, 15.0]
    gt[GT_CLUTTER] = [2.0, 2.0, 1.0]  # 2/3 quantile of [1, 2, 2] is 2: both 2s are cluttered
    m = stress_masks(gt)
    np.testing.assert_array_equal(m["small"], [False, False, True])
    np.testing.assert_array_equal(m["mid"], [True, False, False])
    np.testing.assert_array_equal(m["large"], [False, True, False])
    np.testing.assert_array_equal(m["occluded"], [False, True, False])
    np.testing.assert_array_equal(m["rotated"], [False, True, False])
    np.testing.assert_array_equal(m["cluttered"], [True, True, False])
    with pytest.raises(ValueError, match=r"^ground_truth: .*'clutter'"):
        stress_masks(gt.drop(columns=[GT_CLUTTER]))


def test_evaluate_buckets_hand_example():
    from roiqa.eval.metrics import N_POSITIVES, STRESS_BUCKETS, evaluate_buckets

    results, gt = _bucket_example()
    got = evaluate_buckets(results, gt)
    assert set(got) == {"all", *STRESS_BUCKETS}
    r1, r5 = recall_key(1), recall_key(5)
    f1, f5 = positives_found_key(1), positives_found_key(5)
    # Per bucket, by hand (rows of the other buckets' positives removed from each query's list):
    want = {
        # q1: x, a -> AP 1/2; q2: y, d -> AP 1/2. Localization: x FP .9, a TP .8, y FP .5, d TP .4 over 2 positives
        # -> precision at the two hits 1/2 and 2/4 -> AP .5 * .5 + .5 * .5 = .5; both pairs hit in the top 10.
        "small": {MAP: 0.5, r1: 0.0, r5: 1.0, LOC_AP50: 0.5, TOP10_IOU50: 1.0, N_QUERIES: 2, N_POSITIVES: 2},
        # q1: x, b -> AP 1/2; q2 has no mid positive (its y stays as a negative). Loc: x FP, b TP, y FP -> 1/2.
        "mid": {MAP: 0.5, r1: 0.0, r5: 1.0, LOC_AP50: 0.5, TOP10_IOU50: 1.0, N_QUERIES: 1, N_POSITIVES: 1},
        # q1: x, c -> AP 1/2; q2: e, y -> AP 1 -> mAP 3/4. Loc: e TP .95, x FP, c FP (wrong box), y FP -> AP .5 * 1.
        "large": {MAP: 0.75, r1: 0.5, r5: 1.0, LOC_AP50: 0.5, TOP10_IOU50: 0.5, N_QUERIES: 2, N_POSITIVES: 2},
        # q1: x, b -> 1/2; q2: y, d -> 1/2. Loc: x FP, b TP (1/2), y FP, d TP (2/4) -> .5
        "occluded": {MAP: 0.5, r1: 0.0, r5: 1.0, LOC_AP50: 0.5, TOP10_IOU50: 1.0, N_QUERIES: 2, N_POSITIVES: 2},
        # q1: x, b, c -> relevant [0, 1, 1] -> AP (1/2 + 2/3) / 2 = 7/12. Loc: x FP, b TP (1/2), c FP, y FP -> .25
        "rotated": {MAP: 7 / 12, r1: 0.0, r5: 1.0, LOC_AP50: 0.25, TOP10_IOU50: 0.5, N_QUERIES: 1, N_POSITIVES: 2},
        # q2: e, y, d -> [1, 0, 1] -> AP (1 + 2/3) / 2 = 5/6; right at rank 1 (recall@1 1), one of its two positives
        # in the top 1 (positives found@1 1/2). Loc: e TP (1), x FP, y FP, d TP (2/4) -> .5 + .25
        "cluttered": {MAP: 5 / 6, r1: 1.0, f1: 0.5, r5: 1.0, f5: 1.0, LOC_AP50: 0.75, TOP10_IOU50: 1.0, N_QUERIES: 1},
    }
    for bucket, metrics in want.items():
        for key, value in metrics.items():
            assert got[bucket][key] == pytest.approx(value), (bucket, key)
    assert got["cluttered"][N_POSITIVES] == 2
    assert got["all"] == {**evaluate(results, gt), N_POSITIVES: 5}
    # Without removing the other positives' rows the small bucket would score lower: q2 would read e, y, d.
    plain = evaluate(results, gt[[True, False, False, True, False]])
    assert plain[MAP] == pytest.approx((1 / 2 + 1 / 3) / 2) and plain[MAP] < got["small"][MAP]


def test_bucket_results_keeps_negatives_and_mixed_pairs():
    from roiqa.eval.metrics import bucket_results

    gt = gt_df([("q", "a", [0, 0, 10, 10]), ("q", "a", [20, 20, 30, 30]), ("q", "b", [0, 0, 10, 10])])
    results = results_df([("q", 1, "a", 0.9, FAR), ("q", 2, "b", 0.8, FAR), ("q", 3, "n", 0.7, FAR)])
    # bucket = the first box of a: a is kept (it also holds a bucket instance), b goes, the negative n stays
    kept = bucket_results(results, gt, np.array([True, False, False]))
    assert kept[URI].tolist() == ["a", "n"]
    # bucket = the second box of a (same pair) and nothing else: b still goes
    assert bucket_results(results, gt, np.array([False, True, False]))[URI].tolist() == ["a", "n"]
    assert bucket_results(results, gt, np.ones(3, bool))[URI].tolist() == ["a", "b", "n"]
    with pytest.raises(ValueError, match="mask has shape"):
        bucket_results(results, gt, np.ones(2, bool))


def test_pr_curve_points_hand_example():
    from roiqa.eval.metrics import pr_curve_points

    results, gt = _bucket_example()
    precision, recall = pr_curve_points(results, gt)
    # detection order e (TP), x, a (TP), b (TP), c, y, d (TP) over 5 positives
    np.testing.assert_allclose(precision, [1, 1 / 2, 2 / 3, 3 / 4, 3 / 5, 3 / 6, 4 / 7])
    np.testing.assert_allclose(recall, [0.2, 0.2, 0.4, 0.6, 0.6, 0.6, 0.8])
    assert interpolated_ap(precision, recall) == pytest.approx(localization_ap(results, gt))
    p0, r0 = pr_curve_points(results, gt.iloc[:0])
    assert p0.size == 0 and r0.size == 0
