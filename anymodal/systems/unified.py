"""UnifiedSystem: the LightningModule that trains the unified model on packed Batches.

It composes the frozen image tokenizer (encodes pixels on the fly: codes for the discrete path, latents
for the continuous one), the text tokenizer, the diffusion objective, and the model, which it builds in
`configure_model()` so that sharded strategies (ZeRO-3) can construct it. With `init_from` the model
starts from a pretrained Hugging Face causal LM (Liquid, LMFusion): its shape, tokenizer and weights.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Literal

import torch
from lightning.pytorch import LightningModule
from lightning.pytorch.utilities import rank_zero_info

from anymodal.batch import Batch
from anymodal.config import SIZES, ArchConfig
from anymodal.data.sequence import SequenceEncoder
from anymodal.diffusion.schedule import build_objective
from anymodal.flops import TokenFlops, training_flops_per_token
from anymodal.layout import build_layout, reference_latents
from anymodal.losses import (
    Losses,
    changed_code_weights,
    combine,
    diffusion_loss,
    token_losses,
    trained_positions,
)
from anymodal.masks import build_attention_mask
from anymodal.model.hf import init_from_lm, read_lm_arch
from anymodal.model.unified import ContinuousInput, ModelConfig, UnifiedModel, build_model_config
from anymodal.parallel import bidirectional, mask_for_training
from anymodal.systems.ema import WeightEMA
from anymodal.systems.optim import build_optimizer, check_optimizer, trainer_steps, warmup_cosine
from anymodal.tokenizers.fingerprint import image_tokenizer_fingerprint
from anymodal.tokenizers.image import load_image_tokenizer, read_image_tokenizer_spec
from anymodal.tokenizers.text import load_text_tokenizer


class UnifiedSystem(LightningModule):
    def __init__(
        self,
        text_tokenizer: str | None = None,
        image_tokenizer: str = "tokenizers/shapes-vae",
        size: str = "tiny",
        arch: dict | None = None,
        init_from: str | None = None,
        freeze_text: bool = False,
        new_rows_lr: float | None = None,
        image_size: int = 32,
        patch_size: int = 2,
        objective: Literal["flow", "ddpm"] = "flow",
        diffusion_weight: float = 5.0,
        code_weight: float = 1.0,
        changed_code_weight: float = 1.0,
        code_init: Literal["random", "codebook"] = "random",
        parallel_images: float = 0.0,
        context_policy: Literal["clean_and_noised", "shared"] = "clean_and_noised",
        reference_input: bool = False,
        code_positions: bool = False,
        lr: float = 1e-3,
        optimizer: Literal["adamw", "muon"] = "adamw",
        min_lr_ratio: float = 0.1,
        warmup_steps: int = 100,
        weight_decay: float = 0.1,
        betas: tuple[float, float] = (0.9, 0.95),
        ema_decay: float = 0.999,
        seed: int = 0,
        pre_encoded: bool = False,
        compile: bool = False,
    ) -> None:
        """
        Args:
            text_tokenizer: folder of the text tokenizer (a Hugging Face tokenizer folder); None: the init_from
                folder's own tokenizer, or tokenizers/shapes-text without init_from.
            image_tokenizer: folder of a trained image tokenizer; a VQ-VAE selects the discrete path,
                a VAE the continuous path.
            size: named decoder size (ArchConfig.from_name): debug, shapes, tiny, small, base, 1b, 7b.
            arch: overrides of the named size's fields, e.g. {max_seq_len: 4096}; start-up prints the size it
                trains when they change it. With init_from only max_seq_len, attention, checkpoint_activations
                and z_loss may be set.
            init_from: a local Hugging Face causal-LM folder (config.json, safetensors, tokenizer; llama,
                mistral, qwen2, qwen3, gemma) to start from instead of a named size: its shape, its tokenizer
                (own bos/eos/pad kept, <boi>/<eoi> added) and its weights; rows it lacks (added specials,
                image codes) start at the mean of its rows plus noise (anymodal.model.hf.init_from_lm).
            freeze_text: with init_from, keep the LM's own weights (decoder, its embedding and head rows) fixed
                and train only what it lacks: new rows and the image projections.
            new_rows_lr: with init_from, the peak learning rate of what the LM lacks (new embedding/head rows,
                the continuous path's image projections); None: lr for everything.
            image_size: side of the images in pixels; the data's sources must yield this size (checked at
                start-up; recipes state it once with a YAML anchor).
            patch_size: latent patch side (continuous path).
            objective: diffusion objective of the continuous path: flow (velocity) or ddpm (noise).
            diffusion_weight: lambda in CE + lambda * diffusion MSE (Transfusion used 5).
            code_weight: weight of the image-code cross-entropy relative to text (discrete path).
            changed_code_weight: discrete path: weight, inside the code cross-entropy, of each code of an image
                that differs from the code in the same place of the image before it in its document (an edit's
                source, a story's previous picture; `anymodal.losses.changed_code_weights`); 1: all codes alike.
                At the demo's budget 3 and 8 did not win (benchmarks/README.md, "Changed codes weighted").
            code_init: how the image-code rows of the embedding and the LM head start (discrete path): `random`
                like every row, or `codebook`: the VQ-VAE's code vectors through one fixed random projection to
                the model's width, scaled to the rows' own spread, so codes that look alike start alike.
            parallel_images: discrete path: the share of final images (a t2i or edit result, a story's last
                picture) trained MaskGIT-style (masked codes, predicted in place, the image's slots attending both
                ways; `anymodal.parallel`) instead of autoregressively, so the bundle also decodes an image in a
                few parallel steps (`parallel_steps`); 0: autoregressive only (no mask id in the vocabulary).
            context_policy: a continuous image that is both a target and context: clean_and_noised or shared.
            reference_input: continuous path: each image's patches also read, through their own projection, the
                clean patches of the image before it in the document at the same slot (an edit's source, a
                story's previous picture), so what an edit keeps is copied in place rather than found by
                attention. Off: the Transfusion model as published.
            code_positions: discrete path: `<boi>` and each code add a learned embedding of their slot in the image
                (`code_pos`), as continuous patches add theirs; off, a code knows where it sits on the grid only
                through RoPE's relative offsets, though runs of background codes look alike.
            lr: peak learning rate (of both optimizers under muon).
            optimizer: adamw, or muon: `torch.optim.Muon` on the decoder blocks' matrices (its update scaled to
                AdamW's size, so lr carries over) and AdamW on the rest (`anymodal.systems.optim`). Not under
                DeepSpeed, whose ZeRO hands the optimizer flattened weights. On the shapes recipes at equal steps
                (lr 3e-3 against AdamW's 2e-3) it lifted transfusion's t2i from 0.90 to 1.00 and its edits from 0.43
                to 0.72 (benchmarks/README.md, "Muon").
            min_lr_ratio: final learning rate of the cosine decay, as a fraction of lr.
            warmup_steps: linear warm-up steps.
            weight_decay: decoupled weight decay on matrices (not on norms, biases, embeddings of positions).
            betas: AdamW betas.
            ema_decay: decay of the exponential moving average of the weights used for sampling; 0 disables it.
            seed: seed of the noise and timestep draws (per step, so resumed runs draw the same).
            pre_encoded: the data is encoded shards made by `anymodal encode` with this image tokenizer: only its
                config.json is read, its weights are never loaded (nor saved in checkpoints; export reads them
                from the folder), and a batch of pixels is refused.
            compile: run the decoder of training steps through `torch.compile` (its shapes are the batch's fixed
                rows x seq_len, so it compiles once: 15-25 s on two CPU cores), and a VQ-VAE's encode of their
                images. Validation, the EMA and sampling run them eagerly. Measured on the shapes recipes
                (benchmarks/levers.py): 1.07-1.18x alone, 1.43-1.55x with bf16-mixed on a CPU with native bfloat16.
        """
        super().__init__()
        self.save_hyperparameters()
        check_optimizer(optimizer)
        if code_init not in ("random", "codebook"):
            raise ValueError(f"code_init={code_init!r} must be 'random' or 'codebook'")
        if init_from is None and (freeze_text or new_rows_lr is not None):
            raise ValueError("freeze_text and new_rows_lr need init_from (a pretrained LM whose weights they keep apart)")
        if init_from is not None and text_tokenizer not in (None, init_from):
            raise ValueError(f"init_from={init_from!r} brings its own tokenizer (its embedding rows follow it); leave "
                             f"text_tokenizer unset instead of {text_tokenizer!r}")
        if new_rows_lr is not None and new_rows_lr < 0:
            raise ValueError(f"new_rows_lr={new_rows_lr} must be >= 0 (or None to use lr)")
        self.lm_arch = read_lm_arch(init_from, **(arch or {})) if init_from else None  # refuses what cannot map
        self.text_tokenizer_dir = str(init_from or text_tokenizer or "tokenizers/shapes-text")
        self.text = load_text_tokenizer(self.text_tokenizer_dir)
        self.image_spec = read_image_tokenizer_spec(image_tokenizer)  # kind, grid, codebook or channels
        # Held outside the module tree (a tuple is no Module): no strategy casts the frozen tokenizer to bf16,
        # shards it or hands it to an optimizer, and checkpoints do not copy its weights (export reads its folder).
        self._image_tokenizer = (None if pre_encoded else load_image_tokenizer(image_tokenizer),)
        if self.image_tokenizer is not None:
            self.image_tokenizer.requires_grad_(False).eval()
        self.discrete = self.image_spec.kind == "vqvae"
        if changed_code_weight <= 0:
            raise ValueError(f"changed_code_weight={changed_code_weight} must be positive (1: every code alike)")
        if not 0.0 <= parallel_images <= 1.0:
            raise ValueError(f"parallel_images={parallel_images} is a share of images: it must lie in [0, 1]")
        if parallel_images > 0 and not self.discrete:
            raise ValueError(f"parallel_images decodes image codes in parallel; {image_tokenizer} is a "
                             f"{self.image_spec.kind}, which has no codes (the continuous path already denoises "
                             "every patch at once)")
        if code_init == "codebook" and not self.discrete:
            raise ValueError(f"code_init=codebook starts the image-code rows from a VQ-VAE's codebook; "
                             f"{image_tokenizer} is a {self.image_spec.kind}, which has no codes (use code_init=random)")
        self.objective = build_objective(objective)
        self.model_config = self._model_config()
        self.encoder = SequenceEncoder(self.text, self.model_config.image_path, self.model_config.slots, context_policy)
        self.model: UnifiedModel | None = None
        self.ema = WeightEMA(ema_decay) if ema_decay > 0 else None  # fp32, over what each rank owns
        self.lm_rows: torch.Tensor | None = None  # (V,) bool: token rows taken from the init_from LM
        self._last_step_time: float | None = None
        self.skipped_steps = 0  # steps whose loss or gradient was not finite: no update (saved with checkpoints)
        self._loss: torch.Tensor | None = None  # this step's loss, checked before the optimizer step
        self._skip = False
        # (the compiled decoder, the compiled VQ-VAE encode or None): outside the module tree, sharing its weights
        self._compiled: tuple = ()

    # ---------------------------------------------------------------- building
    def _model_config(self) -> ModelConfig:
        hp = self.hparams
        if self.lm_arch is not None:
            arch = self.lm_arch
            rank_zero_info(f"starting from the LM in {hp.init_from} (its shape, not size's): dim {arch.dim}, "
                           f"{arch.n_layers} layers, {arch.n_heads} heads; its tokenizer gains "
                           f"{', '.join(self.text.added) or 'nothing'}")
            return build_model_config(arch, len(self.text), self.image_spec, hp.image_size, hp.patch_size,
                                      hp.reference_input, hp.parallel_images > 0, hp.code_positions)
        arch = ArchConfig.from_name(hp.size, **(hp.arch or {}))
        changed = {k: v for k, v in (hp.arch or {}).items() if getattr(SIZES[hp.size], k) != v}
        if changed:
            shape = ", ".join(f"{k}={v}" for k, v in changed.items())
            rank_zero_info(f"model size {hp.size!r} with the recipe's arch overrides {shape}: trains a decoder of "
                           f"dim {arch.dim}, {arch.n_layers} layers, {arch.n_heads} heads")
        return build_model_config(arch, len(self.text), self.image_spec, hp.image_size, hp.patch_size,
                                  hp.reference_input, hp.parallel_images > 0, hp.code_positions)

    @property
    def image_tokenizer(self):
        """The frozen image tokenizer (fp32, eval mode; None with pre_encoded)."""
        return self._image_tokenizer[0]

    @property
    def image_size(self) -> int:
        """Side of the images in pixels (the data must yield this size)."""
        return self.hparams.image_size

    def configure_model(self) -> None:
        if self.model is not None:
            return
        self.model = UnifiedModel(self.model_config)
        sharded = any(hasattr(p, "ds_id") for p in self.model.parameters())  # built inside ZeRO-3's zero.Init
        if self.hparams.init_from:
            if sharded:
                raise ValueError("init_from copies the LM's weights into whole parameters, which ZeRO-3 shards as it "
                                 "builds them; train from an LM with the ddp or zero2 strategy")
            self.lm_rows = init_from_lm(self.model, self.hparams.init_from, self.text.added_ids, self.hparams.seed)
            if self.hparams.freeze_text:
                self.model.decoder.requires_grad_(False)
        if self.hparams.code_init == "codebook":
            if sharded:
                raise ValueError("code_init=codebook writes whole embedding rows, which ZeRO-3 shards as it builds "
                                 "them; use the ddp or zero2 strategy, or code_init=random")
            self._init_code_rows()
        if sharded:
            self._gather_outside_weights()
        if self.hparams.compile:
            # The VQ-VAE's encode too (1.5x, 58 -> 39 ms for a discrete batch's 35 images, bf16, 1 thread; its
            # codes agree with sampling's fp32 encode on 97.2% of slots, eager bf16 on 95.3%). Not the VAE's:
            # compiled it is slower (64 against 58 ms). benchmarks/README.md, "Attention as matmuls".
            vq = self.discrete and self.image_tokenizer is not None
            self._compiled = (torch.compile(self.model.decoder),
                              torch.compile(self.image_tokenizer.encode) if vq else None)

    @torch.no_grad()
    def _init_code_rows(self) -> None:
        """Image-code rows of the embedding (and untied head) from the VQ-VAE's code vectors (code_init=codebook).

        Each row becomes its code vector, standardised per channel and sent through one fixed Gaussian projection
        to the model's width, then scaled and shifted to the mean and spread the rows had: similar codes (the many
        shades of background a codebook learns) start as similar rows instead of unrelated ones.
        """
        if self.image_tokenizer is None:
            raise ValueError("code_init=codebook reads the VQ-VAE's code vectors; it cannot run with pre_encoded data "
                             "(no tokenizer weights are loaded); use code_init=random")
        cfg = self.model_config
        codes = torch.arange(cfg.codebook_size).view(1, -1, 1)  # (1, K, 1): every code once
        vectors = self.image_tokenizer.codes_to_latents(codes)[0, :, :, 0].T.float()  # (K, d)
        vectors = (vectors - vectors.mean(0)) / vectors.std(0).clamp_min(1e-6)
        generator = torch.Generator().manual_seed(self.hparams.seed)
        projection = torch.randn(vectors.shape[1], cfg.arch.dim, generator=generator) / vectors.shape[1] ** 0.5
        structured = vectors @ projection  # (K, D), unit spread per element
        rows = slice(cfg.code_offset, cfg.code_offset + cfg.codebook_size)
        for weight in self.token_matrices():
            old = weight[rows]
            weight[rows] = (old.mean(0) + structured / structured.std() * old.std()).to(weight.dtype)

    def _gather_outside_weights(self) -> None:
        """ZeRO-3 gathers a sharded weight only around its own module's forward; the weights the model reads
        elsewhere (`patch_pos` in `embed`, a tied embedding in `logits`) are gathered around this system's
        forward instead, which under DeepSpeed runs each training and validation step."""
        import deepspeed

        outside = list(self.model.parameters(recurse=False))
        if self.model.lm_head is None:
            outside.append(self.model.embed_tokens.weight)
        for weight in outside:
            deepspeed.zero.register_external_parameter(self, weight)

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
                if self.image_tokenizer is None:
                    raise ValueError("a batch of pixels reached a model built with pre_encoded=true (no image "
                                     "tokenizer weights); train on shards made by `anymodal encode`, or set "
                                     "pre_encoded: false")
                self.image_tokenizer.to(images.device)
                compiled = self._compiled[1] if self._compiled and self.training else None
                encode = compiled or self.image_tokenizer.encode
                images = encode(images.float())  # fp32, as DeepSpeed's bf16 casts the batch
        if self.discrete:
            return batch.fill_codes(images, self.model_config.code_offset), None
        return batch, images.float()

    def compute_losses(self, batch: Batch, model: UnifiedModel | None = None) -> Losses:
        model = model or self.model
        batch, latents = self.encode_images(batch)
        generator = torch.Generator().manual_seed(self.hparams.seed * 1_000_003 + self.global_step)
        masked: list[tuple[int, int, int]] = []
        coded = batch  # the codes in their slots, before any are masked
        if self.hparams.parallel_images > 0:  # some final images trained MaskGIT-style (anymodal.parallel)
            tokens, targets2d, masked = mask_for_training(batch, self.hparams.parallel_images, model.config.mask_id,
                                                          self.text.eoi_id, self.text.eos_id, generator)
            batch = dataclasses.replace(batch, tokens=tokens)
        else:
            targets2d = batch.targets  # (B, T)
        layout = build_layout(batch)
        groups = bidirectional(layout.continuous_ids, masked) if masked else layout.continuous_ids
        mask = build_attention_mask(layout.document_ids, groups, model.config.arch.attention)
        continuous, noised = None, None
        if latents is not None:
            timesteps = torch.zeros(latents.shape[0], device=latents.device)
            noised = self.objective.noise(latents[batch.noised], generator)
            x = latents.clone()
            x[batch.noised], timesteps[batch.noised] = noised.x_t, noised.timesteps
            references = reference_latents(latents, batch.reference_index()) if model.config.reference_input else None
            continuous = ContinuousInput(layout.continuous_slots, x, timesteps, references)
        decoder = self._compiled[0] if self._compiled and model is self.model and model.training else model.decoder
        h = model.embed(layout.tokens, continuous, model.code_slots(layout.tokens, self.text.boi_id))
        hidden = decoder(h, layout.positions, mask)  # (B, T, D)
        targets = targets2d.reshape(-1)
        pos = trained_positions(targets2d)
        logits = model.logits(hidden.reshape(-1, hidden.shape[-1])[pos])  # (K, V)
        weights = (changed_code_weights(coded, self.hparams.changed_code_weight, masked).reshape(-1)[pos]
                   if self.discrete and self.hparams.changed_code_weight != 1.0 else None)
        text, codes, z = token_losses(logits, targets[pos], self.model_config.code_offset,
                                      self.model_config.arch.z_loss, weights)
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
        self._loss = losses.total.detach()
        return losses.total

    def validation_step(self, batch: Batch, batch_idx: int) -> None:
        # the EMA weights; under ZeRO they are sharded (export gathers them), so validation reads the trained ones
        losses = self.compute_losses(batch, self.ema.averaged_model(self.model) if self.ema is not None else None)
        self.log_dict({"val/loss": losses.total, "val/text_loss": losses.text, "val/code_loss": losses.codes,
                       "val/diffusion_loss": losses.diffusion}, batch_size=batch.tokens.shape[0])

    def on_before_optimizer_step(self, optimizer) -> None:
        """Log the gradient norm; a non-finite loss or gradient (on any rank) drops this step's gradients, so
        the optimizer step changes nothing (weights, moments, EMA), and counts it in `train/skipped_steps`.
        The step still counts (schedule, data position, noise seeds move on): it costs exactly that step."""
        norm = torch.nn.utils.get_total_norm([p.grad for p in self.model.parameters() if p.grad is not None])
        self.log("grad_norm", norm)
        finite = bool(torch.isfinite(norm)) and (self._loss is None or bool(torch.isfinite(self._loss)))
        self._skip = not self.trainer.strategy.reduce_boolean_decision(finite, all=True)
        if self._skip:
            optimizer.zero_grad(set_to_none=True)
            self.skipped_steps += 1
            rank_zero_info(f"step {self.global_step}: the loss or a gradient is not finite; the step is skipped "
                           f"({self.skipped_steps} so far)")
        self.log("train/skipped_steps", float(self.skipped_steps))

    def optimizer_step(self, epoch, batch_idx, optimizer, optimizer_closure=None) -> None:
        """The optimizer step, then the EMA's (here rather than at batch end, so that a checkpoint saved at batch
        end by any callback holds the EMA of this step, and resuming from it is exact)."""
        self._skip = False
        super().optimizer_step(epoch, batch_idx, optimizer, optimizer_closure)
        if self.ema is not None and not self._skip:
            self.ema.update(self.model)

    def token_matrices(self) -> list[torch.nn.Parameter]:
        """The embedding and (untied) LM-head matrices: one row per token."""
        return [self.model.embed_tokens.weight] + ([self.model.lm_head.weight] if self.model.lm_head is not None else [])

    def on_after_backward(self) -> None:
        if self.hparams.freeze_text:  # the LM's own token rows stay as they are (no weight decay on them either)
            for weight in self.token_matrices():
                if weight.grad is not None:
                    weight.grad[self.lm_rows.to(weight.device)] = 0

    def param_groups(self) -> list[dict]:
        """AdamW groups: weight decay on matrices only (not on the matrices of frozen LM rows); with new_rows_lr, the
        image projections (the LM lacks them) at new_rows_lr and the token matrices at the larger of the two rates
        (`scale_row_steps` brings each kind of row to its own)."""
        hp = self.hparams
        tokens = {id(p) for p in self.token_matrices()}
        groups: dict[tuple[float, bool], list] = {}
        for name, p in self.model.named_parameters():
            if not p.requires_grad:
                continue
            lr = hp.lr
            if hp.new_rows_lr is not None and name.startswith(("patch_in.", "patch_out.", "time_embed.", "patch_pos", "code_pos")):
                lr = hp.new_rows_lr
            elif hp.new_rows_lr is not None and id(p) in tokens:
                lr = max(hp.lr, hp.new_rows_lr)
            shape = getattr(p, "ds_shape", p.shape)  # a weight ZeRO-3 shards has shape (0,); ds_shape is its own
            decay = len(shape) >= 2 and name not in ("patch_pos", "code_pos") and not (hp.freeze_text and id(p) in tokens)
            groups.setdefault((lr, decay), []).append(p)
        return [{"params": params, "lr": lr, "weight_decay": hp.weight_decay if decay else 0.0}
                for (lr, decay), params in groups.items()]

    def scale_row_steps(self, optimizer: torch.optim.Optimizer) -> None:
        """Give the LM's token rows lr and the new ones new_rows_lr, though one matrix holds both: AdamW steps the
        matrix at the larger rate and this hook scales the other rows' step down by the ratio after each step. That
        is exactly AdamW at their own rate (its moments do not depend on the rate), and only ever shrinks a step, so
        no rounding is amplified. Costs a copy of the scaled rows during the step."""
        hp = self.hparams
        top = max(hp.lr, hp.new_rows_lr)
        ratio, scaled_are_lm = (hp.lr / top, True) if hp.lr < top else (hp.new_rows_lr / top, False)
        matrices, before = [w for w in self.token_matrices() if w.requires_grad], []

        def rows(w: torch.Tensor) -> torch.Tensor:
            lm = self.lm_rows.to(w.device)
            return lm if scaled_are_lm else ~lm

        def keep(*_):
            before[:] = [w.detach()[rows(w)].clone() for w in matrices]

        @torch.no_grad()
        def scale(*_):
            for w, old in zip(matrices, before):
                w[rows(w)] = old + ratio * (w[rows(w)] - old)

        if ratio < 1:
            optimizer.register_step_pre_hook(keep)
            optimizer.register_step_post_hook(scale)

    def configure_optimizers(self):
        hp = self.hparams
        deepspeed = "DeepSpeed" in type(self.trainer.strategy).__name__
        if (hp.freeze_text or hp.new_rows_lr is not None) and deepspeed:
            raise ValueError("freeze_text and new_rows_lr act on rows of the embedding, which DeepSpeed's partitioned "
                             "optimizer does not expose; use the ddp strategy (recipes/strategy/ddp.yaml)")
        if hp.optimizer == "muon" and deepspeed:
            raise ValueError("optimizer=muon steps whole matrices, and DeepSpeed's ZeRO hands the optimizer flattened "
                             "pieces of them; use optimizer=adamw with DeepSpeed, or the ddp strategy")
        opt = build_optimizer(hp.optimizer, self.model, self.param_groups(), hp.lr, tuple(hp.betas), hp.weight_decay)
        if hp.new_rows_lr is not None:
            self.scale_row_steps(opt)
        # the total is read at each step: a TimeBudget callback may lower max_steps during training
        sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(hp.warmup_steps, lambda: trainer_steps(
            self.trainer), hp.min_lr_ratio))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        """Record what export needs to rebuild the model without this class: plain types only."""
        checkpoint["anymodal"] = {"model": self.model_config.to_dict(), "objective": self.objective.config(),
                                  "image_size": self.hparams.image_size,
                                  "text_tokenizer": self.text_tokenizer_dir,
                                  "image_tokenizer": str(self.hparams.image_tokenizer)}
        checkpoint["anymodal_training"] = {"skipped_steps": self.skipped_steps}
        if self.image_tokenizer is not None:  # its weights stay in its folder; export checks they are the same
            checkpoint["anymodal"]["image_tokenizer_sha256"] = image_tokenizer_fingerprint(self.hparams.image_tokenizer)
        if self.ema is not None:
            checkpoint["anymodal"]["ema"] = self.ema.state_dict()  # under ZeRO-1/2 a collective: every rank saves

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self.skipped_steps = int(checkpoint.get("anymodal_training", {}).get("skipped_steps", 0))
        state = checkpoint.get("state_dict", {})
        # checkpoints written while the tokenizer was a submodule and the EMA an AveragedModel
        legacy = {k: state.pop(k) for k in [k for k in state if k.startswith(("image_tokenizer.", "ema."))]}
        record = checkpoint.get("anymodal", {}).get("ema")
        if record is None and "ema.n_averaged" in legacy:
            record = {"decay": self.hparams.ema_decay, "updates": int(legacy["ema.n_averaged"]),
                      "weights": {k[len("ema.module."):]: {"shape": list(v.shape), "start": 0, "values": v.reshape(-1)}
                                  for k, v in legacy.items() if k.startswith("ema.module.")}}
        if self.ema is not None and record is not None:
            self.ema.load_state_dict(record)

    def sampling_model(self) -> UnifiedModel:
        """The EMA weights when kept, else the trained ones. Under ZeRO the EMA is sharded over the ranks:
        export the checkpoint (`anymodal export`) and load the bundle."""
        if self.ema is None:
            return self.model
        model = self.ema.averaged_model(self.model)
        if model is None:
            raise ValueError("the EMA weights are sharded over the ZeRO ranks; export the checkpoint with `anymodal "
                             "export` and sample from the bundle")
        return model
