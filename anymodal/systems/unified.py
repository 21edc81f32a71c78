"""UnifiedSystem: the LightningModule that trains the unified model on packed Batches.

It composes the frozen image tokenizer (encodes pixels on the fly: codes for the discrete path, latents
for the continuous one), the text tokenizer, the diffusion objective, and the model, which it builds in
`configure_model()` so that sharded strategies (ZeRO-3) can construct it.
"""

from __future__ import annotations

import math
import time
from typing import Literal

import torch
from lightning.pytorch import LightningModule
from lightning.pytorch.utilities import rank_zero_info
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from anymodal.batch import Batch
from anymodal.config import SIZES, ArchConfig
from anymodal.data.sequence import SequenceEncoder
from anymodal.diffusion.schedule import build_objective
from anymodal.flops import TokenFlops, training_flops_per_token
from anymodal.layout import build_layout
from anymodal.losses import Losses, combine, diffusion_loss, token_losses, trained_positions
from anymodal.masks import build_attention_mask
from anymodal.model.unified import ContinuousInput, ModelConfig, UnifiedModel, build_model_config
from anymodal.tokenizers.image import load_image_tokenizer, tokenizer_kind
from anymodal.tokenizers.text import load_text_tokenizer


class UnifiedSystem(LightningModule):
    def __init__(
        self,
        text_tokenizer: str = "tokenizers/shapes-text",
        image_tokenizer: str = "tokenizers/shapes-vae",
        size: str = "tiny",
        arch: dict | None = None,
        image_size: int = 32,
        patch_size: int = 2,
        objective: Literal["flow", "ddpm"] = "flow",
        diffusion_weight: float = 5.0,
        code_weight: float = 1.0,
        context_policy: Literal["clean_and_noised", "shared"] = "clean_and_noised",
        lr: float = 1e-3,
        min_lr_ratio: float = 0.1,
        warmup_steps: int = 100,
        weight_decay: float = 0.1,
        betas: tuple[float, float] = (0.9, 0.95),
        ema_decay: float = 0.999,
        seed: int = 0,
    ) -> None:
        """
        Args:
            text_tokenizer: folder of the text tokenizer (a Hugging Face tokenizer folder).
            image_tokenizer: folder of a trained image tokenizer; a VQ-VAE selects the discrete path,
                a VAE the continuous path.
            size: named decoder size (ArchConfig.from_name): debug, shapes, tiny, small, base, 1b, 7b.
            arch: overrides of the named size's fields, e.g. {max_seq_len: 4096}; start-up prints the size it
                trains when they change it.
            image_size: side of the images in pixels; the data's sources must yield this size (checked at
                start-up; recipes state it once with a YAML anchor).
            patch_size: latent patch side (continuous path).
            objective: diffusion objective of the continuous path: flow (velocity) or ddpm (noise).
            diffusion_weight: lambda in CE + lambda * diffusion MSE (Transfusion used 5).
            code_weight: weight of the image-code cross-entropy relative to text (discrete path).
            context_policy: a continuous image that is both a target and context: clean_and_noised or shared.
            lr: peak learning rate of AdamW.
            min_lr_ratio: final learning rate of the cosine decay, as a fraction of lr.
            warmup_steps: linear warm-up steps.
            weight_decay: AdamW weight decay on matrices (not on norms, biases, embeddings of positions).
            betas: AdamW betas.
            ema_decay: decay of the exponential moving average of the weights used for sampling; 0 disables it.
            seed: seed of the noise and timestep draws (per step, so resumed runs draw the same).
        """
        super().__init__()
        self.save_hyperparameters()
        self.text = load_text_tokenizer(text_tokenizer)
        self.image_tokenizer = load_image_tokenizer(image_tokenizer)
        self.image_tokenizer.requires_grad_(False).eval()
        self.discrete = tokenizer_kind(self.image_tokenizer) == "vqvae"
        self.objective = build_objective(objective)
        self.model_config = self._model_config()
        self.encoder = SequenceEncoder(self.text, self.model_config.image_path, self.model_config.slots, context_policy)
        self.model: UnifiedModel | None = None
        self.ema: AveragedModel | None = None
        self._last_step_time: float | None = None

    # ---------------------------------------------------------------- building
    def _model_config(self) -> ModelConfig:
        hp = self.hparams
        arch = ArchConfig.from_name(hp.size, **(hp.arch or {}))
        changed = {k: v for k, v in (hp.arch or {}).items() if getattr(SIZES[hp.size], k) != v}
        if changed:
            shape = ", ".join(f"{k}={v}" for k, v in changed.items())
            rank_zero_info(f"model size {hp.size!r} with the recipe's arch overrides {shape}: trains a decoder of "
                           f"dim {arch.dim}, {arch.n_layers} layers, {arch.n_heads} heads")
        return build_model_config(arch, len(self.text), self.image_tokenizer, hp.image_size, hp.patch_size)

    @property
    def image_size(self) -> int:
        """Side of the images in pixels (the data must yield this size)."""
        return self.hparams.image_size

    def configure_model(self) -> None:
        if self.model is not None:
            return
        self.model = UnifiedModel(self.model_config)
        if self.hparams.ema_decay > 0:
            self.ema = AveragedModel(self.model, multi_avg_fn=get_ema_multi_avg_fn(self.hparams.ema_decay))
            self.ema.requires_grad_(False)

    @property
    def sequence_encoder(self) -> SequenceEncoder:
        return self.encoder

    # ---------------------------------------------------------------- training
    def encode_images(self, batch: Batch) -> tuple[Batch, torch.Tensor | None]:
        """Codes filled into the tokens (discrete), or the latents (continuous) of the batch's images."""
        if batch.num_images == 0:
            return batch, None
        images = batch.images
        with torch.no_grad():
            if batch.image_kind == "pixels":
                self.image_tokenizer.to(images.device)
                images = self.image_tokenizer.encode(images)
        if self.discrete:
            return batch.fill_codes(images, self.model_config.code_offset), None
        return batch, images.float()

    def compute_losses(self, batch: Batch, model: UnifiedModel | None = None) -> Losses:
        model = model or self.model
        batch, latents = self.encode_images(batch)
        layout = build_layout(batch)
        mask = build_attention_mask(layout.document_ids, layout.continuous_ids, model.config.arch.attention)
        continuous, noised = None, None
        if latents is not None:
            generator = torch.Generator().manual_seed(self.hparams.seed * 1_000_003 + self.global_step)
            timesteps = torch.zeros(latents.shape[0], device=latents.device)
            noised = self.objective.noise(latents[batch.noised], generator)
            x = latents.clone()
            x[batch.noised], timesteps[batch.noised] = noised.x_t, noised.timesteps
            continuous = ContinuousInput(layout.continuous_slots, x, timesteps)
        hidden = model(model.embed(layout.tokens, continuous), layout.positions, mask)  # (B, T, D)
        targets = batch.targets.reshape(-1)
        pos = trained_positions(batch.targets)
        logits = model.logits(hidden.reshape(-1, hidden.shape[-1])[pos])  # (K, V)
        text, codes, z = token_losses(logits, targets[pos], self.model_config.code_offset,
                                      self.model_config.arch.z_loss)
        diffusion = hidden.new_zeros(())
        if noised is not None and noised.x_t.shape[0]:
            diffusion = diffusion_loss(model.image_prediction(hidden, layout.continuous_slots[batch.noised]),
                                       noised.target)
        return combine(text, codes, diffusion, z, self.hparams.code_weight, self.hparams.diffusion_weight)

    def count_flops(self, batch: Batch) -> TokenFlops:
        """Training FLOPs of `batch` (anymodal.flops), dense attention; also kept as `flops_per_batch`, which
        Lightning's ThroughputMonitor (callbacks.MFUMonitor) turns into MFU."""
        B, T = batch.tokens.shape
        per_token = training_flops_per_token(self.model_config.arch, self.model_config.vocab_size, keys=T)
        self.flops_per_batch = per_token.total * B * T
        return per_token

    def training_step(self, batch: Batch, batch_idx: int) -> torch.Tensor:
        self.count_flops(batch)
        losses = self.compute_losses(batch)
        now = time.perf_counter()
        if self._last_step_time is not None:
            self.log("tokens_per_sec", batch.tokens.numel() / (now - self._last_step_time), prog_bar=True)
        self._last_step_time = now
        self.log_dict({"train/loss": losses.total.detach(), "train/text_loss": losses.text,
                       "train/code_loss": losses.codes, "train/diffusion_loss": losses.diffusion},
                      prog_bar=True, batch_size=batch.tokens.shape[0])
        return losses.total

    def validation_step(self, batch: Batch, batch_idx: int) -> None:
        losses = self.compute_losses(batch, self.ema.module if self.ema is not None else None)
        self.log_dict({"val/loss": losses.total, "val/text_loss": losses.text, "val/code_loss": losses.codes,
                       "val/diffusion_loss": losses.diffusion}, batch_size=batch.tokens.shape[0])

    def on_before_optimizer_step(self, optimizer) -> None:
        norm = torch.nn.utils.get_total_norm([p.grad for p in self.model.parameters() if p.grad is not None])
        self.log("grad_norm", norm)

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        if self.ema is not None:
            self.ema.update_parameters(self.model)

    def configure_optimizers(self):
        decay, no_decay = [], []
        for name, p in self.model.named_parameters():
            (decay if p.ndim >= 2 and "patch_pos" not in name else no_decay).append(p)
        hp = self.hparams
        opt = torch.optim.AdamW([{"params": decay, "weight_decay": hp.weight_decay},
                                 {"params": no_decay, "weight_decay": 0.0}], lr=hp.lr, betas=tuple(hp.betas))
        total = max(1, self.trainer.estimated_stepping_batches)

        def schedule(step: int) -> float:
            if step < hp.warmup_steps:
                return (step + 1) / hp.warmup_steps
            progress = min(1.0, (step - hp.warmup_steps) / max(1, total - hp.warmup_steps))
            return hp.min_lr_ratio + (1 - hp.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

        sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        """Record what export needs to rebuild the model without this class: plain types only."""
        checkpoint["anymodal"] = {"model": self.model_config.to_dict(), "objective": self.objective.config(),
                                  "image_size": self.hparams.image_size,
                                  "text_tokenizer": str(self.hparams.text_tokenizer),
                                  "image_tokenizer": str(self.hparams.image_tokenizer)}

    def sampling_model(self) -> UnifiedModel:
        """The EMA weights when kept, else the trained ones."""
        return self.ema.module if self.ema is not None else self.model
