"""The unified model: one decoder over text ids, discrete image codes and continuous latent patches.

Discrete path: codes live in the shared vocabulary after the text ids and specials; one LM head.
Continuous path: VAE latents -> p x p patches -> linear in-projection + timestep embedding + a learned
position per patch -> decoder -> out-projection -> the objective's prediction (velocity or noise).
The model never draws timesteps or adds noise.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from anymodal.config import ArchConfig
from anymodal.layout import code_slots
from anymodal.masks import AttentionMask
from anymodal.model.cache import KVCache
from anymodal.model.decoder import Decoder
from anymodal.nn.embeddings import TimestepEmbedder, patchify, unpatchify


@dataclass
class ModelConfig:
    """Everything needed to rebuild a unified model (saved as a bundle's config.json)."""

    arch: ArchConfig
    """Decoder shape."""
    text_vocab_size: int
    """Text ids including the specials; image codes start here."""
    image_path: Literal["discrete", "continuous"] = "continuous"
    """Image path: 'discrete' (VQ codes in the vocabulary) or 'continuous' (VAE latent patches)."""
    codebook_size: int = 0
    """Number of image codes (discrete path)."""
    latent_channels: int = 4
    """Channels of the VAE latents (continuous path)."""
    grid: int = 8
    """Side of the image's code grid (discrete) or latent grid (continuous)."""
    patch_size: int = 2
    """Side of a latent patch (continuous path); grid must be divisible by it."""
    mask_code: bool = False
    """Discrete path: one more row after the codes, the mask id of parallel (MaskGIT-style) decoding
    (`anymodal.parallel`); never sampled."""
    reference_input: bool = False
    """Continuous path: each image's patches also read the patches of the image before it in the document (an
    edit's source, a story's previous picture) at the same slot, through their own projection (`ref_in`)."""
    code_positions: bool = False
    """Discrete path: `<boi>` and each code of an image add a learned embedding of their slot in the image
    (`code_pos`, slots + 1 rows), as continuous patches add `patch_pos`: where a code sits on the grid is then in
    its input, not only in RoPE's relative offsets (runs of background codes look alike). Slots come from
    `anymodal.layout.code_slots`."""

    def __post_init__(self) -> None:
        if isinstance(self.arch, dict):
            self.arch = ArchConfig(**self.arch)
        if self.image_path not in ("discrete", "continuous"):
            raise ValueError(f"image_path={self.image_path!r} must be 'discrete' or 'continuous'")
        if self.image_path == "discrete" and self.codebook_size <= 0:
            raise ValueError("the discrete path needs codebook_size > 0 (the image tokenizer's codebook)")
        if self.mask_code and self.image_path != "discrete":
            raise ValueError("mask_code belongs to the discrete path (parallel decoding of image codes)")
        if self.code_positions and self.image_path != "discrete":
            raise ValueError("code_positions belongs to the discrete path (image codes); continuous patches have "
                             "their learned positions already")
        if self.reference_input and self.image_path != "continuous":
            raise ValueError("reference_input belongs to the continuous path (latent patches); the discrete path "
                             "reads earlier images through attention only")
        if self.image_path == "continuous" and self.grid % self.patch_size:
            raise ValueError(f"latent grid={self.grid} must be divisible by patch_size={self.patch_size}")

    @property
    def code_offset(self) -> int:
        return self.text_vocab_size

    @property
    def vocab_size(self) -> int:
        return self.text_vocab_size + (self.codebook_size + self.mask_code if self.image_path == "discrete" else 0)

    @property
    def mask_id(self) -> int:
        """The id of a masked code slot (parallel decoding); only with mask_code."""
        if not self.mask_code:
            raise ValueError("this model has no mask id: it was trained without parallel_images, so it decodes "
                             "images autoregressively only (leave parallel_steps at 0)")
        return self.code_offset + self.codebook_size

    @property
    def slots(self) -> int:
        """Sequence positions per image."""
        return self.grid**2 if self.image_path == "discrete" else (self.grid // self.patch_size) ** 2

    @property
    def patch_dim(self) -> int:
        return self.latent_channels * self.patch_size**2

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        d = dict(d)
        if "path" in d:  # bundles written before the rename
            d["image_path"] = d.pop("path")
        d.pop("prediction", None)  # now the objective's (objective.json), never stored twice
        return cls(**d)


def build_model_config(arch: ArchConfig, text_vocab_size: int, image_tokenizer, image_size: int,
                       patch_size: int = 2, reference_input: bool = False, mask_code: bool = False,
                       code_positions: bool = False) -> ModelConfig:
    """The unified model over `image_tokenizer` (a VQ-VAE: discrete path; a VAE: continuous) at `image_size` px.

    The grid comes from the tokenizer, so the image size is stated once; a size it cannot tile is refused."""
    from anymodal.tokenizers.image import tokenizer_kind

    grid = image_tokenizer.grid(image_size)[0]
    if tokenizer_kind(image_tokenizer) == "vqvae":
        return ModelConfig(arch=arch, text_vocab_size=text_vocab_size, image_path="discrete",
                           codebook_size=image_tokenizer.codebook_size, grid=grid, mask_code=mask_code,
                           code_positions=code_positions)
    return ModelConfig(arch=arch, text_vocab_size=text_vocab_size, image_path="continuous",
                       latent_channels=image_tokenizer.latent_channels, grid=grid, patch_size=patch_size,
                       reference_input=reference_input, code_positions=code_positions)


@dataclass
class ContinuousInput:
    """Continuous images entering one forward pass.

    slots:      (N, L) int64 flat indices into the (B*T) positions of the pass, one per patch
    latents:    (N, C, h, w) latents (noised or clean)
    timesteps:  (N,) float, 0 for clean images
    references: (N, C, h, w) clean latents of the image before each one in its document, zeros where there is
                none; read only by a model with `reference_input`
    """

    slots: torch.Tensor
    latents: torch.Tensor
    timesteps: torch.Tensor
    references: torch.Tensor | None = None


class UnifiedModel(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        arch = config.arch
        self.embed_tokens = nn.Embedding(config.vocab_size, arch.dim)
        self.decoder = Decoder(arch)
        # Tied embeddings (arch.tied_embeddings) have no head of their own: logits use embed_tokens.weight.
        self.lm_head = None if arch.tied_embeddings else nn.Linear(arch.dim, config.vocab_size, bias=False)
        # Built submodules are re-initialised through `apply`: under ZeRO-3's zero.Init they are already sharded
        # and DeepSpeed gathers their weights around an applied function (a direct nn.init would see empty shards).
        normal = lambda module: nn.init.normal_(module.weight, std=arch.init_std)  # noqa: E731
        self.embed_tokens.apply(normal)
        if self.lm_head is not None:
            self.lm_head.apply(normal)
        if config.image_path == "continuous":
            self.patch_in = nn.Linear(config.patch_dim, arch.dim)
            self.patch_pos = nn.Parameter(torch.randn(config.slots, arch.dim) * arch.init_std)
            self.time_embed = TimestepEmbedder(arch.dim, time_scale=1.0)  # timesteps arrive in [0, 1000]
            self.patch_out = nn.Linear(arch.dim, config.patch_dim)
            self.patch_out.apply(lambda module: (nn.init.zeros_(module.weight), nn.init.zeros_(module.bias)))
            if config.reference_input:  # starts silent: a reference adds nothing until training finds it useful
                self.ref_in = nn.Linear(config.patch_dim, arch.dim, bias=False)
                self.ref_in.apply(lambda module: nn.init.zeros_(module.weight))
        if config.code_positions:  # <boi> is slot 0, the image's codes 1..slots
            self.code_pos = nn.Parameter(torch.randn(config.slots + 1, arch.dim) * arch.init_std)

    def embed(self, tokens: torch.Tensor, continuous: ContinuousInput | None = None,
              code_slots: torch.Tensor | None = None) -> torch.Tensor:
        """Input embeddings (B, T, D): token embeddings, with continuous patches written into their slots.

        code_slots: (B, T) slot of each token in its discrete image (`anymodal.layout.code_slots`, -1 outside
        images); read by a model with `code_positions` only."""
        h = self.embed_tokens(tokens)  # (B, T, D)
        if self.config.arch.embed_scale:  # Gemma: sqrt(dim), rounded to the activations' dtype as there
            h = h * torch.tensor(self.config.arch.dim**0.5, dtype=h.dtype)
        if self.config.code_positions:
            if code_slots is None or code_slots.shape != tokens.shape:
                raise ValueError("this model adds each code's slot in its image (code_positions); pass code_slots "
                                 "(anymodal.layout.code_slots) of the tokens' shape")
            inside = (code_slots >= 0)[..., None].to(h.dtype)
            h = h + self.code_pos[code_slots.clamp_min(0)].to(h.dtype) * inside
        if continuous is None or continuous.slots.numel() == 0:
            return h
        B, T, D = h.shape
        p = self.config.patch_size
        patches = patchify(continuous.latents.to(h.dtype), p)  # (N, L, C*p*p)
        t = self.time_embed(continuous.timesteps.float()).to(h.dtype)  # (N, D)
        x = self.patch_in(patches) + t[:, None, :] + self.patch_pos[None]  # (N, L, D)
        if self.config.reference_input:
            if continuous.references is None:
                raise ValueError("this model reads each image's reference (reference_input); pass "
                                 "ContinuousInput.references (zeros where an image has none)")
            x = x + self.ref_in(patchify(continuous.references.to(h.dtype), p))  # same slot, same place
        return h.reshape(B * T, D).index_copy(0, continuous.slots.reshape(-1), x.reshape(-1, D)).view(B, T, D)

    def code_slots(self, tokens: torch.Tensor, boi_id: int) -> torch.Tensor | None:
        """What `embed` takes as code_slots for `tokens` (B, T): None unless the model has `code_positions`."""
        c = self.config
        if not c.code_positions:
            return None
        return code_slots(tokens, boi_id, c.code_offset, c.codebook_size + c.mask_code, c.slots)

    def forward(self, h: torch.Tensor, positions: torch.Tensor, mask: AttentionMask,
                cache: KVCache | None = None, write_cache: bool = True) -> torch.Tensor:
        """Hidden states (B, T, D) of input embeddings `h` (B, T, D)."""
        return self.decoder(h, positions, mask, cache=cache, write_cache=write_cache)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """(..., V) next-token logits over text ids and (discrete path) image codes."""
        if self.lm_head is None:
            return F.linear(hidden, self.embed_tokens.weight)
        return self.lm_head(hidden)

    def image_prediction(self, hidden: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
        """(N, C, h, w) velocity/noise prediction of the continuous images at `slots` (N, L) of (B*T)."""
        D = hidden.shape[-1]
        x = hidden.reshape(-1, D)[slots.reshape(-1)].view(*slots.shape, D)  # (N, L, D)
        return unpatchify(self.patch_out(x), self.config.patch_size, self.config.grid, self.config.grid)  # (N, C, h, w)
