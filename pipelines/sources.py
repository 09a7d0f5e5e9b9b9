"""The listed URIs of an index run as a Ray dataset (listing itself: roiqa.io.listing)."""

from __future__ import annotations

import pyarrow as pa
import ray

from pipelines.runtime import table_dataset
from roiqa import schema as S


def uri_dataset(uris: list[str], rows_per_block: int, sizes: list[int | None] | None = None) -> ray.data.Dataset:
    """A dataset of {uri, size_bytes} rows (the listed size; -1: unknown) split into blocks of `rows_per_block`,
    so reading runs in parallel tasks."""
    step = max(1, rows_per_block)
    sizes = [-1 if s is None else s for s in (sizes or [None] * len(uris))]

    table = pa.table({S.URI: pa.array(uris, pa.string()), S.SIZE_BYTES: pa.array(sizes, pa.int64())})
    return table_dataset(table, -(-len(uris) // step))
