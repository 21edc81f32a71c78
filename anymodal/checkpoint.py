"""Inference bundles: a folder that holds everything sampling needs, loaded with one call.

    BUNDLE/config.json          {"format": "anymodal-bundle", "model": ModelConfig, ...}
    BUNDLE/objective.json       the diffusion objective's whole config (continuous path), as diffusers saves
                                scheduler_config.json; the sampler may still be chosen at sampling time
    BUNDLE/model.safetensors    the sampling weights (the EMA when the run kept one)
    BUNDLE/text_tokenizer/      a Hugging Face tokenizer folder
    BUNDLE/image_tokenizer/     an image tokenizer folder (anymodal.tokenizers.image)

Weights are read from safetensors only; Lightning checkpoints are read with `weights_only=True`.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from anymodal.diffusion.schedule import objective_from_config
from anymodal.model.unified import ModelConfig, UnifiedModel
from anymodal.tokenizers.image import load_image_tokenizer, save_image_tokenizer
from anymodal.tokenizers.text import TextTokenizer, load_text_tokenizer

FORMAT = "anymodal-bundle"
FORMAT_VERSION = 1
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


class BundleError(ValueError):
    """A folder that is not a usable anymodal bundle."""


@dataclass
class Bundle:
    """A loaded bundle: the model (eval mode), its tokenizers and its diffusion objective."""

    model: UnifiedModel
    text: TextTokenizer
    image_tokenizer: Any
    objective: Any
    meta: dict[str, Any] = field(default_factory=dict)
    folder: str = ""

    @property
    def config(self) -> ModelConfig:
        return self.model.config

    @property
    def image_path(self) -> str:
        """'discrete' or 'continuous'."""
        return self.model.config.image_path

    @property
    def image_size(self) -> int:
        """Side of the images in pixels: the model's grid times the image tokenizer's downsampling."""
        return self.config.grid * self.image_tokenizer.config.downsample

    def to(self, device: str | torch.device) -> Bundle:
        self.model.to(device)
        self.image_tokenizer.to(device)
        return self


def save_bundle(folder: str | os.PathLike, model: UnifiedModel, text: TextTokenizer, image_tokenizer,
                objective: dict[str, Any] | None, meta: dict[str, Any] | None = None) -> Path:
    """Write a bundle folder from a model, its tokenizers and (continuous path) its objective's `config()`."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    doc = {"format": FORMAT, "format_version": FORMAT_VERSION, "architecture": "anymodal-unified",
           "model": model.config.to_dict(), **(meta or {})}
    (folder / "config.json").write_text(json.dumps(doc, indent=2))
    if model.config.image_path == "continuous":
        if objective is None:
            raise ValueError("a continuous-path bundle needs its diffusion objective's config")
        (folder / "objective.json").write_text(json.dumps(objective, indent=2))
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    save_file(state, str(folder / "model.safetensors"), metadata={"format": FORMAT})
    text.save(folder / "text_tokenizer")
    save_image_tokenizer(image_tokenizer, folder / "image_tokenizer")
    return folder


def _read_config(folder: Path) -> dict[str, Any]:
    if not folder.is_dir():
        raise BundleError(f"bundle folder {str(folder)!r} does not exist; export one with `anymodal export`")
    cfg = folder / "config.json"
    if not cfg.is_file():
        pickles = [p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES]
        hint = (f" it holds {', '.join(pickles)}: pickled weights are refused; export a bundle with "
                "`anymodal export`") if pickles else ""
        raise BundleError(f"{str(folder)!r} has no config.json, so it is not an anymodal bundle;{hint}")
    try:
        doc = json.loads(cfg.read_text())
    except json.JSONDecodeError as e:
        raise BundleError(f"{cfg} is not valid JSON ({e.msg} at line {e.lineno})") from None
    if doc.get("format") != FORMAT:
        if "architectures" in doc or "model_type" in doc:
            what = f"a Hugging Face {doc.get('architectures') or doc.get('model_type')} model folder"
        elif "kind" in doc:
            what = f"an image tokenizer folder (kind={doc['kind']!r})"
        else:
            what = "something else"
        raise BundleError(f"{str(folder)!r} is {what}, not an anymodal bundle (config.json has no "
                          f"format={FORMAT!r}); point --checkpoint at a folder written by `anymodal export`")
    if doc.get("format_version", 0) > FORMAT_VERSION:
        raise BundleError(f"{str(folder)!r} is bundle format {doc['format_version']}; this anymodal reads up to "
                          f"{FORMAT_VERSION}: upgrade anymodal")
    return doc


def load_bundle(folder: str | os.PathLike, device: str | torch.device = "cpu",
                expect: str | None = None) -> Bundle:
    """Load a bundle folder. `expect` ('discrete' or 'continuous') refuses a bundle of the other path."""
    folder = Path(folder)
    doc = _read_config(folder)
    try:
        config = ModelConfig.from_dict(doc["model"])
    except (KeyError, TypeError, ValueError) as e:
        raise BundleError(f"{folder / 'config.json'} has an invalid model config: {e}") from None
    if expect is not None and config.image_path != expect:
        raise BundleError(f"{str(folder)!r} is a {config.image_path}-path bundle, but a {expect}-path one is needed")
    weights = folder / "model.safetensors"
    if not weights.is_file():
        raise BundleError(f"{str(folder)!r} has no model.safetensors (pickled weights are refused)")
    model = UnifiedModel(config)
    state = load_file(str(weights))
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    wrong = sorted(k for k in set(own) & set(state) if own[k].shape != state[k].shape)
    if missing or unexpected or wrong:
        detail = "; ".join(f"{name}: {', '.join(keys[:3])}{' ...' if len(keys) > 3 else ''}"
                           for name, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong))
                           if keys)
        raise BundleError(f"the weights in {weights} belong to another architecture than its config.json ({detail})")
    model.load_state_dict(state)
    model.eval().requires_grad_(False)
    text = load_text_tokenizer(folder / "text_tokenizer")
    if len(text) != config.text_vocab_size:
        raise BundleError(f"the text tokenizer in {str(folder)!r} has {len(text)} ids but the model expects "
                          f"{config.text_vocab_size}")
    image_tokenizer = load_image_tokenizer(folder / "image_tokenizer")
    image_tokenizer.eval().requires_grad_(False)
    objective = _read_objective(folder, doc) if config.image_path == "continuous" else None
    meta = {k: v for k, v in doc.items() if k not in ("model",)}
    return Bundle(model, text, image_tokenizer, objective, meta, str(folder)).to(device)


def _read_objective(folder: Path, doc: dict[str, Any]):
    path = folder / "objective.json"
    if not path.is_file():  # bundles written before objective.json named the objective in config.json
        return objective_from_config(doc.get("objective", "flow"))
    try:
        return objective_from_config(json.loads(path.read_text()))
    except (json.JSONDecodeError, ValueError) as e:
        raise BundleError(f"{path} does not describe a diffusion objective ({e})") from None


def read_lightning_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """A Lightning checkpoint file, read without unpickling arbitrary objects."""
    path = Path(path)
    if path.is_dir():
        raise BundleError(f"{str(path)!r} is a folder: a sharded (ZeRO) checkpoint; consolidate it with DeepSpeed's "
                          "zero_to_fp32 first, or pass a single .ckpt file")
    if not path.is_file():
        raise BundleError(f"checkpoint {str(path)!r} does not exist")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch raises many kinds for a bad file
        raise BundleError(f"{str(path)!r} is not a readable Lightning checkpoint ({type(e).__name__}: "
                          f"{str(e).splitlines()[0][:200]})") from None


def export_checkpoint(checkpoint: str | os.PathLike, out: str | os.PathLike, meta: dict[str, Any] | None = None) -> Path:
    """Turn a unified-model Lightning checkpoint into a bundle folder (EMA weights when kept).

    The checkpoint records the model config, the objective and the tokenizer folders (`UnifiedSystem.
    on_save_checkpoint`), so no LightningModule is rebuilt here."""
    ckpt = read_lightning_checkpoint(checkpoint)
    record = ckpt.get("anymodal")
    if not isinstance(record, dict) or "model" not in record:
        raise BundleError(f"{checkpoint} is not a checkpoint of the unified model (it has no 'anymodal' record; "
                          "it was written by another system or by an anymodal older than the bundle exporter)")
    config = ModelConfig.from_dict(record["model"])
    state = ckpt["state_dict"]
    prefix = "ema.module." if any(k.startswith("ema.module.") for k in state) else "model."
    text = load_text_tokenizer(record["text_tokenizer"])
    image_tokenizer = load_image_tokenizer(record["image_tokenizer"])
    model = UnifiedModel(config)
    try:
        model.load_state_dict({k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)})
        image_tokenizer.load_state_dict({k[len("image_tokenizer."):]: v for k, v in state.items()
                                         if k.startswith("image_tokenizer.")})
    except RuntimeError as e:
        raise BundleError(f"the weights in {checkpoint} do not fit the model config it records "
                          f"({str(e).splitlines()[0][:200]})") from None
    info = {"step": ckpt.get("global_step"), "checkpoint": str(checkpoint), **(meta or {})}
    objective = record.get("objective") if config.image_path == "continuous" else None
    return save_bundle(out, model, text, image_tokenizer, objective, info)
