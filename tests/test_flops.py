"""The FLOP counter (anymodal.flops) against the 6N + attention formula, torch's FlopCounterMode, and MFU logging."""

import csv
import sys

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from anymodal.config import ArchConfig
from anymodal.flops import linear_params, mask_keys, training_flops_per_token
from anymodal.masks import build_attention_mask
from anymodal.model.decoder import Decoder

LLAMA3_8B = ArchConfig(dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, mlp_hidden=14336, max_seq_len=8192)
LLAMA3_VOCAB = 128256


def test_llama3_8b_shapes_give_6n_plus_attention():
    n_all = LLAMA3_8B.num_params(LLAMA3_VOCAB)
    assert abs(n_all - 8.03e9) / 8.03e9 < 0.005  # the published parameter count
    n = n_all - LLAMA3_VOCAB * LLAMA3_8B.dim  # the input embedding is a lookup, not a matmul
    for T in (2048, 8192):
        formula = 6 * n + 12 * LLAMA3_8B.n_layers * LLAMA3_8B.n_heads * LLAMA3_8B.head_dim * T
        counted = training_flops_per_token(LLAMA3_8B, LLAMA3_VOCAB, keys=T).total
        assert abs(counted - formula) / formula < 0.005, (T, counted, formula)


def test_the_counter_equals_torch_flop_counter_on_a_real_forward_and_backward():
    arch = ArchConfig.from_name("debug", attention="sdpa")
    decoder, head = Decoder(arch), torch.nn.Linear(arch.dim, 100, bias=False)
    B, T = 2, 48
    h = torch.randn(B, T, arch.dim, requires_grad=True)
    mask = build_attention_mask(torch.zeros(B, T, dtype=torch.long), torch.full((B, T), -1), "sdpa")
    with FlopCounterMode(display=False) as counter, sdpa_kernel(SDPBackend.MATH):  # math: attention as bmm
        head(decoder(h, torch.arange(T).expand(B, T), mask)).sum().backward()
    counted = training_flops_per_token(arch, 100, keys=T)
    assert counter.get_total_flops() == pytest.approx(counted.total * B * T, rel=1e-9)
    assert counter.get_flop_counts()["Global"][torch.ops.aten.mm] == pytest.approx(counted.linear * B * T)
    assert linear_params(arch, 100) * 6 == counted.linear


def test_mask_aware_keys_count_what_the_mask_allows():
    T = 10
    causal = build_attention_mask(torch.zeros(1, T, dtype=torch.long), torch.full((1, T), -1), "sdpa").dense
    assert mask_keys(causal) == pytest.approx((T + 1) / 2)
    image = torch.full((1, T), -1)
    image[0, 2:6] = 0  # a continuous image: its 4 slots see each other both ways
    bidirectional = build_attention_mask(torch.zeros(1, T, dtype=torch.long), image, "sdpa").dense
    assert mask_keys(bidirectional) == pytest.approx((T * (T + 1) / 2 + 4 * 3 / 2) / T)


def test_fit_logs_mfu_against_the_measured_cpu_peak(fit_args, tmp_path, monkeypatch):
    from anymodal.commands.cli import main

    monkeypatch.setattr(sys, "argv", ["anymodal"])
    monitor = '{"class_path": "anymodal.systems.callbacks.MFUMonitor", "init_args": {"window_size": 2}}'
    main(fit_args("--trainer.max_steps=4", "--trainer.log_every_n_steps=1", f"--trainer.callbacks+={monitor}"))
    (metrics,) = tmp_path.glob("lightning_logs/version_0/metrics.csv")
    rows = [r for r in csv.DictReader(metrics.open()) if r.get("train/device/mfu")]
    assert rows, "no MFU was logged"
    mfu = float(rows[-1]["train/device/mfu"])
    assert 0 < mfu < 1
