"""`roiqa photos`: fetch the photographs that Debian's wallpaper packages ship into a local cache, for training.

Each package is downloaded with `apt-get download` (from the machine's configured Debian mirror; nothing else is
reached) and unpacked with `dpkg-deb -x`. Of every wallpaper, one picture is kept: in a KDE-style wallpaper folder
(`<name>/contents/images/<W>x<H>.<ext>`) its largest light variant, elsewhere each image file; screenshots,
previews and blank pictures (transparent overlays, flat colours) are skipped. Each is decoded, resized to
`--max-side` on its long side and written as a JPEG under `<out>/<package>/`. `<out>/photos.parquet` lists every
photo with its package, version, source path and the package's licenses, and `<out>/LICENSES/<package>.copyright`
keeps the package's own copyright file. A package already in the cache (its copyright file present) is not
fetched again.

    roiqa photos --out .cache/photos             # mate-backgrounds and plasma-workspace-wallpapers
    roiqa train --images .cache/photos --out out/train ...
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import tempfile

from jobs.common import job_parser, run

PACKAGES = ("mate-backgrounds", "plasma-workspace-wallpapers")
PICTURES = (".jpg", ".jpeg", ".png", ".webp")
ROOTS = ("usr/share/backgrounds", "usr/share/wallpapers")
BLANK_STD = 4.0  # grey-level standard deviation under which a picture is blank (e.g. an overlay over white)
KDE_IMAGE = re.compile(r"^(\d+)x(\d+)\.\w+$")


def parser() -> argparse.ArgumentParser:
    p = job_parser("photos", __doc__)
    p.add_argument("--out", required=True, help="cache folder (local)")
    p.add_argument("--packages", default=",".join(PACKAGES), help="comma-separated Debian packages of wallpapers")
    p.add_argument("--max-side", type=int, default=1600, help="long side (pixels) of the cached JPEGs")
    p.add_argument("--debs", default=None, help="a folder of already downloaded .deb files to use instead of apt-get")
    return p


def pictures(root: str) -> list[str]:
    """The picture files to keep under an unpacked package `root`: per KDE-style wallpaper folder the largest file
    of contents/images/, elsewhere every picture; screenshots, previews and dark variants left out. Sorted."""
    keep = []
    for base in ROOTS:
        top = os.path.join(root, base)
        for folder, dirs, files in os.walk(top):
            dirs.sort()
            if os.path.basename(folder) == "images" and os.path.basename(os.path.dirname(folder)) == "contents":
                sized = [(int(m[1]) * int(m[2]), f) for f in files if (m := KDE_IMAGE.match(f))]
                if sized:
                    keep.append(os.path.join(folder, max(sized)[1]))
                continue
            if "contents" in folder.split(os.sep):  # screenshot.*, images_dark/, ... of a KDE-style wallpaper
                continue
            keep += [
                os.path.join(folder, f)
                for f in files
                if f.lower().endswith(PICTURES) and not re.search(r"screenshot|preview|thumb", f, re.I)
            ]
    return sorted(keep)


def licenses(copyright_text: str) -> list[str]:
    """The distinct `License:` values of a Debian copyright file, in order of appearance."""
    found = re.findall(r"^License:\s*(\S.*?)\s*$", copyright_text, re.M)
    return list(dict.fromkeys(found))


def deb_version(deb: str) -> str:
    out = subprocess.run(["dpkg-deb", "-f", deb, "Version"], capture_output=True, text=True, check=True)
    return out.stdout.strip()


def unpack(deb: str, package: str, out: str, max_side: int) -> list[dict]:
    """Unpack `deb`, write its pictures as JPEGs under `out`/`package`/ and its copyright file under
    `out`/LICENSES/; returns one row per photo written (pictures that do not decode are skipped, and listed)."""
    from roiqa.io.imageio import DecodeError, decode_image, encode_jpeg, resize_long_side

    version = deb_version(deb)
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(["dpkg-deb", "-x", deb, tmp], check=True)
        copyright_file = os.path.join(tmp, "usr/share/doc", package, "copyright")
        text = open(copyright_file, encoding="utf-8", errors="replace").read() if os.path.exists(copyright_file) else ""
        names = licenses(text)
        rows, used = [], set()
        os.makedirs(os.path.join(out, package), exist_ok=True)
        for path in pictures(tmp):
            rel = os.path.relpath(path, tmp)
            try:
                with open(path, "rb") as f:
                    img = decode_image(f.read(), rel)
            except DecodeError as exc:
                print(f"skipped {package}:{rel}: {exc}")
                continue
            if float(img[::8, ::8].mean(axis=2).std()) < BLANK_STD:
                print(f"skipped {package}:{rel}: blank (a transparent overlay or a flat colour, not a photograph)")
                continue
            if max(img.shape[:2]) > max_side:
                img, _ = resize_long_side(img, max_side)
            stem = re.sub(r"[^A-Za-z0-9_.-]+", "_", rel.split("/contents/")[0].split("/")[-1].rsplit(".", 1)[0])
            name, n = stem, 1
            while name in used:
                n += 1
                name = f"{stem}-{n}"
            used.add(name)
            dest = os.path.join(out, package, f"{name}.jpg")
            with open(dest, "wb") as f:
                f.write(encode_jpeg(img, quality=95))
            rows.append(
                {
                    "uri": dest,
                    "package": package,
                    "version": version,
                    "source": "/" + rel,
                    "licenses": ", ".join(names),
                    "height": int(img.shape[0]),
                    "width": int(img.shape[1]),
                }
            )
        os.makedirs(os.path.join(out, "LICENSES"), exist_ok=True)
        with open(os.path.join(out, "LICENSES", f"{package}.copyright"), "w", encoding="utf-8") as f:
            f.write(text)
    return rows


def download(package: str, folder: str) -> str:
    """`apt-get download PACKAGE` into `folder`; returns the .deb's path."""
    if shutil.which("apt-get") is None or shutil.which("dpkg-deb") is None:
        raise ValueError("roiqa photos needs apt-get and dpkg-deb (a Debian or Ubuntu machine)")
    done = subprocess.run(["apt-get", "download", package], cwd=folder, capture_output=True, text=True)
    debs = [f for f in os.listdir(folder) if f.startswith(package + "_") and f.endswith(".deb")]
    if done.returncode != 0 or not debs:
        raise ValueError(f"apt-get download {package} failed: {(done.stderr or done.stdout).strip()[-300:]}")
    return os.path.join(folder, debs[0])


def local_deb(folder: str, package: str) -> str:
    """The .deb of `package` in `folder` (``<package>_<version>_<arch>.deb``)."""
    debs = sorted(f for f in os.listdir(folder) if f.startswith(package + "_") and f.endswith(".deb"))
    if not debs:
        raise ValueError(f"{folder}: no {package}_*.deb")
    return os.path.join(folder, debs[-1])


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)

    def go() -> int:
        import pyarrow as pa

        from roiqa.index import store

        out = os.path.abspath(args.out)
        os.makedirs(out, exist_ok=True)
        table_uri = os.path.join(out, "photos.parquet")
        old = store.read_table(table_uri).to_pylist() if os.path.exists(table_uri) else []
        rows = []
        for package in [p.strip() for p in args.packages.split(",") if p.strip()]:
            if os.path.exists(os.path.join(out, "LICENSES", f"{package}.copyright")):
                kept = [r for r in old if r["package"] == package]
                rows += kept
                print(f"{package}: {len(kept)} photos already cached")
                continue
            with tempfile.TemporaryDirectory() as tmp:
                deb = local_deb(args.debs, package) if args.debs else download(package, tmp)
                new = unpack(deb, package, out, args.max_side)
            rows += new
            print(f"{package}: {len(new)} photos ({new[0]['licenses'] if new else 'none'})")
        store.write_table(pa.Table.from_pylist(rows), table_uri)
        print(f"{len(rows)} photos in {out} (list: {table_uri})")
        return 0

    return run(go, "photos")


if __name__ == "__main__":
    raise SystemExit(main())
