"""Tests of roiqa.models: the matcher's shapes and identity-at-init heads, checkpoints, and backbone weight loading."""

from __future__ import annotations

import dataclasses
import io
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision
from safetensors.torch import save as st_save

from roiqa.config import ModelConfig, to_dict
from roiqa.models.backbone import build_backbone, load_state_dict_bytes
from roiqa.models.checkpoint import CONFIG_KEY, describe, load_matcher, read_metadata, save_matcher
from roiqa.models.matcher import Matcher, ResidualMLP, lse_score
from roiqa.ops.gem import gem
from roiqa.ops.xcorr import cosine_xcorr

CFG = ModelConfig(backbone="resnet18", backbone_weights=None, fpn_channels=16)


class _NotATensor:
    """An arbitrary class: loading a pickle of it must be refused (weights_only)."""


@pytest.fixture(scope="module")
def model() -> Matcher:
    return Matcher(CFG).eval()


def _images(b: int, h: int, w: int, seed: int = 0) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    return torch.from_numpy(rng.integers(0, 256, size=(b, h, w, 3), dtype=np.uint8))


def _state_equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# --- matcher --------------------------------------------------------------------------------------------------


@torch.no_grad()
def test_pyramid_shapes(model: Matcher) -> None:
    feats = model.pyramid(_images(2, 64, 96))
    assert sorted(feats) == [3, 4, 5]
    for lv, stride in [(3, 8), (4, 16), (5, 32)]:
        assert model.stride(lv) == stride
        assert feats[lv].shape == (2, 16, 64 // stride, 96 // stride)
        assert torch.isfinite(feats[lv]).all()


@torch.no_grad()
def test_normalize_uint8_uses_imagenet_stats(model: Matcher) -> None:
    img = torch.full((1, 2, 2, 3), 128, dtype=torch.uint8)
    out = model.normalize(img)
    assert out.shape == (1, 3, 2, 2)
    expected = [(128 / 255 - m) / s for m, s in zip((0.485, 0.456, 0.406), (0.229, 0.224, 0.225), strict=True)]
    assert out[0, :, 0, 0].tolist() == pytest.approx(expected, rel=1e-5)
    x = torch.randn(1, 3, 4, 4)
    assert model.normalize(x) is x or torch.equal(model.normalize(x), x)  # floats pass through


@torch.no_grad()
def test_adapters_are_identity_at_init(model: Matcher) -> None:
    x = torch.randn(2, 16, 5, 7)
    for lv in CFG.levels:
        torch.testing.assert_close(model.phi[str(lv)](x), x, rtol=0, atol=1e-7)
        torch.testing.assert_close(model.psi[str(lv)](x), x, rtol=0, atol=1e-7)


@torch.no_grad()
def test_head_is_identity_at_init(model: Matcher) -> None:
    x = torch.randn(6, 16)
    torch.testing.assert_close(model.head(x), x, rtol=0, atol=0)
    assert model.head.fc1.weight.abs().sum() > 0  # only the last layer is zero


def test_residual_mlp_not_identity_once_trained() -> None:
    mlp = ResidualMLP(4)
    with torch.no_grad():
        mlp.fc2.weight.fill_(0.1)
    x = torch.randn(3, 4)
    expected = x + F.relu(x @ mlp.fc1.weight.T + mlp.fc1.bias) @ mlp.fc2.weight.T + mlp.fc2.bias
    torch.testing.assert_close(mlp(x), expected)
    assert not torch.allclose(mlp(x), x)


def test_alpha_and_gamma_at_init() -> None:
    m = Matcher(ModelConfig(backbone="resnet18", backbone_weights=None, fpn_channels=16, gamma=7.5))
    assert m.alpha.shape == (3,)
    assert m.alpha.sum().item() == pytest.approx(1.0, abs=1e-6)
    torch.testing.assert_close(m.alpha, torch.full((3,), 1 / 3))
    assert m.gamma.item() == pytest.approx(7.5, rel=1e-6)
    assert m.gem.p.item() == pytest.approx(CFG.gem_p)


@torch.no_grad()
def test_global_descriptor_unit_norm_and_reference(model: Matcher) -> None:
    feats = model.pyramid(_images(3, 64, 96, seed=1))
    g = model.global_descriptor(feats)
    assert g.shape == (3, 16)
    torch.testing.assert_close(g.norm(dim=1), torch.ones(3))
    # head is the identity at init: g = L2(GeM_p(X^4)) by hand
    x = feats[CFG.descriptor_level]
    ref = F.normalize(gem(x, CFG.gem_p), dim=-1)
    torch.testing.assert_close(g, ref, rtol=1e-5, atol=1e-6)


@torch.no_grad()
def test_global_descriptor_masked_equals_gem_of_crop(model: Matcher) -> None:
    imgs = _images(2, 64, 96, seed=2)
    imgs[1, 40:, :] = 0  # zero padding at the bottom and right of image 1
    imgs[1, :, 50:] = 0
    feats = model.pyramid(imgs)
    valid_hw = torch.tensor([[64, 96], [40, 50]])
    g = model.global_descriptor(feats, valid_hw)
    x = feats[4]  # stride 16: image 1 covers ceil(40/16) = 3 rows, ceil(50/16) = 4 cols
    ref0 = F.normalize(gem(x[:1], 3.0), dim=-1)[0]
    ref1 = F.normalize(gem(x[1:, :, :3, :4], 3.0), dim=-1)[0]
    torch.testing.assert_close(g[0], ref0, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(g[1], ref1, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(g.norm(dim=1), torch.ones(2))
    # the mask matters: without it image 1's padding cells are pooled too
    assert not torch.allclose(model.global_descriptor(feats)[1], g[1], atol=1e-4)


@torch.no_grad()
def test_query_descriptor_uses_finest_level(model: Matcher) -> None:
    feats = model.pyramid(_images(1, 32, 32, seed=3))
    z = model.query_descriptor(feats)
    torch.testing.assert_close(z, F.normalize(gem(feats[3], 3.0), dim=-1), rtol=1e-5, atol=1e-6)


def test_lse_score_hand_value_and_bounds() -> None:
    sims = torch.tensor([0.2, 0.8], dtype=torch.float64)
    out = lse_score(sims, beta=10.0)
    expected = math.log((math.exp(2.0) + math.exp(8.0)) / 2) / 10
    assert out.item() == pytest.approx(expected, rel=1e-12)
    assert 0.5 < out.item() < 0.8
    g = torch.Generator().manual_seed(0)
    batch = torch.rand(20, 5, generator=g, dtype=torch.float64) * 2 - 1
    for beta in (0.1, 1.0, 10.0, 100.0):
        s = lse_score(batch, beta)
        assert s.shape == (20,)
        assert torch.all(s >= batch.mean(dim=-1) - 1e-12)
        assert torch.all(s <= batch.amax(dim=-1) + 1e-12)
    assert lse_score(torch.tensor([0.3, 0.3, 0.3]), 10.0).item() == pytest.approx(0.3, rel=1e-6)


def test_matcher_score_uses_score_beta(model: Matcher) -> None:
    z = F.normalize(torch.randn(16), dim=0)
    regions = F.normalize(torch.randn(4, 16), dim=1)
    sims = regions @ z
    expected = (torch.logsumexp(CFG.score_beta * sims, 0) - math.log(4)) / CFG.score_beta
    torch.testing.assert_close(model.score(z, regions), expected)


@torch.no_grad()
def test_region_descriptors_shape_norm_and_constant_map(model: Matcher) -> None:
    g = torch.Generator().manual_seed(4)
    feat = torch.randn(1, 16, 8, 12, generator=g)
    boxes = torch.tensor([[0.0, 0.0, 32.0, 32.0], [10.0, 5.0, 90.0, 60.0], [40.0, 20.0, 48.0, 28.0]])
    r = model.region_descriptors(feat, boxes, level=3)
    assert r.shape == (3, 16)
    torch.testing.assert_close(r.norm(dim=1), torch.ones(3))
    # constant positive feature map: ROIAlign and GeM keep the constant, the head is the identity -> L2(v)
    v = torch.rand(16, generator=g) + 0.1
    const = v[None, :, None, None].expand(1, 16, 8, 12).contiguous()
    rc = model.region_descriptors(const, boxes, level=3)
    torch.testing.assert_close(rc, F.normalize(v, dim=0).expand(3, 16), rtol=1e-5, atol=1e-6)


@torch.no_grad()
def test_region_descriptors_read_the_box_location(model: Matcher) -> None:
    # Left half of the stride-8 map (cols 0..5, pixels 0..47) holds u, right half (cols 6..11) holds v. ROIAlign
    # with aligned=True samples feature x = px / 8 - 0.5, so a box over pixels 0..32 sees only u and one over
    # pixels 60..96 (feature 7.0..11.5) only v; each descriptor is then L2(u) or L2(v) exactly.
    u = torch.full((16,), 0.05)
    u[0] = 1.0
    v = torch.full((16,), 0.05)
    v[1] = 2.0
    feat = torch.empty(1, 16, 8, 12)
    feat[0, :, :, :6] = u[:, None, None]
    feat[0, :, :, 6:] = v[:, None, None]
    boxes = torch.tensor([[0.0, 0.0, 32.0, 64.0], [60.0, 0.0, 96.0, 64.0], [8.0, 16.0, 40.0, 48.0]])
    r = model.region_descriptors(feat, boxes, level=3)
    expected = torch.stack([F.normalize(u, dim=0), F.normalize(v, dim=0), F.normalize(u, dim=0)])
    torch.testing.assert_close(r, expected, rtol=1e-5, atol=1e-6)


@torch.no_grad()
def test_level_heatmaps_and_fuse(model: Matcher) -> None:
    query = model.pyramid(_images(1, 32, 32, seed=5))
    search = model.pyramid(_images(2, 64, 96, seed=6))
    hms = model.level_heatmaps(query, search)
    assert [tuple(h.shape) for h in hms] == [(2, 8, 12), (2, 4, 6), (2, 2, 3)]
    # adapters are the identity at init: eq. 3 on the raw features, centred on the query's mean feature
    for lv, h in zip(CFG.levels, hms, strict=True):
        mu = query[lv][0].mean(dim=(1, 2), keepdim=True)  # (C, 1, 1)
        torch.testing.assert_close(h, cosine_xcorr(query[lv][0] - mu, search[lv] - mu[None]), rtol=1e-5, atol=1e-6)
        assert h.abs().max() <= 1 + 1e-5
    # without centring: eq. 3 on the raw features exactly
    raw = Matcher(dataclasses.replace(CFG, center=False))
    raw.load_state_dict(model.state_dict())
    for lv, h in zip(CFG.levels, raw.level_heatmaps(query, search), strict=True):
        torch.testing.assert_close(h, cosine_xcorr(query[lv][0], search[lv]), rtol=1e-5, atol=1e-6)
    fused = model.fuse(hms)
    assert fused.shape == (2, 8, 12)
    assert torch.isfinite(fused).all()
    # fusing constant maps gives the constant back (alpha sums to 1)
    consts = [torch.full((2, 8, 12), 0.4), torch.full((2, 4, 6), 0.4), torch.full((2, 2, 3), 0.4)]
    torch.testing.assert_close(model.fuse(consts), torch.full((2, 8, 12), 0.4))
    # fused values lie between the per-cell min and max of the upsampled levels
    up = torch.stack([F.interpolate(h[:, None], size=(8, 12), mode="bilinear")[:, 0] for h in hms])
    assert torch.all(fused <= up.amax(0) + 1e-5) and torch.all(fused >= up.amin(0) - 1e-5)


def _naive_localize(model: Matcher, scales, feats, valid_hw, z, k: int, nms_iou: float):
    """Reference for Matcher.localize with plain loops: crop, per-size heatmaps, a 3x3 local-maximum scan, windows
    from the kernel-centre rule, greedy NMS by hand, LSE over the kept windows' region similarities."""
    vh, vw = valid_hw
    crop = {
        lv: f[..., : math.ceil(vh / model.stride(lv)), : math.ceil(vw / model.stride(lv))] for lv, f in feats.items()
    }
    per = [model.fuse(model.level_heatmaps(qf, crop))[0] for _, qf in scales]
    heat = torch.stack(per).amax(0)
    h, w = heat.shape
    s = model.stride(model.cfg.levels[0])
    cands = []
    for r in range(h):
        for c in range(w):
            around = heat[max(0, r - 1) : r + 2, max(0, c - 1) : c + 2]
            if heat[r, c] >= around.max():
                size = int(np.argmax([float(p[r, c]) for p in per]))  # the first size on a tie, as torch.max
                qh, qw = scales[size][0]
                x0, y0 = (c - math.ceil(qw / s) // 2) * s, (r - math.ceil(qh / s) // 2) * s
                cands.append((float(heat[r, c]), [x0, y0, x0 + qw, y0 + qh], size))
    cands = sorted(cands, key=lambda t: -t[0])[: 4 * k]

    def iou(a, b):
        iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
        ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
        inter = iw * ih
        return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)

    kept = []
    for cand in cands:
        if all(iou(cand[1], other[1]) <= nms_iou for other in kept):
            kept.append(cand)
    kept = kept[:k]
    boxes = torch.tensor([b for _, b, _ in kept], dtype=torch.float32)
    rl = model.region_level
    regions = model.region_descriptors(crop[rl], boxes, rl)
    sims = regions @ z
    score = torch.logsumexp(model.cfg.score_beta * sims, 0) - math.log(len(sims))
    return heat, boxes, [v for v, _, _ in kept], [i for _, _, i in kept], score / model.cfg.score_beta


@torch.no_grad()
def test_localize_matches_a_naive_peak_search(model: Matcher) -> None:
    image = _images(1, 96, 128, seed=8)
    patch = np.asarray(image[0, 24:56, 40:88])
    feats = model.pyramid(image)
    small = np.ascontiguousarray(patch[4:28, 6:42])  # a second query size: a part of it
    scales = [((32, 48), model.patch_features(patch, 16)), ((24, 36), model.patch_features(small, 16))]
    z = model.query_descriptor(model.patch_features(patch, 16))[0]
    loc = model.localize(scales, feats, z, peaks=4, nms_iou=0.3, valid_hw=(88, 120))
    heat, boxes, vals, sizes, score = _naive_localize(model, scales, feats, (88, 120), z, 4, 0.3)
    assert loc.heat.shape == (11, 15)
    torch.testing.assert_close(loc.heat, heat)
    torch.testing.assert_close(loc.boxes, boxes)
    np.testing.assert_allclose(loc.peaks.numpy(), vals, rtol=1e-6)
    assert loc.scales.tolist() == sizes
    torch.testing.assert_close(loc.score, score, rtol=1e-5, atol=1e-6)
    # one size and no descriptor: what training's validation asks
    one = model.localize(scales[:1], feats, None, peaks=1)
    assert one.score is None and one.boxes.shape == (1, 4) and one.heat.shape == (12, 16)


@torch.no_grad()
def test_forward_is_localize_per_image(model: Matcher) -> None:
    images = _images(2, 64, 96, seed=10)
    patch = np.ascontiguousarray(np.asarray(images[1, 16:48, 24:56]))
    out = model(patch, images, peaks=3, nms_iou=0.3, pad=16)
    qf = model.patch_features(patch, 16)
    z = model.query_descriptor(qf)[0]
    feats = model.pyramid(images)
    for b in range(2):
        loc = model.localize([((32, 32), qf)], {lv: f[b : b + 1] for lv, f in feats.items()}, z, 3, 0.3)
        torch.testing.assert_close(out["heatmap"][b], loc.heat)
        torch.testing.assert_close(out["score"][b], loc.score)
        n = len(loc.boxes)
        torch.testing.assert_close(out["boxes"][b, :n], loc.boxes)
        assert torch.equal(out["boxes"][b, n:], loc.boxes[:1].expand(3 - n, 4))


def test_same_seed_same_weights_different_seed_different() -> None:
    torch.manual_seed(123)
    before = torch.rand(3)
    torch.manual_seed(123)
    a = Matcher(ModelConfig(backbone="resnet18", backbone_weights=None, fpn_channels=16, seed=5))
    after = torch.rand(3)
    assert torch.equal(before, after)  # the global RNG is left untouched
    b = Matcher(ModelConfig(backbone="resnet18", backbone_weights=None, fpn_channels=16, seed=5))
    c = Matcher(ModelConfig(backbone="resnet18", backbone_weights=None, fpn_channels=16, seed=6))
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert _state_equal(sa, sb)
    assert sa.keys() == sc.keys()
    assert not torch.equal(sa["body.body.conv1.weight"], sc["body.body.conv1.weight"])
    assert not torch.equal(sa["body.fpn.inner_blocks.0.0.weight"], sc["body.fpn.inner_blocks.0.0.weight"])


# --- checkpoints ----------------------------------------------------------------------------------------------


def test_save_load_round_trip(tmp_path) -> None:
    cfg = ModelConfig(
        backbone="resnet18",
        backbone_weights=None,
        fpn_channels=16,
        gamma=5.0,
        gem_p=2.5,
        seed=3,
        levels=(3, 4),
        descriptor_level=3,
    )
    m = Matcher(cfg)
    with torch.no_grad():
        m.alpha_logit.add_(torch.tensor([0.3, -0.2]))  # not the init values
        m.head.fc2.weight.normal_()
    path = str(tmp_path / "ckpt" / "m.safetensors")
    data = save_matcher(m, path, extra={"note": "hello"})
    assert open(path, "rb").read() == data
    meta = read_metadata(data, path)
    assert meta["note"] == "hello" and CONFIG_KEY in meta
    loaded = load_matcher(path)
    assert loaded.cfg == cfg
    assert _state_equal(m.state_dict(), loaded.state_dict())
    # a different cfg passed in loses to the checkpoint's own
    assert load_matcher(path, ModelConfig(backbone="resnet18", backbone_weights=None, fpn_channels=32)).cfg == cfg
    d = describe(path, ModelConfig())
    assert d["uri"] == path and d["weights"] == "checkpoint" and d["config"] == to_dict(cfg)


def test_load_matcher_none_is_random_init() -> None:
    cfg = ModelConfig(backbone="resnet18", backbone_weights=None, fpn_channels=16, seed=2)
    assert _state_equal(load_matcher(None, cfg).state_dict(), Matcher(cfg).state_dict())


def test_load_pickle_as_safetensors_is_value_error(tmp_path) -> None:
    path = tmp_path / "evil.safetensors"
    torch.save({"w": torch.zeros(2)}, path)
    with pytest.raises(ValueError, match="evil.safetensors"):
        load_matcher(str(path))


def test_load_random_bytes_is_value_error(tmp_path) -> None:
    path = tmp_path / "noise.safetensors"
    path.write_bytes(np.random.default_rng(0).integers(0, 256, size=4096, dtype=np.uint8).tobytes())
    with pytest.raises(ValueError, match="noise.safetensors"):
        load_matcher(str(path))
    bad_json = tmp_path / "badjson.safetensors"
    bad_json.write_bytes((10).to_bytes(8, "little") + b"not json!!" + b"\0" * 10)
    with pytest.raises(ValueError, match="badjson.safetensors: not a safetensors checkpoint"):
        load_matcher(str(bad_json))


def test_load_safetensors_without_metadata(tmp_path) -> None:
    path = tmp_path / "plain.safetensors"
    path.write_bytes(st_save({"x": torch.zeros(3)}))
    with pytest.raises(ValueError, match=r"plain\.safetensors.*roiqa\.model_config"):
        load_matcher(str(path))


def test_load_checkpoint_with_mismatched_weights(tmp_path) -> None:
    path = tmp_path / "mismatch.safetensors"
    meta = {CONFIG_KEY: '{"fpn_channels": 16}'}
    path.write_bytes(st_save({"x": torch.zeros(3)}, metadata=meta))
    with pytest.raises(ValueError, match="mismatch.safetensors: weights do not match"):
        load_matcher(str(path))


def test_read_metadata_truncated(tmp_path) -> None:
    data = save_matcher(Matcher(CFG), str(tmp_path / "m.safetensors"))
    n = int.from_bytes(data[:8], "little")
    for cut in (0, 5, 8, 20, 8 + n - 1):
        with pytest.raises(ValueError, match="cut.bin: not a safetensors checkpoint"):
            read_metadata(data[:cut], "cut.bin")
    with pytest.raises(ValueError, match="bad header length"):  # detected from the length, before parsing JSON
        read_metadata(data[: 8 + n - 1], "cut.bin")
    assert CONFIG_KEY in read_metadata(data[: 8 + n], "header-only")  # the header alone is enough
    with pytest.raises(ValueError, match="bad header length"):
        read_metadata(b"\0" * 16, "zeros")


def test_describe_random_init() -> None:
    cfg = ModelConfig(backbone="resnet18", backbone_weights=None, fpn_channels=16, seed=42)
    d = describe(None, cfg)
    assert d == {"uri": None, "weights": "random-init(seed=42)", "config": to_dict(cfg)}
    d2 = describe(None, ModelConfig(backbone_weights="/w/r18.pth"))
    assert d2["weights"] == "backbone:/w/r18.pth"


# --- backbone -------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def resnet18_state() -> dict[str, torch.Tensor]:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1234)
        return torchvision.models.resnet18(weights=None).state_dict()


def test_load_state_dict_bytes_torch_save(resnet18_state) -> None:
    buf = io.BytesIO()
    torch.save(resnet18_state, buf)
    out = load_state_dict_bytes(buf.getvalue(), "r18.pth")
    assert _state_equal(out, resnet18_state)
    wrapped = io.BytesIO()
    torch.save({"state_dict": resnet18_state, "epoch": 3}, wrapped)
    assert _state_equal(load_state_dict_bytes(wrapped.getvalue(), "r18.ckpt"), resnet18_state)


def test_load_state_dict_bytes_safetensors(resnet18_state) -> None:
    data = st_save(resnet18_state)
    assert _state_equal(load_state_dict_bytes(data, "r18.safetensors"), resnet18_state)
    assert _state_equal(load_state_dict_bytes(data, "r18.bin"), resnet18_state)  # sniffed without the extension


def test_load_state_dict_bytes_rejects_non_dict_and_pickles() -> None:
    buf = io.BytesIO()
    torch.save([torch.zeros(2)], buf)
    with pytest.raises(ValueError, match="w.pth: expected a state dict"):
        load_state_dict_bytes(buf.getvalue(), "w.pth")
    evil = io.BytesIO()
    torch.save({"x": _NotATensor()}, evil)
    with pytest.raises(Exception):  # noqa: B017 - weights_only refuses arbitrary classes
        load_state_dict_bytes(evil.getvalue(), "evil.pth")


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"backbone": "no_such_net"}, "unknown 'no_such_net'"),
        ({"levels": (3, 6)}, "model.levels"),
        ({"levels": (5, 3)}, "model.levels"),
        ({"levels": (1, 2)}, "model.levels"),
    ],
)
def test_build_backbone_bad_config(kwargs, match) -> None:
    with pytest.raises(ValueError, match=match):
        build_backbone(ModelConfig(**{"backbone": "resnet18", "backbone_weights": None, "fpn_channels": 16, **kwargs}))


@pytest.mark.parametrize("ext", ["pth", "safetensors"])
def test_backbone_weights_file_is_loaded(tmp_path, resnet18_state, ext) -> None:
    path = tmp_path / f"r18.{ext}"
    if ext == "pth":
        torch.save(resnet18_state, path)
    else:
        path.write_bytes(st_save(resnet18_state))
    body = build_backbone(ModelConfig(backbone="resnet18", fpn_channels=16, backbone_weights=str(path))).body
    assert torch.equal(body.conv1.weight, resnet18_state["conv1.weight"])
    assert torch.equal(body.layer3[1].conv2.weight, resnet18_state["layer3.1.conv2.weight"])
    m = Matcher(ModelConfig(backbone="resnet18", fpn_channels=16, backbone_weights=str(path)))
    assert torch.equal(m.body.body.layer2[0].conv1.weight, resnet18_state["layer2.0.conv1.weight"])
    # without the file the seeded random init differs
    plain = build_backbone(ModelConfig(backbone="resnet18", backbone_weights=None, fpn_channels=16)).body
    assert not torch.equal(plain.conv1.weight, resnet18_state["conv1.weight"])


def test_backbone_weights_of_wrong_architecture(tmp_path) -> None:
    path = tmp_path / "wrong.safetensors"
    path.write_bytes(st_save({"conv1.weight": torch.zeros(64, 3, 7, 7)}))
    with pytest.raises(ValueError, match="wrong.safetensors: not resnet18 weights"):
        build_backbone(ModelConfig(backbone="resnet18", fpn_channels=16, backbone_weights=str(path)))


def test_model_config_reads_the_checkpoint_header_only(tmp_path) -> None:
    from roiqa.models.checkpoint import model_config

    cfg = ModelConfig(backbone="resnet18", backbone_weights=None, fpn_channels=24, seed=9)
    path = str(tmp_path / "m.safetensors")
    save_matcher(Matcher(cfg), path)
    assert model_config(path, CFG) == load_matcher(path).cfg  # the checkpoint's config, not the one passed in
    assert model_config(None, CFG) == CFG
    (tmp_path / "junk.safetensors").write_bytes(b"\x00" * 4)
    with pytest.raises(ValueError, match="junk.safetensors"):
        model_config(str(tmp_path / "junk.safetensors"), CFG)
