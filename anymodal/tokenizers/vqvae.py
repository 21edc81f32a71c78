"""VQ-VAE image tokenizer: a small conv encoder/decoder around a vector-quantize-pytorch quantizer.

Pixels `(B, 3, H, W)` in [0, 1] become a grid of discrete codes `(B, H/f, W/f)` int64, where f is
the downsampling factor (4, 8 or 16), and back. The quantizer is `VectorQuantize` (EMA codebook,
k-means init, dead-code replacement) or, as the option, `FSQ` (finite scalar quantization, no codebook
to learn). The networks work on normalised pixels ((x - mean) / std, [-1, 1] by default); the public API
speaks [0, 1] pixels.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import nn
from vector_quantize_pytorch import FSQ, VectorQuantize

from anymodal.tokenizers.grid import check_pixels, latent_grid

DOWNSAMPLES = (4, 8, 16)


@dataclass
class VQVAEConfig:
    """Architecture and quantizer of a VQ-VAE image tokenizer."""

    channels: int = 64
    """Width of the encoder and decoder at full resolution; each downsampling doubles it up to `max_channels`."""
    max_channels: int = 256
    """Largest width of any level."""
    downsample: int = 4
    """Spatial reduction per side (4, 8 or 16): a 32x32 image at 4 becomes an 8x8 grid of codes."""
    num_res_blocks: int = 1
    """Residual blocks per resolution level in the encoder (the decoder uses the same number)."""
    norm: Literal["group", "channel"] = "group"
    """Normalisation in the encoder and decoder. `group`: GroupNorm, whose statistics span the whole
    image, so every code also depends on content far away. `channel`: LayerNorm over channels at each
    position, which keeps codes local: a code depends only on what lies within the encoder's receptive
    field, so decode-then-encode gives back more codes (shapes world: 0.91-0.92 against 0.88-0.90)."""
    norm_groups: int = 8
    """GroupNorm groups (`norm: group`); must divide every level's width."""
    quantizer: Literal["vq", "fsq"] = "vq"
    """`vq`: a learned codebook (VectorQuantize with EMA); `fsq`: finite scalar quantization over `fsq_levels`."""
    codebook_size: int = 1024
    """Number of codes of the `vq` quantizer. For `fsq` the size is the product of `fsq_levels` and this is not read."""
    codebook_dim: int = 8
    """Dimension of a `vq` code; the encoder's output is projected to it (small dims keep codes in use)."""
    fsq_levels: list[int] = field(default_factory=lambda: [8, 5, 5, 5])
    """Levels per dimension of the `fsq` quantizer; [8, 5, 5, 5] gives 1000 codes, [8, 8, 8, 5, 5, 5] 64000."""
    commitment_weight: float = 0.25
    """Weight of the commitment loss that pulls encoder outputs to their codes (`vq` only)."""
    kmeans_init: bool = True
    """Initialise the `vq` codebook by k-means on the first training batch."""
    kmeans_iters: int = 10
    """k-means iterations of that initialisation."""
    ema_decay: float = 0.8
    """EMA decay of the `vq` codebook updates; lower adapts faster (good for short runs)."""
    threshold_ema_dead_code: float = 1.0
    """A `vq` code whose EMA usage (vectors per batch) falls below this is replaced by a random encoder output."""
    use_cosine_sim: bool = False
    """Match codes by cosine similarity on l2-normalised vectors instead of Euclidean distance (`vq` only)."""
    pixel_mean: list[float] = field(default_factory=lambda: [0.5, 0.5, 0.5])
    """Per-channel mean of the training images; the networks see (pixels - mean) / std. Centred inputs
    train far faster on images that are mostly one colour (shapes world: about 0.95)."""
    pixel_std: list[float] = field(default_factory=lambda: [0.5, 0.5, 0.5])
    """Per-channel standard deviation of the training images (shapes world: about 0.18)."""

    def __post_init__(self) -> None:
        if self.downsample not in DOWNSAMPLES:
            raise ValueError(f"downsample={self.downsample} is not supported; use one of {DOWNSAMPLES}")
        if self.norm not in ("group", "channel"):
            raise ValueError(f"norm={self.norm!r} is unknown; use 'group' or 'channel'")
        if self.quantizer not in ("vq", "fsq"):
            raise ValueError(f"quantizer={self.quantizer!r} is unknown; use 'vq' or 'fsq'")
        for w in self.widths:
            if self.norm == "group" and w % self.norm_groups:
                raise ValueError(f"norm_groups={self.norm_groups} must divide every level width {self.widths}")
        if self.quantizer == "fsq" and (not self.fsq_levels or min(self.fsq_levels) < 2):
            raise ValueError(f"fsq_levels={self.fsq_levels} needs at least one level, each >= 2")
        self.fsq_levels = [int(v) for v in self.fsq_levels]
        check_pixel_stats(self.pixel_mean, self.pixel_std)

    @property
    def widths(self) -> list[int]:
        """Channel width of each resolution level, full resolution first."""
        levels = int(math.log2(self.downsample)) + 1
        return [min(self.channels * 2**i, self.max_channels) for i in range(levels)]

    @property
    def latent_dim(self) -> int:
        """Channels of the quantized grid."""
        return len(self.fsq_levels) if self.quantizer == "fsq" else self.codebook_dim


def check_pixel_stats(mean: list[float], std: list[float]) -> None:
    """Raise unless `mean` and `std` are 3 numbers each with every std > 0."""
    if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
        raise ValueError(f"pixel_mean={list(mean)} and pixel_std={list(std)} need 3 values each (R, G, B), "
                         f"every std > 0")


class PixelNorm(nn.Module):
    """pixels in [0, 1] <-> the normalised values the networks work in: (pixels - mean) / std."""

    def __init__(self, mean: list[float], std: list[float]):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return (pixels - self.mean) / self.std

    def inverse(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.std + self.mean


@dataclass
class VQOutput:
    """What `VQVAE.forward` returns.

    recon:       (B, 3, H, W) reconstruction in pixel units ([0, 1] range, not clamped, so losses keep
                 their gradient; `decode` clamps)
    codes:       (B, h, w) int64 code indices
    commit_loss: () commitment loss (zero for `fsq`)
    """

    recon: torch.Tensor
    codes: torch.Tensor
    commit_loss: torch.Tensor


class ChannelNorm(nn.LayerNorm):
    """LayerNorm over the channels of each position of a (B, C, H, W) map."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


def make_norm(cfg: VQVAEConfig, channels: int) -> nn.Module:
    """The normalisation layer `cfg.norm` names, for `channels` channels."""
    return nn.GroupNorm(cfg.norm_groups, channels) if cfg.norm == "group" else ChannelNorm(channels)


class ResBlock(nn.Module):
    """norm -> SiLU -> conv3x3, twice, plus a (1x1-projected) skip."""

    def __init__(self, c_in: int, c_out: int, cfg: VQVAEConfig):
        super().__init__()
        self.block = nn.Sequential(
            make_norm(cfg, c_in), nn.SiLU(), nn.Conv2d(c_in, c_out, 3, padding=1),
            make_norm(cfg, c_out), nn.SiLU(), nn.Conv2d(c_out, c_out, 3, padding=1),
        )
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.skip(x) + self.block(x)


class Encoder(nn.Module):
    """(B, 3, H, W) normalised pixels -> (B, latent_dim, H/f, W/f)."""

    def __init__(self, cfg: VQVAEConfig):
        super().__init__()
        w = cfg.widths
        layers: list[nn.Module] = [nn.Conv2d(3, w[0], 3, padding=1)]
        for i, c in enumerate(w):
            layers += [ResBlock(c, c, cfg) for _ in range(cfg.num_res_blocks)]
            if i + 1 < len(w):
                layers.append(nn.Conv2d(c, w[i + 1], 3, stride=2, padding=1))
        layers += [ResBlock(w[-1], w[-1], cfg), make_norm(cfg, w[-1]), nn.SiLU(), nn.Conv2d(w[-1], cfg.latent_dim, 1)]
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class Decoder(nn.Module):
    """(B, latent_dim, h, w) -> (B, 3, h*f, w*f) normalised pixels."""

    def __init__(self, cfg: VQVAEConfig):
        super().__init__()
        w = cfg.widths[::-1]
        layers: list[nn.Module] = [nn.Conv2d(cfg.latent_dim, w[0], 3, padding=1), ResBlock(w[0], w[0], cfg)]
        for i, c in enumerate(w):
            layers += [ResBlock(c, c, cfg) for _ in range(cfg.num_res_blocks)]
            if i + 1 < len(w):
                layers += [nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(c, w[i + 1], 3, padding=1)]
        layers += [make_norm(cfg, w[-1]), nn.SiLU(), nn.Conv2d(w[-1], 3, 3, padding=1)]
        self.net = nn.Sequential(*layers)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.net(z)


class VQVAE(nn.Module):
    """Image tokenizer: pixels (B, 3, H, W) in [0, 1] <-> codes (B, H/f, W/f) int64."""

    def __init__(self, config: VQVAEConfig | None = None):
        super().__init__()
        self.config = cfg = config or VQVAEConfig()
        self.norm = PixelNorm(cfg.pixel_mean, cfg.pixel_std)
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        if cfg.quantizer == "fsq":
            self.quantizer: nn.Module = FSQ(levels=cfg.fsq_levels, dim=cfg.latent_dim, channel_first=True)
        else:
            self.quantizer = VectorQuantize(
                dim=cfg.latent_dim,
                codebook_size=cfg.codebook_size,
                decay=cfg.ema_decay,
                kmeans_init=cfg.kmeans_init,
                kmeans_iters=cfg.kmeans_iters,
                threshold_ema_dead_code=cfg.threshold_ema_dead_code,
                commitment_weight=cfg.commitment_weight,
                use_cosine_sim=cfg.use_cosine_sim,
                accept_image_fmap=True,
            )

    @property
    def codebook_size(self) -> int:
        """Number of distinct codes."""
        if self.config.quantizer == "fsq":
            return math.prod(self.config.fsq_levels)
        return self.config.codebook_size

    def grid(self, image_size: int | tuple[int, int]) -> tuple[int, int]:
        """Code grid (h, w) of an image of side `image_size` (or (H, W))."""
        return latent_grid(image_size, self.config.downsample)

    def _check_pixels(self, pixels: torch.Tensor) -> None:
        check_pixels(pixels, self.config.downsample)

    def quantize(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """z (B, D, h, w) -> quantized (B, D, h, w), codes (B, h, w) int64, commitment loss ().

        Runs in float32 whatever autocast says: nearest-code search in bfloat16 picks wrong codes.
        """
        with torch.autocast(z.device.type, enabled=False):
            return self._quantize(z.float())

    def _quantize(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if self.config.quantizer == "fsq":
            zq, codes = self.quantizer(z)
            return zq, codes.long(), z.new_zeros(())
        zq, codes, loss = self.quantizer(z)
        return zq, codes.long(), loss.sum()

    def forward(self, pixels: torch.Tensor) -> VQOutput:
        self._check_pixels(pixels)
        z = self.encoder(self.norm(pixels))  # (B, D, h, w)
        zq, codes, commit = self.quantize(z)  # (B, D, h, w), (B, h, w)
        recon = self.norm.inverse(self.decoder(zq))  # (B, 3, H, W)
        return VQOutput(recon=recon, codes=codes, commit_loss=commit)

    @torch.no_grad()
    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        """pixels (B, 3, H, W) in [0, 1] -> codes (B, h, w) int64."""
        self._check_pixels(pixels)
        z = self.encoder(self.norm(pixels))  # (B, D, h, w)
        was_training = self.quantizer.training
        self.quantizer.eval()  # never update the codebook while tokenizing
        codes = self.quantize(z)[1]  # (B, h, w)
        self.quantizer.train(was_training)
        return codes

    def codes_to_latents(self, codes: torch.Tensor) -> torch.Tensor:
        """codes (B, h, w) int64 -> quantized latents (B, D, h, w)."""
        if codes.ndim != 3:
            raise ValueError(f"codes must be (B, h, w), got {tuple(codes.shape)}")
        if codes.min() < 0 or codes.max() >= self.codebook_size:
            raise ValueError(f"codes must lie in [0, {self.codebook_size}), got [{codes.min()}, {codes.max()}]")
        if self.config.quantizer == "fsq":
            zq = self.quantizer.indices_to_codes(codes)  # (B, D, h, w) with channel_first
        else:
            zq = self.quantizer.get_output_from_indices(codes)  # (B, D, h, w) with accept_image_fmap
        return zq.contiguous()

    @torch.no_grad()
    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """codes (B, h, w) int64 -> pixels (B, 3, H, W) in [0, 1]."""
        x = self.decoder(self.codes_to_latents(codes))  # (B, 3, H, W), normalised
        return self.norm.inverse(x).clamp(0, 1)

