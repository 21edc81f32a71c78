"""Documents become token sequences: text ids, and per image `<boi>` + slots + `<eoi>`.

Discrete path: the slots are the image's codes (filled in after the frozen VQ-VAE encodes the pixels).
Continuous path: the slots are patch placeholders; the model embeds the VAE latents there.

Which images are generated (trained as targets): every image of a story, and the last image of
t2i and edit documents. Images that only condition (caption/vqa inputs, an edit's source) are context.
A continuous image that is both a target and context for later tokens (every story image, the last one
included: its `<eos>` is read after it) follows `context_policy`:
"clean_and_noised" (default: a noised copy that later tokens cannot see, then a clean copy they can)
or "shared" (one noised copy that later tokens also see; cheaper).
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Literal

from anymodal.batch import CONTINUOUS_IMAGE, DISCRETE_IMAGE
from anymodal.data.document import Document, Image, Text
from anymodal.tokenizers.text import TextTokenizer

ImagePath = Literal["discrete", "continuous"]


@dataclass
class EncodedDocument:
    """One document as a token sequence (offsets relative to its start).

    tokens:    ids; image slots hold the pad id until codes are filled in
    loss_mask: True where position t is trained to predict tokens[t + 1]
    spans:     (kind, offset, length) of each image's slots
    images:    the Image segment behind each span (a segment may appear twice: noised and clean copy)
    noised:    per span: the slots get a noised latent and a timestep (continuous targets)
    visible:   per span: later tokens may attend to it
    """

    tokens: list[int]
    loss_mask: list[bool]
    spans: list[tuple[int, int, int]] = field(default_factory=list)
    images: list[Image] = field(default_factory=list)
    noised: list[bool] = field(default_factory=list)
    visible: list[bool] = field(default_factory=list)
    task: str = "text"

    def __len__(self) -> int:
        return len(self.tokens)


def generated_images(doc: Document) -> list[bool]:
    """Per Image segment: is it a generation target (True) or only context (False)?"""
    n = len(doc.images)
    if doc.task == "story":
        return [True] * n
    if doc.task in ("t2i", "edit"):
        return [i == n - 1 for i in range(n)]
    return [False] * n


def drop_conditions(doc: Document, rng: random.Random, p_text: float, p_image: float) -> Document:
    """Classifier-free guidance dropout: drop a t2i caption, or an edit's instruction and/or source image."""
    if doc.task == "t2i" and rng.random() < p_text:
        return Document([s for s in doc.segments if isinstance(s, Image)], doc.task, doc.meta)
    if doc.task == "edit" and len(doc.segments) == 3:
        src, instr, tgt = doc.segments
        keep = [s for s, drop in ((src, rng.random() < p_image), (instr, rng.random() < p_text)) if not drop]
        return Document([*keep, tgt], doc.task, doc.meta)
    return doc


class SequenceEncoder:
    """Turns Documents into EncodedDocuments for one image path."""

    def __init__(self, text: TextTokenizer, image_path: ImagePath, slots: int,
                 context_policy: Literal["clean_and_noised", "shared"] = "clean_and_noised",
                 train_context_images: bool = False) -> None:
        """
        Args:
            text: the text tokenizer (its specials frame documents and images).
            image_path: "discrete" (VQ codes in the vocabulary) or "continuous" (VAE latent patches).
            slots: sequence positions per image (codes h*w, or patches per image).
            context_policy: how a continuous image that is a target and context enters the sequence.
            train_context_images: also train on images that only condition (codes' cross-entropy, or diffusion).
        """
        if image_path not in ("discrete", "continuous"):
            raise ValueError(f"image_path={image_path!r} must be 'discrete' or 'continuous'")
        if context_policy not in ("clean_and_noised", "shared"):
            raise ValueError(f"context_policy={context_policy!r} must be 'clean_and_noised' or 'shared'")
        self.text, self.image_path, self.slots = text, image_path, slots
        self.context_policy, self.train_context_images = context_policy, train_context_images

    def encode(self, doc: Document, add_eos: bool = True) -> EncodedDocument:
        """The training sequence of `doc`: `<bos>` + segments + `<eos>`."""
        return self._encode(doc, generated_images(doc), add_eos)

    def encode_prompt(self, doc: Document) -> EncodedDocument:
        """A sampling prompt: `<bos>` + segments, every image clean context, no `<eos>`."""
        return self._encode(doc, [False] * len(doc.images), add_eos=False)

    def _encode(self, doc: Document, generated: list[bool], add_eos: bool) -> EncodedDocument:
        t = self.text
        out = EncodedDocument(tokens=[t.bos_id], loss_mask=[], task=doc.task)
        # loss flags are attached to *next* tokens while building: predicted[i] says whether tokens[i] is trained.
        predicted: list[bool] = [False]
        targets = iter(generated)
        segments = doc.segments
        for si, seg in enumerate(segments):
            if isinstance(seg, Text):
                ids = t.encode(seg.text) if seg.ids is None else list(seg.ids)
                out.tokens += ids
                predicted += [True] * len(ids)
                continue
            is_target = next(targets) or self.train_context_images
            # a story's last image is context too: sampling decides what follows it (more text or <eos>) after
            # its clean copy, so training must predict <eos> there, not after the noised copy
            has_context_after = si < len(segments) - 1 or (add_eos and doc.task == "story")
            out.tokens.append(t.boi_id)
            predicted.append(True)
            if self.image_path == "discrete":
                self._add_span(out, predicted, DISCRETE_IMAGE, seg, noised=False, visible=True, trained=is_target)
            elif not is_target:
                self._add_span(out, predicted, CONTINUOUS_IMAGE, seg, noised=False, visible=True, trained=False)
            elif has_context_after and self.context_policy == "clean_and_noised":
                self._add_span(out, predicted, CONTINUOUS_IMAGE, seg, noised=True, visible=False, trained=False)
                self._add_span(out, predicted, CONTINUOUS_IMAGE, seg, noised=False, visible=True, trained=False)
            else:
                self._add_span(out, predicted, CONTINUOUS_IMAGE, seg, noised=True, visible=True, trained=False)
            out.tokens.append(t.eoi_id)
            predicted.append(True)
        if add_eos:
            out.tokens.append(t.eos_id)
            predicted.append(True)
        # position i predicts token i+1; a continuous slot is never a CE target, nor is a slot predicted from one.
        out.loss_mask = [predicted[i + 1] for i in range(len(out.tokens) - 1)] + [False]
        for kind, off, length in out.spans:
            if kind == CONTINUOUS_IMAGE:
                for p in range(off, off + length):
                    out.loss_mask[p] = False
        return out

    def _add_span(self, out: EncodedDocument, predicted: list[bool], kind: int, image: Image,
                  noised: bool, visible: bool, trained: bool) -> None:
        out.spans.append((kind, len(out.tokens), self.slots))
        out.images.append(image)
        out.noised.append(noised)
        out.visible.append(visible)
        out.tokens += [self.text.pad_id] * self.slots
        predicted += [trained] * self.slots
