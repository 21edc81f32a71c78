"""Multi-head attention with grouped-query heads, optional QK-norm, RoPE, and two backends.

The backend follows the mask: a BlockMask runs through `flex_attention` (compiled on CUDA, eager elsewhere), a
dense boolean mask through `F.scaled_dot_product_attention` or, where that is slower, through two matmuls and a
masked softmax (`matmul_attention`): on a CPU in bf16 with gradients, SDPA's flash kernel spends 2.6x as long
in its backward pass (benchmarks/README.md, "Attention as matmuls").
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention.flex_attention import flex_attention

from anymodal.masks import AttentionMask
from anymodal.nn.rope import apply_rotary


class KVStore(Protocol):
    """What attention needs of a KV cache (`anymodal.model.cache.KVCache` is the one in use)."""

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Places new k, v: (B, Hkv, T, Dh) after the cached ones; returns cached + new, (B, Hkv, Tk, Dh)."""
        ...


_compiled_flex_attention = None


def matmul_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T / sqrt(Dh), where `mask`) v with the scores materialised.

    q (B, H, Tq, Dh); k, v (B, H, Tk, Dh); mask (B, 1, Tq, Tk) boolean, True = may attend, at least one True per
    row (every query sees itself)."""
    scores = (q * q.shape[-1] ** -0.5) @ k.transpose(-1, -2)  # (B, H, Tq, Tk)
    return scores.masked_fill(~mask, float("-inf")).softmax(-1).to(v.dtype) @ v


def use_matmul_attention(backend: str, q: torch.Tensor) -> bool:
    """Whether a dense mask runs through `matmul_attention`: asked for ('matmul'), or 'auto' on a CPU in bf16 (its
    tensors, or bf16 autocast) while gradients are on (training). SDPA stays where it is as fast or faster: in
    fp32 (1.5x faster there) and in sampling, whose forward alone gains nothing."""
    if backend == "matmul":
        return True
    if backend != "auto" or q.device.type != "cpu" or not torch.is_grad_enabled():
        return False
    return q.dtype == torch.bfloat16 or (torch.is_autocast_enabled("cpu")  # RoPE leaves q in fp32 under autocast
                                         and torch.get_autocast_dtype("cpu") == torch.bfloat16)


def _flex_attention(q, k, v, block_mask, enable_gqa):
    """flex_attention, compiled once per process on CUDA (eager flex materialises the scores)."""
    global _compiled_flex_attention
    if q.is_cuda:
        if _compiled_flex_attention is None:
            _compiled_flex_attention = torch.compile(flex_attention)
        return _compiled_flex_attention(q, k, v, block_mask=block_mask, enable_gqa=enable_gqa)
    return flex_attention(q, k, v, block_mask=block_mask, enable_gqa=enable_gqa)


class Attention(nn.Module):
    """q/k/v/o projections (biases on q/k/v only with `qkv_bias`, as Qwen2); `n_kv_heads` key/value heads
    shared by groups of query heads; `head_dim` defaults to dim / n_heads; `backend` as ArchConfig.attention
    (it picks the kernel of a dense mask: `use_matmul_attention`)."""

    def __init__(
        self, dim: int, n_heads: int, n_kv_heads: int, qk_norm: bool = False, norm_eps: float = 1e-5,
        head_dim: int | None = None, qkv_bias: bool = False, backend: str = "auto",
    ):
        super().__init__()
        if (head_dim is None and dim % n_heads) or n_heads % n_kv_heads:
            raise ValueError(f"dim={dim}, n_heads={n_heads}, n_kv_heads={n_kv_heads} must divide evenly")
        self.n_heads, self.n_kv_heads, self.head_dim = n_heads, n_kv_heads, head_dim or dim // n_heads
        self.backend = backend
        self.q_proj = nn.Linear(dim, n_heads * self.head_dim, bias=qkv_bias)
        self.k_proj = nn.Linear(dim, n_kv_heads * self.head_dim, bias=qkv_bias)
        self.v_proj = nn.Linear(dim, n_kv_heads * self.head_dim, bias=qkv_bias)
        self.o_proj = nn.Linear(n_heads * self.head_dim, dim, bias=False)
        # Same names as Qwen3's QK-norm, applied (like there) before RoPE.
        self.q_norm = nn.RMSNorm(self.head_dim, eps=norm_eps) if qk_norm else None
        self.k_norm = nn.RMSNorm(self.head_dim, eps=norm_eps) if qk_norm else None

    def forward(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        mask: AttentionMask,
        cache: KVStore | None = None,
        layer: int = 0,
    ) -> torch.Tensor:
        """x: (B, T, D); rope: cos, sin (B, T, Dh); cache: this pass's keys are placed in `layer` -> (B, T, D)."""
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim)  # (B, T, H, Dh)
        k = self.k_proj(x).view(B, T, self.n_kv_heads, self.head_dim)  # (B, T, Hkv, Dh)
        v = self.v_proj(x).view(B, T, self.n_kv_heads, self.head_dim)  # (B, T, Hkv, Dh)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        cos, sin = rope
        q = apply_rotary(q.transpose(1, 2), cos, sin)  # (B, H, T, Dh)
        k = apply_rotary(k.transpose(1, 2), cos, sin)  # (B, Hkv, T, Dh)
        v = v.transpose(1, 2)  # (B, Hkv, T, Dh)
        if cache is not None:
            k, v = cache.update(layer, k, v)  # (B, Hkv, Tk, Dh), cached prefix + new
        groups = self.n_heads // self.n_kv_heads
        if mask.block is not None:
            out = _flex_attention(q, k, v, mask.block, enable_gqa=groups > 1)  # (B, H, T, Dh)
        else:
            if groups > 1:  # plain repeat keeps SDPA on its fast kernels (enable_gqa + a mask may not)
                k = k.repeat_interleave(groups, dim=1)  # (B, H, Tk, Dh)
                v = v.repeat_interleave(groups, dim=1)
            if use_matmul_attention(self.backend, q):
                out = matmul_attention(q, k, v, mask.dense)  # (B, H, T, Dh)
            else:
                out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask.dense)  # (B, H, T, Dh)
        return self.o_proj(out.transpose(1, 2).reshape(B, T, -1))  # (B, T, D)
