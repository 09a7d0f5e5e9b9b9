"""Per-row failures: a typed record made where an input fails, carried through Ray Data batches as three string
columns (empty where the row is good) and written to the errors tables. Nothing is parsed back out of text."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from roiqa import schema as S
from roiqa.io.redact import redact


@dataclass(frozen=True)
class RowError:
    """Why one input (an image, a query, a query-image pair) was not indexed or not scored."""

    stage: str  # where it failed: read, decode, embed, complexity, query, geometry, rerank, refine
    reason: str  # a word a program can count: not_found, too_large, corrupt, model_failed, ...
    message: str  # what a person reads

    @classmethod
    def raised(cls, stage: str, reason: str, exc: BaseException) -> RowError:
        """The record of an unexpected exception: its type and text are the message."""
        return cls(stage, reason, f"{type(exc).__name__}: {exc}")


COLUMNS = (S.ERROR_STAGE, S.ERROR_REASON, S.ERROR_MESSAGE)


def columns(errors: Sequence[RowError | None]) -> dict[str, np.ndarray]:
    """The batch columns of one error per row (None: the row is good)."""
    cells = [("", "", "") if e is None else (e.stage, e.reason, e.message) for e in errors]
    out = {}
    for j, name in enumerate(COLUMNS):
        col = np.empty(len(cells), dtype=object)
        col[:] = [c[j] for c in cells]
        out[name] = col
    return out


def read(batch: Mapping) -> list[RowError | None]:
    """The errors of a batch (a dict of numpy columns or a DataFrame), None for its good rows."""
    stages, reasons, messages = (batch[c] for c in COLUMNS)
    return [
        RowError(s, str(r), str(m)) if isinstance(s, str) and s else None for s, r, m in zip(stages, reasons, messages)
    ]


def failed(batch: Mapping) -> np.ndarray:
    """Per row of a batch: True where it records an error."""
    return np.array([isinstance(s, str) and bool(s) for s in batch[S.ERROR_STAGE]], dtype=bool)


def errors_table(rows: Iterable[tuple], schema: pa.Schema = S.ERRORS_SCHEMA) -> pa.Table:
    """An errors table from (uri, RowError[, query_id]) rows, in `schema`'s column order; credentials redacted."""
    flat = [(redact(u), e.stage, e.reason, redact(e.message), *rest) for u, e, *rest in rows]
    cols = list(zip(*flat)) if flat else [[] for _ in schema.names]
    return pa.table({n: pa.array(list(c), pa.string()) for n, c in zip(schema.names, cols)}, schema=schema)
