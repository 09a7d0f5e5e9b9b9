"""Coarse-index trade-offs: bytes, build time, latency and recall of faiss factories against exact search, same run."""

from __future__ import annotations

import argparse
import gc
import math
import os
import re
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import faiss
import numpy as np

from benchmarks.common import machine, markdown, median, write_report

DIM = 256
KS = (10, 100)
DEFAULT_FACTORIES = "Flat,IVF4096,Flat,OPQ32,IVF4096,PQ32,HNSW32,IVF4096,PQ32,IVF1024,PQ64,IVF4096,SQ8"
RECALL_GOAL = 0.95
BYTES_GOAL = 64.0  # bytes per image, the 8-byte id included
IDMAP_BYTES = 8  # IndexIDMap2 keeps one int64 per vector
REV_MAP_BYTES = 64  # IndexIDMap2's in-memory reverse map (an unordered_map node per vector; not serialised)

# ----------------------------------------------------------------------------------------------------------- data


@dataclass
class Mixture:
    """Synthetic embeddings: a mixture of `clusters` (default 1000) anisotropic Gaussians in 256-d, L2-normalised.

    Centres are drawn with a power-law spectrum (variance of axis i ~ 1/(i+1), in a random rotation) and
    normalised. Each cluster's spread is anisotropic: the same decaying spectrum, permuted per cluster and jittered
    log-normally (sigma 0.5), so every cluster has its own principal axes; its total norm is `spread` (default 0.7
    of the unit centre) times a log-normal factor (sigma 0.25). Cluster weights are log-normal (sigma 1). Queries are
    fresh draws from the same mixture, held out of the base. At 200k vectors this gives a participation ratio
    (effective dimension) of about 55, a query's nearest neighbour at cosine ~0.82 and its 100th at ~0.70, random
    pairs at ~0.0 (p99 0.31).
    """

    centers: np.ndarray  # (C, D) unit rows
    scales: np.ndarray  # (C, D) per-axis std in the rotated basis
    rotation_t: np.ndarray  # (D, D) transpose of an orthogonal matrix
    weights: np.ndarray  # (C,) sums to 1

    @classmethod
    def make(cls, clusters: int, dim: int, spread: float, seed: int) -> Mixture:
        rng = np.random.default_rng(seed)
        rot, _ = np.linalg.qr(rng.standard_normal((dim, dim)))
        spectrum = 1.0 / np.arange(1, dim + 1)  # variance per axis
        centers = (rng.standard_normal((clusters, dim)) * np.sqrt(spectrum)) @ rot.T
        centers /= np.linalg.norm(centers, axis=1, keepdims=True)
        var = np.stack([spectrum[rng.permutation(dim)] for _ in range(clusters)])
        var *= np.exp(rng.normal(0.0, 0.5, size=var.shape))
        norm = spread * np.exp(rng.normal(0.0, 0.25, size=(clusters, 1)))
        scales = np.sqrt(var / var.sum(axis=1, keepdims=True)) * norm
        weights = np.exp(rng.normal(0.0, 1.0, size=clusters))
        return cls(
            centers=centers.astype(np.float32),
            scales=scales.astype(np.float32),
            rotation_t=np.ascontiguousarray(rot.T, dtype=np.float32),
            weights=weights / weights.sum(),
        )

    def sample(self, n: int, seed: int, out: np.ndarray | None = None, chunk: int = 1 << 16) -> np.ndarray:
        """n unit vectors, written chunk by chunk (no float64 or full-size temporaries)."""
        rng = np.random.default_rng(seed)
        dim = self.centers.shape[1]
        out = np.empty((n, dim), dtype=np.float32) if out is None else out
        labels = rng.choice(len(self.weights), size=n, p=self.weights)
        for start in range(0, n, chunk):
            lab = labels[start : start + chunk]
            z = rng.standard_normal((len(lab), dim), dtype=np.float32)
            z *= self.scales[lab]
            x = z @ self.rotation_t
            x += self.centers[lab]
            x /= np.linalg.norm(x, axis=1, keepdims=True)
            out[start : start + len(lab)] = x
        return out


def unique_ids(n: int, seed: int) -> np.ndarray:
    """n distinct random non-negative int64 ids (like roiqa's URI hashes)."""
    rng = np.random.default_rng(seed)
    ids = np.unique(rng.integers(0, 2**63 - 1, size=n, dtype=np.int64))
    while len(ids) < n:
        ids = np.unique(np.concatenate([ids, rng.integers(0, 2**63 - 1, size=n - len(ids), dtype=np.int64)]))
    return rng.permutation(ids)


# --------------------------------------------------------------------------------------------------------- memory


def mem_available() -> int | None:
    """MemAvailable from /proc/meminfo in bytes (None off Linux)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def innermost(index: faiss.Index) -> faiss.Index:
    """The index under any IDMap / PreTransform wrappers, downcast to its concrete class."""
    index = faiss.downcast_index(index)
    while isinstance(index, faiss.IndexIDMap | faiss.IndexIDMap2 | faiss.IndexPreTransform):
        index = faiss.downcast_index(index.index)
    return index


def ivf_of(index: faiss.Index) -> faiss.IndexIVF | None:
    try:
        return faiss.extract_index_ivf(index)
    except RuntimeError:
        return None


def per_vector_layout(factory: str, dim: int) -> dict:
    """Code bytes and estimated resident / serialised bytes per vector of `factory` (from an empty instance)."""
    empty = faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)
    ivf = ivf_of(empty)
    base = innermost(empty)
    if ivf is not None:
        code = ivf.code_size
        stored = code + 8  # inverted lists keep an int64 per entry
        resident = 2 * stored  # list vectors grow geometrically: up to twice the payload while adding
    elif hasattr(base, "hnsw"):
        code = faiss.downcast_index(base.storage).code_size
        # level-0 links, upper levels (1 node in M has M links there: ~4 B on average), offsets, levels
        stored = code + 4 * base.hnsw.nb_neighbors(0) + 4 + 8 + 4
        resident = stored + 8  # per-vector locks during the build
    else:
        code = getattr(base, "code_size", None)
        if code is None:
            try:
                code = empty.sa_code_size()
            except RuntimeError:
                code = 4 * dim
        stored = resident = code
    transform = isinstance(faiss.downcast_index(empty), faiss.IndexPreTransform)
    return {
        "code_bytes": int(code),
        "serialised": stored + IDMAP_BYTES,
        "resident": resident + IDMAP_BYTES + REV_MAP_BYTES,
        "transform_copy": 4 * dim if transform else 0,  # IndexPreTransform.add transforms all vectors at once
    }


def memory_plan(n: int, q: int, dim: int, factories: list[str], train_size: int) -> dict:
    """Peak bytes: the base vectors (shared with the exact index after it is built) plus the worst single factory."""
    vec = n * dim * 4
    fixed = q * dim * 4 + n * 8 * 3 + 2 * q * max(KS) * 8 * 4 + (256 << 20)  # queries, ids (+ sort), results, slack
    per = {}
    for f in factories:
        lay = per_vector_layout(f, dim)
        per[f] = n * (lay["resident"] + 2 * lay["serialised"] + lay["transform_copy"]) + min(n, train_size) * dim * 4
    worst = max(per, key=per.get) if per else None
    need = fixed + max(2 * vec, vec + (per[worst] if worst else 0))
    return {"need_bytes": int(need), "vectors_bytes": vec, "per_factory_peak_bytes": per, "worst_factory": worst}


# ---------------------------------------------------------------------------------------------------- measurement


def search_fn(index: faiss.Index, k: int, nprobe: int | None) -> Callable[[np.ndarray], np.ndarray]:
    """Ids of roiqa.index.faiss_index.search (the project's wrapper, with its nprobe handling) for a query batch."""
    from roiqa.index import faiss_index as fi

    def go(x: np.ndarray) -> np.ndarray:
        if nprobe is None:
            return fi.search(index, x, k)[1]
        return fi.search(index, x, k, nprobe=nprobe)[1]

    return go


def single_latencies(
    go: Callable[[np.ndarray], np.ndarray], queries: np.ndarray, budget_s: float, min_queries: int
) -> np.ndarray:
    """Milliseconds per query, one query per call on one thread, until all are done or the budget is spent."""
    faiss.omp_set_num_threads(1)
    for i in range(min(3, len(queries))):  # warm-up
        go(queries[i : i + 1])
    times = []
    start = time.perf_counter()
    for i in range(len(queries)):
        t = time.perf_counter()
        go(queries[i : i + 1])
        times.append(time.perf_counter() - t)
        if i + 1 >= min_queries and time.perf_counter() - start > budget_s:
            break
    return np.asarray(times) * 1e3


def batch_search(
    go: Callable[[np.ndarray], np.ndarray], queries: np.ndarray, threads: int, repeats: int
) -> tuple[float, np.ndarray]:
    """(median queries/s over `repeats` runs of all queries at once on `threads` threads, result ids)."""
    faiss.omp_set_num_threads(threads)
    times, ids = [], None
    for _ in range(repeats):
        t = time.perf_counter()
        ids = go(queries)
        times.append(time.perf_counter() - t)
    return len(queries) / median(times), ids


def recall(found: np.ndarray, truth: np.ndarray, k: int) -> float:
    """Mean over queries of |exact top-k ∩ found top-k| / k."""
    hits = sum(len(np.intersect1d(f[:k], t[:k])) for f, t in zip(found, truth))
    return hits / (len(truth) * k)


def measure(
    go: Callable[[np.ndarray], np.ndarray], queries: np.ndarray, truth: np.ndarray | None, args: argparse.Namespace
) -> tuple[dict, np.ndarray]:
    """Single-query latency (1 thread), batch throughput (all threads) and, given the truth, recall@10/@100."""
    lat = single_latencies(go, queries, args.latency_budget, min(len(queries), args.latency_min_queries))
    qps, ids = batch_search(go, queries, args.threads, args.repeats)
    row = {
        "latency_ms_median": float(np.median(lat)),
        "latency_ms_p99": float(np.percentile(lat, 99)),
        "latency_queries": len(lat),
        "batch_qps": qps,
    }
    if truth is not None:
        row.update({f"recall@{k}": recall(ids, truth, k) for k in KS})
    return row, ids


def search_settings(index: faiss.Index, args: argparse.Namespace) -> list[tuple[str, dict]]:
    """(label suffix, settings) to measure: nprobe values for IVF kinds, efSearch values for HNSW, else one."""
    if ivf_of(index) is not None:
        return [(f"nprobe={p}", {"nprobe": p}) for p in args.nprobe]
    if hasattr(innermost(index), "hnsw"):
        return [(f"efSearch={e}", {"efSearch": e}) for e in args.ef_search]
    return [("", {})]


def apply_settings(index: faiss.Index, settings: dict) -> dict:
    """Set efSearch through faiss.ParameterSpace (roiqa's search only sets nprobe); returns the values in effect."""
    if "efSearch" in settings:
        faiss.ParameterSpace().set_index_parameter(index, "efSearch", settings["efSearch"])
        return {"efSearch": int(innermost(index).hnsw.efSearch)}
    if "nprobe" in settings:
        ivf = ivf_of(index)
        return {"nprobe": min(settings["nprobe"], ivf.nlist), "nlist": int(ivf.nlist)}
    return {}


def bench_factory(
    factory: str,
    vectors: np.ndarray,
    ids: np.ndarray,
    queries: np.ndarray,
    truth: np.ndarray,
    exact: dict,
    args: argparse.Namespace,
) -> list[dict]:
    """Build `factory` through roiqa.index.faiss_index.build_index, then measure it at each search setting."""
    from roiqa.index import faiss_index as fi

    faiss.omp_set_num_threads(args.threads)
    print(f"[bench_faiss] {factory}: building", file=sys.stderr, flush=True)
    t = time.perf_counter()
    index = fi.build_index(vectors, ids, factory, train_size=args.train_size)
    build_s = time.perf_counter() - t
    size = len(fi.serialize(index))
    gc.collect()
    n = len(vectors)
    lay = per_vector_layout(factory, vectors.shape[1])
    needs_train = not faiss.index_factory(vectors.shape[1], factory, faiss.METRIC_INNER_PRODUCT).is_trained
    common = {
        "factory": factory,
        "bytes_per_vector": size / n,
        "code_bytes_per_vector": lay["code_bytes"],
        "bytes_vs_exact": (size / n) / exact["bytes_per_vector"],
        "build_s": build_s,
        "train_vectors": min(n, args.train_size) if needs_train else 0,
    }
    rows = []
    for suffix, settings in search_settings(index, args):
        effective = apply_settings(index, settings)
        print(f"[bench_faiss] {factory} {suffix}".rstrip() + ": searching", file=sys.stderr, flush=True)
        row, _ = measure(search_fn(index, max(KS), settings.get("nprobe")), queries, truth, args)
        row["latency_vs_exact"] = row["latency_ms_median"] / exact["latency_ms_median"]
        row["batch_qps_vs_exact"] = row["batch_qps"] / exact["batch_qps"]
        rows.append({"config": f"{factory} {suffix}".strip(), **common, "search": effective, **row})
    del index
    gc.collect()
    return rows


# ----------------------------------------------------------------------------------------------------- reporting


def recommend(rows: list[dict]) -> dict:
    """The smallest configuration with recall@100 >= RECALL_GOAL at <= BYTES_GOAL bytes per image (id included)."""
    small = [r for r in rows if r["bytes_per_vector"] <= BYTES_GOAL]
    good = [r for r in rows if r["recall@100"] >= RECALL_GOAL]
    both = [r for r in small if r["recall@100"] >= RECALL_GOAL]
    goals = f"recall@100 >= {RECALL_GOAL} at <= {BYTES_GOAL:g} bytes per image (8-byte id included)"
    if both:
        best = min(both, key=lambda r: (r["bytes_per_vector"], r["latency_ms_median"]))
        return {
            "config": best["config"],
            "met": True,
            "line": f"Recommended: {best['config']} — {best['bytes_per_vector']:.1f} B/image, recall@100 "
            f"{best['recall@100']:.3f}, {best['latency_ms_median']:.2f} ms/query (smallest meeting {goals}).",
        }
    if not small:
        best = min(rows, key=lambda r: r["bytes_per_vector"])
        why = f"the size goal fails: no configuration fits in {BYTES_GOAL:g} B/image"
    elif not good:
        best = max(small, key=lambda r: (r["recall@100"], -r["bytes_per_vector"]))
        why = f"the recall goal fails: no configuration reaches recall@100 {RECALL_GOAL}"
    else:
        best = max(small, key=lambda r: (r["recall@100"], -r["bytes_per_vector"]))
        big = min(good, key=lambda r: (r["bytes_per_vector"], r["latency_ms_median"]))
        why = (
            f"the recall goal fails within the size goal: recall@100 >= {RECALL_GOAL} needs "
            f"{big['bytes_per_vector']:.1f} B/image ({big['config']})"
        )
    return {
        "config": best["config"],
        "met": False,
        "line": f"No configuration meets {goals}: {why}; best candidate {best['config']} — "
        f"{best['bytes_per_vector']:.1f} B/image, recall@100 {best['recall@100']:.3f}.",
    }


def table(exact: dict, rows: list[dict]) -> str:
    headers = [
        "config",
        "B/vector (ids incl.)",
        "code B/vector",
        "bytes vs exact",
        "build s",
        "1-query ms median (1 thread)",
        "1-query ms p99",
        "latency vs exact",
        "batch q/s (all threads)",
        "batch vs exact",
        "recall@10",
        "recall@100",
    ]
    body = [
        [
            "exact IndexFlatIP (reference)",
            exact["bytes_per_vector"],
            exact["code_bytes_per_vector"],
            1.0,
            exact["build_s"],
            exact["latency_ms_median"],
            exact["latency_ms_p99"],
            1.0,
            exact["batch_qps"],
            1.0,
            1.0,
            1.0,
        ]
    ]
    for r in rows:
        body.append(
            [
                r["config"],
                r["bytes_per_vector"],
                r["code_bytes_per_vector"],
                r["bytes_vs_exact"],
                r["build_s"],
                r["latency_ms_median"],
                r["latency_ms_p99"],
                r["latency_vs_exact"],
                r["batch_qps"],
                r["batch_qps_vs_exact"],
                r["recall@10"],
                r["recall@100"],
            ]
        )
    return markdown(headers, body)


def plot_png(path: str, rows: list[dict]) -> None:
    """recall@100 against bytes per vector (log scale), one numbered point per configuration and a legend naming
    each number, drawn with PIL (matplotlib is not a dependency)."""
    from PIL import Image, ImageDraw, ImageFont

    w, h, left, right, top, bottom, legend_w = 1300, 720, 80, 30, 50, 70, 420
    plot_r = w - legend_w - right
    img = Image.new("RGB", (w, h), "white")
    d = ImageDraw.Draw(img)
    try:
        font = ImageFont.load_default(size=13)
    except TypeError:  # Pillow without FreeType sizes
        font = ImageFont.load_default()
    xs = [r["bytes_per_vector"] for r in rows] + [BYTES_GOAL]
    lo, hi = math.log2(min(xs) / 1.3), math.log2(max(xs) * 1.3)
    ymin = max(0.0, math.floor((min(r["recall@100"] for r in rows) - 0.05) * 10) / 10)

    def px(b: float) -> float:
        return left + (math.log2(b) - lo) / (hi - lo) * (plot_r - left)

    def py(v: float) -> float:
        return top + (1.0 - (v - ymin) / (1.0 - ymin)) * (h - top - bottom)

    grey, red = (225, 225, 225), (200, 0, 0)
    for e in range(math.ceil(lo), math.floor(hi) + 1):
        x = px(2.0**e)
        d.line([x, top, x, h - bottom], fill=grey)
        d.text((x, h - bottom + 6), f"{2**e:g}", fill="black", font=font, anchor="mt")
    for i in range(11):
        v = ymin + i * (1.0 - ymin) / 10
        d.line([left, py(v), plot_r, py(v)], fill=grey)
        d.text((left - 6, py(v)), f"{v:.2f}", fill="black", font=font, anchor="rm")
    d.rectangle([left, top, plot_r, h - bottom], outline="black")
    goal_lines = ([px(BYTES_GOAL), top, px(BYTES_GOAL), h - bottom], [left, py(RECALL_GOAL), plot_r, py(RECALL_GOAL)])
    for x0, y0, x1, y1 in goal_lines:  # dashed
        for s in range(0, 80, 2):
            a, b = s / 80, (s + 1) / 80
            d.line([x0 + (x1 - x0) * a, y0 + (y1 - y0) * a, x0 + (x1 - x0) * b, y0 + (y1 - y0) * b], fill=red)
    d.text(
        (plot_r - 6, h - bottom - 6),
        f"dashed: recall@100 {RECALL_GOAL}, {BYTES_GOAL:g} B/vector",
        fill=red,
        font=font,
        anchor="rd",
    )

    palette = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (148, 103, 189), (140, 86, 75), (227, 119, 194)]
    colours = {f: palette[i % len(palette)] for i, f in enumerate(dict.fromkeys(r["factory"] for r in rows))}
    groups: list[tuple[float, float, list[int]]] = []  # points closer than a label's height share one label
    for i, r in enumerate(rows, 1):
        x, y = px(r["bytes_per_vector"]), py(r["recall@100"])
        d.ellipse([x - 5, y - 5, x + 5, y + 5], fill=colours[r["factory"]], outline="black")
        near = next((g for g in groups if abs(g[0] - x) < 14 and abs(g[1] - y) < 14), None)
        if near:
            near[2].append(i)
        else:
            groups.append((x, y, [i]))
    for x, y, members in groups:
        d.text((x + 8, y - 8), ",".join(map(str, members)), fill="black", font=font, anchor="ls")
    for i, r in enumerate(rows, 1):
        ly = top + 4 + (i - 1) * 18
        d.ellipse([plot_r + 20, ly + 2, plot_r + 30, ly + 12], fill=colours[r["factory"]], outline="black")
        line = f"{i}  {r['config']}: {r['bytes_per_vector']:.0f} B, {r['recall@100']:.3f}"
        d.text((plot_r + 38, ly), line, fill="black", font=font)
    d.text(
        ((left + plot_r) / 2, h - 20),
        "bytes per vector (serialised, 8-byte id included; log scale)",
        fill="black",
        font=font,
        anchor="mm",
    )
    d.text(
        (w / 2, 20),
        "faiss: recall@100 against exact search vs index bytes per vector",
        fill="black",
        font=font,
        anchor="mm",
    )
    label = Image.new("RGB", (200, 20), "white")
    ImageDraw.Draw(label).text((100, 10), "recall@100", fill="black", font=font, anchor="mm")
    img.paste(label.rotate(90, expand=True), (8, int((top + h - bottom) / 2 - 100)))
    img.save(path)


# ---------------------------------------------------------------------------------------------------------- main


def parse_list(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v.strip()]


def parse_factories(text: str) -> list[str]:
    """Factories separated by ';' (or whitespace), e.g. "Flat;IVF256,Flat;HNSW32".

    A plain comma list also works: components are joined into one factory while they are transforms (OPQ, PCA,
    RR, L2norm, ITQ) or coarse quantisers (IVF..., IMI...), so "Flat,IVF256,Flat,OPQ16,IVF256,PQ16,HNSW32" is
    Flat | IVF256,Flat | OPQ16,IVF256,PQ16 | HNSW32; a refinement (RFlat, Refine(...)) joins the factory before it.
    """
    if ";" in text or any(c.isspace() for c in text.strip()):
        return [f for f in re.split(r"[;\s]+", text) if f]
    out: list[str] = []
    current: list[str] = []
    for tok in (t.strip() for t in text.split(",")):
        if not tok:
            continue
        if not current and out and tok.startswith(("RFlat", "Refine")):
            out[-1] += "," + tok
            continue
        current.append(tok)
        if not tok.startswith(("OPQ", "PCA", "RR", "L2norm", "ITQ", "IVF", "IMI")):
            out.append(",".join(current))
            current = []
    if current:  # an unfinished factory: reported as invalid by the caller
        out.append(",".join(current))
    return out


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.bench_faiss", description=__doc__)
    p.add_argument("--n", type=int, default=1_000_000, help="base vectors (default 1,000,000)")
    p.add_argument("--queries", type=int, default=1000, help="held-out queries (default 1000)")
    p.add_argument(
        "--factories",
        default=DEFAULT_FACTORIES,
        help="faiss factories separated by ';' ('Flat;IVF256,Flat;HNSW32') or by commas ('Flat,IVF256,Flat,HNSW32': "
        "a transform or IVF component continues into the next one); default "
        f"{DEFAULT_FACTORIES!r}",
    )
    p.add_argument("--nprobe", type=parse_list, default=[16, 64], help="IVF nprobe values (default 16,64)")
    p.add_argument("--ef-search", type=parse_list, default=[64, 128], help="HNSW efSearch values (default 64,128)")
    p.add_argument("--clusters", type=int, default=1000, help="Gaussian clusters in the synthetic data (default 1000)")
    p.add_argument("--spread", type=float, default=0.7, help="cluster spread, norm relative to the unit centre")
    p.add_argument("--train-size", type=int, default=200_000, help="training sample of build_index (default 200000)")
    p.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)), help="build/batch threads (all)")
    p.add_argument("--repeats", type=int, default=3, help="batch-search runs; the median is reported (default 3)")
    p.add_argument(
        "--latency-budget",
        type=float,
        default=30.0,
        help="seconds of one-query-at-a-time timing per configuration; stops early (after --latency-min-queries) "
        "when spent, so exhaustive indexes time a subset (default 30)",
    )
    p.add_argument("--latency-min-queries", type=int, default=100, help="queries always timed one at a time")
    p.add_argument("--memory-fraction", type=float, default=0.7, help="refuse to run above this share of MemAvailable")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="benchmarks/results", help="folder for faiss_bench.json/.md and the PNG")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    factories = parse_factories(args.factories)
    if args.n < max(KS) or args.queries < 1 or not factories:
        print(f"bench_faiss: error: needs --n >= {max(KS)}, --queries >= 1 and at least one factory", file=sys.stderr)
        return 2
    for f in factories:
        try:
            faiss.index_factory(DIM, f, faiss.METRIC_INNER_PRODUCT)
        except RuntimeError as exc:
            print(f"bench_faiss: error: faiss factory {f!r} is not valid for dimension {DIM}: {exc}", file=sys.stderr)
            return 2

    plan = memory_plan(args.n, args.queries, DIM, factories, args.train_size)
    avail = mem_available()
    if avail is not None and plan["need_bytes"] > args.memory_fraction * avail:
        print(
            f"bench_faiss: error: --n {args.n} needs about {plan['need_bytes'] / 2**30:.1f} GiB at its peak "
            f"(vectors {plan['vectors_bytes'] / 2**30:.1f} GiB, twice while the exact index copies them; "
            f"worst factory {plan['worst_factory']!r} "
            f"{plan['per_factory_peak_bytes'][plan['worst_factory']] / 2**30:.1f} GiB while built and serialised), "
            f"more than {args.memory_fraction:.0%} of MemAvailable {avail / 2**30:.1f} GiB; "
            "lower --n or leave the largest factories out of --factories",
            file=sys.stderr,
        )
        return 2

    t_start = time.perf_counter()
    faiss.omp_set_num_threads(args.threads)
    mix = Mixture.make(args.clusters, DIM, args.spread, args.seed)
    print(f"[bench_faiss] generating {args.n} x {DIM} vectors", file=sys.stderr, flush=True)
    t = time.perf_counter()
    base = mix.sample(args.n, args.seed + 1)
    queries = mix.sample(args.queries, args.seed + 2)
    ids = unique_ids(args.n, args.seed + 3)
    gen_s = time.perf_counter() - t

    # Exact reference. Its storage then serves as the base vectors (a view, not a copy), halving the footprint.
    print("[bench_faiss] exact reference", file=sys.stderr, flush=True)
    t = time.perf_counter()
    exact_index = faiss.IndexFlatIP(DIM)
    exact_index.add(base)
    exact_build = time.perf_counter() - t
    del base
    gc.collect()
    vectors = faiss.rev_swig_ptr(exact_index.get_xb(), args.n * DIM).reshape(args.n, DIM)
    exact_size = faiss.serialize_index(exact_index).size
    exact_row, positions = measure(search_fn(exact_index, max(KS), None), queries, None, args)
    truth = ids[positions]
    exact = {
        "config": "exact IndexFlatIP",
        # bytes relative to exact search as roiqa would store it: the flat codes plus the 8-byte id
        "bytes_per_vector": exact_size / args.n + IDMAP_BYTES,
        "bytes_per_vector_without_ids": exact_size / args.n,
        "code_bytes_per_vector": 4 * DIM,
        "build_s": exact_build,
        **exact_row,
    }

    rows: list[dict] = []
    for f in factories:
        rows.extend(bench_factory(f, vectors, ids, queries, truth, exact, args))

    rec = recommend(rows)
    report = {
        "benchmark": "faiss",
        "n": args.n,
        "dim": DIM,
        "queries": args.queries,
        "k": list(KS),
        "data": {
            "description": " ".join(Mixture.__doc__.split()),
            "clusters": args.clusters,
            "spread": args.spread,
            "seed": args.seed,
            "generate_s": gen_s,
        },
        "method": {
            "index": "roiqa.index.faiss_index.build_index (METRIC_INNER_PRODUCT; IndexIDMap2 around Flat and HNSW, IVF "
            "indexes keep their own ids), random unique int64 ids",
            "search": "roiqa.index.faiss_index.search (sets nprobe); HNSW efSearch set via faiss.ParameterSpace",
            "ground_truth": "faiss.IndexFlatIP top-100 over the same vectors, same run",
            "recall@k": "mean over queries of |exact top-k ids ∩ index top-k ids| / k",
            "bytes_per_vector": "len(roiqa.index.faiss_index.serialize(index)) / N (8-byte ids included: IDMap2's for "
            "Flat "
            "and HNSW, the inverted lists' own for IVF); code_bytes_per_vector is the vector encoding alone",
            "bytes_vs_exact": "bytes_per_vector / (exact IndexFlatIP serialised bytes per vector + 8-byte id)",
            "build_s": f"build_index wall time (id uniqueness check + train + add), one build per factory, "
            f"{args.threads} threads; trained on min(N, {args.train_size}) sampled vectors (build_index's "
            "train_size); faiss itself subsamples PQ and OPQ training to 65536 of them",
            "latency": "one query per call on 1 thread (faiss.omp_set_num_threads(1)), k=100, after 3 warm-up "
            f"queries; median and p99 over the first latency_queries queries (all, or until {args.latency_budget:g} "
            "s were spent); latency_vs_exact = median / exact median",
            "batch_qps": f"all queries in one call on {args.threads} threads, median of {args.repeats} runs",
        },
        "threads": {"build": args.threads, "single_query": 1, "batch": args.threads},
        "memory": {"estimated_peak_bytes": plan["need_bytes"], "mem_available_bytes": avail},
        "reference": exact,
        "results": rows,
        "recommendation": rec,
        "environment": {**machine(), "faiss": faiss.__version__, "numpy": np.__version__},
        "total_s": time.perf_counter() - t_start,
    }
    os.makedirs(args.out, exist_ok=True)
    plot_png(os.path.join(args.out, "faiss_recall_vs_bytes.png"), rows)
    text = (
        f"faiss coarse index, N={args.n}, D={DIM}, {args.queries} held-out queries, k=100; single-query latency on 1 "
        f"thread, batch on {args.threads} threads; ratios against exact IndexFlatIP in the same run\n\n"
        f"{table(exact, rows)}\n\n{rec['line']}"
    )
    write_report(args.out, "faiss_bench", report, text)
    del vectors, exact_index
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
