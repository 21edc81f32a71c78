"""The base of every data source, and the bad-record policy shared by file sources.

A `Source` is an `IterableDataset` of `Document`s. It splits its stream across
DataLoader workers and, when `torch.distributed` is initialised, across ranks: every
(rank, worker) pair is one *shard* and draws a different stream, derived from the seed,
the epoch and the shard index. With one process and `num_workers=0` there is a single
shard, so a source is fully reproducible from its seed.
"""

from __future__ import annotations

import json
import warnings
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from .document import TASKS, Document, Image, Text
from .images import BadImage


def shard_info() -> tuple[int, int]:
    """(shard, num_shards) of the calling process and DataLoader worker.

    shard = rank * num_workers + worker; one shard when neither distribution nor workers are used.
    """
    rank, world = 0, 1
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    info = get_worker_info()
    worker, workers = (0, 1) if info is None else (info.id, info.num_workers)
    return rank * workers + worker, world * workers


def shard_count(length: int | None, shard: int, num_shards: int) -> int | None:
    """How many of `length` documents shard `shard` yields (None: endless)."""
    if length is None:
        return None
    return length // num_shards + (1 if shard < length % num_shards else 0)


class Source(IterableDataset):
    """Base of every data source: iterating yields `Document`s.

    Subclasses implement `documents(shard, num_shards)`. `length` is the number of
    documents per epoch summed over all shards (None: endless). `set_epoch` moves every
    shard to a fresh stream; the datamodule calls it at the start of each epoch.
    """

    def __init__(self, seed: int = 0, length: int | None = None) -> None:
        super().__init__()
        if length is not None and length < 0:
            raise ValueError(f"length={length} must be >= 0, or None for an endless source")
        self.seed = seed
        self.length = length
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Draw a different stream from the next `__iter__` on."""
        self.epoch = epoch

    def rng(self, shard: int, *stream: int) -> np.random.Generator:
        """A generator for this shard, independent of every other (seed, epoch, shard, *stream)."""
        return np.random.default_rng([self.seed, self.epoch, shard, *stream])

    def documents(self, shard: int, num_shards: int) -> Iterator[Document]:
        raise NotImplementedError

    def __iter__(self) -> Iterator[Document]:
        shard, num_shards = shard_info()
        return self.documents(shard, num_shards)

    def __len__(self) -> int:
        if self.length is None:
            raise TypeError(
                f"{type(self).__name__} has no len(): it is endless or its length is unknown (length=None)"
            )
        return self.length


def repeat_passes(one_pass: Callable[[int], Iterator[Document]], loop: bool, empty: str) -> Iterator[Document]:
    """Yield `one_pass(0)`, then, with `loop`, `one_pass(1)`, ... forever.

    A looping pass that yields nothing raises ValueError(`empty`) instead of spinning forever.
    """
    passes = 0
    while True:
        produced = 0
        for doc in one_pass(passes):
            produced += 1
            yield doc
        passes += 1
        if not loop:
            return
        if produced == 0:
            raise ValueError(empty)


class BadRecord(ValueError):
    """A record that could not be read, raised when a source runs with strict=True."""


class RecordErrors:
    """Counts records a file source skips, by reason, and warns with the running count.

    Under `strict=True` the first bad record raises `BadRecord` naming it and the reason.
    """

    def __init__(self, source: str, strict: bool = False) -> None:
        self.source = source
        self.strict = strict
        self.counts: Counter[str] = Counter()

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def skip(self, record: str, reason: str, detail: str = "") -> None:
        """Record that `record` is skipped because of `reason` (a short category); `detail` explains."""
        what = f"{record}: {reason}" + (f" ({detail})" if detail else "")
        if self.strict:
            raise BadRecord(f"{what}; fix or remove this record, or pass strict=False to skip bad records")
        self.counts[reason] += 1
        tally = ", ".join(f"{n} {r}" for r, n in sorted(self.counts.items()))
        warnings.warn(f"skipped {what}; {self.total} skipped so far in {self.source}: {tally}", stacklevel=2)


class InvalidRecord(ValueError):
    """One unreadable record: a short `reason` (the category it is counted under) and a `detail`."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


RECORD_KEYS = frozenset({"task", "segments", "meta"})


def document_from_record(record: Any, load: Callable[[str], torch.Tensor]) -> Document:
    """A Document from a JSON record `{"task": ..., "segments": [{"text": ...} | {"image": ref}], "meta": {...}}`.

    `load(ref)` turns an image reference into (3, H, W) pixels and may raise BadImage.
    `task` defaults to "text" without images and "story" with them. Raises InvalidRecord.
    """
    if not isinstance(record, dict):
        raise InvalidRecord("invalid document", f"expected a JSON object, got {type(record).__name__}")
    unknown = set(record) - RECORD_KEYS
    if unknown:
        raise InvalidRecord("unknown key", f"{sorted(unknown)}; allowed: {sorted(RECORD_KEYS)}")
    raw = record.get("segments")
    if not isinstance(raw, list) or not raw:
        raise InvalidRecord("invalid document", "'segments' must be a non-empty list")
    segments: list[Text | Image] = []
    for i, seg in enumerate(raw):
        if not isinstance(seg, dict) or len(seg) != 1 or not set(seg) <= {"text", "image"}:
            raise InvalidRecord(
                "invalid segment",
                f"segment {i} must be {{'text': str}} or {{'image': ref}}, got {json.dumps(seg)[:80]}",
            )
        value = next(iter(seg.values()))
        if not isinstance(value, str):
            raise InvalidRecord(
                "invalid segment", f"segment {i}: the value of {next(iter(seg))!r} must be a string"
            )
        if "text" in seg:
            segments.append(Text(value))
            continue
        try:
            segments.append(Image(pixels=load(value)))
        except BadImage as e:
            raise InvalidRecord("bad image", str(e)) from None
    has_image = any(isinstance(s, Image) for s in segments)
    task = record.get("task", "story" if has_image else "text")
    if task not in TASKS:
        raise InvalidRecord("unknown task", f"{task!r}; expected one of {', '.join(TASKS)}")
    meta = record.get("meta", {})
    if not isinstance(meta, dict):
        raise InvalidRecord("invalid document", "'meta' must be a JSON object")
    return Document(segments=segments, task=task, meta=dict(meta))
