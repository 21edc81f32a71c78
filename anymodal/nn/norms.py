"""RMSNorm in the two conventions of pretrained LMs: `weight * x̂` (torch's nn.RMSNorm: Llama, Qwen, Mistral)
and `(1 + weight) * x̂` with the weight initialised at 0 (Gemma)."""

from __future__ import annotations

import torch
from torch import nn


class OffsetRMSNorm(nn.Module):
    """Gemma's RMSNorm: normalised in float32, scaled by (1 + weight), cast back to the input's dtype."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.zeros(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(..., D) -> (..., D)."""
        y = x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + self.eps)
        return (y * (1.0 + self.weight.float())).type_as(x)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}, offset=1"


def rms_norm(dim: int, eps: float, offset: bool = False) -> nn.Module:
    """An RMSNorm over `dim`: `OffsetRMSNorm` (Gemma) with `offset`, else torch's `nn.RMSNorm`."""
    return OffsetRMSNorm(dim, eps) if offset else nn.RMSNorm(dim, eps=eps)
