"""Hardening: every bad input and every fault, through the real command, with nothing lost.

The fuzz list (CASES) runs each case through `anymodal.commands.cli.main`: a bad input ends with exit 2 and a
last stderr line `anymodal CMD: error: ...` that names the problem (no traceback), and leaves no output that
looks complete; a valid but unusual input (CMYK, 16-bit, palette with alpha, ...) is converted and works.
docs/fuzz-cases.md lists every case with its message (ANYMODAL_WRITE_FUZZ_DOC=1 rewrites it from a run).

Then the faults: a non-finite loss or gradient costs exactly one step; SIGTERM mid-epoch saves a checkpoint
that resumes exactly, SIGINT too; an interrupted or killed save leaves the last good checkpoint, bundle or
tokenizer folder; a malicious pickle is refused without running; a pretrained VAE reloads bit-identically;
outputs never mix two runs and index.jsonl never names a missing file.
"""

from __future__ import annotations

import copy
import dataclasses
import errno
import io
import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import tarfile
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import ROOT, TEXT_TOKENIZER
from lightning.pytorch import Callback, Trainer
from lightning.pytorch.loggers import CSVLogger
from PIL import Image as PILImage

from anymodal.checkpoint import load_bundle, save_bundle
from anymodal.commands.cli import main
from anymodal.data.datamodule import UnifiedDataModule
from anymodal.data.images import load_image
from anymodal.data.shapes import ShapesWorld
from anymodal.systems.faults import SafeCheckpointIO, StopOnSignal
from anymodal.tokenizers.image import load_image_tokenizer, save_image_tokenizer
from anymodal.tokenizers.vae import VAE, VAEConfig

RECIPE = ROOT / "recipes" / "models" / "transfusion-shapes.yaml"
CPU = ROOT / "recipes" / "strategy" / "cpu.yaml"
DOC = ROOT / "docs" / "fuzz-cases.md"


# ------------------------------------------------------------------------------------------------ the setting
@pytest.fixture(scope="module")
def bundle_dir(tokenizer_dirs, tmp_path_factory) -> str:
    """A continuous-path debug bundle (32 px images, 16 slots, context 512), random heads."""
    from anymodal.systems.unified import UnifiedSystem

    torch.manual_seed(0)
    system = UnifiedSystem(text_tokenizer=TEXT_TOKENIZER, image_tokenizer=tokenizer_dirs["continuous"], size="debug",
                           ema_decay=0.0)
    system.configure_model()
    with torch.no_grad():
        system.model.lm_head.weight.normal_(std=0.2)
    folder = tmp_path_factory.mktemp("hardening") / "bundle"
    return str(save_bundle(folder, system.model, system.text, system.image_tokenizer, system.objective.config()))


@dataclass
class Env:
    """Where a case writes its inputs (tmp), the shared bundle and tokenizer folders."""

    tmp: Path
    bundle: str
    tokenizers: dict[str, str]

    @property
    def out(self) -> Path:
        return self.tmp / "out"

    @property
    def marker(self) -> Path:
        """The file a malicious pickle would create."""
        return self.tmp / "pwned"

    def bundle_copy(self) -> Path:
        return Path(shutil.copytree(self.bundle, self.tmp / "bundle"))

    def write(self, name: str, data: bytes | str) -> str:
        path = self.tmp / name
        path.write_bytes(data.encode() if isinstance(data, str) else data)
        return str(path)


@pytest.fixture
def env(tmp_path, bundle_dir, tokenizer_dirs) -> Env:
    return Env(tmp_path, bundle_dir, tokenizer_dirs)


# ------------------------------------------------------------------------------------------------ inputs
def encoded(image: PILImage.Image, fmt: str = "PNG", **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **kwargs)
    return buffer.getvalue()


def noise(w: int, h: int, seed: int = 0) -> PILImage.Image:
    return PILImage.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def bomb_png(width: int = 100_000, height: int = 100_000) -> bytes:
    """A 1x1 PNG whose header claims width x height pixels (CRC fixed, so only the size is wrong)."""
    data = bytearray(encoded(PILImage.new("RGB", (1, 1), (255, 0, 0))))
    ihdr = 8 + 8  # signature, then length + type of the first chunk
    data[ihdr:ihdr + 8] = struct.pack(">II", width, height)
    data[ihdr + 13:ihdr + 17] = struct.pack(">I", zlib.crc32(bytes(data[ihdr - 4:ihdr + 13])))
    return bytes(data)


def gray16(w: int = 32, h: int = 32) -> PILImage.Image:
    ramp = np.linspace(0, 65535, w * h).reshape(h, w).astype(np.uint16)  # (H, W) over the whole 16-bit range
    return PILImage.fromarray(ramp)


def palette_alpha(size: int = 32) -> PILImage.Image:
    """A palette image: left half transparent (index 0), right half red (index 1)."""
    image = PILImage.new("P", (size, size), 0)
    image.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    image.paste(1, (size // 2, 0, size, size))
    image.info["transparency"] = 0
    return image


def animated_gif(size: int = 32) -> bytes:
    frames = [PILImage.new("RGB", (size, size), c) for c in ((255, 0, 0), (0, 0, 255))]
    return encoded(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)


def banded(w: int = 64, h: int = 32) -> PILImage.Image:
    """Blue | red | green bands: a center crop to a square keeps only the red middle."""
    array = np.zeros((h, w, 3), dtype=np.uint8)
    array[:, : w // 4] = (0, 0, 255)
    array[:, w // 4: 3 * w // 4] = (255, 0, 0)
    array[:, 3 * w // 4:] = (0, 255, 0)
    return PILImage.fromarray(array)


class _Evil:
    """Unpickling this runs `touch MARKER` (what a malicious checkpoint does)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def malicious_ckpt(env: Env, name: str = "evil.ckpt") -> str:
    path = env.tmp / name
    torch.save({"state_dict": {}, "anymodal": {"model": {}}, "payload": _Evil(env.marker)}, path)
    return str(path)


# ------------------------------------------------------------------------------------------------ commands
def caption(env: Env, image: str) -> list[str]:
    return ["generate", "caption", "--checkpoint", env.bundle, "--image", image, "--max-new-tokens", "2", "--json"]


def t2i(env: Env, *args: str, checkpoint: str | None = None) -> list[str]:
    return ["generate", "t2i", "--checkpoint", checkpoint or env.bundle, *args, "--steps", "1",
            "--out", str(env.out)]


def fit(env: Env, *extra: str) -> list[str]:
    """`anymodal fit` of the transfusion recipe at debug size, one step, everything under env.tmp."""
    return ["fit", "--config", str(RECIPE), "--config", str(CPU), "--model.init_args.text_tokenizer", TEXT_TOKENIZER,
            "--model.init_args.image_tokenizer", env.tokenizers["continuous"], "--model.init_args.size", "debug",
            "--trainer.max_steps=1", "--trainer.default_root_dir", str(env.tmp / "run"),
            "--trainer.logger.init_args.save_dir", str(env.tmp / "run"), "--trainer.callbacks=[]",
            "--trainer.enable_progress_bar=false", "--trainer.enable_checkpointing=false",
            "--trainer.limit_val_batches=0", "--trainer.num_sanity_val_steps=0",
            "--data.init_args.batch_size", "1", "--data.init_args.seq_len", "256", *extra]


def fit_on(env: Env, source: dict) -> list[str]:
    """fit whose only training source is `source` ({"class_path": ..., "init_args": ...})."""
    recipe = env.tmp / "source.yaml"
    recipe.write_text(json.dumps({"data": {"init_args": {"sources": [source]}}}))  # JSON is YAML
    return fit(env, "--config", str(recipe))


def jsonl(env: Env, *rows: str) -> list[str]:
    manifest = env.write("manifest.jsonl", "".join(r + "\n" for r in rows))
    return fit_on(env, {"class_path": "anymodal.data.jsonl.JsonlSource",
                        "init_args": {"path": manifest, "image_size": 24, "strict": True}})


def shard(env: Env, members: dict[str, bytes]) -> list[str]:
    path = env.tmp / "shard-000.tar"
    with tarfile.open(path, "w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return fit_on(env, {"class_path": "anymodal.data.webdataset.WebDatasetSource",
                        "init_args": {"urls": str(path), "image_size": 24, "strict": True, "tasks": None}})


def edited_bundle(env: Env, edit: Callable[[Path], None]) -> str:
    folder = env.bundle_copy()
    edit(folder)
    return str(folder)


def rewrite_config(folder: Path, change: Callable[[dict], None]) -> None:
    doc = json.loads((folder / "config.json").read_text())
    change(doc)
    (folder / "config.json").write_text(json.dumps(doc))


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def other_vae(folder: Path) -> None:
    """The same VAE architecture with other weights, in place of the bundle's own."""
    torch.manual_seed(123)
    save_image_tokenizer(VAE(VAEConfig(block_out_channels=[16, 32, 32], norm_num_groups=8)), folder / "image_tokenizer")


def vq_instead(env: Env, folder: Path) -> None:
    """A VQ-VAE in place of the VAE, in a bundle written before fingerprints (so the kind check answers)."""
    shutil.rmtree(folder / "image_tokenizer")
    shutil.copytree(env.tokenizers["discrete"], folder / "image_tokenizer")
    rewrite_config(folder, lambda doc: doc.pop("fingerprints"))


def another_architecture(folder: Path) -> None:
    def wider(doc: dict) -> None:
        doc["model"]["arch"]["dim"] *= 2

    rewrite_config(folder, wider)


def pickles_only(env: Env) -> str:
    folder = env.tmp / "pickled"
    folder.mkdir()
    shutil.move(malicious_ckpt(env), folder / "model.ckpt")
    return str(folder)


def non_empty_out(env: Env) -> list[str]:
    env.out.mkdir()
    (env.out / "0000.png").write_bytes(encoded(PILImage.new("RGB", (32, 32))))
    (env.out / "index.jsonl").write_text('{"prompt": "an earlier run", "file": "0000.png"}\n')
    return t2i(env, "--prompt", "a red circle.")


def encode(env: Env, *args: str, image_tokenizer: str | None = None) -> list[str]:
    """`anymodal encode` of the shapes world with the test tokenizers into env.out, `args` replacing flags."""
    return ["encode", "--source", "shapes", "--documents", "4", "--text-tokenizer", str(ROOT / "tokenizers" /
            "shapes-text"), "--image-tokenizer", image_tokenizer or env.tokenizers["continuous"], "--image-size", "32",
            "--out", str(env.out), *args]


# ------------------------------------------------------------------------------------------------ the fuzz list
@dataclass(frozen=True)
class Case:
    """One bad (or unusual) input: `make(env)` writes it and returns the command line; `expect` is a phrase of
    the one error line (None: the input is valid and must work)."""

    group: str
    name: str
    make: Callable[[Env], list[str]]
    expect: str | None
    check: Callable[[Env], None] | None = None
    """Extra assertion after the run (e.g. a malicious pickle's marker file is absent)."""


def no_marker(env: Env) -> None:
    assert not env.marker.exists(), "the pickle ran"


def earlier_run_kept(env: Env) -> None:
    assert sorted(p.name for p in env.out.iterdir()) == ["0000.png", "index.jsonl"]
    assert "an earlier run" in (env.out / "index.jsonl").read_text()


CASES = [
    # images (through `generate caption`; the accepted ones are converted as load_image documents)
    Case("images", "zero bytes", lambda e: caption(e, e.write("zero.png", b"")), "is empty"),
    Case("images", "truncated PNG", lambda e: caption(e, e.write("cut.png", encoded(noise(48, 48))[:900])),
         "is corrupt or truncated"),
    Case("images", "truncated JPEG", lambda e: caption(e, e.write("cut.jpg", encoded(noise(64, 64), "JPEG")[:1500])),
         "is corrupt or truncated"),
    Case("images", "decompression bomb", lambda e: caption(e, e.write("bomb.png", bomb_png())),
         "claims 10,000,000,000 pixels in its header, over max_pixels=67,108,864 (a decompression bomb?)"),
    Case("images", "not an image", lambda e: caption(e, e.write("text.png", "hello, not a picture")),
         "is not an image in a supported format"),
    Case("images", "a folder", lambda e: caption(e, str(e.tmp)), "is a folder, not an image file"),
    Case("images", "a missing path", lambda e: caption(e, str(e.tmp / "missing.png")), "does not exist"),
    Case("images", "CMYK JPEG", lambda e: caption(e, e.write("cmyk.jpg", encoded(noise(32, 32).convert("CMYK"),
                                                                             "JPEG"))), None),
    Case("images", "16-bit grayscale", lambda e: caption(e, e.write("gray16.png", encoded(gray16()))), None),
    Case("images", "palette with alpha", lambda e: caption(e, e.write("palette.png", encoded(palette_alpha()))),
         None),
    Case("images", "grayscale", lambda e: caption(e, e.write("gray.png", encoded(noise(32, 32).convert("L")))),
         None),
    Case("images", "animated GIF (first frame)", lambda e: caption(e, e.write("anim.gif", animated_gif())), None),
    Case("images", "non-square (center crop)", lambda e: caption(e, e.write("wide.png", encoded(banded()))), None),
    Case("images", "smaller than the model's size (scaled up)",
         lambda e: caption(e, e.write("small.png", encoded(noise(5, 5)))), None),
    # text
    Case("text", "empty prompt", lambda e: t2i(e, "--prompt", ""), "the prompt is empty"),
    Case("text", "blank prompt", lambda e: t2i(e, "--prompt", "  \n "), "the prompt is empty"),
    Case("text", "over-long prompt", lambda e: t2i(e, "--prompt", "a red circle at the center. " * 120),
         "over the model's context of 512 tokens"),
    Case("text", "prompt that leaves no room for its image",
         lambda e: t2i(e, "--prompt", "red " * 500), "needs 18 more for its image, over the model's context"),
    Case("text", "invalid UTF-8 in a prompts file",
         lambda e: t2i(e, "--prompts", e.write("prompts.txt", b"a red circle.\nbad \xff byte\n")),
         "is not UTF-8 text (byte 0xff on line 2)"),
    Case("text", "missing prompts file", lambda e: t2i(e, "--prompts", str(e.tmp / "none.txt")),
         "--prompts file"),
    Case("text", "control characters", lambda e: t2i(e, "--prompt", "a red \x1b[31mcircle"),
         "holds the control character U+001B at position 6"),
    Case("text", "NUL in an edit instruction",
         lambda e: ["generate", "edit", "--checkpoint", e.bundle, "--image", e.write("src.png", encoded(noise(32, 32))),
                    "--instruction", "make it\x00 blue", "--out", str(e.out)], "control character U+0000"),
    Case("text", "negative --rerank-words",
         lambda e: [*caption(e, e.write("r.png", encoded(noise(32, 32)))), "--rerank-words", "-1"],
         "rerank_words=-1 must be 0 or more"),
    Case("text", "empty question",
         lambda e: ["generate", "vqa", "--checkpoint", e.bundle, "--image", e.write("q.png", encoded(noise(32, 32))),
                    "--question", ""], "the question is empty"),
    # recipes (through `fit`)
    Case("recipes", "key typo", lambda e: fit(e, "--model.init_args.lrr", "0.1"), "has no option 'lrr'"),
    Case("recipes", "wrong type", lambda e: fit(e, "--model.init_args.warmup_steps", "many"),
         "UnifiedSystem option 'warmup_steps' expects int, got 'many'"),
    Case("recipes", "wrong type of a trainer key", lambda e: fit(e, "--trainer.max_steps", "ten"),
         "trainer.max_steps expects int, got 'ten'"),
    Case("recipes", "missing image tokenizer folder",
         lambda e: fit(e, "--model.init_args.image_tokenizer", str(e.tmp / "no-vae")),
         "UnifiedSystem: image tokenizer folder"),
    Case("recipes", "missing text tokenizer folder",
         lambda e: fit(e, "--model.init_args.text_tokenizer", str(e.tmp / "no-text")),
         "UnifiedSystem: text tokenizer folder"),
    Case("recipes", "image size the tokenizer cannot tile", lambda e: fit(e, "--model.init_args.image_size", "30"),
         "image size 30x30 must be divisible by the tokenizer's downsample=4"),
    Case("recipes", "image size the patches cannot tile", lambda e: fit(e, "--model.init_args.image_size", "36"),
         "latent grid=9 must be divisible by patch_size=2"),
    Case("recipes", "resume from a malicious pickle", lambda e: fit(e, "--ckpt_path", malicious_ckpt(e)),
         "was refused unread: it holds pickled code or objects (posix.system)", no_marker),
    # bundles and tokenizer folders
    Case("bundles", "missing bundle", lambda e: t2i(e, "--prompt", "x", checkpoint=str(e.tmp / "none")),
         "does not exist; export one with `anymodal export`"),
    Case("bundles", "a Hugging Face model folder",
         lambda e: t2i(e, "--prompt", "x", checkpoint=edited_bundle(e, lambda f: (f / "config.json").write_text(
             json.dumps({"architectures": ["LlamaForCausalLM"], "model_type": "llama"})))), "is a Hugging Face"),
    Case("bundles", "weights of another architecture",
         lambda e: t2i(e, "--prompt", "x", checkpoint=edited_bundle(e, another_architecture)),
         "belong to another architecture than its config.json"),
    Case("bundles", "truncated model.safetensors",
         lambda e: t2i(e, "--prompt", "x", checkpoint=edited_bundle(e, lambda f: truncate(f / "model.safetensors"))),
         "model.safetensors is truncated or corrupt"),
    Case("bundles", "half-written bundle (no config.json)",
         lambda e: t2i(e, "--prompt", "x", checkpoint=edited_bundle(e, lambda f: (f / "config.json").unlink())),
         "is a half-written bundle"),
    Case("bundles", "pickled .ckpt given as the bundle",
         lambda e: t2i(e, "--prompt", "x", checkpoint=malicious_ckpt(e)),
         "is a pickled checkpoint, not a bundle folder, and is not read", no_marker),
    Case("bundles", "folder of pickled weights", lambda e: t2i(e, "--prompt", "x", checkpoint=pickles_only(e)),
         "model.ckpt: pickled weights are refused", no_marker),
    Case("bundles", "export of a malicious pickle",
         lambda e: ["export", "--checkpoint", malicious_ckpt(e), "--out", str(e.out)],
         "was refused unread: it holds pickled code or objects (posix.system)", no_marker),
    Case("bundles", "export of a missing checkpoint",
         lambda e: ["export", "--checkpoint", str(e.tmp / "none.ckpt"), "--out", str(e.out)], "does not exist"),
    Case("bundles", "missing image tokenizer",
         lambda e: t2i(e, "--prompt", "x", checkpoint=edited_bundle(
             e, lambda f: shutil.rmtree(f / "image_tokenizer"))), "has no image_tokenizer/ folder"),
    Case("bundles", "image tokenizer other than the trained one",
         lambda e: t2i(e, "--prompt", "x", checkpoint=edited_bundle(e, other_vae)),
         "is not the tokenizer this model was trained with"),
    Case("bundles", "image tokenizer of another kind (bundle without fingerprints)",
         lambda e: t2i(e, "--prompt", "x", checkpoint=edited_bundle(e, lambda f: vq_instead(e, f))),
         "is a vqvae, but this continuous-path model was trained on a vae"),
    Case("bundles", "truncated tokenizer weights",
         lambda e: ["eval", "tokenizer", "--tokenizer", edited_bundle(
             e, lambda f: truncate(f / "image_tokenizer" / "model.safetensors")) + "/image_tokenizer", "--n", "2"],
         "image_tokenizer/model.safetensors is truncated or corrupt"),
    Case("bundles", "a bundle given as a tokenizer folder",
         lambda e: ["eval", "tokenizer", "--tokenizer", e.bundle, "--n", "2"],
         "is an anymodal bundle, not an image tokenizer folder"),
    # data (through `fit` with strict sources)
    Case("data", "JSONL row without segments", lambda e: jsonl(e, '{"task": "t2i"}'),
         "manifest.jsonl:1: invalid document ('segments' must be a non-empty list)"),
    Case("data", "JSONL text of the wrong type", lambda e: jsonl(e, '{"segments": [{"text": 3}]}'),
         "the value of 'text' must be a string"),
    Case("data", "JSONL bad image path", lambda e: jsonl(e, '{"segments": [{"text": "a"}, {"image": "gone.png"}]}'),
         "gone.png does not exist"),
    Case("data", "JSONL line that is not JSON", lambda e: jsonl(e, '{"segments": [}'), "manifest.jsonl:1: invalid json"),
    Case("data", "missing JSONL manifest",
         lambda e: fit_on(e, {"class_path": "anymodal.data.jsonl.JsonlSource",
                              "init_args": {"path": str(e.tmp / "none.jsonl"), "strict": True}}),
         "UnifiedDataModule: JSONL manifest"),
    Case("data", "WebDataset image without its caption", lambda e: shard(e, {"000.png": encoded(noise(32, 32))}),
         "unknown layout (members ['png']; expected an image (png, jpg, jpeg, webp) with a txt, or a json)"),
    Case("data", "WebDataset record naming a missing member",
         lambda e: shard(e, {"000.json": b'{"task": "edit", "segments": [{"image": "src.png"}, {"text": "x"}, '
                                         b'{"image": "tgt.png"}]}', "000.src.png": encoded(noise(32, 32))}),
         "missing member (image 'tgt.png' is not in the sample"),
    # encode (anymodal encode: sources, tokenizers and sizes)
    Case("encode", "missing JSONL source", lambda e: encode(e, "--source", str(e.tmp / "none.jsonl")), "does not exist"),
    Case("encode", "image tokenizer folder missing", lambda e: encode(e, image_tokenizer=str(e.tmp / "no-tokenizer")),
         "does not exist"),
    Case("encode", "encoding at an image size the tokenizer cannot tile", lambda e: encode(e, "--image-size", "30"),
         "must be divisible"),
    # serve (the page's own bad inputs are tested in a browser by tests/test_app.py)
    Case("serve", "serving a folder that does not exist", lambda e: ["serve", "--checkpoint", str(e.tmp / "nothing")],
         "does not exist"),
    Case("serve", "serving an image tokenizer folder as a bundle",
         lambda e: ["serve", "--checkpoint", e.tokenizers["continuous"]], "not an anymodal bundle"),
    # outputs
    Case("outputs", "output folder holding an earlier run", non_empty_out,
         "is not empty (it holds 0000.png, index.jsonl); pass --overwrite", earlier_run_kept),
]
MESSAGES: dict[str, str] = {}


def _normalise(message: str, env: Env) -> str:
    for path, name in ((str(env.tmp), "TMP"), (env.bundle, "BUNDLE"), (str(ROOT), "REPO"),
                       (str(Path(env.tokenizers["continuous"]).parent), "TOKENIZERS")):
        message = message.replace(path, name)
    return message


@pytest.mark.parametrize("case", CASES, ids=[f"{c.group}: {c.name}" for c in CASES])
def test_fuzz_case(case: Case, env: Env, capsys, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["anymodal"])  # LightningCLI warns when it sees pytest's arguments too
    argv = case.make(env)
    if case.expect is None:
        main(argv)
        rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
        assert len(rows) == 1 and rows[0]["image"] == argv[argv.index("--image") + 1] and "caption" in rows[0]
        MESSAGES[case.name] = "accepted: converted to RGB (3, 32, 32) and captioned"
    else:
        with pytest.raises(SystemExit) as exit_:
            main(argv)
        assert exit_.value.code == 2
        err = capsys.readouterr().err
        lines = [line for line in err.splitlines() if line.strip()]
        assert lines and "Traceback" not in err, err
        prefix = f"anymodal {argv[0]}: error: "
        assert lines[-1].startswith(prefix) and sum(line.startswith(prefix) for line in lines) == 1, err
        assert case.expect in lines[-1], lines[-1]
        MESSAGES[case.name] = _normalise(lines[-1][len(prefix):], env)
        if case.group != "outputs":  # nothing that looks like a finished output: no out folder, no checkpoint
            assert not env.out.exists() and not list((env.tmp / "run").rglob("*.ckpt"))
    if case.check is not None:
        case.check(env)


def test_unusual_images_are_converted_not_mangled():
    """What the accepted fuzz cases read: the values, not only the shape."""
    red = torch.tensor([1.0, 0.0, 0.0])[:, None, None]
    ramp = load_image(encoded(gray16()), 32)  # 16-bit: scaled to 8 bits, not clipped at 255
    as8 = load_image(encoded(PILImage.fromarray((np.asarray(gray16()) / 257).round().astype(np.uint8))), 32)
    assert torch.equal(ramp, as8) and ramp.min() == 0 and ramp.max() == 1
    palette = load_image(encoded(palette_alpha()), 32)  # transparency onto white
    assert torch.equal(palette[:, :, :16], torch.ones(3, 32, 16)) and torch.allclose(palette[:, :, 24:], red.expand(3, 32, 8))
    assert torch.equal(load_image(animated_gif(), 32), red.expand(3, 32, 32))  # the first frame
    wide = load_image(encoded(banded()), 32)  # center crop: only the red middle band is left
    assert torch.allclose(wide[:, :, 2:-2], red.expand(3, 32, 28), atol=0.02)
    small = load_image(encoded(PILImage.new("RGB", (5, 5), (0, 0, 255))), 32)  # scaled up
    assert torch.equal(small, torch.tensor([0.0, 0.0, 1.0])[:, None, None].expand(3, 32, 32))
    cmyk = load_image(encoded(PILImage.new("RGB", (32, 32), (255, 0, 0)).convert("CMYK"), "JPEG"), 32)
    assert (cmyk - red).abs().max() < 0.05


def test_the_fuzz_doc_lists_every_case():
    """docs/fuzz-cases.md holds one row per case, in order, with a message that has the case's phrase."""
    if os.environ.get("ANYMODAL_WRITE_FUZZ_DOC") and len(MESSAGES) == len(CASES):
        _write_doc()
    rows = [line.split(" | ") for line in DOC.read_text().splitlines() if line.startswith("| ") and line[2].isdigit()]
    assert [(r[1], r[2]) for r in rows] == [(c.group, c.name) for c in CASES]
    for row, case in zip(rows, CASES):
        message = row[3].removesuffix(" |").replace("\\|", "|")
        assert (case.expect or "accepted") in message, (case.name, message)


def _write_doc() -> None:
    refused = sum(c.expect is not None for c in CASES)
    lines = ["# The fuzz list", "",
             f"{len(CASES)} cases, each run through the real command (`anymodal.commands.cli.main`) by "
             "`tests/test_hardening.py::test_fuzz_case`: {refused} bad inputs end with exit status 2 and this one "
             "line on stderr (`anymodal CMD: error: ` before it), no traceback and no output that looks complete; "
             f"{len(CASES) - refused} valid but unusual images are converted and work. Paths read TMP (the case's "
             "folder), BUNDLE, TOKENIZERS, REPO. Written by `ANYMODAL_WRITE_FUZZ_DOC=1 pytest "
             "tests/test_hardening.py`; a test checks it lists every case.", "",
             "| # | group | case | message |", "|---|---|---|---|"]
    lines[2] = lines[2].replace("{refused}", str(refused))
    for i, case in enumerate(CASES, 1):
        message = MESSAGES[case.name].replace("|", "\\|")
        lines.append(f"| {i} | {case.group} | {case.name} | {message} |")
    DOC.write_text("\n".join(lines) + "\n")


# ------------------------------------------------------------------------------------------------ NaN steps
class Poison(Callback):
    """At global step `step`: a NaN loss, or a gradient hook that makes one parameter's gradient infinite."""

    def __init__(self, step: int, what: str) -> None:
        self.step, self.what, self.handle = step, what, None

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        if trainer.global_step != self.step:
            return
        if self.what == "loss":
            original = module.compute_losses

            def poisoned(*args, **kwargs):
                module.compute_losses = original  # once
                out = original(*args, **kwargs)
                return dataclasses.replace(out, total=out.total * float("nan"))

            module.compute_losses = poisoned
        else:
            self.handle = next(module.model.parameters()).register_hook(lambda g: g * float("inf"))

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        if self.handle is not None:
            self.handle.remove()
            self.handle = None


class Snapshots(Callback):
    """The model, EMA and optimizer state after every step."""

    def __init__(self) -> None:
        self.states: list[dict] = []

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        self.states.append(copy.deepcopy({"weights": module.state_dict(), "ema": module.ema.state_dict(),
                                          "optimizer": trainer.optimizers[0].state_dict(),
                                          "loss": float(outputs["loss"])}))


def _equal(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return torch.equal(a, b)
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_equal(x, y) for x, y in zip(a, b))
    return a == b


@pytest.mark.parametrize("what", ["loss", "gradient"])
def test_a_non_finite_step_is_skipped_counted_and_costs_exactly_that_step(make_system, tmp_path, what):
    torch.manual_seed(0)
    system = make_system("continuous", ema_decay=0.9)
    snaps = Snapshots()
    trainer = Trainer(accelerator="cpu", max_steps=4, gradient_clip_val=1.0, logger=CSVLogger(tmp_path),
                      log_every_n_steps=1, enable_checkpointing=False, enable_progress_bar=False,
                      enable_model_summary=False, callbacks=[Poison(2, what), snaps], limit_val_batches=0,
                      num_sanity_val_steps=0, default_root_dir=tmp_path)
    trainer.fit(system, datamodule=UnifiedDataModule([ShapesWorld(size=32, seed=0)], seq_len=256, batch_size=2))
    s = snaps.states
    assert len(s) == 4 and trainer.global_step == 4  # the step counts (schedule, data, noise move on)
    # step 2 changed nothing: weights, EMA, optimizer moments and step counts are those after step 1
    assert _equal(s[2]["weights"], s[1]["weights"]) and _equal(s[2]["ema"], s[1]["ema"])
    assert _equal(s[2]["optimizer"]["state"], s[1]["optimizer"]["state"])
    assert not _equal(s[1]["weights"], s[0]["weights"]) and not _equal(s[3]["weights"], s[2]["weights"])
    assert [x["ema"]["updates"] for x in s] == [1, 2, 2, 3]
    assert np.isfinite(s[3]["loss"]) and np.isnan(s[2]["loss"]) == (what == "loss")
    assert system.skipped_steps == 1
    rows = [r for r in (tmp_path / "lightning_logs/version_0/metrics.csv").read_text().splitlines()]
    header = rows[0].split(",")
    skipped = [float(r.split(",")[header.index("train/skipped_steps")]) for r in rows[1:]
               if r.split(",")[header.index("train/skipped_steps")]]
    assert skipped == [0, 0, 1, 1]  # logged every step
    path = tmp_path / "run.ckpt"
    trainer.save_checkpoint(path)
    assert torch.load(path, weights_only=True)["anymodal_training"] == {"skipped_steps": 1}


# ------------------------------------------------------------------------------------------------ signals
PACE = '''
import pathlib, time
from lightning.pytorch import Callback

class Pace(Callback):
    """Marks each finished step with a file, then waits a little: the test's clock."""
    def __init__(self, folder: str, seconds: float = 0.3):
        self.folder, self.seconds = pathlib.Path(folder), seconds
    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        (self.folder / f"step{trainer.global_step}").touch()
        time.sleep(self.seconds)
'''


def _run_args(tokenizer_dirs, root: Path, steps: int) -> list[str]:
    return ["fit", "--config", str(RECIPE), "--config", str(CPU), "--model.init_args.text_tokenizer", TEXT_TOKENIZER,
            "--model.init_args.image_tokenizer", tokenizer_dirs["continuous"], "--model.init_args.size", "debug",
            "--model.init_args.warmup_steps", "2", "--data.init_args.batch_size", "1",
            "--data.init_args.seq_len", "256", f"--trainer.max_steps={steps}", "--trainer.default_root_dir", str(root),
            "--trainer.logger.init_args.save_dir", str(root), "--trainer.enable_progress_bar=false",
            "--trainer.enable_checkpointing=false", "--trainer.limit_val_batches=0",
            "--trainer.num_sanity_val_steps=0", "--trainer.enable_model_summary=false"]


def test_sigterm_mid_epoch_saves_a_checkpoint_that_resumes_exactly(tokenizer_dirs, tmp_path):
    (tmp_path / "pace.py").write_text(PACE)
    (tmp_path / "pace.yaml").write_text(json.dumps({"trainer": {"callbacks": [
        {"class_path": "pace.Pace", "init_args": {"folder": str(tmp_path)}}]}}))
    args = _run_args(tokenizer_dirs, tmp_path / "run", 4) + ["--config", str(tmp_path / "pace.yaml")]
    child = subprocess.Popen(
        [sys.executable, "-c", f"from anymodal.commands.cli import main; main({args!r})"],
        env={**os.environ, "PYTHONPATH": str(tmp_path), "OMP_NUM_THREADS": str(torch.get_num_threads())},
        stderr=subprocess.PIPE, text=True)  # the parent's threads: the same float sums
    deadline = time.monotonic() + 120
    while not (tmp_path / "step2").exists() and child.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    child.send_signal(signal.SIGTERM)
    _, err = child.communicate(timeout=120)
    assert child.returncode == 128 + signal.SIGTERM, err
    saved = tmp_path / "run" / "interrupted.ckpt"
    assert f"SIGTERM received; stopped after step 2 and saved {saved}" in err.splitlines()[-1]
    assert torch.load(saved, weights_only=True)["global_step"] == 2 and not (tmp_path / "step3").exists()

    # the straight and the resumed runs in fresh processes too, as the interrupted one: what ran earlier in this
    # process (compiled graphs, allocator state) cannot move their float sums
    straight = _fit_in_child(_run_args(tokenizer_dirs, tmp_path / "straight", 4) + ["--trainer.callbacks=[]"],
                             tmp_path / "straight.pt")
    resumed = _fit_in_child(_run_args(tokenizer_dirs, tmp_path / "resumed", 4) + ["--trainer.callbacks=[]",
                                                                                 "--ckpt_path", str(saved)],
                            tmp_path / "resumed.pt")
    assert straight["safe_io"] and straight["stop_on_signal"]
    assert resumed["step"] == straight["step"] == 4
    assert straight["ema"]  # the recipe keeps an EMA: it resumes exactly too
    for key in ("model", "sampling"):
        a, b = straight[key], resumed[key]
        assert a.keys() == b.keys()
        for k in a:
            torch.testing.assert_close(b[k], a[k], rtol=0, atol=1e-6)


FIT_CHILD = """
import sys, torch
from anymodal.train import run_lightning
from anymodal.systems.faults import SafeCheckpointIO, StopOnSignal
args, out = {args!r}, {out!r}
sys.argv = ["anymodal"]
cli = run_lightning(args)
torch.save({{"model": cli.model.state_dict(), "sampling": cli.model.sampling_model().state_dict(),
             "step": cli.trainer.global_step, "ema": cli.model.ema is not None,
             "safe_io": isinstance(cli.trainer.strategy.checkpoint_io, SafeCheckpointIO),
             "stop_on_signal": any(isinstance(c, StopOnSignal) for c in cli.trainer.callbacks)}}, out)
"""


def _fit_in_child(args: list[str], out: Path) -> dict:
    """`anymodal fit` with `args` in a fresh process (this one's threads); what it trained, read back."""
    child = subprocess.run([sys.executable, "-c", FIT_CHILD.format(args=args, out=str(out))],
                           env={**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())},
                           stderr=subprocess.PIPE, text=True, timeout=300)
    assert child.returncode == 0, child.stderr[-3000:]
    return torch.load(out, weights_only=True)


class Interrupt(Callback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C


def test_sigint_finishes_the_step_saves_and_stops(make_system, tmp_path):
    before = signal.getsignal(signal.SIGINT)  # Python's default handler, or SIG_IGN in a background job (CI)
    system = make_system("continuous", ema_decay=0.9)
    trainer = Trainer(accelerator="cpu", max_steps=10, logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                      num_sanity_val_steps=0, default_root_dir=tmp_path, callbacks=[Interrupt(2), StopOnSignal()])
    with pytest.raises(SystemExit) as exit_:
        trainer.fit(system, datamodule=UnifiedDataModule([ShapesWorld(size=32, seed=0)], seq_len=256, batch_size=2))
    assert exit_.value.code == 128 + signal.SIGINT
    saved = torch.load(tmp_path / "interrupted.ckpt", weights_only=True)
    assert saved["global_step"] == 2
    for k, v in system.state_dict().items():  # the state after step 2
        assert torch.equal(saved["state_dict"][k], v), k
    assert _equal(saved["anymodal"]["ema"], system.ema.state_dict()) and system.ema.updates == 2  # its EMA too
    assert signal.getsignal(signal.SIGINT) is before  # handlers given back


# ------------------------------------------------------------------------------------------------ interrupted saves
def full_disk(*args, **kwargs):
    """Write half a file, then fail as a full disk does."""
    target = args[1] if len(args) > 1 else kwargs.get("filename") or kwargs.get("f")
    Path(target).write_bytes(b"\x80\x02half a file")
    raise OSError(errno.ENOSPC, "No space left on device")


def test_an_interrupted_checkpoint_save_keeps_the_last_good_one(tmp_path, monkeypatch):
    io_ = SafeCheckpointIO()
    path = tmp_path / "last.ckpt"
    io_.save_checkpoint({"state_dict": {"w": torch.ones(3)}, "global_step": 1}, path)
    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(OSError, match="No space left"):
        io_.save_checkpoint({"state_dict": {"w": torch.zeros(3)}, "global_step": 2}, path)
    monkeypatch.undo()
    assert io_.load_checkpoint(path)["global_step"] == 1 and [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]
    torch.save({"payload": _Evil(tmp_path / "pwned")}, tmp_path / "evil.ckpt")
    with pytest.raises(ValueError, match="refused unread"):
        io_.load_checkpoint(tmp_path / "evil.ckpt")  # what `fit --ckpt_path` reads with
    assert not (tmp_path / "pwned").exists()


def _unified_checkpoint(bundle: str, path: Path) -> Path:
    """A Lightning-style checkpoint of a bundle's model (what `export` reads), written without training."""
    b = load_bundle(bundle)
    state = {**{f"model.{k}": v for k, v in b.model.state_dict().items()},
             **{f"image_tokenizer.{k}": v for k, v in b.image_tokenizer.state_dict().items()}}
    record = {"model": b.config.to_dict(), "objective": b.objective.config(), "image_size": 32,
              "text_tokenizer": f"{bundle}/text_tokenizer", "image_tokenizer": f"{bundle}/image_tokenizer"}
    torch.save({"state_dict": state, "anymodal": record, "global_step": 7}, path)
    return path


def test_an_interrupted_export_keeps_the_last_good_bundle(env, capsys, monkeypatch):
    ckpt = _unified_checkpoint(env.bundle, env.tmp / "run.ckpt")
    main(["export", "--checkpoint", str(ckpt), "--out", str(env.out)])
    before = load_bundle(env.out).model.state_dict()
    monkeypatch.setattr("anymodal.checkpoint.save_file", full_disk)
    with pytest.raises(SystemExit) as exit_:
        main(["export", "--checkpoint", str(ckpt), "--out", str(env.out)])
    assert exit_.value.code == 2
    assert capsys.readouterr().err.splitlines()[-1] == "anymodal export: error: [Errno 28] No space left on device"
    monkeypatch.undo()
    assert _equal(load_bundle(env.out).model.state_dict(), before) and load_bundle(env.out).meta["step"] == 7
    assert sorted(p.name for p in env.tmp.iterdir()) == ["out", "run.ckpt"]  # no temporary folder left
    # a tokenizer folder too
    tok = load_image_tokenizer(env.out / "image_tokenizer")
    monkeypatch.setattr("anymodal.tokenizers.image.save_file", full_disk)
    with pytest.raises(OSError):
        save_image_tokenizer(VAE(VAEConfig(block_out_channels=[16, 32, 32], norm_num_groups=8)), env.tmp / "tok")
    with pytest.raises(OSError):
        save_image_tokenizer(tok, env.out / "image_tokenizer")
    monkeypatch.undo()
    assert not (env.tmp / "tok").exists() and load_bundle(env.out) is not None


KILLED_SAVE = """
import os, signal, sys
from anymodal.atomic import atomic_folder
with atomic_folder(sys.argv[1]) as tmp:
    (tmp / "model.safetensors").write_bytes(b"half a file")
    os.kill(os.getpid(), signal.SIGKILL)
"""


def test_a_save_killed_midway_leaves_the_last_good_bundle(env):
    folder = env.bundle_copy()
    child = subprocess.run([sys.executable, "-c", KILLED_SAVE, str(folder)], capture_output=True)
    assert child.returncode == -signal.SIGKILL
    assert _equal(load_bundle(folder).model.state_dict(), load_bundle(env.bundle).model.state_dict())
    left = [p.name for p in env.tmp.iterdir() if p.name != "bundle"]
    assert len(left) == 1 and left[0].startswith(".bundle.tmp-")  # the half-written one, never under its name


def test_a_malicious_pickle_would_run(env):
    """The fuzz cases' pickle is live: an unsafe load runs it (so their refusals are meaningful)."""
    torch.load(malicious_ckpt(env), weights_only=False)
    assert env.marker.exists()


# ------------------------------------------------------------------------------------------------ pretrained VAE
def test_a_pretrained_vae_keeps_its_whole_config_and_reloads_bit_identically(tmp_path):
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    n = 2
    hf = AutoencoderKL(block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * n,
                       up_block_types=("UpDecoderBlock2D",) * n, layers_per_block=2, norm_num_groups=4,
                       latent_channels=3, act_fn="relu", shift_factor=0.25, scaling_factor=0.7,
                       latents_mean=[0.1, 0.2, 0.3], latents_std=[1.0, 2.0, 3.0], mid_block_add_attention=False)
    hf.save_pretrained(tmp_path / "hf")
    vae = VAE(VAEConfig(pretrained_path=str(tmp_path / "hf"))).eval()
    x = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    z = vae.encode(x)
    with torch.no_grad():  # diffusers' convention: (z - shift) * scale
        assert torch.equal(z, (hf.encode(x * 2 - 1).latent_dist.mode() - 0.25) * 0.7)
    again = load_image_tokenizer(save_image_tokenizer(vae, tmp_path / "tok"))
    kept = again.model.config
    assert (kept.act_fn, kept.shift_factor, kept.latents_mean, tuple(kept.block_out_channels)) == (
        "relu", 0.25, [0.1, 0.2, 0.3], (8, 16))
    assert torch.equal(again.encode(x), z) and torch.equal(again.decode(z), vae.decode(z))
    # the fields alone (what tokenizer folders kept before) rebuild another network: silu, no shift
    fields_only = VAE(dataclasses.replace(again.config, autoencoder=None, shift_factor=None)).eval()
    fields_only.load_state_dict(again.state_dict())
    assert not torch.allclose(fields_only.encode(x), z)


# ------------------------------------------------------------------------------------------------ outputs
def test_a_second_run_into_the_same_folder_needs_overwrite_and_says_so(env, capsys):
    main(t2i(env, "--prompt", "a red circle.", "--num-images", "2"))
    (env.out / "notes.txt").write_text("mine")
    with pytest.raises(SystemExit):
        main(t2i(env, "--prompt", "a blue square."))
    assert "pass --overwrite" in capsys.readouterr().err.splitlines()[-1]
    main(t2i(env, "--prompt", "a blue square.", "--overwrite"))
    assert "--overwrite: removed 3 files of an earlier run" in capsys.readouterr().err
    rows = [json.loads(line) for line in (env.out / "index.jsonl").read_text().splitlines()]
    assert [r["prompt"] for r in rows] == ["a blue square."]
    assert sorted(p.name for p in env.out.iterdir()) == ["0000.png", "index.jsonl", "notes.txt"]


def test_index_jsonl_never_names_a_missing_file(env, capsys, monkeypatch):
    from anymodal.generate import writers

    written = []

    def second_fails(image, path, scale=1):
        if written:
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        written.append(path)
        PILImage.fromarray(image).save(path)

    monkeypatch.setattr(writers, "save_png", second_fails)
    with pytest.raises(SystemExit):
        main(t2i(env, "--prompt", "a red circle.", "--num-images", "2"))
    assert capsys.readouterr().err.splitlines()[-1].endswith(f"No space left on device: '{env.out / '0001.png'}'")
    assert [p.name for p in env.out.iterdir()] == ["0000.png"]  # no index: the run is visibly unfinished
    monkeypatch.undo()
    main(t2i(env, "--prompt", "a red circle.", "--num-images", "2", "--overwrite"))
    rows = [json.loads(line) for line in (env.out / "index.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and all((env.out / r["file"]).is_file() for r in rows)
