"""Training streams for the unified model: mix sources by ratio, drop conditions for guidance,
encode documents, pack them into rows, and collate Batches.

The stream is reproducible from its seed and resumable: `PackedBatches(start=k)` yields the same
batches as a fresh stream from its k-th batch on (it regenerates and skips the first k).
"""

from __future__ import annotations

import random
from collections.abc import Iterator

import numpy as np
from torch.utils.data import IterableDataset

from anymodal.batch import Batch
from anymodal.data.document import Document
from anymodal.data.packing import collate_rows, pack_rows
from anymodal.data.sequence import SequenceEncoder, drop_conditions
from anymodal.data.sources import Source


def mix_sources(sources: list[Source], weights: list[float] | None, seed: int) -> Iterator[Document]:
    """Endless stream drawing each document from a source chosen with probability proportional to its weight.

    A finite source is restarted (next epoch) when it runs out.
    """
    if not sources:
        raise ValueError("the data needs at least one source")
    weights = [1.0] * len(sources) if weights is None else list(weights)
    if len(weights) != len(sources) or min(weights) < 0 or sum(weights) <= 0:
        raise ValueError(f"weights {weights} must be one non-negative number per source ({len(sources)}), not all 0")
    rng = np.random.default_rng(seed)
    p = np.asarray(weights, dtype=float) / sum(weights)
    iters = [iter(s) for s in sources]
    epochs = [0] * len(sources)
    while True:
        i = int(rng.choice(len(sources), p=p))
        try:
            yield next(iters[i])
        except StopIteration:
            epochs[i] += 1
            sources[i].set_epoch(epochs[i])
            iters[i] = iter(sources[i])
            try:
                yield next(iters[i])
            except StopIteration:
                raise ValueError(f"source {type(sources[i]).__name__} yields no documents") from None


class PackedBatches(IterableDataset):
    """Endless Batches of `rows` rows of `seq_len` tokens from mixed sources, packed with a pool of `pool` held
    documents (`anymodal.data.packing.pack_rows`; 0: in stream order)."""

    def __init__(self, sources: list[Source], encoder: SequenceEncoder, seq_len: int, rows: int,
                 weights: list[float] | None = None, drop_text: float = 0.1, drop_image: float = 0.1,
                 seed: int = 0, start: int = 0, pool: int = 0) -> None:
        super().__init__()
        self.sources, self.weights, self.encoder = sources, weights, encoder
        self.seq_len, self.rows, self.drop_text, self.drop_image = seq_len, rows, drop_text, drop_image
        self.seed, self.start, self.pool = seed, start, pool

    def __iter__(self) -> Iterator[Batch]:
        rng = random.Random(self.seed)
        docs = (self.encoder.encode(drop_conditions(d, rng, self.drop_text, self.drop_image))
                for d in mix_sources(self.sources, self.weights, self.seed))
        for k, rows in enumerate(pack_rows(docs, self.seq_len, self.rows, self.pool)):
            if k >= self.start:
                yield collate_rows(rows, self.seq_len, self.encoder.text.pad_id)
