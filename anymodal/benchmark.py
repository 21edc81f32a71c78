"""The shapes-world benchmark of a bundle: every task the world defines, scored exactly by the checker.

Seen compositions come from the world's training split; held-out (color, shape) pairs, when the bundle
records any, from its held-out split. Stories are free interleaved generation: the model writes each
"then {edit}." (the last: "finally {edit}.") itself and ends the story; a story is exact when it has 2 to 4 images, each edit parses, and every image shows
the scene its text describes.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import numpy as np

from anymodal.data.document import TASKS as DOCUMENT_TASKS
from anymodal.data.images import array_from_pixels
from anymodal.data.shapes import CELL_NAMES, COLORS, SHAPES, Obj, Scene, ShapesWorld, caption
from anymodal.evaluate.shapes import ShapesScorer
from anymodal.generate.settings import CAPTION_TEXT, STORY_TEXT, ImageSampling, TextSampling, resolved
from anymodal.generate.tasks import Pipeline

TASKS = tuple(t for t in DOCUMENT_TASKS if t != "text")  # t2i, caption, vqa, edit, story
_C, _S = "|".join(COLORS), "|".join(SHAPES)
_CELL = "|".join(sorted(CELL_NAMES, key=len, reverse=True))
_EDITS = [
    ("recolor", re.compile(rf"make the (?P<color>{_C}) (?P<shape>{_S}) (?P<new>{_C})")),
    ("move", re.compile(rf"move the (?P<color>{_C}) (?P<shape>{_S}) to the (?P<cell>{_CELL})")),
    ("remove", re.compile(rf"remove the (?P<color>{_C}) (?P<shape>{_S})")),
    ("add", re.compile(rf"add a (?P<color>{_C}) (?P<shape>{_S}) at the (?P<cell>{_CELL})")),
]


def _parse_edit(instruction: str) -> tuple[str, re.Match] | None:
    """(kind, match) of `instruction` as one of the world's edits (lower case, single spaces, no final period or
    story word), None if it is none of them."""
    text = " ".join(instruction.strip().lower().rstrip(".").split())
    for word in ("then ", "finally "):
        text = text[len(word):] if text.startswith(word) else text
    return next(((kind, m) for kind, pattern in _EDITS if (m := pattern.fullmatch(text))), None)


def edit_kind(instruction: str) -> str | None:
    """Which of the world's edits `instruction` is (EDIT_KINDS), None if it is none of them."""
    parsed = _parse_edit(instruction)
    return parsed[0] if parsed else None


def typed(text: str, i: int) -> str:
    """`text` as the i-th person types it: one of four habits (capitalised, with the final period or question
    mark dropped or a period added where there is none; all capitals; doubled and surrounding spaces; title case
    without a final period)."""
    habit = i % 4
    if habit == 0:
        toggled = text[:-1] if text.endswith((".", "?")) else text + "."
        return toggled[:1].upper() + toggled[1:]
    if habit == 1:
        return text.upper()
    if habit == 2:
        return "  " + text.replace(" ", "  ") + " "
    return text.rstrip(".").title()


def apply_edit(scene: Scene, instruction: str) -> Scene | None:
    """The scene after `instruction` (one of the world's four edits), or None if it does not apply."""
    parsed = _parse_edit(instruction)
    if parsed is None:
        return None
    kind, m = parsed
    target = next((o for o in scene if o.color == m["color"] and o.shape == m["shape"]), None)
    if kind == "add":
        new = scene.replace(None, Obj(m["color"], m["shape"], CELL_NAMES.index(m["cell"])))
    elif target is None:
        return None
    elif kind == "recolor":
        new = scene.replace(target, Obj(m["new"], target.shape, target.cell))
    elif kind == "move":
        new = scene.replace(target, Obj(target.color, target.shape, CELL_NAMES.index(m["cell"])))
    else:
        new = scene.replace(target, None)
    return new if new.is_valid() else None


@dataclass
class BenchSettings:
    """How the benchmark samples (recorded with its results)."""

    n: int = 200
    """Documents per task (seen compositions); held-out compositions add n // 4 per task."""
    seed: int = 0
    """Seed of the evaluation scenes and of sampling (scenes use seed + 10007 so they differ from training)."""
    sampling: ImageSampling = field(default_factory=ImageSampling)
    """How images are sampled."""
    story_text: TextSampling = field(default_factory=lambda: replace(STORY_TEXT))
    """How a story's text is sampled (`STORY_TEXT`); answers are greedy."""
    caption_text: TextSampling = field(default_factory=lambda: replace(CAPTION_TEXT))
    """How a caption is decoded (`CAPTION_TEXT`: greedy, guided by its image)."""
    batch_size: int = 32
    """Images sampled per batch."""
    story_n: int = 40
    """Stories per split at most (each is sampled one at a time: the slowest task)."""
    tasks: tuple[str, ...] = TASKS
    """Tasks to run."""
    typed: bool = False
    """Give every prompt, instruction and question as people type them (`typed`): other casing, extra spaces,
    a final period dropped or added, instead of the world's canonical text."""


@dataclass
class BenchResult:
    scores: dict[str, dict[str, float]]
    settings: dict[str, Any]
    samples: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)


def run_shapes_bench(pipe: Pipeline, settings: BenchSettings, holdout: list[str] | None = None,
                     progress: Callable[[str, int, int], None] | None = None, keep_samples: int = 8) -> BenchResult:
    """Score `pipe`'s bundle on every task; `progress(task, done, total)` is called along the way."""
    import time

    size = pipe.bundle.image_size
    scorer = ShapesScorer()
    # as the bundle samples (a parallel bundle's steps, the edits' keep_source on its path), on record too
    settings = replace(settings, sampling=resolved(settings.sampling, pipe.bundle.config))
    sampling = settings.sampling
    greedy = TextSampling(temperature=0.0)
    splits = [("seen", "train", settings.n)]
    if holdout:
        splits.append(("heldout", "heldout", max(1, settings.n // 4)))
    samples: dict[str, list[dict[str, Any]]] = {t: [] for t in settings.tasks}
    seconds: dict[str, float] = {}
    for task in settings.tasks:
        start = time.perf_counter()
        for split_name, split, n in splits:
            world = ShapesWorld(size=size, seed=settings.seed + 10007, holdout=holdout or None, split=split)
            if task == "story":
                n = min(n, settings.story_n)
            rng = np.random.default_rng([settings.seed + 10007, TASKS.index(task), len(split)])
            docs = [world.document(task, rng) for _ in range(n)]
            heldout = split_name == "heldout"
            report = (lambda done, _t=task, _n=n: progress(_t, done, _n)) if progress else None
            _run_task(pipe, task, docs, heldout, scorer, sampling, greedy, settings, samples[task], keep_samples,
                      report)
        seconds[task] = time.perf_counter() - start
    return BenchResult(scorer.scores(), asdict(settings), samples, seconds)


def _run_task(pipe, task, docs, heldout, scorer, sampling, greedy, settings, kept, keep, report) -> None:
    seeds = [settings.seed * 100003 + i for i in range(len(docs))]
    done = [0]

    def tick(k: int) -> None:
        done[0] += k
        if report:
            report(done[0])

    bs = settings.batch_size
    say = typed if settings.typed else (lambda text, i: text)
    if task == "t2i":
        prompts = [say(d.segments[0].text, i) for i, d in enumerate(docs)]
        images = pipe.text_to_image(prompts, seeds, sampling, bs, tick)
        for d, p, im in zip(docs, prompts, images):
            ok = scorer.add_t2i(d.meta["scenes"][0], im, heldout)
            if len(kept) < keep:
                kept.append({"prompt": p, "image": im, "exact": ok, "read": None if ok else scorer.read(im)})
    elif task == "caption":
        sources = [d.segments[0].pixels for d in docs]
        texts = pipe.caption(sources, settings.caption_text, bs, progress=tick)
        for d, src, t in zip(docs, sources, texts):
            ok = scorer.add_caption(d.meta["scenes"][0], t, heldout)
            if len(kept) < keep:
                kept.append({"image": array_from_pixels(src), "output": t, "truth": caption(d.meta["scenes"][0]), "exact": ok})
    elif task == "vqa":
        sources = [d.segments[0].pixels for d in docs]
        questions = [say(d.meta["question"], i) for i, d in enumerate(docs)]
        answers = pipe.answer(sources, questions, greedy, bs, progress=tick)
        for d, src, q, a in zip(docs, sources, questions, answers):
            ok = scorer.add_vqa(d.meta["answer"], a, heldout)
            if len(kept) < keep:
                kept.append({"image": array_from_pixels(src), "question": q, "output": a, "truth": d.meta["answer"], "exact": ok})
    elif task == "edit":
        sources = [d.segments[0].pixels for d in docs]
        instructions = [say(d.meta["instruction"], i) for i, d in enumerate(docs)]
        images = pipe.edit(sources, instructions, seeds, sampling, bs, tick)
        for d, src, ins, im in zip(docs, sources, instructions, images):
            ok = scorer.add_edit(d.meta["scenes"][1], im, heldout, edit_kind(d.meta["instruction"]))
            if len(kept) < keep:
                kept.append({"image": array_from_pixels(src), "instruction": ins, "output_image": im, "exact": ok,
                             "read": None if ok else scorer.read(im)})
    elif task == "story":
        for i, d in enumerate(docs):
            prompt = say(d.segments[0].text, i)
            steps = pipe.story(prompt, seed=seeds[i], max_images=4, sampling=sampling,
                               text_sampling=settings.story_text)
            scenes, images = _story_scenes(steps, d.meta["scenes"][0])
            ok = scorer.add_story(scenes, images, heldout) if 2 <= len(images) <= 4 and scenes is not None else \
                scorer.add_story([d.meta["scenes"][0]] * 2, [], heldout)
            if len(kept) < keep:
                kept.append({"steps": [(s.text, s.image) for s in steps], "exact": ok})
            tick(1)


def _story_scenes(steps, first: Scene) -> tuple[list[Scene] | None, list[np.ndarray]]:
    """The scenes a generated story's text describes (None if an edit does not parse), and its images."""
    images = [s.image for s in steps if s.image is not None]
    scenes: list[Scene] = []
    scene: Scene | None = first
    pending_text = True  # the prompt describes the first image
    for s in steps[1:]:
        if s.text is not None:
            if not scenes:
                continue
            scene = apply_edit(scene, s.text) if scene is not None else None
            pending_text = True
        elif s.image is not None:
            if not pending_text or scene is None:
                return None, images
            scenes.append(scene)
            pending_text = False
    return scenes, images


