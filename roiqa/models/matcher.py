"""The seed-003 matcher: ResNet+FPN features, phi/psi adapters, eq. 3 correlation, eq. 4 fusion, eq. 5 score."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import roi_align

from roiqa.config import ModelConfig
from roiqa.models.backbone import build_backbone
from roiqa.models.regions import Whitening
from roiqa.ops.fusion import lse_fuse, upsample_to
from roiqa.ops.gem import GeM, valid_mask
from roiqa.ops.xcorr import cosine_xcorr

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def identity_conv1x1(channels: int) -> nn.Conv2d:
    """A 1x1 convolution initialised to the identity (an untrained adapter leaves features unchanged)."""
    conv = nn.Conv2d(channels, channels, 1)
    with torch.no_grad():
        conv.weight.copy_(torch.eye(channels)[:, :, None, None])
        conv.bias.zero_()
    return conv


class ResidualMLP(nn.Module):
    """x + MLP(x) with the last layer zero-initialised: the identity until trained."""

    def __init__(self, channels: int, hidden: int | None = None) -> None:
        super().__init__()
        hidden = hidden or channels * 2
        self.fc1 = nn.Linear(channels, hidden)
        self.fc2 = nn.Linear(hidden, channels)
        nn.init.zeros_(self.fc2.weight)
        nn.init.zeros_(self.fc2.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fc2(F.relu(self.fc1(x)))


def lse_score(sims: torch.Tensor, beta: float) -> torch.Tensor:
    """s(I|q) = (1/beta) log((1/K) sum_k exp(beta * sims_k)) over the last dim: between mean and max of sims."""
    k = sims.shape[-1]
    return (torch.logsumexp(beta * sims, dim=-1) - math.log(k)) / beta


@dataclass
class Localization:
    """Where a query is in one image: `Matcher.localize`'s answer."""

    heat: torch.Tensor  # (H_f, W_f) fused eq. 4 heatmap, each cell's best over the query sizes
    boxes: torch.Tensor  # (K, 4) CPU float32 peak windows in input pixels, best first, after NMS
    peaks: torch.Tensor  # (K,) their heatmap values
    scales: torch.Tensor  # (K,) CPU index of the query size each box came from
    score: torch.Tensor | None  # eq. 5 LSE over the boxes' region similarities (None without a query descriptor)


class Matcher(nn.Module):
    """Backbone + FPN shared by query and search images, with the heads of seed 003.

    Inputs are (B, H, W, 3) uint8 images (or (B, 3, H, W) floats already normalised). Feature maps are keyed by
    pyramid level l (stride 2**l).
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed)
            if cfg.descriptor_level not in cfg.levels:
                raise ValueError(f"model.descriptor_level {cfg.descriptor_level} must be one of model.levels")
            self.body = build_backbone(cfg)
            ch = self.body.channels  # {level: channels}
            self.phi = nn.ModuleDict({str(lv): identity_conv1x1(ch[lv]) for lv in cfg.levels})  # query adapters
            self.psi = nn.ModuleDict({str(lv): identity_conv1x1(ch[lv]) for lv in cfg.levels})  # search adapters
            self.alpha_logit = nn.Parameter(torch.zeros(len(cfg.levels)))  # alpha = softmax(alpha_logit)
            self.log_gamma = nn.Parameter(torch.tensor(math.log(cfg.gamma)))
            self.gem = GeM(cfg.gem_p)
            # z and r_k (eq. 5) share a space: the finest level with an FPN (equal widths, as in seed 003), the
            # descriptor level without one (the body's levels differ in width).
            self.region_level = cfg.levels[0] if cfg.fpn_channels else cfg.descriptor_level
            self.dim = ch[cfg.descriptor_level]  # D of the global and regional index descriptors
            self.head = ResidualMLP(ch[self.region_level])
            self.whitening = Whitening(self.dim)  # the coarse stage's regional descriptors (identity until fitted)
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1) * 255.0, persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1) * 255.0, persistent=False)

    # --- features ------------------------------------------------------------------------------------------
    def normalize(self, images: torch.Tensor | np.ndarray) -> torch.Tensor:
        """(B, H, W, 3) uint8 -> (B, 3, H, W) float normalised with ImageNet statistics."""
        x = torch.as_tensor(images)
        if x.dtype == torch.uint8:
            x = x.to(self.mean.device).permute(0, 3, 1, 2).float()
            x = (x - self.mean) / self.std
        return x

    def pyramid(self, images: torch.Tensor | np.ndarray, bf16: bool = False) -> dict[int, torch.Tensor]:
        """{level: (B, C, H / 2**l, W / 2**l)} float32 FPN features; `bf16` runs the backbone in bf16 autocast on
        CUDA (inference: the features come back as float32)."""
        x = self.normalize(images)
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=bf16 and x.device.type == "cuda"):
            out = self.body(x)
        return {int(k): v.float() for k, v in out.items()}

    @staticmethod
    def stride(level: int) -> int:
        """Pixels per cell of pyramid level `level`."""
        return 2**level

    # --- descriptors ---------------------------------------------------------------------------------------
    def global_descriptor(self, feats: dict[int, torch.Tensor], valid_hw: torch.Tensor | None = None) -> torch.Tensor:
        """g = L2(head(GeM(X^l))) on `cfg.descriptor_level`, over the valid region when `valid_hw` (B, 2) is given."""
        lv = self.cfg.descriptor_level
        x = feats[lv]  # (B, C, H, W)
        mask = None if valid_hw is None else valid_mask(valid_hw.to(x.device), x.shape[-2:], self.stride(lv))
        return F.normalize(self.head(self.gem(x, mask)), dim=-1)

    def regional_descriptors(
        self, feats: dict[int, torch.Tensor], valid_hw: torch.Tensor | np.ndarray, whiten: bool = True
    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per image: whitened GeM descriptors (R, D) of the region grid over its valid cells of the descriptor
        level, and their boxes (R, 4) in input pixels (clipped to the valid region). The coarse stage's index rows.
        `whiten=False` gives the GeM descriptors before whitening (what the whitening is fitted on)."""
        from roiqa.models.regions import box_gem, region_grid

        lv = self.cfg.descriptor_level
        x, s = feats[lv], self.stride(lv)
        out = []
        for b, (vh, vw) in enumerate(np.asarray(valid_hw).reshape(-1, 2).tolist()):
            h, w = max(1, -(-int(vh) // s)), max(1, -(-int(vw) // s))
            cells = region_grid(h, w).to(x.device)
            desc = box_gem(x[b, :, :h, :w].float(), cells, float(self.gem.p))
            desc = self.whitening(desc) if whiten else desc
            boxes = cells.float() * s
            boxes = torch.minimum(boxes, torch.tensor([vw, vh, vw, vh], dtype=boxes.dtype, device=boxes.device))
            out.append((desc, boxes))
        return out

    def coarse_query_descriptor(self, feats: dict[int, torch.Tensor]) -> torch.Tensor:
        """Whitened GeM of a query patch's whole descriptor-level map, comparable with `regional_descriptors`. (B, D)"""
        x = feats[self.cfg.descriptor_level].float()
        return self.whitening(self.gem(x))

    def query_descriptor(self, feats: dict[int, torch.Tensor]) -> torch.Tensor:
        """z = L2(head(GeM(Z^{l*}))) on the region level (seed 003, section 2.4). (B, C)."""
        return F.normalize(self.head(self.gem(feats[self.region_level])), dim=-1)

    def region_descriptors(self, feat: torch.Tensor, boxes: torch.Tensor, level: int) -> torch.Tensor:
        """r_k = L2(head(GeM(ROIAlign(X^l, box_k)))) for boxes (K, 4) in input pixels of a (1, C, H, W) map. (K, C)."""
        rois = roi_align(
            feat,
            [boxes.to(feat.dtype)],
            output_size=(3, 3),
            spatial_scale=1.0 / self.stride(level),
            sampling_ratio=2,
            aligned=True,
        )  # (K, C, 3, 3)
        return F.normalize(self.head(self.gem(rois)), dim=-1)

    # --- dense matching ------------------------------------------------------------------------------------
    @property
    def alpha(self) -> torch.Tensor:
        return torch.softmax(self.alpha_logit, dim=0)

    @property
    def gamma(self) -> torch.Tensor:
        return self.log_gamma.exp()

    def level_heatmaps(self, query: dict[int, torch.Tensor], search: dict[int, torch.Tensor]) -> list[torch.Tensor]:
        """Eq. 3 at every level: query {l: (1, C, h, w)}, search {l: (B, C, H, W)} -> [(B, H_l, W_l)].

        With `cfg.center`, the query's mean feature is subtracted from both sides first. FPN features share a
        large common component (post-ReLU inputs; BatchNorm is the identity in an untrained network) that pushes
        every cosine towards 1; removing a per-query constant keeps one query's scores comparable across images
        (a per-image mean would not). Its measured gain is in benchmarks/RESULTS.md.
        """
        out = []
        for lv in self.cfg.levels:
            zq = self.phi[str(lv)](query[lv])[0]  # (C, h, w)
            xs = self.psi[str(lv)](search[lv])  # (B, C, H, W)
            if self.cfg.center:
                mu = zq.mean(dim=(1, 2), keepdim=True)  # (C, 1, 1), the query's mean feature
                zq, xs = zq - mu, xs - mu[None]
            out.append(cosine_xcorr(zq, xs))
        return out

    def fuse(self, heatmaps: list[torch.Tensor]) -> torch.Tensor:
        """Eq. 4: upsample every level to the finest and fuse with alpha and gamma. (B, H_finest, W_finest)."""
        size = heatmaps[0].shape[-2:]
        return lse_fuse(upsample_to(heatmaps, tuple(size)), self.alpha, self.gamma)

    def score(self, z: torch.Tensor, regions: torch.Tensor) -> torch.Tensor:
        """Eq. 5: LSE over k of <z, r_k>; z (C,), regions (K, C) -> scalar."""
        return lse_score(regions @ z, self.cfg.score_beta)

    def heatmap(
        self, scales: list[tuple[tuple[int, int], dict[int, torch.Tensor]]], feats: dict[int, torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Eqs. 3-4 for a query at one or more sizes: ((B, H_f, W_f) fused heatmap, each cell's best over the sizes;
        (B, H_f, W_f) index of the size that gave it). `scales`: per size ((h, w) px, {level: (1, C, h_l, w_l)})."""
        per_size = torch.stack([self.fuse(self.level_heatmaps(qf, feats)) for _, qf in scales])  # (S, B, H_f, W_f)
        return per_size.max(dim=0)

    def peak_boxes(
        self,
        heat: torch.Tensor,
        sizes: list[tuple[int, int]],
        k: int,
        nms_iou: float,
        size_index: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The windows of a (H_f, W_f) fused heatmap's local maxima after NMS: (boxes (<= k, 4) CPU, input pixels,
        best first; their peak values; the index of each box's query size). `sizes`: the query sizes (h, w) in
        pixels; `size_index` (H_f, W_f): which size each cell's value came from (None: the first). No gradient
        flows through the boxes."""
        from roiqa.boxes import feature_window_to_boxes
        from roiqa.ops.peaks import local_maxima, nms_peaks

        vals, rows, cols = local_maxima(heat.detach(), k=4 * k)
        rows, cols = rows.cpu(), cols.cpu()
        idx = torch.zeros(len(vals), dtype=torch.long) if size_index is None else size_index[rows, cols].cpu()
        hw = torch.tensor(sizes, dtype=torch.float32).reshape(-1, 2)[idx]
        boxes = feature_window_to_boxes(rows, cols, hw[:, 0], hw[:, 1], self.stride(self.cfg.levels[0]))
        keep = nms_peaks(boxes, vals.cpu(), nms_iou, k)
        return boxes[keep], vals[keep.to(vals.device)], idx[keep]

    def localize(
        self,
        scales: list[tuple[tuple[int, int], dict[int, torch.Tensor]]],
        feats: dict[int, torch.Tensor],
        z: torch.Tensor | None = None,
        peaks: int = 5,
        nms_iou: float = 0.3,
        valid_hw: tuple[int, int] | None = None,
    ) -> Localization:
        """The query in one image: heatmap over the query sizes -> local maxima -> NMS'd windows -> eq. 5 score.

        The one localisation path: the rerank, `forward`, and training's validation all call it. `feats`: the
        image's pyramid {level: (1, C, H_l, W_l)}, cropped here to `valid_hw` pixels when given; `z`: the eq. 5
        query descriptor (no score without it).
        """
        if valid_hw is not None:
            vh, vw = (int(v) for v in valid_hw)
            feats = {lv: f[..., : -(-vh // self.stride(lv)), : -(-vw // self.stride(lv))] for lv, f in feats.items()}
        heat, size_index = self.heatmap(scales, feats)
        heat, size_index = heat[0], size_index[0]
        boxes, vals, box_sizes = self.peak_boxes(heat, [hw for hw, _ in scales], peaks, nms_iou, size_index)
        score = None
        if z is not None:
            rl = self.region_level
            score = self.score(z, self.region_descriptors(feats[rl], boxes.to(heat.device), rl))
        return Localization(heat, boxes, vals, box_sizes, score)

    # --- the whole model -----------------------------------------------------------------------------------
    def patch_features(self, patch: np.ndarray, pad: int = 0, bf16: bool = False) -> dict[int, torch.Tensor]:
        """{level: (1, C, ceil(h / s), ceil(w / s))} features of one (h, w, 3) uint8 query patch, computed with
        `pad` pixels of mirrored context around it and cropped back to its cells: without the context the kernel's
        border cells carry the network's zero-padding response, which then matches image borders."""
        x = np.pad(patch, ((pad, pad), (pad, pad), (0, 0)), mode="symmetric") if pad else patch
        feats = self.pyramid(torch.from_numpy(np.array(x[None])).to(self.mean.device), bf16)
        h, w = patch.shape[:2]
        out = {}
        for lv, f in feats.items():
            s, o = self.stride(lv), pad // self.stride(lv)
            out[lv] = f[..., o : o + -(-h // s), o : o + -(-w // s)]
        return out

    def forward(
        self, query: np.ndarray, images: torch.Tensor | np.ndarray, peaks: int = 5, nms_iou: float = 0.3, pad: int = 32
    ) -> dict[str, torch.Tensor]:
        """One query patch against a batch of images at the patch's own scale (the rerank tries several scales).

        query: (h, w, 3) uint8 patch; images: (B, H, W, 3) uint8. Returns {"heatmap": (B, H_f, W_f) fused eq. 4
        map, "boxes": (B, K, 4) peak boxes (input pixels, best first; rows past a map's peaks repeat its best),
        "score": (B,) eq. 5 LSE over the K region similarities, "global": (B, C) index descriptors}.
        """
        query = np.asarray(query)
        qf = self.patch_features(query, pad)
        z = self.query_descriptor(qf)[0]
        feats = self.pyramid(images)
        heats, all_boxes, scores = [], [], []
        for b in range(len(next(iter(feats.values())))):
            loc = self.localize(
                [(query.shape[:2], qf)], {lv: f[b : b + 1] for lv, f in feats.items()}, z, peaks, nms_iou
            )
            heats.append(loc.heat)
            scores.append(loc.score)
            boxes = loc.boxes.to(loc.heat.device)
            all_boxes.append(torch.cat([boxes, boxes[:1].expand(peaks - len(boxes), 4)]))
        return {
            "heatmap": torch.stack(heats),
            "boxes": torch.stack(all_boxes),
            "score": torch.stack(scores),
            "global": self.global_descriptor(feats),
        }
