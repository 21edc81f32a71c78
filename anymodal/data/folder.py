"""Image-caption pairs from a folder of images and its `captions.jsonl`.

    photos/
      captions.jsonl      {"image": "cat.jpg", "caption": "a cat on a sofa"}   (one line per image)
      cat.jpg
      ...

Each line becomes a `t2i` ([Text, Image]) or `caption` ([Image, Text]) document; which one is drawn
with `tasks` ratios from the seed and the line number, so a line always gives the same document.
Image paths are relative to the folder. Reading, sharding, shuffling, looping and bad lines behave as
in `JsonlSource` (a bad line is skipped with a counted warning, or raises under `strict=True`).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from .document import Document
from .images import MAX_PIXELS, load_image
from .jsonl import JsonlSource
from .sources import InvalidRecord, document_from_record

CAPTIONS = "captions.jsonl"
PAIR_TASKS = ("t2i", "caption")


class CaptionedFolder(JsonlSource):
    """A folder of images with a `captions.jsonl` (see the module docstring).

    Args:
        folder: The folder holding the images and captions.jsonl.
        image_size: Side of the square pixels every image is loaded at (center-cropped).
        tasks: Ratios over t2i and caption (None: equal).
        strict: Raise on the first bad line instead of skipping it with a counted warning.
        max_pixels: Refuse images whose header claims more pixels than this.
        loop: Repeat the folder forever.
        shuffle: Visit the lines in a random order drawn from `seed`.
        seed: Seeds the shuffle and the task of each line.
    """

    def __init__(
        self,
        folder: str | Path,
        image_size: int = 64,
        tasks: dict[str, float] | None = None,
        strict: bool = False,
        max_pixels: int = MAX_PIXELS,
        loop: bool = False,
        shuffle: bool = False,
        seed: int = 0,
    ) -> None:
        folder = Path(folder)
        if not (folder / CAPTIONS).is_file():
            raise FileNotFoundError(f"{folder} has no {CAPTIONS}; write one line per image: "
                                    '{"image": "cat.jpg", "caption": "a cat on a sofa"}')
        super().__init__(folder / CAPTIONS, image_size=image_size, strict=strict, max_pixels=max_pixels,
                         loop=loop, shuffle=shuffle, seed=seed)
        tasks = {t: 1.0 for t in PAIR_TASKS} if tasks is None else dict(tasks)
        if set(tasks) - set(PAIR_TASKS) or any(r < 0 for r in tasks.values()) or sum(tasks.values()) <= 0:
            raise ValueError(f"tasks={tasks} must give non-negative ratios over t2i and caption with a positive sum")
        self.pair_tasks = [t for t in PAIR_TASKS if tasks.get(t, 0) > 0]
        weights = np.array([tasks[t] for t in self.pair_tasks], dtype=np.float64)
        self.p_tasks = weights / weights.sum()

    def parse(self, line: str, number: int = 0) -> Document:
        """One captions line as a t2i or caption Document; raises InvalidRecord with a reason."""
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise InvalidRecord("invalid json", str(e)) from None
        if not isinstance(record, dict) or set(record) != {"image", "caption"} or not all(
                isinstance(v, str) for v in record.values()):
            raise InvalidRecord("invalid line", f'expected {{"image": str, "caption": str}}, got {line.strip()[:80]}')
        rng = np.random.default_rng([self.seed, number])
        task = self.pair_tasks[int(rng.choice(len(self.pair_tasks), p=self.p_tasks))]
        text, image = {"text": record["caption"]}, {"image": record["image"]}
        segments = [text, image] if task == "t2i" else [image, text]

        def load(ref: str) -> torch.Tensor:
            return load_image(self.path.parent / ref, self.image_size, max_pixels=self.max_pixels)

        doc = document_from_record({"task": task, "segments": segments}, load)
        doc.meta.update(source=str(self.path), line=number, image=record["image"])
        return doc
