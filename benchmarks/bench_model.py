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
XCORR_SEARCH = (1, 128, 64, 48)  # level-3 map of a 512x384 gallery image, the reranker's typical search map
XCORR_KERNELS = ((5, 4), (7, 5), (10, 7), (10, 10), (14, 10), (20, 14), (28, 20))  # query kernels, (h, w) cells
CUDA_SATURATION_GAIN = 1.05  # grow the CUDA batch while images/s improves by more than 5%
FLOP_NOTE = (
    "FLOPs from torch.utils.flop_counter.FlopCounterMode on one forward (batch 1), per image: convolutions and "
    "matrix multiplies only (2 FLOPs per multiply-add); elementwise ops (normalisation, BatchNorm, ReLU, residual "
    "adds, FPN upsampling, GeM) are not counted, so achieved FLOP/s and MFU slightly understate the work done"
)

Timing = dict[str, Any]


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def syncer(device: torch.device) -> Callable[[], None]:
    """A function that waits for `device`'s queued work (a no-op on CPU)."""
    if device.type == "cuda":
        return torch.cuda.synchronize
    return lambda: None


def time_fn(
    fn: Callable[[], object],
    repeats: int,
    sync: Callable[[], None],
    warmup: int = 1,
    min_seconds: float = 0.0,
) -> Timing:
    """Median wall time of `fn` over `repeats` timed samples after `warmup` calls.

    With `min_seconds`, each sample runs `fn` enough times back to back to last about that long (short kernels)
    and reports the time per call.
    """
    for _ in range(warmup):
        fn()
    sync()
    inner = 1
    if min_seconds > 0:
        t0 = time.perf_counter()
        fn()
        sync()
        once = time.perf_counter() - t0
        inner = max(1, min(1000, math.ceil(min_seconds / max(once, 1e-9))))
    samples = []
    for _ in range(repeats):
        sync()
        t0 = time.perf_counter()
        for _ in range(inner):
            fn()
        sync()
        samples.append((time.perf_counter() - t0) / inner)
    return {"median_s": statistics.median(samples), "samples_s": [round(s, 6) for s in samples], "inner": inner}


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
        "cuda": torch.cuda.is_available(),
    }
    if torch.cuda.is_available():
        info["cuda_device"] = torch.cuda.get_device_name(0)
        info["cuda_version"] = torch.version.cuda
        info["cudnn_benchmark"] = torch.backends.cudnn.benchmark
    return info


def matmul_peak(device: torch.device, dtype: torch.dtype, sizes: Sequence[int], repeats: int) -> dict[str, Any]:
    """FLOP/s of torch.mm on square (n, n) matrices, 2 n^3 FLOPs per product; the best size is the peak."""
    sync = syncer(device)
    gen = torch.Generator().manual_seed(0)
    rows = []
    for n in sizes:
        a = torch.randn(n, n, generator=gen).to(device=device, dtype=dtype)
        b = torch.randn(n, n, generator=gen).to(device=device, dtype=dtype)
        c = torch.empty(n, n, device=device, dtype=dtype)
        with torch.inference_mode():
            t = time_fn(lambda a=a, b=b, c=c: torch.mm(a, b, out=c), repeats, sync, warmup=2, min_seconds=0.2)
        rows.append({"n": n, "ms": 1e3 * t["median_s"], "gflops": 2 * n**3 / t["median_s"] / 1e9, "timing": t})
        del a, b, c
        log(f"  matmul {device.type} {dtype} n={n}: {rows[-1]['gflops']:.1f} GFLOP/s")
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


def throughput_row(
    what: str, layout: str, batch: int, t: Timing, flops_per_image: int, peak_gflops: float
) -> dict[str, Any]:
    ips = batch / t["median_s"]
    achieved = flops_per_image * ips / 1e9
    return {
        "what": what,
        "layout": layout,
        "batch": batch,
        "images_per_s": ips,
        "ms_per_image": 1e3 / ips,
        "achieved_gflops": achieved,
        "mfu": achieved / peak_gflops,
        "timing": t,
    }


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
    if any(lay == reference for lay in layouts):
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
    size: int, batch_sizes: Sequence[int], layouts: Sequence[str], repeats: int, peak_gflops: float
) -> dict[str, Any]:
    """Embedder.embed and model.body on CPU at every batch size and layout, as images/s and MFU."""
    from roiqa.config import ModelConfig
    from roiqa.embed import Embedder

    emb = Embedder(ModelConfig(), device="cpu")
    model = emb.model
    flops = model_flops(emb, size)
    log(f"  FLOPs per image: embed {flops['embed_per_image'] / 1e9:.2f} G, body {flops['body_per_image'] / 1e9:.2f} G")
    rng = np.random.default_rng(0)
    sync = syncer(torch.device("cpu"))
    embed_rows, body_rows = [], []
    for layout in layouts:
        with cpu_layout(model, layout):
            for b in batch_sizes:
                images, valid = random_batch(rng, b, size)
                t = time_fn(lambda images=images, valid=valid: emb.embed(images, valid), repeats, sync)
                embed_rows.append(throughput_row("embed", layout, b, t, flops["embed_per_image"], peak_gflops))
                with torch.inference_mode():
                    x = model.normalize(torch.from_numpy(images))
                    t = time_fn(lambda x=x: model.body(x), repeats, sync)
                body_rows.append(throughput_row("body", layout, b, t, flops["body_per_image"], peak_gflops))
                log(
                    f"  cpu {layout:>13} batch {b:>3}: embed {embed_rows[-1]['images_per_s']:.2f} img/s "
                    f"(MFU {embed_rows[-1]['mfu']:.2f}), body {body_rows[-1]['images_per_s']:.2f} img/s "
                    f"(MFU {body_rows[-1]['mfu']:.2f})"
                )
                del images, valid, x
                gc.collect()
    return {
        "device": "cpu",
        "threads": torch.get_num_threads(),
        "image_size": size,
        "peak_gflops": peak_gflops,
        "flops": flops,
        "layouts": LAYOUT_HELP,
        "embed": embed_rows,
        "body": body_rows,
        "embed_layouts": layout_comparison(embed_rows),
        "body_layouts": layout_comparison(body_rows),
    }


def bench_cuda_model(
    size: int, repeats: int, max_batch: int, flops: dict[str, Any], peak_gflops: float
) -> dict[str, Any]:
    """Embedder.embed on CUDA (its own channels_last + bf16 autocast), batch doubled until images/s saturates."""
    from roiqa.config import ModelConfig
    from roiqa.embed import Embedder

    device = torch.device("cuda")
    emb = Embedder(ModelConfig(), device="cuda")
    model = emb.model
    sync = syncer(device)
    rng = np.random.default_rng(0)
    rows: list[dict[str, Any]] = []
    stop = "reached --cuda-max-batch"
    b = 1
    while b <= max_batch:
        images, valid = random_batch(rng, b, size)
        try:
            t = time_fn(lambda images=images, valid=valid: emb.embed(images, valid), repeats, sync)
        except torch.cuda.OutOfMemoryError:
            stop = f"out of memory at batch {b}"
            break
        finally:
            torch.cuda.empty_cache()
        row = throughput_row("embed", "channels_last+bf16", b, t, flops["embed_per_image"], peak_gflops)
        row["gain_vs_previous"] = row["images_per_s"] / rows[-1]["images_per_s"] if rows else None
        rows.append(row)
        log(f"  cuda embed batch {b:>4}: {row['images_per_s']:.1f} img/s (MFU {row['mfu']:.3f})")
        if rows[-1]["gain_vs_previous"] is not None and rows[-1]["gain_vs_previous"] <= CUDA_SATURATION_GAIN:
            stop = f"batch {b} improved images/s by <= {100 * (CUDA_SATURATION_GAIN - 1):.0f}%"
            break
        b *= 2
    if not rows:
        return {"device": "cuda", "error": stop}
    last = rows[-1]
    saturated = rows[-2] if len(rows) > 1 and last["gain_vs_previous"] <= CUDA_SATURATION_GAIN else last
    sat_b = saturated["batch"]
    images, _ = random_batch(rng, sat_b, size)
    with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16):
        x = model.normalize(torch.from_numpy(images).to(device))
        t = time_fn(lambda x=x: model.body(x), repeats, sync)
    body = throughput_row("body", "channels_last+bf16", sat_b, t, flops["body_per_image"], peak_gflops)
    body["input_on_device"] = True
    log(f"  cuda body batch {sat_b}: {body['images_per_s']:.1f} img/s (MFU {body['mfu']:.3f})")
    del x, images
    torch.cuda.empty_cache()
    return {
        "device": "cuda",
        "image_size": size,
        "peak_gflops": peak_gflops,
        "peak_dtype": "bfloat16",
        "embed_growth": rows,
        "growth_stop": stop,
        "saturating_batch": sat_b,
        "embed": saturated,
        "body": body,
        "note": "embed includes the host-to-device copy of the uint8 batch and the descriptors' copy back, as in "
        "the pipeline; body runs on an input already on the device",
    }


# --- cross-correlation -----------------------------------------------------------------------------------------
def bench_xcorr(device: torch.device, repeats: int, peak_gflops: float) -> dict[str, Any]:
    """cosine_xcorr on the reranker's typical search map for growing kernels: direct vs FFT, and what auto picks."""
    from roiqa.ops.xcorr import FFT_MIN_CELLS, cosine_xcorr

    sync = syncer(device)
    gen = torch.Generator().manual_seed(0)
    search = torch.randn(XCORR_SEARCH, generator=gen).to(device)
    _, c, h, w = XCORR_SEARCH
    rows = []
    for kh, kw in XCORR_KERNELS:
        query = torch.randn(c, kh, kw, generator=gen).to(device)
        t = {}
        with torch.inference_mode():
            for method in ("direct", "fft"):
                fn = functools.partial(cosine_xcorr, query, search, method=method)
                t[method] = time_fn(fn, repeats, sync, warmup=2, min_seconds=0.05)
        direct_s, fft_s = t["direct"]["median_s"], t["fft"]["median_s"]
        auto = "fft" if kh * kw >= FFT_MIN_CELLS else "direct"
        faster = "fft" if fft_s < direct_s else "direct"
        direct_gflops = 2 * c * kh * kw * h * w / direct_s / 1e9  # the correlation's multiply-adds only
        rows.append(
            {
                "kernel": f"{kh}x{kw}",
                "cells": kh * kw,
                "direct_ms": 1e3 * direct_s,
                "fft_ms": 1e3 * fft_s,
                "direct_over_fft": direct_s / fft_s,
                "faster": faster,
                "auto": auto,
                "auto_is_faster": auto == faster,
                "direct_gflops": direct_gflops,
                "direct_mfu": direct_gflops / peak_gflops,
                "timing": t,
            }
        )
        log(f"  xcorr {device.type} {kh}x{kw}: direct {1e3 * direct_s:.2f} ms, fft {1e3 * fft_s:.2f} ms")
    return {
        "device": device.type,
        "dtype": "float32",
        "search": list(XCORR_SEARCH),
        "fft_min_cells": FFT_MIN_CELLS,
        "peak_gflops": peak_gflops,
        "rows": rows,
        "note": "direct GFLOP/s counts the correlation's 2*C*h*w*H*W FLOPs only (not the window norms)",
    }


# --- verdicts and report ---------------------------------------------------------------------------------------
def verdicts(cpu: dict[str, Any], pipeline_batch: int) -> list[dict[str, Any]]:
    body = cpu["body"]
    best = max(body, key=lambda r: r["mfu"])
    at_pipeline = next((r for r in body if r["layout"] == "as_pipeline" and r["batch"] == pipeline_batch), None)
    met = best["mfu"] >= MFU_GOAL
    line = (
        f"{'MET' if met else 'NOT MET'}: backbone (model.body) MFU on CPU {best['mfu']:.2f} vs goal {MFU_GOAL:.2f} "
        f"(best: batch {best['batch']}, {best['layout']}; {best['achieved_gflops']:.1f} of "
        f"{cpu['peak_gflops']:.1f} GFLOP/s fp32 matmul peak, {cpu['threads']} threads)"
    )
    if at_pipeline is not None:
        line += f"; as the index pipeline runs it (batch {pipeline_batch}): {at_pipeline['mfu']:.2f}"
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
        f"(os.cpu_count {m['os_cpu_count']}, affinity {m['cpu_affinity']}, OMP_NUM_THREADS {m['OMP_NUM_THREADS']})"
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
        f"MFU vs {cpu['peak_gflops']:.1f} GFLOP/s\n"
    )
    out.append(
        f"FLOPs per image: embed (backbone + FPN + descriptor) {f['embed_per_image'] / 1e9:.2f} G, model.body "
        f"(ResNet + FPN) {f['body_per_image'] / 1e9:.2f} G. {f['note']}. Normalised input channels_last: "
        f"{f['normalised_input_channels_last']}. Layouts: {cpu['layouts']}.\n"
    )
    headers = ["what", "layout", "batch", "images/s", "ms/image", "GFLOP/s", "MFU", "vs nchw"]
    rows = [
        [r["what"], r["layout"], r["batch"], r["images_per_s"], r["ms_per_image"], r["achieved_gflops"], r["mfu"]]
        + [r.get("vs_nchw")]
        for r in cpu["embed"] + cpu["body"]
    ]
    out.append(md_table(headers, rows) + "\n")
    out.append(f"Layouts: embed: {cpu['embed_layouts']['summary']}; body: {cpu['body_layouts']['summary']}.\n")
    cuda = result.get("cuda")
    if cuda and "error" not in cuda:
        out.append(
            f"### CUDA model (Embedder: channels_last + bf16 autocast), MFU vs bf16 peak "
            f"{cuda['peak_gflops'] / 1e3:.1f} TFLOP/s\n"
        )
        rows = [
            [r["what"], r["batch"], r["images_per_s"], r["ms_per_image"], r["achieved_gflops"] / 1e3, r["mfu"]]
            + [r.get("gain_vs_previous")]
            for r in cuda["embed_growth"] + [cuda["body"]]
        ]
        out.append(md_table(["what", "batch", "images/s", "ms/image", "TFLOP/s", "MFU", "gain vs previous"], rows))
        out.append(
            f"\nSaturating batch {cuda['saturating_batch']} ({cuda['growth_stop']}); body measured there. "
            f"{cuda['note']}.\n"
        )
    elif cuda:
        out.append(f"### CUDA model\n\n{cuda['error']}\n")
    for x in result["xcorr"]:
        out.append(
            f"### cosine_xcorr, search {tuple(x['search'])} {x['dtype']} on {x['device']} "
            f"(auto uses FFT from {x['fft_min_cells']} cells)\n"
        )
        rows = [
            [r["kernel"], r["cells"], r["direct_ms"], r["fft_ms"], r["direct_over_fft"], r["faster"], r["auto"]]
            + [r["auto_is_faster"], r["direct_gflops"], r["direct_mfu"]]
            for r in x["rows"]
        ]
        headers = ["kernel", "cells", "direct ms", "fft ms", "direct/fft", "faster", "auto", "auto right", "GFLOP/s"]
        out.append(md_table([*headers, "direct MFU"], rows) + "\n")
    out.append("### Verdicts\n")
    out.extend(f"- {v['line']}" for v in result["verdicts"])
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


def str_list(text: str) -> list[str]:
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
    p.add_argument("--layouts", type=str_list, default=list(CPU_LAYOUTS), help=f"CPU layouts: {LAYOUT_HELP}")
    p.add_argument("--matmul-sizes", type=int_list, default=None, help="CPU matmul sizes n (default 2048,4096)")
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
    if args.repeats < 1 or args.image_size < 32:
        p.error("--repeats must be >= 1 and --image-size >= 32")
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
    result["cpu"] = bench_cpu_model(args.image_size, args.batch_sizes, args.layouts, args.repeats, cpu_peak)
    if use_cuda:
        log("CUDA model")
        bf16_peak = peaks[2]["peak_gflops"]
        result["cuda"] = bench_cuda_model(
            args.image_size, args.repeats, args.cuda_max_batch, result["cpu"]["flops"], bf16_peak
        )

    log("cosine_xcorr")
    result["xcorr"] = [bench_xcorr(cpu, args.repeats, cpu_peak)]
    if use_cuda:
        result["xcorr"].append(bench_xcorr(torch.device("cuda"), args.repeats, peaks[1]["peak_gflops"]))

    result["verdicts"] = verdicts(result["cpu"], IndexConfig().batch_size)
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
