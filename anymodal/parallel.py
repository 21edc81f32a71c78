"""Parallel (MaskGIT-style) decoding of discrete images, beside autoregressive decoding on the same model.

Training (`UnifiedSystem(parallel_images=p)`): a document's final image (its codes followed by `<eoi><eos>`: a
t2i or edit result, a story's last picture) is, with probability p, trained as a masked image instead of
autoregressively. A cosine-drawn share of its codes is replaced by the mask id, its code slots attend to each
other both ways (one bidirectional group in the mask, as a continuous image's patches), and each masked slot
predicts its own code; the image's next-code and `<eoi>` targets are dropped. The other images keep the
autoregressive objective, so one bundle decodes both ways.

Sampling (`Engine`, `ImageSampling.parallel_steps = n`): all slots start masked; each of n forwards predicts
every slot, and the most confident predictions are kept until `known_after(i, n, L)` slots are fixed.
"""

from __future__ import annotations

import math

import torch

from anymodal.batch import DISCRETE_IMAGE, IGNORE, Batch


def known_after(step: int, steps: int, slots: int) -> int:
    """Slots fixed after step `step` (0-based) of `steps`: 1 - cos(pi/2 * (step+1)/steps) of them, all at the end,
    at least one more than before."""
    share = 1.0 - math.cos(math.pi / 2 * (step + 1) / steps)
    return slots if step == steps - 1 else min(slots - 1, max(step + 1, math.floor(share * slots)))


def final_images(batch: Batch, eoi_id: int, eos_id: int) -> list[tuple[int, int, int]]:
    """(row, offset, length) of every discrete image that ends its document (`<eoi><eos>` after its codes)
    and is trained (its first code is a target)."""
    out = []
    tokens = batch.tokens
    T = tokens.shape[1]
    for r, off, length, _ in batch.image_slots(DISCRETE_IMAGE):
        end = off + length
        if (end + 1 < T and int(tokens[r, end]) == eoi_id and int(tokens[r, end + 1]) == eos_id
                and bool(batch.loss_mask[r, off - 1])):
            out.append((r, off, length))
    return out


def mask_for_training(batch: Batch, share: float, mask_id: int, eoi_id: int, eos_id: int,
                      generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, list[tuple[int, int, int]]]:
    """Masks a `share` of the batch's final images for the parallel objective.

    Returns tokens (B, T) with the masked codes replaced by `mask_id`, targets (B, T) (IGNORE on the chosen
    images' autoregressive targets; each masked slot's own code), and the chosen images' (row, offset, length).
    """
    tokens, targets = batch.tokens.clone(), batch.targets.clone()
    chosen = []
    for r, off, length in final_images(batch, eoi_id, eos_id):
        if torch.rand((), generator=generator).item() >= share:
            continue
        ratio = math.cos(math.pi / 2 * torch.rand((), generator=generator).item())  # share of slots masked
        n = max(1, math.ceil(ratio * length))
        masked = torch.randperm(length, generator=generator)[:n].to(tokens.device) + off  # (n,) columns
        targets[r, off - 1:off + length] = IGNORE  # <boi> -> first code, code -> next code, last code -> <eoi>
        targets[r, masked] = tokens[r, masked]
        tokens[r, masked] = mask_id
        chosen.append((r, off, length))
    return tokens, targets, chosen


def bidirectional(continuous_ids: torch.Tensor, images: list[tuple[int, int, int]]) -> torch.Tensor:
    """A copy of the layout's continuous ids in which each of `images` (row, offset, length) is one group whose
    slots see each other both ways (an id no other image of its row uses), visible to later tokens."""
    ids = continuous_ids.clone()
    for r, off, length in images:
        ids[r, off:off + length] = int(ids[r].max().clamp_min(-1)) + 1
    return ids
