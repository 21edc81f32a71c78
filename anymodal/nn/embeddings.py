"""Diffusion timestep embedding (from diffusers) and latent <-> patch sequence reshapes."""

from __future__ import annotations

import torch
from diffusers.models.embeddings import TimestepEmbedding, Timesteps
from einops import rearrange
from torch import nn


class TimestepEmbedder(nn.Module):
    """Diffusion time t: (N,) float -> (N, dim): sinusoids (DiT layout, cos first) and a SiLU MLP.

    `time_scale` multiplies t before the sinusoids: 1000 suits flow-matching times in [0, 1] (they then
    span the same range as DDPM's integer steps); use 1 for integer steps.
    """

    def __init__(self, dim: int, frequency_dim: int = 256, time_scale: float = 1000.0) -> None:
        super().__init__()
        self.sinusoids = Timesteps(
            frequency_dim, flip_sin_to_cos=True, downscale_freq_shift=0, scale=time_scale
        )
        self.mlp = TimestepEmbedding(frequency_dim, dim)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        if t.ndim != 1:
            raise ValueError(f"timesteps must be one per image, shape (N,), got {tuple(t.shape)}")
        freqs = self.sinusoids(t)  # (N, frequency_dim) float32
        return self.mlp(freqs.to(self.mlp.linear_1.weight.dtype))  # (N, dim)


def patchify(latents: torch.Tensor, patch_size: int) -> torch.Tensor:
    """latents (N, C, h, w) -> patches (N, h/p * w/p, C*p*p), row-major over the patch grid."""
    _, _, h, w = latents.shape
    if h % patch_size or w % patch_size:
        raise ValueError(f"latent size {h}x{w} must be divisible by patch_size={patch_size}")
    return rearrange(latents, "n c (h p) (w q) -> n (h w) (c p q)", p=patch_size, q=patch_size)


def unpatchify(patches: torch.Tensor, patch_size: int, height: int, width: int) -> torch.Tensor:
    """patches (N, h/p * w/p, C*p*p) -> latents (N, C, h, w), the inverse of `patchify`."""
    if height % patch_size or width % patch_size:
        raise ValueError(f"latent size {height}x{width} must be divisible by patch_size={patch_size}")
    grid_h, grid_w = height // patch_size, width // patch_size
    if patches.shape[1] != grid_h * grid_w:
        raise ValueError(
            f"{patches.shape[1]} patches do not tile a {height}x{width} latent with patch_size={patch_size} "
            f"({grid_h * grid_w} expected)"
        )
    return rearrange(
        patches, "n (h w) (c p q) -> n c (h p) (w q)", h=grid_h, w=grid_w, p=patch_size, q=patch_size
    )
