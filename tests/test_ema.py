"""WeightEMA (anymodal/systems/ema.py): in one process it is torch's AveragedModel EMA; its checkpoint state
resumes exactly; the records of sharded ranks assemble into whole weights. Several processes:
tests/test_distributed.py."""

import pytest
import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from anymodal.systems.ema import WeightEMA, assemble_weights


def small_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))


def train(model: nn.Module, emas: list, steps: int, seed: int = 1) -> None:
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(steps):
        loss = model(torch.randn(5, 4, generator=g)).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        for ema in emas:
            if isinstance(ema, WeightEMA):
                ema.update(model)
            else:
                ema.update_parameters(model)


def test_in_one_process_it_is_torchs_averaged_model():
    model = small_model()
    ours = WeightEMA(0.9)
    theirs = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(0.9))
    train(model, [ours, theirs], steps=4)
    averaged = ours.averaged_model(model)
    assert ours.layout == "whole" and averaged is not model
    for (name, a), b in zip(averaged.named_parameters(), theirs.module.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)
        assert not a.requires_grad and a.dtype == torch.float32


def test_the_checkpoint_state_resumes_exactly():
    model, straight = small_model(), WeightEMA(0.9)
    train(model, [straight], steps=3)
    state = straight.state_dict()
    assert state["updates"] == 3 and all(w["start"] == 0 for w in state["weights"].values())
    resumed = WeightEMA(0.5)
    resumed.load_state_dict(state)  # before it meets the model: kept until then
    assert resumed.decay == 0.9 and resumed.state_dict() is state
    train(model, [straight, resumed], steps=2, seed=2)
    for name, piece in straight.pieces.items():
        torch.testing.assert_close(resumed.pieces[name].values, piece.values, rtol=0, atol=0)


def test_the_partitions_of_the_ranks_assemble_into_whole_weights():
    weight = torch.arange(10, dtype=torch.float32).view(2, 5)  # ZeRO-3 over 3 ranks: partitions of 4, 4, 2
    records = [{"weights": {"w": {"shape": [2, 5], "start": 4 * r, "values": weight.view(-1)[4 * r:4 * r + 4]}}}
               for r in range(3)]
    torch.testing.assert_close(assemble_weights(records)["w"], weight)
    with pytest.raises(ValueError, match="misses 4 of its 10 elements"):
        assemble_weights(records[:1] + records[2:])


def test_a_decay_outside_0_1_is_refused():
    with pytest.raises(ValueError, match="ema_decay=1.0 must be in"):
        WeightEMA(1.0)
