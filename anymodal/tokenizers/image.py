"""The image tokenizer folder: one format for VQ-VAEs and VAEs, loaded with one call.

A folder holds
    config.json        {"kind": "vqvae" | "vae", "config": {...the config dataclass...}}
    model.safetensors  the weights (and buffers: codebook, scale factor)
    README.md          a card: what it is, its config, its reconstruction metrics
Weights are read from safetensors only.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from anymodal.tokenizers.vae import VAE, VAEConfig
from anymodal.tokenizers.vqvae import VQVAE, VQVAEConfig

KINDS = {"vqvae": (VQVAE, VQVAEConfig), "vae": (VAE, VAEConfig)}
FORMAT_VERSION = 1


def tokenizer_kind(tok: VQVAE | VAE) -> str:
    """"vqvae" or "vae"."""
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


def save_image_tokenizer(tok: VQVAE | VAE, folder: str | Path, metrics: dict | None = None) -> Path:
    """Write `tok` to `folder` (config.json, model.safetensors, README.md) and return the folder."""
    kind = tokenizer_kind(tok)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config = tokenizer_config(tok)
    doc = {"kind": kind, "format_version": FORMAT_VERSION, "config": config}
    if metrics:
        doc["metrics"] = metrics
    (folder / "config.json").write_text(json.dumps(doc, indent=2) + "\n")
    state = {k: v.detach().cpu().contiguous() for k, v in tok.state_dict().items()}
    save_file(state, str(folder / "model.safetensors"), metadata={"kind": kind})
    (folder / "README.md").write_text(_card(kind, config, metrics, folder, tok))
    return folder


def load_image_tokenizer(folder: str | Path, device: str | torch.device = "cpu") -> VQVAE | VAE:
    """The tokenizer saved in `folder` by `save_image_tokenizer`, in eval mode."""
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
    if kind not in KINDS:
        raise ValueError(f"{folder / 'config.json'} has kind={kind!r}; expected one of {', '.join(KINDS)}")
    cls, config_cls = KINDS[kind]
    try:
        config = config_cls(**doc.get("config", {}))
    except TypeError as e:
        raise ValueError(f"{folder / 'config.json'} does not match {config_cls.__name__} ({e}); "
                         f"it was written by another version of anymodal") from e
    tok = cls(config)
    state = load_file(str(folder / "model.safetensors"), device=str(device))
    try:
        tok.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise ValueError(f"{folder / 'model.safetensors'} does not fit the {kind} in config.json: {e}") from e
    return tok.to(device).eval()
