"""Files that sampling writes: numbered PNGs with an index.jsonl, and stories as HTML and Markdown."""

from __future__ import annotations

import html
import json
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image as PILImage


def save_png(image: np.ndarray, path: str | Path, scale: int = 1) -> None:
    """Write an (H, W, 3) uint8 image, optionally enlarged by nearest-neighbour `scale`."""
    im = PILImage.fromarray(image)
    if scale > 1:
        im = im.resize((im.width * scale, im.height * scale), PILImage.NEAREST)
    im.save(path)


def write_images(out: str | Path, images: Sequence[np.ndarray], records: Iterable[dict[str, Any]]) -> Path:
    """DIR/0000.png, ... and DIR/index.jsonl (one line per image: its record plus `file`)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "index.jsonl", "w") as f:
        for i, (image, record) in enumerate(zip(images, records)):
            name = f"{i:04d}.png"
            save_png(image, out / name)
            f.write(json.dumps({**record, "file": name}) + "\n")
    return out / "index.jsonl"


def write_story(out: str | Path, steps: Sequence[Any], title: str, scale: int = 4) -> tuple[Path, Path]:
    """DIR/story.html and DIR/story.md with the story's images as DIR/story_NN.png."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    parts_html, parts_md = [], []
    k = 0
    for s in steps:
        if s.image is not None:
            name = f"story_{k:02d}.png"
            save_png(s.image, out / name, scale)
            parts_html.append(f'<img src="{name}" alt="image {k}">')
            parts_md.append(f"![image {k}]({name})")
            k += 1
        elif s.text:
            parts_html.append(f"<p>{html.escape(s.text)}</p>")
            parts_md.append(s.text)
    page = (f"<!doctype html><meta charset='utf-8'><title>{html.escape(title)}</title>"
            "<style>body{font-family:sans-serif;max-width:40em;margin:2em auto}"
            "img{image-rendering:pixelated;border:1px solid #ccc;margin:.3em 0}</style>"
            f"<h1>{html.escape(title)}</h1>" + "\n".join(parts_html))
    (out / "story.html").write_text(page)
    (out / "story.md").write_text(f"# {title}\n\n" + "\n\n".join(parts_md) + "\n")
    return out / "story.html", out / "story.md"
