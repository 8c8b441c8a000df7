from __future__ import annotations

import math

import pytest
import torch

from nmt.config import ModelConfig, TrainConfig
from nmt.optim import build_optimizer, build_scheduler, continue_schedule, inverse_sqrt_lr, peak_lr


def test_schedule_warms_up_linearly_then_decays_with_inverse_sqrt():
    peak, warmup = 1e-3, 100
    assert inverse_sqrt_lr(0, peak, warmup) == peak / warmup
    assert math.isclose(inverse_sqrt_lr(49, peak, warmup), peak / 2)
    assert inverse_sqrt_lr(99, peak, warmup) == peak
    assert math.isclose(inverse_sqrt_lr(399, peak, warmup), peak / 2)


def test_paper_peak_when_lr_is_zero():
    assert math.isclose(peak_lr(TrainConfig(lr=0.0, warmup_steps=4000), ModelConfig(d_model=512)),
                        512**-0.5 * 4000**-0.5)
    assert peak_lr(TrainConfig(lr=5e-4), ModelConfig()) == 5e-4


def test_scheduler_drives_the_optimizer_learning_rate():
    model = torch.nn.Linear(4, 4)
    cfg = TrainConfig(lr=1e-3, warmup_steps=10, weight_decay=0.01)
    opt = build_optimizer(model, cfg)
    sched = build_scheduler(opt, cfg, ModelConfig())
    assert isinstance(opt, torch.optim.AdamW)
    seen = []
    for _ in range(20):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert math.isclose(seen[0], 1e-4) and math.isclose(seen[9], 1e-3) and seen[19] < seen[9]


def test_cpu_adam_moves_the_version_counters_packed_linears_rely_on():
    model = torch.nn.Linear(4, 4)
    opt = build_optimizer(model, TrainConfig())
    model(torch.randn(2, 4)).sum().backward()
    before = model.weight._version
    opt.step()
    assert model.weight._version > before  # torch's fused CPU Adam leaves it unchanged


def _decayed_by_a_zero_gradient_step(model: torch.nn.Module) -> set[str]:
    """Names of the parameters that one AdamW step with zero gradients moved (decay alone moves them)."""
    opt = build_optimizer(model, TrainConfig(weight_decay=0.1))
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(1.0)  # biases start at zero, where decay would not show
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    return {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}


def test_weight_decay_spares_biases_norm_gains_and_embeddings():
    from nmt.model import build_model

    for tie in (True, False):
        cfg = ModelConfig(encoder_layers=1, decoder_layers=1, d_model=16, heads=2, d_ff=32, tie_embeddings=tie)
        model = build_model(cfg, 40, 40)
        decayed = _decayed_by_a_zero_gradient_step(model)
        assert "encoder.layers.0.ff.linear1.weight" in decayed and "decoder.layers.0.cross_attn.q_proj.weight" in decayed
        assert not any(n.endswith(".bias") or ".norm" in n or "embed" in n for n in decayed), decayed
        # the untied output projection is a linear layer's matrix like any other; tied, it is the embedding
        assert ("output_proj.weight" in decayed) == (not tie)
        groups = build_optimizer(model, TrainConfig(weight_decay=0.1)).param_groups
        assert [g["weight_decay"] for g in groups] == [0.1, 0.0]
        assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))


def test_continue_schedule_sets_the_learning_rate_of_every_group():
    model = torch.nn.Linear(4, 4)
    cfg = TrainConfig(lr=1e-3, warmup_steps=10, weight_decay=0.01)
    opt = build_optimizer(model, cfg)
    sched = build_scheduler(opt, cfg, ModelConfig())
    continue_schedule(sched, 40)
    assert sched.last_epoch == 40
    assert all(math.isclose(g["lr"], inverse_sqrt_lr(40, 1e-3, 10)) for g in opt.param_groups)


def test_no_clipping_measures_the_norm_without_touching_the_gradients(monkeypatch):
    from nmt.optim import clip_gradients

    model = torch.nn.Linear(3, 2)
    model(torch.randn(4, 3)).sum().backward()
    expected = torch.nn.utils.clip_grad_norm_(model.parameters(), math.inf)
    grads = [p.grad.clone() for p in model.parameters()]
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", lambda *a, **k: pytest.fail("a pass over every gradient"))
    assert torch.equal(clip_gradients(model.parameters(), 0.0), expected)
    assert all(torch.equal(g, p.grad) for g, p in zip(grads, model.parameters(), strict=True))
    model.bias.grad[0] = float("nan")
    assert not torch.isfinite(clip_gradients(model.parameters(), 0.0))  # the skip decision still sees it


def test_clipping_scales_to_the_threshold():
    from nmt.optim import clip_gradients

    model = torch.nn.Linear(3, 2)
    model(torch.randn(4, 3)).sum().mul(100).backward()
    norm = clip_gradients(model.parameters(), 1.0)
    assert norm > 1.0
    after = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad) for p in model.parameters()]))
    assert after == pytest.approx(1.0, rel=1e-4)
