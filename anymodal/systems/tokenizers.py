"""Lightning systems that train the image tokenizers: `VQVAESystem` and `VAESystem`.

Both read batches of pixels `(B, 3, H, W)` in [0, 1] (from `anymodal.data.datamodule.ImageDataModule`),
train with AdamW under a linear warmup then cosine decay, log losses and PSNR, and, with
`export_dir` set, write the tokenizer folder at the end of fit with its metrics measured on the
validation source.
"""

from __future__ import annotations

from collections import deque
from pathlib import Path

import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule
from torchmetrics.image import PeakSignalNoiseRatio, StructuralSimilarityIndexMeasure

from anymodal.evaluate.reconstruction import codebook_stats, evaluate_image_tokenizer, source_images
from anymodal.systems.optim import trainer_steps, warmup_cosine
from anymodal.tokenizers.image import save_image_tokenizer
from anymodal.tokenizers.vae import VAE, VAEConfig
from anymodal.tokenizers.vqvae import VQVAE, VQVAEConfig


def reconstruction_loss(recon: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """L1 + MSE in pixel units: L1 sharpens edges early, MSE is what PSNR reads."""
    recon = recon.float()
    return F.l1_loss(recon, target) + F.mse_loss(recon, target)


def batch_psnr(recon: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """PSNR in dB of a batch (data range 1, clamped reconstruction, pooled over the batch)."""
    mse = F.mse_loss(recon.detach().float().clamp(0, 1), target)
    return -10 * torch.log10(mse.clamp_min(1e-10))


class TokenizerSystem(LightningModule):
    """What both tokenizer systems share: optimizer and schedule, validation metrics, export.

    lr:            peak AdamW learning rate
    weight_decay:  AdamW weight decay
    warmup_steps:  linear warmup steps, then cosine decay to `min_lr_ratio * lr` at the last step
    min_lr_ratio:  final learning rate as a share of `lr`
    channels_last: run convolutions in channels-last memory format (faster with oneDNN and cuDNN)
    export_dir:    write the trained tokenizer folder here at the end of fit (None: no export)
    export_images: images of the validation source measured for the card (and, for a VAE, of the
                   training source for the scale factor)
    """

    model: VQVAE | VAE

    def __init__(self, lr: float, weight_decay: float, warmup_steps: int, min_lr_ratio: float,
                 channels_last: bool, export_dir: str | None, export_images: int) -> None:
        super().__init__()
        self.lr = lr
        self.weight_decay = weight_decay
        self.warmup_steps = warmup_steps
        self.min_lr_ratio = min_lr_ratio
        self.channels_last = channels_last
        self.export_dir = export_dir
        self.export_images = export_images
        self.val_psnr = PeakSignalNoiseRatio(data_range=1.0)
        self.val_ssim = StructuralSimilarityIndexMeasure(data_range=1.0)

    def _prepare(self, pixels: torch.Tensor) -> torch.Tensor:
        return pixels.contiguous(memory_format=torch.channels_last) if self.channels_last else pixels

    def _finish(self) -> None:
        if self.channels_last:
            self.model.to(memory_format=torch.channels_last)

    def configure_optimizers(self):
        decay = [p for p in self.model.parameters() if p.requires_grad and p.ndim >= 2]
        no_decay = [p for p in self.model.parameters() if p.requires_grad and p.ndim < 2]
        opt = torch.optim.AdamW(
            [{"params": decay, "weight_decay": self.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=self.lr, betas=(0.9, 0.99),
        )
        schedule = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(self.warmup_steps, lambda: trainer_steps(
            self.trainer), self.min_lr_ratio))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    def _update_val_metrics(self, recon: torch.Tensor, pixels: torch.Tensor) -> None:
        recon = recon.float().clamp(0, 1)
        self.val_psnr.update(recon, pixels)
        self.val_ssim.update(recon, pixels)
        self.log("val/psnr", self.val_psnr, prog_bar=True)
        self.log("val/ssim", self.val_ssim)

    def on_fit_end(self) -> None:
        if self.export_dir and self.trainer.is_global_zero:
            self.export(self.export_dir)

    def export(self, folder: str | Path) -> Path:
        """Write the tokenizer folder, with metrics on the datamodule's validation source when it has one."""
        dm = self.trainer.datamodule if self.trainer is not None else None
        self.model.eval()
        self._before_export(getattr(dm, "source", None))
        metrics = None
        val_source = getattr(dm, "val_source", None)
        if val_source is not None:
            metrics = evaluate_image_tokenizer(self.model, val_source, n=self.export_images)
        self.model.to(memory_format=torch.contiguous_format)
        return save_image_tokenizer(self.model, folder, metrics)

    def _before_export(self, source) -> None:
        """Hook for what must be measured before export (the VAE's scale factor)."""


class VQVAESystem(TokenizerSystem):
    """Trains a VQ-VAE: reconstruction (L1 + MSE) plus the quantizer's commitment loss.

    Logs train/val losses, PSNR, SSIM (val), and codebook usage and perplexity: over the last
    `usage_window` training batches, and over the whole validation set.
    """

    def __init__(
        self,
        config: VQVAEConfig | None = None,
        lr: float = 2e-3,
        weight_decay: float = 0.0,
        warmup_steps: int = 20,
        min_lr_ratio: float = 0.05,
        usage_window: int = 20,
        channels_last: bool = True,
        export_dir: str | None = None,
        export_images: int = 512,
    ) -> None:
        super().__init__(lr, weight_decay, warmup_steps, min_lr_ratio, channels_last, export_dir, export_images)
        self.save_hyperparameters()
        self.config = config or VQVAEConfig()
        self.model = VQVAE(self.config)
        self._finish()
        self.usage_window = usage_window
        self.recent_counts: deque[torch.Tensor] = deque(maxlen=usage_window)
        self.val_counts: torch.Tensor | None = None

    def _count(self, codes: torch.Tensor) -> torch.Tensor:
        return torch.bincount(codes.flatten(), minlength=self.model.codebook_size)  # (K,)

    def training_step(self, pixels: torch.Tensor, batch_idx: int) -> torch.Tensor:
        pixels = self._prepare(pixels)  # (B, 3, H, W)
        out = self.model(pixels)
        rec = reconstruction_loss(out.recon, pixels)
        loss = rec + out.commit_loss
        self.recent_counts.append(self._count(out.codes))
        stats = codebook_stats(torch.stack(list(self.recent_counts)).sum(0))
        self.log_dict({"train/loss": loss, "train/rec": rec, "train/commit": out.commit_loss})
        self.log("train/psnr", batch_psnr(out.recon, pixels), prog_bar=True)
        self.log("train/usage", stats["codebook_usage"], prog_bar=True)
        self.log("train/perplexity", stats["perplexity"])
        return loss

    def on_validation_epoch_start(self) -> None:
        self.val_counts = torch.zeros(self.model.codebook_size, dtype=torch.long, device=self.device)

    def validation_step(self, pixels: torch.Tensor, batch_idx: int) -> None:
        pixels = self._prepare(pixels)
        out = self.model(pixels)
        self.log("val/loss", reconstruction_loss(out.recon, pixels) + out.commit_loss)
        self.val_counts += self._count(out.codes)
        self._update_val_metrics(out.recon, pixels)

    def on_validation_epoch_end(self) -> None:
        stats = codebook_stats(self.trainer.strategy.reduce(self.val_counts, reduce_op="sum"))
        self.log("val/usage", stats["codebook_usage"], prog_bar=True, rank_zero_only=True)
        self.log("val/perplexity", stats["perplexity"], rank_zero_only=True)


class VAESystem(TokenizerSystem):
    """Trains a VAE: reconstruction (L1 + MSE) of a posterior sample plus a weighted KL term.

    kl_weight is in the units of Stable Diffusion's VAE training: the KL summed over the latent
    against the reconstruction loss summed over pixel values (1e-6 there); a small weight keeps
    the latents close to deterministic, which is what a diffusion model on top wants.
    """

    def __init__(
        self,
        config: VAEConfig | None = None,
        lr: float = 2e-3,
        weight_decay: float = 0.0,
        warmup_steps: int = 20,
        min_lr_ratio: float = 0.05,
        kl_weight: float = 1e-6,
        sample_posterior: bool = True,
        channels_last: bool = True,
        export_dir: str | None = None,
        export_images: int = 512,
    ) -> None:
        """
        Args:
            sample_posterior: decode a sample of the posterior while training (a VAE); False decodes its mean,
                which trains several times faster on short budgets (the KL term still shapes the latents).
        """
        super().__init__(lr, weight_decay, warmup_steps, min_lr_ratio, channels_last, export_dir, export_images)
        self.save_hyperparameters()
        self.config = config or VAEConfig()
        self.model = VAE(self.config)
        self._finish()
        self.kl_weight = kl_weight
        self.sample_posterior = sample_posterior

    def training_step(self, pixels: torch.Tensor, batch_idx: int) -> torch.Tensor:
        pixels = self._prepare(pixels)  # (B, 3, H, W)
        out = self.model(pixels, sample=self.sample_posterior)
        rec = reconstruction_loss(out.recon, pixels)
        kl = out.kl.float().mean() / pixels[0].numel()  # per pixel value, like the reconstruction
        loss = rec + self.kl_weight * kl
        self.log_dict({"train/loss": loss, "train/rec": rec, "train/kl": kl})
        self.log("train/psnr", batch_psnr(out.recon, pixels), prog_bar=True)
        return loss

    def validation_step(self, pixels: torch.Tensor, batch_idx: int) -> None:
        pixels = self._prepare(pixels)
        out = self.model(pixels, sample=False)
        self.log("val/loss", reconstruction_loss(out.recon, pixels))
        self._update_val_metrics(out.recon, pixels)

    def _before_export(self, source) -> None:
        if source is None:
            return
        images, _ = source_images(source, self.export_images)  # (n, 3, H, W)
        self.model.measure_scale_factor(images.to(self.device).split(64))
