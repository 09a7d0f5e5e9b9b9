"""Spatially verified query expansion of the coarse search (Chum et al., "Total Recall", ICCV 2007).

An image the geometric check verifies shows the query's object, as the collection shows it: with its lighting,
scale, turn and surroundings. Its indexed region in the verified box is therefore a second description of the
object that other images' regions resemble more than they resemble the query patch. `expand_views` adds the best
such region of each of the query's `query.expand` most strongly verified images to each of its coarse views
(average query expansion: L2(view + sum of the regions)), and the coarse search runs again with them. The regions
come from the faiss index itself (the codes it holds, decoded): no image is read again and no embeddings row either.
Measured among 10,000 distractors in benchmarks/RESULTS.md ("Query expansion").
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from roiqa import schema as S
from roiqa.index import faiss_index
from roiqa.models.regions import REGION_BITS, image_key, region_grid


def strongest(checked: pd.DataFrame, min_inliers: int, n: int) -> dict[str, pd.DataFrame]:
    """Per query, its `n` verified rows (inliers >= `min_inliers`, with a box) of most inliers (ties: smaller image
    id first), from GeometryCheck's rows."""
    ok = checked[(checked[S.INLIERS] >= min_inliers) & checked[S.X0].notna()]
    ok = ok.sort_values([S.QUERY_ID, S.INLIERS, S.IMAGE_ID], ascending=[True, False, True], kind="stable")
    return {str(q): g.head(n) for q, g in ok.groupby(S.QUERY_ID, sort=False)}


class RegionSource:
    """The regions a region index holds, by image: their keys, cell boxes and stored (decoded) vectors."""

    def __init__(self, index, dim: int, stride: int) -> None:
        self.index, self.dim, self.stride = index, dim, stride
        keys = faiss_index.held_ids(index)
        order = np.argsort(keys >> REGION_BITS, kind="stable")
        images, starts = np.unique(keys[order] >> REGION_BITS, return_index=True)
        self._keys = dict(zip(images.tolist(), np.split(keys[order], starts[1:])))

    def regions(self, image_id: int, resized_hw: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
        """(boxes (R, 4) in resized pixels, vectors (R, D) L2-normalised) of the regions the index holds for an
        image of that resized size, the whole-image region left out."""
        h, w = resized_hw
        keys = self._keys.get(int(image_key(np.array([image_id]))[0]), np.zeros(0, np.int64))
        cells = region_grid(max(1, -(-h // self.stride)), max(1, -(-w // self.stride))).numpy()
        number = keys & ((1 << REGION_BITS) - 1)
        keep = (number > 0) & (number < len(cells))  # not the whole image; a grid of another size: none
        keys, number = keys[keep], number[keep]
        boxes = np.minimum(cells[number].astype(np.float32) * self.stride, np.array([w, h, w, h], np.float32))
        vectors = faiss_index.reconstruct(self.index, keys)[:, : self.dim]
        norms = np.linalg.norm(vectors, axis=1, keepdims=True)
        return boxes, vectors / np.where(norms > 0, norms, 1.0)


def box_region(source: RegionSource, views: np.ndarray, row, min_cover: float = 0.0) -> np.ndarray | None:
    """The region of a verified image whose box centre lies in the verified box, at least `min_cover` of whose area
    the verified box covers, and that scores best against the query's views (V, D); None when no held region
    qualifies."""
    boxes, vectors = source.regions(int(row[S.IMAGE_ID]), (int(row[S.RESIZED_H]), int(row[S.RESIZED_W])))
    x0, y0, x1, y1 = (float(row[c]) for c in S.BOX)
    cx, cy = (boxes[:, 0] + boxes[:, 2]) / 2, (boxes[:, 1] + boxes[:, 3]) / 2
    inside = (cx >= x0) & (cx <= x1) & (cy >= y0) & (cy <= y1)
    if min_cover > 0:
        iw = np.clip(np.minimum(boxes[:, 2], x1) - np.maximum(boxes[:, 0], x0), 0, None)
        ih = np.clip(np.minimum(boxes[:, 3], y1) - np.maximum(boxes[:, 1], y0), 0, None)
        area = np.maximum((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]), 1e-6)
        inside &= iw * ih / area >= min_cover
    if not inside.any():
        return None
    scores = (vectors[inside] @ views.T).max(axis=1)
    return vectors[inside][int(np.argmax(scores))]


def expand_views(
    views: np.ndarray,
    used: np.ndarray,
    query_ids: list[str],
    picks: dict[str, pd.DataFrame],
    source: RegionSource,
    min_cover: float = 0.0,
) -> tuple[np.ndarray, dict[str, int]]:
    """Each query's used views (Q, S, D) replaced by L2(view + the sum of its picked images' `box_region`s);
    queries without a region stay as they are. Returns the views and, per query, how many regions it took."""
    out = np.array(views, np.float32, copy=True)
    taken: dict[str, int] = {}
    for i, q in enumerate(query_ids):
        rows = picks.get(q)
        if rows is None or not used[i].any():
            continue
        regions = [
            r for r in (box_region(source, views[i][used[i]], row) for _, row in rows.iterrows()) if r is not None
        ]
        if not regions:
            continue
        v = views[i][used[i]] + np.sum(regions, axis=0)
        out[i][used[i]] = v / np.linalg.norm(v, axis=1, keepdims=True)
        taken[q] = len(regions)
    return out, taken
