"""ResNet + feature pyramid backbone from torchvision, with weights only from a user-given local file or URI."""

from __future__ import annotations

import io

import torch
import torchvision
from torch import nn
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.ops.feature_pyramid_network import ExtraFPNBlock

from roiqa.config import ModelConfig

# Output channels of ResNet stages layer1..layer4 (pyramid levels 2..5, strides 4..32).
RESNET_CHANNELS = {
    "resnet18": (64, 128, 256, 512),
    "resnet34": (64, 128, 256, 512),
    "resnet50": (256, 512, 1024, 2048),
    "resnet101": (256, 512, 1024, 2048),
}


class _NoExtraLevels(ExtraFPNBlock):
    """Keeps the FPN to the requested levels (torchvision otherwise adds a max-pooled 'pool' level)."""

    def forward(self, results, x, names):  # noqa: D401 - torchvision's signature
        return results, names


def load_state_dict_bytes(data: bytes, name: str) -> dict[str, torch.Tensor]:
    """A state dict from safetensors or torch-serialised bytes, never unpickling arbitrary objects."""
    if data[:1] == b"{" or name.endswith(".safetensors") or _looks_like_safetensors(data):
        from safetensors.torch import load

        return load(data)
    obj = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise ValueError(f"{name}: expected a state dict, got {type(obj).__name__}")
    return obj


def _looks_like_safetensors(data: bytes) -> bool:
    if len(data) < 10:
        return False
    n = int.from_bytes(data[:8], "little")
    return 0 < n < len(data) and data[8:9] == b"{"


def build_backbone(cfg: ModelConfig) -> BackboneWithFPN:
    """ResNet body returning levels `cfg.levels` through an FPN with `cfg.fpn_channels` channels.

    Level l has stride 2**l: level 2 is ResNet's layer1, level 5 its layer4. Without `cfg.backbone_weights` the
    network is randomly initialised (torchvision's default init); nothing is downloaded.
    """
    if cfg.backbone not in RESNET_CHANNELS:
        raise ValueError(f"model.backbone: unknown {cfg.backbone!r}; choose one of {sorted(RESNET_CHANNELS)}")
    bad = [lv for lv in cfg.levels if lv not in (2, 3, 4, 5)]
    if bad or list(cfg.levels) != sorted(cfg.levels):
        raise ValueError(f"model.levels: must be increasing values in 2..5, got {list(cfg.levels)}")
    resnet: nn.Module = getattr(torchvision.models, cfg.backbone)(weights=None)
    if cfg.backbone_weights:
        from roiqa import uri

        state = load_state_dict_bytes(uri.read_bytes(cfg.backbone_weights), cfg.backbone_weights)
        missing, unexpected = resnet.load_state_dict(state, strict=False)
        missing = [k for k in missing if not k.startswith("fc.")]
        if missing:
            raise ValueError(f"{cfg.backbone_weights}: not {cfg.backbone} weights; missing {missing[:5]}...")
    channels = RESNET_CHANNELS[cfg.backbone]
    return_layers = {f"layer{lv - 1}": str(lv) for lv in cfg.levels}
    in_channels = [channels[lv - 2] for lv in cfg.levels]
    return BackboneWithFPN(resnet, return_layers, in_channels, cfg.fpn_channels, extra_blocks=_NoExtraLevels())
