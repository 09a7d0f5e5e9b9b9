"""Seed 001 patch network: attention-scaled MobileNetV2 patch embeddings pooled over a (soft) complexity quadtree.

Per image (a square, zero-padded uint8 image of side `image_size` with its valid (h, w)):

1. complexity map (roiqa.ops.complexity.complexity_map) and, per quadtree level l (cell sizes 64, 32, 16, 8), the mean
   complexity m of every grid cell over its valid part;
2. leaf weights w of every cell. Hard (inference): the quadtree of roiqa.ops.complexity.quadtree with the learned
   thresholds, w in {0, 1}. Soft (training): p = sigmoid((m - t_l) / temperature) is a cell's split probability,
   P(reach) is 1 for a level-0 cell and P(reach parent) * p_parent for a child, and w = P(reach) * (1 - p)
   (w = P(reach) at the last level); the sum of w over all cells is the expected number of leaves. `fixed`
   layout: every `fixed_size` cell has w = 1 (the baseline);
3. every cell with w above a cut is cut out, resized to `patch_side`, given an attention weight a in (0, 1) by a
   shallow CNN, multiplied by a and embedded by MobileNetV2 inverted residual blocks: e, (E,);
4. the seed concatenates a variable number of patch embeddings; here the length is fixed by concatenating, per cell
   size, sum_i w_i a_i e_i / max(1, sum_i w_i) (the leaf-weighted mean of attention-scaled embeddings: zero for a
   size without leaves and continuous in the soft weights), then a linear projection to D and L2 normalisation.

Training (roiqa.train.patchnet) loss: symmetric InfoNCE between query crops and the images they are pasted in
(other images of the batch are the negatives), plus lambda_cost * cost, cost = expected leaves / number of
min_cell cells of the valid region (1 when every cell splits down to min_cell), averaged over the images.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.mobilenetv2 import InvertedResidual
from torchvision.ops.misc import Conv2dNormActivation

from roiqa.config import from_dict, to_dict
from roiqa.io import uri as uri_mod
from roiqa.ops.complexity import check_quadtree, complexity_map

CONFIG_KEY = "roiqa.patchnet_config"
LAYOUTS = ("dynamic", "fixed")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class PatchNetConfig:
    image_size: int = 256  # side of the square images the network works on (embed_images resizes others to it)
    layout: str = "dynamic"  # "dynamic": complexity quadtree; "fixed": every fixed_size cell (the baseline)
    fixed_size: int = 16  # cell side of the fixed layout (one of the quadtree sizes)
    cell: int = 64  # side of the level-0 quadtree cells
    min_cell: int = 8  # smallest quadtree cell
    thresholds: tuple[float, ...] = (0.4, 0.5, 0.6)  # initial split thresholds per level (learned in training)
    sigma: float = 1.5  # LoG sigma of the complexity map (pixels of the image_size image)
    scale: float = 0.05  # complexity = tanh(|sigma^2 LoG| / scale)
    temperature: float = 0.03  # soft quadtree: split probability sigmoid((mean - threshold) / temperature)
    min_weight: float = 0.02  # soft quadtree: cells with a leaf weight at or below this are not embedded
    patch_side: int = 16  # every cell is resized to patch_side x patch_side before both networks
    attn_channels: tuple[int, ...] = (8, 16)  # widths of the attention CNN's conv layers (conv-ReLU-maxpool each)
    stem: int = 16  # channels of the embedding network's stride-2 stem conv
    blocks: tuple[tuple[int, int], ...] = ((24, 2), (24, 1), (48, 2), (48, 1))  # inverted residuals (out, stride)
    expand: int = 4  # expansion ratio of the inverted residual blocks
    patch_dim: int = 64  # E, one patch embedding
    dim: int = 128  # D, the image embedding
    seed: int = 0  # seed of the initialisation


def check_config(cfg: PatchNetConfig) -> list[int]:
    """The quadtree cell sizes of `cfg` after checking its fields (ValueError naming the field)."""
    sizes = check_quadtree(cfg.cell, cfg.min_cell, cfg.thresholds)
    if cfg.layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {cfg.layout!r}")
    if cfg.fixed_size not in sizes:
        raise ValueError(f"fixed_size must be one of the cell sizes {sizes}, got {cfg.fixed_size!r}")
    if cfg.image_size < cfg.cell or cfg.patch_side < 4 or cfg.temperature <= 0 or not 0 <= cfg.min_weight < 1:
        raise ValueError(f"image_size >= cell, patch_side >= 4, temperature > 0, 0 <= min_weight < 1 needed: {cfg}")
    return sizes


# --- pure functions of the (soft) quadtree ------------------------------------------------------------------------


def node_stats(
    cmap: torch.Tensor, valid_hw: torch.Tensor, sizes: Sequence[int]
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Per level, ((B, G, G) mean complexity over each cell's valid part, (B, G, G) bool cell has a valid pixel).

    `cmap` (B, H, W) with H, W multiples of sizes[0]; `valid_hw` (B, 2) the valid top-left region.
    """
    b, h, w = cmap.shape
    ys = torch.arange(h, device=cmap.device).view(1, h, 1)
    xs = torch.arange(w, device=cmap.device).view(1, 1, w)
    vh, vw = valid_hw[:, 0].view(b, 1, 1).to(cmap.device), valid_hw[:, 1].view(b, 1, 1).to(cmap.device)
    mask = ((ys < vh) & (xs < vw)).float()[:, None]  # (B, 1, H, W)
    c = (cmap[:, None] * mask).double()  # float64 sums: the same means as complexity.quadtree's
    means, exists = [], []
    for s in sizes:
        total = F.avg_pool2d(c, s) * (s * s)  # (B, 1, G, G)
        count = torch.round(F.avg_pool2d(mask.double(), s) * (s * s))
        means.append((total / count.clamp_min(1))[:, 0].float())
        exists.append(count[:, 0] > 0)
    return means, exists


def _up(x: torch.Tensor) -> torch.Tensor:
    """(B, G, G) -> (B, 2G, 2G), each cell copied to its 4 children."""
    return x.repeat_interleave(2, dim=1).repeat_interleave(2, dim=2)


def leaf_weights(
    means: Sequence[torch.Tensor],
    exists: Sequence[torch.Tensor],
    thresholds: torch.Tensor,
    temperature: float | None,
) -> list[torch.Tensor]:
    """Per level, (B, G, G) leaf weight w = P(reach) * (1 - p) (last level: P(reach)); see the module docstring.

    temperature None: the hard quadtree, p = 1 where mean > threshold (w in {0, 1}).
    """
    reach = exists[0].to(means[0].dtype)
    out = []
    for level in range(len(means)):
        if level == len(means) - 1:
            out.append(reach)
            break
        t = thresholds[level]
        if temperature is None:
            p = (means[level] > t).to(reach.dtype)
        else:
            p = torch.sigmoid((means[level] - t) / temperature)
        out.append(reach * (1 - p))
        reach = _up(reach * p) * exists[level + 1].to(reach.dtype)
    return out


def fixed_weights(exists: Sequence[torch.Tensor], level: int) -> list[torch.Tensor]:
    """Leaf weights of the fixed layout: 1 on every cell of `level` that has a valid pixel, 0 elsewhere."""
    return [e.float() if i == level else torch.zeros_like(e, dtype=torch.float32) for i, e in enumerate(exists)]


def expected_leaves(weights: Sequence[torch.Tensor]) -> torch.Tensor:
    """(B,) sum of leaf weights over all levels: the (expected) number of patches of each image."""
    return sum(w.sum(dim=(1, 2)) for w in weights)


def subdivision_cost(weights: Sequence[torch.Tensor], exists: Sequence[torch.Tensor]) -> torch.Tensor:
    """(B,) expected leaves / number of last-level cells with a valid pixel: in (0, 1], 1 = all split to min_cell."""
    return expected_leaves(weights) / exists[-1].sum(dim=(1, 2)).clamp_min(1).to(weights[0].dtype)


def level_patches(x: torch.Tensor, size: int, side: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, H/size, W/size, C, side, side): every size x size grid cell resized to side x side.

    Downscaling averages blocks (area), upscaling is bilinear; H and W must be multiples of `size`.
    """
    b, c, h, w = x.shape
    gh, gw = h // size, w // size
    if size > side:
        x = F.interpolate(x, size=(gh * side, gw * side), mode="area")
    elif size < side:
        x = F.interpolate(x, size=(gh * side, gw * side), mode="bilinear", align_corners=False)
    return x.view(b, c, gh, side, gw, side).permute(0, 2, 4, 1, 3, 5)


# --- the network ---------------------------------------------------------------------------------------------------


class AttentionCNN(nn.Module):
    """(P, 3, s, s) patches -> (P,) attention weights in (0, 1): [conv3x3-ReLU-maxpool] x n, mean, linear, sigmoid."""

    def __init__(self, channels: Sequence[int]) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        cin = 3
        for cout in channels:
            layers += [nn.Conv2d(cin, cout, 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(2)]
            cin = cout
        self.features = nn.Sequential(*layers)
        self.out = nn.Linear(cin, 1)
        nn.init.constant_(self.out.bias, 1.0)  # start near 0.73: every patch passes

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.out(self.features(patches).mean(dim=(2, 3)))[:, 0])


class PatchEmbedder(nn.Module):
    """(P, 3, s, s) -> (P, E): stride-2 stem, MobileNetV2 inverted residual blocks, 1x1 conv, global mean."""

    def __init__(self, cfg: PatchNetConfig) -> None:
        super().__init__()
        layers: list[nn.Module] = [Conv2dNormActivation(3, cfg.stem, 3, stride=2, activation_layer=nn.ReLU6)]
        cin = cfg.stem
        for cout, stride in cfg.blocks:
            layers.append(InvertedResidual(cin, cout, stride, cfg.expand))
            cin = cout
        layers.append(Conv2dNormActivation(cin, cfg.patch_dim, 1, activation_layer=nn.ReLU6))
        self.body = nn.Sequential(*layers)

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        return self.body(patches).mean(dim=(2, 3))


class PatchNet(nn.Module):
    """The seed-001 image embedding; `thresholds` (L - 1,) are learned split thresholds of the dynamic layout."""

    def __init__(self, cfg: PatchNetConfig = PatchNetConfig()) -> None:
        super().__init__()
        self.sizes = check_config(cfg)
        self.cfg = cfg
        torch.manual_seed(cfg.seed)
        self.thresholds = nn.Parameter(torch.tensor(cfg.thresholds, dtype=torch.float32))
        self.attention = AttentionCNN(cfg.attn_channels)
        self.embedder = PatchEmbedder(cfg)
        self.proj = nn.Linear(len(self.sizes) * cfg.patch_dim, cfg.dim)
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def weights(self, images: torch.Tensor, valid_hw: torch.Tensor, soft: bool) -> tuple[list, list]:
        """(leaf weights, exists) per level of (B, S, S, 3) uint8 images; S is padded up to a multiple of cell."""
        cfg = self.cfg
        if cfg.layout == "fixed":  # no complexity map: only which cells hold valid pixels matters
            cmap = _pad_to(torch.zeros(images.shape[:3], device=images.device), cfg.cell)
            _, exists = node_stats(cmap, valid_hw, self.sizes)
            return fixed_weights(exists, self.sizes.index(cfg.fixed_size)), exists
        cmap = _pad_to(complexity_map(images, cfg.sigma, cfg.scale, valid_hw), cfg.cell)  # (B, S', S')
        means, exists = node_stats(cmap, valid_hw, self.sizes)
        return leaf_weights(means, exists, self.thresholds, cfg.temperature if soft else None), exists

    def layout(self, images: torch.Tensor, valid_hw: torch.Tensor) -> list[np.ndarray]:
        """Per image, the (N, 3) int32 hard-layout leaves (x, y, size), sorted as roiqa.ops.complexity.quadtree's."""
        with torch.no_grad():
            weights, _ = self.weights(images, valid_hw, soft=False)
        out = []
        for b in range(len(images)):
            rows = []
            for w, s in zip(weights, self.sizes):
                gy, gx = torch.nonzero(w[b] > 0.5, as_tuple=True)
                rows.append(torch.stack([gx * s, gy * s, torch.full_like(gx, s)], dim=1))
            lay = torch.cat(rows).cpu().numpy().astype(np.int32)
            out.append(lay[np.lexsort((lay[:, 0], lay[:, 1], -lay[:, 2]))])
        return out

    def patch_features(self, patches: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(P, 3, s, s) normalised patches -> ((P,) attention weights a, (P, E) embeddings of a * patch)."""
        a = self.attention(patches)
        return a, self.embedder(patches * a[:, None, None, None])

    def forward(self, images: torch.Tensor, valid_hw: torch.Tensor, soft: bool = False) -> tuple[torch.Tensor, dict]:
        """(B, S, S, 3) uint8, (B, 2) valid sizes -> ((B, D) L2-normalised embeddings, aux).

        aux: "cost" (B,) subdivision cost, "leaves" (B,) expected (soft) or actual (hard) number of leaves,
        "embedded" (B,) patches that went through the networks.
        """
        cfg = self.cfg
        b = len(images)
        weights, exists = self.weights(images, valid_hw, soft)
        x = images.permute(0, 3, 1, 2).float() / 255.0
        x = _pad_to((x - self.mean) / self.std, cfg.cell)  # (B, 3, S', S'); padding is 0 after normalisation
        cut = cfg.min_weight if soft else 0.5
        patches, w_sel, bucket, owner = [], [], [], []
        for level, (w, s) in enumerate(zip(weights, self.sizes)):
            bi, gy, gx = torch.nonzero(w > cut, as_tuple=True)
            if len(bi) == 0:
                continue
            patches.append(level_patches(x, s, cfg.patch_side)[bi, gy, gx])  # (n, 3, side, side)
            w_sel.append(w[bi, gy, gx])
            bucket.append(bi * len(self.sizes) + level)
            owner.append(bi)
        n_levels, e_dim = len(self.sizes), cfg.patch_dim
        pooled = x.new_zeros(b * n_levels, e_dim)
        embedded = torch.zeros(b, dtype=torch.long, device=x.device)
        if patches:
            a, e = self.patch_features(torch.cat(patches))  # (P,), (P, E)
            w_all, bucket_all = torch.cat(w_sel).to(e.dtype), torch.cat(bucket)
            num = pooled.index_add(0, bucket_all, (w_all * a)[:, None] * e)
            den = x.new_zeros(b * n_levels).index_add(0, bucket_all, w_all).clamp_min(1.0)
            pooled = num / den[:, None]
            embedded = embedded.index_add(0, torch.cat(owner), torch.ones_like(bucket_all))
        emb = F.normalize(self.proj(pooled.view(b, n_levels * e_dim)), dim=-1)
        aux = {"cost": subdivision_cost(weights, exists), "leaves": expected_leaves(weights), "embedded": embedded}
        return emb, aux

    @torch.inference_mode()
    def embed_images(
        self, images: np.ndarray, valid_hw: np.ndarray, device: torch.device | str | None = None
    ) -> np.ndarray:
        """(B, H, W, 3) uint8 zero-padded images + (B, 2) valid sizes -> (B, D) float32 (hard layout, eval mode).

        Images are scaled by image_size / max(H, W) (bilinear, antialiased) and padded to image_size squares.
        """
        dev = torch.device(device) if device is not None else self.thresholds.device
        x = torch.from_numpy(np.ascontiguousarray(images)).to(dev)
        hw = torch.as_tensor(np.asarray(valid_hw).reshape(-1, 2), dtype=torch.long, device=dev)
        x, hw = fit_images(x, hw, self.cfg.image_size)
        emb, _ = self(x, hw)
        return emb.float().cpu().numpy()


def _pad_to(x: torch.Tensor, multiple: int) -> torch.Tensor:
    """Zero-pad the last two dims of x up to multiples of `multiple`."""
    h, w = x.shape[-2:]
    ph, pw = -h % multiple, -w % multiple
    return F.pad(x, (0, pw, 0, ph)) if ph or pw else x


def fit_images(images: torch.Tensor, valid_hw: torch.Tensor, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, H, W, 3) uint8 -> (B, size, size, 3) uint8 scaled by size / max(H, W) and zero-padded; sizes scaled."""
    b, h, w, _ = images.shape
    if (h, w) == (size, size):
        return images, valid_hw
    k = size / max(h, w)
    nh, nw = max(1, round(h * k)), max(1, round(w * k))
    x = F.interpolate(images.permute(0, 3, 1, 2).float(), size=(nh, nw), mode="bilinear", antialias=True)
    x = F.pad(x.round().clamp(0, 255).to(torch.uint8), (0, size - nw, 0, size - nh)).permute(0, 2, 3, 1)
    hw = torch.stack([(valid_hw[:, 0] * k).round().clamp(1, nh), (valid_hw[:, 1] * k).round().clamp(1, nw)], dim=1)
    return x.contiguous(), hw.long()


# --- cost, checkpoints --------------------------------------------------------------------------------------------


def flops_per_image(model: PatchNet, n_patches: int, image_size: int | None = None) -> int:
    """FLOPs (2 per multiply-add; convolutions and matrix multiplies, from FlopCounterMode) of embedding one image
    of side `image_size` (default the model's) whose layout has `n_patches` leaves: LoG complexity map (dynamic
    layout only), attention CNN and embedding network on every patch, projection. Resizing, pooling and
    elementwise ops are not counted.
    """
    from torch.utils.flop_counter import FlopCounterMode

    cfg, side = model.cfg, image_size or model.cfg.image_size
    dev = model.thresholds.device
    was_training = model.training
    model.eval()
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        if cfg.layout == "dynamic":
            complexity_map(torch.zeros(1, side, side, 3, dtype=torch.uint8, device=dev), cfg.sigma, cfg.scale)
        if n_patches > 0:
            model.patch_features(torch.zeros(n_patches, 3, cfg.patch_side, cfg.patch_side, device=dev))
        model.proj(torch.zeros(1, len(model.sizes) * cfg.patch_dim, device=dev))
    model.train(was_training)
    return int(counter.get_total_flops())


def _config_json(cfg: PatchNetConfig) -> str:
    return json.dumps(to_dict(cfg))


def save_patchnet(model: PatchNet, uri: str, extra: dict[str, str] | None = None) -> bytes:
    """Write weights (incl. learned thresholds and BatchNorm statistics) and config JSON to `uri` (.safetensors)."""
    from roiqa.models.checkpoint import save_weights

    return save_weights(model.state_dict(), uri, {CONFIG_KEY: _config_json(model.cfg), **(extra or {})})


def load_patchnet(uri: str) -> PatchNet:
    """A PatchNet in eval mode from a checkpoint written by save_patchnet; never unpickles."""
    from roiqa.models.checkpoint import load_weights, read_metadata

    data = uri_mod.read_bytes(uri)
    meta = read_metadata(data, uri)
    if CONFIG_KEY not in meta:
        raise ValueError(f"{uri}: safetensors file without {CONFIG_KEY!r} metadata is not a patch network")
    model = PatchNet(from_dict(PatchNetConfig, json.loads(meta[CONFIG_KEY]), f"{uri}:{CONFIG_KEY}"))
    return load_weights(model, data, uri).eval()
