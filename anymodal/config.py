"""Architecture config of the decoder transformer and its registry of named sizes.

`ArchConfig.from_name("debug")` is what tests and CPU smoke runs use; the real sizes sit beside it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal

ATTENTION_BACKENDS = ("auto", "sdpa", "flex", "matmul")
MLP_ACTIVATIONS = ("silu", "gelu_tanh")
ROPE_SCALINGS = {"default": (), "linear": ("factor",),
                 "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")}
"""RoPE scalings the decoder computes exactly, with the parameters each needs."""


def check_rope_scaling(scaling: dict | None) -> None:
    """Refuses a RoPE scaling the decoder does not compute, or one missing a parameter, in one sentence."""
    if scaling is None:
        return
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind not in ROPE_SCALINGS:
        raise ValueError(f"RoPE scaling {kind!r} is not supported; the decoder computes "
                         f"{', '.join(ROPE_SCALINGS)} RoPE exactly")
    missing = [k for k in ROPE_SCALINGS[kind] if k not in scaling]
    if missing:
        raise ValueError(f"rope_scaling of type {kind!r} needs {', '.join(missing)}")


@dataclass
class ArchConfig:
    """Shape and numerics of the Llama-style decoder (RMSNorm, RoPE, SwiGLU, GQA, optional QK-norm)."""

    dim: int = 64
    """Width of the residual stream (hidden size)."""
    n_layers: int = 2
    """Number of transformer blocks."""
    n_heads: int = 4
    """Number of query heads; `dim` must be divisible by it."""
    n_kv_heads: int | None = None
    """Number of key/value heads (grouped-query attention); None means `n_heads` (multi-head attention)."""
    mlp_hidden: int = 0
    """Hidden size of the SwiGLU MLP; 0 derives it from `dim` as 8/3*dim rounded up to `multiple_of`."""
    multiple_of: int = 256
    """Rounding of the derived SwiGLU hidden size (used only when `mlp_hidden` is 0)."""
    norm_eps: float = 1e-5
    """Epsilon of every RMSNorm."""
    rope_theta: float = 10000.0
    """Base of the rotary position embedding frequencies."""
    max_seq_len: int = 2048
    """Longest sequence (prompt plus generation) the model is meant to handle."""
    qk_norm: bool = False
    """RMSNorm over the head dimension of queries and keys before RoPE (Chameleon/Qwen3-style stability)."""
    z_loss: float = 0.0
    """Weight of the z-loss on the log-partition of the output logits (applied by the loss code); 0 disables it."""
    attention: Literal["auto", "sdpa", "flex", "matmul"] = "auto"
    """Attention backend: 'flex' (FlexAttention with a BlockMask), 'sdpa' (dense boolean mask through
    F.scaled_dot_product_attention), 'matmul' (dense mask, scores materialised: anymodal.nn.attention), or 'auto'
    (flex on CUDA; elsewhere a dense mask, through matmuls when training in bf16, else SDPA)."""
    checkpoint_activations: bool = False
    """Recompute each block's activations in the backward pass (saves memory, costs ~30% more compute)."""
    init_std: float = 0.02
    """Standard deviation of the normal init of linear weights (residual output projections are scaled down
    by 1/sqrt(2*n_layers))."""
    # Fields that pretrained LM families need (anymodal.model.hf maps their configs here); each default is
    # the native decoder's own choice.
    head_size: int = 0
    """Width of one attention head; 0 derives it as dim / n_heads (Qwen3, Gemma and Mistral-Nemo set it freely)."""
    qkv_bias: bool = False
    """Biases on the query, key and value projections (Qwen2); the output projection never has one."""
    tied_embeddings: bool = False
    """The LM head reuses the token embedding matrix (SmolLM, Gemma, small Qwen models)."""
    mlp_act: Literal["silu", "gelu_tanh"] = "silu"
    """Gate activation of the gated MLP: silu (SwiGLU) or gelu_tanh (GeGLU, Gemma)."""
    norm_offset: bool = False
    """RMSNorms scale by (1 + weight), with the weight initialised at 0 (Gemma)."""
    embed_scale: bool = False
    """Token embeddings are multiplied by sqrt(dim) (Gemma)."""
    rope_scaling: dict | None = None
    """RoPE frequency scaling: None, {"rope_type": "linear", "factor": f} or Llama 3's {"rope_type": "llama3",
    "factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"}."""

    def __post_init__(self) -> None:
        for name in ("dim", "n_layers", "n_heads", "multiple_of", "max_seq_len"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name}={getattr(self, name)} must be a positive integer")
        if self.n_kv_heads is not None and self.n_kv_heads <= 0:
            raise ValueError(f"n_kv_heads={self.n_kv_heads} must be a positive integer (or None for n_heads)")
        if self.head_size < 0:
            raise ValueError(f"head_size={self.head_size} must be positive, or 0 to derive it as dim / n_heads")
        if self.dim % self.n_heads and not self.head_size:
            raise ValueError(f"dim={self.dim} must be divisible by n_heads={self.n_heads}")
        if self.n_heads % self.kv_heads:
            raise ValueError(f"n_heads={self.n_heads} must be divisible by n_kv_heads={self.kv_heads}")
        if self.head_dim % 2:
            what = f"head_size={self.head_size}" if self.head_size else f"head_dim = dim/n_heads = {self.head_dim}"
            raise ValueError(f"{what} must be even for rotary embeddings")
        if self.mlp_hidden < 0:
            raise ValueError(f"mlp_hidden={self.mlp_hidden} must be positive, or 0 to derive it from dim")
        if self.norm_eps <= 0:
            raise ValueError(f"norm_eps={self.norm_eps} must be positive")
        if self.rope_theta <= 0:
            raise ValueError(f"rope_theta={self.rope_theta} must be positive")
        if self.z_loss < 0:
            raise ValueError(f"z_loss={self.z_loss} must be >= 0 (0 disables it)")
        if self.init_std <= 0:
            raise ValueError(f"init_std={self.init_std} must be positive")
        if self.attention not in ATTENTION_BACKENDS:
            raise ValueError(f"attention={self.attention!r} must be one of {', '.join(ATTENTION_BACKENDS)}")
        if self.mlp_act not in MLP_ACTIVATIONS:
            raise ValueError(f"mlp_act={self.mlp_act!r} must be one of {', '.join(MLP_ACTIVATIONS)}")
        check_rope_scaling(self.rope_scaling)

    @property
    def head_dim(self) -> int:
        """Width of one attention head: `head_size`, or dim / n_heads."""
        return self.head_size or self.dim // self.n_heads

    @property
    def kv_heads(self) -> int:
        """Number of key/value heads, resolved (`n_kv_heads` or `n_heads`)."""
        return self.n_heads if self.n_kv_heads is None else self.n_kv_heads

    @property
    def mlp_hidden_dim(self) -> int:
        """SwiGLU hidden size, resolved: `mlp_hidden`, or 8/3*dim rounded up to `multiple_of` (Llama rule)."""
        if self.mlp_hidden:
            return self.mlp_hidden
        hidden = int(2 * 4 * self.dim / 3)
        return self.multiple_of * -(-hidden // self.multiple_of)

    def num_params(self, vocab_size: int = 0, tied_embeddings: bool = False) -> int:
        """Parameters of the token embedding, the decoder and the LM head (no image projections)."""
        d, hd = self.dim, self.head_dim
        attn = d * self.n_heads * hd * 2 + d * self.kv_heads * hd * 2  # q, o + k, v
        attn += (self.n_heads + 2 * self.kv_heads) * hd if self.qkv_bias else 0
        mlp = 3 * d * self.mlp_hidden_dim
        norms = 2 * d + (2 * hd if self.qk_norm else 0)
        embeddings = vocab_size * d * (1 if tied_embeddings else 2)
        return self.n_layers * (attn + mlp + norms) + d + embeddings

    @classmethod
    def from_name(cls, name: str, **overrides) -> ArchConfig:
        """The named size `name` from `SIZES`, with any field replaced by `overrides`."""
        if name not in SIZES:
            raise ValueError(f"unknown model size {name!r}; choose one of {', '.join(SIZES)}")
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(overrides) - fields)
        if unknown:
            raise ValueError(
                f"ArchConfig has no field {', '.join(unknown)}; fields are {', '.join(sorted(fields))}"
            )
        return dataclasses.replace(SIZES[name], **overrides)


SIZES: dict[str, ArchConfig] = {
    # Every test uses this one.
    "debug": ArchConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, multiple_of=32, max_seq_len=512),
    # The shapes-world recipes: on a 2-core CPU more steps beat more width.
    "shapes": ArchConfig(dim=128, n_layers=4, n_heads=4, n_kv_heads=2, mlp_hidden=384, multiple_of=64,
                         max_seq_len=1024),
    # Trains on a laptop CPU in minutes.
    "tiny": ArchConfig(dim=192, n_layers=4, n_heads=6, n_kv_heads=2, multiple_of=64, max_seq_len=1024),
    "small": ArchConfig(dim=512, n_layers=8, n_heads=8, n_kv_heads=4, max_seq_len=2048),
    "base": ArchConfig(dim=768, n_layers=12, n_heads=12, n_kv_heads=4, max_seq_len=2048),
    # TinyLlama-1.1B shapes.
    "1b": ArchConfig(dim=2048, n_layers=22, n_heads=32, n_kv_heads=4, mlp_hidden=5632, max_seq_len=2048),
    # Llama-2-7B shapes.
    "7b": ArchConfig(dim=4096, n_layers=32, n_heads=32, n_kv_heads=32, mlp_hidden=11008, max_seq_len=4096),
}
