"""Handwritten digits: scikit-learn's bundled 8x8 `load_digits`, offline, as t2i and caption documents.

Each 8x8 image (ink 0..16) is drawn as a dark gray digit on a white background, like the
shapes world, and resized to `size` with bilinear interpolation. Texts are `a handwritten
seven`. The train/val split is a fixed permutation (independent of `seed`), so every run
and every seed sees the same validation images.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits

from .document import Document, Image, Text
from .sources import Source, shard_count

DIGIT_NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
SPLIT_SEED = 1234  # fixes the train/val permutation for every run
DIGIT_TASKS = ("t2i", "caption")


def digit_text(label: int) -> str:
    return f"a handwritten {DIGIT_NAMES[label]}"


class DigitsSource(Source):
    """1797 handwritten digits as `t2i` ([Text, Image]) and `caption` ([Image, Text]) documents.

    Args:
        size: Image side in pixels.
        tasks: Ratios over "t2i" and "caption" (None: equal).
        seed: Seeds the order of the images and the task draws.
        length: Documents per epoch over all workers, drawn in shuffled passes over the split
            (None: one pass, i.e. the size of the split).
        split: "train", "val" or "all".
        val_fraction: Share of the images in "val" (a fixed choice, the same for every seed).
    """

    def __init__(
        self,
        size: int = 32,
        tasks: dict[str, float] | None = None,
        seed: int = 0,
        length: int | None = None,
        split: str = "train",
        val_fraction: float = 0.1,
    ) -> None:
        super().__init__(seed=seed, length=length)
        if split not in ("train", "val", "all"):
            raise ValueError(f"split={split!r} must be 'train', 'val' or 'all'")
        if not 0 < val_fraction < 1:
            raise ValueError(f"val_fraction={val_fraction} must be between 0 and 1")
        tasks = {t: 1.0 for t in DIGIT_TASKS} if tasks is None else dict(tasks)
        unknown = set(tasks) - set(DIGIT_TASKS)
        if unknown:
            raise ValueError(
                f"DigitsSource has no task(s) {sorted(unknown)}; use ratios over t2i and caption"
            )
        if any(r < 0 for r in tasks.values()) or sum(tasks.values()) <= 0:
            raise ValueError(f"tasks={tasks} needs non-negative ratios with a positive sum")
        self.size = size
        self.split = split
        self.tasks = [t for t in DIGIT_TASKS if tasks.get(t, 0) > 0]
        weights = np.array([tasks[t] for t in self.tasks], dtype=np.float64)
        self.p_tasks = weights / weights.sum()

        digits = load_digits()
        order = np.random.default_rng(SPLIT_SEED).permutation(len(digits.target))
        n_val = round(val_fraction * len(order))
        keep = {"val": order[:n_val], "train": order[n_val:], "all": np.arange(len(order))}[split]
        ink = torch.from_numpy(digits.images[keep] / 16.0).float()[:, None]  # (N, 1, 8, 8) in [0, 1]
        ink = F.interpolate(ink, size=(size, size), mode="bilinear", align_corners=False)  # (N, 1, S, S)
        self.pixels = (1.0 - ink.clamp(0, 1) * 0.9).expand(-1, 3, -1, -1).contiguous()  # (N, 3, S, S)
        self.labels = [int(t) for t in digits.target[keep]]
        if length is None:
            self.length = len(self.labels)


    @property
    def image_size(self) -> int:
        """Side of the images this source yields, in pixels."""
        return self.size
    def __repr__(self) -> str:
        return f"DigitsSource(split={self.split!r}, n={len(self.labels)}, size={self.size})"

    def document(self, index: int, task: str) -> Document:
        label = self.labels[index]
        image, text = Image(pixels=self.pixels[index].clone()), Text(digit_text(label))
        segments = [text, image] if task == "t2i" else [image, text]
        return Document(segments=segments, task=task, meta={"label": label, "index": index})

    def documents(self, shard: int, num_shards: int) -> Iterator[Document]:
        rng = self.rng(shard)
        count = shard_count(self.length, shard, num_shards)
        n = len(self.labels)
        yielded, passes = 0, 0
        while yielded < count:
            # every shard permutes with the same generator, then takes its own slice
            order = np.random.default_rng([self.seed, self.epoch, passes]).permutation(n)[shard::num_shards]
            if len(order) == 0:
                return
            for index in order:
                if count is not None and yielded >= count:
                    return
                task = self.tasks[int(rng.choice(len(self.tasks), p=self.p_tasks))]
                yield self.document(int(index), task)
                yielded += 1
            passes += 1
