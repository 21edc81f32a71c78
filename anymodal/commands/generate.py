"""The `anymodal generate ...` and `anymodal eval shapes` commands: argument handling, progress, files."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from anymodal.checkpoint import load_bundle
from anymodal.data.images import load_image
from anymodal.generate.engine import ImageSampling, TextSampling
from anymodal.generate.tasks import Pipeline
from anymodal.generate.writers import write_images, write_story

console = Console(stderr=True)


def progress_bar() -> Progress:
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    console=console, transient=False)


def _image_sampling(ns: argparse.Namespace) -> ImageSampling:
    return ImageSampling(steps=ns.steps, cfg=ns.cfg, cfg_image=getattr(ns, "cfg_image", 1.5),
                         cfg_interval=tuple(ns.cfg_interval), temperature=ns.temperature, top_k=ns.top_k)


def _text_sampling(ns: argparse.Namespace) -> TextSampling:
    return TextSampling(temperature=ns.temperature, top_k=ns.top_k, top_p=ns.top_p,
                        max_new_tokens=ns.max_new_tokens, stop=tuple(ns.stop))


def _settings(ns: argparse.Namespace, keys: tuple[str, ...]) -> dict:
    return {k: getattr(ns, k) for k in keys if hasattr(ns, k)}


def run_generate(ns: argparse.Namespace) -> None:
    pipe = Pipeline(load_bundle(ns.checkpoint, ns.device), use_cache=not ns.no_cache)
    size = pipe.bundle.image_size
    if ns.task == "t2i":
        prompts = list(ns.prompt)
        if ns.prompts:
            prompts += [line.strip() for line in Path(ns.prompts).read_text().splitlines() if line.strip()]
        if not prompts:
            raise ValueError("give at least one --prompt or a --prompts file")
        prompts = [p for p in prompts for _ in range(ns.num_images)]
        seeds = [ns.seed + i for i in range(len(prompts))]
        with progress_bar() as bar:
            task = bar.add_task("text to image", total=len(prompts))
            images = pipe.text_to_image(prompts, seeds, _image_sampling(ns), ns.batch_size,
                                        lambda k: bar.advance(task, k))
        settings = _settings(ns, ("steps", "cfg", "cfg_interval", "temperature", "top_k"))
        index = write_images(ns.out, images, ({"prompt": p, "seed": s, **settings} for p, s in zip(prompts, seeds)))
        console.print(f"wrote {len(images)} images and {index}")
    elif ns.task == "edit":
        pairs = []
        if ns.edits:
            for i, line in enumerate(Path(ns.edits).read_text().splitlines(), 1):
                if line.strip():
                    try:
                        rec = json.loads(line)
                        pairs.append((rec["image"], rec["instruction"]))
                    except (json.JSONDecodeError, KeyError, TypeError):
                        raise ValueError(f"{ns.edits} line {i} must be a JSON object with \"image\" and "
                                         f"\"instruction\"") from None
        if ns.image or ns.instruction:
            if not (ns.image and ns.instruction):
                raise ValueError("--image and --instruction go together")
            pairs.append((ns.image, ns.instruction))
        if not pairs:
            raise ValueError("give --image and --instruction, or an --edits file")
        images = [load_image(path, size) for path, _ in pairs]
        seeds = [ns.seed + i for i in range(len(pairs))]
        with progress_bar() as bar:
            task = bar.add_task("edit", total=len(pairs))
            outs = pipe.edit(images, [t for _, t in pairs], seeds, _image_sampling(ns), ns.batch_size,
                             lambda k: bar.advance(task, k))
        settings = _settings(ns, ("steps", "cfg", "cfg_image", "cfg_interval", "temperature", "top_k"))
        index = write_images(ns.out, outs, ({"image": str(p), "instruction": t, "seed": s, **settings}
                                            for (p, t), s in zip(pairs, seeds)))
        console.print(f"wrote {len(outs)} images and {index}")
    elif ns.task in ("caption", "vqa"):
        paths = ns.image if ns.task == "caption" else [ns.image] * len(ns.question)
        images = [load_image(p, size) for p in paths]
        seeds = [ns.seed + i for i in range(len(images))]
        if ns.task == "caption":
            texts = pipe.caption(images, _text_sampling(ns), seeds=seeds)
            rows = [{"image": p, "caption": t} for p, t in zip(paths, texts)]
        else:
            texts = pipe.answer(images, ns.question, _text_sampling(ns), seeds=seeds)
            rows = [{"image": p, "question": q, "answer": t} for p, q, t in zip(paths, ns.question, texts)]
        for row, text in zip(rows, texts):
            print(json.dumps(row) if ns.json else text)
    elif ns.task == "story":
        sampling = _image_sampling(ns)
        steps = pipe.story(ns.prompt, seed=ns.seed, max_images=ns.max_images, sampling=sampling,
                           text_sampling=TextSampling(temperature=ns.text_temperature))
        page, md = write_story(ns.out, steps, ns.prompt)
        console.print(f"wrote {page} and {md}: {sum(s.image is not None for s in steps)} images")


def print_scores(result, title: str) -> None:
    from anymodal.evaluate.shapes import METRICS

    table = Table(title=title)
    table.add_column("metric")
    for group in ("seen", "heldout", "all"):
        table.add_column(group, justify="right")
    for m in METRICS:
        cells = []
        for group in ("seen", "heldout", "all"):
            v = result.scores.get(group, {}).get(m, float("nan"))
            cells.append("-" if v != v else f"{v:.3f}")
        table.add_row(m, *cells)
    Console().print(table)


def run_eval_shapes(ns: argparse.Namespace) -> None:
    from anymodal.benchmark import TASKS, BenchSettings, run_shapes_bench

    bundle = load_bundle(ns.checkpoint, ns.device)
    tasks = tuple(ns.tasks or TASKS)
    bad = sorted(set(tasks) - set(TASKS))
    if bad:
        raise ValueError(f"unknown task {', '.join(bad)}; choose from {', '.join(TASKS)}")
    settings = BenchSettings(n=ns.n, seed=ns.seed, steps=ns.steps, cfg=ns.cfg, cfg_image=ns.cfg_image,
                             code_temperature=ns.temperature, code_top_k=ns.top_k, batch_size=ns.batch_size,
                             tasks=tasks)
    holdout = bundle.meta.get("holdout") or []
    with progress_bar() as bar:
        ids: dict[str, int] = {}

        def report(task: str, done: int, total: int) -> None:
            if task not in ids:
                ids[task] = bar.add_task(task, total=None)
            bar.update(ids[task], completed=done)

        result = run_shapes_bench(Pipeline(bundle), settings, holdout, report)
    sampler = "codes" if bundle.image_path == "discrete" else type(bundle.objective).__name__
    print_scores(result, f"{ns.checkpoint}: shapes world ({bundle.image_path}, {sampler}, seed {ns.seed})")
    if ns.json:
        out = {"bundle": str(ns.checkpoint), "path": bundle.image_path, "sampler": sampler,
               "settings": result.settings, "holdout": holdout, "scores": result.scores,
               "seconds": result.seconds}
        Path(ns.json).parent.mkdir(parents=True, exist_ok=True)
        Path(ns.json).write_text(json.dumps(out, indent=2, default=float))
    return result
