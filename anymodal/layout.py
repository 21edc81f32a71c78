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


def code_slots(tokens: torch.Tensor, boi_id: int, code_offset: int, code_ids: int, slots: int) -> torch.Tensor:
    """(B, T) slot of every token in its discrete image: 0 on `<boi>`, 1..`slots` on the codes after it (ids
    in [code_offset, code_offset + code_ids): the codebook, and the mask id of parallel decoding), -1 elsewhere.

    Codes always follow their own `<boi>`, so the slot is the distance to the last `<boi>` before the token, in
    training's packed rows and in the engine's whole id history (a window of new columns is a slice of it).
    """
    T = tokens.shape[1]
    at = torch.arange(T, device=tokens.device).expand_as(tokens)
    is_boi = tokens == boi_id
    last_boi = torch.where(is_boi, at, torch.full_like(at, -1)).cummax(1).values  # (B, T)
    slot = at - last_boi
    is_code = (tokens >= code_offset) & (tokens < code_offset + code_ids)
    inside = is_boi | (is_code & (last_boi >= 0) & (slot <= slots))
    return torch.where(inside, slot, torch.full_like(slot, -1))


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
