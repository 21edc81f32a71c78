"""Packing: several encoded documents per fixed-length row, each with its own positions.

Rows never split a document. Documents never attend across their boundaries (the mask uses the
DOCUMENT spans written here).
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator

import torch

from anymodal.batch import DOCUMENT, NO_SPAN, Batch
from anymodal.data.document import TASKS, Image
from anymodal.data.sequence import EncodedDocument

TASK_INDEX = {t: i for i, t in enumerate(TASKS)}


def pack_rows(docs: Iterable[EncodedDocument], seq_len: int, rows: int,
              pool: int = 0) -> Iterator[list[list[EncodedDocument]]]:
    """Group a stream of documents into lists of `rows` rows, each row at most `seq_len` tokens.

    pool: documents held back to fill rows best-fit. 0 fills each row in stream order and closes it at the first
        document that does not fit (next-fit). With a pool, each row starts with the oldest held document and
        then takes, while one fits, the longest held document that fits; the pool refills from the stream as it
        goes. Every document is still used once, none waits more than `pool` rows, and rows end in less padding
        (the shapes mix at 256 tokens: see `padding_share`).
    """
    stream = iter(docs)

    def checked(doc: EncodedDocument) -> EncodedDocument:
        if len(doc) > seq_len:
            raise ValueError(f"a {doc.task} document of {len(doc)} tokens does not fit seq_len={seq_len}; "
                             f"raise seq_len in the recipe or use smaller images")
        return doc

    if pool <= 0:
        yield from _next_fit((checked(d) for d in stream), seq_len, rows)
        return
    held: list[EncodedDocument] = []  # in stream order

    def refill() -> None:
        held.extend(checked(d) for d in itertools.islice(stream, pool - len(held)))

    batch: list[list[EncodedDocument]] = []
    while True:
        refill()
        if not held:
            break
        row = [held.pop(0)]
        used = len(row[0])
        while True:
            fits = [i for i, d in enumerate(held) if used + len(d) <= seq_len]
            if not fits:
                break
            doc = held.pop(max(fits, key=lambda i: (len(held[i]), -i)))  # the longest; the oldest of equals
            row.append(doc)
            used += len(doc)
            refill()
        batch.append(row)
        if len(batch) == rows:
            yield batch
            batch = []
    if batch:
        yield batch


def _next_fit(docs: Iterable[EncodedDocument], seq_len: int, rows: int) -> Iterator[list[list[EncodedDocument]]]:
    batch: list[list[EncodedDocument]] = []
    row: list[EncodedDocument] = []
    used = 0
    for doc in docs:
        if used + len(doc) > seq_len:
            batch.append(row)
            row, used = [], 0
            if len(batch) == rows:
                yield batch
                batch = []
        row.append(doc)
        used += len(doc)
    if row:
        batch.append(row)
    if batch:
        yield batch


def padding_share(batches: Iterable[list[list[EncodedDocument]]], seq_len: int) -> float:
    """Share of the tokens of `batches` (as `pack_rows` yields them) that are padding."""
    rows = [row for batch in batches for row in batch]
    return 1.0 - sum(len(d) for row in rows for d in row) / (seq_len * len(rows))


def collate_rows(rows: list[list[EncodedDocument]], seq_len: int, pad_id: int, left_pad: bool = False) -> Batch:
    """Build a Batch from rows of encoded documents.

    Padding goes at the end of each row (training), or at its start with `left_pad` (sampling prompts,
    which then share their last column).
    """
    B = len(rows)
    tokens = torch.full((B, seq_len), pad_id, dtype=torch.long)
    loss_mask = torch.zeros((B, seq_len), dtype=torch.bool)
    n_spans = max(sum(1 + len(d.spans) for d in row) for row in rows)
    spans = torch.full((B, n_spans, 3), NO_SPAN, dtype=torch.long)
    image_index = torch.full((B, n_spans), -1, dtype=torch.long)
    task_ids = torch.full((B, n_spans), -1, dtype=torch.long)
    images: list[Image] = []
    noised: list[bool] = []
    visible: list[bool] = []
    for r, row in enumerate(rows):
        off, m = (seq_len - sum(len(d) for d in row) if left_pad else 0), 0
        for d in row:
            n = len(d)
            tokens[r, off:off + n] = torch.tensor(d.tokens)
            loss_mask[r, off:off + n] = torch.tensor(d.loss_mask)
            spans[r, m] = torch.tensor([DOCUMENT, off, n])
            task_ids[r, m] = TASK_INDEX[d.task]
            m += 1
            for (kind, o, length), img, nz, vis in zip(d.spans, d.images, d.noised, d.visible):
                spans[r, m] = torch.tensor([kind, off + o, length])
                image_index[r, m] = len(images)
                images.append(img)
                noised.append(nz)
                visible.append(vis)
                m += 1
            off += n
    stacked, kind = stack_images(images)
    return Batch(tokens=tokens, loss_mask=loss_mask, spans=spans, image_index=image_index, images=stacked,
                 image_kind=kind, noised=torch.tensor(noised, dtype=torch.bool),
                 visible=torch.tensor(visible, dtype=torch.bool), task_ids=task_ids)


def stack_images(images: list[Image]) -> tuple[torch.Tensor | None, str]:
    """Stack the images of a batch in one representation: latents, codes, or pixels (first that all share)."""
    if not images:
        return None, "pixels"
    for kind in ("latents", "codes", "pixels"):
        if all(getattr(im, kind) is not None for im in images):
            return torch.stack([getattr(im, kind) for im in images]), kind
    raise ValueError("a batch mixes pre-encoded and raw images; encode every source the same way "
                     "(all pixels, or all pre-encoded codes or latents)")
