"""Losses of the unified model: cross-entropy over text and codes, diffusion MSE, their weighting."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from anymodal.batch import DISCRETE_IMAGE, IGNORE, Batch


@dataclass
class Losses:
    """total = ce_text + code_weight*ce_codes + diffusion_weight*mse (+ z_loss); each term averaged over its own tokens."""

    total: torch.Tensor
    text: torch.Tensor
    codes: torch.Tensor
    diffusion: torch.Tensor
    z: torch.Tensor


def token_losses(logits: torch.Tensor, targets: torch.Tensor, code_offset: int, z_loss: float = 0.0,
                 code_weights: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Cross-entropy over text targets and over image-code targets, and the z-loss.

    logits: (K, V) at the trained positions; targets: (K,) int64 (no IGNORE inside); code_weights: (K,) float or
    None: the code term is then the weighted mean of the code targets' cross-entropy.
    """
    ce = F.cross_entropy(logits.float(), targets, reduction="none")  # (K,)
    is_code = targets >= code_offset
    zero = logits.new_zeros(())
    text = ce[~is_code].mean() if (~is_code).any() else zero
    if not is_code.any():
        codes = zero
    elif code_weights is None:
        codes = ce[is_code].mean()
    else:
        w = code_weights[is_code].float()
        codes = (ce[is_code] * w).sum() / w.sum()
    z = z_loss * torch.logsumexp(logits.float(), dim=-1).pow(2).mean() if z_loss > 0 else zero
    return text, codes, z


def changed_code_weights(batch: Batch, weight: float, masked: list[tuple[int, int, int]] = ()) -> torch.Tensor:
    """(B, T) float32 loss weights: `weight` on every image-code target that differs from the code in the same
    place of the image's reference (`Batch.reference_index`: an edit's source, a story's previous picture), 1
    elsewhere. `batch.tokens` holds the codes (`Batch.fill_codes`, before any masking). The weights are aligned
    with the targets: position p predicts token p + 1, except in the images of `masked` (row, offset, length:
    trained MaskGIT-style, `anymodal.parallel`), whose slots predict their own codes.

    Most of an edit's result copies its source; the few codes it changes (the object removed, moved or
    recolored) carry the edit."""
    w = torch.ones(batch.tokens.shape, dtype=torch.float32, device=batch.tokens.device)  # (B, T)
    if weight == 1.0 or batch.num_images == 0:
        return w
    slots = {i: (r, off, length) for r, off, length, i in batch.image_slots(DISCRETE_IMAGE)}
    ref, chosen = batch.reference_index(), set(masked)
    for i, (r, off, length) in slots.items():
        j = int(ref[i])
        if j not in slots or slots[j][2] != length:
            continue
        rj, offj, _ = slots[j]
        changed = batch.tokens[r, off:off + length] != batch.tokens[rj, offj:offj + length]  # (length,)
        start = off if (r, off, length) in chosen else off - 1
        w[r, start:start + length][changed] = weight
    return w


def diffusion_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """MSE between the predicted and true velocity (or noise), averaged over every latent element."""
    return F.mse_loss(pred.float(), target.float())


def combine(text, codes, diffusion, z, code_weight: float = 1.0, diffusion_weight: float = 5.0) -> Losses:
    total = text + code_weight * codes + diffusion_weight * diffusion + z
    return Losses(total=total, text=text.detach(), codes=codes.detach(), diffusion=diffusion.detach(), z=z.detach())


def trained_positions(targets: torch.Tensor) -> torch.Tensor:
    """Flat indices of (B, T) targets that carry a cross-entropy target."""
    return (targets.reshape(-1) != IGNORE).nonzero(as_tuple=True)[0]
