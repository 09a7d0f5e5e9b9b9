"""The per-row error record: batch columns written and read back through Arrow and pandas, the errors table."""

from __future__ import annotations

import pyarrow as pa

from roiqa import errors as row_errors
from roiqa import schema as S
from roiqa.errors import RowError


def test_columns_round_trip_through_arrow_and_pandas():
    errs = [
        None,
        RowError("read", "not_found", "no such file: a:b:c"),
        None,
        RowError.raised("embed", "x", KeyError(3)),
    ]
    cols = row_errors.columns(errs)
    assert set(cols) == set(row_errors.COLUMNS) and all(len(c) == 4 for c in cols.values())
    assert list(cols[S.ERROR_STAGE]) == ["", "read", "", "embed"]
    table = pa.table({S.URI: ["u0", "u1", "u2", "u3"], **cols})  # what Ray Data keeps between stages
    assert all(table.schema.field(c).type == pa.string() for c in row_errors.COLUMNS)
    for batch in (table.to_pydict(), table.to_pandas()):
        assert row_errors.read(batch) == errs  # colons in a message stay in the message
        assert row_errors.failed(batch).tolist() == [False, True, False, True]
    assert errs[3].message == "KeyError: 3"


def test_errors_table_rows_and_redaction():
    secret = "https://bucket.example/img.png?X-Amz-Signature=abc123"
    rows = [("s3://b/a.png", RowError("decode", "corrupt", "bad bytes")), (secret, RowError("read", "x", secret))]
    table = row_errors.errors_table(rows)
    assert table.schema == S.ERRORS_SCHEMA
    assert table.column(S.STAGE).to_pylist() == ["decode", "read"]
    assert table.column(S.REASON).to_pylist() == ["corrupt", "x"]
    assert "abc123" not in str(table.to_pydict())
    q = row_errors.errors_table([("u", RowError("query", "bad_box", "m"), "q1")], S.QUERY_ERRORS_SCHEMA)
    assert q.to_pylist() == [{S.URI: "u", S.STAGE: "query", S.REASON: "bad_box", S.MESSAGE: "m", S.QUERY_ID: "q1"}]
    assert row_errors.errors_table([]).num_rows == 0
