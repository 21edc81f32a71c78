"""How text and images are sampled: the one home of every sampling default.

No torch here, so the CLI can build its `--help` from these fields without loading a model.
"""

from __future__ import annotations

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


@dataclass
class ImageSampling:
    """How images are generated. The defaults here are the only ones: the CLI, the benchmark and the app read them."""

    steps: int = 25
    """Denoising steps (continuous path)."""
    guidance: float = 3.0
    """Classifier-free guidance scale of the text condition (1 = no guidance)."""
    image_guidance: float = 1.5
    """Guidance scale of the source image (editing; 1 = no guidance)."""
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
    parallel_steps: int = 0
    """Discrete path: 0 decodes an image's codes one forward each (autoregressive); n > 0 decodes all of them in
    n parallel (MaskGIT-style) forwards, for bundles trained with `parallel_images` (anymodal.parallel)."""
