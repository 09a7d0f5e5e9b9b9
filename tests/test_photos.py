"""`roiqa photos`: the pictures kept from a Debian wallpaper package, their JPEGs, licenses and list."""

from __future__ import annotations

import os
import shutil
import subprocess

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from jobs import photos

pytestmark = pytest.mark.skipif(shutil.which("dpkg-deb") is None, reason="dpkg-deb (Debian) is not installed")


def _picture(path: str, w: int, h: int, seed: int, flat: bool = False, alpha: bool = False) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    rng = np.random.default_rng(seed)
    img = np.full((h, w, 3), 200, np.uint8) if flat else rng.integers(0, 255, (h, w, 3), dtype=np.uint8)
    if alpha:  # a transparent overlay: decoded over white it is blank
        Image.fromarray(np.dstack([img, np.zeros((h, w), np.uint8)]), "RGBA").save(path)
    else:
        Image.fromarray(img).save(path)


def _deb(tmp_path, package: str = "test-wallpapers") -> str:
    root = tmp_path / "pkg"
    kde = root / "usr/share/wallpapers/Lake/contents"
    _picture(str(kde / "images/1280x800.jpg"), 128, 80, 1)
    _picture(str(kde / "images/3840x2160.png"), 384, 216, 2)  # the largest: the one kept
    _picture(str(kde / "images_dark/3840x2160.png"), 384, 216, 3)
    _picture(str(kde / "screenshot.jpg"), 40, 25, 4)
    _picture(str(root / "usr/share/backgrounds/test/Big.png"), 2400, 1200, 5)  # resized to --max-side
    _picture(str(root / "usr/share/backgrounds/test/Overlay.png"), 64, 64, 6, alpha=True)
    _picture(str(root / "usr/share/backgrounds/test/big_preview.png"), 64, 64, 7)
    (root / "usr/share/backgrounds/test/notes.txt").write_text("not a picture")
    doc = root / f"usr/share/doc/{package}"
    doc.mkdir(parents=True)
    (doc / "copyright").write_text(
        "Files: *\nCopyright: someone\nLicense: GPL-2+\n\nFiles: backgrounds/*\nLicense: CC-BY-SA-4.0\n"
    )
    (root / "DEBIAN").mkdir()
    (root / "DEBIAN/control").write_text(
        f"Package: {package}\nVersion: 1.2-3\nArchitecture: all\nMaintainer: x <x@example.org>\nDescription: test\n"
    )
    debs = tmp_path / "debs"
    debs.mkdir()
    deb = str(debs / f"{package}_1.2-3_all.deb")
    subprocess.run(["dpkg-deb", "--build", "--root-owner-group", str(root), deb], check=True, capture_output=True)
    return deb


def test_photos_keeps_one_picture_per_wallpaper_resized_with_its_licenses(tmp_path, capsys):
    deb = _deb(tmp_path)
    out = str(tmp_path / "cache")
    argv = ["--out", out, "--packages", "test-wallpapers", "--debs", os.path.dirname(deb), "--max-side", "1600"]
    assert photos.main(argv) == 0
    rows = sorted(pq.read_table(os.path.join(out, "photos.parquet")).to_pylist(), key=lambda r: r["source"])
    assert [r["source"] for r in rows] == [
        "/usr/share/backgrounds/test/Big.png",
        "/usr/share/wallpapers/Lake/contents/images/3840x2160.png",
    ]
    assert all(r["version"] == "1.2-3" and r["licenses"] == "GPL-2+, CC-BY-SA-4.0" for r in rows)
    big, lake = (Image.open(r["uri"]) for r in rows)
    assert big.size == (1600, 800) and (rows[0]["width"], rows[0]["height"]) == (1600, 800)
    assert lake.size == (384, 216) and os.path.basename(rows[1]["uri"]) == "Lake.jpg"
    assert open(os.path.join(out, "LICENSES", "test-wallpapers.copyright")).read().startswith("Files: *")
    assert "Overlay.png: blank" in capsys.readouterr().out

    # cached: a second run fetches nothing and lists the same photos
    os.remove(deb)
    assert photos.main(argv) == 0
    assert sorted(pq.read_table(os.path.join(out, "photos.parquet")).to_pylist(), key=lambda r: r["source"]) == rows


def test_a_missing_package_is_a_clear_error(tmp_path, capsys):
    (tmp_path / "debs").mkdir()
    argv = ["--out", str(tmp_path / "c"), "--packages", "nothing-here", "--debs", str(tmp_path / "debs")]
    assert photos.main(argv) == 2
    assert "no nothing-here_*.deb" in capsys.readouterr().err
