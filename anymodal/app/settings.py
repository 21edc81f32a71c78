"""What `anymodal serve` listens on and what one request may ask for (no Gradio here: the CLI's `--help`
reads these fields without importing it)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class ServeSettings:
    """Where the app listens and what one request may ask for."""

    host: str = "127.0.0.1"
    """Address to bind; 0.0.0.0 serves every network interface."""
    port: int | None = None
    """Port; None = 7860 or the next free one."""
    concurrency: int = 1
    """Requests sampled at once, all tabs together; the others wait in the queue."""
    queue_size: int = 16
    """Requests waiting at most; one more is refused with a message."""
    max_images: int = 8
    """Most images one text-to-image request may ask for."""
    max_steps: int = 100
    """Most denoising steps a request may ask for."""
    max_story_images: int = 8
    """Most images one story may ask for."""

    def __post_init__(self) -> None:
        for name in ("concurrency", "queue_size", "max_images", "max_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be at least 1")
        if self.max_story_images < 0:
            raise ValueError(f"max_story_images={self.max_story_images} must be >= 0")
