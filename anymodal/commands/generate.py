"""`anymodal generate ...` and `anymodal eval shapes`: their arguments, progress bars, files and printing.

What a request does lives in anymodal.generate.requests; this file only turns a command line into a request
and its outputs into files. Every default comes from ImageSampling / TextSampling / BenchSettings.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from anymodal.benchmark import TASKS, BenchSettings
from anymodal.generate.settings import (
    CAPTION_TEXT,
    IMAGE_GUIDANCE,
    KEEP_SOURCE,
    PARALLEL_STEPS,
    STORY_TEXT,
    ImageSampling,
    TextSampling,
)

console = Console(stderr=True)
IMAGE, TEXT = ImageSampling(), TextSampling()


def progress_bar() -> Progress:
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    console=console, transient=False)


# ---------------------------------------------------------------------------------------------- arguments
def _bundle_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", required=True, help="an inference bundle folder (written by `anymodal export`)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    p.add_argument("--seed", type=int, default=0, help="seed of sampling (output i uses seed + i)")
    p.add_argument("--no-cache", action="store_true", help="recompute the whole sequence every step (slow; a check)")


def _image_sampling_args(p: argparse.ArgumentParser, edits: bool = False, batch_size: int = 16) -> None:
    p.add_argument("--steps", type=int, default=IMAGE.steps, help="denoising steps (continuous path)")
    p.add_argument("--guidance", "--cfg", type=float, default=IMAGE.guidance,
                   help="classifier-free guidance scale of the text (1 = off)")
    if edits:
        p.add_argument("--image-guidance", "--cfg-image", type=float, default=IMAGE.image_guidance,
                       help="guidance scale of the source image (1 = off; default: "
                        f"{IMAGE_GUIDANCE['discrete']:g} on the discrete path, {IMAGE_GUIDANCE['continuous']:g} "
                        "on the continuous path)")
        p.add_argument("--keep-source", type=float, default=IMAGE.keep_source,
                       help="how strongly what the instruction does not name stays as it was (0 = not at all; "
                            f"default: {KEEP_SOURCE['discrete']:g} on the discrete path, a log-probability bonus "
                            f"of each slot's source code; {KEEP_SOURCE['continuous']:g} on the continuous path, "
                            "0-1, a pull of the predicted latents toward the source's where they lie near them)")
    p.add_argument("--guidance-interval", "--cfg-interval", type=float, nargs=2, default=IMAGE.guidance_interval,
                   metavar=("LO", "HI"), help="apply guidance only on this fraction of the trajectory")
    p.add_argument("--sampler", default=IMAGE.sampler,
                   help="diffusion sampler (continuous path; default: the bundle's): euler or heun for flow "
                        "bundles, ddim or ddpm for ddpm bundles")
    p.add_argument("--temperature", type=float, default=IMAGE.temperature,
                   help="code sampling temperature (discrete path; 0 = greedy)")
    p.add_argument("--top-k", type=int, default=IMAGE.top_k, help="code sampling top-k (discrete path; 0 = all)")
    p.add_argument("--parallel-steps", type=int, default=IMAGE.parallel_steps,
                   help="discrete path: n > 0 decodes all of an image's codes in n parallel steps (bundles "
                        "trained with parallel_images), 0 one by one (autoregressive); default: as the bundle was "
                        f"trained ({PARALLEL_STEPS} parallel steps for such a bundle, else one by one)")
    p.add_argument("--batch-size", type=int, default=batch_size, help="images sampled together")


def _text_sampling_args(p: argparse.ArgumentParser, defaults: TextSampling = TEXT) -> None:
    p.add_argument("--temperature", type=float, default=TEXT.temperature, help="text temperature (0 = greedy)")
    p.add_argument("--top-k", type=int, default=TEXT.top_k, help="text top-k (0 = all)")
    p.add_argument("--top-p", type=float, default=TEXT.top_p, help="text nucleus top-p (1 = all)")
    p.add_argument("--max-new-tokens", type=int, default=TEXT.max_new_tokens, help="longest answer")
    p.add_argument("--stop", action="append", default=list(TEXT.stop), help="stop string (repeatable)")
    p.add_argument("--image-guidance", type=float, default=defaults.image_guidance,
                   help="guidance of the image over the same prompt without it (1 = none): words the image "
                        "makes likelier gain, among those it makes plausible")
    if defaults.rerank_words:
        p.add_argument("--rerank-words", type=int, default=defaults.rerank_words,
                       help="captions branching from the decoded one at its N least sure words compete by how well "
                            "each explains the image as a text-to-image prompt (0 = the decoded caption)")
    p.add_argument("--json", action="store_true", help="print JSON lines instead of text")


def _overwrite_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--overwrite", action="store_true",
                   help="write into an --out folder that is not empty, removing an earlier run's outputs first "
                        "(without it such a folder is refused)")


def add_generate_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="sample from a bundle: t2i, edit, caption, vqa, story")
    which = p.add_subparsers(dest="task", required=True)
    t = which.add_parser("t2i", help="text to image")
    _bundle_args(t)
    t.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable)")
    t.add_argument("--prompts", default=None, help="a file with one prompt per line")
    t.add_argument("--out", required=True, help="output folder: 0000.png, ... and index.jsonl")
    _overwrite_arg(t)
    t.add_argument("--num-images", type=int, default=1, help="images per prompt")
    _image_sampling_args(t)
    e = which.add_parser("edit", help="edit an image by an instruction")
    _bundle_args(e)
    e.add_argument("--image", default=None, help="the image to edit")
    e.add_argument("--instruction", default=None, help="what to change")
    e.add_argument("--edits", default=None, help="JSONL of {\"image\": path, \"instruction\": text} lines")
    e.add_argument("--out", required=True, help="output folder: 0000.png, ... and index.jsonl")
    _overwrite_arg(e)
    _image_sampling_args(e, edits=True)
    c = which.add_parser("caption", help="caption images")
    _bundle_args(c)
    c.add_argument("--image", action="append", required=True, help="an image (repeatable)")
    _text_sampling_args(c, CAPTION_TEXT)
    q = which.add_parser("vqa", help="answer a question about an image")
    _bundle_args(q)
    q.add_argument("--image", required=True, help="the image")
    q.add_argument("--question", action="append", required=True, help="a question (repeatable)")
    _text_sampling_args(q)
    s = which.add_parser("story", help="interleaved text and images from a prompt")
    _bundle_args(s)
    s.add_argument("--prompt", required=True, help="how the story starts")
    s.add_argument("--out", required=True, help="output folder: story.html, story.md and images")
    _overwrite_arg(s)
    s.add_argument("--max-images", type=int, default=4, help="most images in the story")
    s.add_argument("--text-temperature", type=float, default=STORY_TEXT.temperature,
                   help="temperature of the story's text (0: greedy, which runs stories to --max-images)")
    s.add_argument("--text-top-p", type=float, default=STORY_TEXT.top_p,
                   help="top-p of the story's text (1: all tokens)")
    _image_sampling_args(s)


def add_eval_shapes_parser(which: argparse._SubParsersAction) -> None:
    bench = BenchSettings()
    p = which.add_parser("shapes", help="score a bundle on every shapes-world task")
    p.add_argument("--checkpoint", required=True, help="an inference bundle folder")
    p.add_argument("--n", type=int, default=bench.n, help="documents per task (held-out compositions add n/4)")
    p.add_argument("--seed", type=int, default=bench.seed, help="seed of the evaluation scenes and of sampling")
    p.add_argument("--json", default=None, help="also write the results to this JSON file")
    p.add_argument("--tasks", nargs="+", default=None, help=f"subset of {' '.join(TASKS)}")
    p.add_argument("--device", default="cpu", help="cpu, cuda, ...")
    p.add_argument("--typed", action="store_true",
                   help="prompts as people type them: other casing, extra spaces, a final period dropped or added")
    _image_sampling_args(p, edits=True, batch_size=bench.batch_size)


def image_sampling(ns: argparse.Namespace) -> ImageSampling:
    return ImageSampling(steps=ns.steps, guidance=ns.guidance,
                         image_guidance=getattr(ns, "image_guidance", IMAGE.image_guidance),
                         keep_source=getattr(ns, "keep_source", IMAGE.keep_source),
                         guidance_interval=tuple(ns.guidance_interval), sampler=ns.sampler,
                         temperature=ns.temperature, top_k=ns.top_k, parallel_steps=ns.parallel_steps)


def text_sampling(ns: argparse.Namespace) -> TextSampling:
    return TextSampling(temperature=ns.temperature, top_k=ns.top_k, top_p=ns.top_p,
                        max_new_tokens=ns.max_new_tokens, stop=tuple(ns.stop), image_guidance=ns.image_guidance,
                        rerank_words=getattr(ns, "rerank_words", 0))


# ---------------------------------------------------------------------------------------------- handlers
def read_text_file(path: str, what: str) -> str:
    """The UTF-8 text of the file given for `what` (e.g. "--prompts"); a missing or non-UTF-8 file is one sentence."""
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"{what} file {path} does not exist" + (" (it is a folder)" if file.is_dir() else "")
                                + "; check the path")
    data = file.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[:e.start].count(b"\n") + 1
        raise ValueError(f"{what} file {path} is not UTF-8 text (byte 0x{data[e.start]:02x} on line {line}); "
                         "save it as UTF-8") from None


def _edit_pairs(ns: argparse.Namespace) -> list[tuple[str, str]]:
    pairs = []
    if ns.edits:
        for i, line in enumerate(read_text_file(ns.edits, "--edits").splitlines(), 1):
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
    return pairs


def run_generate(ns: argparse.Namespace) -> None:
    from anymodal.checkpoint import load_bundle
    from anymodal.generate import requests
    from anymodal.generate.tasks import Pipeline
    from anymodal.generate.writers import claim_output, write_images, write_story

    # before any work: never mix two runs in one folder (an earlier run's outputs go just before writing)
    earlier = claim_output(ns.out, ns.overwrite) if ns.task in ("t2i", "edit", "story") else []
    pipe = Pipeline(load_bundle(ns.checkpoint, ns.device), use_cache=not ns.no_cache)
    with progress_bar() as bar:
        task = bar.add_task(ns.task, total=None)

        def report(p: requests.Progress) -> None:
            bar.update(task, completed=p.done, total=p.total)

        if ns.task == "t2i":
            prompts = list(ns.prompt)
            if ns.prompts:
                prompts += [line.strip() for line in read_text_file(ns.prompts, "--prompts").splitlines()
                            if line.strip()]
            if not prompts:
                raise ValueError("give at least one --prompt or a --prompts file")
            outputs = requests.text_to_image(pipe, requests.TextToImage(
                prompts, ns.num_images, ns.seed, image_sampling(ns), ns.batch_size), report)
        elif ns.task == "edit":
            pairs = _edit_pairs(ns)
            outputs = requests.edit(pipe, requests.Edit(
                [p for p, _ in pairs], [t for _, t in pairs], ns.seed, image_sampling(ns), ns.batch_size), report)
        elif ns.task == "caption":
            outputs = requests.caption(pipe, requests.Caption(ns.image, ns.seed, text_sampling(ns)), report)
        elif ns.task == "vqa":
            outputs = requests.answer(pipe, requests.Question(
                [ns.image] * len(ns.question), ns.question, ns.seed, text_sampling(ns)), report)
        else:
            story = requests.story(pipe, requests.Story(
                ns.prompt, ns.seed, ns.max_images, image_sampling(ns),
                dataclasses.replace(STORY_TEXT, temperature=ns.text_temperature, top_p=ns.text_top_p)),
                report)
    for path in earlier:
        path.unlink(missing_ok=True)
    if earlier:
        console.print(f"--overwrite: removed {len(earlier)} files of an earlier run from {ns.out}")
    if ns.task in ("t2i", "edit"):
        index = write_images(ns.out, [o.image for o in outputs], (o.record for o in outputs))
        console.print(f"wrote {len(outputs)} images and {index}")
    elif ns.task in ("caption", "vqa"):
        for o in outputs:
            keys = ("image", "caption") if ns.task == "caption" else ("image", "question", "answer")
            print(json.dumps({k: o.record[k] for k in keys}) if ns.json else o.text)
    else:
        page, md = write_story(ns.out, story.steps, ns.prompt)
        console.print(f"wrote {page} and {md}: {sum(s.image is not None for s in story.steps)} images")


def print_scores(result, title: str) -> None:
    from anymodal.evaluate.shapes import table_rows

    table = Table(title=title)
    table.add_column("metric")
    for group in ("seen", "heldout", "all"):
        table.add_column(group, justify="right")
    for m, kind in table_rows(result.scores):
        cells = []
        for group in ("seen", "heldout", "all"):
            v = result.scores.get(group, {}).get(m, float("nan"))
            cells.append("-" if v != v else f"{v:.3f}")
        table.add_row(f"  {kind}" if kind else m, *cells)
    Console().print(table)


def run_eval_shapes(ns: argparse.Namespace):
    from anymodal.benchmark import run_shapes_bench
    from anymodal.checkpoint import load_bundle
    from anymodal.generate.tasks import Pipeline

    bundle = load_bundle(ns.checkpoint, ns.device)
    tasks = tuple(ns.tasks or TASKS)
    bad = sorted(set(tasks) - set(TASKS))
    if bad:
        raise ValueError(f"unknown task {', '.join(bad)}; choose from {', '.join(TASKS)}")
    settings = BenchSettings(n=ns.n, seed=ns.seed, sampling=image_sampling(ns), batch_size=ns.batch_size, tasks=tasks,
                             typed=ns.typed)
    holdout = bundle.meta.get("holdout") or []
    with progress_bar() as bar:
        ids: dict[str, int] = {}

        def report(task: str, done: int, total: int) -> None:
            if task not in ids:
                ids[task] = bar.add_task(task, total=None)
            bar.update(ids[task], completed=done)

        result = run_shapes_bench(Pipeline(bundle), settings, holdout, report)
    sampler = "codes" if bundle.image_path == "discrete" else (ns.sampler or bundle.objective.sampler)
    print_scores(result, f"{ns.checkpoint}: shapes world ({bundle.image_path}, {sampler}, seed {ns.seed})")
    if ns.json:
        out = {"bundle": str(ns.checkpoint), "image_path": bundle.image_path, "sampler": sampler,
               "settings": result.settings, "holdout": holdout, "scores": result.scores,
               "seconds": result.seconds}
        Path(ns.json).parent.mkdir(parents=True, exist_ok=True)
        Path(ns.json).write_text(json.dumps(out, indent=2, default=float))
    return result
