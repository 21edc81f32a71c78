"""MuonAdamW: Muon on the matrices it is given and AdamW on the rest, stepped, scheduled and saved as one
optimizer; the unified system hands Muon the decoder blocks' matrices and refuses it under DeepSpeed."""

import copy

import pytest
import torch
from lightning.pytorch import Trainer

from anymodal import hardware
from anymodal.systems.optim import GroupedMuon, MuonAdamW, build_optimizer, muon_matrices
from anymodal.systems.strategies import CPUDeepSpeedStrategy

KW = dict(lr=1e-2, muon_lr=2e-2, weight_decay=0.1, betas=(0.9, 0.95))


def weights(seed: int = 0) -> list[torch.Tensor]:
    """A matrix for Muon, then a matrix and a bias for AdamW."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(6, 4, generator=g).requires_grad_(), torch.randn(3, 4, generator=g).requires_grad_(),
            torch.randn(3, generator=g).requires_grad_()]


def combined(params: list[torch.Tensor]) -> MuonAdamW:
    return MuonAdamW([params[0]], [{"params": [params[1]], "weight_decay": 0.1},
                                   {"params": [params[2]], "weight_decay": 0.0}], **KW)


def step(opt: torch.optim.Optimizer, params: list[torch.Tensor], seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    for p in params:
        p.grad = torch.randn(p.shape, generator=g)
    opt.step()


def clone(params: list[torch.Tensor]) -> list[torch.Tensor]:
    return [p.detach().clone().requires_grad_() for p in params]


def test_it_steps_exactly_as_muon_and_adamw_apart(monkeypatch):
    # the library's Newton-Schulz runs in bfloat16 everywhere; ours only where bfloat16 is native (next test)
    monkeypatch.setattr(GroupedMuon, "newton_schulz_dtype", staticmethod(lambda device: torch.bfloat16))
    params = weights()
    alone = clone(params)
    muon = torch.optim.Muon([alone[0]], lr=KW["muon_lr"], weight_decay=0.1, adjust_lr_fn="match_rms_adamw")
    adamw = torch.optim.AdamW([{"params": [alone[1]], "weight_decay": 0.1}, {"params": [alone[2]], "weight_decay": 0.0}],
                              lr=KW["lr"], betas=KW["betas"])
    as_adamw = clone(params)  # the matrix under AdamW instead: a different update, so the split is visible
    other = torch.optim.AdamW([as_adamw[0]], lr=KW["lr"], betas=KW["betas"], weight_decay=0.1)
    opt = combined(params)
    for i in range(3):
        step(opt, params, i)
        step(muon, alone, i)  # the same gradients for each weight
        adamw.step()
        step(other, as_adamw, i)
    for p, q in zip(params, alone):
        torch.testing.assert_close(p, q, rtol=0, atol=0)
    assert not torch.allclose(params[0], as_adamw[0], atol=1e-3)
    assert len(opt.param_groups) == 3 and opt.state[params[0]]["momentum_buffer"].shape == (6, 4)


def test_newton_schulz_runs_in_float32_where_bfloat16_is_emulated(monkeypatch):
    """On a CPU whose bfloat16 matmuls are slower than float32 (an AVX2 machine: 1.9 against 80 GFLOP/s) the
    iterations run in float32, and the update is the library's (bfloat16) one to bfloat16's precision."""
    monkeypatch.setattr(hardware, "_bf16_speedup", {"matmul": 4.5})
    assert GroupedMuon.newton_schulz_dtype(torch.device("cpu")) == torch.bfloat16
    monkeypatch.setattr(hardware, "_bf16_speedup", {"matmul": 0.02})
    assert GroupedMuon.newton_schulz_dtype(torch.device("cpu")) == torch.float32
    params = weights()
    alone = clone(params)
    opt = combined(params)
    muon = torch.optim.Muon([alone[0]], lr=KW["muon_lr"], weight_decay=0.1, adjust_lr_fn="match_rms_adamw")
    for i in range(3):
        step(opt, params, i)
        step(muon, alone[:1], i)
    moved = (params[0] - weights()[0]).detach().abs().max()
    assert moved > 1e-2  # the matrix moved, and by the library's step up to bfloat16 rounding
    torch.testing.assert_close(params[0], alone[0], rtol=0, atol=2e-2 * float(moved))
    assert not torch.equal(params[0], alone[0])  # float32 here: not the bfloat16 result bit for bit


def test_a_scheduler_scales_every_group_and_a_saved_state_resumes_exactly():
    params = weights()
    opt = combined(params)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 ** s)
    step(opt, params, 0)
    sched.step()
    assert [g["lr"] for g in opt.muon.param_groups + opt.adamw.param_groups] == [KW["muon_lr"] / 2] + [KW["lr"] / 2] * 2
    state, resumed = copy.deepcopy(opt.state_dict()), clone(params)  # as saved: no tensor shared with `opt`
    again = combined(resumed)
    again.load_state_dict(state)  # the inner optimizers see the loaded groups and momentum, not fresh ones
    assert again.muon.param_groups[0]["lr"] == KW["muon_lr"] / 2
    for i in (1, 2):
        step(opt, params, i)
        step(again, resumed, i)
    for p, q in zip(params, resumed):
        torch.testing.assert_close(p, q, rtol=0, atol=0)


def test_the_system_hands_muon_the_blocks_matrices_and_refuses_it_under_deepspeed(make_system):
    system = make_system("continuous", optimizer="muon")
    names = muon_matrices(system.model)
    assert names and all(n.startswith("decoder.layers.") for n in names)
    assert any("mlp" in n for n in names) and any("self_attn" in n for n in names)
    system.trainer = Trainer(accelerator="cpu", max_steps=10, logger=False, enable_progress_bar=False)
    opt = system.configure_optimizers()["optimizer"]
    muon = {id(p) for g in opt.muon.param_groups for p in g["params"]}
    adamw = {id(p) for g in opt.adamw.param_groups for p in g["params"]}
    named = dict(system.model.named_parameters())
    assert muon == {id(named[n]) for n in names} and not muon & adamw
    assert muon | adamw == {id(p) for p in system.model.parameters() if p.requires_grad}
    assert id(system.model.embed_tokens.weight) in adamw  # token rows, image projections, norms: AdamW
    system.trainer = Trainer(accelerator="cpu", strategy=CPUDeepSpeedStrategy(stage=2), devices=1, logger=False)
    with pytest.raises(ValueError, match="DeepSpeed"):
        system.configure_optimizers()
    with pytest.raises(ValueError, match="optimizer='sgd' must be one of adamw, muon"):
        make_system("continuous", optimizer="sgd")


def test_a_step_without_gradients_moves_nothing_and_a_model_without_blocks_is_refused():
    params = weights()
    before = clone(params)
    combined(params).step()  # no gradient yet (as after a skipped step): nothing moves, nothing fails
    for p, q in zip(params, before):
        torch.testing.assert_close(p, q, rtol=0, atol=0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 4))
    with pytest.raises(ValueError, match="found no trainable matrix under decoder.layers."):
        build_optimizer("muon", model, [{"params": list(model.parameters())}], 1e-3, (0.9, 0.95), 0.1)
