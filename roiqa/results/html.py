"""report.html of a query run: per query its patch, then its top results as thumbnails with the predicted box,
rank, score and verify probability, each linked to its full heatmap overlay.

One self-contained file in the run's folder (thumbnails inline as data: URIs, no script, no network); the overlay
links are relative (heatmaps/<query>/<rank>-<image_id>.png), so the page opens from disk beside its run.
`plan` lists the work (thumbnails to draw, overlays to rename by rank), `draw` does it per batch on the cluster,
`render` writes the page from the results and those thumbnails.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import html
import math
from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd
from PIL import Image, ImageDraw

from roiqa import schema as S
from roiqa.io import uri as uri_mod
from roiqa.io.imageio import decode_image, encode_jpeg, resize_long_side
from roiqa.results.output import HEATMAPS

# Columns of a work row (`plan`): what to do and with which image.
KIND = "kind"  # "query": the query patch's thumbnail | "result": a result's thumbnail | "overlay": rename only
SOURCE = "source"  # overlay rows: the overlay's URI as the rerank wrote it
TARGET = "target"  # overlay rows: its URI named by rank
THUMB = "thumb"  # output: JPEG bytes of the thumbnail (empty when it could not be drawn)


def overlay_name(query_id: str, rank: int, image_id: int) -> str:
    """The overlay's path inside the run folder, named by rank so a folder listing reads in rank order."""
    return f"{HEATMAPS}/{safe_name(query_id)}/{rank:04d}-{image_id}.png"


def safe_name(name: str) -> str:
    """A file-name-safe version of a query id; one that had to change gets a hash of the original appended, so
    two ids never share a folder ("a/b" and "a_b")."""
    keep = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in name).strip(".")
    if keep == name and keep:
        return keep
    digest = hashlib.blake2b(name.encode("utf-8", "surrogatepass"), digest_size=4).hexdigest()
    return f"{keep[:80] or 'query'}-{digest}"


def shown_queries(query_ids: Sequence[str], max_queries: int) -> list[str]:
    """The queries the report shows: the first `max_queries` in the order of the queries table."""
    return list(query_ids)[:max_queries]


def plan(
    results: pd.DataFrame,
    queries: Mapping[str, tuple[str, Sequence[float] | None]],
    run_folder: str,
    top: int,
    max_queries: int,
) -> pd.DataFrame:
    """Work rows for `draw`: one per shown query (its patch), one per shown result of rank <= `top`, and one
    per overlay to rename by rank (every reranked result with one, shown or not).

    results: the ranked results (query_id, rank, image_id, uri, box, heatmap_uri); queries: {query_id: (uri, box)}.
    Columns: kind, query_id, rank, uri, x0..y1, source, target."""
    shown = set(shown_queries(list(queries), max_queries))
    rows: list[dict] = []
    for qid in shown_queries(list(queries), max_queries):
        u, box = queries[qid]
        b = [math.nan] * 4 if box is None else [math.nan if v is None else float(v) for v in box]
        rows.append({KIND: "query", S.QUERY_ID: qid, S.RANK: 0, S.URI: u, **dict(zip(S.BOX, b))})
    for r in results.itertuples(index=False):
        r = r._asdict()
        qid, rank = str(r[S.QUERY_ID]), int(r[S.RANK])
        box = {c: float(r[c]) for c in S.BOX}
        heat = r.get(S.HEATMAP_URI)
        if isinstance(heat, str) and heat:
            target = uri_mod.join(run_folder, overlay_name(qid, rank, int(r[S.IMAGE_ID])))
            rows.append({KIND: "overlay", S.QUERY_ID: qid, S.RANK: rank, SOURCE: heat, TARGET: target})
        if qid in shown and rank <= top:
            rows.append({KIND: "result", S.QUERY_ID: qid, S.RANK: rank, S.URI: str(r[S.URI]), **box})
    frame = pd.DataFrame(rows, columns=[KIND, S.QUERY_ID, S.RANK, S.URI, *S.BOX, SOURCE, TARGET])
    for c in (S.URI, SOURCE, TARGET):
        frame[c] = frame[c].fillna("").astype(str)
    for c in S.BOX:
        frame[c] = frame[c].astype(np.float32)
    frame[S.RANK] = frame[S.RANK].fillna(0).astype(np.int32)
    return frame


def thumbnail(image: np.ndarray, box: np.ndarray | None, long_side: int, crop: bool) -> bytes:
    """JPEG of `image` with its long side `long_side`: cropped to `box` (crop=True, the query patch) or with `box`
    drawn over it (crop=False, a result). `box` in image pixels; None or not finite: the whole image, no box."""
    h, w = image.shape[:2]
    finite = box is not None and np.all(np.isfinite(box))
    if crop and finite:
        x0, y0, x1, y1 = (int(round(float(v))) for v in box)
        x0, y0, x1, y1 = max(0, x0), max(0, y0), min(w, x1), min(h, y1)
        if x1 - x0 >= 1 and y1 - y0 >= 1:
            image = image[y0:y1, x0:x1]
    small, s = resize_long_side(image, long_side)
    if not crop and finite:
        pic = Image.fromarray(small)
        draw = ImageDraw.Draw(pic)
        width = max(2, round(long_side / 80))
        draw.rectangle([float(v) * s for v in box], outline=(255, 32, 32), width=width)
        small = np.asarray(pic)
    return encode_jpeg(np.ascontiguousarray(small), quality=85, subsample=False)


def draw(batch: dict[str, np.ndarray], long_side: int, max_pixels: int) -> dict[str, np.ndarray]:
    """Ray Data batch function over `plan`'s rows: draws the thumbnails and renames the overlays by rank.

    Output per row: kind, query_id, rank, thumb (JPEG bytes; empty for overlay rows and unreadable images) and
    target (the overlay's new URI; empty for thumbnail rows). An image that no longer reads gets an empty thumbnail
    (the page says so); an outage of the store fails the run (exit 3), as it does in the rerank."""
    thumbs, targets = [], []
    for i, kind in enumerate(batch[KIND]):
        thumb, target = b"", ""
        if kind == "overlay":
            source, target = str(batch[SOURCE][i]), str(batch[TARGET][i])
            try:
                uri_mod.move(source, target)
            except FileNotFoundError:
                if not uri_mod.exists(target):
                    raise
                # a retried task finds this move done
        else:
            u = str(batch[S.URI][i])
            box = np.array([batch[c][i] for c in S.BOX], np.float32)
            try:
                image = decode_image(uri_mod.read_bytes(u), u, max_pixels)
            except uri_mod.StorageUnavailable:
                raise
            except Exception:  # noqa: BLE001 - the page shows the image as unreadable
                image = None
            if image is not None:
                thumb = thumbnail(image, box, long_side, crop=kind == "query")
        thumbs.append(thumb)
        targets.append(target)
    return {
        KIND: batch[KIND],
        S.QUERY_ID: batch[S.QUERY_ID],
        S.RANK: batch[S.RANK],
        THUMB: np.array(thumbs, dtype=object),
        TARGET: np.array(targets, dtype=object),
    }


def _img(data: bytes, alt: str) -> str:
    if not data:
        return f'<div class="missing" role="img" aria-label="{html.escape(alt)}">image unreadable</div>'
    b64 = base64.b64encode(data).decode("ascii")
    return f'<img src="data:image/jpeg;base64,{b64}" alt="{html.escape(alt)}">'


def _num(v, digits: int = 3) -> str:
    return "" if v is None or (isinstance(v, float) and not math.isfinite(v)) else f"{float(v):.{digits}f}"


def _relative(uri: str, folder: str) -> str | None:
    """`uri` relative to `folder` when it lies inside it, else None."""
    prefix = folder.rstrip("/") + "/"
    return uri[len(prefix) :] if uri.startswith(prefix) else None


_STYLE = """
body{font:14px/1.4 system-ui,sans-serif;margin:1.5em;color:#222;background:#fafafa}
h1{font-size:1.4em;margin:0 0 .2em}h2{font-size:1.1em;margin:0 0 .5em}
.summary{color:#555;margin:0 0 1.5em}
section.query{background:#fff;border:1px solid #ddd;border-radius:6px;padding:1em;margin:0 0 1.2em}
.row{display:flex;gap:1em;align-items:flex-start}
figure{margin:0}figure.patch{flex:none;text-align:center;max-width:220px}figure.patch img{border:2px solid #2a6}
ol.results{display:flex;flex-wrap:wrap;gap:.8em;list-style:none;margin:0;padding:0}
li.result{width:200px}li.result img{max-width:200px;max-height:200px;display:block}
.meta{font-size:12px;color:#333}.uri{font-size:11px;color:#777;overflow-wrap:anywhere}
.missing{width:160px;height:100px;display:flex;align-items:center;justify-content:center;background:#eee;color:#900}
.error{color:#900}table{border-collapse:collapse;font-size:12px}td,th{border:1px solid #ddd;padding:2px 6px}
"""


def render(
    run_folder: str,
    summary: Mapping,
    queries: Mapping[str, tuple[str, Sequence[float] | None]],
    results: pd.DataFrame,
    errors: pd.DataFrame,
    thumbs: Mapping[tuple[str, str, int], bytes],
    top: int,
    max_queries: int,
) -> str:
    """The page as a string. thumbs: {(kind, query_id, rank): JPEG bytes} from `draw` (kind "query" at rank
    0); results: the final results (heatmap_uri already renamed by rank); errors: the run's errors table."""
    shown = shown_queries(list(queries), max_queries)
    by_query = {q: g.sort_values(S.RANK) for q, g in results.groupby(S.QUERY_ID, sort=False)}
    q_errors = errors[errors[S.QUERY_ID].isin(shown)] if len(errors) else errors
    title = f"roiqa query run {summary.get('run_id', '')}"
    when = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    parts = [
        "<!doctype html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{html.escape(title)}</title><style>{_STYLE}</style></head><body>",
        f"<h1>{html.escape(title)}</h1>",
        '<p class="summary">'
        f"index {html.escape(str(summary.get('index', '')))} (version {html.escape(str(summary.get('version', '')))})"
        f" &middot; {len(queries):,} queries &middot; {len(results):,} results &middot; {len(errors):,} errors"
        f" &middot; top {top} shown per query &middot; written {when}</p>",
    ]
    if len(queries) > len(shown):
        parts.append(
            f'<p class="summary">The first {len(shown):,} of {len(queries):,} queries are shown; results.parquet '
            "holds them all.</p>"
        )
    for qid in shown:
        rows = by_query.get(qid)
        n = 0 if rows is None else int((rows[S.RANK] <= top).sum())
        parts.append(f'<section class="query" id="q-{html.escape(safe_name(qid))}" data-results="{n}">')
        parts.append(f"<h2>query {html.escape(qid)}</h2>")
        parts.append('<div class="row"><figure class="patch">')
        parts.append(_img(thumbs.get(("query", qid, 0), b""), f"query {qid}"))
        parts.append(f'<figcaption class="uri">{html.escape(queries[qid][0])}</figcaption></figure>')
        if n == 0:
            why = q_errors[q_errors[S.QUERY_ID] == qid] if len(q_errors) else q_errors
            msg = "; ".join(f"{r[S.STAGE]}:{r[S.REASON]}: {r[S.MESSAGE]}" for _, r in why.head(3).iterrows())
            parts.append(f'<p class="error">no results{": " + html.escape(msg) if msg else ""}</p></div></section>')
            continue
        parts.append('<ol class="results">')
        for r in rows[rows[S.RANK] <= top].itertuples(index=False):
            r = r._asdict()
            rank = int(r[S.RANK])
            alt = f"rank {rank}: {r[S.URI]}"
            pic = _img(thumbs.get(("result", qid, rank), b""), alt)
            heat = r.get(S.HEATMAP_URI)
            link = _relative(heat, run_folder) if isinstance(heat, str) and heat else None
            if link:
                pic = f'<a href="{html.escape(link)}" title="heatmap overlay">{pic}</a>'
            score = _num(r.get(S.SCORE))
            meta = [f"<b>#{rank}</b>", f"score {score}" if score else "coarse only"]
            prob = _num(r.get(S.VERIFY_PROB))
            if prob:
                meta.append(f"verify {prob}")
            meta.append(f"coarse {_num(r.get(S.COARSE_SCORE))}")
            name = str(r[S.URI]).rsplit("/", 1)[-1]
            parts.append(
                f'<li class="result" data-rank="{rank}">{pic}<div class="meta">{" &middot; ".join(meta)}</div>'
                f'<div class="uri" title="{html.escape(str(r[S.URI]))}">{html.escape(name)}</div></li>'
            )
        parts.append("</ol></div></section>")
    if len(errors):
        parts.append('<section class="errors"><h2>Errors</h2><table><tr><th>query</th><th>uri</th><th>stage</th>')
        parts.append("<th>reason</th><th>message</th></tr>")
        for _, r in errors.head(200).iterrows():
            cells = (r[S.QUERY_ID], r[S.URI], r[S.STAGE], r[S.REASON], r[S.MESSAGE])
            parts.append("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in cells) + "</tr>")
        parts.append("</table>")
        if len(errors) > 200:
            parts.append(f"<p>{len(errors) - 200:,} more in errors.parquet.</p>")
        parts.append("</section>")
    parts.append("</body></html>\n")
    return "\n".join(parts)
