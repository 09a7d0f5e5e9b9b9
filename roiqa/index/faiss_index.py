"""The coarse-search index: faiss with stable int64 image ids, built from a factory string, saved through URIs."""

from __future__ import annotations

from dataclasses import dataclass

import faiss
import numpy as np

from roiqa.io import uri as uri_mod

AUTO_FLAT_LIMIT = 100_000  # "auto" uses exact search below this many vectors


def choose_factory(spec: str, n: int, dim: int) -> str:
    """Resolve "auto-pq" or "auto" to a concrete faiss factory string for n vectors of dimension dim.

    Both are Flat (exact, 4*dim + 8 bytes per vector) below AUTO_FLAT_LIMIT vectors. Above, an inverted file with
    ~4*sqrt(n) cells over: "auto-pq" (the default), 32-byte product-quantised codes after a learned rotation to a
    multiple of 32 dimensions (40 bytes per vector with the id); "auto", 8-bit scalar-quantised vectors (dim + 8).
    PQ32 loses many of a vector's exact nearest neighbours but few of the images a region index finds, since an
    image needs only one of its regions found (benchmarks/RESULTS.md, "What faiss keeps" and "faiss").
    """
    if spec not in ("auto", "auto-pq"):
        return spec
    if n < AUTO_FLAT_LIMIT:
        return "Flat"
    nlist = int(2 ** round(np.log2(4 * np.sqrt(n))))
    if spec == "auto-pq":  # 32 bytes a vector after a learned rotation to a multiple of 32 dimensions
        return f"OPQ32_{-(-dim // 32) * 32},IVF{nlist},PQ32"
    return f"IVF{nlist},SQ8"


def build_index(vectors: np.ndarray, ids: np.ndarray, factory: str = "auto", train_size: int = 200_000) -> faiss.Index:
    """An inner-product index over L2-normalised `vectors` (N, D) keyed by `ids` (N,) int64.

    Indexes that need training (IVF, PQ, OPQ) are trained on up to `train_size` vectors sampled without
    replacement; a factory whose training needs more vectors than are available is an error naming the factory.
    """
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    ids = np.ascontiguousarray(ids, dtype=np.int64)
    if vectors.ndim != 2 or len(vectors) != len(ids):
        raise ValueError(f"vectors (N, D) and ids (N,) must agree, got {vectors.shape} and {ids.shape}")
    if len(np.unique(ids)) != len(ids):
        raise ValueError("image ids must be unique (two URIs hashed to one id, or an image listed twice)")
    n, dim = vectors.shape
    spec = choose_factory(factory, n, dim)
    try:
        base = faiss.index_factory(dim, spec, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as exc:
        raise ValueError(f"faiss factory {spec!r} is not valid for dimension {dim}: {exc}") from exc
    # IVF indexes store their own int64 ids per list entry; wrapping them in an id map would store each id twice
    # (8 more bytes per vector). Flat, HNSW and other indexes get an IndexIDMap2.
    index = base if _ivf(base) is not None else faiss.IndexIDMap2(base)
    if not base.is_trained:
        if n == 0:
            raise ValueError(f"faiss factory {spec!r} needs training vectors; the collection is empty")
        rng = np.random.default_rng(0)
        sample = vectors[rng.choice(n, size=min(n, train_size), replace=False)]
        ivf = _ivf(base)
        if ivf is not None and len(sample) < ivf.nlist:
            raise ValueError(f"faiss factory {spec!r} needs at least {ivf.nlist} vectors to train, have {n}; use Flat")
        index.train(sample)
    if n:
        index.add_with_ids(vectors, ids)
    return index


def _ivf(index: faiss.Index):
    try:
        return faiss.extract_index_ivf(index)
    except RuntimeError:
        return None


def held_ids(index: faiss.Index) -> np.ndarray:
    """(N,) int64 every id `index` holds: an IVF's inverted lists, or an id map's ids."""
    ivf = _ivf(index)
    if ivf is None:
        return faiss.vector_to_array(index.id_map).astype(np.int64)
    inv = ivf.invlists
    lists = [faiss.rev_swig_ptr(inv.get_ids(i), inv.list_size(i)).copy() for i in range(ivf.nlist) if inv.list_size(i)]
    return np.concatenate(lists).astype(np.int64) if lists else np.zeros(0, np.int64)


def reconstruct(index: faiss.Index, ids: np.ndarray) -> np.ndarray:
    """(N, d) float32 the vectors `index` stores under `ids` (decoded from its codes: lossy for PQ and SQ); an IVF
    gets a hash-table direct map first. An id the index does not hold is a ValueError."""
    ivf = _ivf(index)
    if ivf is not None and ivf.direct_map.type != faiss.DirectMap.Hashtable:
        ivf.set_direct_map_type(faiss.DirectMap.Hashtable)
    out = np.zeros((len(ids), index.d), np.float32)
    for j, key in enumerate(np.asarray(ids, np.int64).tolist()):
        try:
            out[j] = index.reconstruct(key)
        except RuntimeError as exc:
            raise ValueError(f"faiss index holds no vector with id {key}") from exc
    return out


def search(index: faiss.Index, queries: np.ndarray, k: int, nprobe: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """(scores (Q, k), ids (Q, k)) of the k best inner products; missing results have id -1 and score -inf."""
    ivf = _ivf(index)
    if ivf is not None:
        ivf.nprobe = min(nprobe, ivf.nlist)
    k = max(1, min(k, index.ntotal)) if index.ntotal else 1
    scores, ids = index.search(np.ascontiguousarray(queries, dtype=np.float32), k)
    scores = np.where(ids < 0, -np.inf, scores)
    return scores, ids


def serialize(index: faiss.Index) -> bytes:
    """faiss's own binary format (no pickling)."""
    return faiss.serialize_index(index).tobytes()


def deserialize(data: bytes, name: str = "<bytes>") -> faiss.Index:
    """Inverse of `serialize`; an unreadable file is a ValueError naming it."""
    try:
        return faiss.deserialize_index(np.frombuffer(data, dtype=np.uint8))
    except RuntimeError as exc:
        raise ValueError(f"{name}: not a readable faiss index: {exc}") from exc


def save(index: faiss.Index, uri: str) -> bytes:
    """Write the index to `uri`; returns the bytes written (for checksums)."""
    data = serialize(index)
    uri_mod.write_bytes(uri, data)
    return data


def load(uri: str) -> faiss.Index:
    return deserialize(uri_mod.read_bytes(uri), uri)


COARSE_MODES = ("regions", "global")


def check_coarse(mode: str) -> None:
    """`index.coarse` must name a coarse mode."""
    if mode not in COARSE_MODES:
        raise ValueError(f"index.coarse must be one of {COARSE_MODES}, got {mode!r}")


def region_arrays(table, dim: int) -> list[np.ndarray]:
    """Each row's (R, D) regional descriptors: from S.REGIONS_Q8, or S.REGIONS (float16) in older versions."""
    from roiqa import schema as S
    from roiqa.models.regions import decode_regions

    if S.REGIONS_Q8 in table.column_names:
        return [decode_regions(b, dim) for b in table.column(S.REGIONS_Q8).to_pylist()]
    return [np.frombuffer(b or b"", np.float16).reshape(-1, dim) for b in table.column(S.REGIONS).to_pylist()]


def with_current_regions(table, dim: int):
    """An embeddings table of an older version (S.REGIONS, float16) with its regions in the stored form of new
    versions (S.REGIONS_Q8), so the re-index carries its rows over beside new ones; other tables as they are."""
    import pyarrow as pa

    from roiqa import schema as S
    from roiqa.models.regions import encode_regions

    if S.REGIONS_Q8 in table.column_names or S.REGIONS not in table.column_names:
        return table
    blobs = [encode_regions(a) for a in region_arrays(table, dim)]
    i = table.schema.get_field_index(S.REGIONS)
    return table.set_column(i, S.REGIONS_Q8, pa.array(blobs, pa.binary()))


def coarse_count(table, dim: int, mode: str, regions_per_image: int = 0) -> int:
    """How many vectors faiss holds for an embeddings table, without decoding them: `coarse_vectors`' count, or
    with `regions_per_image` > 0 each image's whole-image region and at most that many others."""
    from roiqa import schema as S
    from roiqa.models.regions import region_count

    check_coarse(mode)
    if mode == "global":
        return table.num_rows
    if S.REGIONS_Q8 in table.column_names:
        counts = [region_count(b, dim) for b in table.column(S.REGIONS_Q8).to_pylist()]
    else:
        counts = [len(b or b"") // (2 * dim) for b in table.column(S.REGIONS).to_pylist()]  # float16: 2 bytes
    if regions_per_image:
        counts = [min(c, regions_per_image + 1) for c in counts]
    return sum(counts)


def coarse_vectors(table, dim: int, mode: str) -> tuple[np.ndarray, np.ndarray]:
    """(vectors (N, D) float32, ids (N,) int64) that faiss indexes for an embeddings table: one global descriptor
    per image keyed by image_id ("global"), or every regional descriptor keyed by its region key ("regions")."""
    from roiqa import schema as S
    from roiqa.models.regions import image_key, region_keys

    check_coarse(mode)
    ids = np.asarray(table.column(S.IMAGE_ID).to_numpy(), np.int64)
    if mode == "global":
        flat = table.column(S.EMBEDDING).combine_chunks().flatten()
        return np.asarray(flat, np.float32).reshape(-1, dim), ids
    keys = image_key(ids)
    if len(np.unique(keys)) != len(keys):
        raise ValueError("two images share a region key (51-bit image id prefix); index them in separate indexes")
    arrs = region_arrays(table, dim)
    counts = np.array([len(a) for a in arrs], np.int64)
    vectors = np.concatenate(arrs).astype(np.float32) if arrs else np.zeros((0, dim), np.float32)
    return vectors, region_keys(ids, counts)


def update_index(
    index: faiss.Index, remove_ids: np.ndarray, vectors: np.ndarray, ids: np.ndarray, regions: bool = False
):
    """`index` with `remove_ids` removed and (`vectors`, `ids`) added in place, or None when this kind of index
    cannot remove ids (HNSW, ...): then the caller rebuilds it. With `regions`, `remove_ids` are image ids and
    every region key of each image goes."""
    from roiqa.models.regions import REGION_BITS, image_key

    try:
        if len(remove_ids) and regions:
            for key in image_key(remove_ids).tolist():
                index.remove_ids(faiss.IDSelectorRange(key << REGION_BITS, (key + 1) << REGION_BITS))
        elif len(remove_ids):
            index.remove_ids(np.ascontiguousarray(remove_ids, dtype=np.int64))
    except RuntimeError:
        return None
    if len(ids):
        index.add_with_ids(np.ascontiguousarray(vectors, np.float32), np.ascontiguousarray(ids, np.int64))
    return index


def search_images(
    index: faiss.Index,
    queries: np.ndarray,
    k: int,
    nprobe: int = 256,
    image_ids: np.ndarray | None = None,
    regions: int = 4096,
    used: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """The k best images per query: (scores (Q, k), image ids (Q, k)), -inf / -1 past the results.

    Without `image_ids` the index holds one vector per image and `queries` is (Q, D). With `image_ids` (every
    indexed image id) it holds region keys and `queries` is (Q, S, D), S descriptors per query (its coarse views):
    each fetches its `regions` best regions, and an image scores its best region over all S. `used` (Q, S) bool:
    the descriptors to search (default all); the others are unused slots and find nothing.
    """
    if image_ids is None:
        return search(index, queries, k, nprobe)
    from roiqa.models.regions import image_key, split_key

    queries = np.asarray(queries, np.float32)
    q, s, d = queries.shape
    lookup = dict(zip(image_key(image_ids).tolist(), np.asarray(image_ids, np.int64).tolist()))
    rows = np.ones(q * s, bool) if used is None else np.asarray(used, bool).reshape(q * s)
    kk = max(1, min(max(k, regions), index.ntotal)) if index.ntotal else 1
    sc, keys = np.full((q * s, kk), -np.inf, np.float32), np.full((q * s, kk), -1, np.int64)
    if rows.any():
        sc[rows], keys[rows] = search(index, queries.reshape(q * s, d)[rows], kk, nprobe)
    out_s = np.full((q, k), -np.inf, np.float32)
    out_i = np.full((q, k), -1, np.int64)
    for i in range(q):
        rs, rk = sc[i * s : (i + 1) * s].reshape(-1), keys[i * s : (i + 1) * s].reshape(-1)
        ok = rk >= 0
        best: dict[int, float] = {}
        for key, v in zip(split_key(rk[ok])[0].tolist(), rs[ok].tolist()):
            if v > best.get(key, -np.inf):
                best[key] = v
        ranked = sorted(best.items(), key=lambda kv: (-kv[1], kv[0]))[:k]
        for j, (key, v) in enumerate(ranked):
            out_s[i, j], out_i[i, j] = v, lookup[key]
    return out_s, out_i


@dataclass
class Coarse:
    """The coarse stage's faiss index of a version, how it was made, and its hubness reference (roiqa.index.hubness)."""

    index: faiss.Index
    how: str  # "built" (from every vector) or "updated" (the parent's, in place)
    factory: str  # the faiss factory string it is built with
    reference: object | None  # pa.Table of roiqa.index.hubness.REFERENCE_SCHEMA; None: no hubness column
    regions_per_image: int = 0  # regions kept per image besides the whole image (roiqa.index.hubness.least_hub); 0 all


@dataclass
class Parent:
    """What a re-index can update instead of rebuilding: the parent version's faiss index and hubness reference."""

    index: faiss.Index
    removed_ids: np.ndarray  # image ids to take out of it (changed and deleted images)
    kept_ids: np.ndarray  # image ids of the rows it keeps
    reference: object | None  # the parent's hubness reference (None: it has none)
    regions_per_image: int = 0  # what the parent's index kept of each image (0: every region)


def build_coarse(
    emb,
    dim: int,
    mode: str,
    factory: str,
    hubness_k: int,
    reference_size: int,
    parent: Parent | None = None,
    regions_per_image: int = 0,
) -> Coarse:
    """faiss over the coarse vectors of embeddings table `emb`: the parent's index updated in place when it can be
    (same kind, same hubness, same regions kept), else built from every vector. In a region index with `hubness_k`
    > 0, every region is indexed as [r, h(r)] (roiqa.index.hubness); a build draws a new reference of
    `reference_size` regions, an update measures the new regions against the parent's. `regions_per_image` > 0
    keeps each image's whole-image region and that many others of lowest hubness (`hubness.least_hub`); without
    hubness (a global index, or `hubness_k` 0) every vector is kept."""
    from roiqa import schema as S
    from roiqa.index import hubness

    hub = mode == "regions" and hubness_k > 0
    regions_per_image = regions_per_image if hub else 0
    n = coarse_count(emb, dim, mode, regions_per_image)
    width = dim + int(hub)
    factory = choose_factory(factory, n, width)
    if (
        parent is not None
        and parent.index.d == width
        and (parent.reference is not None) == hub
        and parent.regions_per_image == regions_per_image
    ):
        new = ~np.isin(np.asarray(emb.column(S.IMAGE_ID).to_numpy(), np.int64), parent.kept_ids)
        vectors, ids = coarse_vectors(emb.filter(new), dim, mode)
        if hub:
            ref, ref_keys = hubness.reference_arrays(parent.reference, dim)
            h = hubness.hubness(vectors, _image_keys(ids), ref, ref_keys, hubness_k)
            keep = hubness.least_hub(ids, h, regions_per_image)
            vectors, ids = hubness.augment(vectors[keep], h[keep]), ids[keep]
        index = update_index(parent.index, parent.removed_ids, vectors, ids, regions=mode == "regions")
        if index is not None and index.ntotal == n:
            return Coarse(index, "updated", factory, parent.reference, regions_per_image)
    vectors, ids = coarse_vectors(emb, dim, mode)
    reference = None
    if hub:
        keys = _image_keys(ids)
        reference = hubness.sample_reference(vectors, keys, reference_size)
        ref, ref_keys = hubness.reference_arrays(reference, dim)
        h = hubness.hubness(vectors, keys, ref, ref_keys, hubness_k)
        keep = hubness.least_hub(ids, h, regions_per_image)
        vectors, ids = hubness.augment(vectors[keep], h[keep]), ids[keep]
    return Coarse(build_index(vectors, ids, factory), "built", factory, reference, regions_per_image)


def _image_keys(region_ids: np.ndarray) -> np.ndarray:
    from roiqa.models.regions import split_key

    return split_key(region_ids)[0]
