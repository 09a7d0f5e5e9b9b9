"""Evaluation report pieces drawn with PIL: precision-recall curves, a gallery of heatmap tiles, a Markdown table."""

from __future__ import annotations

import io
import math
from collections.abc import Mapping, Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from roiqa import schema as S
from roiqa.eval.metrics import LOC_AP50, MAP, MEAN_IOU, N_POSITIVES, TOP10_IOU50, positives_found_key, recall_key
from roiqa.io import uri as uri_mod

# Keys of a `heatmap_gallery_png` row besides the result columns query_id, rank, score, uri, heatmap_uri.
IOU = "iou"  # float or None: IoU of the predicted box with the best-matching true box
PRED_BOX = "box"  # (4,) x0, y0, x1, y1 in original pixels, or None
TRUE_BOXES = "true_boxes"  # list of (4,) boxes in original pixels (empty for a negative image)

# Keys of a method's entry in the metrics dict that `markdown_table` reads besides its buckets.
LATENCY = "latency"  # {name: seconds}
INDEX_BYTES_PER_IMAGE = "index_bytes_per_image"  # float

PRED_COLOUR, TRUE_COLOUR = (230, 20, 20), (20, 200, 20)  # red prediction, green truth
# Line colours of successive curves (tab10-like), cycled when there are more methods.
_PALETTE = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75)]
# R@K: share of queries with a positive in the top K; found@K: share of a query's positives in its top K.
_METRIC_COLUMNS = [
    (MAP, "mAP"),
    (recall_key(1), "R@1"),
    (recall_key(5), "R@5"),
    (recall_key(10), "R@10"),
    (positives_found_key(1), "found@1"),
    (positives_found_key(5), "found@5"),
    (positives_found_key(10), "found@10"),
    (LOC_AP50, "loc AP@0.5"),
    (TOP10_IOU50, "top-10 IoU>=0.5"),
    (MEAN_IOU, "mean IoU"),
]


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    """PIL's bundled font at `size` pixels (its fixed bitmap font when FreeType is unavailable)."""
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, ImportError, OSError):  # Pillow < 10.1 or no FreeType
        return ImageFont.load_default()


def _save_png(img: Image.Image, path: str) -> None:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    uri_mod.write_bytes(path, buf.getvalue())


def pr_curves_png(
    curves: Mapping[str, tuple[np.ndarray, np.ndarray]],
    path: str,
    size: tuple[int, int] = (640, 480),
    title: str = "localization precision-recall (IoU >= 0.5)",
) -> None:
    """Draw each method's (precision, recall) curve on one recall (x) / precision (y) axis, with a legend.

    `curves`: {method: (precision, recall)} as `roiqa.eval.metrics.pr_curve_points` returns them (points in detection
    order, both in [0, 1]). `size` is (W, H) of the PNG written to `path`.
    """
    W, H = size
    if W < 400 or H < 160:
        raise ValueError(f"size {size} is too small for a plot; use at least (400, 160)")
    left, right, top, bottom = 60, 170, 30, 50  # the legend sits in the right margin, clear of the curves
    pw, ph = W - left - right, H - top - bottom  # plot area
    img = Image.new("RGB", (W, H), "white")
    d = ImageDraw.Draw(img)
    font = _font(12)

    def xy(r: float, p: float) -> tuple[float, float]:
        return left + r * pw, top + (1.0 - p) * ph

    d.text((left, 8), title, fill="black", font=font)
    for t in np.linspace(0.0, 1.0, 6):  # grid and tick labels every 0.2
        x, y = xy(t, t)
        d.line([(x, top), (x, top + ph)], fill=(225, 225, 225))
        d.line([(left, y), (left + pw, y)], fill=(225, 225, 225))
        d.text((x - 8, top + ph + 4), f"{t:.1f}", fill="black", font=font)
        d.text((left - 28, y - 7), f"{t:.1f}", fill="black", font=font)
    d.rectangle([left, top, left + pw, top + ph], outline="black")
    d.text((left + pw // 2 - 18, H - 20), "recall", fill="black", font=font)
    d.text((6, top + ph // 2 - 20), "preci-\nsion", fill="black", font=font)

    for i, (name, (precision, recall)) in enumerate(curves.items()):
        p = np.asarray(precision, dtype=np.float64).ravel()
        r = np.asarray(recall, dtype=np.float64).ravel()
        if p.shape != r.shape:
            raise ValueError(f"curve {name!r}: precision and recall differ in length: {p.size} vs {r.size}")
        colour = _PALETTE[i % len(_PALETTE)]
        if p.size:
            # start at recall 0 with the first precision so a one-point curve is still a visible segment
            pts = [xy(0.0, float(p[0]))] + [xy(float(a), float(b)) for a, b in zip(r, p)]
            d.line(pts, fill=colour, width=2)
        ly, lx = top + 4 + 16 * i, left + pw + 12  # legend, right of the plot
        d.line([(lx, ly + 7), (lx + 22, ly + 7)], fill=colour, width=3)
        d.text((lx + 28, ly), (name if p.size else f"{name} (empty)")[:20], fill="black", font=font)
    _save_png(img, path)


def _read_rgb(uri: str) -> Image.Image:
    from roiqa.io.imageio import decode_image

    return Image.fromarray(decode_image(uri_mod.read_bytes(uri), uri))


def _tile(row: Mapping, tile: int, caption: int, font) -> Image.Image:
    """One tile: the overlay (or the gallery image) fitted into tile x tile, boxes drawn, caption below."""
    from roiqa.io.imageio import read_header_size

    uri = str(row[S.URI])
    heat = row.get(S.HEATMAP_URI)
    has_heat = isinstance(heat, str) and bool(heat)
    base = _read_rgb(heat) if has_heat else _read_rgb(uri)
    orig_w = read_header_size(uri_mod.read_bytes(uri), uri)[1] if has_heat else base.width  # (H, W) -> W
    s = min(tile / base.width, tile / base.height)
    shown = base.resize((max(1, round(base.width * s)), max(1, round(base.height * s))), Image.Resampling.BILINEAR)
    k = shown.width / orig_w  # shown pixels per original pixel
    out = Image.new("RGB", (tile, tile + caption), "white")
    out.paste(shown, (0, 0))
    d = ImageDraw.Draw(out)
    for b in row.get(TRUE_BOXES) or []:
        d.rectangle([float(v) * k for v in b], outline=TRUE_COLOUR, width=2)
    box = row.get(PRED_BOX)
    if box is not None and np.all(np.isfinite(np.asarray(box, dtype=np.float64))):
        d.rectangle([float(v) * k for v in box], outline=PRED_COLOUR, width=2)
    score, iou = row.get(S.SCORE), row.get(IOU)
    score_s = "-" if score is None or not math.isfinite(float(score)) else f"{float(score):.3f}"
    iou_s = "-" if iou is None or not math.isfinite(float(iou)) else f"{float(iou):.2f}"
    y = shown.height + 2  # right under the image, so a caption never sits beside the next row's tile
    d.text((4, y), str(row[S.QUERY_ID])[:34], fill="black", font=font)
    d.text((4, y + 15), f"rank {row[S.RANK]}  score {score_s}  IoU {iou_s}", fill="black", font=font)
    return out


def heatmap_gallery_png(rows: Sequence[Mapping], path: str, tile: int = 224, columns: int = 4) -> None:
    """A grid of tiles, one per row: the heatmap overlay of a reranked pair (the gallery image when it has none).

    Each row holds query_id, rank, score, uri (the gallery image), heatmap_uri (overlay PNG or None), "box" (the
    predicted box in original pixels, or None), "true_boxes" (list of boxes in original pixels) and "iou" (or
    None). Predicted box in red, true boxes in green; the caption gives query id, rank, score and IoU. The PNG is
    (columns * tile) wide and ceil(len(rows) / columns) * (tile + 34) high; `columns` shrinks to len(rows).
    """
    if not rows:
        raise ValueError("heatmap_gallery_png: no rows to draw")
    if tile < 32 or columns < 1:
        raise ValueError(f"tile must be >= 32 and columns >= 1, got tile={tile}, columns={columns}")
    for i, row in enumerate(rows):
        missing = [k for k in (S.QUERY_ID, S.RANK, S.URI) if k not in row]
        if missing:
            raise ValueError(f"heatmap_gallery_png: row {i} lacks {missing}; has {sorted(row)}")
    caption, font = 34, _font(12)
    cols = min(columns, len(rows))
    n_rows = -(-len(rows) // cols)
    img = Image.new("RGB", (cols * tile, n_rows * (tile + caption)), "white")
    for i, row in enumerate(rows):
        img.paste(_tile(row, tile, caption, font), ((i % cols) * tile, (i // cols) * (tile + caption)))
    _save_png(img, path)


def _fmt(v: object, digits: int = 3) -> str:
    if v is None:
        return "-"
    if isinstance(v, (int, np.integer)) and not isinstance(v, bool):
        return str(int(v))
    if isinstance(v, (float, np.floating)):
        return "-" if not math.isfinite(float(v)) else f"{float(v):.{digits}f}"
    return str(v)


def _is_bucket(value: object) -> bool:
    return isinstance(value, Mapping) and MAP in value


def markdown_table(metrics: Mapping[str, Mapping]) -> str:
    """One Markdown row per method x bucket of `metrics` = {method: {bucket: {metric: value}, ...}}.

    Buckets are the method's entries holding "mAP", in their order. Columns: method, bucket, positives, mAP,
    R@1, R@5, R@10 (Recall@K), found@1, found@5, found@10 (positives found@K), loc AP@0.5, top-10 IoU>=0.5,
    mean IoU, then one column per latency key (seconds) found under any method's "latency" and "index bytes/image"
    when some method has it; those per-method figures fill the method's "all" row (its first bucket when it has no
    "all") and are "-" elsewhere. nan and missing are "-".
    """
    latency_keys: list[str] = []
    has_bytes = False
    for method, entry in metrics.items():
        if not isinstance(entry, Mapping):
            raise ValueError(f"metrics[{method!r}] must be a mapping of buckets, got {type(entry).__name__}")
        for k in entry.get(LATENCY) or {}:
            if k not in latency_keys:
                latency_keys.append(k)
        has_bytes = has_bytes or INDEX_BYTES_PER_IMAGE in entry
    headers = ["method", "bucket", "positives", *(h for _, h in _METRIC_COLUMNS), *(f"{k} (s)" for k in latency_keys)]
    if has_bytes:
        headers.append("index bytes/image")
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    for method, entry in metrics.items():
        buckets = [b for b, v in entry.items() if _is_bucket(v)]
        home = "all" if "all" in buckets else (buckets[0] if buckets else None)
        for bucket in buckets:
            m = entry[bucket]
            cells = [method, bucket, _fmt(m.get(N_POSITIVES)), *(_fmt(m.get(k)) for k, _ in _METRIC_COLUMNS)]
            latency = entry.get(LATENCY) or {}
            cells += [_fmt(latency.get(k), 4) if bucket == home else "-" for k in latency_keys]
            if has_bytes:
                cells.append(_fmt(entry.get(INDEX_BYTES_PER_IMAGE), 0) if bucket == home else "-")
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
