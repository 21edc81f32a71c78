"""The one attention rule, written once as a FlexAttention mask_mod, and its two materialisations.

    allowed(q, k) = same_document(q, k) and ((k <= q and visible(k)) or same_continuous_image(q, k))

Text and discrete image codes attend causally; the patches of one continuous image attend to each other
both ways; nothing attends across packed documents. The rule reads two per-token tensors over the keys:

    document_ids:   (B, Tk) int64  document of each token; padding gets an id of its own (e.g. -1), so real
                                   tokens never see it and pad rows still see themselves
    continuous_ids: (B, Tk) int64  continuous image of each token, -1 elsewhere (text, discrete codes, pad):
                                   id >= 0 for an image later tokens see; id <= -2 for a hidden image, whose
                                   patches only see each other and what precedes them (the noised training
                                   copy of an image that later tokens see clean); ids are unique within a row

Queries may be a suffix of the keys (decoding against a KV cache): query i sits at `q_offset + i`.

`dense_mask` (SDPA on CPU, and the tests' reference) and `block_mask` (FlexAttention on CUDA) both come from
the same `mask_mod`, so the two backends cannot disagree.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch.nn.attention.flex_attention import BlockMask, create_block_mask

Backend = Literal["sdpa", "flex"]

_compiled_create_block_mask = None


def mask_mod(document_ids: torch.Tensor, continuous_ids: torch.Tensor, q_offset: int = 0):
    """The attention rule as a FlexAttention mask_mod `(b, h, q_idx, kv_idx) -> bool`.

    document_ids, continuous_ids: (B, Tk) int64 over all keys; q_offset: position of the first query among them.
    """
    # A tensor, not a Python int: a compiled flex_attention would otherwise recompile for every offset.
    offset = torch.as_tensor(q_offset, dtype=torch.int64, device=document_ids.device)

    def allowed(b, h, q_idx, kv_idx):
        q = q_idx + offset
        q_image, k_image = continuous_ids[b, q], continuous_ids[b, kv_idx]
        same_document = document_ids[b, q] == document_ids[b, kv_idx]
        same_image = (q_image != -1) & (q_image == k_image)
        visible = k_image >= -1
        return same_document & (((kv_idx <= q) & visible) | same_image)

    return allowed


def _check_ids(document_ids: torch.Tensor, continuous_ids: torch.Tensor, q_len: int | None, q_offset: int) -> int:
    """Validates the id tensors and returns the number of queries."""
    if document_ids.ndim != 2 or document_ids.shape != continuous_ids.shape:
        raise ValueError(
            f"document_ids {tuple(document_ids.shape)} and continuous_ids {tuple(continuous_ids.shape)} "
            "must both be (B, Tk)"
        )
    if document_ids.dtype.is_floating_point or continuous_ids.dtype.is_floating_point:
        raise ValueError("document_ids and continuous_ids must be integer tensors")
    kv_len = document_ids.shape[1]
    q_len = kv_len - q_offset if q_len is None else q_len
    if q_offset < 0 or q_len <= 0 or q_offset + q_len > kv_len:
        raise ValueError(
            f"queries [{q_offset}, {q_offset + q_len}) must lie within the {kv_len} keys; "
            "document_ids and continuous_ids must cover the cached keys and the new tokens"
        )
    return q_len


def dense_mask(
    document_ids: torch.Tensor, continuous_ids: torch.Tensor, q_len: int | None = None, q_offset: int = 0
) -> torch.Tensor:
    """The rule as a dense boolean mask (True = may attend) for SDPA: (B, 1, Tq, Tk).

    q_len defaults to all keys after `q_offset`.
    """
    q_len = _check_ids(document_ids, continuous_ids, q_len, q_offset)
    batch, kv_len = document_ids.shape
    mod = mask_mod(document_ids, continuous_ids, q_offset)
    # The mask_mod is elementwise, so calling it on broadcast index grids gives create_mask's result
    # (a test pins the two equal) without its vmap, which costs 20-40x more per call.
    device = document_ids.device
    b = torch.arange(batch, device=device).view(batch, 1, 1)
    q = torch.arange(q_len, device=device).view(1, q_len, 1)
    kv = torch.arange(kv_len, device=device).view(1, 1, kv_len)
    return mod(b, None, q, kv).unsqueeze(1)  # (B, 1, Tq, Tk)


def block_mask(
    document_ids: torch.Tensor, continuous_ids: torch.Tensor, q_len: int | None = None, q_offset: int = 0
) -> BlockMask:
    """The rule as a FlexAttention BlockMask (built on the device of the ids)."""
    q_len = _check_ids(document_ids, continuous_ids, q_len, q_offset)
    batch, kv_len = document_ids.shape
    mod = mask_mod(document_ids, continuous_ids, q_offset)
    build = create_block_mask
    if document_ids.is_cuda:  # compiled, it never materialises the (B, Tq, Tk) mask
        global _compiled_create_block_mask
        if _compiled_create_block_mask is None:
            _compiled_create_block_mask = torch.compile(create_block_mask)
        build = _compiled_create_block_mask
    return build(mod, batch, None, q_len, kv_len, device=document_ids.device)


def resolve_backend(attention: str, device: torch.device | str) -> Backend:
    """The mask's form for ArchConfig.attention: 'auto' -> 'flex' on CUDA, 'sdpa' (dense) elsewhere (FlexAttention
    has no backward on CPU); 'matmul' -> 'sdpa' (a dense mask, run through matmuls by anymodal.nn.attention)."""
    if attention == "auto":
        return "flex" if torch.device(device).type == "cuda" else "sdpa"
    if attention == "matmul":
        return "sdpa"
    if attention not in ("sdpa", "flex"):
        raise ValueError(f"attention backend {attention!r} must be one of auto, sdpa, flex, matmul")
    return attention  # type: ignore[return-value]


@dataclass
class AttentionMask:
    """Who attends to whom in one forward pass: a dense mask for SDPA or a BlockMask for FlexAttention.

    dense: (B, 1, Tq, Tk) bool, True = may attend; block: BlockMask over (Tq, Tk). Exactly one is set.
    q_offset: position of the first query among the keys (the KV cache length when decoding).
    """

    dense: torch.Tensor | None = None
    block: BlockMask | None = None
    q_offset: int = 0

    def __post_init__(self) -> None:
        if (self.dense is None) == (self.block is None):
            raise ValueError("AttentionMask needs exactly one of dense (SDPA) or block (FlexAttention)")

    @property
    def backend(self) -> Backend:
        return "sdpa" if self.dense is not None else "flex"

    @property
    def q_len(self) -> int:
        return self.dense.shape[-2] if self.dense is not None else self.block.seq_lengths[0]

    @property
    def kv_len(self) -> int:
        return self.dense.shape[-1] if self.dense is not None else self.block.seq_lengths[1]


def build_attention_mask(
    document_ids: torch.Tensor,
    continuous_ids: torch.Tensor,
    backend: str = "auto",
    q_offset: int = 0,
    q_len: int | None = None,
) -> AttentionMask:
    """The attention mask of one forward pass for `backend` ('sdpa', 'flex' or 'auto').

    document_ids, continuous_ids: (B, Tk) int64 over all keys (cached + new); queries are the `q_len` tokens
    from `q_offset` on (default: all keys after `q_offset`).
    """
    if resolve_backend(backend, document_ids.device) == "flex":
        return AttentionMask(block=block_mask(document_ids, continuous_ids, q_len, q_offset), q_offset=q_offset)
    return AttentionMask(dense=dense_mask(document_ids, continuous_ids, q_len, q_offset), q_offset=q_offset)
