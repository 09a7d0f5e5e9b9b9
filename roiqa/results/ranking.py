"""From coarse search to the final ranking of a query run: the faiss search over query descriptors, the shortlists
the rerank and the geometric check take, the ranking of their rows, and the run's errors rows."""

from __future__ import annotations

import dataclasses
from collections import defaultdict
from dataclasses import dataclass

import numpy as np
import pandas as pd
import pyarrow as pa

from roiqa import errors as row_errors
from roiqa import schema as S
from roiqa.config import ModelConfig, PreprocessConfig, RoiqaConfig, from_dict
from roiqa.errors import errors_table
from roiqa.index import faiss_index, hubness, store
from roiqa.io.queries import QueryMap


def index_config(version: store.IndexVersion, cfg: RoiqaConfig) -> RoiqaConfig:
    """The user's settings with the model and preprocessing the index was built with."""
    conf = version.manifest["config"]
    return dataclasses.replace(
        cfg,
        model=from_dict(ModelConfig, conf["model"], "manifest.config.model"),
        preprocess=from_dict(PreprocessConfig, conf["preprocess"], "manifest.config.preprocess"),
    )


def is_region_index(version: store.IndexVersion) -> bool:
    """True for an index of regional descriptors (versions before region indexes hold one global vector)."""
    return version.manifest.get("coarse", "global") == "regions"


@dataclass(frozen=True)
class Coarse:
    """The coarse search of a query run."""

    query_ids: list[str]  # the queries that encoded, in encoder order
    scores: np.ndarray  # (Q, top_k) coarse scores, -inf past the results
    ids: np.ndarray  # (Q, top_k) image ids, -1 past the results
    frame: pd.DataFrame  # one row per (query_id, image_id, uri, coarse_score) found
    views: np.ndarray | None = None  # (Q, S, D) the descriptors searched in a region index (before hubness)
    used: np.ndarray | None = None  # (Q, S) bool: the slots of `views` that hold a descriptor

    def top_pairs(self, n: int) -> set[tuple[str, int]]:
        """The (query_id, image_id) pairs of each query's n best coarse candidates."""
        return {(q, int(i)) for q, row in zip(self.query_ids, self.ids) for i in row[:n] if i >= 0}

    def shortlist(self, rerank: int, start: int = 0, extra=frozenset(), exclude=frozenset()) -> pa.Table | None:
        """`shortlist` of this search; None when no query encoded."""
        if not self.query_ids:
            return None
        return shortlist(self.scores, self.ids, self.query_ids, rerank, start, extra, exclude)


def coarse_search(
    version: store.IndexVersion,
    uris: dict[int, str],
    encoded: pa.Table,
    cfg: RoiqaConfig,
    views: int,
    index=None,
) -> Coarse:
    """faiss top-K of the encoded queries that have no error (`uris`: store.image_uris of the version; `encoded`:
    the QueryEncoder's rows; `views`: query descriptor slots per query in a region index, `coarse_slots`;
    `index`: the version's faiss index when the caller has it loaded)."""
    qc = cfg.query
    good = [i for i, e in enumerate(row_errors.read(encoded.select(row_errors.COLUMNS).to_pydict())) if e is None]
    regions = is_region_index(version)
    emb = np.stack(encoded.column(S.COARSE_QUERY if regions else S.EMBEDDING).to_numpy(zero_copy_only=False))
    qids = encoded.column(S.QUERY_ID).to_pylist()
    good_ids = [qids[i] for i in good]
    if not good:
        empty = np.zeros((0, qc.top_k))
        return Coarse([], empty, empty.astype(np.int64), _coarse_frame([], [], [], uris))
    index = version.faiss() if index is None else index
    if not regions:
        scores, ids = faiss_index.search(index, emb[good], qc.top_k, cfg.index.faiss_nprobe)
        return Coarse(good_ids, scores, ids, _coarse_frame(good_ids, scores, ids, uris))
    emb = emb.reshape(len(emb), views, -1)[good]  # (Q, S, D)
    used = np.any(emb != 0, axis=-1)  # (Q, S): a long query's part slots it does not fill are zeros
    return search_views(version, index, uris, good_ids, emb, used, cfg)


def search_views(
    version: store.IndexVersion,
    index,
    uris: dict[int, str],
    query_ids: list[str],
    views: np.ndarray,
    used: np.ndarray,
    cfg: RoiqaConfig,
) -> Coarse:
    """faiss top-K images of a region index for each query's used descriptors `views` (Q, S, D): an image scores
    its best region over them, less `query.hubness` times the region's hubness in an index built with it."""
    qc = cfg.query
    emb = views
    if version.manifest.get("hubness"):  # regions indexed as [r, h(r)]: score <q, r> - weight * h(r)
        emb = hubness.augment_queries(views, qc.hubness)
    image_ids = np.fromiter(uris, np.int64, len(uris))
    scores, ids = faiss_index.search_images(
        index, emb, qc.top_k, cfg.index.faiss_nprobe, image_ids, qc.coarse_regions, used
    )
    scores, ids = np.asarray(scores), np.asarray(ids)
    return Coarse(query_ids, scores, ids, _coarse_frame(query_ids, scores, ids, uris), views, used)


def _coarse_frame(qids: list[str], scores, ids, uris: dict[int, str]) -> pd.DataFrame:
    rows = [
        (q, int(i), uris[int(i)], float(s))
        for q, srow, irow in zip(qids, scores, ids)
        for s, i in zip(srow, irow)
        if i >= 0
    ]
    return pd.DataFrame(rows, columns=[S.QUERY_ID, S.IMAGE_ID, S.URI, S.COARSE_SCORE])


def shortlist(
    scores: np.ndarray,
    ids: np.ndarray,
    query_ids: list[str],
    rerank: int,
    start: int = 0,
    extra: frozenset[tuple[str, int]] | set[tuple[str, int]] = frozenset(),
    exclude: frozenset[tuple[str, int]] | set[tuple[str, int]] = frozenset(),
) -> pa.Table:
    """Candidate images grouped by image: {image_id, query_ids, coarse_scores}: each query's coarse ranks
    [start, rerank), plus the (query_id, image_id) pairs of `extra` wherever they rank, less those of `exclude`."""
    by_image: dict[int, tuple[list, list]] = defaultdict(lambda: ([], []))
    for qid, srow, irow in zip(query_ids, scores, ids):
        for rank, (s, i) in enumerate(zip(srow, irow)):
            if i < 0 or (qid, int(i)) in exclude:
                continue
            if start <= rank < rerank or (qid, int(i)) in extra:
                by_image[int(i)][0].append(qid)
                by_image[int(i)][1].append(float(s))
    keys = sorted(by_image)
    return pa.table(
        {
            S.IMAGE_ID: pa.array(keys, pa.int64()),
            S.QUERY_IDS: pa.array([by_image[k][0] for k in keys], pa.list_(pa.string())),
            S.COARSE_SCORES: pa.array([by_image[k][1] for k in keys], pa.list_(pa.float32())),
        }
    )


def with_uris(candidates: pa.Table, uris: dict[int, str]) -> pa.Table:
    """A shortlist with each image's URI, for the actors that read the images."""
    return candidates.append_column(S.URI, pa.array([uris[i] for i in candidates.column(S.IMAGE_ID).to_pylist()]))


def rank_results(reranked: pd.DataFrame, coarse: pd.DataFrame) -> pd.DataFrame:
    """Final ranking per query: reranked images by score, then the rest of the coarse top-K by coarse score."""
    rest = coarse.merge(reranked[[S.QUERY_ID, S.IMAGE_ID]], on=[S.QUERY_ID, S.IMAGE_ID], how="left", indicator=True)
    rest = rest[rest["_merge"] == "left_only"].drop(columns="_merge")
    reranked = reranked.assign(_tier=0, _key=-reranked[S.SCORE].fillna(-np.inf))
    rest = rest.assign(_tier=1, _key=-rest[S.COARSE_SCORE])
    both = pd.concat([reranked, rest], ignore_index=True).sort_values([S.QUERY_ID, "_tier", "_key", S.IMAGE_ID])
    both[S.RANK] = both.groupby(S.QUERY_ID).cumcount().astype(np.int32) + 1
    return both.drop(columns=["_tier", "_key"])


def split_failed(frame: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(good rows without the error columns, failed rows) of an actor stage's output."""
    if not len(frame):
        return frame.drop(columns=list(row_errors.COLUMNS), errors="ignore"), frame
    bad = row_errors.failed(frame)
    return frame[~bad].drop(columns=list(row_errors.COLUMNS)), frame[bad]


def query_errors(
    qmap: QueryMap, encoded: pa.Table, reranked: pd.DataFrame, geometry: pd.DataFrame, uris: dict[int, str]
) -> pa.Table:
    """The run's errors table (QUERY_ERRORS_SCHEMA): queries that did not encode (on the query's URI), then failed
    rerank and geometry pairs (on the image's URI)."""
    enc = encoded.select([S.QUERY_ID, *row_errors.COLUMNS]).to_pydict()
    rows = [(qmap[q][0], e, q) for q, e in zip(enc[S.QUERY_ID], row_errors.read(enc)) if e is not None]
    rows += [(u, e, q) for u, e, q in zip(reranked[S.URI], row_errors.read(reranked), reranked[S.QUERY_ID])]
    rows += [
        (uris[int(i)], e, q) for i, e, q in zip(geometry[S.IMAGE_ID], row_errors.read(geometry), geometry[S.QUERY_ID])
    ]
    return errors_table(rows, S.QUERY_ERRORS_SCHEMA)
