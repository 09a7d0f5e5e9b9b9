"""Hubness of regional descriptors (roiqa.index.hubness) and the coarse index built with it, against naive loops."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from roiqa import schema as S
from roiqa.index import faiss_index, hubness
from roiqa.models.regions import encode_regions, image_key, region_keys


def _unit(rng: np.random.Generator, n: int, d: int) -> np.ndarray:
    x = rng.normal(size=(n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _naive_hubness(vectors, keys, ref, ref_keys, k):
    out = []
    for v, key in zip(vectors, keys):
        sims = sorted((float(v @ r) for r, rk in zip(ref, ref_keys) if rk != key), reverse=True)[:k]
        out.append(np.mean(sims) if sims else 0.0)
    return np.array(out, np.float32)


def test_hubness_is_the_mean_of_the_k_best_similarities_to_other_images_regions():
    rng = np.random.default_rng(0)
    vectors, keys = _unit(rng, 300, 16), rng.integers(0, 12, 300)
    ref, ref_keys = _unit(rng, 120, 16), rng.integers(0, 12, 120)
    got = hubness.hubness(vectors, keys, ref, ref_keys, k=5, chunk=64)  # several chunks
    np.testing.assert_allclose(got, _naive_hubness(vectors, keys, ref, ref_keys, 5), atol=1e-5)


def test_hubness_with_fewer_reference_regions_than_k_averages_what_there_is():
    rng = np.random.default_rng(1)
    vectors = _unit(rng, 4, 8)
    ref = _unit(rng, 3, 8)
    keys, ref_keys = np.array([0, 1, 2, 3]), np.array([0, 0, 1])
    got = hubness.hubness(vectors, keys, ref, ref_keys, k=10)
    np.testing.assert_allclose(got, _naive_hubness(vectors, keys, ref, ref_keys, 10), atol=1e-6)
    assert got[0] == pytest.approx(float(vectors[0] @ ref[2]))  # image 0 sees only image 1's region
    assert hubness.hubness(vectors, keys, ref[:0], ref_keys[:0], k=10).tolist() == [0.0] * 4  # no reference


def test_an_augmented_query_scores_the_inner_product_less_the_weighted_hubness():
    rng = np.random.default_rng(2)
    r, q, h = _unit(rng, 5, 8), _unit(rng, 3, 8), rng.uniform(0, 1, 5).astype(np.float32)
    got = hubness.augment_queries(q, 0.5) @ hubness.augment(r, h).T
    np.testing.assert_allclose(got, q @ r.T - 0.5 * h[None, :], atol=1e-6)
    assert hubness.augment_queries(q.reshape(1, 3, 8), 0.5).shape == (1, 3, 9)


def test_a_reference_table_round_trips_and_refuses_another_width():
    rng = np.random.default_rng(3)
    vectors, keys = _unit(rng, 50, 8), rng.integers(0, 1 << 40, 50)
    table = hubness.sample_reference(vectors, keys, n=20, seed=7)
    assert table.num_rows == 20 and table.schema == hubness.REFERENCE_SCHEMA
    v, k = hubness.reference_arrays(table, 8)
    nearest = np.argmax(v @ vectors.T, axis=1)  # each stored row is one of the vectors, within int8 steps
    np.testing.assert_allclose(v, vectors[nearest], atol=1.0 / 127)
    assert len(set(nearest.tolist())) == 20 and k.tolist() == keys[nearest].tolist()  # with its own image key
    assert hubness.sample_reference(vectors, keys, n=20, seed=7).equals(table)  # seeded
    assert hubness.sample_reference(vectors, keys, n=500).num_rows == 50  # at most every vector
    with pytest.raises(ValueError, match="not single 16-d regions"):
        hubness.reference_arrays(table, 16)


def _table(rng, n_images, dim):
    ids = rng.integers(1, 1 << 60, n_images, dtype=np.int64)
    regions = [_unit(rng, int(rng.integers(3, 9)), dim) for _ in range(n_images)]
    return pa.table(
        {
            S.IMAGE_ID: pa.array(ids, pa.int64()),
            S.REGIONS_Q8: pa.array([encode_regions(r) for r in regions], pa.binary()),
        }
    )


def test_a_region_index_with_hubness_ranks_images_like_a_naive_loop():
    rng = np.random.default_rng(4)
    dim, weight, k = 16, 0.5, 3
    table = _table(rng, 40, dim)
    coarse = faiss_index.build_coarse(table, dim, "regions", "Flat", k, reference_size=60)
    assert coarse.how == "built" and coarse.reference.num_rows == 60 and coarse.index.d == dim + 1
    vectors, keys = faiss_index.coarse_vectors(table, dim, "regions")
    ref, ref_keys = hubness.reference_arrays(coarse.reference, dim)
    h = _naive_hubness(vectors, keys >> 12, ref, ref_keys, k)

    queries = _unit(rng, 2 * 3, dim).reshape(2, 3, dim)  # 2 queries x 3 views
    ids = table.column(S.IMAGE_ID).to_numpy()
    scores, got = faiss_index.search_images(
        coarse.index, hubness.augment_queries(queries, weight), 10, image_ids=ids, regions=10_000
    )
    owner = np.repeat(np.arange(len(ids)), [len(v) for v in faiss_index.region_arrays(table, dim)])
    for qi in range(2):
        per_region = (queries[qi] @ vectors.T).max(axis=0) - weight * h  # best view, less the region's hubness
        best = np.full(len(ids), -np.inf)
        np.maximum.at(best, owner, per_region)
        order = np.argsort(-best, kind="stable")[:10]
        np.testing.assert_allclose(scores[qi], best[order], atol=2e-3)  # int8-stored regions: tiny differences
        assert set(got[qi][:5].tolist()) == set(ids[order[:5]].tolist())


def test_updating_a_region_index_measures_new_regions_against_the_parents_reference():
    rng = np.random.default_rng(5)
    dim, k = 8, 4
    first = _table(rng, 20, dim)
    parent = faiss_index.build_coarse(first, dim, "regions", "Flat", k, reference_size=30)
    added = _table(rng, 5, dim)
    kept = first.slice(0, 15)
    both = pa.concat_tables([kept, added])
    removed = first.slice(15).column(S.IMAGE_ID).to_numpy()
    upd = faiss_index.build_coarse(
        both,
        dim,
        "regions",
        "Flat",
        k,
        reference_size=30,
        parent=faiss_index.Parent(parent.index, removed, kept.column(S.IMAGE_ID).to_numpy(), parent.reference),
    )
    assert (
        upd.how == "updated"
        and upd.reference is parent.reference
        and upd.index.ntotal == faiss_index.coarse_count(both, dim, "regions")
    )
    vectors, keys = faiss_index.coarse_vectors(added, dim, "regions")
    ref, ref_keys = hubness.reference_arrays(parent.reference, dim)
    want = _naive_hubness(vectors, image_key(keys >> 12), ref, ref_keys, k)
    got = np.array([upd.index.reconstruct(int(key))[-1] for key in keys])
    np.testing.assert_allclose(got, want, atol=1e-5)

    # a parent without hubness cannot be updated into an index with it: rebuilt whole, with a new reference
    plain = faiss_index.build_coarse(first, dim, "regions", "Flat", 0, reference_size=30)
    assert plain.reference is None and plain.index.d == dim
    rebuilt = faiss_index.build_coarse(
        both,
        dim,
        "regions",
        "Flat",
        k,
        reference_size=30,
        parent=faiss_index.Parent(plain.index, removed, kept.column(S.IMAGE_ID).to_numpy(), None),
    )
    assert rebuilt.how == "built" and rebuilt.index.d == dim + 1 and rebuilt.reference.num_rows == 30


def test_region_keys_and_reference_keys_name_the_same_images():
    ids = np.array([5, 1 << 55, 7], np.int64)
    keys = region_keys(ids, np.array([2, 1, 3]))
    assert (keys >> 12).tolist() == image_key(ids).repeat([2, 1, 3]).tolist()


def test_least_hub_keeps_the_whole_image_and_the_least_hub_regions_of_each_image():
    rng = np.random.default_rng(6)
    counts = np.array([1, 3, 6, 9, 4])
    keys = region_keys(rng.integers(1, 1 << 40, len(counts), dtype=np.int64), counts)
    h = rng.uniform(0, 1, len(keys)).astype(np.float32)
    h[5] = -5.0  # a low-hubness region that is not region 0 of its image
    for per_image in (1, 2, 4):
        want = np.zeros(len(keys), bool)
        start = 0
        for c in counts:  # naive: region 0, then the per_image others of lowest hubness, image by image
            want[start] = True
            others = sorted(range(start + 1, start + c), key=lambda i: (h[i], i))[:per_image]
            want[others] = True
            start += c
        got = hubness.least_hub(keys, h, per_image)
        assert got.tolist() == want.tolist()
        assert got.sum() == sum(min(c, per_image + 1) for c in counts)
    assert hubness.least_hub(keys, h, 0).all()
    with pytest.raises(ValueError, match=">= 0"):
        hubness.least_hub(keys, h, -1)


def test_a_pruned_region_index_holds_the_least_hub_regions_and_updates_in_place():
    rng = np.random.default_rng(7)
    dim, k, per_image = 8, 3, 2
    first = _table(rng, 20, dim)
    coarse = faiss_index.build_coarse(first, dim, "regions", "Flat", k, 30, regions_per_image=per_image)
    vectors, keys = faiss_index.coarse_vectors(first, dim, "regions")
    ref, ref_keys = hubness.reference_arrays(coarse.reference, dim)
    h = _naive_hubness(vectors, keys >> 12, ref, ref_keys, k)
    keep = hubness.least_hub(keys, h, per_image)
    assert coarse.index.ntotal == keep.sum() == faiss_index.coarse_count(first, dim, "regions", per_image)
    for key, kept, hv in zip(keys, keep, h):
        if kept:
            assert coarse.index.reconstruct(int(key))[-1] == pytest.approx(float(hv), abs=1e-5)
        else:
            with pytest.raises(RuntimeError):
                coarse.index.reconstruct(int(key))

    added, kept_rows = _table(rng, 4, dim), first.slice(0, 16)
    both = pa.concat_tables([kept_rows, added])
    removed = first.slice(16).column(S.IMAGE_ID).to_numpy()
    parent = faiss_index.Parent(coarse.index, removed, kept_rows.column(S.IMAGE_ID).to_numpy(), coarse.reference, 2)
    upd = faiss_index.build_coarse(both, dim, "regions", "Flat", k, 30, parent, regions_per_image=per_image)
    assert upd.how == "updated" and upd.index.ntotal == faiss_index.coarse_count(both, dim, "regions", per_image)
    # another regions_per_image than the parent's: rebuilt whole
    other = faiss_index.Parent(upd.index, removed[:0], both.column(S.IMAGE_ID).to_numpy(), upd.reference, 2)
    assert faiss_index.build_coarse(both, dim, "regions", "Flat", k, 30, other, regions_per_image=3).how == "built"
    plain = faiss_index.build_coarse(first, dim, "regions", "Flat", 0, 30, regions_per_image=2)  # no hubness: all kept
    assert plain.regions_per_image == 0 and plain.index.ntotal == faiss_index.coarse_count(first, dim, "regions")


def test_auto_pq_factory_is_flat_when_small_and_opq_ivf_pq32_when_large():
    assert faiss_index.choose_factory("auto-pq", 5_000, 113) == "Flat"
    assert faiss_index.choose_factory("auto-pq", 330_000, 113) == "OPQ32_128,IVF2048,PQ32"
    assert faiss_index.choose_factory("auto", 330_000, 113) == "IVF2048,SQ8"
