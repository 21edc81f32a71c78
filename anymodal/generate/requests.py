"""Typed requests: what a person asks of a bundle, and what comes back with the settings that made it.

The CLI (`anymodal generate ...`), the Python API and the web app all call these functions, so prompt
expansion, seeds, image loading and the settings record live here once:

    from anymodal.checkpoint import load_bundle
    from anymodal.generate.requests import TextToImage, text_to_image
    from anymodal.generate.tasks import Pipeline
    outputs = text_to_image(Pipeline(load_bundle("checkpoints/demo/transfusion")),
                            TextToImage(prompts=["a red circle at the center."], num_images=2))
    outputs[0].image, outputs[0].record  # (H, W, 3) uint8, {"prompt": ..., "seed": 0, "steps": 25, ...}

Output i of a request uses seed `seed + i`. Each record holds the request's inputs, that seed and every
sampling setting, so an output can be made again on the CLI (`command_line`). Bad inputs (an empty prompt,
control characters, a prompt that leaves no room for its image, an unreadable image) are refused in one
sentence before any sampling.
"""

from __future__ import annotations

import dataclasses
import shlex
import unicodedata
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from anymodal.data.document import Text
from anymodal.data.images import load_image
from anymodal.diffusion.schedule import check_sampler
from anymodal.generate.settings import CAPTION_TEXT, STORY_TEXT, ImageSampling, TextSampling, resolved
from anymodal.generate.tasks import Pipeline, StoryStep

ImageInput = str | Path | torch.Tensor
"""A path to an image file, or pixels (3, H, W) in [0, 1] at the bundle's image size."""


@dataclass
class Progress:
    """Where a request stands: `done` of `total` steps (denoising steps or codes of every image, or texts)."""

    done: int
    total: int
    what: str = "steps"


ProgressCallback = Callable[[Progress], None] | None


@dataclass
class ImageOutput:
    image: np.ndarray
    """(H, W, 3) uint8."""
    record: dict[str, Any]
    """The inputs, the seed and the sampling settings of this image (written to index.jsonl)."""


@dataclass
class TextOutput:
    text: str
    record: dict[str, Any]


@dataclass
class TextToImage:
    """Images from prompts."""

    prompts: list[str]
    num_images: int = 1
    """Images per prompt."""
    seed: int = 0
    sampling: ImageSampling = field(default_factory=ImageSampling)
    batch_size: int = 16
    """Images sampled together."""


@dataclass
class Edit:
    """Each image changed by its instruction."""

    images: list[ImageInput]
    instructions: list[str]
    seed: int = 0
    sampling: ImageSampling = field(default_factory=ImageSampling)
    batch_size: int = 16


@dataclass
class Caption:
    """A caption per image."""

    images: list[ImageInput]
    seed: int = 0
    sampling: TextSampling = field(default_factory=lambda: dataclasses.replace(CAPTION_TEXT))
    batch_size: int = 32


@dataclass
class Question:
    """An answer per (image, question)."""

    images: list[ImageInput]
    questions: list[str]
    seed: int = 0
    sampling: TextSampling = field(default_factory=TextSampling)
    batch_size: int = 32


@dataclass
class Story:
    """Interleaved text and images that the model writes after a prompt."""

    prompt: str
    seed: int = 0
    max_images: int = 4
    """Most images in the story."""
    sampling: ImageSampling = field(default_factory=ImageSampling)
    text_sampling: TextSampling = field(default_factory=lambda: dataclasses.replace(STORY_TEXT))


def _settings(sampling: ImageSampling | TextSampling, drop: tuple[str, ...] = ()) -> dict[str, Any]:
    """The settings as JSON-ready values, less `drop` (settings the task does not use)."""
    out = dataclasses.asdict(sampling)
    return {k: list(v) if isinstance(v, tuple) else v for k, v in out.items() if k not in drop}


def _load(pipe: Pipeline, images: Sequence[ImageInput]) -> list[torch.Tensor]:
    size = pipe.bundle.image_size
    return [im if isinstance(im, torch.Tensor) else load_image(im, size) for im in images]


def _name(image: ImageInput) -> str:
    return str(image) if not isinstance(image, torch.Tensor) else "<pixels>"


def _image_steps(pipe: Pipeline, sampling: ImageSampling) -> int:
    """Steps one image takes: codes or parallel steps (discrete path; `sampling` as `check_image_sampling`
    returns it), or the sampler's network calls (continuous)."""
    if pipe.bundle.image_path == "discrete":
        return sampling.parallel_steps or pipe.bundle.config.slots
    return len(pipe.bundle.objective.make_sampler(sampling.steps, sampling.sampler).timesteps)


def _stepper(pipe: Pipeline, n: int, batch_size: int, sampling: ImageSampling, progress: ProgressCallback):
    """An engine `on_step` that reports steps over the whole request (all batches)."""
    if progress is None:
        return None
    per_image = _image_steps(pipe, sampling)
    total = -(-n // batch_size) * per_image
    batch = [0, 0]  # batches finished, last step seen

    def on_step(done: int, steps: int) -> None:
        if done < batch[1]:
            batch[0] += 1
        batch[1] = done
        progress(Progress(batch[0] * per_image + done, total))

    return on_step


def check_texts(what: str, texts: Sequence[str]) -> None:
    """Refuse, in one sentence, an empty text or one holding control characters (tab and newline are fine)."""
    for i, text in enumerate(texts, 1):
        name = f"the {what}" if len(texts) == 1 else f"{what} {i}"
        if not isinstance(text, str):
            raise ValueError(f"{name} must be text, got {type(text).__name__}")
        if not text.strip():
            raise ValueError(f"{name} is empty; give some text")
        bad = next((c for c in text if unicodedata.category(c) == "Cc" and c not in "\t\n\r"), None)
        if bad is not None:
            raise ValueError(f"{name} holds the control character U+{ord(bad):04X} at position {text.index(bad)}; "
                             "remove it (tabs and newlines are fine)")


def check_room(pipe: Pipeline, what: str, texts: Sequence[str], task: str, extra: int, purpose: str) -> None:
    """Refuse a text whose prompt plus `extra` positions (for `purpose`: its image, ...) exceeds the model's
    context."""
    limit = pipe.bundle.config.arch.max_seq_len
    for i, text in enumerate(texts, 1):
        n = len(pipe.prompt([Text(text)], task))
        if n + extra > limit:
            name = f"the {what}" if len(texts) == 1 else f"{what} {i}"
            raise ValueError(f"{name} is {n} tokens long and needs {extra} more for {purpose}, over the model's "
                             f"context of {limit} tokens; shorten it by at least {n + extra - limit} tokens")


def _image_room(pipe: Pipeline) -> int:
    """Sequence positions one image takes: <boi>, its slots, <eoi>."""
    return pipe.bundle.config.slots + 2


def check_image_sampling(pipe: Pipeline, sampling: ImageSampling) -> ImageSampling:
    """Refuse settings the bundle cannot use, in one sentence, before any work; the settings as the bundle uses
    them (`resolved`: a parallel bundle's number of parallel steps, an edit's `keep_source` on this path), which
    the request's record keeps."""
    if sampling.steps < 1:
        raise ValueError(f"steps={sampling.steps} must be at least 1")
    if sampling.sampler is not None:
        if pipe.bundle.image_path == "discrete":
            raise ValueError(f"sampler={sampling.sampler!r} applies to the continuous path; this bundle samples "
                             "image codes (set a temperature instead)")
        check_sampler(pipe.bundle.objective, sampling.sampler)
    return resolved(sampling, pipe.bundle.config)


def text_to_image(pipe: Pipeline, request: TextToImage, progress: ProgressCallback = None) -> list[ImageOutput]:
    prompts = [p for p in request.prompts for _ in range(request.num_images)]
    if not prompts:
        raise ValueError("give at least one prompt")
    if request.num_images < 1:
        raise ValueError(f"num_images={request.num_images} must be at least 1")
    check_texts("prompt", request.prompts)
    check_room(pipe, "prompt", request.prompts, "t2i", _image_room(pipe), "its image")
    sampling = check_image_sampling(pipe, request.sampling)
    seeds = [request.seed + i for i in range(len(prompts))]
    on_step = _stepper(pipe, len(prompts), request.batch_size, sampling, progress)
    images = pipe.text_to_image(prompts, seeds, sampling, request.batch_size, on_step=on_step)
    settings = _settings(sampling, drop=("image_guidance", "keep_source"))
    return [ImageOutput(im, {"prompt": p, "seed": s, **settings}) for im, p, s in zip(images, prompts, seeds)]


def edit(pipe: Pipeline, request: Edit, progress: ProgressCallback = None) -> list[ImageOutput]:
    if len(request.images) != len(request.instructions):
        raise ValueError(f"{len(request.images)} images but {len(request.instructions)} instructions; "
                         "give one instruction per image")
    if not request.images:
        raise ValueError("give at least one image and instruction")
    check_texts("instruction", request.instructions)
    check_room(pipe, "instruction", request.instructions, "edit", 2 * _image_room(pipe), "the two images")
    sampling = check_image_sampling(pipe, request.sampling)
    sources = _load(pipe, request.images)
    seeds = [request.seed + i for i in range(len(sources))]
    on_step = _stepper(pipe, len(sources), request.batch_size, sampling, progress)
    images = pipe.edit(sources, request.instructions, seeds, sampling, request.batch_size, on_step=on_step)
    settings = _settings(sampling)
    return [ImageOutput(im, {"image": _name(src), "instruction": t, "seed": s, **settings})
            for im, src, t, s in zip(images, request.images, request.instructions, seeds)]


def _text_progress(n: int, progress: ProgressCallback):
    if progress is None:
        return None
    done = [0]

    def tick(k: int) -> None:
        done[0] += k
        progress(Progress(done[0], n, "texts"))

    return tick


def caption(pipe: Pipeline, request: Caption, progress: ProgressCallback = None) -> list[TextOutput]:
    if not request.images:
        raise ValueError("give at least one image")
    pixels = _load(pipe, request.images)
    seeds = [request.seed + i for i in range(len(pixels))]
    texts = pipe.caption(pixels, request.sampling, request.batch_size, seeds,
                         _text_progress(len(pixels), progress))
    settings = _settings(request.sampling)
    return [TextOutput(t, {"image": _name(im), "caption": t, "seed": s, **settings})
            for t, im, s in zip(texts, request.images, seeds)]


def answer(pipe: Pipeline, request: Question, progress: ProgressCallback = None) -> list[TextOutput]:
    if len(request.images) != len(request.questions):
        raise ValueError(f"{len(request.images)} images but {len(request.questions)} questions; "
                         "give one image per question")
    if not request.questions:
        raise ValueError("give at least one question")
    check_texts("question", request.questions)
    check_room(pipe, "question", request.questions, "vqa", _image_room(pipe) + 1, "the image and an answer")
    pixels = _load(pipe, request.images)
    seeds = [request.seed + i for i in range(len(pixels))]
    texts = pipe.answer(pixels, request.questions, request.sampling, request.batch_size, seeds,
                        _text_progress(len(pixels), progress))
    settings = _settings(request.sampling)
    return [TextOutput(t, {"image": _name(im), "question": q, "answer": t, "seed": s, **settings})
            for t, im, q, s in zip(texts, request.images, request.questions, seeds)]


@dataclass
class StoryOutput:
    steps: list[StoryStep]
    record: dict[str, Any]


def story(pipe: Pipeline, request: Story, progress: ProgressCallback = None,
          on_piece: Callable[[StoryStep], None] | None = None) -> StoryOutput:
    """The story; `on_piece` sees each text or image as soon as it exists, `progress` each image step
    (`total` counts `max_images` images: a story may end sooner)."""
    if not request.prompt.strip():
        raise ValueError("give a prompt to start the story")
    check_texts("prompt", [request.prompt])
    check_room(pipe, "prompt", [request.prompt], "story", 1, "the story")
    if request.max_images < 0:
        raise ValueError(f"max_images={request.max_images} must be >= 0")
    sampling = check_image_sampling(pipe, request.sampling)
    on_step = _stepper(pipe, max(1, request.max_images), 1, sampling, progress)
    steps = pipe.story(request.prompt, seed=request.seed, max_images=request.max_images, sampling=sampling,
                       text_sampling=request.text_sampling, on_step=on_step, on_piece=on_piece)
    record = {"prompt": request.prompt, "seed": request.seed, "max_images": request.max_images,
              **_settings(sampling, drop=("image_guidance", "keep_source")), "text": _settings(request.text_sampling)}
    return StoryOutput(steps, record)


def command_line(task: str, checkpoint: str, record: dict[str, Any], out: str = "out") -> str:
    """The `anymodal generate` command that makes an output again from its record."""
    args = ["anymodal", "generate", task, "--checkpoint", checkpoint]
    flags = {"prompt": "--prompt", "instruction": "--instruction", "image": "--image", "question": "--question",
             "seed": "--seed", "steps": "--steps", "guidance": "--guidance", "image_guidance": "--image-guidance",
             "keep_source": "--keep-source",
             "temperature": "--temperature", "top_k": "--top-k", "parallel_steps": "--parallel-steps",
             "sampler": "--sampler", "top_p": "--top-p", "max_new_tokens": "--max-new-tokens",
             "rerank_words": "--rerank-words",
             "max_images": "--max-images"}
    drawn = ("t2i", "edit", "story")
    used_by = {"keep_source": ("edit",), "image_guidance": ("edit", "caption", "vqa"), "rerank_words": ("caption",),
               "steps": drawn, "guidance": drawn, "sampler": drawn}  # a setting not named: every task's
    for key, flag in flags.items():
        value = record.get(key)
        if value is None or task not in used_by.get(key, (task,)):
            continue
        args += [flag, str(value)]
    interval = record.get("guidance_interval")
    if interval and tuple(interval) != ImageSampling().guidance_interval:
        args += ["--guidance-interval", *(str(v) for v in interval)]
    if task in ("t2i", "edit", "story"):
        args += ["--out", out]
    return shlex.join(args)

