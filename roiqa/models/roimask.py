"""Seed 004: a small ResNet classifier of one image region, given as a binary ROI mask beside the image.

The mask reaches the classification branch in one of three ways (`RoiMaskConfig.attention`):

- ``"side"``: a side branch (Eppel, "Classifying a specific image region using convolutional nets with an ROI mask
  as input"). For each merge point the mask is resized (area interpolation) to that layer's spatial size and goes
  through ONE convolution with as many filters as the layer has channels; the resulting attention map is merged
  into the layer's output by element-wise addition or multiplication. A separate convolution serves each merge
  point. The convolutions start with zero weights and zero bias (add) or bias one (mul), so at initialisation the
  branch has exactly no effect on the main branch.
- ``"hard"``: the baseline that blacks the background out (image times mask) and has no side branch.
- ``"none"``: the mask is ignored (a whole-image classifier).

Merge points are the output of the first convolution (``"stem"``, before its BatchNorm and ReLU, as in the seed's
code) and the outputs of the stages ``"layer1"`` .. ``"layer4"``. The network returns cosine-softmax class logits
(training) and the L2-normalised pooled feature (the embedding used for verification). Checkpoints are one
safetensors file whose metadata holds the config as JSON; loading never unpickles.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.resnet import BasicBlock

from roiqa.config import from_dict, to_dict
from roiqa.io import uri as uri_mod
from roiqa.models.checkpoint import load_weights, read_metadata, save_weights

CONFIG_KEY = "roiqa.roimask_config"
ATTENTION = ("side", "hard", "none")
MERGE_OPS = ("add", "mul")
LAYERS = ("stem", "layer1", "layer2", "layer3", "layer4")  # merge points, in forward order
# Named variants of the experiment: merge -> (attention, merge points). A dict lookup, not a registry.
MERGES: dict[str, tuple[str, tuple[str, ...]]] = {
    "first": ("side", ("stem",)),
    "stage2": ("side", ("layer2",)),
    "deep": ("side", ("layer3",)),
    "multi": ("side", ("stem", "layer1", "layer2", "layer3")),
    "hard": ("hard", ()),
    "none": ("none", ()),
}
_MEAN = (0.485, 0.456, 0.406)
_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class RoiMaskConfig:
    input_size: int = 96  # side of the square input image and mask (pixels)
    widths: tuple[int, ...] = (32, 64, 96, 128)  # channels of stage 1..4 (the stem has widths[0])
    blocks: tuple[int, ...] = (1, 1, 1, 1)  # BasicBlocks per stage
    attention: str = "side"  # how the mask enters: side (attention-map branch) | hard (image * mask) | none
    merge_points: tuple[str, ...] = ("stem",)  # side only: layers the attention maps merge into (see LAYERS)
    merge_op: str = "add"  # side only: element-wise add (conv init w=0, b=0) or mul (w=0, b=1)
    mask_kernel: int = 3  # side only: kernel size of each side-branch convolution
    num_classes: int = 200  # training instances (cosine-softmax classes)
    logit_scale: float = 16.0  # cosine-softmax temperature: logits = scale * cos(embedding, class weight)
    seed: int = 0  # seed of the random initialisation


def variant_config(merge: str, op: str = "add", **kwargs) -> RoiMaskConfig:
    """The RoiMaskConfig of a named variant (MERGES key) and merge op; other fields from `kwargs`."""
    if merge not in MERGES:
        raise ValueError(f"merge: unknown variant {merge!r}; choose one of {sorted(MERGES)}")
    attention, points = MERGES[merge]
    return check_config(RoiMaskConfig(attention=attention, merge_points=points, merge_op=op, **kwargs))


def check_config(cfg: RoiMaskConfig) -> RoiMaskConfig:
    """`cfg` if usable, else ValueError naming the field."""
    checks = [
        (cfg.attention in ATTENTION, "attention", f"must be one of {ATTENTION}"),
        (cfg.merge_op in MERGE_OPS, "merge_op", f"must be one of {MERGE_OPS}"),
        (all(p in LAYERS for p in cfg.merge_points), "merge_points", f"must be names from {LAYERS}"),
        (len(set(cfg.merge_points)) == len(cfg.merge_points), "merge_points", "must not repeat a layer"),
        (cfg.attention == "side" or not cfg.merge_points, "merge_points", "only the side attention has merge points"),
        (cfg.attention != "side" or bool(cfg.merge_points), "merge_points", "side attention needs a merge point"),
        (len(cfg.widths) == 4 and min(cfg.widths) >= 1, "widths", "must be 4 positive channel counts"),
        (len(cfg.blocks) == 4 and min(cfg.blocks) >= 1, "blocks", "must be 4 positive block counts"),
        (cfg.input_size >= 16, "input_size", "must be >= 16"),
        (cfg.num_classes >= 2, "num_classes", "must be >= 2"),
        (cfg.mask_kernel % 2 == 1, "mask_kernel", "must be odd"),
    ]
    for ok, name, why in checks:
        if not ok:
            raise ValueError(f"roimask.{name} {why}; got {getattr(cfg, name)!r}")
    return cfg


def resize_mask(mask: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
    """(B, 1, H, W) mask -> (B, 1, h, w) by area interpolation (the fraction of each cell inside the ROI).

    Area rather than nearest: a region a few pixels wide still leaves a trace on an 8x coarser map.
    """
    if tuple(mask.shape[-2:]) == tuple(hw):
        return mask
    return F.interpolate(mask, size=tuple(hw), mode="area")


def hard_attention(images: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """The hard-attention input: (B, 3, H, W) images times (B, 1, H, W) masks (background blacked out)."""
    return images * masks


def attention_conv(channels: int, op: str, kernel: int = 3) -> nn.Conv2d:
    """One side-branch convolution mask (1 channel) -> attention map (`channels`), initialised to merge as a no-op."""
    conv = nn.Conv2d(1, channels, kernel, padding=kernel // 2)
    nn.init.zeros_(conv.weight)
    nn.init.constant_(conv.bias, 0.0 if op == "add" else 1.0)
    return conv


def merge(x: torch.Tensor, attention_map: torch.Tensor, op: str) -> torch.Tensor:
    """Merge an attention map into a layer's output (both (B, C, h, w)) by element-wise add or mul."""
    return x + attention_map if op == "add" else x * attention_map


def _stage(cin: int, cout: int, blocks: int, stride: int) -> nn.Sequential:
    down = None
    if stride != 1 or cin != cout:
        down = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
    layers = [BasicBlock(cin, cout, stride, down)] + [BasicBlock(cout, cout) for _ in range(blocks - 1)]
    return nn.Sequential(*layers)


class RoiMaskNet(nn.Module):
    """ResNet-style classifier of the ROI given by a mask; see the module docstring.

    forward(images (B, 3, S, S) float in [0, 1], masks (B, 1, S, S) float in [0, 1]) -> (logits (B, num_classes),
    embedding (B, widths[-1]) L2-normalised). Output strides as in torchvision's ResNet: stem 2, layer1 4, layer2 8,
    layer3 16, layer4 32.
    """

    def __init__(self, cfg: RoiMaskConfig = RoiMaskConfig()):
        super().__init__()
        self.cfg = check_config(cfg)
        torch.manual_seed(cfg.seed)
        w = cfg.widths
        self.stem = nn.Conv2d(3, w[0], 3, stride=2, padding=1, bias=False)
        self.stem_bn = nn.BatchNorm2d(w[0])
        self.layer1 = _stage(w[0], w[0], cfg.blocks[0], 2)  # ResNet's maxpool stride, as a strided block
        self.layer2 = _stage(w[0], w[1], cfg.blocks[1], 2)
        self.layer3 = _stage(w[1], w[2], cfg.blocks[2], 2)
        self.layer4 = _stage(w[2], w[3], cfg.blocks[3], 2)
        channels = dict(zip(LAYERS, (w[0], w[0], w[1], w[2], w[3])))
        self.side = nn.ModuleDict(
            {p: attention_conv(channels[p], cfg.merge_op, cfg.mask_kernel) for p in cfg.merge_points}
        )
        self.class_weight = nn.Parameter(torch.randn(cfg.num_classes, w[3]) * w[3] ** -0.5)  # (K, D)
        self.register_buffer("mean", torch.tensor(_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(_STD).view(1, 3, 1, 1), persistent=False)

    def _merge(self, name: str, x: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        if name not in self.side:
            return x
        return merge(x, self.side[name](resize_mask(masks, x.shape[-2:])), self.cfg.merge_op)

    def features(self, images: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S), (B, 1, S, S) -> (B, D) pooled features of the last stage (not normalised)."""
        if self.cfg.attention == "hard":
            images = hard_attention(images, masks)
        x = (images - self.mean) / self.std
        x = self._merge("stem", self.stem(x), masks)  # (B, w0, S/2, S/2)
        x = F.relu(self.stem_bn(x))
        for name in LAYERS[1:]:
            x = self._merge(name, getattr(self, name)(x), masks)
        return x.mean(dim=(2, 3))  # (B, D)

    def forward(self, images: torch.Tensor, masks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        emb = F.normalize(self.features(images, masks), dim=1)  # (B, D)
        logits = self.cfg.logit_scale * emb @ F.normalize(self.class_weight, dim=1).T  # (B, K)
        return logits, emb

    @torch.no_grad()
    def embed(self, images: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        """(B, D) L2-normalised embeddings (eval mode is the caller's business)."""
        return F.normalize(self.features(images, masks), dim=1)


# =============================================================================================================
# Checkpoints
# =============================================================================================================


def save_roimask(
    model: RoiMaskNet, uri: str, extra: dict[str, str] | None = None, dtype: torch.dtype | None = torch.float16
) -> bytes:
    """Write weights + config (+ `extra` string metadata) as safetensors to `uri`; returns the bytes written.

    `dtype` stores floating-point weights at that precision (None: as they are); loading casts back to float32.
    """
    return save_weights(model.state_dict(), uri, {CONFIG_KEY: json.dumps(to_dict(model.cfg)), **(extra or {})}, dtype)


def load_roimask(uri: str) -> tuple[RoiMaskNet, dict[str, str]]:
    """(model in eval mode, the file's metadata) from a checkpoint written by `save_roimask`; errors name `uri`."""
    try:
        data = uri_mod.read_bytes(uri)
    except FileNotFoundError as exc:
        raise FileNotFoundError(f"{uri}: verifier checkpoint not found") from exc
    meta = read_metadata(data, uri)
    if CONFIG_KEY not in meta:
        raise ValueError(f"{uri}: safetensors file without {CONFIG_KEY!r} metadata is not a RoiMaskNet checkpoint")
    try:
        cfg = from_dict(RoiMaskConfig, json.loads(meta[CONFIG_KEY]), where=f"{uri}:{CONFIG_KEY}")
    except json.JSONDecodeError as exc:
        raise ValueError(f"{uri}: {CONFIG_KEY} metadata is not JSON ({exc})") from exc
    model = RoiMaskNet(check_config(cfg))
    load_weights(model, data, uri)
    return model.eval(), meta
