"""Model throughput against the machine's measured matmul peak: embedding forward, backbone, cosine_xcorr."""

from __future__ import annotations

import argparse
import contextlib
import functools
import gc
import json
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

MFU_GOAL = 0.60  # the goal: >= 60% of the matmul peak for the backbone on CPU
CPU_LAYOUTS = ("as_pipeline", "nchw", "channels_last")
LAYOUT_HELP = (
    "as_pipeline: exactly what Embedder does on CPU (weights NCHW; the uint8 NHWC input permuted to NCHW keeps "
    "NHWC strides, so the convolutions see a channels_last input); nchw: the normalised input made contiguous "
    "(channels_last fully off); channels_last: the model's weights converted to channels_last as well"
)
MATMUL_SIZES_CPU = (2048, 4096)
MATMUL_SIZES_CUDA = (4096, 8192)
CPU_REF_N = 2048  # the matmul timed alternately with every CPU model figure (the MFU's denominator)
XCORR_SEARCH = (1, 128, 64, 48)  # level-3 map of a 512x384 gallery image, the reranker's typical search map
XCORR_KERNELS = ((5, 4), (7, 5), (10, 7), (10, 10), (14, 10), (20, 14), (28, 20))  # query kernels, (h, w) cells
CUDA_SATURATION_GAIN = 1.05  # grow the CUDA batch while images/s improves by more than 5%
CONTENDED_REF = 0.85  # a paired reference below this fraction of the peak means the machine was busy meanwhile
FLOP_NOTE = (
    "FLOPs from torch.utils.flop_counter.FlopCounterMode on one forward (batch 1), per image: convolutions and "
    "matrix multiplies only (2 FLOPs per multiply-add); elementwise ops (normalisation, BatchNorm, ReLU, residual "
    "adds, FPN upsampling, GeM) are not counted, so achieved FLOP/s and MFU slightly understate the work done"
)
MFU_NOTE = (
    "MFU = achieved FLOP/s / matmul FLOP/s, where the matmul (the reference) is timed alternately with the model "
    "in every repeat and the MFU is the median of the per-repeat ratios, so that load from other processes hits "
    "both alike; mfu_vs_peak divides by the peak measured once at the start instead"
)

Timing = dict[str, Any]


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def syncer(device: torch.device) -> Callable[[], None]:
    """A function that waits for `device`'s queued work (a no-op on CPU)."""
    if device.type == "cuda":
        return torch.cuda.synchronize
    return lambda: None


def time_interleaved(
    fns: dict[str, Callable[[], object]],
    repeats: int,
    sync: Callable[[], None],
    warmup: int = 1,
    min_seconds: float = 0.0,
) -> dict[str, Timing]:
    """Wall time per call of every function in `fns`, sampled alternately: repeat r times each of them in turn.

    Alternating (the order rotated every repeat) makes a ratio of two figures from the same repeat see the same
    machine load. With `min_seconds`, a sample runs its function enough times back to back to last about that
    long (short kernels) and reports the time per call. Returns {name: {median_s, samples_s, inner}}.
    """
    names = list(fns)
    inner = dict.fromkeys(names, 1)
    for name in names:
        once = 0.0
        for _ in range(max(1, warmup)):  # the last warm-up call's time sizes the samples
            sync()
            t0 = time.perf_counter()
            fns[name]()
            sync()
            once = time.perf_counter() - t0
        if min_seconds > 0:
            inner[name] = max(1, min(1000, math.ceil(min_seconds / max(once, 1e-9))))
    samples: dict[str, list[float]] = {name: [] for name in names}
    for r in range(repeats):
        k = r % len(names)
        for name in names[k:] + names[:k]:
            sync()
            t0 = time.perf_counter()
            for _ in range(inner[name]):
                fns[name]()
            sync()
            samples[name].append((time.perf_counter() - t0) / inner[name])
    return {
        name: {"median_s": statistics.median(s), "samples_s": [round(v, 6) for v in s], "inner": inner[name]}
        for name, s in samples.items()
    }


def count_flops(fn: Callable[[], object]) -> tuple[int, dict[str, int]]:
    """Total FLOPs of one call of `fn` and their split by aten op, from FlopCounterMode."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        fn()
    by_op = {str(k): int(v) for k, v in counter.get_flop_counts().get("Global", {}).items()}
    return int(counter.get_total_flops()), by_op


# --- machine ---------------------------------------------------------------------------------------------------
def cpu_model_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def load_average() -> list[float] | None:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return None


def machine_info() -> dict[str, Any]:
    affinity = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
    info: dict[str, Any] = {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cpu": cpu_model_name(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "os_cpu_count": os.cpu_count(),
        "cpu_affinity": affinity,
        "torch_threads": torch.get_num_threads(),
        "torch_interop_threads": torch.get_num_interop_threads(),
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
        "MKL_NUM_THREADS": os.environ.get("MKL_NUM_THREADS"),
        "mkldnn": torch.backends.mkldnn.is_available(),
        "load_average_start": load_average(),
        "cuda": torch.cuda.is_available(),
    }
    if torch.cuda.is_available():
        info["cuda_device"] = torch.cuda.get_device_name(0)
        info["cuda_version"] = torch.version.cuda
        info["cudnn_benchmark"] = torch.backends.cudnn.benchmark
    return info


# --- matmul reference ------------------------------------------------------------------------------------------
class Matmul:
    """torch.mm of two random square (n, n) matrices into a preallocated output: 2 n^3 FLOPs per call."""

    def __init__(self, device: torch.device, dtype: torch.dtype, n: int) -> None:
        gen = torch.Generator().manual_seed(n)
        self.n, self.flops = n, 2 * n**3
        self.a = torch.randn(n, n, generator=gen).to(device=device, dtype=dtype)
        self.b = torch.randn(n, n, generator=gen).to(device=device, dtype=dtype)
        self.c = torch.empty(n, n, device=device, dtype=dtype)

    def __call__(self) -> torch.Tensor:
        with torch.inference_mode():
            return torch.mm(self.a, self.b, out=self.c)


def matmul_peak(device: torch.device, dtype: torch.dtype, sizes: Sequence[int], repeats: int) -> dict[str, Any]:
    """FLOP/s of torch.mm at every size (sampled alternately); the best size's median is the peak."""
    mms = {str(n): Matmul(device, dtype, n) for n in sizes}
    t = time_interleaved(dict(mms), repeats, syncer(device), warmup=2, min_seconds=0.2)
    rows = []
    for key, mm in mms.items():
        s = t[key]["median_s"]
        rows.append({"n": mm.n, "ms": 1e3 * s, "gflops": mm.flops / s / 1e9, "timing": t[key]})
        log(f"  matmul {device.type} {dtype} n={mm.n}: {rows[-1]['gflops']:.1f} GFLOP/s")
    del mms
    best = max(rows, key=lambda r: r["gflops"])
    for r in rows:
        r["of_best"] = r["gflops"] / best["gflops"]
    return {
        "device": device.type,
        "dtype": str(dtype).replace("torch.", ""),
        "threads": torch.get_num_threads() if device.type == "cpu" else None,
        "peak_gflops": best["gflops"],
        "best_n": best["n"],
        "sizes": rows,
    }


def paired_row(
    what: str,
    layout: str,
    batch: int,
    model_fn: Callable[[], object],
    ref: Matmul,
    flops_per_image: int,
    peak_gflops: float,
    repeats: int,
    sync: Callable[[], None],
) -> dict[str, Any]:
    """Images/s of `model_fn` on a batch, and its MFU against the reference matmul timed alternately with it."""
    t = time_interleaved({"model": model_fn, "ref": ref}, repeats, sync, min_seconds=0.05)
    model_s, ref_s = t["model"]["samples_s"], t["ref"]["samples_s"]
    mfus = [(flops_per_image * batch / m) / (ref.flops / r) for m, r in zip(model_s, ref_s)]
    ips = batch / t["model"]["median_s"]
    achieved = flops_per_image * ips / 1e9
    ref_gflops = ref.flops / t["ref"]["median_s"] / 1e9
    return {
        "what": what,
        "layout": layout,
        "batch": batch,
        "images_per_s": ips,
        "ms_per_image": 1e3 / ips,
        "achieved_gflops": achieved,
        "ref_gflops": ref_gflops,
        "mfu": statistics.median(mfus),
        "mfu_vs_peak": achieved / peak_gflops,
        "ref_vs_peak": ref_gflops / peak_gflops,
        "timing": t,
    }


# --- embedding forward ---------------------------------------------------------------------------------------
def random_batch(rng: np.random.Generator, batch: int, size: int) -> tuple[np.ndarray, np.ndarray]:
    """(B, S, S, 3) uint8 images and their (B, 2) valid sizes (the whole square), as the Decoder hands them on."""
    images = rng.integers(0, 256, size=(batch, size, size, 3), dtype=np.uint8)
    return images, np.full((batch, 2), size, dtype=np.int32)


@contextlib.contextmanager
def cpu_layout(model: torch.nn.Module, layout: str) -> Iterator[None]:
    """Run `model` in one of CPU_LAYOUTS for the duration of the block (see LAYOUT_HELP)."""
    if layout == "nchw":
        normalize = model.normalize
        model.normalize = lambda images: normalize(images).contiguous()  # instance attribute shadows the method
        try:
            yield
        finally:
            del model.normalize
    elif layout == "channels_last":
        model.to(memory_format=torch.channels_last)
        try:
            yield
        finally:
            model.to(memory_format=torch.contiguous_format)
    elif layout == "as_pipeline":
        yield
    else:
        raise ValueError(f"unknown layout {layout!r}; choose from {CPU_LAYOUTS}")


def model_flops(emb: Any, size: int) -> dict[str, Any]:
    """FLOPs per image of the embedding forward (backbone + FPN + descriptor) and of `model.body` alone."""
    model = emb.model
    images, valid = random_batch(np.random.default_rng(1), 1, size)
    with torch.inference_mode():
        embed_flops, embed_ops = count_flops(lambda: emb.embed(images, valid))
        x = model.normalize(torch.from_numpy(images).to(emb.device))
        body_flops, body_ops = count_flops(lambda: model.body(x))
    return {
        "embed_per_image": embed_flops,
        "embed_by_op": embed_ops,
        "body_per_image": body_flops,
        "body_by_op": body_ops,
        "normalised_input_channels_last": bool(x.is_contiguous(memory_format=torch.channels_last)),
        "note": FLOP_NOTE,
    }


def layout_comparison(rows: list[dict[str, Any]], reference: str = "nchw") -> dict[str, Any]:
    """Per layout: images/s relative to `reference` at each batch size, and which layout is fastest where."""
    by = {(r["layout"], r["batch"]): r for r in rows}
    layouts = sorted({r["layout"] for r in rows}, key=CPU_LAYOUTS.index)
    batches = sorted({r["batch"] for r in rows})
    fastest = {
        b: max((lay for lay in layouts if (lay, b) in by), key=lambda lay: by[(lay, b)]["images_per_s"])
        for b in batches
    }
    ratios: dict[str, dict[int, float]] = {}
    if reference in layouts:
        for lay in layouts:
            ratios[lay] = {
                b: by[(lay, b)]["images_per_s"] / by[(reference, b)]["images_per_s"]
                for b in batches
                if (lay, b) in by and (reference, b) in by
            }
            for b, ratio in ratios[lay].items():
                by[(lay, b)]["vs_" + reference] = ratio
    winners = set(fastest.values())
    summary = (
        f"{winners.pop()} fastest at every batch size"
        if len(winners) == 1
        else "mixed: " + ", ".join(f"batch {b}: {lay}" for b, lay in fastest.items())
    )
    return {"reference": reference, "ratio_images_per_s": ratios, "fastest_by_batch": fastest, "summary": summary}


def bench_cpu_model(
    size: int, batch_sizes: Sequence[int], layouts: Sequence[str], repeats: int, peak_gflops: float, ref_n: int
) -> dict[str, Any]:
    """Embedder.embed and model.body on CPU at every batch size and layout, as images/s and MFU."""
    from roiqa.config import ModelConfig
    from roiqa.stages.embed import Embedder

    emb = Embedder(ModelConfig(), device="cpu")
    model = emb.model
    flops = model_flops(emb, size)
    log(f"  FLOPs per image: embed {flops['embed_per_image'] / 1e9:.2f} G, body {flops['body_per_image'] / 1e9:.2f} G")
    rng = np.random.default_rng(0)
    sync = syncer(torch.device("cpu"))
    ref = Matmul(torch.device("cpu"), torch.float32, ref_n)
    embed_rows, body_rows = [], []
    for layout in layouts:
        with cpu_layout(model, layout):
            for b in batch_sizes:
                images, valid = random_batch(rng, b, size)
                fn = functools.partial(emb.embed, images, valid)
                row = paired_row("embed", layout, b, fn, ref, flops["embed_per_image"], peak_gflops, repeats, sync)
                embed_rows.append(row)
                with torch.inference_mode():
                    x = model.normalize(torch.from_numpy(images))
                fn = functools.partial(torch.inference_mode()(model.body), x)
                row = paired_row("body", layout, b, fn, ref, flops["body_per_image"], peak_gflops, repeats, sync)
                body_rows.append(row)
                e, o = embed_rows[-1], body_rows[-1]
                log(
                    f"  cpu {layout:>13} batch {b:>3}: embed {e['images_per_s']:.2f} img/s (MFU {e['mfu']:.2f}), "
                    f"body {o['images_per_s']:.2f} img/s (MFU {o['mfu']:.2f}); reference at "
                    f"{e['ref_vs_peak']:.2f}/{o['ref_vs_peak']:.2f} of the peak"
                )
                del images, valid, x, fn
                gc.collect()
    return {
        "device": "cpu",
        "threads": torch.get_num_threads(),
        "image_size": size,
        "peak_gflops": peak_gflops,
        "ref_n": ref_n,
        "flops": flops,
        "layouts": LAYOUT_HELP,
        "embed": embed_rows,
        "body": body_rows,
        "embed_layouts": layout_comparison(embed_rows),
        "body_layouts": layout_comparison(body_rows),
    }


def bench_cuda_model(
    size: int, repeats: int, max_batch: int, flops: dict[str, Any], peak: dict[str, Any], device_name: str = "cuda"
) -> dict[str, Any]:
    """Embedder.embed on CUDA (its own channels_last + bf16 autocast), batch doubled until images/s saturates."""
    from roiqa.config import ModelConfig
    from roiqa.stages.embed import Embedder

    device = torch.device(device_name)  # "cuda"; another device only to exercise this code without a GPU
    emb = Embedder(ModelConfig(), device=device_name)
    model = emb.model
    sync = syncer(device)
    ref = Matmul(device, torch.bfloat16, peak["best_n"])
    peak_gflops = peak["peak_gflops"]
    rng = np.random.default_rng(0)
    rows: list[dict[str, Any]] = []
    stop = "reached --cuda-max-batch"
    b = 1
    while b <= max_batch:
        images, valid = random_batch(rng, b, size)
        fn = functools.partial(emb.embed, images, valid)
        try:
            row = paired_row(
                "embed", "channels_last+bf16", b, fn, ref, flops["embed_per_image"], peak_gflops, repeats, sync
            )
        except torch.cuda.OutOfMemoryError:
            stop = f"out of memory at batch {b}"
            break
        finally:
            del fn
            if device.type == "cuda":
                torch.cuda.empty_cache()
        row["gain_vs_previous"] = row["images_per_s"] / rows[-1]["images_per_s"] if rows else None
        rows.append(row)
        log(f"  cuda embed batch {b:>4}: {row['images_per_s']:.1f} img/s (MFU {row['mfu']:.3f})")
        if row["gain_vs_previous"] is not None and row["gain_vs_previous"] <= CUDA_SATURATION_GAIN:
            stop = f"batch {b} improved images/s by <= {100 * (CUDA_SATURATION_GAIN - 1):.0f}%"
            break
        b *= 2
    if not rows:
        return {"device": device.type, "error": stop}
    last = rows[-1]
    saturated = rows[-2] if len(rows) > 1 and last["gain_vs_previous"] <= CUDA_SATURATION_GAIN else last
    sat_b = saturated["batch"]
    images, _ = random_batch(rng, sat_b, size)

    @torch.inference_mode()
    def body(x: torch.Tensor) -> object:
        with torch.autocast(device.type, dtype=torch.bfloat16):
            return model.body(x)

    with torch.inference_mode():
        x = model.normalize(torch.from_numpy(images).to(device))
    fn = functools.partial(body, x)
    body_row = paired_row(
        "body", "channels_last+bf16", sat_b, fn, ref, flops["body_per_image"], peak_gflops, repeats, sync
    )
    body_row["input_on_device"] = True
    log(f"  cuda body batch {sat_b}: {body_row['images_per_s']:.1f} img/s (MFU {body_row['mfu']:.3f})")
    del x, images, fn, ref
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return {
        "device": device.type,
        "image_size": size,
        "peak_gflops": peak_gflops,
        "peak_dtype": "bfloat16",
        "ref_n": peak["best_n"],
        "embed_growth": rows,
        "growth_stop": stop,
        "saturating_batch": sat_b,
        "embed": saturated,
        "body": body_row,
        "note": "embed includes the host-to-device copy of the uint8 batch and the descriptors' copy back, as in "
        "the pipeline; body runs on an input already on the device; MFU against the bf16 matmul",
    }


# --- cross-correlation -----------------------------------------------------------------------------------------
def bench_xcorr(device: torch.device, repeats: int, peak_gflops: float | None) -> dict[str, Any]:
    """cosine_xcorr on the reranker's typical search map for growing kernels: direct vs FFT, and what auto picks."""
    from roiqa.ops.xcorr import FFT_MIN_CELLS, cosine_xcorr

    sync = syncer(device)
    gen = torch.Generator().manual_seed(0)
    search = torch.randn(XCORR_SEARCH, generator=gen).to(device)
    _, c, h, w = XCORR_SEARCH
    rows = []
    for kh, kw in XCORR_KERNELS:
        query = torch.randn(c, kh, kw, generator=gen).to(device)
        fns = {
            method: torch.inference_mode()(functools.partial(cosine_xcorr, query, search, method=method))
            for method in ("direct", "fft")
        }
        t = time_interleaved(fns, repeats, sync, warmup=2, min_seconds=0.05)
        direct_s, fft_s = t["direct"]["median_s"], t["fft"]["median_s"]
        ratio = statistics.median(d / f for d, f in zip(t["direct"]["samples_s"], t["fft"]["samples_s"]))
        auto = "fft" if kh * kw >= FFT_MIN_CELLS else "direct"
        faster = "fft" if ratio > 1 else "direct"
        direct_gflops = 2 * c * kh * kw * h * w / direct_s / 1e9  # the correlation's multiply-adds only
        rows.append(
            {
                "kernel": f"{kh}x{kw}",
                "cells": kh * kw,
                "direct_ms": 1e3 * direct_s,
                "fft_ms": 1e3 * fft_s,
                "direct_over_fft": ratio,
                "faster": faster,
                "auto": auto,
                "auto_is_faster": auto == faster,
                "direct_gflops": direct_gflops,
                "direct_mfu_vs_peak": None if peak_gflops is None else direct_gflops / peak_gflops,
                "timing": t,
            }
        )
        log(
            f"  xcorr {device.type} {torch.get_num_threads()} threads {kh}x{kw}: "
            f"direct {1e3 * direct_s:.2f} ms, fft {1e3 * fft_s:.2f} ms"
        )
    note = "direct_over_fft is the median of per-repeat ratios (the two sampled alternately); direct GFLOP/s counts "
    note += "the correlation's 2*C*h*w*H*W FLOPs only (not the window norms)"
    if device.type == "cuda":
        note += f"; cuDNN may run the fp32 convolution in TF32 (allow_tf32={torch.backends.cudnn.allow_tf32})"
    return {
        "device": device.type,
        "threads": torch.get_num_threads() if device.type == "cpu" else None,
        "dtype": "float32",
        "search": list(XCORR_SEARCH),
        "fft_min_cells": FFT_MIN_CELLS,
        "peak_gflops": peak_gflops,
        "rows": rows,
        "note": note,
    }


# --- verdicts and report ---------------------------------------------------------------------------------------
def warnings_for(result: dict[str, Any]) -> list[str]:
    """Signs that the machine was busy with other work while measuring."""
    out = []
    rows = result["cpu"]["embed"] + result["cpu"]["body"]
    low = [r for r in rows if r["ref_vs_peak"] < CONTENDED_REF]
    if low:
        worst = min(r["ref_vs_peak"] for r in low)
        out.append(
            f"{len(low)} of {len(rows)} CPU rows ran their reference matmul below {CONTENDED_REF:.0%} of the peak "
            f"(lowest {worst:.2f}): the machine was busy; the paired MFU corrects for steady load only"
        )
    over = [r for r in rows if r["mfu"] > 1.0]
    if over:
        out.append(f"{len(over)} CPU rows have MFU > 1, which is impossible: their timings are not trustworthy")
    load = result["machine"].get("load_average_start")
    cpus = result["machine"]["os_cpu_count"] or 1
    if load and load[0] > 0.5 * cpus:
        out.append(f"load average {load[0]} on {cpus} CPUs when the benchmark started")
    return out


def verdicts(cpu: dict[str, Any], pipeline_batch: int) -> list[dict[str, Any]]:
    body = [r for r in cpu["body"] if r["mfu"] <= 1.0] or cpu["body"]
    best = max(body, key=lambda r: r["mfu"])
    at_pipeline = next((r for r in cpu["body"] if r["layout"] == "as_pipeline" and r["batch"] == pipeline_batch), None)
    met = best["mfu"] >= MFU_GOAL
    line = (
        f"{'MET' if met else 'NOT MET'}: backbone (model.body) MFU on CPU {best['mfu']:.2f} vs goal {MFU_GOAL:.2f} "
        f"(best: batch {best['batch']}, {best['layout']}; {best['achieved_gflops']:.1f} GFLOP/s against the "
        f"fp32 matmul's {best['ref_gflops']:.1f} timed alongside (peak {cpu['peak_gflops']:.1f}), "
        f"{cpu['threads']} threads)"
    )
    if at_pipeline is not None:
        line += f"; as the index pipeline runs it (batch {pipeline_batch}, as_pipeline): {at_pipeline['mfu']:.2f}"
    return [
        {
            "goal": f"backbone MFU on CPU >= {MFU_GOAL:.2f}",
            "met": met,
            "figure": best["mfu"],
            "batch": best["batch"],
            "layout": best["layout"],
            "at_pipeline_batch": None if at_pipeline is None else at_pipeline["mfu"],
            "line": line,
        }
    ]


def md_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    def cell(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 10 else f"{v:.1f}"
        return "" if v is None else str(v)

    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(cell(v) for v in r) + " |" for r in rows]
    return "\n".join(lines)


def markdown(result: dict[str, Any]) -> str:
    m, out = result["machine"], []
    out.append("## bench_model\n")
    out.append(
        f"torch {m['torch']}, {m['cpu']} ({m['cpu_capability']}), {m['torch_threads']} torch threads "
        f"(os.cpu_count {m['os_cpu_count']}, affinity {m['cpu_affinity']}, OMP_NUM_THREADS {m['OMP_NUM_THREADS']}), "
        f"load average {m['load_average_start']} -> {result['load_average_end']}"
        + (f", CUDA: {m['cuda_device']}" if m["cuda"] else ", no CUDA")
        + f"; medians of {result['repeats']} repeats{' (--quick)' if result['quick'] else ''}.\n"
    )
    out.append("### Matmul peak (torch.mm, square)\n")
    rows = [
        [p["device"], p["dtype"], r["n"], r["ms"], r["gflops"], r["of_best"]]
        for p in result["peaks"]
        for r in p["sizes"]
    ]
    out.append(md_table(["device", "dtype", "n", "ms", "GFLOP/s", "of best"], rows) + "\n")
    cpu = result["cpu"]
    f = cpu["flops"]
    out.append(
        f"### CPU model, {cpu['image_size']}x{cpu['image_size']}, {cpu['threads']} threads, "
        f"reference fp32 matmul n={cpu['ref_n']} (peak {cpu['peak_gflops']:.1f} GFLOP/s)\n"
    )
    out.append(
        f"FLOPs per image: embed (backbone + FPN + descriptor) {f['embed_per_image'] / 1e9:.2f} G, model.body "
        f"(ResNet + FPN) {f['body_per_image'] / 1e9:.2f} G. {f['note']}. {MFU_NOTE}. Normalised input "
        f"channels_last: {f['normalised_input_channels_last']}. Layouts: {cpu['layouts']}.\n"
    )
    headers = ["what", "layout", "batch", "images/s", "ms/image", "GFLOP/s", "ref GFLOP/s", "MFU", "MFU vs peak"]
    rows = [
        [r["what"], r["layout"], r["batch"], r["images_per_s"], r["ms_per_image"], r["achieved_gflops"]]
        + [r["ref_gflops"], r["mfu"], r["mfu_vs_peak"], r.get("vs_nchw")]
        for r in cpu["embed"] + cpu["body"]
    ]
    out.append(md_table([*headers, "images/s vs nchw"], rows) + "\n")
    out.append(f"Layouts: embed: {cpu['embed_layouts']['summary']}; body: {cpu['body_layouts']['summary']}.\n")
    cuda = result.get("cuda")
    if cuda and "error" not in cuda:
        out.append(
            f"### CUDA model (Embedder: channels_last + bf16 autocast), reference bf16 matmul n={cuda['ref_n']} "
            f"(peak {cuda['peak_gflops'] / 1e3:.1f} TFLOP/s)\n"
        )
        rows = [
            [r["what"], r["batch"], r["images_per_s"], r["ms_per_image"], r["achieved_gflops"] / 1e3, r["mfu"]]
            + [r["mfu_vs_peak"], r.get("gain_vs_previous")]
            for r in cuda["embed_growth"] + [cuda["body"]]
        ]
        headers = ["what", "batch", "images/s", "ms/image", "TFLOP/s", "MFU", "MFU vs peak", "gain vs previous"]
        out.append(md_table(headers, rows))
        out.append(
            f"\nSaturating batch {cuda['saturating_batch']} ({cuda['growth_stop']}); body measured there. "
            f"{cuda['note']}.\n"
        )
    elif cuda:
        out.append(f"### CUDA model\n\n{cuda['error']}\n")
    for x in result["xcorr"]:
        out.append(
            f"### cosine_xcorr, search {tuple(x['search'])} {x['dtype']} on {x['device']}"
            + (f", {x['threads']} threads " if x["threads"] else " ")
            + f"(auto uses FFT from {x['fft_min_cells']} cells)\n"
        )
        one = "direct_speedup_of_1_thread" in x["rows"][0]
        rows = [
            [r["kernel"], r["cells"], r["direct_ms"], r["fft_ms"], r["direct_over_fft"], r["faster"], r["auto"]]
            + [r["auto_is_faster"], r["direct_gflops"]]
            + ([r["direct_speedup_of_1_thread"], r["fft_speedup_of_1_thread"]] if one else [r["direct_mfu_vs_peak"]])
            for r in x["rows"]
        ]
        headers = ["kernel", "cells", "direct ms", "fft ms", "direct/fft", "faster", "auto", "auto right", "GFLOP/s"]
        headers += ["direct: 1-thread speedup", "fft: 1-thread speedup"] if one else ["direct vs peak"]
        out.append(md_table(headers, rows) + f"\n\n{x['note']}.\n")
    out.append("### Verdicts\n")
    out.extend(f"- {v['line']}" for v in result["verdicts"])
    if result["warnings"]:
        out.append("\n### Warnings\n")
        out.extend(f"- {w}" for w in result["warnings"])
    return "\n".join(out) + "\n"


# --- command line ----------------------------------------------------------------------------------------------
def int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from exc
    if not values or any(v <= 0 for v in values):
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def layout_list(text: str) -> list[str]:
    values = [v.strip() for v in text.split(",") if v.strip()]
    bad = [v for v in values if v not in CPU_LAYOUTS]
    if not values or bad:
        raise argparse.ArgumentTypeError(f"layouts must be among {','.join(CPU_LAYOUTS)}, got {text!r}")
    return values


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.bench_model", description=__doc__)
    p.add_argument("--out", default="benchmarks/results", help="folder for bench_model.json and bench_model.md")
    p.add_argument("--image-size", type=int, default=512, help="square gallery image side S (preprocess.image_size)")
    p.add_argument("--batch-sizes", type=int_list, default=None, help="CPU batch sizes (default 1,4,8,16,32)")
    p.add_argument("--repeats", type=int, default=None, help="timed repeats per figure, median reported (default 5)")
    p.add_argument("--layouts", type=layout_list, default=list(CPU_LAYOUTS), help=f"CPU layouts: {LAYOUT_HELP}")
    p.add_argument("--matmul-sizes", type=int_list, default=None, help="CPU matmul peak sizes n (default 2048,4096)")
    p.add_argument("--ref-n", type=int, default=CPU_REF_N, help="CPU reference matmul n timed alongside the model")
    p.add_argument("--threads", type=int, default=-1, help="torch.set_num_threads first (> 0); default: as is")
    p.add_argument("--cuda-max-batch", type=int, default=1024, help="largest CUDA batch tried while growing")
    p.add_argument("--no-cuda", action="store_true", help="skip the CUDA measurements even when a GPU is present")
    p.add_argument("--quick", action="store_true", help="smoke test: batch sizes 1,4, 2 repeats, matmul n=2048")
    args = p.parse_args(argv)
    args.batch_sizes = args.batch_sizes or ([1, 4] if args.quick else [1, 4, 8, 16, 32])
    args.repeats = args.repeats or (2 if args.quick else 5)
    args.matmul_sizes = args.matmul_sizes or ([2048] if args.quick else list(MATMUL_SIZES_CPU))
    if args.quick:
        args.cuda_max_batch = min(args.cuda_max_batch, 64)
    if args.repeats < 1 or args.image_size < 32 or args.ref_n < 64:
        p.error("--repeats must be >= 1, --image-size >= 32 and --ref-n >= 64")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from roiqa.config import IndexConfig

    if args.threads > 0:
        torch.set_num_threads(args.threads)
    use_cuda = torch.cuda.is_available() and not args.no_cuda
    cpu = torch.device("cpu")
    result: dict[str, Any] = {
        "benchmark": "bench_model",
        "machine": machine_info(),
        "quick": args.quick,
        "repeats": args.repeats,
        "args": dict(vars(args)),
        "mfu_note": MFU_NOTE,
    }
    log(f"threads: torch {torch.get_num_threads()}, os.cpu_count {os.cpu_count()}; cuda: {use_cuda}")

    log("matmul peak")
    peaks = [matmul_peak(cpu, torch.float32, args.matmul_sizes, args.repeats)]
    if use_cuda:
        cuda = torch.device("cuda")
        peaks.append(matmul_peak(cuda, torch.float32, MATMUL_SIZES_CUDA, args.repeats))
        peaks.append(matmul_peak(cuda, torch.bfloat16, MATMUL_SIZES_CUDA, args.repeats))
    result["peaks"] = peaks
    cpu_peak = peaks[0]["peak_gflops"]

    log("CPU model")
    result["cpu"] = bench_cpu_model(args.image_size, args.batch_sizes, args.layouts, args.repeats, cpu_peak, args.ref_n)
    if use_cuda:
        log("CUDA model")
        result["cuda"] = bench_cuda_model(
            args.image_size, args.repeats, args.cuda_max_batch, result["cpu"]["flops"], peaks[2]
        )

    log("cosine_xcorr")
    result["xcorr"] = [bench_xcorr(cpu, args.repeats, cpu_peak)]
    threads = torch.get_num_threads()
    if threads > 1:  # the same on one thread: OpenMP barriers of small ops stall when another process holds a core
        torch.set_num_threads(1)
        try:
            one = bench_xcorr(cpu, args.repeats, None)
        finally:
            torch.set_num_threads(threads)
        for r1, rn in zip(one["rows"], result["xcorr"][0]["rows"]):
            r1["direct_speedup_of_1_thread"] = rn["direct_ms"] / r1["direct_ms"]
            r1["fft_speedup_of_1_thread"] = rn["fft_ms"] / r1["fft_ms"]
        one["note"] += f"; speedup of 1 thread = {threads}-thread ms / 1-thread ms (> 1: one thread is faster)"
        result["xcorr"].append(one)
    if use_cuda:
        result["xcorr"].append(bench_xcorr(torch.device("cuda"), args.repeats, peaks[1]["peak_gflops"]))

    result["load_average_end"] = load_average()
    result["verdicts"] = verdicts(result["cpu"], IndexConfig().batch_size)
    result["warnings"] = warnings_for(result)
    md = markdown(result)
    text = json.dumps(result, indent=2)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench_model.json").write_text(text + "\n")
    (out / "bench_model.md").write_text(md)
    print(text)
    print()
    print(md)
    log(f"wrote {out / 'bench_model.json'} and {out / 'bench_model.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
