"""The Python API of sampling: each task builds prompts (and guidance branches) for the one Engine.

    from anymodal.checkpoint import load_bundle
    from anymodal.generate.tasks import Pipeline
    pipe = Pipeline(load_bundle("checkpoints/demo/transfusion"))
    images = pipe.text_to_image(["a red circle at the center"], seeds=[0])

Images go in as (3, H, W) float tensors in [0, 1] and come out as (H, W, 3) uint8 arrays.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from anymodal.checkpoint import Bundle
from anymodal.data.document import Document, Image, Text
from anymodal.data.images import array_from_pixels
from anymodal.data.sequence import EncodedDocument, SequenceEncoder
from anymodal.generate.engine import Engine
from anymodal.generate.settings import (
    CAPTION_TEXT,
    RERANK_ALTERNATIVES,
    STORY_TEXT,
    TEXT_GUIDANCE_FLOOR,
    ImageSampling,
    StepCallback,
    TextSampling,
    resolved,
)

Progress = Callable[[int], None] | None


def clean_text(text: str) -> str:
    """Text as typed -> as trained: surrounding whitespace dropped, runs of whitespace made one space.
    (Casing is the text tokenizer's: one trained with `--lowercase` reads any casing.)"""
    return " ".join(text.split())


def as_sentence(text: str) -> str:
    """`clean_text`, ending in a period unless it ends in sentence punctuation: a story's text pieces are
    sentences, and without it a story prompt reads as a text-to-image prompt (one image, then no story)."""
    text = clean_text(text)
    return text if not text or text.endswith((".", "!", "?")) else text + "."


def as_question(text: str) -> str:
    """`clean_text`, ending in a question mark (a final period becomes one): questions are asked with it, and
    without it the model is still reading the question when it should answer."""
    text = clean_text(text)
    return text if not text or text.endswith("?") else text.rstrip(".") + "?"


@dataclass
class StoryStep:
    """One piece of a generated story: text, or an image (H, W, 3) uint8."""

    text: str | None = None
    image: np.ndarray | None = None


class Pipeline:
    """Sampling for every task on one loaded bundle."""

    def __init__(self, bundle: Bundle, use_cache: bool = True) -> None:
        self.bundle, self.use_cache = bundle, use_cache
        config = bundle.config
        self.encoder = SequenceEncoder(bundle.text, config.image_path, config.slots)
        self.device = next(bundle.model.parameters()).device

    # ------------------------------------------------------------ helpers
    def engine(self) -> Engine:
        return Engine(self.bundle.model, self.bundle.text, self.bundle.objective, use_cache=self.use_cache)

    def encode_image(self, pixels: torch.Tensor) -> Image:
        """A prompt image: pixels (3, H, W) in [0, 1] -> codes or latents from the bundle's tokenizer."""
        size = self.bundle.image_size
        if pixels.ndim != 3 or pixels.shape[0] != 3 or tuple(pixels.shape[1:]) != (size, size):
            raise ValueError(f"a prompt image must be (3, {size}, {size}) pixels for this bundle, "
                             f"got {tuple(pixels.shape)}; load it with anymodal.data.images.load_image(path, {size})")
        with torch.no_grad():
            out = self.bundle.image_tokenizer.encode(pixels[None].to(self.device).float())[0]
        return Image(codes=out) if self.bundle.config.image_path == "discrete" else Image(latents=out)

    def decode_images(self, out: torch.Tensor) -> list[np.ndarray]:
        with torch.no_grad():
            pixels = self.bundle.image_tokenizer.decode(out.to(self.device))  # (B, 3, H, W) in [0, 1]
        return [array_from_pixels(p) for p in pixels]

    def prompt(self, segments: Sequence[Text | Image], task: str) -> EncodedDocument:
        if not segments:
            return EncodedDocument(tokens=[self.bundle.text.bos_id], loss_mask=[False], task=task)
        return self.encoder.encode_prompt(Document(list(segments), task))

    @staticmethod
    def generators(seeds: Sequence[int]) -> list[torch.Generator]:
        return [torch.Generator().manual_seed(int(s)) for s in seeds]

    def _batched(self, n: int, batch_size: int, run, progress: Progress) -> list:
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size} must be at least 1")
        out: list = []
        for lo in range(0, n, batch_size):
            hi = min(n, lo + batch_size)
            out += run(lo, hi)
            if progress:
                progress(hi - lo)
        return out

    # ------------------------------------------------------------ tasks
    def text_to_image(self, prompts: Sequence[str], seeds: Sequence[int] | None = None,
                      sampling: ImageSampling | None = None, batch_size: int = 16,
                      progress: Progress = None, on_step: StepCallback = None) -> list[np.ndarray]:
        """One image per prompt; guidance against the empty prompt.

        `progress(k)` after each batch of k images; `on_step(done, total)` after each step of a batch."""
        sampling = sampling or ImageSampling()
        seeds = list(range(len(prompts))) if seeds is None else list(seeds)

        def run(lo, hi):
            cond = [self.prompt([Text(clean_text(p))], "t2i") for p in prompts[lo:hi]]
            uncond = [self.prompt([], "t2i") for _ in cond]
            eng = self.engine()
            eng.start(cond + uncond, branches=2)
            out = eng.generate_image(sampling, [sampling.guidance], self.generators(seeds[lo:hi]), on_step)
            return self.decode_images(out)

        return self._batched(len(prompts), batch_size, run, progress)

    def edit(self, images: Sequence[torch.Tensor], instructions: Sequence[str], seeds: Sequence[int] | None = None,
             sampling: ImageSampling | None = None, batch_size: int = 16, progress: Progress = None,
             on_step: StepCallback = None) -> list[np.ndarray]:
        """The edited image per (image, instruction); three guidance branches: full, no instruction, no image."""
        if len(images) != len(instructions):
            raise ValueError(f"{len(images)} images but {len(instructions)} instructions; give one per image")
        sampling = resolved(sampling or ImageSampling(), self.bundle.config)  # the image guidance of its path
        seeds = list(range(len(images))) if seeds is None else list(seeds)

        def run(lo, hi):
            src = [self.encode_image(im) for im in images[lo:hi]]
            ins = [Text(clean_text(t)) for t in instructions[lo:hi]]
            full = [self.prompt([s, t], "edit") for s, t in zip(src, ins)]
            no_text = [self.prompt([s], "edit") for s in src]
            no_image = [self.prompt([t], "edit") for t in ins]
            eng = self.engine()
            eng.start(full + no_text + no_image, branches=3)
            source = torch.stack([s.codes if s.codes is not None else s.latents for s in src])
            out = eng.generate_image(sampling, [sampling.guidance, sampling.image_guidance],
                                     self.generators(seeds[lo:hi]), on_step, source=source)
            return self.decode_images(out)

        return self._batched(len(images), batch_size, run, progress)

    def _answer(self, segments: list[list[Text | Image]], task: str, sampling: TextSampling, seeds,
                guide_from: int = 0) -> list[str]:
        """The text that follows each prompt of `segments`; with `sampling.image_guidance` != 1, guided from its
        `guide_from`-th token on by the same prompts without their images (Engine.generate_text)."""
        return [self.bundle.text.decode(i).strip()
                for i in self._answer_ids(segments, task, sampling, seeds, guide_from)]

    def _answer_ids(self, segments: list[list[Text | Image]], task: str, sampling: TextSampling, seeds,
                    guide_from: int = 0, trace: list[torch.Tensor] | None = None) -> list[list[int]]:
        """`_answer` as token ids; `trace` receives each step's log-probabilities (Engine.generate_text)."""
        prompts = [self.prompt(s, task) for s in segments]
        guided = sampling.image_guidance != 1.0
        if guided:
            prompts += [self.prompt([x for x in s if isinstance(x, Text)], task) for s in segments]
        eng = self.engine()
        eng.start(prompts, branches=2 if guided else 1)
        gens = self.generators(seeds) if sampling.temperature > 0 else None
        return eng.generate_text(sampling, gens, guide_from=guide_from if guided else None, trace=trace)

    def caption(self, images: Sequence[torch.Tensor], sampling: TextSampling | None = None, batch_size: int = 32,
                seeds: Sequence[int] | None = None, progress: Progress = None) -> list[str]:
        """A caption per image (`CAPTION_TEXT` unless `sampling` says otherwise)."""
        sampling = sampling or dataclasses.replace(CAPTION_TEXT)
        if sampling.rerank_words < 0:
            raise ValueError(f"rerank_words={sampling.rerank_words} must be 0 or more")
        seeds = list(range(len(images))) if seeds is None else list(seeds)

        def run(lo, hi):
            encoded = [self.encode_image(im) for im in images[lo:hi]]
            guide_from = 1  # the first word says a caption follows, which the image cannot weigh
            if not sampling.rerank_words:
                return self._answer([[im] for im in encoded], "caption", sampling, seeds[lo:hi], guide_from)
            trace: list[torch.Tensor] = []
            ids = self._answer_ids([[im] for im in encoded], "caption", sampling, seeds[lo:hi], guide_from, trace)
            return self._reranked(encoded, ids, torch.stack(trace, 1).float().cpu(), sampling, seeds[lo:hi],
                                  guide_from)

        return self._batched(len(images), batch_size, run, progress)

    def _reranked(self, images: list[Image], ids: list[list[int]], scores: torch.Tensor, sampling: TextSampling,
                  seeds: list[int], guide_from: int) -> list[str]:
        """Each image's caption `ids` against the captions that branch from it at its `sampling.rerank_words`
        least sure tokens from its `guide_from`-th on (`scores` (B, steps, V): the log-probabilities each token
        was picked from); the one that explains the image best as a text-to-image prompt wins (ties: the decoded
        caption)."""
        text = self.bundle.text
        options: list[list[list[int]]] = []
        prefixes: list[tuple[int, list[int]]] = []  # (image, ids) to decode on from
        for b, seq in enumerate(ids):
            mine = [list(seq)]
            steps = scores[b, :len(seq)]  # (n, V)
            chosen = steps.gather(1, torch.tensor(seq)[:, None])[:, 0]
            others = steps.scatter(1, torch.tensor(seq)[:, None], float("-inf")).topk(RERANK_ALTERNATIVES, -1)
            lead = chosen - others.values[:, 0]
            lead[:guide_from] = float("inf")  # tokens the image is not asked to weigh stay
            for p in lead.argsort()[:sampling.rerank_words].tolist():
                for alt, v in zip(others.indices[p].tolist(), others.values[p].tolist()):
                    if v < chosen[p] + math.log(TEXT_GUIDANCE_FLOOR):  # implausible: never a candidate
                        continue
                    if alt in (text.eos_id, text.boi_id):  # the caption ends there
                        mine.append(seq[:p] + [alt])
                    else:
                        prefixes.append((b, seq[:p] + [alt]))
            options.append(mine)
        if prefixes:  # decoded on, greedily and guided as the caption was, from each changed token
            on = self._answer_ids([[images[b], Text(text.decode(p), ids=p)] for b, p in prefixes], "caption",
                                  dataclasses.replace(sampling, temperature=0.0), [seeds[b] for b, _ in prefixes],
                                  guide_from=0)
            for (b, p), rest in zip(prefixes, on):
                options[b].append((p + rest)[:sampling.max_new_tokens])
        choices = [list(dict.fromkeys(c for c in (text.decode(o).strip() for o in mine) if clean_text(c)))
                   for mine in options]
        pairs = [(b, c) for b, mine in enumerate(choices) for c in mine]
        if not pairs:  # nothing but empty captions: nothing to weigh
            return [text.decode(seq).strip() for seq in ids]
        eng = self.engine()
        eng.start([self.prompt([Text(clean_text(c))], "t2i") for _, c in pairs])
        kind = "codes" if self.bundle.config.image_path == "discrete" else "latents"
        score = eng.image_scores(torch.stack([getattr(images[b], kind) for b, _ in pairs]),
                                 self.generators([seeds[b] for b, _ in pairs])).tolist()
        best: dict[int, tuple[float, int]] = {}
        for k, ((b, _), s) in enumerate(zip(pairs, score)):
            best[b] = min(best.get(b, (s, k)), (s, k))
        return [pairs[best[b][1]][1] if b in best else text.decode(seq).strip() for b, seq in enumerate(ids)]

    def answer(self, images: Sequence[torch.Tensor], questions: Sequence[str], sampling: TextSampling | None = None,
               batch_size: int = 32, seeds: Sequence[int] | None = None, progress: Progress = None) -> list[str]:
        """An answer per (image, question) (`as_question`)."""
        if len(images) != len(questions):
            raise ValueError(f"{len(images)} images but {len(questions)} questions; give one per image")
        sampling = sampling or TextSampling()
        seeds = list(range(len(images))) if seeds is None else list(seeds)
        return self._batched(len(images), batch_size, lambda lo, hi: self._answer(
            [[self.encode_image(im), Text(as_question(q))] for im, q in zip(images[lo:hi], questions[lo:hi])], "vqa",
            sampling, seeds[lo:hi]), progress)

    def story(self, prompt: str, seed: int = 0, max_images: int = 4, sampling: ImageSampling | None = None,
              text_sampling: TextSampling | None = None, on_step: StepCallback = None,
              on_piece: Callable[[StoryStep], None] | None = None) -> list[StoryStep]:
        """Free interleaved generation: the model writes text, opens images with `<boi>`, stops at `<eos>`
        (or after `max_images` images, with no text after the last one).

        The prompt's text comes first (`as_sentence`); guidance runs against the same story without the prompt.
        `on_piece(step)` is called with each piece as soon as it exists (to stream a story into a page).
        """
        sampling = sampling or ImageSampling()
        text_sampling = text_sampling or STORY_TEXT
        prompt = as_sentence(prompt)
        gens = self.generators([seed])
        eng = self.engine()
        eng.start([self.prompt([Text(prompt)], "story"), self.prompt([], "story")], branches=2)
        steps: list[StoryStep] = []

        def add(step: StoryStep) -> None:
            steps.append(step)
            if on_piece:
                on_piece(step)

        add(StoryStep(text=prompt))
        images = 0
        while True:
            ids = eng.generate_text(text_sampling, gens if text_sampling.temperature > 0 else None, stop_at_boi=True)[0]
            body = [i for i in ids if i not in (self.bundle.text.boi_id, self.bundle.text.eos_id)]
            if body:
                add(StoryStep(text=self.bundle.text.decode(body).strip()))
            if not ids or ids[-1] != self.bundle.text.boi_id:
                break
            # the sampled <boi> ended the text without entering the cache; generate_image feeds it. Guidance
            # (against the story without its prompt) draws the first image toward the prompt; a later image is
            # an edit of the one before, which that branch pulls back toward the prompt's scene: drawn unguided
            # (125 fresh stories, two bundles, seeds 5 and 23: 0.22-0.25 exact against 0.13-0.18 guided throughout).
            out = eng.generate_image(sampling, [sampling.guidance if images == 0 else 1.0], gens, on_step)
            add(StoryStep(image=self.decode_images(out)[0]))
            images += 1
            if images >= max_images:  # no text after the last image: it would be an instruction never drawn
                break
        return steps
