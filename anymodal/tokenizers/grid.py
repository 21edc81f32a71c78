"""The latent/code grid of an image tokenizer and the pixel check both tokenizers share."""

from __future__ import annotations

import torch


def latent_grid(image_size: int | tuple[int, int], downsample: int) -> tuple[int, int]:
    """Grid (h, w) of an image of side `image_size` (or (H, W)) under `downsample` per side."""
    h, w = (image_size, image_size) if isinstance(image_size, int) else image_size
    if h % downsample or w % downsample:
        raise ValueError(f"image size {h}x{w} must be divisible by the tokenizer's downsample={downsample}")
    return h // downsample, w // downsample


def check_pixels(pixels: torch.Tensor, downsample: int) -> None:
    """Raise unless pixels are (B, 3, H, W) with H and W divisible by `downsample`."""
    if pixels.ndim != 4 or pixels.shape[1] != 3:
        raise ValueError(f"pixels must be (B, 3, H, W), got {tuple(pixels.shape)}")
    latent_grid(tuple(pixels.shape[-2:]), downsample)
