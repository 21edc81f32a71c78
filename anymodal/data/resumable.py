"""Batches whose position is saved and restored directly: exact mid-epoch resume, with DataLoader workers.

For sources that can seek (`seekable = True` and `documents(shard, num_shards, start)`: `EncodedShards`).
Every reader (rank x DataLoader worker) mixes, drops and packs its own stream, and hands each batch out
with its state: how many documents it has drawn from each source and its random generator, both as they
were before the document that opens the next batch. `ResumableLoader` keeps every reader's state as of
each batch it serves. Restoring gives each reader its state back (its sources seek to their documents;
nothing is regenerated or skipped) and turns the workers' round-robin so that the batch after the last
one served comes first. A resumed run therefore sees exactly the batches of an uninterrupted one.

On-the-fly sources (shapes world, JSONL, WebDataset) keep `stream.PackedBatches`, which resumes by
regenerating and skipping the batches already served.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from anymodal.batch import Batch
from anymodal.data.packing import collate_rows
from anymodal.data.sequence import SequenceEncoder, drop_conditions
from anymodal.data.sources import Source

HISTORY = 64
"""Batches back for which `ResumableLoader` can still give the readers' state (the trainer may count a
few batches fewer than the loader has handed out: Lightning fetches one ahead)."""


def seekable(sources: list[Source]) -> bool:
    """Whether every source can start its stream at any document (so batches can resume without replay)."""
    return bool(sources) and all(getattr(s, "seekable", False) for s in sources)


class SeekableBatches(IterableDataset):
    """Endless (Batch, report) pairs of `rows` rows of `seq_len` tokens from seekable sources.

    A report is {"reader": id, "state": the reader's state before the document that opens its next batch}.
    `states` (reader id -> state) and `rotation` (the first worker plays reader rank*W + rotation) are set
    by `ResumableLoader` before each pass; `rank` and `world` place this process among the ranks.
    """

    def __init__(self, sources: list[Source], encoder: SequenceEncoder, seq_len: int, rows: int,
                 weights: list[float] | None = None, drop_text: float = 0.1, drop_image: float = 0.1,
                 seed: int = 0, rank: int = 0, world: int = 1) -> None:
        super().__init__()
        if not seekable(sources):
            raise ValueError("SeekableBatches needs sources that can seek (anymodal.data.shards.EncodedShards)")
        weights = [1.0] * len(sources) if weights is None else list(weights)
        if len(weights) != len(sources) or min(weights) < 0 or sum(weights) <= 0:
            raise ValueError(f"weights {weights} must be one non-negative number per source ({len(sources)}), not all 0")
        self.sources, self.encoder, self.seq_len, self.rows = sources, encoder, seq_len, rows
        self.p = np.asarray(weights, dtype=float) / sum(weights)
        self.drop_text, self.drop_image, self.seed = drop_text, drop_image, seed
        self.rank, self.world = rank, world
        self.states: dict[int, dict[str, Any]] = {}
        self.rotation = 0

    def __iter__(self) -> Iterator[tuple[Batch, dict[str, Any]]]:
        info = get_worker_info()
        worker, workers = (0, 1) if info is None else (info.id, info.num_workers)
        reader = self.rank * workers + (worker + self.rotation) % workers
        return self.batches(reader, self.world * workers, self.states.get(reader))

    def fresh_state(self, reader: int) -> dict[str, Any]:
        return {"drawn": [0] * len(self.sources), "rng": np.random.default_rng([self.seed, reader]).bit_generator.state}

    def batches(self, reader: int, readers: int, state: dict[str, Any] | None = None
                ) -> Iterator[tuple[Batch, dict[str, Any]]]:
        """Reader `reader` of `readers`, from `state` (None: the start)."""
        state = state or self.fresh_state(reader)
        rng = np.random.default_rng()
        rng.bit_generator.state = state["rng"]
        drawn = list(state["drawn"])
        streams = [s.documents(reader, readers, start=n) for s, n in zip(self.sources, drawn)]
        rows, row, used = [], [], 0
        while True:
            before = {"drawn": list(drawn), "rng": rng.bit_generator.state}
            i = int(rng.choice(len(streams), p=self.p))
            doc = next(streams[i], None)
            if doc is None:
                raise ValueError(f"source {type(self.sources[i]).__name__} ran out; training sources must loop "
                                 "(loop: true)")
            drawn[i] += 1
            encoded = self.encoder.encode(drop_conditions(doc, rng, self.drop_text, self.drop_image))
            if len(encoded) > self.seq_len:
                raise ValueError(f"a {encoded.task} document of {len(encoded)} tokens does not fit "
                                 f"seq_len={self.seq_len}; raise seq_len in the recipe or use smaller images")
            if used + len(encoded) > self.seq_len:
                rows.append(row)
                row, used = [], 0
                if len(rows) == self.rows:
                    yield collate_rows(rows, self.seq_len, self.encoder.text.pad_id), {"reader": reader,
                                                                                        "state": before}
                    rows = []
            row.append(encoded)
            used += len(encoded)


def _unchanged(item):
    return item


class ResumableLoader(DataLoader):
    """Serves the Batches of a `SeekableBatches` and remembers every reader's state as of each batch served.

    `served` batches were handed out before this loader (a resumed run); `states` are the readers' states then.
    """

    def __init__(self, dataset: SeekableBatches, num_workers: int = 0, served: int = 0,
                 states: dict[int, dict[str, Any]] | None = None) -> None:
        super().__init__(dataset, batch_size=None, num_workers=num_workers, collate_fn=_unchanged)
        self.served = served
        self.states = dict(states or {})
        self.history = {served: dict(self.states)}

    def __iter__(self) -> Iterator[Batch]:
        self.dataset.states = dict(self.states)
        self.dataset.rotation = self.served % max(1, self.num_workers)
        for batch, report in super().__iter__():
            self.states[report["reader"]] = report["state"]
            self.served += 1
            self.history[self.served] = dict(self.states)
            self.history.pop(self.served - HISTORY, None)
            yield batch

    def state_at(self, served: int) -> dict[int, dict[str, Any]]:
        """The readers' states after `served` batches (every reader of this process that has served one)."""
        if served not in self.history:
            raise RuntimeError(f"no reader state after {served} batches (this loader served {self.served})")
        return self.history[served]


def gather_states(states: dict[int, dict[str, Any]]) -> dict[int, dict[str, Any]]:
    """The reader states of every rank, merged (each rank holds its own readers'); this rank's alone when not
    distributed. Every rank must call it (a collective), as Lightning does when it saves a checkpoint."""
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return dict(states)
    every: list[dict[int, dict[str, Any]] | None] = [None] * dist.get_world_size()
    dist.all_gather_object(every, states)
    return {reader: state for part in every for reader, state in (part or {}).items()}
