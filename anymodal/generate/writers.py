"""Files that sampling writes: numbered PNGs with an index.jsonl, and stories as HTML and Markdown.

The images come first and the index (or the story's pages) last, each written atomically, so index.jsonl
never names a file that is not there. `claim_output` refuses a folder that already holds files, unless told
to remove an earlier run's outputs, so two runs never mix in one folder.
"""

from __future__ import annotations

import html
import json
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image as PILImage

from anymodal.atomic import write_text

OUTPUT_FILES = re.compile(r"(\d{4,}\.png|index\.jsonl|story_\d{2,}\.png|story\.html|story\.md)")
"""Names of the files `write_images` and `write_story` write (what `claim_output(overwrite=True)` removes)."""


def claim_output(out: str | Path, overwrite: bool = False) -> list[Path]:
    """Make sure sampling may write into `out` (call it before any work); returns an earlier run's outputs there.

    A missing or empty folder is fine. One that holds files is refused in one sentence, unless `overwrite`: then
    the outputs an earlier run wrote there (OUTPUT_FILES) are returned, for the caller to remove just before it
    writes (so a failed run leaves them); other files are left."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"output folder {out} is a file; choose another --out")
    entries = sorted(out.iterdir()) if out.is_dir() else []
    if not entries:
        return []
    if not overwrite:
        shown = ", ".join(e.name for e in entries[:3]) + (", ..." if len(entries) > 3 else "")
        raise ValueError(f"output folder {out} is not empty (it holds {shown}); pass --overwrite to replace an "
                         "earlier run's outputs, or choose another --out")
    return [e for e in entries if e.is_file() and OUTPUT_FILES.fullmatch(e.name)]


def save_png(image: np.ndarray, path: str | Path, scale: int = 1) -> None:
    """Write an (H, W, 3) uint8 image, optionally enlarged by nearest-neighbour `scale`."""
    im = PILImage.fromarray(image)
    if scale > 1:
        im = im.resize((im.width * scale, im.height * scale), PILImage.NEAREST)
    im.save(path)


def write_images(out: str | Path, images: Sequence[np.ndarray], records: Iterable[dict[str, Any]]) -> Path:
    """DIR/0000.png, ... and then DIR/index.jsonl (one line per image: its record plus `file`), atomically."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    lines = []
    for i, (image, record) in enumerate(zip(images, records)):
        name = f"{i:04d}.png"
        save_png(image, out / name)
        lines.append(json.dumps({**record, "file": name}) + "\n")
    return write_text(out / "index.jsonl", "".join(lines))


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
    write_text(out / "story.md", f"# {title}\n\n" + "\n\n".join(parts_md) + "\n")
    write_text(out / "story.html", page)  # last: the page names every image
    return out / "story.html", out / "story.md"
