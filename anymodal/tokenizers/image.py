"""The image tokenizer folder: one format for VQ-VAEs and VAEs, loaded with one call.

A folder holds
    config.json        {"kind": "vqvae" | "vae", "config": {...the config dataclass...}}
    model.safetensors  the weights (and buffers: codebook, scale factor)
    README.md          a card: what it is, its config, its reconstruction metrics
Weights are read from safetensors only. The folder is written beside its place and renamed into it when
complete (anymodal.atomic), so a full disk or a kill mid-save leaves the previous one.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from anymodal.atomic import atomic_folder
from anymodal.tokenizers.grid import latent_grid
from anymodal.tokenizers.vae import VAE, VAEConfig
from anymodal.tokenizers.vqvae import VQVAE, VQVAEConfig

KINDS = {"vqvae": (VQVAE, VQVAEConfig), "vae": (VAE, VAEConfig)}
FORMAT_VERSION = 1


def tokenizer_kind(tok: VQVAE | VAE | ImageTokenizerSpec) -> str:
    """"vqvae" or "vae"."""
    if isinstance(tok, ImageTokenizerSpec):
        return tok.kind
    for kind, (cls, _) in KINDS.items():
        if isinstance(tok, cls):
            return kind
    raise TypeError(f"expected a VQVAE or a VAE, got {type(tok).__name__}")


def tokenizer_config(tok: VQVAE | VAE) -> dict:
    """The config of `tok` as a JSON-ready dict (a VAE's measured scale factor included)."""
    config = asdict(tok.config)
    if isinstance(tok, VAE):
        config["scale_factor"] = tok.scale_factor
    return config


def _card(kind: str, config: dict, metrics: dict | None, folder: Path, tok: VQVAE | VAE) -> str:
    n_params = sum(p.numel() for p in tok.parameters())
    if kind == "vqvae":
        what = (f"A VQ-VAE image tokenizer: pixels (B, 3, H, W) in [0, 1] <-> discrete codes (B, H/{config['downsample']}, "
                f"W/{config['downsample']}) int64, {tok.codebook_size} codes ({config['quantizer']} quantizer).")
        use = "codes = tok.encode(pixels)  # (B, h, w) int64\npixels = tok.decode(codes)"
    else:
        what = (f"A VAE image tokenizer (diffusers AutoencoderKL): pixels (B, 3, H, W) in [0, 1] <-> latents "
                f"(B, {config['latent_channels']}, H/{tok.downsample}, W/{tok.downsample}), multiplied by the "
                f"scale factor {tok.scale_factor:.4f}.")
        use = "latents = tok.encode(pixels)  # (B, C, h, w), scaled\npixels = tok.decode(latents)"
    lines = [f"# {folder.name}", "", what, "", f"Parameters: {n_params / 1e6:.2f}M.", "", "## Use", "", "```python",
             "from anymodal.tokenizers.image import load_image_tokenizer", "",
             f'tok = load_image_tokenizer("{folder}")', use, "```", "", "## Config", "", "| field | value |",
             "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in config.items()]
    lines += ["", "## Reconstruction metrics", ""]
    if metrics:
        lines += ["| metric | value |", "|---|---|"]
        lines += [f"| {k} | {v:.4f} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in metrics.items()]
    else:
        lines.append("Not measured.")
    return "\n".join(lines) + "\n"


def save_image_tokenizer(tok: VQVAE | VAE, folder: str | Path, metrics: dict | None = None,
                         display_path: str | Path | None = None) -> Path:
    """Write `tok` to `folder` (config.json, model.safetensors, README.md) and return the folder.

    The folder appears complete or not at all (an old one is replaced only then). `display_path`: the path
    the README's example loads from (default: `folder`; a bundle writes its tokenizer from a temporary folder)."""
    kind = tokenizer_kind(tok)
    folder = Path(folder)
    config = tokenizer_config(tok)
    doc = {"kind": kind, "format_version": FORMAT_VERSION, "config": config}
    if metrics:
        doc["metrics"] = metrics
    with atomic_folder(folder) as tmp:
        state = {k: v.detach().cpu().contiguous() for k, v in tok.state_dict().items()}
        save_file(state, str(tmp / "model.safetensors"), metadata={"kind": kind})
        (tmp / "README.md").write_text(_card(kind, config, metrics, Path(display_path or folder), tok))
        (tmp / "config.json").write_text(json.dumps(doc, indent=2) + "\n")
    return folder


def load_image_tokenizer(folder: str | Path, device: str | torch.device = "cpu") -> VQVAE | VAE:
    """The tokenizer saved in `folder` by `save_image_tokenizer`, in eval mode."""
    folder = Path(folder)
    kind, config = read_image_tokenizer_config(folder)
    tok = KINDS[kind][0](config)
    try:
        state = load_file(str(folder / "model.safetensors"), device=str(device))
    except Exception as e:  # noqa: BLE001 - safetensors raises its own SafetensorError for a bad file
        raise ValueError(f"{folder / 'model.safetensors'} is truncated or corrupt ({str(e).splitlines()[0][:120]}); "
                         "save or export the tokenizer again") from None
    try:
        tok.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise ValueError(f"{folder / 'model.safetensors'} does not fit the {kind} in config.json: {e}") from e
    return tok.to(device).eval()


def read_image_tokenizer_config(folder: str | Path) -> tuple[str, VQVAEConfig | VAEConfig]:
    """(kind, config) of the tokenizer saved in `folder`, read from its config.json alone."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"image tokenizer folder {str(folder)!r} does not exist; train one with "
                                f"`anymodal fit --config recipes/tokenizers/<name>.yaml` or fix the path")
    for name in ("config.json", "model.safetensors"):
        if not (folder / name).is_file():
            raise FileNotFoundError(f"{folder / name} is missing; {folder} is not a complete image tokenizer "
                                    f"folder (it needs config.json and model.safetensors)")
    try:
        doc = json.loads((folder / "config.json").read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{folder / 'config.json'} is not valid JSON ({e}); re-export the tokenizer") from e
    kind = doc.get("kind")
    if kind is None and doc.get("format") == "anymodal-bundle":
        raise ValueError(f"{str(folder)!r} is an anymodal bundle, not an image tokenizer folder; its tokenizer is "
                         f"{str(folder / 'image_tokenizer')!r}")
    if kind not in KINDS:
        raise ValueError(f"{folder / 'config.json'} has kind={kind!r}; expected one of {', '.join(KINDS)}")
    config_cls = KINDS[kind][1]
    try:
        return kind, config_cls(**doc.get("config", {}))
    except TypeError as e:
        raise ValueError(f"{folder / 'config.json'} does not match {config_cls.__name__} ({e}); "
                         f"it was written by another version of anymodal") from e


@dataclass(frozen=True)
class ImageTokenizerSpec:
    """What the unified model needs to know of an image tokenizer, without its weights (for training on
    data it encoded beforehand): its kind, its downsampling, and its codebook size or latent channels."""

    kind: str
    downsample: int
    codebook_size: int = 0
    latent_channels: int = 0

    def grid(self, image_size: int | tuple[int, int]) -> tuple[int, int]:
        """Code or latent grid (h, w) of an image of side `image_size` (or (H, W))."""
        return latent_grid(image_size, self.downsample)


def read_image_tokenizer_spec(folder: str | Path) -> ImageTokenizerSpec:
    """The spec of the tokenizer saved in `folder`, from its config.json alone (no weights are read)."""
    kind, config = read_image_tokenizer_config(folder)
    if kind == "vqvae":
        size = math.prod(config.fsq_levels) if config.quantizer == "fsq" else config.codebook_size
        return ImageTokenizerSpec(kind, config.downsample, codebook_size=size)
    return ImageTokenizerSpec(kind, config.downsample, latent_channels=config.latent_channels)
