"""The model actors' CUDA paths (bf16 autocast, channels_last) agree with the CPU reference."""

from __future__ import annotations

import numpy as np
import pytest
import skimage.data

from roiqa import schema as S
from roiqa.config import ModelConfig
from roiqa.stages.embed import Embedder, prepare

pytestmark = pytest.mark.gpu


def test_embedder_cuda_matches_cpu():
    images, valid = [], []
    for name in ("astronaut", "coffee", "chelsea", "rocket"):
        img, v, _ = prepare(getattr(skimage.data, name)(), 256)
        images.append(img)
        valid.append(v)
    images, valid = np.stack(images), np.array(valid, np.int32)
    cpu = Embedder(ModelConfig(), device="cpu").embed(images, valid)
    gpu = Embedder(ModelConfig(), device="cuda").embed(images, valid)
    # bf16 autocast: cosine between the two descriptors of each image stays near 1
    cos = (cpu * gpu).sum(1) / np.linalg.norm(cpu, axis=1) / np.linalg.norm(gpu, axis=1)
    assert (cos > 0.99).all(), cos


def test_reranker_cuda_matches_cpu(tmp_path):
    from roiqa.config import PreprocessConfig, QueryConfig, RoiqaConfig
    from roiqa.io.imageio import encode_png
    from roiqa.stages.rerank import Reranker

    photo = skimage.data.astronaut()
    (tmp_path / "q.png").write_bytes(encode_png(photo[14:186, 150:304]))
    (tmp_path / "g.png").write_bytes(encode_png(photo))
    cfg = RoiqaConfig(preprocess=PreprocessConfig(image_size=256), query=QueryConfig(overlays=False))
    batch = {
        S.IMAGE_ID: np.array([1]),
        S.URI: np.array([str(tmp_path / "g.png")], dtype=object),
        S.QUERY_IDS: [["q"]],
        S.COARSE_SCORES: [[0.0]],
    }
    queries = {"q": (str(tmp_path / "q.png"), None)}
    cpu = Reranker(cfg, queries, device="cpu")(batch)
    gpu = Reranker(cfg, queries, device="cuda")(batch)
    assert gpu[S.SCORE][0] == pytest.approx(cpu[S.SCORE][0], abs=0.03)
    np.testing.assert_allclose([gpu[c][0] for c in S.BOX], [cpu[c][0] for c in S.BOX], atol=16)
