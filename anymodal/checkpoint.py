"""Inference bundles: a folder that holds everything sampling needs, loaded with one call.

    BUNDLE/config.json          {"format": "anymodal-bundle", "model": ModelConfig, ...}
    BUNDLE/objective.json       the diffusion objective's whole config (continuous path), as diffusers saves
                                scheduler_config.json; the sampler may still be chosen at sampling time
    BUNDLE/model.safetensors    the sampling weights (the EMA when the run kept one)
    BUNDLE/text_tokenizer/      a Hugging Face tokenizer folder
    BUNDLE/image_tokenizer/     an image tokenizer folder (anymodal.tokenizers.image)

`export_hf` writes a discrete-path model as a standard Hugging Face causal-LM folder instead (transformers
loads it with no anymodal code); its `anymodal.json` makes `load_bundle` read it back as a bundle.

Weights are read from safetensors only; Lightning checkpoints are read with `weights_only=True`, so a
pickle that would run code is refused unread. A bundle is written beside its place and renamed into it when
complete (config.json last, with fingerprints of the tokenizer files): a full disk or a kill mid-save leaves
the previous bundle, and a tokenizer swapped in later is refused.
"""

from __future__ import annotations

import json
import math
import os
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from anymodal.atomic import atomic_folder
from anymodal.diffusion.schedule import objective_from_config
from anymodal.model.unified import ModelConfig, UnifiedModel
from anymodal.tokenizers.fingerprint import image_tokenizer_fingerprint, text_tokenizer_fingerprint
from anymodal.tokenizers.image import load_image_tokenizer, save_image_tokenizer
from anymodal.tokenizers.text import TextTokenizer, load_text_tokenizer

FORMAT = "anymodal-bundle"
FORMAT_VERSION = 1
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
FINGERPRINTS = {"image_tokenizer": image_tokenizer_fingerprint, "text_tokenizer": text_tokenizer_fingerprint}
"""The tokenizer folders whose fingerprints a bundle's config.json records: the model fits only the ones it was
trained with."""


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
    """Write a bundle folder from a model, its tokenizers and (continuous path) its objective's `config()`.

    The folder appears complete or not at all: it is written beside `folder` and renamed into place, replacing
    an old bundle only then (anymodal.atomic.atomic_folder); config.json, the bundle's mark, comes last."""
    folder = Path(folder)
    if model.config.image_path == "continuous" and objective is None:
        raise ValueError("a continuous-path bundle needs its diffusion objective's config")
    with atomic_folder(folder) as tmp:
        if objective is not None and model.config.image_path == "continuous":
            (tmp / "objective.json").write_text(json.dumps(objective, indent=2))
        state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": FORMAT})
        text.save(tmp / "text_tokenizer")
        save_image_tokenizer(image_tokenizer, tmp / "image_tokenizer", display_path=folder / "image_tokenizer")
        doc = {"format": FORMAT, "format_version": FORMAT_VERSION, "architecture": "anymodal-unified",
               "model": model.config.to_dict(), "fingerprints": _fingerprints(tmp), **(meta or {})}
        (tmp / "config.json").write_text(json.dumps(doc, indent=2))
    return folder


def _fingerprints(folder: Path) -> dict[str, str]:
    return {name: fingerprint(folder / name) for name, fingerprint in FINGERPRINTS.items()}


def _read_config(folder: Path) -> dict[str, Any]:
    if folder.is_file():
        kind = "a pickled checkpoint" if folder.suffix in PICKLE_SUFFIXES else "a file"
        raise BundleError(f"{str(folder)!r} is {kind}, not a bundle folder, and is not read; turn a training "
                          f"checkpoint into a bundle with `anymodal export --checkpoint {folder} --out BUNDLE`")
    if not folder.is_dir():
        raise BundleError(f"bundle folder {str(folder)!r} does not exist; export one with `anymodal export`")
    cfg = folder / "config.json"
    written = [name for name in ("model.safetensors", "text_tokenizer", "image_tokenizer") if (folder / name).exists()]
    if not cfg.is_file() and written:
        raise BundleError(f"{str(folder)!r} is a half-written bundle (it has {', '.join(written)} but no config.json, "
                          "which is written last); export it again with `anymodal export`")
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
    if (folder / HF_EXPORT_MARK).is_file():
        return _load_hf_export(folder, device, expect)
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
    for name in ("text_tokenizer", "image_tokenizer"):
        if not (folder / name).is_dir():
            raise BundleError(f"bundle {str(folder)!r} has no {name}/ folder, and the model cannot run without the "
                              "tokenizer it was trained with; export the bundle again with `anymodal export`")
    _check_fingerprints(folder, doc.get("fingerprints") or {})
    from anymodal.model.hf import load_matching

    model = UnifiedModel(config)
    try:
        load_matching(model, read_safetensors(weights), str(weights), "belong to another architecture than its config.json")
    except ValueError as e:
        raise BundleError(str(e)) from None
    model.eval().requires_grad_(False)
    text, image_tokenizer = _load_tokenizers(folder, folder / "text_tokenizer", config)
    objective = _read_objective(folder, doc) if config.image_path == "continuous" else None
    meta = {k: v for k, v in doc.items() if k not in ("model",)}
    return Bundle(model, text, image_tokenizer, objective, meta, str(folder)).to(device)


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file; a truncated or corrupt file is one clear BundleError."""
    try:
        return load_file(str(path))
    except Exception as e:  # noqa: BLE001 - safetensors raises its own SafetensorError (not an OSError) for bad files
        raise BundleError(f"{path} is truncated or corrupt ({str(e).splitlines()[0][:120]}); "
                          "export the bundle again") from None


def _check_fingerprints(folder: Path, fingerprints: dict[str, str]) -> None:
    """Refuse tokenizer folders that differ from the ones `save_bundle` wrote (bundles without fingerprints pass)."""
    for name, expected in fingerprints.items():
        if name in FINGERPRINTS and FINGERPRINTS[name](folder / name) != expected:
            raise BundleError(f"{folder / name} is not the tokenizer this model was trained with (its fingerprint "
                              "differs from the one the bundle recorded); restore the bundle's own tokenizer or "
                              "export the bundle again")


def _load_tokenizers(folder: Path, text_folder: Path, config: ModelConfig) -> tuple[TextTokenizer, Any]:
    """The text tokenizer (from `text_folder`) and the frozen image tokenizer of the bundle in `folder`, each
    checked against the model's config."""
    text = load_text_tokenizer(text_folder)
    if len(text) != config.text_vocab_size:
        raise BundleError(f"the text tokenizer in {str(folder)!r} has {len(text)} ids but the model expects "
                          f"{config.text_vocab_size}")
    image_tokenizer = load_image_tokenizer(folder / "image_tokenizer")
    image_tokenizer.eval().requires_grad_(False)
    _check_image_tokenizer(folder, config, image_tokenizer)
    return text, image_tokenizer


def _check_image_tokenizer(folder: Path, config: ModelConfig, tok) -> None:
    """Refuse an image tokenizer of another kind or shape than the model's (one sentence)."""
    from anymodal.tokenizers.image import tokenizer_kind

    kind = tokenizer_kind(tok)
    where = f"the image tokenizer in {str(folder / 'image_tokenizer')!r}"
    if config.image_path == "discrete" and kind != "vqvae" or config.image_path == "continuous" and kind != "vae":
        raise BundleError(f"{where} is a {kind}, but this {config.image_path}-path model was trained on a "
                          f"{'vqvae' if kind == 'vae' else 'vae'}; use the bundle's own tokenizer (export it again)")
    have, want = ((tok.codebook_size, config.codebook_size) if kind == "vqvae"
                  else (tok.latent_channels, config.latent_channels))
    if have != want:
        what = "codes" if kind == "vqvae" else "latent channels"
        raise BundleError(f"{where} has {have} {what} but the model was trained on {want}; use the bundle's own "
                          "tokenizer (export it again)")


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
        raise BundleError(f"{str(path)!r} is a folder: a sharded (ZeRO) checkpoint, read with read_zero_checkpoint")
    if not path.is_file():
        raise BundleError(f"checkpoint {str(path)!r} does not exist")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch raises many kinds for a bad file
        refused = refused_pickle(e)
        if refused:
            raise BundleError(f"{str(path)!r} was refused unread: it holds pickled {refused}, which torch's "
                              "weights_only loader does not run; load only checkpoints written by `anymodal fit`, "
                              "and share weights as bundles (safetensors)") from None
        raise BundleError(f"{str(path)!r} is not a readable Lightning checkpoint ({type(e).__name__}: "
                          f"{str(e).splitlines()[0][:200]})") from None


def refused_pickle(error: Exception) -> str | None:
    """What torch's weights_only unpickler refused in `error` ('code (posix.system)'), or None for other errors."""
    text = str(error)
    if "Weights only load failed" not in text:
        return None
    found = re.search(r"[Uu]nsupported (?:global: )?GLOBAL ([\w.]+)", text) or re.search(r"Unsupported operand (\d+)", text)
    return f"code or objects ({found.group(1)})" if found else "code or objects"


def export_checkpoint(checkpoint: str | os.PathLike, out: str | os.PathLike, meta: dict[str, Any] | None = None) -> Path:
    """Turn a unified-model Lightning checkpoint (a file, or the folder of a ZeRO run) into a bundle folder (EMA
    weights when kept).

    The checkpoint records the model config, the objective and the tokenizer folders (`UnifiedSystem.
    on_save_checkpoint`), so no LightningModule is rebuilt here."""
    path = Path(checkpoint)
    ckpts = read_zero_checkpoint(path) if path.is_dir() else [read_lightning_checkpoint(path)]
    ckpt = ckpts[0]
    record = ckpt.get("anymodal")
    if not isinstance(record, dict) or "model" not in record:
        raise BundleError(f"{checkpoint} is not a checkpoint of the unified model (it has no 'anymodal' record; "
                          "it was written by another system or by an anymodal older than the bundle exporter)")
    config = ModelConfig.from_dict(record["model"])
    state = ckpt.get("state_dict", {})
    text = load_text_tokenizer(record["text_tokenizer"])
    image_tokenizer = load_image_tokenizer(record["image_tokenizer"])
    expected = record.get("image_tokenizer_sha256")
    if expected is not None and image_tokenizer_fingerprint(record["image_tokenizer"]) != expected:
        raise BundleError(f"the image tokenizer folder {record['image_tokenizer']!r} is not the one {checkpoint} was "
                          "trained with (its fingerprint differs); restore that folder to export this checkpoint")
    model = UnifiedModel(config)
    try:
        model.load_state_dict(sampling_weights(path, ckpts))
        tokenizer_state = {k[len("image_tokenizer."):]: v for k, v in state.items() if k.startswith("image_tokenizer.")}
        if tokenizer_state:  # a run on encoded shards (pre_encoded) holds none: the folder's weights are the ones
            image_tokenizer.load_state_dict(tokenizer_state)
    except RuntimeError as e:
        raise BundleError(f"the weights in {checkpoint} do not fit the model config it records "
                          f"({str(e).splitlines()[0][:200]})") from None
    info = {"step": ckpt.get("global_step"), "checkpoint": str(checkpoint), **(meta or {})}
    objective = record.get("objective") if config.image_path == "continuous" else None
    return save_bundle(out, model, text, image_tokenizer, objective, info)


def sampling_weights(checkpoint: Path, ckpts: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    """The model weights a bundle holds, from a checkpoint's files (one, or one per rank of a ZeRO-3 run): the EMA
    when the run kept one (`anymodal.systems.ema`: its records put together), else the trained weights."""
    from anymodal.systems.ema import assemble_weights

    emas = [c.get("anymodal", {}).get("ema") for c in ckpts]
    state = ckpts[0].get("state_dict")
    if all(emas) and emas[0]["weights"]:
        try:
            averaged = assemble_weights(emas)
        except ValueError as e:
            raise BundleError(f"{checkpoint}: {e}") from None
        trained = {k[len("model."):]: v for k, v in (state or {}).items() if k.startswith("model.")}
        return {**trained, **averaged}  # weights that do not train (freeze_text) are not averaged
    if state is None:  # a ZeRO checkpoint: the trained weights are the fp32 partitions of the optimizer files
        state = consolidate_zero_checkpoint(checkpoint, ckpts[0])
    prefix = "ema.module." if any(k.startswith("ema.module.") for k in state) else "model."  # older checkpoints
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


# ---------------------------------------------------------------------------------------------- ZeRO checkpoints
def _zero_files(folder: Path, kind: str) -> list[Path]:
    """The `kind` ('model' or 'optim') state files of a DeepSpeed checkpoint folder, in rank order."""
    tag = (folder / "latest").read_text().strip() if (folder / "latest").is_file() else "checkpoint"
    files = list((folder / tag).glob(f"*{kind}_states.pt"))
    rank = lambda f: int(m.group(1)) if (m := re.search(r"zero_pp_rank_(\d+)_", f.name)) else 0  # noqa: E731
    return sorted(files, key=rank)


def read_zero_checkpoint(folder: str | os.PathLike) -> list[dict[str, Any]]:
    """The checkpoint entries of a DeepSpeed ZeRO checkpoint folder, as Lightning's DeepSpeedStrategy writes one:
    one dict per model-state file (ZeRO-3: one per rank; ZeRO-1/2: one), each holding Lightning's entries (the
    `anymodal` record with this rank's EMA, global_step, ...). Read with `weights_only=True`."""
    folder = Path(folder)
    files = _zero_files(folder, "model")
    if not files:
        raise BundleError(f"{str(folder)!r} is a folder but no DeepSpeed checkpoint (it has no */*model_states.pt); "
                          "pass a .ckpt file or the folder a ZeRO run saved as its checkpoint")
    return [read_lightning_checkpoint(f) for f in files]


def _deepspeed_classes() -> list:
    """DeepSpeed's data classes in its optimizer files, allowed to torch's weights-only unpickler (no code runs)."""
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, ZeroStageEnum, fragment_address]


def consolidate_zero_checkpoint(folder: str | os.PathLike, model_states: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The fp32 trained weights of a ZeRO-1/2/3 checkpoint folder, put together from every rank's optimizer file as
    DeepSpeed's zero_to_fp32.py does, but read with `weights_only=True`. `model_states`: a `read_zero_checkpoint`
    entry (it names the weights in the order the optimizer flattened them)."""
    folder = Path(folder)
    files = _zero_files(folder, "optim")
    with torch.serialization.safe_globals(_deepspeed_classes()):
        optim = [torch.load(f, map_location="cpu", weights_only=True, mmap=True)["optimizer_state_dict"] for f in files]
    stage = int(optim[0]["zero_stage"]) if optim else 0
    counts = optim[0]["partition_count"] if optim else 0  # ZeRO-1/2: one per parameter group
    world = max(counts) if isinstance(counts, list) else int(counts)
    if not optim or len(files) != world:
        raise BundleError(f"{str(folder)!r} holds {len(files)} optimizer files of a {world}-rank ZeRO run: a rank's "
                          "file is missing")
    if model_states.get("frozen_param_shapes") or model_states.get("shared_params"):
        raise BundleError(f"{str(folder)!r} holds frozen or shared weights, which this reader does not put together; "
                          "run the zero_to_fp32.py DeepSpeed wrote into the folder")
    weights, groups = {}, model_states["param_shapes"]  # [{name: shape}] per parameter group
    if stage <= 2:  # every group: the ranks' partitions one after another, weights in order, aligned
        paddings = optim[0].get("param_alignment_paddings")
        for g, shapes in enumerate(groups):
            flat, offset = torch.cat([o["single_partition_of_fp32_groups"][g] for o in optim]), 0
            for i, (name, shape) in enumerate(shapes.items()):
                weights[name] = flat[offset:offset + math.prod(shape)].view(shape).clone()
                offset += math.prod(shape) + (paddings[g][i] if paddings else 0)
            if not offset <= flat.numel() <= offset + 2 * world:
                raise BundleError(f"{str(folder)!r}: parameter group {g} holds {flat.numel()} elements, not {offset}")
    else:  # every weight: a partition of ceil(numel / ranks) elements on each rank, the last one padded
        flats, offset = [torch.cat(o["fp32_flat_groups"]) for o in optim], 0
        for name, shape in ((n, s) for shapes in groups for n, s in shapes.items()):
            size = math.ceil(math.prod(shape) / world)
            weights[name] = torch.cat([f[offset:offset + size] for f in flats])[:math.prod(shape)].view(shape).clone()
            offset += size
        if offset != flats[0].numel():
            raise BundleError(f"{str(folder)!r}: the optimizer files hold {flats[0].numel()} elements per rank, not {offset}")
    return weights


# ---------------------------------------------------------------------------------------------- Hugging Face export
HF_EXPORT_MARK = "anymodal.json"
"""The file that makes a folder written by `export_hf` loadable as a bundle (beside transformers' config.json)."""


def export_hf(source: str | os.PathLike, out: str | os.PathLike, meta: dict[str, Any] | None = None) -> Path:
    """A discrete-path bundle folder (or unified-model Lightning checkpoint) -> a standard Hugging Face folder.

        OUT/config.json, model.safetensors   the decoder as a Llama (Qwen2, Qwen3, Gemma: model.hf.export_family)
                                             causal LM over the text ids and the image codes (code k = id
                                             code_offset + k)
        OUT/tokenizer.json, ...              the text tokenizer, <boi>/<eoi> in its vocabulary
        OUT/image_tokenizer/                 the VQ-VAE that turns codes into pixels
        OUT/anymodal.json                    the bundle record: `load_bundle(OUT)` and `anymodal generate` sample from it

    `AutoModelForCausalLM` and `AutoTokenizer` load OUT with no anymodal code and give the bundle's logits.
    `meta` is added to the record (e.g. the training data's held-out pairs)."""
    from anymodal.model.hf import save_hf_model

    source = Path(source)
    if source.is_dir():
        bundle = load_bundle(source)
    else:
        with tempfile.TemporaryDirectory() as tmp:
            bundle = load_bundle(export_checkpoint(source, Path(tmp) / "bundle"))
    if bundle.image_path != "discrete":
        raise BundleError(f"{str(source)!r} is a continuous-path model: transformers has no class for its diffusion "
                          "head, so only discrete-path models export to --format hf; keep it as a bundle")
    config, text = bundle.config, bundle.text
    meta = {**{k: v for k, v in bundle.meta.items() if k not in ("format", "format_version", "fingerprints")},
            **(meta or {})}
    with atomic_folder(out) as tmp:
        save_hf_model(tmp, config.arch, bundle.model.state_dict(), config.vocab_size, text.bos_id, text.eos_id,
                      text.pad_id)
        text.save(tmp)
        save_image_tokenizer(bundle.image_tokenizer, tmp / "image_tokenizer", display_path=Path(out) / "image_tokenizer")
        doc = {**meta, "format": FORMAT, "format_version": FORMAT_VERSION, "layout": "hf",
               "model": config.to_dict(), "code_offset": config.code_offset}
        (tmp / HF_EXPORT_MARK).write_text(json.dumps(doc, indent=2))
    return Path(out)


def _load_hf_export(folder: Path, device: str | torch.device, expect: str | None) -> Bundle:
    """`load_bundle` of a folder `export_hf` wrote."""
    from anymodal.model.hf import load_matching, read_hf_model

    try:
        doc = json.loads((folder / HF_EXPORT_MARK).read_text())
        config = ModelConfig.from_dict(doc["model"])
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise BundleError(f"{folder / HF_EXPORT_MARK} does not describe an exported anymodal model ({e})") from None
    if expect is not None and config.image_path != expect:
        raise BundleError(f"{str(folder)!r} is a {config.image_path}-path model, but a {expect}-path one is needed")
    model = UnifiedModel(config)
    try:
        load_matching(model, read_hf_model(folder, tied=config.arch.tied_embeddings), str(folder))
    except ValueError as e:
        raise BundleError(str(e)) from None
    model.eval().requires_grad_(False)
    text, image_tokenizer = _load_tokenizers(folder, folder, config)
    meta = {k: v for k, v in doc.items() if k != "model"}
    return Bundle(model, text, image_tokenizer, None, meta, str(folder)).to(device)
