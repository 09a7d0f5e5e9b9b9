"""The matcher's one training step (roiqa.train.matcher.TrainStep) against AdamW written out by hand, and
data-parallel: two gloo processes through DDP step on the mean of their two gradients and stay equal."""

from __future__ import annotations

import dataclasses
import math
import os
import socket

import numpy as np
import torch
import torch.multiprocessing as mp

from roiqa.config import ModelConfig, RoiqaConfig, TrainConfig
from roiqa.models.matcher import Matcher
from roiqa.train.matcher import CLIP_NORM, DescriptorQueue, TrainStep, batch_losses, learning_rate

CFG = RoiqaConfig(
    model=ModelConfig(backbone="resnet18", backbone_weights=None, fpn_channels=16),
    train=TrainConfig(
        batch_size=2,
        image_size=96,
        query_size=48,
        object_scale=(24.0, 48.0),
        mined_negatives=2,
        freeze="stem",
        epochs=2,
        steps_per_epoch=4,
        lr=1e-3,
        weight_decay=0.05,
    ),
)
STEP = 3  # the global step taken: past the warm-up's first step, so the learning rate is the schedule's


def _batch(seed: int) -> dict[str, np.ndarray]:
    from roiqa.eval.demo_data import load_photo
    from roiqa.train import data as train_data

    photos = [load_photo(n) for n in ("camera", "grass", "clock")]
    rng = np.random.default_rng(seed)
    return train_data.collate([train_data.synthesize_pair(photos, CFG.train, rng) for _ in range(2)])


def _by_hand(model: Matcher, grads: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The weights after one AdamW step (the first: bias corrections 1 - beta) on `grads` clipped to CLIP_NORM."""
    t = CFG.train
    lr, (b1, b2), eps = learning_rate(CFG, STEP), (0.9, 0.999), 1e-8
    norm = math.sqrt(sum(float((g.double() ** 2).sum()) for g in grads.values()))
    scale = min(1.0, CLIP_NORM / (norm + 1e-6))
    out = {}
    for name, p in model.named_parameters():
        if name not in grads:  # frozen: unchanged
            out[name] = p.detach().clone()
            continue
        g = grads[name].double() * scale
        m_hat = (1 - b1) * g / (1 - b1)
        v_hat = (1 - b2) * g * g / (1 - b2)
        w = p.detach().double() * (1 - lr * t.weight_decay)
        out[name] = (w - lr * m_hat / (v_hat.sqrt() + eps)).float()
    return out


def _grads(model: Matcher, batch: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    """d(eq. 6)/d(weights) of the trainable weights on one batch, with the model in TrainStep's modes."""
    step = TrainStep(model, CFG)  # sets requires_grad and the BatchNorm modes, as the step does
    model.zero_grad(set_to_none=True)
    loss, _ = batch_losses(model, batch, CFG, DescriptorQueue(CFG.train.queue_size))
    loss.backward()
    names = {id(p): n for n, p in model.named_parameters()}
    grads = {names[id(p)]: p.grad.detach().clone() for p in step.params if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return grads


def _assert_weights(model: Matcher, expected: dict[str, torch.Tensor]) -> None:
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.detach(), expected[name], rtol=1e-4, atol=1e-6, msg=name)


def test_train_step_is_adamw_on_the_clipped_gradient():
    batch = _batch(0)
    model, reference = Matcher(CFG.model), Matcher(CFG.model)
    expected = _by_hand(reference, _grads(reference, batch))
    step = TrainStep(model, CFG)
    stats = step(batch, STEP)
    assert {"loss", "nce", "dense", "trip", "scale"} <= set(stats) and all(math.isfinite(v) for v in stats.values())
    assert step.optimizer.param_groups[0]["lr"] == learning_rate(CFG, STEP)
    _assert_weights(model, expected)
    assert not model.body.body.conv1.weight.requires_grad  # train.freeze: stem
    bn = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    assert bn and not any(m.training for m in bn) and model.phi.training  # BatchNorm statistics stay frozen


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, port: int, out_dir: str) -> None:
    """One data-parallel worker: TrainStep with its objective under DDP, one step on its own batch."""
    import torch.distributed as dist
    from safetensors.torch import save_file
    from torch.nn.parallel import DistributedDataParallel

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        model = Matcher(CFG.model)
        step = TrainStep(model, CFG)
        step.objective = DistributedDataParallel(step.objective)  # what Ray Train's prepare_model does on CPU
        step(_batch(rank), STEP)
        state = {n: p.detach().contiguous() for n, p in model.named_parameters()}
        state.update({f"grad/{n}": p.grad.contiguous() for n, p in model.named_parameters() if p.grad is not None})
        save_file(state, os.path.join(out_dir, f"rank{rank}.safetensors"))
    finally:
        dist.destroy_process_group()


def test_data_parallel_step_uses_the_mean_gradient_and_keeps_replicas_equal(tmp_path):
    """The step's gradients (averaged by DDP, then clipped) equal the clipped mean of the two batches' gradients
    computed one at a time, and both replicas end with the same weights. (Weights after a first AdamW step are
    not compared with a reference: that step moves each weight by about lr * sign(gradient), so a gradient
    element near zero flips with float rounding.)"""
    from safetensors.torch import load_file

    mp.start_processes(_worker, args=(_free_port(), str(tmp_path)), nprocs=2, start_method="spawn", join=True)
    reference = Matcher(CFG.model)
    g0, g1 = _grads(reference, _batch(0)), _grads(reference, _batch(1))
    assert g0.keys() == g1.keys()
    assert any(not torch.allclose(g0[k], g1[k]) for k in g0)  # the two workers' batches differ
    mean = {k: (g0[k] + g1[k]) / 2 for k in g0}
    norm = math.sqrt(sum(float((g.double() ** 2).sum()) for g in mean.values()))
    clipped = {k: g * min(1.0, CLIP_NORM / (norm + 1e-6)) for k, g in mean.items()}
    ranks = [load_file(str(tmp_path / f"rank{rank}.safetensors")) for rank in range(2)]
    for got in ranks:
        grads = {k.removeprefix("grad/"): v for k, v in got.items() if k.startswith("grad/")}
        assert grads.keys() == clipped.keys()
        for k, g in grads.items():
            torch.testing.assert_close(g, clipped[k], rtol=1e-3, atol=1e-6, msg=k)
    for k in ranks[0]:
        torch.testing.assert_close(ranks[0][k], ranks[1][k], rtol=0, atol=0, msg=k)


def test_epoch_is_its_steps_in_order_with_the_mean_of_their_stats():
    """`TrainStep.epoch` against the steps taken one at a time: the same global steps (so learning rates), the same
    weights after, the mean of each statistic; it takes no more than steps_per_epoch batches from the stream."""
    torch.manual_seed(0)
    a = Matcher(CFG.model)
    b = Matcher(CFG.model)
    b.load_state_dict(a.state_dict())
    batches = [_batch(10 + i) for i in range(3)]
    cfg = dataclasses.replace(CFG, train=dataclasses.replace(CFG.train, steps_per_epoch=2))
    step_a, step_b = TrainStep(a, cfg), TrainStep(b, cfg)
    stream = iter(batches)
    got = step_a.epoch(stream, epoch=1)
    assert next(stream) is batches[2]  # the third batch is left for the next epoch
    by_hand = [step_b(batches[0], 2), step_b(batches[1], 3)]  # epoch 1 of 2 steps: global steps 2 and 3
    assert set(got) == set(by_hand[0])
    for k in got:
        assert got[k] == (by_hand[0][k] + by_hand[1][k]) / 2
    for (name, pa_), pb in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(pa_, pb), name
    assert step_a.optimizer.param_groups[0]["lr"] == learning_rate(cfg, 3)
