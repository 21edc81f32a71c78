"""Gated feed-forward: down(act(gate(x)) * up(x)); SwiGLU (silu, Llama) or GeGLU (tanh-gelu, Gemma)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class SwiGLU(nn.Module):
    """Gated MLP of Llama, with the same parameter names (gate_proj, up_proj, down_proj).

    `activation` 'gelu_tanh' makes it Gemma's GeGLU (transformers' gelu_pytorch_tanh)."""

    def __init__(self, dim: int, hidden: int, activation: str = "silu") -> None:
        super().__init__()
        if activation not in ("silu", "gelu_tanh"):
            raise ValueError(f"activation={activation!r} must be silu or gelu_tanh")
        self.activation = activation
        self.gate_proj = nn.Linear(dim, hidden, bias=False)
        self.up_proj = nn.Linear(dim, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, T, D) -> (B, T, D)."""
        gate = self.gate_proj(x)  # (B, T, H)
        gate = F.silu(gate) if self.activation == "silu" else F.gelu(gate, approximate="tanh")
        return self.down_proj(gate * self.up_proj(x))
