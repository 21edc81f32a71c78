"""A packed Batch laid out for the model: the one place its tokens, positions and mask ids come from.

Training (`UnifiedSystem.compute_losses`), the sampling engine's prefill (`Engine.start`, prompts
left-padded by `collate_rows(..., left_pad=True)`) and the tests all turn a Batch into model inputs with
`build_layout`; the engine's later windows (one token, one image's slots) place their continuous images
with the same `slot_indices`.

    hidden = model(model.embed(layout.tokens, ContinuousInput(layout.continuous_slots, latents, t)),
                   layout.positions, build_attention_mask(layout.document_ids, layout.continuous_ids))
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from anymodal.batch import CONTINUOUS_IMAGE, Batch, derive_indices


@dataclass
class Layout:
    """What the model reads of a Batch (all int64).

    tokens:           (B, T) ids; continuous slots hold the pad id (their embeddings come from latents)
    positions:        (B, T) position within its document (RoPE), 0 on padding
    document_ids:     (B, T) row-local document number, PAD_DOCUMENT (-1) on padding
    continuous_ids:   (B, T) image index on the slots of a continuous image (the mask's bidirectional groups),
                      -(2 + index) for an image later tokens may not see, -1 elsewhere
    continuous_slots: (N, L) flat indices into the B*T positions of each continuous image's L slots, in
                      image-index order (the order of the batch's latents); (0, 0) without continuous images
    """

    tokens: torch.Tensor
    positions: torch.Tensor
    document_ids: torch.Tensor
    continuous_ids: torch.Tensor
    continuous_slots: torch.Tensor


def reference_latents(latents: torch.Tensor, references: torch.Tensor) -> torch.Tensor:
    """(N, C, h, w): the clean latents each image refers to (`Batch.reference_index`), zeros where it has none."""
    references = references.to(latents.device)
    has = (references >= 0)[:, None, None, None]
    return torch.where(has, latents[references.clamp_min(0)], latents.new_zeros(()))


def slot_indices(rows: torch.Tensor, starts: torch.Tensor, width: int, slots_per_image: int) -> torch.Tensor:
    """(N, L) flat indices into a (R, width) window of N images; image i fills `slots_per_image` columns of
    row `rows[i]` from column `starts[i]`.

    rows, starts: (N,) int64 on the device the indices are wanted on.
    """
    offsets = torch.arange(slots_per_image, dtype=torch.long, device=rows.device)  # (L,)
    return (rows * width + starts)[:, None] + offsets  # (N, L)


def build_layout(batch: Batch) -> Layout:
    """Tokens, positions, document ids, continuous ids and continuous slots of `batch` (see `Layout`).

    Discrete codes must already be in the tokens (`Batch.fill_codes`); every continuous image of the batch
    must have the same number of slots.
    """
    idx = derive_indices(batch)
    T = batch.tokens.shape[1]
    device = batch.tokens.device
    images = batch.image_slots(CONTINUOUS_IMAGE)  # (row, offset, length, index), by index
    lengths = sorted({length for _, _, length, _ in images})
    if len(lengths) > 1:
        raise ValueError(f"the continuous images of one batch must have the same number of slots, got {lengths}")
    rows = torch.tensor([r for r, _, _, _ in images], dtype=torch.long, device=device)  # (N,)
    starts = torch.tensor([off for _, off, _, _ in images], dtype=torch.long, device=device)  # (N,)
    slots = slot_indices(rows, starts, T, lengths[0] if lengths else 0)  # (N, L)
    return Layout(batch.tokens, idx.positions, idx.document_ids, idx.continuous_ids, slots)
