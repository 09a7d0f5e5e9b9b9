"""Column names and Arrow schemas of every table roiqa reads or writes (the only place a column is spelled)."""

from __future__ import annotations

import pyarrow as pa

# --- column names -------------------------------------------------------------------------------------------
IMAGE_ID = "image_id"  # int64, stable: roiqa.io.ids.image_id(uri)
URI = "uri"  # string, where the image was read from (a tar member is "<shard uri>#<member name>")
WIDTH = "width"  # int32, original image width in pixels (after EXIF orientation)
HEIGHT = "height"  # int32, original image height in pixels
SIZE_BYTES = "size_bytes"  # int64, encoded size
CONTENT_HASH = "content_hash"  # string, BLAKE2b-128 hex of the encoded bytes
EMBEDDING = "embedding"  # fixed_size_list<float32, D>, L2-normalised global descriptor
COARSE_QUERY = "coarse_query"  # float32 (S * D): whitened descriptors per coarse slot, unused ones zeros (transient)
REGIONS_Q8 = "regions_q8"  # binary: whitened regional descriptors (roiqa.models.regions grid), R float16 row scales
# then R x D int8 (roiqa.models.regions.encode_regions)
REGIONS = "regions"  # binary, float16 (R, D) row-major: the same descriptors in versions written before regions_q8
STAGE = "stage"  # string, pipeline stage that failed: read | decode | embed
REASON = "reason"  # string, short machine-readable code (empty_file, truncated, not_an_image, too_large, ...)
MESSAGE = "message"  # string, human-readable detail
QUERY_ID = "query_id"  # string
RANK = "rank"  # int32, 1-based rank within a query
SCORE = "score"  # float32, rerank score s(I|q) (seed 003 eq. 5)
COARSE_SCORE = "coarse_score"  # float32, inner product of global descriptors from the faiss search
X0, Y0, X1, Y1 = "x0", "y0", "x1", "y1"  # float32 box corners, pixels of the original image
BOX = [X0, Y0, X1, Y1]
RESIZED_H, RESIZED_W = "resized_h", "resized_w"  # int32: an image's size as the index resized it (transient)
HEATMAP_URI = "heatmap_uri"  # string or null, overlay PNG of the fused heatmap

# Seed 001 complexity stage of the index (present when complexity.enabled; pixels are resized-image pixels)
COMPLEXITY_MEAN = "complexity_mean"  # float32, mean per-pixel complexity over the valid image region, in [0, 1)
COMPLEXITY_STD = "complexity_std"  # float32, its standard deviation
COMPLEXITY_P90 = "complexity_p90"  # float32, its 90th percentile
PATCH_COUNTS = "patch_counts"  # list<int32>, quadtree leaves per cell size, largest size first (64, 32, 16, 8)
PATCH_LAYOUT = "patch_layout"  # list<int32>, the leaves as flat (x, y, size) triples
COMPLEXITY_PNG = "complexity_png"  # binary, the complexity map of the valid region as a small 8-bit grey PNG
PATCH_EMBEDDING = "patch_embedding"  # fixed_size_list<float32, D>, the patch network's embedding (with a model)

# Seed 002 masks stage of the index: three columns per task profile (see `mask_columns`)
MASK_PROBE = "mask_probe"  # transient float32: the controller's confidence probe of the row's batch (nan: none)

# Seed 000 / 004 stages of the query pipeline (null when the stage is off)
REFINE_STEPS = "refine_steps"  # int32, refinement iterations that moved the box
REFINE_LOSS = "refine_loss"  # float32, perceptual loss of the final box
VERIFY_PROB = "verify_prob"  # float32, the ROI-mask verifier's probability that the region shows the query
INLIERS = "inliers"  # int32, RANSAC homography inliers of the geometric verification (null: not verified)


def mask_columns(profile: str) -> tuple[str, str, str]:
    """(coverage, threshold, rle) column names of a task profile: float32 fraction of valid pixels kept, float32
    threshold the mask was cut at, string run-length encoding of the mask (see roiqa.stages.masks.rle_encode)."""
    key = "".join(ch if ch.isalnum() else "_" for ch in profile.lower()).strip("_")
    return f"mask_{key}_coverage", f"mask_{key}_threshold", f"mask_{key}_rle"


# transient columns inside the pipelines (never written to the published tables)
BYTES = "bytes"  # binary, encoded image
# a row's failure (roiqa.errors.RowError), one string column per field, each empty when the row is good
ERROR_STAGE = "error_stage"
ERROR_REASON = "error_reason"
ERROR_MESSAGE = "error_message"
IMAGE = "image"  # (S, S, 3) uint8, resized and zero-padded
VALID_HW = "valid_hw"  # (2,) int32, the resized image's size inside the padded square
SCALE = "scale"  # float32, resized pixels per original pixel
QUERY_IDS = "query_ids"  # list<string>, the queries that shortlisted a candidate image (rerank input)
COARSE_SCORES = "coarse_scores"  # list<float32>, their coarse scores, in the same order


def stage_fields(complexity: bool = False, patch_dim: int | None = None, profiles: tuple[str, ...] = ()) -> list:
    """The optional embeddings columns of the seed 001 / 002 stages that are switched on."""
    fields = []
    if complexity:
        fields += [pa.field(c, pa.float32()) for c in (COMPLEXITY_MEAN, COMPLEXITY_STD, COMPLEXITY_P90)]
        fields += [pa.field(PATCH_COUNTS, pa.list_(pa.int32())), pa.field(PATCH_LAYOUT, pa.list_(pa.int32()))]
        fields.append(pa.field(COMPLEXITY_PNG, pa.binary()))
    if patch_dim:
        fields.append(pa.field(PATCH_EMBEDDING, pa.list_(pa.float32(), patch_dim)))
    for profile in profiles:
        cov, thr, rle = mask_columns(profile)
        fields += [pa.field(cov, pa.float32()), pa.field(thr, pa.float32()), pa.field(rle, pa.string())]
    return fields


def embeddings_schema(dim: int, extra: list | None = None) -> pa.Schema:
    """One row per indexed image: versions/<id>/embeddings/*.parquet (+ `extra` fields from `stage_fields`)."""
    return pa.schema(
        [
            pa.field(IMAGE_ID, pa.int64(), nullable=False),
            pa.field(URI, pa.string(), nullable=False),
            pa.field(WIDTH, pa.int32()),
            pa.field(HEIGHT, pa.int32()),
            pa.field(SIZE_BYTES, pa.int64()),
            pa.field(CONTENT_HASH, pa.string()),
            pa.field(EMBEDDING, pa.list_(pa.float32(), dim)),
            pa.field(REGIONS_Q8, pa.binary()),
            *(extra or []),
        ]
    )


ERRORS_SCHEMA = pa.schema(
    [
        pa.field(URI, pa.string(), nullable=False),
        pa.field(STAGE, pa.string(), nullable=False),
        pa.field(REASON, pa.string(), nullable=False),
        pa.field(MESSAGE, pa.string()),
    ]
)

# errors.parquet of a query run: the index's columns plus the query a row belongs to (every row has one); `uri` is
# the query image for a query that failed, the gallery image for a (query, image) pair that failed
QUERY_ERRORS_SCHEMA = ERRORS_SCHEMA.append(pa.field(QUERY_ID, pa.string(), nullable=False))

RESULTS_SCHEMA = pa.schema(
    [
        pa.field(QUERY_ID, pa.string(), nullable=False),
        pa.field(RANK, pa.int32(), nullable=False),
        pa.field(IMAGE_ID, pa.int64(), nullable=False),
        pa.field(URI, pa.string(), nullable=False),
        pa.field(SCORE, pa.float32()),
        pa.field(COARSE_SCORE, pa.float32()),
        pa.field(X0, pa.float32()),
        pa.field(Y0, pa.float32()),
        pa.field(X1, pa.float32()),
        pa.field(Y1, pa.float32()),
        pa.field(HEATMAP_URI, pa.string()),
        pa.field(REFINE_STEPS, pa.int32()),
        pa.field(REFINE_LOSS, pa.float32()),
        pa.field(VERIFY_PROB, pa.float32()),
        pa.field(INLIERS, pa.int32()),
    ]
)

# Controller history of the masks stage: one row per (actor, batch, profile) of an index run.
ACTOR = "actor"  # string, the Ray actor (or process) that ran the batch
BATCH = "batch"  # int32, batch number within that actor
PROFILE = "profile"  # string, task profile name
CONFIDENCE = "confidence"  # float32, the probe's confidence (nan: no probe in that batch)
THRESHOLD = "threshold"  # float32, the threshold the batch's masks were cut at
MASKS_CONTROLLER_SCHEMA = pa.schema(
    [
        pa.field(ACTOR, pa.string(), nullable=False),
        pa.field(BATCH, pa.int32(), nullable=False),
        pa.field(PROFILE, pa.string(), nullable=False),
        pa.field(CONFIDENCE, pa.float32()),
        pa.field(THRESHOLD, pa.float32()),
    ]
)

# Queries: a query image and optionally the box of the object inside it (all null = the whole image is the patch).
QUERIES_SCHEMA = pa.schema(
    [
        pa.field(QUERY_ID, pa.string(), nullable=False),
        pa.field(URI, pa.string(), nullable=False),
        pa.field(X0, pa.float32()),
        pa.field(Y0, pa.float32()),
        pa.field(X1, pa.float32()),
        pa.field(Y1, pa.float32()),
    ]
)

# Ground truth for evaluation: one row per (query, gallery image that contains the instance, its box).
GROUND_TRUTH_SCHEMA = pa.schema(
    [
        pa.field(QUERY_ID, pa.string(), nullable=False),
        pa.field(URI, pa.string(), nullable=False),
        pa.field(X0, pa.float32()),
        pa.field(Y0, pa.float32()),
        pa.field(X1, pa.float32()),
        pa.field(Y1, pa.float32()),
    ]
)

# Extra ground-truth columns of generated collections (float32): pasted long side / query long side, rotation
# applied in degrees (counter-clockwise), the fraction of the ground-truth box covered by an occluder, and the
# clutter of the gallery image holding the instance (mean gradient magnitude of its grayscale, levels per pixel).
GT_SCALE, GT_ROTATION, GT_OCCLUSION = "scale", "rotation_deg", "occlusion"
GT_CLUTTER = "clutter"
DEMO_GROUND_TRUTH_SCHEMA = pa.schema(
    list(GROUND_TRUTH_SCHEMA) + [pa.field(c, pa.float32()) for c in (GT_SCALE, GT_ROTATION, GT_OCCLUSION, GT_CLUTTER)]
)


def check_columns(table: pa.Table, schema: pa.Schema, name: str, required: list[str] | None = None) -> pa.Table:
    """Cast `table` to `schema` (missing nullable columns become null), naming `name` in any error."""
    required = required if required is not None else [f.name for f in schema if not f.nullable]
    missing = [c for c in required if c not in table.column_names]
    if missing:
        raise ValueError(f"{name}: missing required column(s) {missing}; has {table.column_names}")
    cols = []
    for field in schema:
        if field.name in table.column_names:
            try:
                cols.append(table.column(field.name).cast(field.type))
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
                raise ValueError(f"{name}: column {field.name!r} cannot be read as {field.type}: {exc}") from exc
        else:
            cols.append(pa.nulls(table.num_rows, field.type))
    return pa.Table.from_arrays(cols, schema=schema)


# Tune sweeps (roiqa tune): one row per (trial, reported iteration), plus one column per searched parameter.
TRIAL_ID = "trial_id"  # string, Ray Tune's trial id
ITERATION = "iteration"  # int32, 1-based number of the report within its trial (Ray's training_iteration)
STATUS = "status"  # string, the trial's status when the table was written: RUNNING | TERMINATED | ERROR | ...
TRIAL_CONFIG = "trial_config"  # string, JSON {dotted key: value} of the overrides the trial used at that iteration
OBJECTIVE = "objective"  # float32, weighted sum of the reported metrics (roiqa.train.tune_space.objective), maximised
VAL_LOSS = "val_loss"  # float32, training loss on the validation pairs
VAL_MAP = "val_map"  # float32, retrieval mAP on the validation queries
VAL_LOC50 = "val_loc50"  # float32, share of validation positives boxed at IoU >= 0.5 (kernel at the true size)
VAL_LOC50_REFINED = "val_loc50_refined"  # float32, the same from the query at its own size after ROI refinement
SECONDS = "seconds"  # float32, wall time since the trial (or its restored run) started
RESUMED_FROM = "resumed_from"  # int32, epoch the trial's run restarted from a checkpoint at (-1: never restored)
TRIAL_METRICS = [VAL_LOSS, VAL_MAP, VAL_LOC50, VAL_LOC50_REFINED]  # the metric columns a trial reports
TRIALS_SCHEMA = pa.schema(
    [
        pa.field(TRIAL_ID, pa.string(), nullable=False),
        pa.field(ITERATION, pa.int32(), nullable=False),
        pa.field(STATUS, pa.string()),
        pa.field(TRIAL_CONFIG, pa.string()),
        pa.field(OBJECTIVE, pa.float32()),
        *(pa.field(c, pa.float32()) for c in TRIAL_METRICS),
        pa.field(SECONDS, pa.float32()),
        pa.field(RESUMED_FROM, pa.int32()),
    ]
)


def param_column(key: str) -> str:
    """Column of searched parameter `key` ("section.field") in the trials table: "param_section__field" (float64)."""
    parts = key.split(".")
    if len(parts) != 2 or not all(p.isidentifier() for p in parts):
        raise ValueError(f"parameter key {key!r} must be 'section.field', e.g. 'train.lr'")
    return "param_" + "__".join(parts)


def trials_schema(param_keys: list[str] | tuple[str, ...]) -> pa.Schema:
    """TRIALS_SCHEMA plus one float64 column per searched parameter: the value the trial used at that iteration."""
    return pa.schema(list(TRIALS_SCHEMA) + [pa.field(param_column(k), pa.float64()) for k in param_keys])


# Sources of an index version: one row per listed URI (an image file, a .tar shard or a manifest row), with what
# identified its stored version when it was read; `roiqa reindex` compares them with a new listing.
SIGNATURE = "signature"  # string, "etag:<ETag>" on object stores, else "size:<bytes>:mtime:<seconds>"; null: missing
SOURCES_SCHEMA = pa.schema([pa.field(URI, pa.string(), nullable=False), pa.field(SIGNATURE, pa.string())])

# Runs of `roiqa index` / `roiqa reindex` on one index: one row per run, appended as runs/<run_id>.parquet.
RUN_ID = "run_id"  # string, sortable (UTC time + random suffix)
STARTED = "started"  # timestamp[us, UTC]
KIND = "kind"  # string, index | reindex
RUN_STATUS = "status"  # string, published | unchanged | failed
MODE = "mode"  # string, full | incremental | none
MODE_REASON = "mode_reason"  # string, why a reindex re-embedded everything (no sources, model or config changed)
PARENT = "parent"  # string, the version published when the run started (null: none)
VERSION = "version"  # string, the version the run published (null: none)
RUN_COUNTS = ["listed", "new", "changed", "deleted", "unchanged", "indexed", "errors", "gc_deleted"]  # int64 each
RUNS_SCHEMA = pa.schema(
    [
        pa.field(RUN_ID, pa.string(), nullable=False),
        pa.field(STARTED, pa.timestamp("us", tz="UTC"), nullable=False),
        pa.field(SECONDS, pa.float32()),
        pa.field(KIND, pa.string(), nullable=False),
        pa.field(RUN_STATUS, pa.string(), nullable=False),
        pa.field(MODE, pa.string()),
        pa.field(MODE_REASON, pa.string()),
        pa.field("images", pa.string()),
        pa.field(PARENT, pa.string()),
        pa.field(VERSION, pa.string()),
        *[pa.field(c, pa.int64()) for c in RUN_COUNTS],
        pa.field(MESSAGE, pa.string()),
    ]
)
