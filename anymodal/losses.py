"""Losses of the unified model: cross-entropy over text and codes, diffusion MSE, their weighting."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from anymodal.batch import IGNORE


@dataclass
class Losses:
    """total = ce_text + code_weight*ce_codes + diffusion_weight*mse (+ z_loss); each term averaged over its own tokens."""

    total: torch.Tensor
    text: torch.Tensor
    codes: torch.Tensor
    diffusion: torch.Tensor
    z: torch.Tensor


def token_losses(logits: torch.Tensor, targets: torch.Tensor, code_offset: int, z_loss: float = 0.0
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Cross-entropy over text targets and over image-code targets, and the z-loss.

    logits: (K, V) at the trained positions; targets: (K,) int64 (no IGNORE inside).
    """
    ce = F.cross_entropy(logits.float(), targets, reduction="none")  # (K,)
    is_code = targets >= code_offset
    zero = logits.new_zeros(())
    text = ce[~is_code].mean() if (~is_code).any() else zero
    codes = ce[is_code].mean() if is_code.any() else zero
    z = z_loss * torch.logsumexp(logits.float(), dim=-1).pow(2).mean() if z_loss > 0 else zero
    return text, codes, z


def diffusion_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """MSE between the predicted and true velocity (or noise), averaged over every latent element."""
    return F.mse_loss(pred.float(), target.float())


def combine(text, codes, diffusion, z, code_weight: float = 1.0, diffusion_weight: float = 5.0) -> Losses:
    total = text + code_weight * codes + diffusion_weight * diffusion + z
    return Losses(total=total, text=text.detach(), codes=codes.detach(), diffusion=diffusion.detach(), z=z.detach())


def trained_positions(targets: torch.Tensor) -> torch.Tensor:
    """Flat indices of (B, T) targets that carry a cross-entropy target."""
    return (targets.reshape(-1) != IGNORE).nonzero(as_tuple=True)[0]
