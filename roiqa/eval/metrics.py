"""Evaluation metrics: retrieval mAP, Recall@K and positives found@K by (query, image); localization AP and hit rate
at IoU >= t."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import numpy as np
import pandas as pd

from roiqa.boxes import box_iou
from roiqa.schema import BOX, GT_CLUTTER, GT_OCCLUSION, GT_ROTATION, QUERY_ID, RANK, SCORE, URI

# Names of the two input tables (used in error messages) and of the metrics returned.
RESULTS = "results"
GROUND_TRUTH = "ground_truth"
MAP = "mAP"
N_QUERIES = "n_queries"
LOC_AP50 = "loc_ap50"
TOP10_IOU50 = "top10_iou50"
MEAN_IOU = "mean_iou"
N_POSITIVES = "n_positives"

# Stress buckets over ground-truth rows (see `stress_masks`) and the bucket of every row.
ALL = "all"
SMALL, MID, LARGE, OCCLUDED, ROTATED, CLUTTERED = "small", "mid", "large", "occluded", "rotated", "cluttered"
STRESS_BUCKETS = (SMALL, MID, LARGE, OCCLUDED, ROTATED, CLUTTERED)
SIZE_EDGES = (64.0, 128.0)  # box long side in original pixels: small < 64 <= mid < 128 <= large
OCCLUDED_ABOVE = 0.2  # occluded: occlusion fraction > this
ROTATED_ABOVE_DEG = 15.0  # rotated: |rotation_deg| > this
CLUTTER_QUANTILE = 2 / 3  # cluttered: clutter >= this quantile of the ground truth's clutter values

RESULTS_COLUMNS = [QUERY_ID, RANK, URI, SCORE, *BOX]
GROUND_TRUTH_COLUMNS = [QUERY_ID, URI, *BOX]


def recall_key(k: int) -> str:
    """Name of Recall@k (the share of queries with a positive in their top k) in the dicts returned here: "recall@5"."""
    return f"recall@{k}"


def positives_found_key(k: int) -> str:
    """Name of the share of a query's positives found in its top k, averaged over queries: "positives_found@5"."""
    return f"positives_found@{k}"


# --- pure functions on arrays ------------------------------------------------------------------------------


def average_precision(relevant: np.ndarray, n_relevant: int) -> float:
    """Retrieval AP of one ranked list: (1 / n_relevant) * sum of precision@k over the ranks k holding a relevant item.

    `relevant` is a bool array in rank order (rank 1 first). Relevant items that were never retrieved count as misses,
    which is why `n_relevant` (all relevant items, retrieved or not) is passed. Returns nan when n_relevant == 0.
    """
    rel = np.asarray(relevant, dtype=bool).ravel()
    if n_relevant <= 0:
        return math.nan
    n_found = int(rel.sum())
    if n_found > n_relevant:
        raise ValueError(f"{n_found} relevant items retrieved but n_relevant={n_relevant}")
    if n_found == 0:
        return 0.0
    precision_at_k = np.cumsum(rel) / np.arange(1, rel.size + 1)
    return float(precision_at_k[rel].sum() / n_relevant)


def recall_at_k(relevant: np.ndarray, n_relevant: int, k: int) -> float:
    """Recall@k of one query: 1.0 when the top `k` of `relevant` (rank order) hold a relevant item, else 0.0; nan when
    the query has no relevant item (`n_relevant` == 0). Averaged over queries it is the hit rate, the standard
    Recall@K of instance retrieval."""
    found = _found_in_top(relevant, n_relevant, k)
    return math.nan if n_relevant <= 0 else float(found > 0)


def positives_found_at_k(relevant: np.ndarray, n_relevant: int, k: int) -> float:
    """Fraction of the `n_relevant` relevant items found in the top `k` of `relevant` (rank order); nan if 0.

    At most k / n_relevant: a query with 4 positives scores 0.25 at k = 1 even when its first result is right.
    """
    found = _found_in_top(relevant, n_relevant, k)
    return math.nan if n_relevant <= 0 else found / n_relevant


def _found_in_top(relevant: np.ndarray, n_relevant: int, k: int) -> int:
    """Relevant items among the first `k` of `relevant`, checked against `n_relevant`."""
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    found = int(np.asarray(relevant, dtype=bool).ravel()[:k].sum())
    if n_relevant > 0 and found > n_relevant:
        raise ValueError(f"{found} relevant items in the top {k} but n_relevant={n_relevant}")
    return found


def roc_auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Area under the ROC curve: P(score of a positive > score of a negative), ties counting half (Mann-Whitney)."""
    scores, labels = np.asarray(scores, np.float64).ravel(), np.asarray(labels, bool).ravel()
    n_pos, n_neg = int(labels.sum()), int((~labels).sum())
    if n_pos == 0 or n_neg == 0:
        raise ValueError(f"roc_auc: needs positives and negatives, got {n_pos} and {n_neg}")
    order = np.argsort(scores, kind="mergesort")
    ranks = np.empty(len(scores))
    sorted_scores = scores[order]
    starts = np.r_[0, np.flatnonzero(np.diff(sorted_scores)) + 1]
    ends = np.r_[starts[1:], len(scores)]
    for s, e in zip(starts, ends):  # average rank of each tie group (1-based)
        ranks[order[s:e]] = (s + e + 1) / 2
    return float((ranks[labels].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def precision_recall_curve(scores: np.ndarray, is_tp: np.ndarray, n_positives: int) -> tuple[np.ndarray, np.ndarray]:
    """(precision, recall) after each detection, detections taken by descending score (stable: ties keep their order).

    NaN scores sort last. Recall is relative to `n_positives` (all ground-truth objects, detected or not).
    """
    s = np.asarray(scores, dtype=np.float64).ravel()
    tp = np.asarray(is_tp, dtype=bool).ravel()
    if s.shape != tp.shape:
        raise ValueError(f"scores and is_tp differ in length: {s.size} vs {tp.size}")
    if n_positives <= 0:
        raise ValueError(f"n_positives must be > 0, got {n_positives}")
    if int(tp.sum()) > n_positives:
        raise ValueError(f"{int(tp.sum())} true positives but n_positives={n_positives}")
    tp = tp[np.argsort(-s, kind="stable")]
    tp_cum = np.cumsum(tp)
    precision = tp_cum / np.arange(1, tp.size + 1)
    recall = tp_cum / n_positives
    return precision, recall


def interpolated_ap(precision: np.ndarray, recall: np.ndarray) -> float:
    """All-point interpolated AP (VOC2010+, COCO without 101-point sampling) of a curve in score order.

    Sum over the recall steps r_{i-1} -> r_i (r_0 = 0) of (r_i - r_{i-1}) * max precision at recall >= r_i.
    An empty curve (no detections) has AP 0.
    """
    p = np.asarray(precision, dtype=np.float64).ravel()
    r = np.asarray(recall, dtype=np.float64).ravel()
    if p.shape != r.shape:
        raise ValueError(f"precision and recall differ in length: {p.size} vs {r.size}")
    if p.size == 0:
        return 0.0
    mrec = np.concatenate(([0.0], r))
    envelope = np.maximum.accumulate(np.concatenate(([0.0], p))[::-1])[::-1]  # max precision at index >= i
    steps = np.flatnonzero(mrec[1:] != mrec[:-1]) + 1  # first point of each new recall level
    return float(np.sum((mrec[steps] - mrec[steps - 1]) * envelope[steps]))


def match_detections(det_boxes: np.ndarray, gt_boxes: np.ndarray, iou_threshold: float = 0.5) -> np.ndarray:
    """Greedy matching of detections (in descending score order) to the ground-truth boxes of one (query, image).

    Each detection takes the unmatched ground-truth box of highest IoU (first one on ties) if that IoU is
    >= `iou_threshold`, and is then a true positive; otherwise it is a false positive. Returns a bool array (N,).
    """
    n_det = len(det_boxes)
    is_tp = np.zeros(n_det, dtype=bool)
    if n_det == 0 or len(gt_boxes) == 0:
        return is_tp
    iou = box_iou(det_boxes, gt_boxes)  # NaN boxes give IoU 0
    matched = np.zeros(iou.shape[1], dtype=bool)
    for i in range(n_det):
        candidates = np.where(matched, -1.0, iou[i])
        j = int(np.argmax(candidates))
        if candidates[j] >= iou_threshold:
            matched[j] = True
            is_tp[i] = True
    return is_tp


# --- DataFrame-level wrappers ------------------------------------------------------------------------------


def _require(df: pd.DataFrame, name: str, columns: Sequence[str]) -> None:
    """Raise ValueError naming the table `name` and the columns of `columns` that `df` lacks."""
    if not isinstance(df, pd.DataFrame):
        raise TypeError(f"{name}: expected a pandas DataFrame, got {type(df).__name__}")
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise ValueError(f"{name}: missing required column(s) {missing}; has {list(df.columns)}")


def _check_ks(ks: Iterable[int]) -> list[int]:
    out = [int(k) for k in ks]
    if any(k < 1 for k in out):
        raise ValueError(f"every k must be >= 1, got {out}")
    return out


def _boxes(df: pd.DataFrame) -> np.ndarray:
    """(N, 4) float32 boxes of `df`, nulls as NaN."""
    return df[BOX].to_numpy(dtype=np.float32, na_value=np.nan).reshape(len(df), 4)


def _pair_positions(df: pd.DataFrame) -> dict[tuple, np.ndarray]:
    """Row positions of `df` for each (query_id, uri), in row order."""
    if len(df) == 0:
        return {}
    return dict(df.groupby([QUERY_ID, URI], sort=False, dropna=False).indices)


def _gt_boxes_by_pair(ground_truth: pd.DataFrame) -> dict[tuple, np.ndarray]:
    """Ground-truth boxes of each (query_id, uri)."""
    boxes = _boxes(ground_truth)
    return {key: boxes[pos] for key, pos in _pair_positions(ground_truth).items()}


def _detection_order(results: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    """Row order of all detections (score descending, then rank, then query_id; stable) and the sort-key scores."""
    scores = results[SCORE].to_numpy(dtype=np.float64, na_value=np.nan)
    scores = np.where(np.isnan(scores), -np.inf, scores)  # a detection without a score comes last
    ranks = results[RANK].to_numpy(dtype=np.float64, na_value=np.inf)
    query_codes, _ = pd.factorize(results[QUERY_ID], sort=True)
    order = np.lexsort((query_codes, ranks, -scores))
    return order, scores[order]


def _match_results(
    results: pd.DataFrame, ground_truth: pd.DataFrame, iou_threshold: float
) -> tuple[np.ndarray, np.ndarray]:
    """(scores, is_tp) of all result rows pooled over queries, in detection order."""
    order, scores = _detection_order(results)
    det = results.iloc[order]
    det_boxes = _boxes(det)
    gt_boxes = _gt_boxes_by_pair(ground_truth)
    is_tp = np.zeros(len(det), dtype=bool)
    for key, pos in _pair_positions(det).items():  # matching never crosses (query, image) pairs
        gt = gt_boxes.get(key)
        if gt is not None:
            is_tp[pos] = match_detections(det_boxes[pos], gt, iou_threshold)
    return scores, is_tp


def retrieval_metrics(
    results: pd.DataFrame, ground_truth: pd.DataFrame, ks: Sequence[int] = (1, 5, 10)
) -> dict[str, float]:
    """mAP, Recall@k and positives found@k over the queries with >= 1 relevant image; relevance is by (query_id, uri).

    Recall@k ("recall@k") is the share of queries with a relevant image in their top k (`recall_at_k`); positives
    found@k ("positives_found@k") the share of a query's relevant images in its top k, averaged over queries
    (`positives_found_at_k`). Results are put in rank order per query (ranks only order rows) and a repeated
    (query_id, uri) keeps only its best-ranked row. A query with ground truth but no results has AP 0 and both
    figures 0; queries without ground truth are ignored. Returns {"mAP", "recall@k" and "positives_found@k" for each
    k, "n_queries"}; metrics are nan when no query has ground truth.
    """
    _require(results, RESULTS, [QUERY_ID, RANK, URI])
    _require(ground_truth, GROUND_TRUTH, [QUERY_ID, URI])
    ks = _check_ks(ks)
    pairs = ground_truth[[QUERY_ID, URI]].drop_duplicates()
    n_relevant = pairs.groupby(QUERY_ID, sort=True).size()
    ranked = (
        results[[QUERY_ID, RANK, URI]]
        .sort_values([QUERY_ID, RANK], kind="stable")
        .drop_duplicates([QUERY_ID, URI], keep="first")
    )
    if len(ranked) and len(pairs):
        is_relevant = pd.MultiIndex.from_frame(ranked[[QUERY_ID, URI]]).isin(pd.MultiIndex.from_frame(pairs))
        positions = ranked.groupby(QUERY_ID, sort=False).indices
    else:
        is_relevant, positions = np.zeros(len(ranked), dtype=bool), {}
    aps: list[float] = []
    recalls: dict[int, list[float]] = {k: [] for k in ks}
    found: dict[int, list[float]] = {k: [] for k in ks}
    for query, n in n_relevant.items():
        pos = positions.get(query)
        relevant = is_relevant[pos] if pos is not None else np.zeros(0, dtype=bool)
        aps.append(average_precision(relevant, int(n)))
        for k in ks:
            recalls[k].append(recall_at_k(relevant, int(n), k))
            found[k].append(positives_found_at_k(relevant, int(n), k))
    out: dict[str, float] = {MAP: _mean(aps)}
    out.update({recall_key(k): _mean(recalls[k]) for k in ks})
    out.update({positives_found_key(k): _mean(found[k]) for k in ks})
    out[N_QUERIES] = len(n_relevant)
    return out


def _mean(values: list[float]) -> float:
    return float(np.mean(values)) if values else math.nan


def localization_ap(results: pd.DataFrame, ground_truth: pd.DataFrame, iou_threshold: float = 0.5) -> float:
    """Detection AP at `iou_threshold` over all result rows of all queries pooled (each row is one detection).

    Detections are taken by score descending (ties: rank, then query_id) and matched greedily within their
    (query_id, uri) to the unmatched ground-truth box of best IoU (see `match_detections`); a row without a box is
    a false positive. Positives are the ground-truth rows. All-point interpolated AP; nan without ground truth.
    """
    _require(results, RESULTS, RESULTS_COLUMNS)
    _require(ground_truth, GROUND_TRUTH, GROUND_TRUTH_COLUMNS)
    if len(ground_truth) == 0:
        return math.nan
    scores, is_tp = _match_results(results, ground_truth, iou_threshold)
    precision, recall = precision_recall_curve(scores, is_tp, len(ground_truth))
    return interpolated_ap(precision, recall)


def hit_rate_iou(results: pd.DataFrame, ground_truth: pd.DataFrame, k: int = 10, iou_threshold: float = 0.5) -> float:
    """Fraction of ground-truth (query_id, uri) pairs retrieved with rank <= k by a row whose box has
    IoU >= `iou_threshold` with one of the pair's ground-truth boxes; nan without ground truth."""
    _require(results, RESULTS, [QUERY_ID, RANK, URI, *BOX])
    _require(ground_truth, GROUND_TRUTH, GROUND_TRUTH_COLUMNS)
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    gt_boxes = _gt_boxes_by_pair(ground_truth)
    if not gt_boxes:
        return math.nan
    top = results[results[RANK].to_numpy(dtype=np.float64, na_value=np.inf) <= k]
    boxes = _boxes(top)
    hits = 0
    for key, pos in _pair_positions(top).items():
        gt = gt_boxes.get(key)
        if gt is not None and float(box_iou(boxes[pos], gt).max()) >= iou_threshold:
            hits += 1
    return hits / len(gt_boxes)


def mean_iou(results: pd.DataFrame, ground_truth: pd.DataFrame) -> float:
    """Mean over the ground-truth (query_id, uri) pairs that have a result row with a box of the best IoU between
    that pair's result boxes and its ground-truth boxes (how well found instances are boxed); nan when none."""
    _require(results, RESULTS, [QUERY_ID, URI, *BOX])
    _require(ground_truth, GROUND_TRUTH, GROUND_TRUTH_COLUMNS)
    gt_boxes = _gt_boxes_by_pair(ground_truth)
    boxed = results[np.isfinite(_boxes(results)).all(axis=1)] if len(results) else results
    boxes = _boxes(boxed)
    ious = [
        float(box_iou(boxes[pos], gt_boxes[key]).max())
        for key, pos in _pair_positions(boxed).items()
        if key in gt_boxes
    ]
    return _mean(ious)


def evaluate(results: pd.DataFrame, ground_truth: pd.DataFrame, ks: Sequence[int] = (1, 5, 10)) -> dict[str, float]:
    """`retrieval_metrics` plus "loc_ap50" (`localization_ap` at IoU 0.5), "top10_iou50" (`hit_rate_iou`) and
    "mean_iou" (`mean_iou`)."""
    _require(results, RESULTS, RESULTS_COLUMNS)
    _require(ground_truth, GROUND_TRUTH, GROUND_TRUTH_COLUMNS)
    out = retrieval_metrics(results, ground_truth, ks)
    out[LOC_AP50] = localization_ap(results, ground_truth, iou_threshold=0.5)
    out[TOP10_IOU50] = hit_rate_iou(results, ground_truth, k=10, iou_threshold=0.5)
    out[MEAN_IOU] = mean_iou(results, ground_truth)
    return out


# --- stress buckets and curves -----------------------------------------------------------------------------


def stress_masks(ground_truth: pd.DataFrame) -> dict[str, np.ndarray]:
    """{bucket: (N,) bool mask over the rows of `ground_truth`} for every name in STRESS_BUCKETS.

    small / mid / large: box long side max(x1 - x0, y1 - y0) < 64, in [64, 128), >= 128 (original pixels);
    occluded: occlusion > 0.2; rotated: |rotation_deg| > 15; cluttered: clutter >= the 2/3 quantile (linear
    interpolation) of the table's clutter values. Rows with a NaN value are in no bucket that reads it.
    """
    _require(ground_truth, GROUND_TRUTH, [*GROUND_TRUTH_COLUMNS, GT_OCCLUSION, GT_ROTATION, GT_CLUTTER])
    b = _boxes(ground_truth).astype(np.float64)
    long_side = np.maximum(b[:, 2] - b[:, 0], b[:, 3] - b[:, 1])  # (N,)
    occlusion = ground_truth[GT_OCCLUSION].to_numpy(dtype=np.float64, na_value=np.nan)
    rotation = ground_truth[GT_ROTATION].to_numpy(dtype=np.float64, na_value=np.nan)
    clutter = ground_truth[GT_CLUTTER].to_numpy(dtype=np.float64, na_value=np.nan)
    finite = clutter[np.isfinite(clutter)]
    cut = float(np.quantile(finite, CLUTTER_QUANTILE)) if finite.size else math.inf
    lo, hi = SIZE_EDGES
    return {
        SMALL: long_side < lo,
        MID: (long_side >= lo) & (long_side < hi),
        LARGE: long_side >= hi,
        OCCLUDED: occlusion > OCCLUDED_ABOVE,
        ROTATED: np.abs(rotation) > ROTATED_ABOVE_DEG,
        CLUTTERED: clutter >= cut,
    }


def bucket_results(results: pd.DataFrame, ground_truth: pd.DataFrame, mask: np.ndarray) -> pd.DataFrame:
    """`results` without the rows of (query_id, uri) pairs whose ground truth lies wholly outside `mask`.

    Those rows belong to positives of other buckets: removed, they count neither as hits nor as false positives.
    Rows of pairs with no ground truth (true negatives) stay. A pair holding instances both inside and outside the
    bucket keeps its rows, with only the inside boxes as targets (never the case in generated collections, where
    an object is pasted at most once per image).
    """
    _require(results, RESULTS, [QUERY_ID, URI])
    _require(ground_truth, GROUND_TRUTH, [QUERY_ID, URI])
    mask = np.asarray(mask, dtype=bool)
    if mask.shape != (len(ground_truth),):
        raise ValueError(f"mask has shape {mask.shape}; expected ({len(ground_truth)},) for the ground-truth rows")
    inside = pd.MultiIndex.from_frame(ground_truth.loc[mask, [QUERY_ID, URI]])
    outside = pd.MultiIndex.from_frame(ground_truth.loc[~mask, [QUERY_ID, URI]]).difference(inside)
    if len(results) == 0 or len(outside) == 0:
        return results
    pairs = pd.MultiIndex.from_frame(results[[QUERY_ID, URI]])
    return results[~pairs.isin(outside)]


def evaluate_buckets(
    results: pd.DataFrame, ground_truth: pd.DataFrame, ks: Sequence[int] = (1, 5, 10)
) -> dict[str, dict[str, float]]:
    """{"all": ..., bucket: ...} for "all" and every STRESS_BUCKETS name: `evaluate` plus "n_positives".

    "all" is `evaluate(results, ground_truth)`. A bucket is evaluated with only its ground-truth rows as positives,
    on `bucket_results` (the rows of the other positives removed). "n_positives" counts ground-truth rows
    (instances). A bucket without rows has nan metrics.
    """
    _require(results, RESULTS, RESULTS_COLUMNS)
    masks = stress_masks(ground_truth)
    out = {ALL: {**evaluate(results, ground_truth, ks), N_POSITIVES: len(ground_truth)}}
    for name, mask in masks.items():
        gt = ground_truth[mask]
        out[name] = {**evaluate(bucket_results(results, ground_truth, mask), gt, ks), N_POSITIVES: int(mask.sum())}
    return out


def pr_curve_points(
    results: pd.DataFrame, ground_truth: pd.DataFrame, iou_threshold: float = 0.5
) -> tuple[np.ndarray, np.ndarray]:
    """(precision, recall) of the localization curve whose area `localization_ap` takes, one point per result row.

    Rows pooled over queries in detection order (score descending); empty arrays when there is no ground truth.
    """
    _require(results, RESULTS, RESULTS_COLUMNS)
    _require(ground_truth, GROUND_TRUTH, GROUND_TRUTH_COLUMNS)
    if len(ground_truth) == 0:
        return np.zeros(0), np.zeros(0)
    scores, is_tp = _match_results(results, ground_truth, iou_threshold)
    return precision_recall_curve(scores, is_tp, len(ground_truth))
