"""Demo collection: object crops from real skimage.data photographs pasted into other photographs, with known boxes."""

from __future__ import annotations

import dataclasses
import functools
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from roiqa.schema import (
    DEMO_GROUND_TRUTH_SCHEMA,
    QUERIES_SCHEMA,
    QUERY_ID,
    URI,
    X0,
    X1,
    Y0,
    Y1,
)

# skimage.data function -> the files it reads, all shipped inside the installed package (no pooch download).
# Only these functions are ever called, after checking that the files exist in skimage.data's own directory.
_SHIPPED_FILES: dict[str, tuple[str, ...]] = {
    "astronaut": ("astronaut.png",),
    "brick": ("brick.png",),
    "camera": ("camera.png",),
    "cell": ("cell.png",),
    "chelsea": ("chelsea.png",),
    "clock": ("clock_motion.png",),
    "coffee": ("coffee.png",),
    "coins": ("coins.png",),
    "grass": ("grass.png",),
    "gravel": ("gravel.png",),
    "horse": ("horse.png",),
    "hubble_deep_field": ("hubble_deep_field.jpg",),
    "immunohistochemistry": ("ihc.png",),
    "microaneurysms": ("microaneurysms.png",),
    "moon": ("moon.png",),
    "page": ("page.png",),
    "retina": ("retina.jpg",),
    "rocket": ("rocket.jpg",),
    "stereo_motorcycle": ("motorcycle_left.png", "motorcycle_right.png", "motorcycle_disp.npz"),
    "text": ("text.png",),
}

# name -> (skimage.data function, crop box x0, y0, x1, y1 in that photo); boxes picked by eye, tight on the object.
OBJECTS: dict[str, tuple[str, tuple[int, int, int, int]]] = {
    "astronaut_face": ("astronaut", (150, 14, 304, 186)),
    "mission_patch": ("astronaut", (134, 348, 210, 427)),
    "coffee_cup": ("coffee", (170, 10, 428, 305)),
    "cat_face": ("chelsea", (70, 20, 400, 290)),
    "rocket": ("rocket", (286, 122, 354, 410)),
    "cameraman": ("camera", (150, 60, 335, 255)),
    "coin": ("coins", (304, 14, 364, 74)),
    "motorcycle": ("stereo_motorcycle", (88, 92, 692, 456)),
}
# Photos that contain none of the objects (cell and clock are left out: their round blobs look like a coin).
BACKGROUNDS: tuple[str, ...] = (
    "brick",
    "grass",
    "gravel",
    "moon",
    "hubble_deep_field",
    "retina",
    "immunohistochemistry",
    "page",
    "text",
)

# Photographs that training may draw from, and the disjoint ones the evaluation set is built from.
TRAINING_PHOTOS: tuple[str, ...] = tuple(
    "camera stereo_motorcycle horse clock cell microaneurysms grass gravel retina immunohistochemistry text".split()
)
EVAL_PHOTOS: tuple[str, ...] = tuple("astronaut chelsea coffee rocket coins moon page hubble_deep_field brick".split())
if set(TRAINING_PHOTOS) & set(EVAL_PHOTOS):  # not `assert`: it must hold under python -O too
    raise RuntimeError(f"TRAINING_PHOTOS and EVAL_PHOTOS share {sorted(set(TRAINING_PHOTOS) & set(EVAL_PHOTOS))}")
# Evaluation objects (same format as OBJECTS): the demo's boxes where the photo is an evaluation photo, plus new
# crops picked by eye on a 50-pixel grid. Crops of one photo do not overlap, so no object hides inside another.
EVAL_OBJECTS: dict[str, tuple[str, tuple[int, int, int, int]]] = {
    "astronaut_face": ("astronaut", (150, 14, 304, 186)),
    "mission_patch": ("astronaut", (134, 348, 210, 427)),
    "us_flag": ("astronaut", (0, 0, 92, 205)),  # the flag's corner behind her left shoulder (stars and stripes)
    "shuttle_model": ("astronaut", (352, 0, 472, 285)),  # the shuttle stack model, top right, stand excluded
    "coffee_cup": ("coffee", (170, 10, 428, 305)),
    "saucer_edge": ("coffee", (76, 80, 170, 365)),  # left rim of the saucer: little texture, a hard case
    "cat_face": ("chelsea", (70, 20, 400, 290)),
    "rocket": ("rocket", (286, 122, 354, 410)),
    "coin": ("coins", (304, 14, 364, 74)),
    "coin_large": ("coins", (314, 155, 381, 220)),  # the large helmeted head, right of the third row
}
# Evaluation backgrounds: the evaluation photographs that hold no evaluation object.
EVAL_BACKGROUNDS: tuple[str, ...] = ("moon", "page", "hubble_deep_field", "brick")


@dataclass(frozen=True)
class DemoConfig:
    n_gallery: int = 48  # gallery images
    instances_per_object: int = 4  # gallery images each object is pasted into (at most once per image)
    n_distractors: int = 8  # of the gallery images, at least this many contain no object
    max_objects_per_image: int = 2  # an image holds 0..this many objects
    image_size: tuple[int, int] = (384, 512)  # (H, W) of gallery images
    scale_range: tuple[float, float] = (48.0, 160.0)  # pasted object's long side in pixels, drawn uniformly
    max_rotation_deg: float = 30.0  # rotation drawn uniformly in [-max, max] degrees
    max_occlusion: float = 0.35  # max fraction of the pasted object's box covered by an occluder
    occlusion_prob: float = 0.5  # probability that a pasted object gets an occluder
    seed: int = 0  # everything random derives from this; same seed -> same bytes
    jpeg_quality: int = 90  # quality of the gallery JPEGs


@dataclass(frozen=True)
class DemoCollection:
    gallery_dir: str  # folder of gallery JPEGs
    queries_uri: str  # Parquet, QUERIES_SCHEMA; query images are PNG crops in queries/, box columns null
    ground_truth_uri: str  # Parquet, DEMO_GROUND_TRUTH_SCHEMA (+ scale, rotation_deg, occlusion, clutter)
    n_gallery: int  # gallery images written
    n_queries: int  # query images written (one per object)


@functools.lru_cache(maxsize=32)
def load_photo(name: str) -> np.ndarray:
    """The skimage.data photograph `name` as a read-only (H, W, 3) uint8 array, refusing any that would download."""
    import skimage.data
    from skimage.util import img_as_ubyte

    files = _SHIPPED_FILES.get(name)
    data_dir = os.path.dirname(skimage.data.__file__)
    if files is None or not all(os.path.isfile(os.path.join(data_dir, f)) for f in files):
        raise ValueError(f"skimage.data.{name} does not ship inside the installed scikit-image; refusing to download")
    img = getattr(skimage.data, name)()
    img = img_as_ubyte(img[0] if isinstance(img, tuple) else img)
    img = np.repeat(img[..., None], 3, axis=2) if img.ndim == 2 else img[..., :3]
    img = np.ascontiguousarray(img)
    img.setflags(write=False)
    return img


def _crop_object(name: str, photo: str, box: tuple[int, int, int, int]) -> np.ndarray:
    img = load_photo(photo)
    x0, y0, x1, y1 = box
    h, w = img.shape[:2]
    if not (0 <= x0 < x1 <= w and 0 <= y0 < y1 <= h):
        raise ValueError(f"object {name!r}: crop box {box} is outside photo {photo!r} of size {w}x{h} (W x H)")
    return img[y0:y1, x0:x1]


def clutter(img: np.ndarray) -> float:
    """Mean gradient magnitude (grey levels per pixel) of the grayscale of an (H, W, 3) or (H, W) image.

    Grayscale is the ITU-R BT.601 luma (0.299 R + 0.587 G + 0.114 B); gradients are `np.gradient`'s central
    differences (one-sided at the border), averaged over the whole image.
    """
    x = np.asarray(img, dtype=np.float64)
    if x.ndim == 3 and x.shape[2] == 3:
        x = x @ np.array([0.299, 0.587, 0.114])
    elif x.ndim != 2:
        raise ValueError(f"clutter: expected an (H, W) or (H, W, 3) image, got shape {x.shape}")
    if min(x.shape) < 2:
        raise ValueError(f"clutter: image of shape {x.shape} is too small for a gradient (needs >= 2x2)")
    gy, gx = np.gradient(x)  # (H, W) each
    return float(np.hypot(gx, gy).mean())


def _resize(img: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
    return np.asarray(Image.fromarray(img).resize((hw[1], hw[0]), Image.Resampling.BILINEAR))


def _check(cfg: DemoConfig, n_objects: int) -> None:
    k, per, active = cfg.instances_per_object, cfg.max_objects_per_image, cfg.n_gallery - cfg.n_distractors
    if cfg.n_gallery < 1 or cfg.n_distractors < 0 or k < 0 or per < 1:
        raise ValueError(f"invalid counts in {cfg}")
    # Assigning objects one at a time to random non-full images always succeeds under this condition.
    if k > 0 and active - (n_objects * k - k) // per < k:
        raise ValueError(f"{n_objects} objects x {k} instances do not fit in {active} images x {per} objects")
    lo, hi = cfg.scale_range
    if not 1 <= lo <= hi or hi * math.sqrt(2) + 2 > min(cfg.image_size):
        raise ValueError(f"scale_range {cfg.scale_range} must be >= 1 and fit rotated in image_size {cfg.image_size}")
    if not 0 <= cfg.max_occlusion < 1 or not 0 <= cfg.occlusion_prob <= 1:
        raise ValueError("max_occlusion must be in [0, 1) and occlusion_prob in [0, 1]")


def _assign(cfg: DemoConfig, n_objects: int, rng: np.random.Generator) -> list[list[int]]:
    """Object indices per gallery image: each object in `instances_per_object` distinct non-distractor images."""
    active = np.sort(rng.permutation(cfg.n_gallery)[: cfg.n_gallery - cfg.n_distractors])
    per_image: list[list[int]] = [[] for _ in range(cfg.n_gallery)]
    for obj in range(n_objects):
        free = [i for i in active if len(per_image[i]) < cfg.max_objects_per_image]
        for i in rng.choice(free, size=cfg.instances_per_object, replace=False):
            per_image[int(i)].append(obj)
    return [sorted(objs) for objs in per_image]


def _background(photo: np.ndarray, hw: tuple[int, int], rng: np.random.Generator, min_frac: float = 0.4) -> np.ndarray:
    """A random crop of `photo` with the aspect ratio of `hw`, resized to `hw`, randomly flipped."""
    ph, pw = photo.shape[:2]
    full = min(ph / hw[0], pw / hw[1])  # largest crop scale with the target aspect ratio
    s = full * rng.uniform(min_frac, 1.0)
    ch, cw = max(1, round(hw[0] * s)), max(1, round(hw[1] * s))
    y, x = int(rng.integers(0, ph - ch + 1)), int(rng.integers(0, pw - cw + 1))
    out = _resize(np.ascontiguousarray(photo[y : y + ch, x : x + cw]), hw)
    if rng.random() < 0.5:
        out = out[:, ::-1]
    if rng.random() < 0.5:
        out = out[::-1]
    return out


def _jitter(img: np.ndarray, rng: np.random.Generator, gain: float, offset: float, per_channel: bool) -> np.ndarray:
    """Float32 image with random contrast (around its mean) and brightness; colour gains when `per_channel`."""
    x = img.astype(np.float32)
    g = rng.uniform(1 - gain, 1 + gain, size=3 if per_channel else 1).astype(np.float32)
    mean = x.mean(axis=(0, 1), keepdims=True)
    return (x - mean) * g + mean + np.float32(rng.uniform(-offset, offset))


def _object_patch(
    query: np.ndarray, cfg: DemoConfig, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray, float, float]:
    """(rgb float32, alpha float32 in [0, 1], scale, rotation) of the resized, jittered, rotated object."""
    qh, qw = query.shape[:2]
    s = rng.uniform(*cfg.scale_range) / max(qh, qw)
    size = (max(1, round(qh * s)), max(1, round(qw * s)))
    scale = max(size) / max(qh, qw)
    rgb = np.clip(_jitter(_resize(query, size), rng, 0.1, 10.0, per_channel=False), 0, 255).astype(np.uint8)
    angle = float(rng.uniform(-cfg.max_rotation_deg, cfg.max_rotation_deg)) if cfg.max_rotation_deg > 0 else 0.0
    alpha = np.full(size, 255, np.uint8)
    if angle != 0.0:
        bilinear = Image.Resampling.BILINEAR
        rgb = np.asarray(Image.fromarray(rgb).rotate(angle, resample=bilinear, expand=True))
        alpha = np.asarray(Image.fromarray(alpha).rotate(angle, resample=bilinear, expand=True))
        # Crop to the tight box of the rotated object (pixels at least half covered).
        rows, cols = np.flatnonzero((alpha >= 128).any(axis=1)), np.flatnonzero((alpha >= 128).any(axis=0))
        rgb = rgb[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]
        alpha = alpha[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]
    return rgb.astype(np.float32), alpha.astype(np.float32) / 255.0, scale, angle


def _overlaps(box: tuple[int, int, int, int], others: list[tuple[int, int, int, int]]) -> bool:
    return any(box[0] < o[2] and o[0] < box[2] and box[1] < o[3] and o[1] < box[3] for o in others)


def _gallery_image(
    objects: list[int],
    queries: list[np.ndarray],
    backgrounds: list[str],
    cfg: DemoConfig,
    rng: np.random.Generator,
) -> tuple[np.ndarray, list[tuple[int, tuple[int, int, int, int], float, float, float]]]:
    """One gallery image (uint8) and, per pasted object, (object index, box, scale, rotation, occlusion)."""
    H, W = cfg.image_size
    bg = int(rng.integers(len(backgrounds)))
    canvas = _jitter(_background(load_photo(backgrounds[bg]), (H, W), rng), rng, 0.15, 15.0, per_channel=True)
    placed: list[tuple[int, tuple[int, int, int, int], float, float, float]] = []
    for obj in objects:
        for _ in range(200):  # redraw size, rotation and position until it overlaps no earlier object
            rgb, alpha, scale, angle = _object_patch(queries[obj], cfg, rng)
            ph, pw = alpha.shape
            x, y = int(rng.integers(0, W - pw + 1)), int(rng.integers(0, H - ph + 1))
            box = (x, y, x + pw, y + ph)
            if not _overlaps(box, [p[1] for p in placed]):
                break
        else:
            raise RuntimeError(f"could not place object {obj} without overlap; use a smaller scale_range")
        region = canvas[y : y + ph, x : x + pw]
        region += alpha[..., None] * (rgb - region)  # in-place blend: outside the rotated object stays background
        occlusion = 0.0
        if cfg.max_occlusion > 0 and rng.random() < cfg.occlusion_prob:
            frac = rng.uniform(0, cfg.max_occlusion)
            aspect = math.exp(rng.uniform(-0.7, 0.7))
            oh = min(ph, max(1, round(ph * math.sqrt(frac) * aspect)))
            ow = min(pw, max(1, int(ph * pw * frac / oh)))  # floor: covered fraction <= max_occlusion
            oy, ox = int(rng.integers(0, ph - oh + 1)), int(rng.integers(0, pw - ow + 1))
            others = [b for b in range(len(backgrounds)) if b != bg] or [bg]
            src = load_photo(backgrounds[others[int(rng.integers(len(others)))]])
            if src.shape[0] < oh or src.shape[1] < ow:
                src = _resize(src, (max(oh, src.shape[0]), max(ow, src.shape[1])))
            sy, sx = int(rng.integers(0, src.shape[0] - oh + 1)), int(rng.integers(0, src.shape[1] - ow + 1))
            region[oy : oy + oh, ox : ox + ow] = src[sy : sy + oh, sx : sx + ow]
            occlusion = oh * ow / (ph * pw)
        placed.append((obj, box, scale, angle, occlusion))
    return np.clip(canvas + 0.5, 0, 255).astype(np.uint8), placed


def _check_disjoint_crops(objects: Mapping[str, tuple[str, tuple[int, int, int, int]]]) -> None:
    """Refuse objects cropped from overlapping parts of one photo (each would hold an unannotated part of the other)."""
    items = list(objects.items())
    for i, (a, (photo_a, box_a)) in enumerate(items):
        for b, (photo_b, box_b) in items[i + 1 :]:
            if photo_a == photo_b and _overlaps(box_a, [box_b]):
                raise ValueError(f"objects {a!r} {box_a} and {b!r} {box_b} overlap in photo {photo_a!r}")


def _clean(folder: str, suffix: str) -> None:
    """Remove files this builder writes (`*<suffix>`) from `folder`, so a rebuild leaves no stale images."""
    for name in os.listdir(folder):
        if name.endswith(suffix) and os.path.isfile(os.path.join(folder, name)):
            os.remove(os.path.join(folder, name))


def build_demo_collection(
    out_dir: str,
    cfg: DemoConfig = DemoConfig(),
    objects: Mapping[str, tuple[str, tuple[int, int, int, int]]] | None = None,
    backgrounds: Sequence[str] | None = None,
) -> DemoCollection:
    """Write gallery/ JPEGs, queries/ PNG crops, queries.parquet and ground_truth.parquet under `out_dir`."""
    objects = dict(OBJECTS if objects is None else objects)
    backgrounds = list(BACKGROUNDS if backgrounds is None else backgrounds)
    if not objects or not backgrounds:
        raise ValueError("need at least one object and one background photo")
    for name in objects:
        if not name or os.sep in name or name.startswith("."):
            raise ValueError(f"object name {name!r} cannot be a file name")
    shared = sorted({photo for photo, _ in objects.values()} & set(backgrounds))
    if shared:  # a background showing an object would be an unannotated instance
        raise ValueError(f"photo(s) {shared} are used both for objects and as backgrounds")
    _check_disjoint_crops(objects)
    _check(cfg, len(objects))
    names = list(objects)
    queries = [_crop_object(n, *objects[n]) for n in names]
    for b in backgrounds:
        load_photo(b)  # fail before writing anything

    out_dir = os.path.abspath(out_dir)
    gallery_dir, query_dir = os.path.join(out_dir, "gallery"), os.path.join(out_dir, "queries")
    for folder, suffix in ((gallery_dir, ".jpg"), (query_dir, ".png")):
        os.makedirs(folder, exist_ok=True)
        _clean(folder, suffix)

    seeds = np.random.SeedSequence(cfg.seed).spawn(cfg.n_gallery + 1)
    assignment = _assign(cfg, len(names), np.random.default_rng(seeds[0]))
    gt: dict[str, list] = {c: [] for c in DEMO_GROUND_TRUTH_SCHEMA.names}
    for i, objs in enumerate(assignment):
        img, placed = _gallery_image(objs, queries, backgrounds, cfg, np.random.default_rng(seeds[i + 1]))
        path = os.path.join(gallery_dir, f"img_{i:04d}.jpg")
        Image.fromarray(img).save(path, format="JPEG", quality=cfg.jpeg_quality)
        image_clutter = clutter(img)  # of the pixels written, before JPEG coding
        for obj, box, scale, angle, occlusion in placed:
            for col, value in zip(
                DEMO_GROUND_TRUTH_SCHEMA.names,
                (names[obj], path, *box, scale, angle, occlusion, image_clutter),
                strict=True,
            ):
                gt[col].append(value)

    q_paths = [os.path.join(query_dir, f"{n}.png") for n in names]
    for q, p in zip(queries, q_paths, strict=True):
        Image.fromarray(q).save(p, format="PNG")
    nulls = [None] * len(names)
    q_table = pa.table({QUERY_ID: names, URI: q_paths, X0: nulls, Y0: nulls, X1: nulls, Y1: nulls})
    queries_uri, gt_uri = os.path.join(out_dir, "queries.parquet"), os.path.join(out_dir, "ground_truth.parquet")
    pq.write_table(q_table.cast(QUERIES_SCHEMA), queries_uri)
    pq.write_table(pa.table(gt, schema=DEMO_GROUND_TRUTH_SCHEMA), gt_uri)
    return DemoCollection(gallery_dir, queries_uri, gt_uri, n_gallery=cfg.n_gallery, n_queries=len(names))


def eval_config(seed: int = 1000, n_gallery: int = 64) -> DemoConfig:
    """Settings of the evaluation set: wider scales, rotations and occlusions than the demo, for the stress buckets.

    Objects are pasted 4 times each when the gallery allows it (fewer in small galleries, at least once); a sixth
    of the gallery (at least 2 images) holds no object.
    """
    distractors = max(2, n_gallery // 6)
    base = DemoConfig(
        n_gallery=n_gallery,
        n_distractors=distractors,
        scale_range=(32.0, 200.0),
        max_rotation_deg=45.0,
        max_occlusion=0.45,
        occlusion_prob=0.5,
        seed=seed,
    )
    active, per, n = n_gallery - distractors, base.max_objects_per_image, len(EVAL_OBJECTS)
    fits = [k for k in range(1, 5) if active - (n * k - k) // per >= k]  # the condition `_check` enforces
    if not fits:
        raise ValueError(f"n_gallery {n_gallery} is too small for {n} evaluation objects; use at least 12")
    cfg = dataclasses.replace(base, instances_per_object=max(fits))
    _check(cfg, n)
    return cfg


def build_eval_collection(out_dir: str, seed: int = 1000, n_gallery: int = 64) -> DemoCollection:
    """The evaluation collection under `out_dir`: EVAL_OBJECTS in EVAL_BACKGROUNDS, built like the demo's.

    Its photographs are disjoint from TRAINING_PHOTOS and its default seed differs from the demo's and training's.
    """
    photos = {p for p, _ in EVAL_OBJECTS.values()} | set(EVAL_BACKGROUNDS)
    seen = sorted((photos | set(EVAL_PHOTOS)) & set(TRAINING_PHOTOS))
    if seen:
        raise ValueError(f"evaluation photo(s) {seen} are also training photos")
    if not photos <= set(EVAL_PHOTOS):
        raise ValueError(f"evaluation photo(s) {sorted(photos - set(EVAL_PHOTOS))} are not listed in EVAL_PHOTOS")
    return build_demo_collection(out_dir, eval_config(seed, n_gallery), EVAL_OBJECTS, EVAL_BACKGROUNDS)


# Photographs that hold no evaluation object: the distractors of the scale benchmark are drawn from these.
DISTRACTOR_PHOTOS: tuple[str, ...] = tuple(dict.fromkeys((*TRAINING_PHOTOS, *EVAL_BACKGROUNDS)))


def build_distractors(
    folder: str, n: int, seed: int = 0, hw: tuple[int, int] = (384, 512), prefix: str = "distractor"
) -> list[str]:
    """`n` distractor JPEGs in `folder` (``{prefix}_{i:06d}.jpg``): random crops (40-100% of the largest crop with
    the aspect ratio of `hw`), flips and colour changes of DISTRACTOR_PHOTOS, none of which holds an evaluation
    object. The same (n, seed, hw) gives the same bytes; returns the paths in order."""
    if n < 0:
        raise ValueError(f"build_distractors: n must be >= 0, got {n}")
    bad = sorted({p for p, _ in EVAL_OBJECTS.values()} & set(DISTRACTOR_PHOTOS))
    if bad:
        raise ValueError(f"build_distractors: photo(s) {bad} hold evaluation objects")
    os.makedirs(folder, exist_ok=True)
    photos = [load_photo(p) for p in DISTRACTOR_PHOTOS]
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        img = _background(photos[int(rng.integers(len(photos)))], hw, rng)
        img = np.clip(_jitter(img, rng, gain=0.3, offset=25.0, per_channel=True), 0, 255).astype(np.uint8)
        path = os.path.join(folder, f"{prefix}_{i:06d}.jpg")
        Image.fromarray(img).save(path, format="JPEG", quality=90)
        paths.append(path)
    return paths
