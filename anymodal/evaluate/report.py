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

from anymodal.evaluate.shapes import table_rows


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
    for m, kind in table_rows(*(r.scores for r in results.values())):  # each kind of edit under edit_exact
        cells = "".join(f"<td>{_fmt(r.scores['seen'].get(m))}</td><td>{_fmt(r.scores['heldout'].get(m))}</td>"
                        for r in results.values())
        name = f"<span class='kind'>edit: {kind}</span>" if kind else m
        rows.append(f"<tr><th>{name}</th>{cells}</tr>")
    return f"<table><tr><th>metric</th>{head}</tr>{''.join(rows)}</table>"


def _read(sample: dict[str, Any]) -> str:
    """What the checker read in a wrong image, under it."""
    read = sample.get("read")
    return f"<p class='truth'>checker read: {html.escape(read)}</p>" if read else ""


def task_samples(task: str, samples: list[dict[str, Any]]) -> str:
    cards = []
    for s in samples:
        if task == "t2i":
            body = f"{_img(s['image'])}<p>{html.escape(s['prompt'])}</p>{_read(s)}"
        elif task == "edit":
            body = (f"{_img(s['image'])} &rarr; {_img(s['output_image'])}"
                    f"<p>{html.escape(s['instruction'])}</p>{_read(s)}")
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
.story{display:flex;flex-wrap:wrap;align-items:center;gap:.3em}.story p{width:100%}
.kind{font-weight:normal;padding-left:1.2em;color:#444}"""


def typed_table(results: dict[str, Any], typed: dict[str, Any]) -> str:
    """Rows: the metrics of prompted tasks; columns: each path's seen scores with canonical and typed prompts."""
    head = "".join(f"<th>{html.escape(p)} canonical</th><th>{html.escape(p)} typed</th>" for p in typed)
    rows = []
    for m in ("t2i_exact", "edit_exact", "vqa_acc", "story_exact"):
        cells = "".join(f"<td>{_fmt(results[p].scores['seen'].get(m))}</td><td>{_fmt(t.scores['seen'].get(m))}</td>"
                        for p, t in typed.items())
        rows.append(f"<tr><th>{m}</th>{cells}</tr>")
    return f"<table><tr><th>metric</th>{head}</tr>{''.join(rows)}</table>"


def write_report(path: str | Path, results: dict[str, Any], tokenizers: dict[str, dict[str, Any]],
                 grids: dict[str, Path], timings: dict[str, float], machine: str,
                 typed: dict[str, Any] | None = None) -> Path:
    """report.html with the metric table, tokenizer metrics and grids, and samples of every task per path;
    `typed`: each path's scores with prompts as people type them (`BenchSettings.typed`)."""
    parts = [f"<!doctype html><meta charset='utf-8'><title>anymodal demo</title><style>{STYLE}</style>",
             "<h1>anymodal demo: the shapes world</h1>",
             f"<p>Trained and evaluated by <code>make demo</code> on {html.escape(machine)}. "
             "Scores come from the shapes-world checker (exact by construction) on scenes the models never saw "
             "during training; held-out rows use (color, shape) pairs withheld from training.</p>",
             "<h2>Metrics</h2>", metric_table(results)]
    if typed:
        parts += ["<h2>Prompts as people type them</h2><p>The same tasks with every prompt, instruction and question "
                  "in other casing, with extra spaces, or a final period dropped or added (seen compositions).</p>",
                  typed_table(results, typed)]
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


def _wrap(text: str, width: int) -> list[str]:
    """Greedy word wrap to lines of at most `width` characters."""
    lines: list[str] = []
    for word in text.split():
        if lines and len(lines[-1]) + 1 + len(word) <= width:
            lines[-1] += " " + word
        else:
            lines.append(word)
    return lines


def write_overview(path: str | Path, results: dict[str, Any], per_row: int = 5, scale: int = 4) -> Path:
    """A PNG for the README: per path, t2i samples and edits (source | result), each framed, with its
    prompt or instruction under it and a green (exact) or red (not exact) bar above it."""
    rows: list[tuple[str, list[tuple[np.ndarray, str, bool]]]] = []
    for name, r in results.items():
        t2i = [(s["image"], s["prompt"], s["exact"]) for s in r.samples.get("t2i", [])][:per_row]
        if t2i:
            rows.append((f"{name}: text to image", t2i))
        edits = [(np.concatenate([s["image"], np.full_like(s["image"][:, :2], 160), s["output_image"]], 1),
                  s["instruction"], s["exact"]) for s in r.samples.get("edit", [])][:per_row // 2 + 1]
        if edits:
            rows.append((f"{name}: edit (source | result)", edits))
    tile = max((image.shape[0] * scale for _, items in rows for image, _, _ in items), default=32 * scale)
    lines = max((len(_wrap(text, image.shape[1] * scale // 6)) for _, items in rows for image, text, _ in items),
                default=1)  # every prompt whole, however narrow its image
    row_h = 16 + 4 + tile + 4 + lines * 11 + 8
    width = max(sum(image.shape[1] * scale + 12 for image, _, _ in items) for _, items in rows) + 8 if rows else 64
    canvas = PILImage.new("RGB", (width, len(rows) * row_h + 8), "white")
    draw = ImageDraw.Draw(canvas)
    y = 8
    for title, items in rows:
        draw.text((8, y), title, fill=(0, 0, 0))
        x = 8
        for image, text, exact in items:
            p = PILImage.fromarray(image).resize((image.shape[1] * scale, image.shape[0] * scale), PILImage.NEAREST)
            top = y + 20
            draw.rectangle((x - 2, top - 2, x + p.width + 1, top + p.height + 1), outline=(170, 170, 170))
            draw.rectangle((x - 2, top - 6, x + p.width + 1, top - 3), fill=(40, 160, 60) if exact else (210, 50, 50))
            canvas.paste(p, (x, top))
            for i, line in enumerate(_wrap(text, p.width // 6)):  # the default font is 6 px wide
                draw.text((x, top + p.height + 4 + 11 * i), line, fill=(60, 60, 60))
            x += p.width + 12
        y += row_h
    path = Path(path)
    canvas.save(path)
    return path
