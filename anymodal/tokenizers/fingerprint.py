"""Fingerprints of tokenizer folders: a sha256 over the files that decide what a tokenizer produces.

Encoded data (`anymodal encode`) records the fingerprints of the tokenizers that made it, and training
refuses data whose fingerprints differ from the model's tokenizers. Cards, pictures and the folder's
name or place do not count, so a copied or moved folder keeps its fingerprint.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

IMAGE_FILES = ("config.json", "model.safetensors")
"""The files of an image tokenizer folder (anymodal.tokenizers.image) that decide its codes or latents."""

TEXT_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
              "vocab.json", "vocab.txt", "merges.txt", "tokenizer.model", "spiece.model")
"""The files of a Hugging Face tokenizer folder that decide its ids (those present are hashed)."""


def fingerprint(folder: str | Path, names: tuple[str, ...]) -> str:
    """sha256 (hex) over the name and content of each file of `names` present in `folder`."""
    folder = Path(folder)
    present = [name for name in names if (folder / name).is_file()]
    if not present:
        raise FileNotFoundError(f"{folder} holds none of {', '.join(names)}; it is not a tokenizer folder")
    digest = hashlib.sha256()
    for name in present:
        file_digest = hashlib.sha256()
        with (folder / name).open("rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                file_digest.update(block)
        digest.update(f"{name}\0{file_digest.hexdigest()}\n".encode())
    return digest.hexdigest()


def image_tokenizer_fingerprint(folder: str | Path) -> str:
    """The fingerprint of an image tokenizer folder: its config.json and model.safetensors."""
    return fingerprint(folder, IMAGE_FILES)


def text_tokenizer_fingerprint(folder: str | Path) -> str:
    """The fingerprint of a text tokenizer folder: its tokenizer files (any model weights beside them excluded)."""
    return fingerprint(folder, TEXT_FILES)
