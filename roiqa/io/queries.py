"""Reading a query input: a Parquet table of query_id, uri[, box] or a folder of crops, checked before any work."""

from __future__ import annotations

import pandas as pd
import pyarrow as pa

from roiqa import schema as S
from roiqa.index import store
from roiqa.io import uri as uri_mod

QueryMap = dict[str, tuple[str, list[float] | None]]  # query_id -> (uri, box or None: the whole image)


def load_queries(queries: str, allowed_prefixes: tuple[str, ...] = ()) -> pa.Table:
    """Queries as QUERIES_SCHEMA: a Parquet file of query_id, uri[, box] or a folder of crops (id = file stem).

    Every query image must lie inside `allowed_prefixes` (default: the Parquet's folder, or the folder of crops),
    symbolic links resolved; one outside refuses the queries, as `index.allowed_prefixes` does for manifests."""
    if queries.lower().endswith(".parquet"):
        table = store.read_table(queries)
        table = S.check_columns(table, S.QUERIES_SCHEMA, queries)
        base = uri_mod.normalize(queries).rsplit("/", 1)[0]
        uris = [
            uri_mod.normalize(u if ("://" in u or u.startswith("/")) else uri_mod.join(base, u))
            for u in table.column(S.URI).to_pylist()
        ]
        table = table.set_column(table.schema.get_field_index(S.URI), S.URI, pa.array(uris, pa.string()))
    else:
        files = uri_mod.list_files(queries, uri_mod.IMAGE_EXTENSIONS)
        if not files:
            raise ValueError(f"{queries}: no query images found")
        ids = [f.rsplit("/", 1)[-1].rsplit(".", 1)[0] for f in files]
        table = pa.table({S.QUERY_ID: ids, S.URI: files})
        table = S.check_columns(table, S.QUERIES_SCHEMA, queries)
    folder = uri_mod.normalize(queries)
    if queries.lower().endswith(".parquet"):
        folder = folder.rsplit("/", 1)[0]
    allowed = tuple(allowed_prefixes) or (folder,)
    for qid, u in zip(table.column(S.QUERY_ID).to_pylist(), table.column(S.URI).to_pylist()):
        if not any(uri_mod.inside(u, p) for p in allowed):
            raise ValueError(
                f"{queries}: query {qid!r} points outside the allowed prefixes {list(allowed)}: {u!r}; refusing the "
                "queries (query.allowed_prefixes lists where query images may be read from)"
            )
    ids = pd.Series(table.column(S.QUERY_ID).to_pylist())
    if ids.duplicated().any():
        repeated = sorted(set(ids[ids.duplicated()]))[:5]
        raise ValueError(f"{queries}: query_id values must be unique; repeated: {repeated}")
    return table


def query_map(qtable: pa.Table) -> QueryMap:
    """{query_id: (uri, box or None)} for the rerank actors."""
    boxes = [qtable.column(c).to_pylist() for c in S.BOX]
    out = {}
    for i, (q, u) in enumerate(zip(qtable.column(S.QUERY_ID).to_pylist(), qtable.column(S.URI).to_pylist())):
        b = [col[i] for col in boxes]
        out[q] = (u, None if all(v is None or v != v for v in b) else b)  # no box: the whole image
    return out
