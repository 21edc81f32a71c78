"""anymodal beside lucidrains' transfusion-pytorch 0.20 on shapes-world text-to-image, one run, equal budgets.

Both models learn text -> image on the same documents (`ShapesWorld(size=32, seed=0, tasks={"t2i": 1.0})`,
purple triangles and cyan circles held out), at the same width and depth (dim 256, 6 layers, 4 heads of 64,
a gated MLP of 682 hidden units, full multi-head attention), through the same frozen VAE (the demo's VAE
recipe at 32 px, trained into `checkpoints/bench/shapes-vae` by the first run: 4x8x8 latents per 32x32 image) in 2x2
latent patches (16 image tokens of 16 values), with the same text ids
(`tokenizers/shapes-text`), optimizer (AdamW, betas 0.9/0.95, weight decay 0.1 on matrices, gradient clipping
at 1), learning-rate schedule (linear warm-up, then cosine over the time budget to 0.1x) and EMA of the weights
(`anymodal.systems.ema.WeightEMA`, sampled from).

- anymodal: `UnifiedSystem` on the continuous path (flow matching), size `shapes` with the arch overrides above,
  fed as `anymodal fit` feeds it: documents packed into `--rows` rows of `--seq-len` tokens (`PackedBatches`'
  code path), captions dropped for guidance with p = 0.1.
- the peer: `transfusion_pytorch.Transfusion`, one continuous modality of (4, 4, 16) patch grids, each step on
  the very documents of anymodal's batch (one sequence per document, padded to the longest), its own guidance
  dropout (p = 0.1: text replaced by its null token) and loss weights. The 2x2 patches enter through its
  `pre_post_transformer_enc_dec` hook: a linear map plus a learned position per patch (anymodal's `patch_in +
  patch_pos`); its own axial positional embedding (`add_pos_emb`) is not applied by its batched sampler
  (`sample_many` in 0.20.0), so it is left off. `modality_processing="grouped"`: the default "auto" re-times
  three strategies for every new batch structure, and every batch here differs.

Each model trains for `--minutes` of training-step time (data generation between steps is counted for neither).
A step is: VAE-encode the batch's images, forward, backward, clip, AdamW, EMA. Recorded per model: decoder
positions per second (every position the transformer runs, padding included) and documents per second; training
FLOPs per position of one step (forward + backward of the transformer, VAE excluded) by
`torch.utils.flop_counter.FlopCounterMode`, which does not know CPU SDPA (anymodal's attention), so the dense
count of `sdpa_flop`/`sdpa_backward_flop` is mapped onto it (the peer's einsum attention is dense too); the
achieved FLOP/s as a share of this CPU's measured fp32 matmul rate (`anymodal.hardware.matmul_rate`); then,
with the EMA weights, `--eval-n` captions of the evaluation world (`anymodal eval shapes`' seen t2i documents,
seed 0) sampled at 25 Euler steps with guidance 3 against the unconditional prompt (batches of 32; the peer's
ODE solver is set to Euler so that 25 steps are 25 guided forwards for both), decoded by the VAE and scored by
`ShapesScorer.add_t2i` (t2i_exact and its parts), with seconds per image (sampling + decoding).

    .venv/bin/python benchmarks/peer.py                        # 12 min per model; benchmarks/results/peer.json
    .venv/bin/python benchmarks/peer.py --quick --eval-n 4     # a smoke run: 2 steps per model, no file
    make bench-peer                                            # installs the `peer` extra, then the full run
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import functools
import json
import math
import os
import platform
import random
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
from einops import rearrange
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
TEXT_TOKENIZER = ROOT / "tokenizers" / "shapes-text"
VAE = ROOT / "checkpoints" / "bench" / "shapes-vae"  # trained by the first run (recipes/tokenizers/vae-shapes.yaml)
HOLDOUT = ["purple triangle", "cyan circle"]
PATCH = 2
STEPS = 25
"""Denoising steps of every sampled image (anymodal's default), for both models."""


@dataclass
class Settings:
    """What both models share (recorded with the results)."""

    minutes: float = 12.0
    """Training-step time per model."""
    dim: int = 256
    depth: int = 6
    heads: int = 4
    mlp_hidden: int = 682
    """The peer's FeedForward(dim, expansion 4) width, int(dim * 4 * 2/3); anymodal's SwiGLU is set to it."""
    rows: int = 8
    seq_len: int = 256
    drop_text: float = 0.1
    lr: float = 1e-3
    warmup_steps: int = 100
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    clip: float = 1.0
    ema_decay: float = 0.995
    guidance: float = 3.0
    eval_n: int = 100
    eval_batch: int = 32
    max_steps: int | None = None
    """Stop earlier than the budget (the smoke run's 2 steps)."""
    threads: int = 2
    seed: int = 0


# ------------------------------------------------------------------------------------------ data
def shared_batches(text, encoder, settings: Settings) -> Iterator[tuple[object, list[str]]]:
    """Endless (anymodal Batch, captions of its documents in image order) of t2i documents.

    The Batch is what `PackedBatches` yields for this world (its code path: mix, drop captions, encode, pack,
    collate); the captions are the documents' before the drop, for the peer, which drops its own."""
    from anymodal.data.packing import collate_rows, pack_rows
    from anymodal.data.sequence import drop_conditions
    from anymodal.data.shapes import ShapesWorld
    from anymodal.data.stream import mix_sources

    world = ShapesWorld(size=32, seed=settings.seed, tasks={"t2i": 1.0}, holdout=HOLDOUT)
    rng = random.Random(settings.seed)
    captions: collections.deque[str] = collections.deque()

    def encoded():
        for doc in mix_sources([world], None, settings.seed):
            captions.append(doc.segments[0].text)  # a t2i document: [Text, Image]
            yield encoder.encode(drop_conditions(doc, rng, settings.drop_text, 0.0))

    for rows in pack_rows(encoded(), settings.seq_len, settings.rows):
        batch = collate_rows(rows, settings.seq_len, text.pad_id)
        yield batch, [captions.popleft() for row in rows for _ in row]  # one image per document, in order


def evaluation_documents(n: int) -> list:
    """`anymodal eval shapes`' seen t2i documents (seed 0): the evaluation world, unseen during training."""
    from anymodal.data.shapes import ShapesWorld

    world = ShapesWorld(size=32, seed=10007, tasks={"t2i": 1.0}, holdout=HOLDOUT, split="train")
    rng = np.random.default_rng([10007, 0, len("train")])
    return [world.document("t2i", rng) for _ in range(n)]


def patchify(latents: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) latents -> (B, H/p, W/p, C*p*p) patch grids."""
    return rearrange(latents, "b c (h p1) (w p2) -> b h w (c p1 p2)", p1=PATCH, p2=PATCH)


def unpatchify(patches: torch.Tensor) -> torch.Tensor:
    """(B, h, w, C*p*p) patch grids -> (B, C, h*p, w*p) latents."""
    return rearrange(patches, "b h w (c p1 p2) -> b c (h p1) (w p2)", p1=PATCH, p2=PATCH)


# ------------------------------------------------------------------------------------------ the two models
class PositionCounter:
    """A forward pre-hook adding up the positions (B x T) a decoder runs."""

    def __init__(self) -> None:
        self.total = 0

    def __call__(self, module, args) -> None:
        self.total += args[0].shape[0] * args[0].shape[1]


class PatchEmbed(nn.Module):
    """The peer's pre-transformer encoder: (..., h, w, C*p*p) -> (..., h, w, dim), a linear map plus a learned
    position per patch (anymodal's `patch_in` + `patch_pos`)."""

    def __init__(self, patch_dim: int, dim: int, grid: int) -> None:
        super().__init__()
        self.proj = nn.Linear(patch_dim, dim)
        self.pos = nn.Parameter(torch.randn(grid, grid, dim) * 0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x) + self.pos


class Anymodal:
    """anymodal's UnifiedSystem trained by this loop (no Trainer: the loop sets the step that seeds its noise)."""

    name = "anymodal"

    def __init__(self, settings: Settings, vae) -> None:
        from anymodal.systems.unified import UnifiedSystem

        class LoopSystem(UnifiedSystem):
            step = 0

            @property
            def global_step(self) -> int:  # compute_losses seeds its noise with it; a Trainer would count
                return self.step

        torch.manual_seed(settings.seed)
        arch = {"dim": settings.dim, "n_layers": settings.depth, "n_heads": settings.heads, "n_kv_heads": None,
                "mlp_hidden": settings.mlp_hidden, "attention": "sdpa"}
        self.system = LoopSystem(text_tokenizer=str(TEXT_TOKENIZER), image_tokenizer=str(VAE), size="shapes",
                                 arch=arch, image_size=32, patch_size=PATCH, objective="flow", ema_decay=0.0,
                                 seed=settings.seed)
        self.system.configure_model()
        self.model, self.vae, self.settings = self.system.model, vae, settings
        self.counter = PositionCounter()
        self.model.decoder.register_forward_pre_hook(self.counter)  # the training step calls the decoder

    @property
    def encoder(self):
        return self.system.encoder

    def loss(self, batch, captions: list[str], step: int, latents: torch.Tensor | None = None) -> torch.Tensor:
        self.system.step = step
        if latents is not None:  # counting FLOPs: the VAE stays out
            batch = dataclasses.replace(batch, images=latents, image_kind="latents")
        return self.system.compute_losses(batch).total

    def sample(self, model: nn.Module, prompts: list[str], seeds: list[int]) -> list[np.ndarray]:
        from anymodal.checkpoint import Bundle
        from anymodal.generate.settings import ImageSampling
        from anymodal.generate.tasks import Pipeline

        bundle = Bundle(model=model.eval(), text=self.system.text, image_tokenizer=self.vae,
                        objective=self.system.objective)
        sampling = ImageSampling(steps=STEPS, guidance=self.settings.guidance)
        return Pipeline(bundle).text_to_image(prompts, seeds, sampling, self.settings.eval_batch)


class Peer:
    """transfusion_pytorch.Transfusion on the same VAE latents, in 2x2 patches."""

    name = "transfusion-pytorch"

    def __init__(self, settings: Settings, vae, text) -> None:
        import transfusion_pytorch.transfusion as peer
        from loguru import logger

        logger.disable("transfusion_pytorch")
        peer.tqdm = functools.partial(peer.tqdm, disable=True)  # its sampler draws progress bars to stderr
        torch.manual_seed(settings.seed)
        channels, grid = vae.config.latent_channels, 32 // vae.downsample // PATCH
        patch_dim = channels * PATCH * PATCH
        self.shape = (grid, grid)
        self.model = peer.Transfusion(
            num_text_tokens=len(text),
            transformer=dict(dim=settings.dim, depth=settings.depth, heads=settings.heads,
                             dim_head=settings.dim // settings.heads),
            dim_latent=patch_dim,
            modality_default_shape=self.shape,
            pre_post_transformer_enc_dec=(PatchEmbed(patch_dim, settings.dim, grid),
                                          nn.Linear(settings.dim, patch_dim, bias=False)),
            odeint_kwargs=dict(method="euler"),  # 25 steps = 25 guided forwards, as anymodal's Euler sampler
            prob_uncond=settings.drop_text,
            modality_processing="grouped",
        )
        self.vae, self.text, self.settings = vae, text, settings
        self.counter = PositionCounter()
        self.model.transformer.register_forward_pre_hook(self.counter)

    def loss(self, batch, captions: list[str], step: int, latents: torch.Tensor | None = None) -> torch.Tensor:
        if latents is None:
            with torch.no_grad():
                latents = self.vae.encode(batch.images.float())  # (N, 4, 8, 8), scaled
        patches = patchify(latents)  # (N, 4, 4, 16)
        docs = [[torch.tensor(self.text.encode(c)), (0, p)] for c, p in zip(captions, patches)]
        return self.model(docs)

    def sample(self, model: nn.Module, prompts: list[str], seeds: list[int]) -> list[np.ndarray]:
        from anymodal.data.images import array_from_pixels

        torch.manual_seed(seeds[0])  # its sampler draws from the global generator
        images = []
        for lo in range(0, len(prompts), self.settings.eval_batch):
            ids = [torch.tensor(self.text.encode(p)) for p in prompts[lo:lo + self.settings.eval_batch]]
            # max_length one below the image's 16 tokens: stop after the image instead of writing text on
            out = model.sample_many(ids, force_modality_at_start=(0, self.shape), modality_steps=STEPS + 1,
                                    cfg_scale=self.settings.guidance, max_length=math.prod(self.shape) - 1,
                                    return_unprocessed_modalities=True, return_without_prompt=True)
            patches = torch.stack([sample[0].tensor for sample in out])  # (b, 4, 4, 16)
            with torch.no_grad():
                pixels = self.vae.decode(unpatchify(patches))  # (b, 3, 32, 32) in [0, 1]
            images += [array_from_pixels(p) for p in pixels]
        return images


# ------------------------------------------------------------------------------------------ measuring
def cpu_sdpa_flops() -> dict:
    """FlopCounterMode's dense SDPA formulas for the CPU kernels it has none for (anymodal's attention)."""
    from torch.utils.flop_counter import sdpa_backward_flop_count, sdpa_flop_count

    def forward(query, key, value, *args, out_shape=None, **kwargs) -> int:  # arguments arrive as shapes
        return sdpa_flop_count(query, key, value)

    def backward(grad_out, query, key, value, *args, out_shape=None, **kwargs) -> int:
        return sdpa_backward_flop_count(grad_out, query, key, value)

    aten = torch.ops.aten
    return {aten._scaled_dot_product_flash_attention_for_cpu: forward,
            aten._scaled_dot_product_flash_attention_for_cpu_backward: backward}


def training_flops(trainee, batch, captions: list[str]) -> dict:
    """FLOPs of one training step's forward + backward (VAE excluded), per decoder position."""
    from torch.utils.flop_counter import FlopCounterMode

    with torch.no_grad():
        latents = trainee.vae.encode(batch.images.float())
    trainee.counter.total = 0
    with FlopCounterMode(display=False, custom_mapping=cpu_sdpa_flops()) as counter:
        trainee.loss(batch, captions, 0, latents).backward()
    trainee.model.zero_grad(set_to_none=True)
    positions = trainee.counter.total
    return {"flops_per_step": counter.get_total_flops(), "positions": positions,
            "flops_per_position": counter.get_total_flops() / positions}


def adamw(model: nn.Module, settings: Settings) -> torch.optim.AdamW:
    """anymodal's rule for both: weight decay on matrices, not on biases, norms or position tables."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 and not name.endswith("pos") else no_decay).append(p)
    return torch.optim.AdamW([{"params": decay, "weight_decay": settings.weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}], lr=settings.lr, betas=settings.betas)


def lr_factor(step: int, elapsed: float, budget: float, settings: Settings) -> float:
    """Linear warm-up over steps, then cosine to `min_lr_ratio` over the fraction of the time budget used."""
    if step < settings.warmup_steps:
        return (step + 1) / settings.warmup_steps
    progress = min(1.0, elapsed / budget)
    return settings.min_lr_ratio + (1 - settings.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def train(trainee, batches: Iterator, settings: Settings, log: Callable[[str], None]) -> tuple[dict, nn.Module]:
    """Train for the budget; returns the training record and the EMA model."""
    from anymodal.systems.ema import WeightEMA

    model, budget = trainee.model, settings.minutes * 60
    model.train()
    opt = adamw(model, settings)
    ema = WeightEMA(settings.ema_decay)
    times, positions, documents, losses = [], [], [], []
    elapsed, step = 0.0, 0
    cpu0, wall0 = os.times(), time.perf_counter()
    while elapsed < budget and (settings.max_steps is None or step < settings.max_steps):
        batch, captions = next(batches)
        start = time.perf_counter()
        trainee.counter.total = 0
        for group in opt.param_groups:
            group["lr"] = settings.lr * lr_factor(step, elapsed, budget, settings)
        loss = trainee.loss(batch, captions, step)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), settings.clip)
        opt.step()
        ema.update(model)
        times.append(time.perf_counter() - start)
        elapsed += times[-1]
        positions.append(trainee.counter.total)
        documents.append(len(captions))
        losses.append(float(loss.detach()))
        step += 1
        if step % 100 == 0:
            log(f"{trainee.name}: step {step}, {elapsed:.0f} s, loss {statistics.mean(losses[-100:]):.4f}")
    cpu1, wall1 = os.times(), time.perf_counter()
    timed = slice(1, None) if len(times) > 1 else slice(None)  # the first step warms up
    record = {
        "steps": step, "train_s": elapsed, "params": sum(p.numel() for p in model.parameters()),
        "positions_per_step": statistics.mean(positions), "documents_per_step": statistics.mean(documents),
        "tokens_per_s": sum(positions[timed]) / sum(times[timed]),
        "documents_per_s": sum(documents[timed]) / sum(times[timed]),
        "step_ms_median": 1e3 * statistics.median(times),
        "cpu_s_per_wall_s": ((cpu1.user + cpu1.system) - (cpu0.user + cpu0.system)) / (wall1 - wall0),
        "loss_first": statistics.mean(losses[:10]), "loss_last": statistics.mean(losses[-10:]),
    }
    return record, ema.averaged_model(model)


def evaluate(trainee, model: nn.Module, docs: list) -> dict:
    """t2i scores of the EMA model on `docs` and seconds per image (sampling + VAE decoding)."""
    from anymodal.evaluate.shapes import ShapesScorer

    prompts = [d.segments[0].text for d in docs]
    start = time.perf_counter()
    with torch.no_grad():
        images = trainee.sample(model, prompts, list(range(len(docs))))
    seconds = time.perf_counter() - start
    scorer = ShapesScorer()
    for d, image in zip(docs, images):
        scorer.add_t2i(d.meta["scenes"][0], image, heldout=False)
    seen = scorer.scores()["seen"]
    return {"s_per_image": seconds / len(docs), "n": len(docs),
            **{k: seen[k] for k in ("t2i_exact", "t2i_object", "t2i_position", "t2i_count")}}


# ------------------------------------------------------------------------------------------ driver
def markdown_table(rows: list[dict]) -> str:
    """The results as a markdown table (what benchmarks/README.md shows)."""
    head = ["model", "params", "steps", "docs/step", "tokens/s", "docs/s", "train GFLOP/token", "GFLOP/s",
            "share of fp32 matmul peak", "s/image (25 steps)", "t2i_exact", "object", "position", "count"]
    lines = ["| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
    for r in rows:
        cells = [r["model"], f"{r['params'] / 1e6:.2f}M", str(r["steps"]), f"{r['documents_per_step']:.1f}",
                 f"{r['tokens_per_s']:.0f}", f"{r['documents_per_s']:.1f}",
                 f"{r['flops']['flops_per_position'] / 1e9:.4f}", f"{r['achieved_flops_per_s'] / 1e9:.1f}",
                 f"{r['share_of_fp32_matmul_peak']:.1%}", f"{r['s_per_image']:.3f}", f"{r['t2i_exact']:.3f}",
                 f"{r['t2i_object']:.3f}", f"{r['t2i_position']:.3f}", f"{r['t2i_count']:.3f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def machine() -> dict:
    name = None
    try:
        for line in subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout.splitlines():
            if line.startswith("Model name:"):
                name = line.split(":", 1)[1].strip()
    except (OSError, subprocess.CalledProcessError):
        pass
    return {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "model_name": name, "cpu_count": os.cpu_count(), "python": platform.python_version(),
            "torch": torch.__version__, "threads": torch.get_num_threads(),
            "load_average_before": list(os.getloadavg())}


def peer_version() -> str:
    from importlib.metadata import version

    return version("transfusion-pytorch")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=12.0, help="training-step time per model")
    parser.add_argument("--quick", action="store_true", help="a smoke run: 2 steps per model on 1 row")
    parser.add_argument("--eval-n", type=int, default=100, help="captions sampled and scored per model")
    parser.add_argument("--out", default=None, help="where to write the results (default: "
                        "benchmarks/results/peer.json; a --quick run writes nothing unless given)")
    parser.add_argument("--lr", type=float, default=1e-3, help="peak learning rate of both")
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    ns = parser.parse_args()
    if not (VAE / "model.safetensors").is_file():  # the shapes VAE of the demo, trained once (about 3 min)
        import subprocess

        subprocess.run([sys.executable, "-m", "anymodal.commands.cli", "fit", "--config",
                        str(ROOT / "recipes/tokenizers/vae-shapes.yaml"), "--model.init_args.export_dir", str(VAE),
                        "--trainer.default_root_dir", str(VAE.parent / "vae-run"),
                        # the recipe draws 24 px; this benchmark compares the two models at 32 px
                        "--data.init_args.source.init_args.size", "32",
                        "--data.init_args.val_source.init_args.size", "32"], check=True)
    try:
        version = peer_version()
    except ImportError:
        raise SystemExit("transfusion-pytorch is not installed: .venv/bin/pip install -e '.[peer]'") from None

    from anymodal.hardware import matmul_rate
    from anymodal.tokenizers.image import load_image_tokenizer
    from anymodal.tokenizers.text import load_text_tokenizer

    torch.set_num_threads(ns.threads)
    settings = Settings(minutes=ns.minutes, eval_n=ns.eval_n, lr=ns.lr, threads=ns.threads)
    if ns.quick:
        settings = dataclasses.replace(settings, rows=1, max_steps=2, warmup_steps=1)
    log = functools.partial(print, flush=True)
    info = machine()
    started = time.perf_counter()
    peak = matmul_rate(torch.float32)
    vae = load_image_tokenizer(VAE).requires_grad_(False).eval()
    text = load_text_tokenizer(TEXT_TOKENIZER)
    docs = evaluation_documents(settings.eval_n)

    rows = []
    anymodal = Anymodal(settings, vae)
    for trainee in (anymodal, Peer(settings, vae, text)):
        batches = shared_batches(text, anymodal.encoder, settings)  # the same documents, in order, for both
        flops = training_flops(trainee, *next(shared_batches(text, anymodal.encoder, settings)))
        record, ema_model = train(trainee, batches, settings, log)
        achieved = flops["flops_per_position"] * record["tokens_per_s"]
        record.update(flops=flops, achieved_flops_per_s=achieved, share_of_fp32_matmul_peak=achieved / peak)
        record.update(evaluate(trainee, ema_model, docs))
        rows.append({"model": trainee.name, **record})
        log(f"{trainee.name}: {record['steps']} steps, {record['tokens_per_s']:.0f} tokens/s, "
            f"t2i_exact {record['t2i_exact']:.3f}")
    info.update(load_average_after=list(os.getloadavg()), fp32_matmul_flops_per_s=peak)

    budget = f"{settings.max_steps} steps" if ns.quick else f"{settings.minutes:g} min of training steps"
    print(f"\nshapes-world t2i, {budget} each, {info['threads']} threads, {info['model_name'] or info['processor']}, "
          f"torch {info['torch']}, transfusion-pytorch {version}\n")
    print(markdown_table(rows))

    if ns.quick and ns.out is None:
        return
    out = Path(ns.out or ROOT / "benchmarks/results/peer.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    doc = {"benchmark": "peer", "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
           "machine": info, "quick": ns.quick, "wall_s": time.perf_counter() - started,
           "peer": {"package": "transfusion-pytorch", "version": version}, "settings": dataclasses.asdict(settings),
           "results": rows}
    out.write_text(json.dumps(doc, indent=2) + "\n")
    log(f"wrote {out}")


if __name__ == "__main__":
    main()
