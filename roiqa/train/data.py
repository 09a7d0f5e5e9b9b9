"""Training data for the matcher: manifests, a COCO importer, and fixed-shape (query, positive, negative) samples.

A sample is a dict of numpy arrays with fixed shapes, so Ray Data and torch can batch them (`collate`):

- ``query``     (Q, Q, 3) uint8, Q = cfg.query_size: the query patch, long side Q, zero-padded bottom/right;
- ``query_hw``  (2,) int32: the valid (h, w) of the patch inside ``query``;
- ``image``     (S, S, 3) uint8, S = cfg.image_size: a search image that contains the instance;
- ``box``       (4,) float32: x0, y0, x1, y1 of the instance in ``image`` pixels (x1, y1 exclusive edges);
- ``negative``  (S, S, 3) uint8: a search image that does not contain the instance;
- ``instance``  int64: equal for two samples only when they show the same instance (in-batch negatives).

Samples come from two sources. `synthesize_pair` is self-supervised: a random crop of an unlabeled photo is the
query and an augmented copy of it (scaled, rotated, perspective-warped, colour-jittered, blurred, occluded, JPEG
re-encoded) is pasted into another photo. `LabeledPairs` draws two boxes of the same instance from a manifest
(`TRAIN_MANIFEST_SCHEMA`, written by hand or by `import_coco`). `sample_stream` turns either into an infinite,
deterministic per-worker iterator.
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import math
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from PIL import Image, ImageFilter

from roiqa.config import TrainConfig
from roiqa.eval.demo_data import EVAL_PHOTOS as _EVAL_PHOTOS
from roiqa.eval.demo_data import TRAINING_PHOTOS, load_photo
from roiqa.io import uri as uri_mod
from roiqa.io.imageio import decode_image, encode_png, pad_to_square, resize_long_side
from roiqa.schema import BOX, URI, X0, X1, Y0, Y1, check_columns

# --- sample keys ----------------------------------------------------------------------------------------------
QUERY, QUERY_HW, IMAGE, TARGET_BOX, NEGATIVE, INSTANCE = "query", "query_hw", "image", "box", "negative", "instance"
SAMPLE_KEYS: tuple[str, ...] = (QUERY, QUERY_HW, IMAGE, TARGET_BOX, NEGATIVE, INSTANCE)

# --- manifest -------------------------------------------------------------------------------------------------
INSTANCE_ID = "instance_id"  # string: rows with equal instance_id show the same object instance
TRAIN_MANIFEST_SCHEMA = pa.schema(
    [
        pa.field(URI, pa.string(), nullable=False),
        pa.field(INSTANCE_ID, pa.string(), nullable=False),
        pa.field(X0, pa.float32(), nullable=False),
        pa.field(Y0, pa.float32(), nullable=False),
        pa.field(X1, pa.float32(), nullable=False),
        pa.field(Y1, pa.float32(), nullable=False),
    ]
)

# --- photographs shipped inside scikit-image ------------------------------------------------------------------
# Training photographs (skimage.data names, loaded with roiqa.eval.demo_data.load_photo, never downloaded), kept
# disjoint from the evaluation photographs; both lists live in roiqa.eval.demo_data, which checks the disjointness.
TRAIN_PHOTOS: tuple[str, ...] = TRAINING_PHOTOS
EVAL_PHOTOS: tuple[str, ...] = _EVAL_PHOTOS

MIN_PHOTO_SIDE = 64  # synthesize_pair needs photos at least this large (room for a crop and a disjoint region)
_MAX_CROP_FRACTION = 0.6  # a query crop's side is at most this fraction of its photo's side
_CROP_AREA = (0.01, 0.25)  # query crop area as a fraction of its photo's area (log-uniform)
_MIN_CROP_SIDE = 16
_MIN_CROP_STD = 12.0  # grey-level standard deviation below which a crop is redrawn (flat sky, blank paper)
_JPEG_QUALITY = (40, 95)
_BLUR_RADIUS = (0.5, 1.5)


def instance_hash(key: str) -> int:
    """A stable non-negative int64 from a string: the first 8 bytes of BLAKE2b, top bit cleared (as roiqa.io.ids)."""
    digest = hashlib.blake2b(key.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "little") & 0x7FFF_FFFF_FFFF_FFFF


# =============================================================================================================
# Manifest
# =============================================================================================================


def validate_manifest(table: pa.Table, name: str) -> pa.Table:
    """`table` cast to TRAIN_MANIFEST_SCHEMA after checking it; ValueError naming `name` and the bad row otherwise.

    Checks: required columns present and castable, no nulls, at least one row, finite boxes with x0 < x1 and
    y0 < y1, and at least one instance with two or more rows (a query and its positive are different rows).
    """
    if not isinstance(table, pa.Table):
        raise ValueError(f"{name}: expected a pyarrow Table, got {type(table).__name__}")
    table = check_columns(table, TRAIN_MANIFEST_SCHEMA, name)
    if table.num_rows == 0:
        raise ValueError(f"{name}: the manifest has no rows")
    for col in TRAIN_MANIFEST_SCHEMA.names:
        nulls = table.column(col).null_count
        if nulls:
            row = int(np.flatnonzero(table.column(col).is_null().to_numpy(zero_copy_only=False))[0])
            raise ValueError(f"{name}: column {col!r} has {nulls} null value(s), first at row {row}")
    boxes = np.stack([table.column(c).to_numpy() for c in BOX], axis=1).astype(np.float64)
    bad = ~np.isfinite(boxes).all(axis=1) | (boxes[:, 0] >= boxes[:, 2]) | (boxes[:, 1] >= boxes[:, 3])
    if bad.any():
        row = int(np.flatnonzero(bad)[0])
        raise ValueError(
            f"{name}: row {row} ({table.column(URI)[row].as_py()!r}, instance "
            f"{table.column(INSTANCE_ID)[row].as_py()!r}) has box {boxes[row].tolist()}; "
            f"need finite x0 < x1 and y0 < y1 ({int(bad.sum())} bad row(s) in all)"
        )
    counts = table.column(INSTANCE_ID).value_counts()
    if int(pc.max(counts.field("counts")).as_py()) < 2:
        raise ValueError(
            f"{name}: no instance_id has two or more rows; a query and its positive must come from different "
            f"rows (images or boxes) of the same instance"
        )
    return table


def read_manifest(uri: str) -> pa.Table:
    """Read and validate a Parquet training manifest (TRAIN_MANIFEST_SCHEMA); errors name `uri` and the bad row."""
    try:
        data = uri_mod.read_bytes(uri)
    except FileNotFoundError as exc:
        raise FileNotFoundError(f"{uri}: training manifest not found") from exc
    try:
        table = pq.read_table(pa.BufferReader(data))
    except (pa.ArrowInvalid, OSError) as exc:
        raise ValueError(f"{uri}: not a readable Parquet manifest: {exc}") from exc
    return validate_manifest(table, uri)


def _write_parquet(table: pa.Table, out_uri: str) -> None:
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    uri_mod.write_atomic(out_uri, sink.getvalue().to_pybytes())


def import_coco(json_uri: str, images_root: str, out_uri: str, identity: str = "instance") -> pa.Table:
    """Convert a COCO-style JSON into a training manifest written as Parquet to `out_uri`; returns the table.

    Reads ``images`` (``id``, ``file_name``) and ``annotations`` (``id``, ``image_id``, ``bbox`` = [x, y, w, h]).
    An annotation's identity is its ``instance_id`` key, else its ``track_id`` key (identity="instance"), or its
    ``category_id`` (identity="category"); a missing key is a ValueError naming the JSON and the annotation id.
    Crowd annotations (``iscrowd`` true) and boxes with zero width or height are skipped silently. Image URIs are
    `images_root` joined with ``file_name``. The result must pass `validate_manifest` before anything is written.
    """
    if identity not in ("instance", "category"):
        raise ValueError(f"import_coco: identity must be 'instance' or 'category', got {identity!r}")
    try:
        doc = json.loads(uri_mod.read_bytes(json_uri).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{json_uri}: not a readable JSON document: {exc}") from exc
    if (
        not isinstance(doc, dict)
        or not isinstance(doc.get("images"), list)
        or not isinstance(doc.get("annotations"), list)
    ):
        raise ValueError(f"{json_uri}: expected a COCO object with 'images' and 'annotations' lists")

    files: dict[Any, str] = {}
    for i, img in enumerate(doc["images"]):
        if not isinstance(img, dict) or "id" not in img or not isinstance(img.get("file_name"), str):
            raise ValueError(f"{json_uri}: images[{i}] needs an 'id' and a string 'file_name', got {img!r}")
        if img["id"] in files:
            raise ValueError(f"{json_uri}: images[{i}] repeats image id {img['id']!r}")
        files[img["id"]] = img["file_name"]

    keys = ("instance_id", "track_id") if identity == "instance" else ("category_id",)
    cols: dict[str, list] = {c: [] for c in TRAIN_MANIFEST_SCHEMA.names}
    for i, ann in enumerate(doc["annotations"]):
        ann_id = ann.get("id", f"#{i}") if isinstance(ann, dict) else f"#{i}"
        where = f"{json_uri}: annotation {ann_id!r}"
        if not isinstance(ann, dict):
            raise ValueError(f"{where}: expected an object, got {type(ann).__name__}")
        if ann.get("iscrowd"):
            continue
        bbox = ann.get("bbox")
        if not (isinstance(bbox, list) and len(bbox) == 4 and all(isinstance(v, (int, float)) for v in bbox)):
            raise ValueError(f"{where}: 'bbox' must be [x, y, w, h] numbers, got {bbox!r}")
        x, y, w, h = (float(v) for v in bbox)
        if not all(math.isfinite(v) for v in (x, y, w, h)):
            raise ValueError(f"{where}: 'bbox' has a non-finite value {bbox!r}")
        if w <= 0 or h <= 0:
            continue
        if ann.get("image_id") not in files:
            raise ValueError(f"{where}: image_id {ann.get('image_id')!r} is not in 'images'")
        key = next((k for k in keys if ann.get(k) is not None), None)
        if key is None:
            raise ValueError(f"{where}: has no {' or '.join(repr(k) for k in keys)} key (identity={identity!r})")
        cols[URI].append(uri_mod.join(images_root, files[ann["image_id"]]))
        cols[INSTANCE_ID].append(str(ann[key]))
        for col, value in zip(BOX, (x, y, x + w, y + h)):
            cols[col].append(value)
    table = validate_manifest(pa.table(cols, schema=TRAIN_MANIFEST_SCHEMA), json_uri)
    _write_parquet(table, out_uri)
    return table


# =============================================================================================================
# Image helpers
# =============================================================================================================


def _resize(img: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
    """PIL bilinear resize (antialiased when shrinking) to (h, w)."""
    if img.shape[:2] == tuple(hw):
        return np.ascontiguousarray(img)
    pil = Image.fromarray(np.ascontiguousarray(img))
    return np.asarray(pil.resize((hw[1], hw[0]), Image.Resampling.BILINEAR))


def _square_background(photo: np.ndarray, size: int, rng: np.random.Generator, min_frac: float = 0.4) -> np.ndarray:
    """A random square crop of `photo` (side a fraction in [min_frac, 1] of its short side), resized, flipped."""
    ph, pw = photo.shape[:2]
    side = max(1, round(min(ph, pw) * rng.uniform(min_frac, 1.0)))
    y, x = int(rng.integers(0, ph - side + 1)), int(rng.integers(0, pw - side + 1))
    out = _resize(photo[y : y + side, x : x + side], (size, size))
    if rng.random() < 0.5:
        out = out[:, ::-1]
    if rng.random() < 0.5:
        out = out[::-1]
    return out


def _color_jitter(img: np.ndarray, amount: float, rng: np.random.Generator) -> np.ndarray:
    """uint8 image with brightness, contrast and saturation gains drawn in [1 - amount, 1 + amount]."""
    if amount <= 0:
        return img
    b, c, s = rng.uniform(1 - amount, 1 + amount, size=3).astype(np.float32)
    x = img.astype(np.float32) * b
    mean = x.mean(dtype=np.float32)
    x = (x - mean) * c + mean
    grey = x @ np.array([0.299, 0.587, 0.114], np.float32)
    x = grey[..., None] + s * (x - grey[..., None])
    return np.clip(x + 0.5, 0, 255).astype(np.uint8)


def _jpeg(img: np.ndarray, quality: int) -> np.ndarray:
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="JPEG", quality=int(quality))
    buf.seek(0)
    return np.asarray(Image.open(buf).convert("RGB"))


def _query_patch(crop: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """(query (size, size, 3) uint8 zero-padded, query_hw (2,) int32) from a crop of any size."""
    patch, _ = resize_long_side(np.ascontiguousarray(crop), size)
    return pad_to_square(patch, size), np.array(patch.shape[:2], np.int32)


def _perspective_coeffs(dst: np.ndarray, src: np.ndarray) -> tuple[float, ...]:
    """PIL PERSPECTIVE data mapping output points `dst` (4, 2) to input points `src` (4, 2)."""
    a = np.zeros((8, 8))
    b = np.zeros(8)
    for i, ((x_out, y_out), (x_in, y_in)) in enumerate(zip(dst, src)):
        a[2 * i] = [x_out, y_out, 1, 0, 0, 0, -x_out * x_in, -y_out * x_in]
        a[2 * i + 1] = [0, 0, 0, x_out, y_out, 1, -x_out * y_in, -y_out * y_in]
        b[2 * i], b[2 * i + 1] = x_in, y_in
    return tuple(float(v) for v in np.linalg.solve(a, b))


def warp_object(
    patch: np.ndarray, angle_deg: float = 0.0, corner_shift: np.ndarray | None = None, max_side: int | None = None
) -> np.ndarray:
    """(H', W', 4) uint8 RGBA of `patch` rotated by `angle_deg` (counter-clockwise) and perspective-warped.

    `corner_shift` (4, 2) moves the corners (top-left, top-right, bottom-right, bottom-left) by fractions of the
    patch's width (x) and height (y) after rotation. The result is the warped object's bounding canvas: alpha is
    255 inside, 0 outside and antialiased along the edges; with no rotation and no shift it is `patch` exactly,
    alpha 255. When the canvas would exceed `max_side`, the warp is scaled down about its centre to fit.
    """
    if not isinstance(patch, np.ndarray) or patch.ndim != 3 or patch.shape[2] != 3 or patch.dtype != np.uint8:
        got = f"{patch.dtype} {patch.shape}" if isinstance(patch, np.ndarray) else type(patch).__name__
        raise ValueError(f"warp_object: expected an (h, w, 3) uint8 patch, got {got}")
    h, w = patch.shape[:2]
    corners = np.array([[0, 0], [w, 0], [w, h], [0, h]], np.float64)
    d = corners - [w / 2, h / 2]
    t = math.radians(angle_deg)
    cos, sin = math.cos(t), math.sin(t)
    dst = np.stack([d[:, 0] * cos + d[:, 1] * sin, -d[:, 0] * sin + d[:, 1] * cos], axis=1)
    if corner_shift is not None:
        dst = dst + np.asarray(corner_shift, np.float64).reshape(4, 2) * [w, h]
    extent = float((dst.max(axis=0) - dst.min(axis=0)).max())
    if max_side is not None and extent > max_side:
        dst = dst * (max_side / extent)
    dst = dst - dst.min(axis=0)
    out_w, out_h = (max(1, math.ceil(v - 1e-6)) for v in dst.max(axis=0))
    # One pixel of transparent border (edge colour) so bilinear sampling antialiases the object's outline.
    rgba = np.empty((h + 2, w + 2, 4), np.uint8)
    rgba[..., :3] = np.pad(patch, ((1, 1), (1, 1), (0, 0)), mode="edge")
    rgba[..., 3] = 0
    rgba[1:-1, 1:-1, 3] = 255
    coeffs = _perspective_coeffs(dst, corners + 1.0)
    warped = Image.fromarray(rgba).transform(
        (out_w, out_h), Image.Transform.PERSPECTIVE, coeffs, Image.Resampling.BILINEAR, fillcolor=(0, 0, 0, 0)
    )
    return np.asarray(warped)


# =============================================================================================================
# Self-supervised pairs
# =============================================================================================================


@functools.lru_cache(maxsize=64)
def check_train_config(cfg: TrainConfig) -> TrainConfig:
    """`cfg` if its sampling and augmentation fields are usable, else ValueError naming the field."""
    if not isinstance(cfg, TrainConfig):
        raise ValueError(f"expected a TrainConfig, got {type(cfg).__name__}")
    lo, hi = cfg.object_scale
    checks = [
        (cfg.query_size >= 8, "train.query_size", "must be >= 8"),
        (cfg.image_size >= 32, "train.image_size", "must be >= 32"),
        (8 <= lo <= hi, "train.object_scale", "must be (lo, hi) with 8 <= lo <= hi"),
        (hi * math.sqrt(2) <= cfg.image_size, "train.object_scale", "rotated by 45 degrees must fit in image_size"),
        (0 <= cfg.max_rotation_deg <= 180, "train.max_rotation_deg", "must be in [0, 180]"),
        (0 <= cfg.perspective <= 0.25, "train.perspective", "must be in [0, 0.25]"),
        (0 <= cfg.color_jitter < 1, "train.color_jitter", "must be in [0, 1)"),
        (0 <= cfg.max_occlusion < 1, "train.max_occlusion", "must be in [0, 1)"),
    ]
    checks += [
        (0 <= getattr(cfg, f) <= 1, f"train.{f}", "is a probability: must be in [0, 1]")
        for f in ("blur_prob", "jpeg_prob", "occlusion_prob")
    ]
    for ok, field, why in checks:
        if not ok:
            raise ValueError(f"{field} {why}; got {getattr(cfg, field.split('.')[1])!r}")
    return cfg


def _check_photos(photos: Sequence[np.ndarray]) -> None:
    if isinstance(photos, (str, bytes, np.ndarray)) or not isinstance(photos, Sequence) or len(photos) == 0:
        raise ValueError(f"photos: expected a non-empty list of (H, W, 3) uint8 arrays, got {type(photos).__name__}")
    for i, p in enumerate(photos):
        if not isinstance(p, np.ndarray) or p.ndim != 3 or p.shape[2] != 3 or p.dtype != np.uint8:
            got = f"{p.dtype} {p.shape}" if isinstance(p, np.ndarray) else type(p).__name__
            raise ValueError(f"photos[{i}]: expected an (H, W, 3) uint8 array, got {got}")
        if min(p.shape[:2]) < MIN_PHOTO_SIDE:
            raise ValueError(f"photos[{i}]: {p.shape[1]}x{p.shape[0]} (W x H) is smaller than {MIN_PHOTO_SIDE} px")


def _sample_crop(photo: np.ndarray, rng: np.random.Generator) -> tuple[int, int, int, int]:
    """A random query crop box (x0, y0, x1, y1): aspect 0.5-2, area 1-25% of the photo, not a flat region."""
    ph, pw = photo.shape[:2]
    best, best_std = (0, 0, 1, 1), -1.0
    for _ in range(8):
        area = math.exp(rng.uniform(*np.log(_CROP_AREA))) * ph * pw
        aspect = math.exp(rng.uniform(math.log(0.5), math.log(2.0)))  # width / height
        cw = int(np.clip(round(math.sqrt(area * aspect)), _MIN_CROP_SIDE, int(_MAX_CROP_FRACTION * pw)))
        ch = int(np.clip(round(math.sqrt(area / aspect)), _MIN_CROP_SIDE, int(_MAX_CROP_FRACTION * ph)))
        x, y = int(rng.integers(0, pw - cw + 1)), int(rng.integers(0, ph - ch + 1))
        std = float(photo[y : y + ch : 2, x : x + cw : 2].std())
        if std > best_std:
            best, best_std = (x, y, x + cw, y + ch), std
        if std >= _MIN_CROP_STD:
            break
    return best


def _outside(photo: np.ndarray, box: tuple[int, int, int, int], rng: np.random.Generator) -> np.ndarray:
    """A view of `photo` that does not overlap `box`: one of the strips left/right/above/below it (by area)."""
    ph, pw = photo.shape[:2]
    x0, y0, x1, y1 = box
    strips = [(0, 0, x0, ph), (x1, 0, pw, ph), (0, 0, pw, y0), (0, y1, pw, ph)]
    strips = [s for s in strips if min(s[2] - s[0], s[3] - s[1]) >= 8]
    if not strips:  # cannot happen for crops from _sample_crop on photos >= MIN_PHOTO_SIDE
        raise ValueError(f"no region of a {pw}x{ph} photo outside crop {box} is at least 8 px wide")
    areas = np.array([(s[2] - s[0]) * (s[3] - s[1]) for s in strips], np.float64)
    sx0, sy0, sx1, sy1 = strips[int(rng.choice(len(strips), p=areas / areas.sum()))]
    return photo[sy0:sy1, sx0:sx1]


def _foreign(
    photos: Sequence[np.ndarray],
    src: int,
    crop: tuple[int, int, int, int],
    rng: np.random.Generator,
    other_photo: bool,
) -> np.ndarray:
    """Image content without the query crop: another photo, or a region of the source photo outside the crop.

    `other_photo`: use a different photo whenever there is one; otherwise every photo is equally likely.
    """
    n = len(photos)
    if other_photo and n > 1:
        j = int(rng.integers(n - 1))
        j += j >= src
    else:
        j = int(rng.integers(n))
    return photos[j] if j != src else _outside(photos[src], crop, rng)


def _random_crop(region: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A random crop of `region` with the query crops' size and aspect distribution (for distractor objects)."""
    if min(region.shape[:2]) * _MAX_CROP_FRACTION < _MIN_CROP_SIDE:
        return region  # a narrow strip beside the query crop: use all of it
    x0, y0, x1, y1 = _sample_crop(region, rng)
    return region[y0:y1, x0:x1]


def _paste(
    canvas: np.ndarray,
    obj: np.ndarray,
    cfg: TrainConfig,
    rng: np.random.Generator,
    occluders: Any,
) -> tuple[float, float, float, float]:
    """Paste an augmented copy of `obj` into float32 `canvas` in place; returns its tight box (alpha >= 0.5).

    `occluders()` returns an image region to cut an occluder from.
    """
    size = canvas.shape[0]
    oh, ow = obj.shape[:2]
    s = rng.uniform(*cfg.object_scale) / max(oh, ow)
    patch = _resize(obj, (max(1, round(oh * s)), max(1, round(ow * s))))
    patch = _color_jitter(patch, cfg.color_jitter, rng)
    if rng.random() < cfg.blur_prob:
        radius = float(rng.uniform(*_BLUR_RADIUS))
        patch = np.asarray(Image.fromarray(patch).filter(ImageFilter.GaussianBlur(radius)))
    angle = float(rng.uniform(-cfg.max_rotation_deg, cfg.max_rotation_deg)) if cfg.max_rotation_deg > 0 else 0.0
    shift = rng.uniform(-cfg.perspective, cfg.perspective, size=(4, 2)) if cfg.perspective > 0 else None
    rgba = warp_object(patch, angle, shift, max_side=size - 2)
    h, w = rgba.shape[:2]
    x, y = int(rng.integers(0, size - w + 1)), int(rng.integers(0, size - h + 1))
    alpha = rgba[..., 3].astype(np.float32) * np.float32(1 / 255)
    region = canvas[y : y + h, x : x + w]
    region += alpha[..., None] * (rgba[..., :3].astype(np.float32) - region)
    rows, cols = np.flatnonzero((rgba[..., 3] >= 128).any(axis=1)), np.flatnonzero((rgba[..., 3] >= 128).any(axis=0))
    if rows.size == 0:  # a sliver thinner than half a pixel: keep the whole canvas box
        rows, cols = np.array([0, h - 1]), np.array([0, w - 1])
    bx0, by0, bx1, by1 = x + int(cols[0]), y + int(rows[0]), x + int(cols[-1]) + 1, y + int(rows[-1]) + 1
    if cfg.max_occlusion > 0 and rng.random() < cfg.occlusion_prob:
        bw, bh = bx1 - bx0, by1 - by0
        frac = rng.uniform(0, cfg.max_occlusion)
        aspect = math.exp(rng.uniform(-0.7, 0.7))
        occ_h = min(bh, max(1, round(bh * math.sqrt(frac) * aspect)))
        occ_w = min(bw, max(1, int(bh * bw * frac / occ_h)))  # floor: covered fraction <= max_occlusion
        src = occluders()
        if src.shape[0] < occ_h or src.shape[1] < occ_w:
            src = _resize(src, (max(occ_h, src.shape[0]), max(occ_w, src.shape[1])))
        sy, sx = int(rng.integers(0, src.shape[0] - occ_h + 1)), int(rng.integers(0, src.shape[1] - occ_w + 1))
        oy, ox = by0 + int(rng.integers(0, bh - occ_h + 1)), bx0 + int(rng.integers(0, bw - occ_w + 1))
        canvas[oy : oy + occ_h, ox : ox + occ_w] = src[sy : sy + occ_h, sx : sx + occ_w]
    return float(bx0), float(by0), float(bx1), float(by1)


def _finish(canvas: np.ndarray, cfg: TrainConfig, rng: np.random.Generator) -> np.ndarray:
    """float32 canvas -> uint8, JPEG re-encoded with probability cfg.jpeg_prob."""
    img = np.clip(canvas + 0.5, 0, 255).astype(np.uint8)
    if rng.random() < cfg.jpeg_prob:
        img = _jpeg(img, int(rng.integers(_JPEG_QUALITY[0], _JPEG_QUALITY[1] + 1)))
    return img


def synthesize_pair(photos: Sequence[np.ndarray], cfg: TrainConfig, rng: np.random.Generator) -> dict:
    """One self-supervised sample (see the module docstring) from unlabeled photos; deterministic given `rng`.

    The query is a random crop of a random photo (aspect 0.5-2, 1-25% of its area, flat crops redrawn). The
    positive is a square crop of another photo (of a region of the same photo not overlapping the query crop when
    there is only one) with an augmented copy of the query pasted in: long side in cfg.object_scale, rotation,
    perspective warp, colour jitter, blur, occluder, JPEG as configured; `box` is the tight box of the pasted
    copy's alpha >= 0.5 (occluders do not shrink it). The negative is made the same way from content that never
    overlaps the query crop, with a distractor crop pasted in instead of the query, so that paste artefacts do
    not tell positives from negatives. `instance` hashes (photo index, crop box).
    """
    check_train_config(cfg)
    _check_photos(photos)
    size = cfg.image_size
    src = int(rng.integers(len(photos)))
    crop_box = _sample_crop(photos[src], rng)
    x0, y0, x1, y1 = crop_box
    crop = photos[src][y0:y1, x0:x1]
    query, query_hw = _query_patch(crop, cfg.query_size)

    def occluders() -> np.ndarray:
        return _foreign(photos, src, crop_box, rng, other_photo=True)

    canvas = _square_background(_foreign(photos, src, crop_box, rng, other_photo=True), size, rng).astype(np.float32)
    box = _paste(canvas, crop, cfg, rng, occluders)
    image = _finish(canvas, cfg, rng)

    neg = _square_background(_foreign(photos, src, crop_box, rng, other_photo=False), size, rng).astype(np.float32)
    _paste(neg, _random_crop(_foreign(photos, src, crop_box, rng, other_photo=False), rng), cfg, rng, occluders)
    negative = _finish(neg, cfg, rng)

    return {
        QUERY: query,
        QUERY_HW: query_hw,
        IMAGE: image,
        TARGET_BOX: np.array(box, np.float32),
        NEGATIVE: negative,
        INSTANCE: np.int64(instance_hash(f"photo:{src}:{x0},{y0},{x1},{y1}")),
    }


# =============================================================================================================
# Labeled pairs
# =============================================================================================================


class LabeledPairs:
    """Samples from a training manifest: two rows of one instance (query crop, positive image) and a negative.

    The query is the first row's box cut from its image (colour-jittered by cfg.color_jitter); the positive is the
    second row's whole image resized so its long side is cfg.image_size and zero-padded, with the box mapped by
    the same scale; the negative is the whole image of a row whose URI holds no row of this instance, resized and
    padded alike (it may show other instances). Decoded images are kept in a small LRU cache (not pickled).
    """

    def __init__(self, manifest: pa.Table, cfg: TrainConfig, max_pixels: int, cache_size: int = 16):
        """Validate `manifest` (TRAIN_MANIFEST_SCHEMA) and index its instances; images are decoded lazily."""
        check_train_config(cfg)
        if int(max_pixels) != max_pixels or max_pixels < 1:
            raise ValueError(f"LabeledPairs: max_pixels must be a positive integer, got {max_pixels!r}")
        table = validate_manifest(manifest, "LabeledPairs manifest")
        self.cfg = cfg
        self.max_pixels = int(max_pixels)
        self.cache_size = max(1, int(cache_size))
        self.uris: list[str] = table.column(URI).to_pylist()
        self.ids: list[str] = table.column(INSTANCE_ID).to_pylist()
        self.boxes = np.stack([table.column(c).to_numpy() for c in BOX], axis=1).astype(np.float64)
        groups: dict[str, list[int]] = {}
        for row, inst in enumerate(self.ids):
            groups.setdefault(inst, []).append(row)
        if len(groups) < 2:
            raise ValueError(f"LabeledPairs manifest: needs two or more instances for negatives, has {list(groups)}")
        self.rows = {inst: np.array(rows, np.int64) for inst, rows in groups.items()}
        self.instances = [inst for inst, rows in groups.items() if len(rows) >= 2]  # table order: deterministic
        self.uris_of = {inst: frozenset(self.uris[r] for r in rows) for inst, rows in groups.items()}
        self.hashes = {inst: instance_hash(inst) for inst in self.instances}
        self._cache: OrderedDict[str, np.ndarray] = OrderedDict()

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_cache"] = OrderedDict()  # decoded images stay in the process that decoded them
        return state

    def __len__(self) -> int:
        return len(self.uris)

    def _image(self, uri: str) -> np.ndarray:
        img = self._cache.get(uri)
        if img is not None:
            self._cache.move_to_end(uri)
            return img
        img = decode_image(uri_mod.read_bytes(uri), uri, max_pixels=self.max_pixels)
        self._cache[uri] = img
        while len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)
        return img

    def _negative_row(self, inst: str, rng: np.random.Generator) -> int:
        excluded = self.uris_of[inst]
        for _ in range(64):
            row = int(rng.integers(len(self.uris)))
            if self.uris[row] not in excluded:
                return row
        candidates = [r for r, u in enumerate(self.uris) if u not in excluded]
        if not candidates:
            raise ValueError(f"LabeledPairs manifest: every image holds instance {inst!r}; no negative image exists")
        return candidates[int(rng.integers(len(candidates)))]

    def _search_image(self, row: int) -> tuple[np.ndarray, float, tuple[int, int]]:
        img = self._image(self.uris[row])
        resized, scale = resize_long_side(img, self.cfg.image_size)
        return pad_to_square(resized, self.cfg.image_size), scale, resized.shape[:2]

    def sample(self, rng: np.random.Generator) -> dict:
        """One sample (see the module docstring); deterministic given `rng` and the manifest."""
        inst = self.instances[int(rng.integers(len(self.instances)))]
        q_row, p_row = (int(r) for r in rng.choice(self.rows[inst], size=2, replace=False))
        n_row = self._negative_row(inst, rng)

        img = self._image(self.uris[q_row])
        h, w = img.shape[:2]
        bx0, by0, bx1, by1 = self.boxes[q_row]
        x0, y0 = max(0, math.floor(bx0)), max(0, math.floor(by0))
        x1, y1 = min(w, math.ceil(bx1)), min(h, math.ceil(by1))
        if x1 <= x0 or y1 <= y0:
            raise ValueError(
                f"{self.uris[q_row]}: manifest row {q_row} box {self.boxes[q_row].tolist()} lies outside the "
                f"{w}x{h} (W x H) image"
            )
        crop = _color_jitter(np.ascontiguousarray(img[y0:y1, x0:x1]), self.cfg.color_jitter, rng)
        query, query_hw = _query_patch(crop, self.cfg.query_size)

        image, scale, (vh, vw) = self._search_image(p_row)
        box = np.clip(self.boxes[p_row] * scale, 0, [vw, vh, vw, vh]).astype(np.float32)
        negative, _, _ = self._search_image(n_row)
        return {
            QUERY: query,
            QUERY_HW: query_hw,
            IMAGE: image,
            TARGET_BOX: box,
            NEGATIVE: negative,
            INSTANCE: np.int64(self.hashes[inst]),
        }


# =============================================================================================================
# Photos, streams and batches
# =============================================================================================================


def load_photos(uri_or_folder: str, max_pixels: int, max_side: int = 1024) -> list[np.ndarray]:
    """Decode every image file (by extension) under a folder/prefix, or one file, long side cut to `max_side`.

    Files without an image extension are ignored; an image file that does not decode raises ValueError naming it
    (roiqa.io.imageio.DecodeError); a folder without image files raises ValueError naming the folder.
    """
    if int(max_side) != max_side or max_side < 1:
        raise ValueError(f"load_photos: max_side must be a positive integer, got {max_side!r}")
    files = uri_mod.list_files(uri_or_folder, uri_mod.IMAGE_EXTENSIONS)
    if not files:
        raise ValueError(f"{uri_or_folder}: no image files ({', '.join(uri_mod.IMAGE_EXTENSIONS)}) found")
    photos = []
    for f in files:
        img = decode_image(uri_mod.read_bytes(f), f, max_pixels=max_pixels)
        if max(img.shape[:2]) > max_side:
            img, _ = resize_long_side(img, int(max_side))
        photos.append(img)
    return photos


BUNDLED = "bundled"  # a photo source naming TRAIN_PHOTOS, the training photographs shipped inside scikit-image


def photo_sources(spec: str) -> list[str]:
    """The sources of a comma-separated photo spec ("bundled,.cache/photos"): 'bundled' or a normalised URI each."""
    parts = [x.strip() for x in str(spec).split(",") if x.strip()]
    if not parts:
        raise ValueError(f"photos: no source in {spec!r} (give 'bundled' and/or folders / prefixes, comma-separated)")
    return [x if x == BUNDLED else uri_mod.normalize(x) for x in parts]


def load_photo_sources(spec: str, max_pixels: int, max_side: int = 1024) -> list[np.ndarray]:
    """Every photograph of a comma-separated spec, in order: 'bundled' gives TRAIN_PHOTOS, anything else is a
    folder / prefix read by `load_photos` (long side cut to `max_side`)."""
    photos: list[np.ndarray] = []
    for source in photo_sources(spec):
        if source == BUNDLED:
            photos += [load_photo(name) for name in TRAIN_PHOTOS]
        else:
            photos += load_photos(source, max_pixels, max_side)
    return photos


def write_train_photos(out_dir: str) -> list[str]:
    """Write each TRAIN_PHOTOS photograph as `<name>.png` under `out_dir`; returns the URIs written.

    stereo_motorcycle is written as its left view only: the right view shows the same scene, which would put
    the query's object into "negative" and background images of self-supervised pairs.
    """
    out = []
    for name in TRAIN_PHOTOS:
        target = uri_mod.join(out_dir, f"{name}.png")
        uri_mod.write_atomic(target, encode_png(load_photo(name), compress_level=1))
        out.append(target)
    return out


def sample_stream(
    source: Sequence[np.ndarray] | LabeledPairs, cfg: TrainConfig, seed: int, worker: int = 0
) -> Iterator[dict]:
    """Infinite iterator of samples from photos (`synthesize_pair`) or a LabeledPairs (`sample`).

    The random stream of (seed, worker) is SeedSequence(seed).spawn(...)[worker]: the same arguments give the same
    samples, and different workers draw independent streams.
    """
    for name, value in (("seed", seed), ("worker", worker)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
            raise ValueError(f"sample_stream: {name} must be a non-negative integer, got {value!r}")
    check_train_config(cfg)
    if isinstance(source, LabeledPairs):
        draw = source.sample
    else:
        _check_photos(source)
        photos = list(source)

        def draw(rng: np.random.Generator) -> dict:
            return synthesize_pair(photos, cfg, rng)

    return _stream(draw, np.random.default_rng(np.random.SeedSequence(int(seed), spawn_key=(int(worker),))))


def _stream(draw: Any, rng: np.random.Generator) -> Iterator[dict]:
    while True:
        yield draw(rng)


def collate(samples: list[dict]) -> dict[str, np.ndarray]:
    """Stack a list of samples into a batch: every key gets a leading batch axis; shapes must agree."""
    if not samples:
        raise ValueError("collate: got an empty list of samples")
    keys = list(samples[0])
    out = {}
    for i, s in enumerate(samples):
        if list(s) != keys:
            raise ValueError(f"collate: sample {i} has keys {sorted(s)}, sample 0 has {sorted(keys)}")
    for k in keys:
        arrays = [np.asarray(s[k]) for s in samples]
        for i, a in enumerate(arrays):
            if a.shape != arrays[0].shape or a.dtype != arrays[0].dtype:
                raise ValueError(
                    f"collate: {k!r} of sample {i} is {a.dtype} {a.shape}, sample 0 has {arrays[0].dtype} "
                    f"{arrays[0].shape}"
                )
        out[k] = np.stack(arrays)
    return out
