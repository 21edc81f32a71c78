"""One-to-one weight mapping between the native backbone and transformers' `LlamaForCausalLM`.

The same names serve every family `model/hf.py` maps (Llama, Mistral, Qwen2 with its q/k/v biases, Qwen3
with its QK-norm, Gemma). The native side is a model holding `embed_tokens: nn.Embedding`,
`decoder: Decoder` and `lm_head: nn.Linear(bias=False)` (none with tied embeddings); the mapping is a
prefix rename:

    embed_tokens.*        <->  model.embed_tokens.*
    decoder.layers.{i}.*  <->  model.layers.{i}.*   (self_attn.{q,k,v,o}_proj, mlp.{gate,up,down}_proj,
                                                     input_layernorm, post_attention_layernorm)
    decoder.norm.*        <->  model.norm.*
    lm_head.*             <->  lm_head.*
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from anymodal.config import ArchConfig

if TYPE_CHECKING:
    from transformers import LlamaConfig

# (native prefix, Llama prefix), checked in order.
_PREFIXES = (
    ("embed_tokens.", "model.embed_tokens."),
    ("decoder.layers.", "model.layers."),
    ("decoder.norm.", "model.norm."),
    ("lm_head.", "lm_head."),
)
_QK_NORM = (".self_attn.q_norm.", ".self_attn.k_norm.")


def _rename(sd: dict, pairs, strict: bool, direction: str) -> dict:
    out, unmatched = {}, []
    for key, value in sd.items():
        for src, dst in pairs:
            if key.startswith(src):
                out[dst + key[len(src) :]] = value
                break
        else:
            unmatched.append(key)
    if unmatched and strict:
        shown = ", ".join(unmatched[:5]) + (" ..." if len(unmatched) > 5 else "")
        raise ValueError(
            f"{len(unmatched)} weights have no counterpart {direction}: {shown}; "
            "pass strict=False to drop them"
        )
    return out


def to_llama_state_dict(sd: dict, strict: bool = True) -> dict:
    """Native state dict -> `LlamaForCausalLM` state dict.

    Weights outside the trio (image projections, timestep embedder) raise unless `strict=False` drops them.
    QK-norm weights always raise: Llama has no QK-norm (Qwen3 names them the same as we do).
    """
    if any(marker in key for key in sd for marker in _QK_NORM):
        raise ValueError(
            "this model uses qk_norm, which LlamaForCausalLM lacks; export a model with qk_norm=False"
        )
    return _rename(sd, _PREFIXES, strict, "in LlamaForCausalLM")


def from_llama_state_dict(sd: dict, strict: bool = True) -> dict:
    """`LlamaForCausalLM` state dict -> native state dict (embed_tokens, decoder, lm_head).

    A checkpoint with tied embeddings and no `lm_head.weight` gets the embedding matrix as its head.
    """
    return from_hf_state_dict(sd, tied=False, strict=strict)


def from_hf_state_dict(sd: dict, tied: bool = False, strict: bool = True) -> dict:
    """A Llama-family causal-LM state dict -> native state dict (embed_tokens, decoder, lm_head).

    `tied`: the native model shares its embedding with the head (no lm_head key); a copy of the head in the
    checkpoint is dropped. Untied: a checkpoint without `lm_head.weight` gets the embedding matrix as head.
    """
    sd = {k: v for k, v in sd.items() if not k.endswith("rotary_emb.inv_freq")}
    out = _rename(sd, [(dst, src) for src, dst in _PREFIXES], strict, "in the native decoder")
    if tied:
        out.pop("lm_head.weight", None)
    elif "lm_head.weight" not in out and "embed_tokens.weight" in out:
        out["lm_head.weight"] = out["embed_tokens.weight"]
    return out


def to_hf_state_dict(sd: dict, strict: bool = True) -> dict:
    """Native state dict -> the state dict of the Llama-family model `model/hf.py` exports it as (Llama,
    Qwen2, Qwen3 or Gemma: they share these names). Tied models carry no `lm_head.weight`."""
    return _rename(sd, _PREFIXES, strict, "in a transformers causal LM")


def llama_config(arch: ArchConfig, vocab_size: int, **overrides) -> LlamaConfig:
    """The `LlamaConfig` of the same shapes as `arch` (no biases; its tying and RoPE scaling)."""
    from transformers import LlamaConfig  # only here: the mapping itself needs no transformers

    if arch.qk_norm:
        raise ValueError(
            "qk_norm=True has no LlamaForCausalLM counterpart; use qk_norm=False to compare with Llama"
        )
    others = [f for f in ("qkv_bias", "norm_offset", "embed_scale") if getattr(arch, f)] + (
        ["mlp_act"] if arch.mlp_act != "silu" else [])
    if others:
        raise ValueError(f"{', '.join(others)} have no LlamaForCausalLM counterpart; anymodal.model.hf.hf_config "
                         "picks the family that has them")
    kwargs = dict(
        vocab_size=vocab_size,
        hidden_size=arch.dim,
        intermediate_size=arch.mlp_hidden_dim,
        num_hidden_layers=arch.n_layers,
        num_attention_heads=arch.n_heads,
        num_key_value_heads=arch.kv_heads,
        head_dim=arch.head_dim,
        hidden_act="silu",
        max_position_embeddings=arch.max_seq_len,
        rms_norm_eps=arch.norm_eps,
        rope_theta=arch.rope_theta,  # the transformers-4 name; transformers 5 reads it into rope_parameters
        initializer_range=arch.init_std,
        attention_bias=False,
        mlp_bias=False,
        tie_word_embeddings=arch.tied_embeddings,
        rope_scaling=arch.rope_scaling,
    )
    kwargs.update(overrides)
    return LlamaConfig(**kwargs)
