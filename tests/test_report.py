"""report.html of a query run (roiqa.results.html): the work plan, thumbnails, the page, the page in a real browser."""

from __future__ import annotations

import dataclasses
import io
import math
import os
import re
import shutil

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
from PIL import Image

from roiqa import schema as S
from roiqa.results import html as report
from roiqa.results.output import open_results

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def results_frame(rows: list[tuple]) -> pd.DataFrame:
    """Results rows (query_id, rank, image_id, score, heatmap_uri) with a fixed box and coarse score."""
    out = []
    for qid, rank, iid, score, heat in rows:
        out.append(
            {
                S.QUERY_ID: qid,
                S.RANK: rank,
                S.IMAGE_ID: iid,
                S.URI: f"/data/img{iid}.jpg",
                S.SCORE: score,
                S.COARSE_SCORE: 0.5,
                S.X0: 1.0,
                S.Y0: 2.0,
                S.X1: 30.0,
                S.Y1: 40.0,
                S.HEATMAP_URI: heat,
                S.VERIFY_PROB: math.nan,
            }
        )
    return pd.DataFrame(out)


def test_safe_name_keeps_plain_ids_and_keeps_changed_ones_apart():
    assert report.safe_name("cat-01_a.b") == "cat-01_a.b"
    a, b = report.safe_name("a/b"), report.safe_name("a_b")
    assert a != b and a.startswith("a_b-") and b == "a_b"
    assert "/" not in report.safe_name("../../etc") and not report.safe_name("..").startswith(".")


def test_plan_renames_every_overlay_and_lists_the_top_results_of_the_shown_queries():
    def row(q: str, r: int, i: int) -> tuple:
        return (q, r, i, 1.0 - r / 10, f"/run/heatmaps/{q}/{i}.png" if r <= 3 else None)

    rows = [row("q1", r, 100 + r) for r in range(1, 6)] + [row("q2", r, 200 + r) for r in (1, 2)]
    queries = {"q1": ("/q/q1.png", None), "q2": ("/q/q2.png", [1.0, 2.0, 3.0, 4.0])}
    work = report.plan(results_frame(rows), queries, "/run", top=2, max_queries=1)

    overlays = work[work[report.KIND] == "overlay"]
    expected = {(f"/run/heatmaps/{q}/{i}.png", f"/run/heatmaps/{q}/{r:04d}-{i}.png") for q, r, i, _, h in rows if h}
    assert set(zip(overlays[report.SOURCE], overlays[report.TARGET])) == expected  # q2's too: it is not shown
    shown = work[work[report.KIND] != "overlay"]
    assert sorted(zip(shown[report.KIND], shown[S.QUERY_ID], shown[S.RANK])) == [
        ("query", "q1", 0),
        ("result", "q1", 1),
        ("result", "q1", 2),
    ]
    q = shown[shown[report.KIND] == "query"].iloc[0]
    assert q[S.URI] == "/q/q1.png" and all(np.isnan(q[c]) for c in S.BOX)


def test_a_result_thumbnail_has_the_box_drawn_where_it_is():
    image = np.full((100, 200, 3), 128, np.uint8)
    box = np.array([50, 20, 150, 80], np.float32)  # at long side 100 (scale 0.5): x 25..75, y 10..40
    thumb = np.asarray(Image.open(io.BytesIO(report.thumbnail(image, box, 100, crop=False))))
    assert thumb.shape == (50, 100, 3)
    red = (thumb[..., 0] > 200) & (thumb[..., 1] < 100) & (thumb[..., 2] < 100)
    assert red[10:41, 25].mean() > 0.8 and red[25, 25:76].sum() <= 6  # the left edge, not the inside
    assert not red[:, :20].any() and not red[45:, :].any()


def test_a_query_thumbnail_is_the_crop_of_its_box():
    image = np.zeros((120, 160, 3), np.uint8)
    image[30:60, 40:100] = (0, 200, 0)
    thumb = np.asarray(Image.open(io.BytesIO(report.thumbnail(image, [40, 30, 100, 60], 60, True))))
    assert thumb.shape == (30, 60, 3)
    np.testing.assert_allclose(thumb.reshape(-1, 3).mean(0), (0, 200, 0), atol=6)


def test_the_page_escapes_ids_and_says_what_is_missing():
    rows = [("<q>", 1, 7, 0.9, "/run/heatmaps/q/0001-7.png"), ("<q>", 2, 8, math.nan, None)]
    queries = {"<q>": ("/q/a.png", None), "bad": ("/q/b.png", None)}
    errors = pd.DataFrame(
        [("/q/b.png", "query", "bad_box", "box is inverted", "bad")],
        columns=[S.URI, S.STAGE, S.REASON, S.MESSAGE, S.QUERY_ID],
    )
    thumbs = {("query", "<q>", 0): b"\xff\xd8jpeg", ("result", "<q>", 1): b"\xff\xd8jpeg"}
    page = report.render("/run", {"run_id": "r1"}, queries, results_frame(rows), errors, thumbs, 10, 100)
    assert "<q>" not in page and "&lt;q&gt;" in page
    assert page.count('class="result"') == 2
    assert 'href="heatmaps/q/0001-7.png"' in page  # relative to the run folder
    assert "coarse only" in page  # rank 2 was not reranked
    assert "image unreadable" in page  # rank 2 has no thumbnail
    assert "no results: query:bad_box: box is inverted" in page


# --- the pipeline and a real browser -------------------------------------------------------------------------


def open_in_chromium(path: str) -> dict:
    """Load a local page in headless Chromium; returns its console errors, failed requests and what it shows."""
    from playwright.sync_api import sync_playwright

    problems: list[str] = []
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"], headless=True)
        try:
            page = browser.new_page()
            page.on("console", lambda m: problems.append(f"console {m.type}: {m.text}") if m.type == "error" else None)
            page.on("pageerror", lambda e: problems.append(f"page error: {e}"))
            page.on("requestfailed", lambda r: problems.append(f"request failed: {r.url}"))
            page.goto("file://" + os.path.abspath(path), wait_until="load")
            shown = page.evaluate(
                """() => ({
                    sections: [...document.querySelectorAll('section.query')].map(s => ({
                        id: s.querySelector('h2').textContent.replace(/^query /, ''),
                        results: s.querySelectorAll('li.result').length,
                        ranks: [...s.querySelectorAll('li.result')].map(li => Number(li.dataset.rank)),
                        links: [...s.querySelectorAll('li.result a')].map(a => a.href),
                    })),
                    images: [...document.images].map(i => [i.complete, i.naturalWidth]),
                })"""
            )
        finally:
            browser.close()
    return {"problems": problems, **shown}


@pytest.mark.slow
@pytest.mark.usefixtures("ray_local")
def test_a_query_run_writes_a_report_that_a_browser_shows_whole(collection, tiny_cfg, tmp_path):
    if CHROMIUM is None:
        if os.environ.get("CI"):
            pytest.fail("chromium is not installed; .ci/run installs Debian's chromium for this test")
        pytest.skip("needs Debian's chromium (apt-get install chromium)")
    from pipelines.index import run_index
    from pipelines.query import run_query

    index = str(tmp_path / "index")
    run_index(collection.gallery_dir, index, tiny_cfg)
    top = 3
    cfg = dataclasses.replace(tiny_cfg, query=dataclasses.replace(tiny_cfg.query, report_top=top, report_queries=5))
    out = str(tmp_path / "out")
    r = run_query(index, collection.queries_uri, out, cfg)
    run = open_results(out)
    assert r.report == os.path.join(run.folder, "report.html") and os.path.exists(r.report)
    res = run.results().to_pandas()

    # overlays are named by rank, and the results point at them: no other PNG is left in the run's heatmaps
    heat = res.dropna(subset=[S.HEATMAP_URI])
    assert len(heat) == collection.n_queries * cfg.query.rerank
    for _, row in heat.iterrows():
        name = f"{int(row[S.RANK]):04d}-{int(row[S.IMAGE_ID])}.png"
        assert row[S.HEATMAP_URI] == os.path.join(run.folder, "heatmaps", report.safe_name(row[S.QUERY_ID]), name)
    on_disk = {os.path.join(d, f) for d, _, fs in os.walk(os.path.join(run.folder, "heatmaps")) for f in fs}
    assert on_disk == set(heat[S.HEATMAP_URI])

    page = open_in_chromium(r.report)
    assert page["problems"] == []
    order = pq.read_table(collection.queries_uri).column(S.QUERY_ID).to_pylist()[:5]
    assert [s["id"] for s in page["sections"]] == order
    for s in page["sections"]:
        expected = res[(res[S.QUERY_ID] == s["id"]) & (res[S.RANK] <= top)]
        assert s["results"] == len(expected) == top and s["ranks"] == [1, 2, 3]
        links = [re.sub("^file://", "", u) for u in s["links"]]
        assert links == list(expected.sort_values(S.RANK)[S.HEATMAP_URI])  # each thumbnail opens its overlay
    assert len(page["images"]) == 5 * (1 + top) and all(ok and w > 0 for ok, w in page["images"])


def test_draw_renames_overlays_once_and_a_retried_batch_finds_them_done(tmp_path):
    src, dst = tmp_path / "heatmaps" / "q" / "7.png", tmp_path / "heatmaps" / "q" / "0001-7.png"
    src.parent.mkdir(parents=True)
    src.write_bytes(b"png")
    batch = {
        report.KIND: np.array(["overlay"], dtype=object),
        S.QUERY_ID: np.array(["q"], dtype=object),
        S.RANK: np.array([1], np.int32),
        S.URI: np.array([""], dtype=object),
        **{c: np.array([np.nan], np.float32) for c in S.BOX},
        report.SOURCE: np.array([str(src)], dtype=object),
        report.TARGET: np.array([str(dst)], dtype=object),
    }
    for _ in range(2):  # the second call is a task retried after its moves were done
        out = report.draw(batch, long_side=64, max_pixels=10**8)
        assert list(out[report.TARGET]) == [str(dst)] and out[report.THUMB][0] == b""
        assert not src.exists() and dst.read_bytes() == b"png"
