"""Span and Batch: the one contract between data and model.

A packed row is a run of documents; inside a row, spans mark where each document and each image
slot lies. Per-token index tensors (document id, continuous-image id, position) are derived from the spans
once (`derive_indices`; `anymodal.layout.build_layout` hands them to the model).

Span kinds:
  DOCUMENT           a packed document (positions restart at 0 at its offset)
  DISCRETE_IMAGE     the code slots of a VQ image (between <boi> and <eoi>); causal like text
  CONTINUOUS_IMAGE   the patch slots of a VAE-latent image; bidirectional within the image
Text is everything else inside a document; padding is everything outside documents.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

import torch

IGNORE = -100
DOCUMENT, DISCRETE_IMAGE, CONTINUOUS_IMAGE = 0, 1, 2
NO_SPAN = -1
PAD_DOCUMENT = -1


@dataclass
class Batch:
    """A packed batch.

    tokens:      (B, T) int64 ids; continuous-image slots hold the pad id (their embeddings come from latents)
    loss_mask:   (B, T) bool, True where position t is trained to predict tokens[t + 1] by cross-entropy
    spans:       (B, M, 3) int64: kind, offset, length; rows padded with kind NO_SPAN
    image_index: (B, M) int64: for image spans, the index into `images` (row-major order); -1 otherwise
    images:      (N_img, 3, H, W) pixels in [0, 1], or (N_img, h, w) codes, or (N_img, C, h, w) latents
    image_kind:  "pixels" | "codes" | "latents": what `images` holds
    noised:      (N_img,) bool: the image is a diffusion target (its slots get noised latents + a timestep)
    visible:     (N_img,) bool: tokens after the image may attend to it (False for the noised copy of an
                 image that also enters the sequence clean)
    task_ids:    (B, M) int64: task index of each DOCUMENT span (for logging), -1 otherwise
    """

    tokens: torch.Tensor
    loss_mask: torch.Tensor
    spans: torch.Tensor
    image_index: torch.Tensor
    images: torch.Tensor | None = None
    image_kind: str = "pixels"
    noised: torch.Tensor | None = None
    visible: torch.Tensor | None = None
    task_ids: torch.Tensor | None = None

    @property
    def targets(self) -> torch.Tensor:
        """(B, T) int64 next-token targets, IGNORE wherever no cross-entropy applies."""
        nxt = torch.full_like(self.tokens, IGNORE)
        nxt[:, :-1] = self.tokens[:, 1:]
        return torch.where(self.loss_mask, nxt, torch.full_like(nxt, IGNORE))

    @property
    def num_images(self) -> int:
        return 0 if self.images is None else int(self.images.shape[0])

    def to(self, device) -> Batch:
        return replace(self, **{f.name: getattr(self, f.name).to(device) for f in fields(self)
                                if isinstance(getattr(self, f.name), torch.Tensor)})

    def image_slots(self, kind: int) -> list[tuple[int, int, int, int]]:
        """(row, offset, length, image index) of every image span of `kind`, in image-index order."""
        out = []
        rows, cols = torch.nonzero(self.spans[..., 0] == kind, as_tuple=True)
        for r, c in zip(rows.tolist(), cols.tolist()):
            _, off, length = self.spans[r, c].tolist()
            out.append((r, off, length, int(self.image_index[r, c])))
        return sorted(out, key=lambda s: s[3])

    def reference_index(self) -> torch.Tensor:
        """(N_img,) int64: for each image, the index of the last image later tokens see (`visible`) before it in
        its document, -1 where there is none: an edit's source for its result, a story's previous picture for
        the next (a noised copy's clean twin follows it, so an image never refers to itself)."""
        ref = torch.full((self.num_images,), -1, dtype=torch.long)
        visible = self.visible.tolist() if self.visible is not None else [True] * self.num_images
        for row_spans, row_index in zip(self.spans.tolist(), self.image_index.tolist()):
            last = -1
            for (kind, _, _), i in zip(row_spans, row_index):
                if kind == DOCUMENT:
                    last = -1
                elif i >= 0:
                    ref[i] = last
                    if visible[i]:
                        last = i
        return ref

    def fill_codes(self, codes: torch.Tensor, code_offset: int) -> Batch:
        """Write discrete image codes (N_img, h, w) into their slots as ids `code_offset + code`."""
        tokens = self.tokens.clone()
        for r, off, length, i in self.image_slots(DISCRETE_IMAGE):
            flat = codes[i].reshape(-1)
            if flat.numel() != length:
                raise ValueError(f"image {i} has {flat.numel()} codes but its span holds {length} slots")
            tokens[r, off:off + length] = flat + code_offset
        return replace(self, tokens=tokens)


@dataclass
class TokenIndex:
    """Per-token tensors derived from spans (all (B, T) int64)."""

    document_ids: torch.Tensor
    positions: torch.Tensor
    continuous_ids: torch.Tensor


def derive_indices(batch: Batch) -> TokenIndex:
    """Document id, continuous-image id and position of every token, from the spans.

    document_ids: row-local document number, PAD_DOCUMENT outside documents
    continuous_ids: image index for continuous slots only (the bidirectional groups of the mask), -1 elsewhere;
                  an image later tokens may not see (`visible` False) gets -(2 + index) (see masks.py)
    positions:    position within its document (0-based), 0 on padding; a hidden (noised) copy of an image
                  shares the positions of the clean copy that follows it and does not advance later ones
    """
    B, T = batch.tokens.shape
    device = batch.tokens.device
    document_ids = torch.full((B, T), PAD_DOCUMENT, dtype=torch.long, device=device)
    continuous_ids = torch.full((B, T), -1, dtype=torch.long, device=device)
    positions = torch.zeros((B, T), dtype=torch.long, device=device)
    spans = batch.spans.tolist()
    index = batch.image_index.tolist()
    counted = torch.ones((B, T), dtype=torch.long, device=device)  # tokens that advance the position
    hidden_spans: list[tuple[int, int, int]] = []
    for r in range(B):
        doc = 0
        for (kind, off, length), idx in zip(spans[r], index[r]):
            if kind == DOCUMENT:
                document_ids[r, off:off + length] = doc
                doc += 1
            elif kind == CONTINUOUS_IMAGE:
                visible = batch.visible is None or bool(batch.visible[idx])
                continuous_ids[r, off:off + length] = idx if visible else -(2 + idx)
                if not visible:
                    counted[r, off:off + length] = 0
                    hidden_spans.append((r, off, length))
    # Positions restart at 0 per document and skip hidden (noised) copies, so the clean copy and all later
    # tokens sit where sampling puts them; a hidden copy takes the positions of the clean copy after it.
    for r in range(B):
        for (kind, off, length) in spans[r]:
            if kind == DOCUMENT:
                positions[r, off:off + length] = counted[r, off:off + length].cumsum(0) - 1
    for r, off, length in hidden_spans:
        clean = positions[r, off + length:off + 2 * length]
        if clean.numel() != length:
            raise ValueError("a hidden (noised) image copy must be followed by its clean copy")
        positions[r, off:off + length] = clean
    return TokenIndex(document_ids, positions, continuous_ids)
