"""Shared helpers of the benchmarks: sample images, timing, medians, JSON + Markdown output."""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from collections.abc import Callable

import torch


def machine() -> dict:
    """What the figures were measured on."""
    info = {
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
    try:
        with open("/proc/cpuinfo") as f:
            names = [ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")]
        info["cpu_model"] = names[0] if names else None
    except OSError:
        info["cpu_model"] = None
    return info


def sample_images(folder: str, n: int, seed: int = 0, size: tuple[int, int] = (384, 512)) -> list[str]:
    """n gallery JPEGs built from the photographs inside scikit-image (the demo's builder)."""
    from roiqa.eval.demo_data import OBJECTS, DemoConfig, build_demo_collection

    instances = max(1, min(4, (n - 2) * 2 // len(OBJECTS)))
    cfg = DemoConfig(n_gallery=n, instances_per_object=instances, n_distractors=2, image_size=size, seed=seed)
    col = build_demo_collection(folder, cfg)
    return sorted(os.path.join(col.gallery_dir, f) for f in os.listdir(col.gallery_dir))


def timed(fn: Callable[[], object]) -> tuple[float, object]:
    t = time.perf_counter()
    out = fn()
    return time.perf_counter() - t, out


def median(values: list[float]) -> float:
    return float(statistics.median(values))


def write_report(out: str, name: str, report: dict, table: str) -> None:
    """Print the JSON and the Markdown table; also write both under `out`."""
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, f"{name}.json"), "w") as f:
        json.dump(report, f, indent=2)
    with open(os.path.join(out, f"{name}.md"), "w") as f:
        f.write(table + "\n")
    print(json.dumps(report, indent=2))
    print()
    print(table)


def markdown(headers: list[str], rows: list[list]) -> str:
    def fmt(v: object) -> str:
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 1000 else f"{v:.0f}"
        return str(v)

    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(fmt(v) for v in r) + " |" for r in rows]
    return "\n".join(lines)


def bar_chart_png(path: str, labels: list[str], values: list[float], title: str, unit: str) -> None:
    """A horizontal bar chart drawn with PIL (the project does not depend on matplotlib)."""
    from PIL import Image, ImageDraw

    row, left, width = 28, 330, 360
    img = Image.new("RGB", (left + width + 90, 50 + row * len(labels)), "white")
    d = ImageDraw.Draw(img)
    d.text((10, 10), title, fill="black")
    top = max(values) if values and max(values) > 0 else 1.0
    for i, (label, v) in enumerate(zip(labels, values)):
        y = 40 + i * row
        d.text((10, y + 6), label[:52], fill="black")
        d.rectangle([left, y + 4, left + int(width * v / top), y + row - 4], fill=(70, 110, 180))
        d.text((left + int(width * v / top) + 6, y + 6), f"{v:.2f} {unit}", fill="black")
    img.save(path)
