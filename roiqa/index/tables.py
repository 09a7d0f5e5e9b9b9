"""Index tables from embedded batches: the embeddings and errors rows, the masks controller history, duplicates."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pyarrow as pa

from roiqa import errors as row_errors
from roiqa import schema as S
from roiqa.errors import RowError, errors_table


def _column(values: np.ndarray, field: pa.Field) -> pa.Array:
    """One numpy batch column as the Arrow type of `field` (fixed-size lists from 2-D arrays, lists from objects)."""
    t = field.type
    if pa.types.is_fixed_size_list(t):
        flat = np.ascontiguousarray(np.stack(list(values)) if values.dtype == object else values, np.float32)
        return pa.FixedSizeListArray.from_arrays(pa.array(flat.reshape(-1), t.value_type), t.list_size)
    if pa.types.is_list(t):
        return pa.array([np.asarray(v).tolist() for v in values], t)
    if pa.types.is_binary(t) or pa.types.is_string(t):
        return pa.array(list(values), t)
    return pa.array(values, t)


def embeddings_table(batch: dict[str, np.ndarray], schema: pa.Schema) -> pa.Table:
    """Good rows of an embedded batch as a table of `schema` (the embeddings schema with its stage columns)."""
    ok = ~row_errors.failed(batch)
    return pa.table({f.name: _column(batch[f.name][ok], f) for f in schema}, schema=schema)


def controller_table(batch: dict[str, np.ndarray], profiles: tuple[str, ...]) -> pa.Table:
    """The masks controller's history: one row per (actor, batch, profile) seen in an embedded batch."""
    rows: dict[tuple, tuple] = {}
    for i in range(len(batch[S.URI])):
        for p in profiles:
            key = (str(batch[S.ACTOR][i]), int(batch[S.BATCH][i]), p)
            thr = float(batch[S.mask_columns(p)[1]][i])
            if key not in rows or np.isnan(rows[key][1]):
                rows[key] = (float(batch[S.MASK_PROBE][i]) if p == profiles[0] else np.nan, thr)
    cols = list(zip(*[(*k, *v) for k, v in sorted(rows.items())])) or [[]] * 5
    return pa.table(dict(zip(S.MASKS_CONTROLLER_SCHEMA.names, cols)), schema=S.MASKS_CONTROLLER_SCHEMA)


def batch_errors(batch: dict[str, np.ndarray]) -> pa.Table:
    """Failed rows of a batch as an errors-schema table."""
    rows = [(str(u), e) for u, e in zip(batch[S.URI], row_errors.read(batch)) if e is not None]
    return errors_table(rows)


def final_thresholds(hist: pa.Table) -> dict[str, list[float]]:
    """{profile: [last threshold of each actor]} from a masks controller history table."""
    df = hist.to_pandas()
    last = df.sort_values(S.BATCH).groupby([S.PROFILE, S.ACTOR])[S.THRESHOLD].last()
    return {p: [float(v) for v in last[p].to_numpy()] for p in last.index.get_level_values(0).unique()}


def merge_history(parts: list[pa.Table]) -> pa.Table:
    """One masks controller history from the tables of `controller_table`: a batch split over blocks appears once
    per block, so its rows are merged (max skips nan)."""
    table = pa.concat_tables([S.MASKS_CONTROLLER_SCHEMA.empty_table(), *parts])
    keys = [S.ACTOR, S.BATCH, S.PROFILE]
    df = table.to_pandas().groupby(keys, as_index=False).max().sort_values(keys)
    return pa.Table.from_pandas(df, schema=S.MASKS_CONTROLLER_SCHEMA, preserve_index=False)


def split_duplicates(emb: pa.Table) -> tuple[pa.Table, pa.Table]:
    """(embeddings rows kept, `duplicate_uri` error rows) where several rows share an image id.

    Rows of one URI (a file named `x.tar#y.png` beside a shard `x.tar` that holds `y.png`; a manifest listing a
    shard and one of its members) are all refused: reading that URI back could not tell which one was meant.
    Different URIs with one id (a 64-bit hash collision) keep the first URI in sort order.
    """
    ids = emb.column(S.IMAGE_ID).to_numpy()
    uniq, counts = np.unique(ids, return_counts=True)
    if (counts == 1).all():
        return emb, S.ERRORS_SCHEMA.empty_table()
    shared = set(uniq[counts > 1].tolist())
    uris = emb.column(S.URI).to_pylist()
    groups: dict[int, list[int]] = {}
    for row, i in enumerate(ids.tolist()):
        if i in shared:
            groups.setdefault(i, []).append(row)
    keep = np.ones(len(ids), dtype=bool)
    rows = []
    for i, members in groups.items():
        per_uri = Counter(uris[r] for r in members)
        alone = sorted(u for u, c in per_uri.items() if c == 1)
        first = alone[0] if alone else None
        for r in members:
            if uris[r] == first:
                continue
            keep[r] = False
            n = per_uri[uris[r]]
            if n > 1:
                message = f"{n} inputs (a file and a tar member, ...) are read as this URI; none is indexed"
            else:
                message = f"its image id {i} is already that of {first}"
            rows.append((uris[r], RowError("read", "duplicate_uri", message)))
    return emb.filter(pa.array(keep)), errors_table(rows)
