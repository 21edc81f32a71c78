"""Documents from a JSONL manifest, one document per line.

    {"task": "t2i", "segments": [{"text": "a cat"}, {"image": "images/cat.png"}]}
    {"task": "edit", "segments": [{"image": "a.png"}, {"text": "make it red"}, {"image": "b.png"}]}
    {"task": "story", "segments": [{"text": "..."}, {"image": "1.png"}, {"text": "..."}, {"image": "2.png"}]}

Keys: `segments` (required; each exactly one of `text` or `image`), `task` (optional;
default `text` for a document without images, `story` otherwise) and `meta` (optional
dict, passed through). Image paths are relative to the manifest's folder or absolute.
Blank lines are ignored. A bad line is skipped with a counted warning, or raises
`BadRecord` naming the file and line under `strict=True`.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import torch

from .document import Document
from .images import MAX_PIXELS, load_image
from .sources import InvalidRecord, RecordErrors, Source, document_from_record, repeat_passes


class JsonlSource(Source):
    """A JSONL manifest of documents (see the module docstring for the format).

    Args:
        path: The manifest file.
        image_size: Side of the square pixels every image is loaded at.
        strict: Raise on the first bad line instead of skipping it with a counted warning.
        max_pixels: Refuse images whose header claims more pixels than this.
        loop: Repeat the manifest forever (each pass reshuffled when shuffle is on).
        shuffle: Visit the lines in a random order drawn from `seed` (the manifest is read into memory).
        seed: Seeds the shuffle.
    """

    def __init__(
        self,
        path: str | Path,
        image_size: int = 32,
        strict: bool = False,
        max_pixels: int = MAX_PIXELS,
        loop: bool = False,
        shuffle: bool = False,
        seed: int = 0,
    ) -> None:
        super().__init__(seed=seed)
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"JSONL manifest {self.path} does not exist; check the path")
        self.image_size = image_size
        self.strict = strict
        self.max_pixels = max_pixels
        self.loop = loop
        self.shuffle = shuffle
        self.errors = RecordErrors(str(self.path), strict)

    def _lines(self, shard: int, num_shards: int, passes: int) -> Iterator[tuple[int, str]]:
        """(line number from 1, text) of this shard's lines, in file order or shuffled."""
        with self.path.open(encoding="utf-8", errors="replace") as f:
            numbered = ((n, line) for n, line in enumerate(f, start=1) if (n - 1) % num_shards == shard)
            if not self.shuffle:
                yield from numbered
                return
            lines = list(numbered)
        for i in self.rng(shard, passes).permutation(len(lines)):
            yield lines[i]

    def documents(self, shard: int, num_shards: int) -> Iterator[Document]:
        self.errors = RecordErrors(str(self.path), self.strict)
        bad: set[int] = set()  # lines already reported, skipped quietly on later passes

        def one_pass(passes: int) -> Iterator[Document]:
            for number, line in self._lines(shard, num_shards, passes):
                if not line.strip() or number in bad:
                    continue
                try:
                    doc = self.parse(line, number)
                except InvalidRecord as e:
                    bad.add(number)
                    self.errors.skip(f"{self.path}:{number}", e.reason, e.detail)
                    continue
                yield doc

        return repeat_passes(one_pass, self.loop, f"JSONL manifest {self.path} holds no readable document for "
                             "this worker; fix its lines or use fewer DataLoader workers")

    def parse(self, line: str, number: int = 0) -> Document:
        """One manifest line as a Document; raises InvalidRecord with a reason."""
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise InvalidRecord("invalid json", str(e)) from None

        def load(ref: str) -> torch.Tensor:
            return load_image(self.path.parent / ref, self.image_size, max_pixels=self.max_pixels)

        doc = document_from_record(record, load)
        doc.meta.update(source=str(self.path), line=number)
        return doc
