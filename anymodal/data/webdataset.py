"""Documents from WebDataset tar shards (read with the `webdataset` package).

A sample is the tar members that share a key (`000.png`, `000.txt`, ...). Two layouts:

- an image (`png`, `jpg`, `jpeg` or `webp`) and a `txt`: an image-caption pair, yielded as a
  `t2i` ([Text, Image]) or `caption` ([Image, Text]) document, drawn with `tasks` ratios;
- a `json` record like a JSONL manifest line whose image segments name members of the
  same sample: `{"task": "edit", "segments": [{"image": "src.png"}, {"text": "..."},
  {"image": "tgt.png"}]}` for members `000.src.png` and `000.tgt.png`.

Images are decoded by `load_image` (size, pixel and format limits), never by webdataset's
decoders. A bad sample, or an unreadable shard, is skipped with a counted warning, or
raises `BadRecord` under `strict=True`. Shards are split across ranks and DataLoader
workers when there are at least as many shards as readers; otherwise every reader reads
every shard and keeps every n-th sample.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch
import webdataset as wds
from webdataset.shardlists import expand_urls
from webdataset.tariterators import group_by_keys, tar_file_expander

from .document import Document, Image, Text
from .images import MAX_PIXELS, BadImage, load_image
from .sources import InvalidRecord, RecordErrors, Source, document_from_record, repeat_passes

IMAGE_KEYS = ("png", "jpg", "jpeg", "webp")
PAIR_TASKS = ("t2i", "caption")


def _open_shards(urls: list[str], handler: Callable[[Exception], bool]) -> Iterator[dict[str, Any]]:
    """{"url", "stream"} per shard, each stream closed once the next shard is asked for."""
    for url in urls:
        try:
            stream = wds.gopen(url)
        except (
            Exception
        ) as exn:  # any failure to open a shard goes to the handler, like webdataset's own opener
            exn.args = exn.args + (url,)
            if handler(exn):
                continue
            return
        try:
            yield {"url": url, "stream": stream}
        finally:
            stream.close()


class WebDatasetSource(Source):
    """Documents from tar shards (see the module docstring for the sample layouts).

    Args:
        urls: A shard path or URL, a brace pattern (`data/shard-{000..009}.tar`), or a list of them.
        image_size: Side of the square pixels every image is loaded at.
        strict: Raise on the first bad sample instead of skipping it with a counted warning.
        shuffle: Size of the sample shuffle buffer (0: keep the shard order); > 0 also shuffles the shards.
        seed: Seeds the shuffles and the task draws.
        max_pixels: Refuse images whose header claims more pixels than this.
        tasks: Ratios over t2i and caption for image-caption pairs (None: equal).
        loop: Repeat the shards forever.
    """

    def __init__(
        self,
        urls: str | list[str],
        image_size: int = 32,
        strict: bool = False,
        shuffle: int = 0,
        seed: int = 0,
        max_pixels: int = MAX_PIXELS,
        tasks: dict[str, float] | None = None,
        loop: bool = False,
    ) -> None:
        super().__init__(seed=seed)
        self.urls = (
            expand_urls(urls) if isinstance(urls, str) else [u for url in urls for u in expand_urls(url)]
        )
        if not self.urls:
            raise ValueError(f"urls={urls!r} names no shard; give a path, a brace pattern or a list")
        if shuffle < 0:
            raise ValueError(f"shuffle={shuffle} must be a buffer size >= 0")
        tasks = {t: 1.0 for t in PAIR_TASKS} if tasks is None else dict(tasks)
        if set(tasks) - set(PAIR_TASKS) or any(r < 0 for r in tasks.values()) or sum(tasks.values()) <= 0:
            raise ValueError(
                f"tasks={tasks} must give non-negative ratios over t2i and caption with a positive sum"
            )
        self.image_size = image_size
        self.strict = strict
        self.shuffle = shuffle
        self.max_pixels = max_pixels
        self.loop = loop
        self.pair_tasks = [t for t in PAIR_TASKS if tasks.get(t, 0) > 0]
        weights = np.array([tasks[t] for t in self.pair_tasks], dtype=np.float64)
        self.p_tasks = weights / weights.sum()
        self.errors = RecordErrors(self._name(), strict)

    def _name(self) -> str:
        return self.urls[0] if len(self.urls) == 1 else f"{self.urls[0]} (+{len(self.urls) - 1} shards)"

    def _samples(self, shard: int, num_shards: int, passes: int) -> Iterator[dict[str, Any]]:
        """Raw samples (dicts of member bytes) of this reader's share of one pass."""
        urls = list(self.urls)
        if self.shuffle:
            random.Random(f"{self.seed}/{self.epoch}/{passes}").shuffle(urls)  # same order on every reader
        split_shards = len(urls) >= num_shards
        if split_shards:
            urls = urls[shard::num_shards]

        def handler(exn: Exception) -> bool:
            # webdataset appends the shard url (and stream) to the exception's args
            where = next(
                (a for a in reversed(exn.args) if isinstance(a, str) and a in self.urls), self._name()
            )
            self.errors.skip(
                where, "unreadable shard", f"{type(exn).__name__}: {exn.args[0] if exn.args else exn}"
            )
            return True

        files = tar_file_expander(_open_shards(urls, handler), handler=handler)
        samples = group_by_keys(files, handler=handler)
        if not split_shards:
            samples = (s for i, s in enumerate(samples) if i % num_shards == shard)
        if self.shuffle:
            rng = random.Random(f"{self.seed}/{self.epoch}/{passes}/{shard}")
            samples = wds.shuffle(bufsize=self.shuffle, initial=self.shuffle, rng=rng)(samples)
        return samples

    def documents(self, shard: int, num_shards: int) -> Iterator[Document]:
        self.errors = RecordErrors(self._name(), self.strict)
        rng = self.rng(shard)

        def one_pass(passes: int) -> Iterator[Document]:
            for sample in self._samples(shard, num_shards, passes):
                record = f"{sample.get('__url__', '?')}:{sample.get('__key__', '?')}"
                try:
                    doc = self.parse(sample, rng)
                except InvalidRecord as e:
                    self.errors.skip(record, e.reason, e.detail)
                    continue
                doc.meta.update(source=sample.get("__url__"), key=sample.get("__key__"))
                yield doc

        return repeat_passes(one_pass, self.loop, f"shards {self._name()} hold no readable sample for this "
                             "worker; fix the shards or use fewer DataLoader workers")

    def _load(self, data: bytes) -> torch.Tensor:
        return load_image(data, self.image_size, max_pixels=self.max_pixels)  # (3, image_size, image_size)

    def parse(self, sample: dict[str, Any], rng: np.random.Generator) -> Document:
        """One raw sample as a Document; raises InvalidRecord with a reason."""
        if "json" in sample:
            try:
                record = json.loads(sample["json"])
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise InvalidRecord("invalid json", str(e)) from None

            def load(ref: str) -> torch.Tensor:
                if ref not in sample or ref.startswith("__"):
                    members = sorted(k for k in sample if not k.startswith("__"))
                    raise InvalidRecord(
                        "missing member", f"image {ref!r} is not in the sample; members: {members}"
                    )
                return self._load(sample[ref])

            return document_from_record(record, load)
        image_key = next((k for k in IMAGE_KEYS if k in sample), None)
        if image_key is None or "txt" not in sample:
            members = sorted(k for k in sample if not k.startswith("__"))
            raise InvalidRecord(
                "unknown layout",
                f"members {members}; expected an image ({', '.join(IMAGE_KEYS)}) with a txt, or a json",
            )
        try:
            text = sample["txt"].decode("utf-8").strip()
        except UnicodeDecodeError as e:
            raise InvalidRecord("invalid text", f"txt is not UTF-8 ({e})") from None
        try:
            image = Image(pixels=self._load(sample[image_key]))  # (3, image_size, image_size)
        except BadImage as e:
            raise InvalidRecord("bad image", str(e)) from None
        task = self.pair_tasks[int(rng.choice(len(self.pair_tasks), p=self.p_tasks))]
        segments = [Text(text), image] if task == "t2i" else [image, Text(text)]
        return Document(segments=segments, task=task)
