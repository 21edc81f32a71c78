"""VAE image tokenizer: a diffusers `AutoencoderKL` with a measured latent scale factor.

Pixels `(B, 3, H, W)` in [0, 1] become continuous latents `(B, C, H/f, W/f)` and back, where
f = 2 ** (len(block_out_channels) - 1). `encode` returns latents multiplied by `scale_factor`
(measured as 1 / std of the latents over a data sample, so diffusion sees unit-variance latents);
`decode` divides by it first. The network works in [-1, 1]; the public API speaks [0, 1] pixels.

A VAE loaded from a pretrained diffusers folder keeps that folder's whole AutoencoderKL config
(`VAEConfig.autoencoder`: activation, block types, `shift_factor`, `latents_mean`/`latents_std`, ...), so a
saved tokenizer folder rebuilds exactly that network; its `shift_factor` is subtracted before scaling, as
diffusers pipelines do: latents = (z - shift_factor) * scale_factor.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from diffusers import AutoencoderKL
from torch import nn

from anymodal.tokenizers.grid import check_pixels, latent_grid


@dataclass
class VAEConfig:
    """Architecture of a VAE image tokenizer (the `diffusers.AutoencoderKL` arguments)."""

    block_out_channels: list[int] = field(default_factory=lambda: [32, 64, 64])
    """Width of each encoder level; n levels downsample by 2 ** (n - 1) per side ([a, b, c]: 4)."""
    latent_channels: int = 4
    """Channels of the latent grid."""
    layers_per_block: int = 1
    """ResNet layers per encoder level (the decoder uses one more)."""
    norm_num_groups: int = 16
    """GroupNorm groups; must divide every width in `block_out_channels`."""
    mid_block_add_attention: bool = True
    """Self-attention in the middle block, at the latent resolution."""
    use_quant_conv: bool = True
    """1x1 convolutions around the latent (as in Stable Diffusion's VAE)."""
    scale_factor: float | None = None
    """Latents are multiplied by this in `encode`; `measure_scale_factor` sets it. None: the pretrained
    model's `scaling_factor` with `pretrained_path`, else 1.0."""
    pretrained_path: str | None = None
    """A local diffusers AutoencoderKL folder to load instead of building one from the fields above
    (their values are then read from that folder)."""
    shift_factor: float | None = None
    """Subtracted from the latents before scaling (diffusers' `shift_factor`, set by SD3- and Flux-style VAEs);
    None: the pretrained model's with `pretrained_path`, else no shift."""
    autoencoder: dict | None = None
    """The whole diffusers AutoencoderKL config a pretrained VAE was loaded with (activation, block types,
    latents_mean/std, ...), kept so a saved folder rebuilds that network; None: built from the fields above."""

    def __post_init__(self) -> None:
        self.block_out_channels = [int(c) for c in self.block_out_channels]
        if not self.block_out_channels:
            raise ValueError("block_out_channels needs at least one width, e.g. [32, 64, 64]")
        bad = [c for c in self.block_out_channels if c % self.norm_num_groups]
        if bad:
            raise ValueError(f"norm_num_groups={self.norm_num_groups} must divide every block_out_channels "
                             f"width; {bad} do not")
        if self.scale_factor is not None and self.scale_factor <= 0:
            raise ValueError(f"scale_factor={self.scale_factor} must be > 0 (or None to use the default)")

    @property
    def downsample(self) -> int:
        """Spatial reduction per side."""
        return 2 ** (len(self.block_out_channels) - 1)


@dataclass
class VAEOutput:
    """What `VAE.forward` returns.

    recon:   (B, 3, H, W) reconstruction in pixel units ([0, 1] range, not clamped; `decode` clamps)
    latents: (B, C, h, w) the latents it was decoded from, multiplied by the scale factor
    kl:      (B,) KL divergence of each image's posterior from the unit Gaussian, summed over the latent
    """

    recon: torch.Tensor
    latents: torch.Tensor
    kl: torch.Tensor


def build_autoencoder(cfg: VAEConfig) -> AutoencoderKL:
    """A fresh AutoencoderKL from `cfg.autoencoder` (a pretrained VAE's whole config) or the fields of `cfg`."""
    if cfg.autoencoder:
        return AutoencoderKL.from_config(dict(cfg.autoencoder))
    n = len(cfg.block_out_channels)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n,
        block_out_channels=tuple(cfg.block_out_channels),
        layers_per_block=cfg.layers_per_block,
        latent_channels=cfg.latent_channels,
        norm_num_groups=cfg.norm_num_groups,
        mid_block_add_attention=cfg.mid_block_add_attention,
        use_quant_conv=cfg.use_quant_conv,
        use_post_quant_conv=cfg.use_quant_conv,
    )


def load_pretrained_autoencoder(path: str) -> AutoencoderKL:
    """An AutoencoderKL from a local diffusers folder (config.json + weights), with a clear error if absent."""
    folder = Path(path)
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"pretrained_path={path!r} is not a diffusers AutoencoderKL folder (no config.json); "
                                f"pass a local folder saved with save_pretrained")
    return AutoencoderKL.from_pretrained(folder)


def autoencoder_config(model: AutoencoderKL) -> dict:
    """The diffusers config of `model` as plain JSON values (its private `_...` entries left out)."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in dict(model.config).items() if not k.startswith("_")}


class VAE(nn.Module):
    """Image tokenizer: pixels (B, 3, H, W) in [0, 1] <-> scaled latents (B, C, H/f, W/f).

    With `pretrained_path`, `self.config` describes the loaded architecture and has no path, so that
    a saved tokenizer folder rebuilds it from its own weights.
    """

    def __init__(self, config: VAEConfig | None = None):
        super().__init__()
        cfg = config or VAEConfig()
        if cfg.pretrained_path:
            self.model = load_pretrained_autoencoder(cfg.pretrained_path)
            mc = self.model.config
            scale = cfg.scale_factor if cfg.scale_factor is not None else float(mc.scaling_factor)
            shift = cfg.shift_factor if cfg.shift_factor is not None else mc.get("shift_factor")
            cfg = replace(cfg, block_out_channels=list(mc.block_out_channels), latent_channels=mc.latent_channels,
                          layers_per_block=mc.layers_per_block, norm_num_groups=mc.norm_num_groups,
                          mid_block_add_attention=mc.mid_block_add_attention, use_quant_conv=mc.use_quant_conv,
                          scale_factor=scale, shift_factor=None if shift is None else float(shift),
                          pretrained_path=None, autoencoder=autoencoder_config(self.model))
        else:
            self.model = build_autoencoder(cfg)
        self.config = cfg
        self.register_buffer("scale", torch.tensor(float(cfg.scale_factor or 1.0)))

    @property
    def scale_factor(self) -> float:
        """What `encode` multiplies latents by."""
        return float(self.scale)

    @property
    def shift(self) -> float:
        """What `encode` subtracts from latents before scaling (0 unless the config sets `shift_factor`)."""
        return float(self.config.shift_factor or 0.0)

    @property
    def latent_channels(self) -> int:
        return self.config.latent_channels

    @property
    def downsample(self) -> int:
        return self.config.downsample

    def grid(self, image_size: int | tuple[int, int]) -> tuple[int, int]:
        """Latent grid (h, w) of an image of side `image_size` (or (H, W))."""
        return latent_grid(image_size, self.downsample)

    def _check_pixels(self, pixels: torch.Tensor) -> None:
        check_pixels(pixels, self.downsample)

    def forward(self, pixels: torch.Tensor, sample: bool = True) -> VAEOutput:
        """Encode (sampling the posterior unless `sample=False`) and decode, keeping gradients."""
        self._check_pixels(pixels)
        posterior = self.model.encode(pixels * 2 - 1).latent_dist
        z = posterior.sample() if sample else posterior.mode()  # (B, C, h, w), unscaled
        recon = (self.model.decode(z).sample + 1) / 2  # (B, 3, H, W)
        return VAEOutput(recon=recon, latents=(z - self.shift if self.shift else z) * self.scale, kl=posterior.kl())

    @torch.no_grad()
    def encode(self, pixels: torch.Tensor, sample: bool = False,
               generator: torch.Generator | None = None) -> torch.Tensor:
        """pixels (B, 3, H, W) in [0, 1] -> latents (B, C, h, w), multiplied by `scale_factor`.

        sample=False takes the posterior mean (deterministic); True draws from the posterior.
        """
        self._check_pixels(pixels)
        posterior = self.model.encode(pixels * 2 - 1).latent_dist
        z = posterior.sample(generator) if sample else posterior.mode()  # (B, C, h, w)
        if self.shift:
            z = z - self.shift
        return z * self.scale

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """latents (B, C, h, w), as `encode` returns them -> pixels (B, 3, H, W) in [0, 1]."""
        if latents.ndim != 4 or latents.shape[1] != self.latent_channels:
            raise ValueError(f"latents must be (B, {self.latent_channels}, h, w), got {tuple(latents.shape)}")
        z = latents / self.scale
        x = self.model.decode(z + self.shift if self.shift else z).sample  # (B, 3, H, W)
        return ((x + 1) / 2).clamp(0, 1)

    @torch.no_grad()
    def measure_scale_factor(self, images: torch.Tensor | Iterable[torch.Tensor]) -> float:
        """Set `scale_factor` to 1 / std of the unscaled posterior-mean latents of `images` and return it.

        images: (N, 3, H, W) in [0, 1], or an iterable of such batches.
        """
        batches = [images] if isinstance(images, torch.Tensor) else images
        was_training = self.training
        self.eval()
        n, s, ss = 0, 0.0, 0.0
        for x in batches:
            self._check_pixels(x)
            z = self.model.encode(x.to(self.scale.device) * 2 - 1).latent_dist.mode().double()  # (B, C, h, w)
            n, s, ss = n + z.numel(), s + z.sum().item(), ss + z.square().sum().item()
        self.train(was_training)
        if n < 2:
            raise ValueError("measure_scale_factor needs at least one image")
        std = max((ss / n - (s / n) ** 2), 0.0) ** 0.5
        if std == 0:
            raise ValueError("the latents of these images have zero spread; measure on varied images")
        self.scale.fill_(1.0 / std)
        self.config.scale_factor = 1.0 / std
        return 1.0 / std
