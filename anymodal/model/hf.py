"""Pretrained causal LMs from a local Hugging Face folder, mapped exactly onto the native decoder, and back.

    load_text_model(path)         the native backbone with the LM's weights: ids (B, T) -> logits (B, T, V),
                                  equal to `AutoModelForCausalLM` on the same folder
    read_lm_arch(path)            config.json -> ArchConfig (what `UnifiedSystem(init_from=...)` builds)
    init_from_lm(model, path)     a UnifiedModel starts from the LM: its decoder and its token rows; rows the
                                  LM lacks (added specials, image codes) start at the mean of its rows + noise
    save_hf_model(folder, ...)    native weights -> a folder plain transformers loads (`anymodal export
                                  --format hf`)

Families mapped exactly: llama (SmolLM: tied embeddings; Llama 3: its RoPE scaling), mistral, qwen2
(q/k/v biases), qwen3 (QK-norm) and gemma ((1 + w) RMSNorm, GeGLU, sqrt(dim) embedding scale). A family or
a feature the decoder would compute differently is refused in one sentence that names it: different
logits are never silent. Only safetensors weights are read, and nothing is ever downloaded.
"""

from __future__ import annotations

import json
import os
from collections.abc import Collection
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from anymodal.config import ArchConfig, check_rope_scaling
from anymodal.masks import AttentionMask, build_attention_mask
from anymodal.model.convert import from_hf_state_dict, to_hf_state_dict
from anymodal.model.decoder import Decoder

FAMILIES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
            "qwen3": "Qwen3ForCausalLM", "gemma": "GemmaForCausalLM"}
"""model_type in config.json -> the transformers class the native decoder reproduces."""

REFUSED = {
    "gpt2": "learned absolute positions, LayerNorm and biased fused projections",
    "gpt_neox": "parallel attention/MLP blocks, LayerNorm and partial rotary embeddings",
    "phi": "partial rotary embeddings, LayerNorm and parallel blocks",
    "phi3": "fused qkv and gate/up projections",
    "gemma2": "logit soft-capping, sandwich norms and alternating sliding-window layers",
    "gemma3": "sandwich norms, QK-norm with (1 + w) and alternating sliding-window layers",
    "gemma3_text": "sandwich norms, QK-norm with (1 + w) and alternating sliding-window layers",
    "mixtral": "mixture-of-experts MLPs",
    "qwen2_moe": "mixture-of-experts MLPs",
    "qwen3_moe": "mixture-of-experts MLPs",
    "olmo2": "norms after attention and MLP instead of before",
    "cohere": "LayerNorm, parallel blocks and logit scaling",
}
"""Well-known causal-LM families and what in them the native decoder does not compute."""

NEW_ROW_NOISE = 1.0
"""New embedding/head rows start at the mean of the LM's rows plus this times their per-dimension std of
Gaussian noise: rows with the LM's own per-dimension mean and spread. Measured on the shapes world (a text LM
continued on the discrete path, 300 steps): at 1.0 the image codes' loss fell as fast as from scratch (1.58 vs
1.56), at 0.1 it lagged (2.09): codes barely apart enter the decoder as one input. Either way the new rows took
0.2-0.3% of the probability at text positions at the start."""

_OVERRIDABLE = ("max_seq_len", "attention", "checkpoint_activations", "z_loss")
"""ArchConfig fields a recipe may set on a pretrained LM (its shape comes from config.json)."""


# ------------------------------------------------------------------------------------------------ reading
def _config_json(folder: str | os.PathLike) -> tuple[Path, dict[str, Any]]:
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"LM folder {str(folder)!r} does not exist; pass a local Hugging Face model folder "
                                "(config.json and *.safetensors; nothing is downloaded)")
    path = folder / "config.json"
    if not path.is_file():
        raise ValueError(f"{str(folder)!r} has no config.json, so it is not a Hugging Face model folder")
    try:
        return folder, json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON ({e.msg} at line {e.lineno})") from None


def read_hf_config(folder: str | os.PathLike):
    """The transformers config of a supported causal-LM folder (defaults filled in); anything else refused."""
    folder, doc = _config_json(folder)
    model_type = doc.get("model_type")
    architectures = doc.get("architectures") or []
    causal = any(a.endswith("ForCausalLM") for a in architectures)
    if model_type not in FAMILIES:
        if model_type in REFUSED or causal:
            reason = f" ({REFUSED[model_type]})" if model_type in REFUSED else ""
            raise ValueError(f"{str(folder)!r} holds a {model_type} model{reason}, which anymodal cannot reproduce "
                             f"exactly; supported families are {', '.join(FAMILIES)}")
        what = ", ".join(architectures) or (f"model_type {model_type!r}" if model_type else "no model_type")
        raise ValueError(f"{str(folder)!r} holds {what}, not a causal language model; init_from needs the folder "
                         f"of a decoder LM ({', '.join(FAMILIES)})")
    if architectures and not causal:
        raise ValueError(f"{str(folder)!r} holds {', '.join(architectures)}, not a causal language model "
                         "(a ...ForCausalLM); point at the LM's own folder")
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(str(folder), local_files_only=True)


def _rope(config) -> tuple[float, dict | None]:
    """(theta, scaling or None) from a transformers-5 `rope_parameters` or transformers-4 `rope_theta`/`rope_scaling`."""
    params = getattr(config, "rope_parameters", None)
    if isinstance(params, dict) and "rope_theta" in params:
        theta, scaling = params["rope_theta"], {k: v for k, v in params.items() if k != "rope_theta"}
    else:
        theta, scaling = getattr(config, "rope_theta", 10000.0), getattr(config, "rope_scaling", None)
    if scaling and scaling.get("rope_type", scaling.get("type", "default")) == "default":
        scaling = None
    return float(theta), (dict(scaling) if scaling else None)


def _sliding_window(config) -> int | None:
    """The attention window, where the config uses one (Mistral; Qwen2/3 with use_sliding_window)."""
    window = getattr(config, "sliding_window", None)
    if config.model_type == "mistral":
        return window
    layer_types = getattr(config, "layer_types", None) or []
    if getattr(config, "use_sliding_window", False) or "sliding_attention" in layer_types:
        return window
    return None


def arch_from_hf_config(config, where: str = "the LM", **overrides) -> ArchConfig:
    """ArchConfig of a supported transformers config, refusing each feature the decoder would compute
    differently; `overrides` may set only run-time fields (max_seq_len, attention, checkpoint_activations, z_loss)."""
    kind = config.model_type

    def refuse(feature: str) -> ValueError:
        return ValueError(f"{where} ({kind}) uses {feature}, which anymodal's decoder does not compute; "
                          "it would give different logits, so it is refused")

    if getattr(config, "quantization_config", None):
        raise refuse("quantized weights (quantization_config)")
    if getattr(config, "partial_rotary_factor", 1.0) != 1.0:
        raise refuse(f"partial rotary embeddings (partial_rotary_factor={config.partial_rotary_factor})")
    if getattr(config, "mlp_bias", False):
        raise refuse("biases in the MLP (mlp_bias=True)")
    if getattr(config, "attention_bias", False) and kind != "qwen2":
        raise refuse("a bias on the attention output projection (attention_bias=True)")
    for name in ("attn_logit_softcapping", "final_logit_softcapping"):
        if getattr(config, name, None):
            raise refuse(f"logit soft-capping ({name})")
    act = getattr(config, "hidden_activation", None) if kind == "gemma" else None
    act = act or config.hidden_act
    activations = {"silu": "silu", "gelu_pytorch_tanh": "gelu_tanh"}
    if act not in activations:
        raise refuse(f"the MLP activation {act!r} (silu and gelu_pytorch_tanh are supported)")
    theta, scaling = _rope(config)
    try:
        check_rope_scaling(scaling)
    except ValueError as e:
        raise refuse(str(e).partition(" is not supported")[0]) from None
    context = int(getattr(config, "max_position_embeddings", 2048))
    window = _sliding_window(config)
    if window:  # within the window, sliding-window attention is full causal attention: cap the context there
        context = min(context, int(window))
    unknown = sorted(set(overrides) - set(_OVERRIDABLE))
    if unknown:
        raise ValueError(f"arch overrides {', '.join(unknown)} conflict with the pretrained LM's shape; with init_from "
                         f"only {', '.join(_OVERRIDABLE)} may be set")
    if overrides.get("max_seq_len", context) > context:
        limit = "its sliding window" if window and context == window else "its max_position_embeddings"
        raise ValueError(f"max_seq_len={overrides['max_seq_len']} is longer than {where} handles ({context}, "
                         f"{limit}); use at most {context}")
    n_heads = config.num_attention_heads
    return ArchConfig(
        dim=config.hidden_size,
        n_layers=config.num_hidden_layers,
        n_heads=n_heads,
        n_kv_heads=getattr(config, "num_key_value_heads", None) or n_heads,
        mlp_hidden=config.intermediate_size,
        norm_eps=config.rms_norm_eps,
        rope_theta=theta,
        rope_scaling=scaling,
        max_seq_len=context,
        qk_norm=kind == "qwen3",
        init_std=getattr(config, "initializer_range", 0.02),
        head_size=getattr(config, "head_dim", None) or config.hidden_size // n_heads,
        qkv_bias=kind == "qwen2",
        tied_embeddings=bool(getattr(config, "tie_word_embeddings", False)),
        mlp_act=activations[act],
        norm_offset=kind == "gemma",
        embed_scale=kind == "gemma",
        **overrides,
    )


def read_lm_arch(folder: str | os.PathLike, **overrides) -> ArchConfig:
    """ArchConfig of the LM in `folder` (see `arch_from_hf_config`)."""
    return arch_from_hf_config(read_hf_config(folder), where=repr(str(folder)), **overrides)


def read_lm_weights(folder: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The LM's state dict (transformers names) from its safetensors files, one or sharded; pickles are refused."""
    folder = Path(folder)
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        files = sorted({folder / name for name in json.loads(index.read_text())["weight_map"].values()})
    elif (folder / "model.safetensors").is_file():
        files = [folder / "model.safetensors"]
    else:
        files = sorted(folder.glob("*.safetensors"))
    if not files:
        pickles = [p.name for p in folder.iterdir() if p.suffix in (".bin", ".pt", ".pth")]
        hint = (f" (it holds {', '.join(pickles)}: pickled weights are refused; re-save them with "
                "save_pretrained(..., safe_serialization=True))") if pickles else ""
        raise ValueError(f"{str(folder)!r} holds no *.safetensors weights{hint}")
    state: dict[str, torch.Tensor] = {}
    for f in files:
        state.update(load_file(str(f)))
    return state


def load_matching(module: nn.Module, state: dict[str, torch.Tensor], where: str,
                  problem: str = "do not match its config.json") -> None:
    """`module.load_state_dict(state, assign=True)` after checking names and shapes; if they differ, one sentence:
    `the weights in {where} {problem} (missing: ...; wrong shape: ...)`."""
    own = module.state_dict()
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    wrong = sorted(k for k in set(own) & set(state) if own[k].shape != state[k].shape)
    if missing or unexpected or wrong:
        detail = "; ".join(f"{name}: {', '.join(keys[:3])}{' ...' if len(keys) > 3 else ''}"
                           for name, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong))
                           if keys)
        raise ValueError(f"the weights in {where} {problem} ({detail})")
    module.load_state_dict(state, assign=True)


# ------------------------------------------------------------------------------------------------ the text model
class TextModel(nn.Module):
    """The native backbone as a plain causal LM: token embedding, decoder, LM head (none when tied)."""

    def __init__(self, arch: ArchConfig, vocab_size: int) -> None:
        super().__init__()
        self.arch, self.vocab_size = arch, vocab_size
        self.embed_tokens = nn.Embedding(vocab_size, arch.dim)
        self.decoder = Decoder(arch)
        self.lm_head = None if arch.tied_embeddings else nn.Linear(arch.dim, vocab_size, bias=False)

    def forward(self, tokens: torch.Tensor, positions: torch.Tensor | None = None,
                mask: AttentionMask | None = None) -> torch.Tensor:
        """Next-token logits (B, T, V) of token ids (B, T). Without `positions` and `mask`, each row is one causal
        sequence from position 0 (as transformers runs it); packed rows pass both (anymodal.layout)."""
        B, T = tokens.shape
        h = self.embed_tokens(tokens)  # (B, T, D)
        if self.arch.embed_scale:
            h = h * torch.tensor(self.arch.dim**0.5, dtype=h.dtype)
        if mask is None:
            document_ids = torch.zeros(B, T, dtype=torch.long, device=tokens.device)  # one document: causal
            continuous_ids = torch.full((B, T), -1, dtype=torch.long, device=tokens.device)
            mask = build_attention_mask(document_ids, continuous_ids, self.arch.attention)
        if positions is None:
            positions = torch.arange(T, device=tokens.device).expand(B, T)
        hidden = self.decoder(h, positions, mask)  # (B, T, D)
        return F.linear(hidden, self.embed_tokens.weight) if self.lm_head is None else self.lm_head(hidden)


def load_text_model(path: str | os.PathLike, dtype: torch.dtype = torch.float32) -> TextModel:
    """The native backbone loaded from a local Hugging Face causal-LM folder (config.json + safetensors).

    Returns an `nn.Module` in eval mode whose forward maps token ids (B, T) to text logits (B, T, V), equal
    to `AutoModelForCausalLM.from_pretrained(path)` (within 1e-4 in float32). Families: llama (SmolLM),
    mistral, qwen2, qwen3, gemma; anything the decoder would compute differently raises a ValueError that
    names it. The weights are cast to `dtype`.
    """
    config = read_hf_config(path)
    arch = arch_from_hf_config(config, where=repr(str(path)))
    with torch.device("meta"):  # no random init of weights that are about to be replaced
        model = TextModel(arch, config.vocab_size)
    raw = read_lm_weights(path)
    if not arch.tied_embeddings and "lm_head.weight" not in raw:
        raise ValueError(f"{str(path)!r} declares untied embeddings (tie_word_embeddings=false) but its weights have "
                         "no lm_head.weight")
    state = from_hf_state_dict(raw, tied=arch.tied_embeddings, strict=False)
    load_matching(model, {k: v.to(dtype) for k, v in state.items()}, repr(str(path)))
    return model.eval()


# ------------------------------------------------------------------------------------------------ unified init
@torch.no_grad()
def init_from_lm(model: nn.Module, folder: str | os.PathLike, new_ids: Collection[int] = (),
                 seed: int = 0) -> torch.Tensor:
    """Start `model` (a UnifiedModel whose arch is `read_lm_arch(folder)`) from the LM in `folder`.

    The decoder is copied. Token row i (embedding and head) is the LM's row i for every text id the LM has,
    except `new_ids` (specials its tokenizer lacked); every other row (those, and the image codes of the
    discrete path) starts at the mean of the LM's rows plus `NEW_ROW_NOISE` x their per-dimension std of noise.
    Text logits on text are therefore the LM's. Returns the (V,) bool mask of the rows taken from the LM.
    """
    lm = load_text_model(folder)
    if lm.arch.dim != model.config.arch.dim or lm.arch.n_layers != model.config.arch.n_layers:
        raise ValueError(f"the model was not built from {str(folder)!r} (dim {model.config.arch.dim}, "
                         f"{model.config.arch.n_layers} layers); build its config with read_lm_arch")
    model.decoder.load_state_dict(lm.decoder.state_dict())
    V, n = model.config.vocab_size, min(lm.vocab_size, model.config.text_vocab_size)
    from_lm = torch.zeros(V, dtype=torch.bool)
    from_lm[:n] = True
    from_lm[[i for i in new_ids if i < V]] = False
    generator = torch.Generator().manual_seed(seed)
    pairs = [(model.embed_tokens.weight, lm.embed_tokens.weight)]
    if model.lm_head is not None:
        pairs.append((model.lm_head.weight, lm.embed_tokens.weight if lm.lm_head is None else lm.lm_head.weight))
    for target, source in pairs:
        rows = source[:n][from_lm[:n]]  # (n', D)
        new = rows.mean(0) + NEW_ROW_NOISE * rows.std(0) * torch.randn(V - len(rows), rows.shape[1], generator=generator)
        target[from_lm.to(target.device)] = rows.to(target)
        target[~from_lm.to(target.device)] = new.to(target)
    return from_lm


# ------------------------------------------------------------------------------------------------ export
def export_family(arch: ArchConfig) -> str:
    """The transformers family whose model computes exactly what `arch` does: gemma for the Gemma features,
    qwen2 for q/k/v biases, qwen3 for QK-norm, else llama (Mistral models export as llama, its equal here)."""
    gemma = (arch.norm_offset, arch.embed_scale, arch.mlp_act == "gelu_tanh")
    if any(gemma):
        if not all(gemma) or arch.qk_norm or arch.qkv_bias:
            raise ValueError("no transformers family combines this model's norm_offset, embed_scale, mlp_act, qk_norm "
                             "and qkv_bias; only Gemma's set (all three Gemma features, no QK-norm, no biases) exports")
        return "gemma"
    if arch.qkv_bias and arch.qk_norm:
        raise ValueError("no transformers family has both q/k/v biases and QK-norm; this model cannot export to hf")
    return "qwen2" if arch.qkv_bias else "qwen3" if arch.qk_norm else "llama"


def hf_config(arch: ArchConfig, vocab_size: int, bos_id: int | None = None, eos_id: int | None = None,
              pad_id: int | None = None):
    """The transformers config of `arch` (family from `export_family`), in arguments transformers 4 and 5 both read."""
    from transformers import AutoConfig

    family = export_family(arch)
    act = {"silu": "silu", "gelu_tanh": "gelu_pytorch_tanh"}[arch.mlp_act]
    kwargs: dict[str, Any] = dict(
        vocab_size=vocab_size, hidden_size=arch.dim, intermediate_size=arch.mlp_hidden_dim,
        num_hidden_layers=arch.n_layers, num_attention_heads=arch.n_heads, num_key_value_heads=arch.kv_heads,
        head_dim=arch.head_dim, hidden_act=act, max_position_embeddings=arch.max_seq_len,
        rms_norm_eps=arch.norm_eps, rope_theta=arch.rope_theta, rope_scaling=arch.rope_scaling,
        initializer_range=arch.init_std, tie_word_embeddings=arch.tied_embeddings,
        bos_token_id=bos_id, eos_token_id=eos_id, pad_token_id=pad_id,
    )
    if family in ("llama", "qwen3"):
        kwargs.update(attention_bias=False)
    if family == "llama":
        kwargs.update(mlp_bias=False)
    if family in ("qwen2", "qwen3"):
        kwargs.update(use_sliding_window=False, sliding_window=None)
    if family == "gemma":
        kwargs.update(hidden_activation=act)  # the name transformers 4 reads for Gemma's MLP
    config = AutoConfig.for_model(family, **kwargs)
    config.architectures = [FAMILIES[family]]
    return config


def save_hf_model(folder: str | os.PathLike, arch: ArchConfig, state: dict[str, torch.Tensor], vocab_size: int,
                  bos_id: int | None = None, eos_id: int | None = None, pad_id: int | None = None) -> Path:
    """Write native weights (embed_tokens, decoder, lm_head) as a folder `AutoModelForCausalLM` loads:
    config.json of the family `export_family` picks, and model.safetensors under transformers' names."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    hf_config(arch, vocab_size, bos_id, eos_id, pad_id).save_pretrained(str(folder))
    weights = {k: v.detach().contiguous().cpu() for k, v in to_hf_state_dict(state).items()}
    save_file(weights, str(folder / "model.safetensors"), metadata={"format": "pt"})
    return folder


def read_hf_model(folder: str | os.PathLike, tied: bool) -> dict[str, torch.Tensor]:
    """Native state dict (embed_tokens, decoder, lm_head) of a folder `save_hf_model` wrote."""
    return from_hf_state_dict(read_lm_weights(folder), tied=tied)
