"""The native backbone: a Llama-style stack of pre-norm blocks over input embeddings.

Submodule names follow Hugging Face Llama (`layers.{i}.self_attn.q_proj`, `layers.{i}.mlp.gate_proj`,
`layers.{i}.input_layernorm`, `norm`, ...), so `convert.py` is mostly a prefix rename.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from anymodal.config import ArchConfig
from anymodal.masks import AttentionMask
from anymodal.model.cache import KVCache
from anymodal.nn.attention import Attention
from anymodal.nn.mlp import SwiGLU
from anymodal.nn.norms import OffsetRMSNorm, rms_norm
from anymodal.nn.rope import RotaryEmbedding


class Block(nn.Module):
    """x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, config: ArchConfig) -> None:
        super().__init__()
        self.input_layernorm = rms_norm(config.dim, config.norm_eps, config.norm_offset)
        self.self_attn = Attention(
            config.dim, config.n_heads, config.kv_heads, config.qk_norm, config.norm_eps,
            head_dim=config.head_dim, qkv_bias=config.qkv_bias, backend=config.attention,
        )
        self.post_attention_layernorm = rms_norm(config.dim, config.norm_eps, config.norm_offset)
        self.mlp = SwiGLU(config.dim, config.mlp_hidden_dim, config.mlp_act)

    def forward(
        self,
        h: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        mask: AttentionMask,
        cache: KVCache | None = None,
        layer: int = 0,
    ) -> torch.Tensor:
        h = h + self.self_attn(self.input_layernorm(h), rope, mask, cache, layer)  # (B, T, D)
        return h + self.mlp(self.post_attention_layernorm(h))  # (B, T, D)


class Decoder(nn.Module):
    """Input embeddings (B, T, D) -> final-normed hidden states (B, T, D); no token embedding, no head."""

    def __init__(self, config: ArchConfig) -> None:
        super().__init__()
        self.config = config
        self.rope = RotaryEmbedding(config.head_dim, config.rope_theta, config.rope_scaling)
        self.layers = nn.ModuleList(Block(config) for _ in range(config.n_layers))
        self.norm = rms_norm(config.dim, config.norm_eps, config.norm_offset)
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """Normal(0, init_std) linears, residual output projections scaled by 1/sqrt(2*n_layers), zero biases;
        unit norms (zero weights for the (1 + weight) norms of `norm_offset`).

        Callable again after building on the meta device and materialising. Runs through `Module.apply`,
        which DeepSpeed's ZeRO-3 `zero.Init` wraps to gather each (already sharded) module's weights around the
        call: the same values as in one process.
        """
        std = self.config.init_std
        residual_std = std / math.sqrt(2 * self.config.n_layers)
        residual = {module for name, module in self.named_modules() if name.endswith(("o_proj", "down_proj"))}

        def init(module: nn.Module) -> None:
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, mean=0.0, std=residual_std if module in residual else std)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.RMSNorm):
                nn.init.ones_(module.weight)
            elif isinstance(module, OffsetRMSNorm):
                nn.init.zeros_(module.weight)

        self.apply(init)  # the modules in the order of the loop over named_modules() it replaces

    def new_cache(self) -> KVCache:
        """An empty KV cache with one slot per layer."""
        return KVCache(self.config.n_layers)

    def forward(
        self,
        h: torch.Tensor,
        positions: torch.Tensor,
        mask: AttentionMask,
        cache: KVCache | None = None,
        write_cache: bool = True,
    ) -> torch.Tensor:
        """Runs the blocks.

        h: (B, T, D) input embeddings; positions: (B, T) int64 RoPE positions (restart at 0 per document);
        mask: over the T queries and all keys (cached + new), `mask.q_offset` = cache length;
        cache: keys/values of earlier tokens; with `write_cache` the T new ones are appended, without it
        (peek) the cache is left unchanged. Returns (B, T, D) hidden states after the final norm.
        """
        B, T, D = h.shape
        if D != self.config.dim:
            raise ValueError(f"inputs have width {D}, the decoder expects dim={self.config.dim}")
        if positions.shape != (B, T):
            raise ValueError(f"positions {tuple(positions.shape)} must be (B, T) = {(B, T)}")
        past = 0 if cache is None else cache.length
        if mask.q_len != T or mask.kv_len != past + T or mask.q_offset != past:
            raise ValueError(
                f"mask covers {mask.q_len} queries at offset {mask.q_offset} over {mask.kv_len} keys, but this pass "
                f"has {T} new tokens after {past} cached ones; build it with q_offset={past} over {past + T} keys"
            )
        rope = self.rope(positions, dtype=h.dtype)  # cos, sin: (B, T, Dh)
        use_checkpoint = self.config.checkpoint_activations and self.training and cache is None
        for i, layer in enumerate(self.layers):
            if use_checkpoint:
                h = checkpoint(layer, h, rope, mask, use_reentrant=False)  # (B, T, D)
            else:
                h = layer(h, rope, mask, cache, i)  # (B, T, D)
        if cache is not None and write_cache:
            cache.advance(T)
        return self.norm(h)  # (B, T, D)
