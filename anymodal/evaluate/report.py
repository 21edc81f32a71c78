"""The demo's report: one self-contained HTML page (images inline) and a PNG overview for the README."""

from __future__ import annotations

import base64
import html
import io
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image as PILImage
from PIL import ImageDraw

from anymodal.evaluate.shapes import METRICS


def _png_uri(image: np.ndarray, scale: int = 4) -> str:
    im = PILImage.fromarray(image)
    im = im.resize((im.width * scale, im.height * scale), PILImage.NEAREST)
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _img(image: np.ndarray, title: str = "") -> str:
    return f'<img src="{_png_uri(image)}" title="{html.escape(title)}">'


def _mark(ok: bool) -> str:
    return '<span class="ok">exact</span>' if ok else '<span class="bad">wrong</span>'


def _fmt(v: Any) -> str:
    return "-" if v is None or v != v else f"{v:.3f}"


def metric_table(results: dict[str, Any]) -> str:
    """Rows: metrics; columns: each path's seen / held-out scores."""
    head = "".join(f"<th>{html.escape(p)} seen</th><th>{html.escape(p)} held-out</th>" for p in results)
    rows = []
    for m in METRICS:
        cells = "".join(f"<td>{_fmt(r.scores['seen'].get(m))}</td><td>{_fmt(r.scores['heldout'].get(m))}</td>"
                        for r in results.values())
        rows.append(f"<tr><th>{m}</th>{cells}</tr>")
    return f"<table><tr><th>metric</th>{head}</tr>{''.join(rows)}</table>"


def task_samples(task: str, samples: list[dict[str, Any]]) -> str:
    cards = []
    for s in samples:
        if task == "t2i":
            body = f"{_img(s['image'])}<p>{html.escape(s['prompt'])}</p>"
        elif task == "edit":
            body = (f"{_img(s['image'])} &rarr; {_img(s['output_image'])}"
                    f"<p>{html.escape(s['instruction'])}</p>")
        elif task == "caption":
            body = (f"{_img(s['image'])}<p><b>{html.escape(s['output'])}</b></p>"
                    f"<p class='truth'>truth: {html.escape(s['truth'])}</p>")
        elif task == "vqa":
            body = (f"{_img(s['image'])}<p>{html.escape(s['question'])} <b>{html.escape(s['output'])}</b></p>"
                    f"<p class='truth'>truth: {html.escape(s['truth'])}</p>")
        else:  # story
            parts = [f"<p>{html.escape(t)}</p>" if t else _img(im) for t, im in s["steps"]]
            body = "<div class='story'>" + "".join(parts) + "</div>"
        cards.append(f"<div class='card'>{body}{_mark(s['exact'])}</div>")
    return "<div class='cards'>" + "".join(cards) + "</div>"


STYLE = """body{font-family:system-ui,sans-serif;margin:2em;max-width:78em}table{border-collapse:collapse;margin:1em 0}
td,th{border:1px solid #ccc;padding:.25em .6em;text-align:right}th:first-child{text-align:left}
img{image-rendering:pixelated;border:1px solid #ddd}.cards{display:flex;flex-wrap:wrap;gap:.8em}
.card{border:1px solid #ddd;padding:.5em;width:16em;font-size:.85em}.card p{margin:.3em 0}
.ok{color:#080;font-weight:bold}.bad{color:#b00;font-weight:bold}.truth{color:#666}
.story{display:flex;flex-wrap:wrap;align-items:center;gap:.3em}.story p{width:100%}"""


def write_report(path: str | Path, results: dict[str, Any], tokenizers: dict[str, dict[str, Any]],
                 grids: dict[str, Path], timings: dict[str, float], machine: str) -> Path:
    """report.html with the metric table, tokenizer metrics and grids, and samples of every task per path."""
    parts = [f"<!doctype html><meta charset='utf-8'><title>anymodal demo</title><style>{STYLE}</style>",
             "<h1>anymodal demo: the shapes world</h1>",
             f"<p>Trained and evaluated by <code>make demo</code> on {html.escape(machine)}. "
             "Scores come from the shapes-world checker (exact by construction) on scenes the models never saw "
             "during training; held-out rows use (color, shape) pairs withheld from training.</p>",
             "<h2>Metrics</h2>", metric_table(results)]
    if timings:
        parts.append("<h2>Time</h2><table>" + "".join(
            f"<tr><th>{html.escape(k)}</th><td>{v:.0f} s</td></tr>" for k, v in timings.items()) + "</table>")
    if tokenizers:
        keys = sorted({k for m in tokenizers.values() for k in m})
        parts.append("<h2>Image tokenizers</h2><table><tr><th>tokenizer</th>" +
                     "".join(f"<th>{html.escape(k)}</th>" for k in keys) + "</tr>" + "".join(
                         f"<tr><th>{html.escape(n)}</th>" + "".join(
                             f"<td>{_fmt(m.get(k)) if isinstance(m.get(k), float) else m.get(k, '-')}</td>"
                             for k in keys) + "</tr>" for n, m in tokenizers.items()) + "</table>")
        for name, grid in grids.items():
            if grid and Path(grid).is_file():
                arr = np.asarray(PILImage.open(grid).convert("RGB"))
                parts.append(f"<p>{html.escape(name)}: originals (top) and reconstructions (bottom)</p>"
                             f"<img src='{_png_uri(arr, 1)}'>")
    for path_name, r in results.items():
        parts.append(f"<h2>{html.escape(path_name)}</h2>")
        for task, samples in r.samples.items():
            if samples:
                parts.append(f"<h3>{task}</h3>" + task_samples(task, samples))
    path = Path(path)
    path.write_text("\n".join(parts))
    return path


def write_overview(path: str | Path, results: dict[str, Any], per_row: int = 6, scale: int = 3) -> Path:
    """A PNG for the README: per path, t2i samples with their prompts' first words, then edits."""
    rows: list[tuple[str, list[np.ndarray]]] = []
    for name, r in results.items():
        t2i = [s["image"] for s in r.samples.get("t2i", [])][:per_row]
        if t2i:
            rows.append((f"{name}: text to image", t2i))
        edits = [np.concatenate([s["image"], s["output_image"]], 1) for s in r.samples.get("edit", [])][:per_row // 2]
        if edits:
            rows.append((f"{name}: edit (source | result)", edits))
    cell = 32 * scale
    width = per_row * (cell + 8) + 8
    canvas = PILImage.new("RGB", (width, len(rows) * (cell + 28) + 8), "white")
    draw = ImageDraw.Draw(canvas)
    y = 8
    for title, images in rows:
        draw.text((8, y), title, fill=(0, 0, 0))
        x = 8
        for im in images:
            p = PILImage.fromarray(im).resize((im.shape[1] * scale, im.shape[0] * scale), PILImage.NEAREST)
            canvas.paste(p, (x, y + 16))
            x += p.width + 8
        y += cell + 28
    path = Path(path)
    canvas.save(path)
    return path
