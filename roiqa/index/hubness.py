"""Hubness of regional descriptors: how much a region resembles the regions of other images.

Among many images, the regions that win a query are often not the object but "hubs": texture that looks a little
like everything (text, foliage, noise, a background repeated across the collection). Each region's hubness h(r)
is the mean of its k best inner products with a reference sample of the collection's regions, leaving out the
reference regions of its own image (overlapping windows of one image always resemble each other). The coarse stage
scores a region by <q, r> - weight * h(r), a correction in the spirit of CSLS (Conneau et al. 2018) and of
hubness reduction in nearest-neighbour retrieval. faiss keeps searching by inner product: a region is indexed as
[r, h(r)] and a query as [q, -weight], so the weight is a query-time setting.

The reference sample is drawn once, when faiss is built from every vector, and stored in the index version
(`hubness.parquet`); a re-index scores its new regions against the same sample, so old and new rows agree.

Hubness also says which regions an index can leave out (`least_hub`, `index.regions_per_image`): the regions most
like other images' are the ones a query cannot single an image out by, and fewer regions per image let the
regions a search fetches spread over more images.
"""

from __future__ import annotations

import faiss
import numpy as np
import pyarrow as pa

from roiqa.models.regions import decode_regions, encode_regions

# One row per reference region: its image's key and its descriptor in the regions' stored form (D + 2 bytes,
# roiqa.models.regions.encode_regions). The hubness of every region is measured against the decoded rows, at a
# build and at every later update alike.
REFERENCE_SCHEMA = pa.schema([("image_key", pa.int64()), ("vector_q8", pa.binary())])


def sample_reference(vectors: np.ndarray, image_keys: np.ndarray, n: int, seed: int = 0) -> pa.Table:
    """Up to `n` rows of (N, D) `vectors` drawn without replacement (seeded), with the key of each one's image."""
    pick = np.sort(np.random.default_rng(seed).choice(len(vectors), size=min(n, len(vectors)), replace=False))
    return reference_table(np.asarray(vectors, np.float32)[pick], np.asarray(image_keys, np.int64)[pick])


def reference_table(vectors: np.ndarray, image_keys: np.ndarray) -> pa.Table:
    """The stored form of reference regions (REFERENCE_SCHEMA)."""
    blobs = [encode_regions(v[None]) for v in np.asarray(vectors, np.float32)]
    return pa.table([pa.array(np.asarray(image_keys, np.int64)), pa.array(blobs, pa.binary())], schema=REFERENCE_SCHEMA)


def reference_arrays(table: pa.Table, dim: int, name: str = "hubness reference") -> tuple[np.ndarray, np.ndarray]:
    """(vectors (M, dim) float32, image keys (M,)) of a reference table; rows of another width are a ValueError."""
    if table.schema.names != REFERENCE_SCHEMA.names:
        raise ValueError(f"{name}: expected columns {REFERENCE_SCHEMA.names}, got {table.schema.names}")
    keys = np.asarray(table.column("image_key").to_numpy(), np.int64)
    blobs = table.column("vector_q8").to_pylist()
    if any(len(b or b"") != dim + 2 for b in blobs):
        raise ValueError(f"{name}: rows are not single {dim}-d regions ({dim + 2} bytes each)")
    vectors = np.concatenate([decode_regions(b, dim) for b in blobs]) if blobs else np.zeros((0, dim), np.float32)
    return vectors, keys


def hubness(
    vectors: np.ndarray,
    image_keys: np.ndarray,
    reference: np.ndarray,
    reference_keys: np.ndarray,
    k: int,
    chunk: int = 16384,
) -> np.ndarray:
    """h(r) for each of the (N, D) `vectors`: the mean of its k best inner products with the `reference` rows whose
    image key differs from its own (fewer than k when the reference holds fewer; 0 when it holds none). (N,)"""
    vectors = np.ascontiguousarray(vectors, np.float32)
    reference = np.ascontiguousarray(reference, np.float32)
    image_keys, reference_keys = np.asarray(image_keys, np.int64), np.asarray(reference_keys, np.int64)
    out = np.zeros(len(vectors), np.float32)
    if len(vectors) == 0 or len(reference) == 0 or k < 1:
        return out
    flat = faiss.IndexFlatIP(reference.shape[1])
    flat.add(reference)
    same = int(np.unique(reference_keys, return_counts=True)[1].max())  # most reference rows one image can own
    fetch = min(len(reference), k + same)
    for s in range(0, len(vectors), chunk):
        sims, idx = flat.search(vectors[s : s + chunk], fetch)
        other = reference_keys[idx] != image_keys[s : s + chunk, None]
        take = other & (np.cumsum(other, axis=1) <= k)  # the first k neighbours of other images, best first
        n = take.sum(axis=1)
        out[s : s + chunk] = np.where(n > 0, (sims * take).sum(axis=1) / np.maximum(n, 1), 0.0)
    return out


def augment(vectors: np.ndarray, h: np.ndarray) -> np.ndarray:
    """Index rows [r, h(r)]: (N, D) + (N,) -> (N, D + 1) float32."""
    return np.concatenate([np.asarray(vectors, np.float32), np.asarray(h, np.float32)[:, None]], axis=1)


def augment_queries(queries: np.ndarray, weight: float) -> np.ndarray:
    """Query rows [q, -weight]: (..., D) -> (..., D + 1), so <[q, -w], [r, h]> = <q, r> - w h(r)."""
    q = np.asarray(queries, np.float32)
    return np.concatenate([q, np.full(q.shape[:-1] + (1,), -float(weight), np.float32)], axis=-1)


def least_hub(region_keys: np.ndarray, h: np.ndarray, per_image: int) -> np.ndarray:
    """Row mask of the regions an index keeps: each image's whole-image region (region number 0) and its
    `per_image` other regions of lowest hubness `h`; `per_image` 0 keeps every region. (N,) bool."""
    from roiqa.models.regions import split_key

    if per_image < 0:
        raise ValueError(f"regions per image must be >= 0, got {per_image}")
    if per_image == 0:
        return np.ones(len(region_keys), bool)
    image, region = split_key(region_keys)
    h = np.where(region == 0, -np.inf, np.asarray(h, np.float64))  # the whole image first in its image's order
    order = np.lexsort((region, h, image))  # by image, then hubness ascending (ties: region order)
    image_sorted = image[order]
    starts = np.r_[0, np.flatnonzero(np.diff(image_sorted)) + 1]
    rank = np.arange(len(order)) - np.repeat(starts, np.diff(np.r_[starts, len(order)]))
    keep = np.zeros(len(region_keys), bool)
    keep[order[rank <= per_image]] = True
    return keep
