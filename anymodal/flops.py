"""Model FLOPs of the decoder: the numerator of model-FLOPs utilisation (MFU).

The denominator is the device's peak: Lightning's table of accelerators on CUDA, this machine's measured
matmul rate on a CPU (anymodal.hardware.matmul_rate); anymodal.systems.callbacks.MFUMonitor divides.

Counted from the architecture, matmul by matmul (a multiply-add is 2 FLOPs; backward costs twice the
forward, so training is 3x forward):

    per token, forward:  2 * (every linear weight: q, k, v, o, the SwiGLU's three, the LM head)
                       + 4 * n_layers * n_heads * head_dim * keys      (Q K^T and A V)

`keys` is the number of keys a query attends to: the sequence length for dense attention (how the
PaLM MFU convention counts it), or the mean number of keys the mask allows (`mask_keys`), which is what
the hardware can skip with FlexAttention's block sparsity. The input embedding is a lookup and costs
nothing. For a Llama-3-8B-shaped config this is 6N + 12 L H d T with N the non-embedding weights plus the
LM head (tests/test_flops.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from anymodal.config import ArchConfig


def linear_params(arch: ArchConfig, vocab_size: int) -> int:
    """Weights of every linear layer a token passes through (the LM head included, the embedding not)."""
    d, hd = arch.dim, arch.head_dim
    attn = d * arch.n_heads * hd * 2 + d * arch.kv_heads * hd * 2  # q, o + k, v
    mlp = 3 * d * arch.mlp_hidden_dim
    return arch.n_layers * (attn + mlp) + d * vocab_size


@dataclass
class TokenFlops:
    """Training FLOPs per token (forward + backward), split as the MFU convention needs."""

    linear: float
    """6 x linear weights."""
    attention: float
    """12 x n_layers x n_heads x head_dim x keys per query."""

    @property
    def total(self) -> float:
        return self.linear + self.attention


def training_flops_per_token(arch: ArchConfig, vocab_size: int, keys: float) -> TokenFlops:
    """Training FLOPs of one token that attends to `keys` keys (dense: the sequence length)."""
    attention = 12 * arch.n_layers * arch.n_heads * arch.head_dim * keys
    return TokenFlops(6.0 * linear_params(arch, vocab_size), float(attention))


def mask_keys(allowed: torch.Tensor) -> float:
    """Mean number of keys per real query of a dense boolean mask (B, 1 or H, Tq, Tk).

    Queries that see no key (padding) are left out."""
    per_query = allowed.flatten(0, -2).sum(-1)  # (B*H*Tq,)
    real = per_query > 0
    return float(per_query[real].float().mean()) if bool(real.any()) else 0.0

