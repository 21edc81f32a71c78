"""How text and images are sampled: the one home of every sampling default.

No torch here, so the CLI can build its `--help` from these fields without loading a model.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

StepCallback = Callable[[int, int], None] | None
"""Called after each step of an image as `(done, total)`: denoising steps (continuous) or codes (discrete)."""


@dataclass
class TextSampling:
    """How text is decoded. The defaults here are the only ones: the CLI, the benchmark and the app read them."""

    temperature: float = 0.0
    """Softmax temperature; 0 decodes greedily."""
    top_k: int = 0
    """Keep only the k most likely tokens (0 = all)."""
    top_p: float = 1.0
    """Keep the smallest set of tokens whose probability reaches p (1 = all)."""
    max_new_tokens: int = 48
    """Most tokens generated before stopping."""
    stop: tuple[str, ...] = ()
    """Stop once the generated text ends with one of these strings."""
    image_guidance: float = 1.0
    """Captions and answers: guidance of the prompt's images over the same prompt without them (1 = none); each
    token's log-probability gains (w - 1) times what the images add to it, among the tokens the model finds
    plausible with them (`TEXT_GUIDANCE_FLOOR`)."""
    rerank_words: int = 0
    """Captions: at the decoded caption's `rerank_words` least sure tokens after its first (the smallest lead of
    the chosen token over the next), each of the next `RERANK_ALTERNATIVES` likeliest tokens the model finds
    plausible there (`TEXT_GUIDANCE_FLOOR` of the chosen one's probability) starts another caption, decoded on
    from it as the first was; of them all, the one under which the model finds the image likeliest as a
    text-to-image prompt is kept (`Engine.image_scores`). 0: the decoded caption."""


RERANK_ALTERNATIVES = 2
"""Tokens tried in place of each least sure token of a caption (`TextSampling.rerank_words`)."""


SCORE_LEVELS = 8
"""Noise levels at which `Engine.image_scores` reads how well a prompt explains a continuous image."""


TEXT_GUIDANCE_FLOOR = 0.02
"""Guided text never picks a token whose probability given the images is below this share of the likeliest one's
(the plausibility bound of contrastive decoding): guidance reorders what the images allow, and adds nothing else."""


CAPTION_TEXT = TextSampling(image_guidance=3.0, rerank_words=3)
"""How a caption is decoded: greedy, guided by its image at 3 from its second word on (its first says a caption
follows the image, not a question, which the prompt without the image cannot weigh), then reranked: the captions
that branch from it at its three least sure tokens compete by how well each explains the image as a text-to-image
prompt, which the model learnt from every picture it drew (`rerank_words`). A held-out purple triangle is read
as purple at 0.61 on average and as blue at 0.32 by the text, but as a text-to-image prompt "purple" explains its
picture better in 56 of 56. Of 200 fresh held-out captions (scene seed 777), four 24-px demo bundles wrote 163,
134 (transfusion) and 62, 58 (chameleon) exact without reranking and 197, 196 and 126, 109 with it; seen
captions 200, 200, 192, 194 and 200, 200, 198, 200 (benchmarks/README.md, "Captions reranked by their image").
Held-out compositions are
where a caption fails, and the text alone is what pulls it there: the model has read "purple" before "circle" and
"square" under images but never before "triangle". Of 200 fresh held-out captions, five bundles (four
transfusion, one chameleon) wrote 140, 88, 145, 135 exact unguided and 149, 114, 153, 152 at 3 (the fifth: 172),
seen captions 198-200 of 200 either way (benchmarks/README.md, "Captions guided by their image"). Answers stay
unguided: at 3 they gained on held-out scenes (+2 to +8 of 200) and lost on seen ones (-1 to -6)."""


STORY_TEXT = TextSampling(temperature=1.0, top_p=0.9)
"""How a story's own text is sampled (captions and answers stay greedy). Greedy text picks the likelier next
edit word every time, and a story's "then" (another edit follows) narrowly outweighs "finally" (the last one):
63-78 of 80 greedy stories ran to 4 images where the training stories hold 2, 3 and 4 in 35%, 41% and 24%.
Sampled at temperature 1 the lengths follow the training stories, and top-p 0.9 leaves out unlikely words: of
320 fresh stories (four transfusion bundles, 80 each) 149 exact against 116 greedy and 140 at top-p 1, and 42
wrote an edit the scene does not allow against 69 and 60 (benchmarks/README.md, "Stories: what goes wrong")."""


@dataclass
class ImageSampling:
    """How images are generated. The defaults here are the only ones: the CLI, the benchmark and the app read them."""

    steps: int = 25
    """Denoising steps (continuous path)."""
    guidance: float = 3.0
    """Classifier-free guidance scale of the text condition (1 = no guidance)."""
    image_guidance: float | None = None
    """Guidance scale of the source image (editing; 1 = no guidance; None = `IMAGE_GUIDANCE` of the bundle's
    path)."""
    guidance_interval: tuple[float, float] = (0.0, 1.0)
    """Apply guidance only on this fraction of the trajectory (0 = first, noisiest step; 1 = end)."""
    sampler: str | None = None
    """Diffusion sampler (continuous path): None = the bundle objective's own; flow: euler | heun,
    ddpm: ddim | ddpm."""
    temperature: float = 0.3
    """Temperature of code sampling (discrete path); 0 = greedy. 0.3 drew about twice as many exact
    shapes-world scenes as 1.0 (docs/design.md)."""
    top_k: int = 0
    """Top-k of code sampling (discrete path); 0 = all codes."""
    keep_source: float | None = None
    """Edits: how strongly what the instruction does not name stays as it was in the source image (0 = not at
    all; None = `KEEP_SOURCE` of the bundle's path). Discrete path: log-probability added to each slot's source
    code. Continuous path (0-1): at every denoising step, the clean latents the model predicts move this share of
    the way to the source's, at each position where they already lie near it (`KEEP_RADIUS`)."""
    parallel_steps: int | None = None
    """Discrete path: None decodes as the bundle was trained to (`decoding`): in `PARALLEL_STEPS` parallel
    (MaskGIT-style) forwards for a bundle trained with `parallel_images`, one code per forward otherwise; 0 one
    code per forward (autoregressive); n > 0 all codes in n parallel forwards (such bundles; anymodal.parallel)."""


PARALLEL_STEPS = 8
"""Parallel steps of a bundle trained with `parallel_images` when a request names none. On the demo's chameleon
bundle (with code_positions) 4, 8 and 16 steps drew 0.66, 0.69 and 0.63 of t2i scenes exactly, one code per
forward 0.36 (benchmarks/README.md)."""


KEEP_SOURCE = {"discrete": 3.0, "continuous": 0.3}
"""`keep_source` of an edit that names none. Fresh edits (300 scenes) of the demo's bundles: chameleon 0.35 exact
against 0.25 with 0 (seed 11; 0.20 against 0.15 on a shorter-trained bundle). Transfusion: 0.43 against 0.30 on
an AdamW bundle at 0.7; on three Muon-trained bundles 0.3 with image guidance 2 drew 0.75-0.77 against 0.67-0.72
at 0.7 and 1.5, seeds 19 and 29 (benchmarks/README.md, "Edits that keep the rest of the image")."""

IMAGE_GUIDANCE = {"discrete": 1.5, "continuous": 2.0}
"""`image_guidance` of an edit that names none. Chameleon: 1.5 drew 0.40 of 300 fresh edits, 2.0 0.37, 1.0 0.38
(seed 11); transfusion: see KEEP_SOURCE."""

KEEP_RADIUS = 0.45
"""Continuous `keep_source`: the pull toward the source at a latent position is exp(-(d / KEEP_RADIUS)^2) of
it, d the root-mean-square distance over channels between the predicted clean latents and the source's there
(latents are scaled to unit variance: a position whose content changes lies about 1 or more away)."""


def keep_source(sampling: ImageSampling, image_path: str) -> float:
    """The `keep_source` an edit on `image_path` uses; refuses one that path cannot use, in one sentence."""
    keep = KEEP_SOURCE[image_path] if sampling.keep_source is None else float(sampling.keep_source)
    top = 1.0 if image_path == "continuous" else float("inf")
    if not 0 <= keep <= top or keep == float("inf"):
        scale = "between 0 and 1 on the continuous path" if image_path == "continuous" else "a finite number >= 0"
        raise ValueError(f"keep_source={sampling.keep_source} must be {scale}")
    return keep


def decoding(sampling: ImageSampling, config) -> ImageSampling:
    """`sampling` with `parallel_steps` as a bundle of `config` (its ModelConfig) decodes: a number for a bundle
    trained with parallel images (`PARALLEL_STEPS` where none was asked for, 0 = autoregressive), None
    (autoregressive) for any other bundle asked for None or 0. A positive number stays as asked, so a bundle
    that cannot decode in parallel refuses it in one sentence."""
    steps = sampling.parallel_steps
    if config.mask_code:
        steps = PARALLEL_STEPS if steps is None else steps
    elif not steps:
        steps = None
    return dataclasses.replace(sampling, parallel_steps=steps)


def resolved(sampling: ImageSampling, config) -> ImageSampling:
    """`sampling` as a bundle of `config` (its ModelConfig) uses it: `keep_source` and `image_guidance` resolved
    for its path (a `keep_source` the path cannot use refused in one sentence) and, on the discrete path,
    `decoding`'s parallel steps. The engine samples with it and records keep it."""
    guidance = IMAGE_GUIDANCE[config.image_path] if sampling.image_guidance is None else sampling.image_guidance
    sampling = dataclasses.replace(sampling, keep_source=keep_source(sampling, config.image_path),
                                   image_guidance=guidance)
    return decoding(sampling, config) if config.image_path == "discrete" else sampling
