"""Documents: the one shape every data source yields.

A Document is an ordered list of segments, each `Text` or `Image`, plus a task tag.
Nothing downstream of a source knows where a Document came from.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, Union

import torch

TASKS = ("t2i", "caption", "vqa", "edit", "story", "text")
Task = Literal["t2i", "caption", "vqa", "edit", "story", "text"]


@dataclass
class Text:
    """A run of text; `ids` are its token ids when a source already holds them (encoded shards)."""

    text: str
    ids: list[int] | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.text, str):
            raise TypeError(f"Text segment needs a str, got {type(self.text).__name__}")


@dataclass
class Image:
    """One image, held as pixels, discrete codes or continuous latents (at least one).

    pixels:  (3, H, W) float32 in [0, 1]
    codes:   (h, w) int64 codebook indices from a VQ-VAE
    latents: (C, h, w) float32 VAE latents, already multiplied by the VAE's scale factor
    """

    pixels: torch.Tensor | None = None
    codes: torch.Tensor | None = None
    latents: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if self.pixels is None and self.codes is None and self.latents is None:
            raise ValueError("Image segment needs pixels, codes or latents")
        if self.pixels is not None:
            p = self.pixels
            if p.ndim != 3 or p.shape[0] != 3:
                raise ValueError(f"Image.pixels must be (3, H, W), got {tuple(p.shape)}")
            if not p.is_floating_point():
                raise ValueError(f"Image.pixels must be float in [0, 1], got dtype {p.dtype}")
        if self.codes is not None and self.codes.ndim != 2:
            raise ValueError(f"Image.codes must be (h, w), got {tuple(self.codes.shape)}")
        if self.latents is not None and self.latents.ndim != 3:
            raise ValueError(f"Image.latents must be (C, h, w), got {tuple(self.latents.shape)}")


Segment = Union[Text, Image]


@dataclass
class Document:
    """An ordered list of Text and Image segments with a task tag.

    meta carries source-specific facts that evaluation may use (e.g. the shapes-world
    scenes behind each image, the held-out flag); models never read it.
    """

    segments: list[Segment]
    task: Task = "text"
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise ValueError(f"unknown task {self.task!r}; expected one of {', '.join(TASKS)}")
        if not self.segments:
            raise ValueError("a Document needs at least one segment")
        for s in self.segments:
            if not isinstance(s, (Text, Image)):
                raise TypeError(f"Document segments must be Text or Image, got {type(s).__name__}")

    @property
    def images(self) -> list[Image]:
        return [s for s in self.segments if isinstance(s, Image)]

    @property
    def texts(self) -> list[Text]:
        return [s for s in self.segments if isinstance(s, Text)]
