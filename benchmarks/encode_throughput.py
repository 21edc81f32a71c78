"""Encoding throughput of `anymodal encode`, and the training step on encoded shards against on-the-fly encoding.

1. Encode throughput (images/s) at 64 and 256 px with a VQ-VAE and a VAE of the shape of the shapes recipes
   (recipes/tokenizers/vqvae-shapes.yaml, vae-shapes.yaml; untrained: speed does not depend on the weights), on
   real photos: scikit-image's sample images as JPEGs in a folder with captions.jsonl, repeated to `--images`
   lines, through the whole command (JPEG decode, center crop, resize, tokenizer, 16-bit shards), with 1 and
   with 2 processes. The image tokenizer's own share is timed apart (`tokenizer_images_per_s`: one batch of
   `--batch-size` images already in memory).
2. Training step time of the transfusion-shapes recipe (size `shapes`, 32 px, seq_len 256, batch 8, the
   recipe's source mix and hold-out) with the recipe's VAE shape, in this one process: the shapes world
   rendered and encoded on the fly, against shards of the same world made by `anymodal encode` and a system
   built with `pre_encoded=true`. A step is the wall time from one batch's end to the next (data, VAE encode
   when on the fly, forward, backward, clipping, AdamW, EMA); the first `--warmup` steps are not counted.

The machine may be shared: the load average and CPU time per wall second are recorded with the figures.

    .venv/bin/python benchmarks/encode_throughput.py            # writes benchmarks/results/encode_throughput.json
    .venv/bin/python benchmarks/encode_throughput.py --quick    # a smoke run, no file
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from sampling import machine  # this folder's benchmarks share the machine record
from train_throughput import image_tokenizer  # untrained tokenizers of the recipes' shapes

from anymodal.encode import EncodeSettings, encode

ROOT = Path(__file__).resolve().parents[1]
TEXT_TOKENIZER = str(ROOT / "tokenizers" / "shapes-text")
PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "immunohistochemistry", "hubble_deep_field", "retina", "cat")
RECIPE_TASKS = {"t2i": 0.35, "caption": 0.15, "vqa": 0.15, "edit": 0.2, "story": 0.1, "text": 0.05}
HOLDOUT = ["purple triangle", "cyan circle"]


class Clock:
    """Wall and CPU seconds of a block, and the load average at its end."""

    def __enter__(self) -> Clock:
        self.cpu, self.wall = os.times(), time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        cpu, self.seconds = os.times(), time.perf_counter() - self.wall
        used = (cpu.user + cpu.system + cpu.children_user + cpu.children_system
                - self.cpu.user - self.cpu.system - self.cpu.children_user - self.cpu.children_system)
        self.cpu_per_wall = used / self.seconds
        self.load = os.getloadavg()


def photo_folder(folder: Path, lines: int) -> Path:
    """scikit-image's sample photos as JPEGs, with a captions.jsonl of `lines` lines cycling over them."""
    import PIL.Image
    import skimage.data

    folder.mkdir(parents=True, exist_ok=True)
    for name in PHOTOS:
        PIL.Image.fromarray(getattr(skimage.data, name)()).convert("RGB").save(folder / f"{name}.jpg", quality=90)
    with (folder / "captions.jsonl").open("w") as f:
        for i in range(lines):
            name = PHOTOS[i % len(PHOTOS)]
            f.write(json.dumps({"image": f"{name}.jpg", "caption": f"photo {i}: {name.replace('_', ' ')}"}) + "\n")
    return folder


def tokenizer_rate(folder: Path, size: int, batch: int, repeats: int = 3) -> float:
    """Images per second of the image tokenizer alone on one batch of `batch` random images (best of `repeats`)."""
    from anymodal.tokenizers.image import load_image_tokenizer

    tok = load_image_tokenizer(folder)
    pixels = torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(0))
    best = float("inf")
    with torch.no_grad():
        tok.encode(pixels[:2])
        for _ in range(repeats):
            start = time.perf_counter()
            tok.encode(pixels)
            best = min(best, time.perf_counter() - start)
    return batch / best


def encode_rates(work: Path, tokenizers: dict[str, Path], sizes: list[int], images: dict[int, int],
                 batch: int, processes: list[int]) -> list[dict]:
    rows = []
    for size in sizes:
        photos = photo_folder(work / f"photos-{size}", images[size])
        for path, folder in tokenizers.items():
            for n in processes:
                out = work / f"encoded-{path}-{size}-{n}"
                settings = EncodeSettings(source=str(photos), out=str(out), text_tokenizer=TEXT_TOKENIZER,
                                          image_tokenizer=str(folder), image_size=size,
                                          shard_size=max(1, images[size] // (2 * n)), processes=n,
                                          batch_size=batch)
                with Clock() as clock:
                    result = encode(settings, progress=False)
                shard_bytes = sum((out / r.name).stat().st_size for r in result.manifest.shards)
                rows.append({"path": path, "image_size": size, "processes": n, "images": result.images,
                             "seconds": round(clock.seconds, 2),
                             "images_per_s": round(result.images_per_second, 1),
                             "tokenizer_images_per_s": round(tokenizer_rate(folder, size, batch), 1) if n == 1 else None,
                             "bytes_per_image": round(shard_bytes / result.images),
                             "images_per_cpu_s": round(result.images / (clock.cpu_per_wall * clock.seconds), 1),
                             "cpu_s_per_wall_s": round(clock.cpu_per_wall, 2),
                             "load_average_1m": round(clock.load[0], 2)})
                print(json.dumps(rows[-1]), flush=True)
    return rows


class StepTimes:
    """Wall and CPU seconds between consecutive training-batch ends (a Lightning callback)."""

    def __init__(self) -> None:
        from lightning.pytorch import Callback

        outer = self

        class _Callback(Callback):
            def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
                now, cpu = time.perf_counter(), os.times()
                if outer.last is not None:
                    outer.wall.append(now - outer.last[0])
                    outer.cpu.append(cpu.user + cpu.system - outer.last[1])
                outer.last = now, cpu.user + cpu.system

        self.callback, self.wall, self.cpu, self.last = _Callback(), [], [], None


def train_steps(source, vae: Path, pre_encoded: bool, steps: int, warmup: int, root: Path) -> dict:
    """Median and mean step seconds of the transfusion-shapes recipe on `source` (Lightning, one process)."""
    import logging

    from lightning.pytorch import Trainer

    from anymodal.data.datamodule import UnifiedDataModule
    from anymodal.systems.unified import UnifiedSystem

    logging.getLogger("lightning").setLevel(logging.ERROR)
    torch.manual_seed(0)
    system = UnifiedSystem(text_tokenizer=TEXT_TOKENIZER, image_tokenizer=str(vae), size="shapes", image_size=32,
                           patch_size=2, lr=2e-3, warmup_steps=100, ema_decay=0.995, pre_encoded=pre_encoded)
    data = UnifiedDataModule([source], seq_len=256, batch_size=8, drop_text=0.1, drop_image=0.1, seed=0)
    timer = StepTimes()
    trainer = Trainer(accelerator="cpu", devices=1, precision="32-true", max_steps=warmup + steps + 1,
                      gradient_clip_val=1.0, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                      enable_model_summary=False, callbacks=[timer.callback], default_root_dir=root,
                      limit_val_batches=0, num_sanity_val_steps=0)
    with Clock() as clock:
        trainer.fit(system, datamodule=data)
    wall, cpu = timer.wall[warmup:], timer.cpu[warmup:]
    return {"step_s_median": round(statistics.median(wall), 4), "step_s_mean": round(statistics.mean(wall), 4),
            "cpu_s_per_step_median": round(statistics.median(cpu), 4), "steps": len(wall),
            "cpu_s_per_wall_s": round(sum(cpu) / sum(wall), 2),
            "load_average_1m": round(clock.load[0], 2)}


def step_times(work: Path, vae: Path, steps: int, warmup: int, documents: int, repeats: int) -> dict:
    from anymodal.data.shapes import ShapesWorld
    from anymodal.data.shards import EncodedShards

    out = work / "shapes-encoded"
    with Clock() as clock:
        encoded = encode(EncodeSettings(source="shapes", out=str(out), text_tokenizer=TEXT_TOKENIZER,
                                        image_tokenizer=str(vae), image_size=32, documents=documents,
                                        shard_size=max(1, documents // 4), tasks=RECIPE_TASKS, holdout=HOLDOUT),
                         progress=False)
    runs: dict[str, list[dict]] = {"on_the_fly": [], "encoded_shards": []}
    for r in range(repeats):  # alternate, so that a change in the machine's load hits both alike
        runs["on_the_fly"].append(train_steps(ShapesWorld(size=32, seed=0, holdout=HOLDOUT, tasks=RECIPE_TASKS), vae,
                                              False, steps, warmup, work / f"fly-{r}"))
        print("on the fly", json.dumps(runs["on_the_fly"][-1]), flush=True)
        runs["encoded_shards"].append(train_steps(EncodedShards(out, shuffle=True), vae, True, steps, warmup,
                                                  work / f"shards-{r}"))
        print("encoded shards", json.dumps(runs["encoded_shards"][-1]), flush=True)
    best = {k: min(v, key=lambda run: run["step_s_median"]) for k, v in runs.items()}
    return {"recipe": "recipes/models/transfusion-shapes.yaml (size shapes, 32 px, seq_len 256, batch 8, num_workers 0)",
            "shards": {"documents": encoded.manifest.documents, "images": encoded.images,
                       "encode_images_per_s": round(encoded.images_per_second, 1), "seconds": round(clock.seconds, 1)},
            "runs": runs, "best": best,
            "speedup_median": round(best["on_the_fly"]["step_s_median"] / best["encoded_shards"]["step_s_median"], 3)}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (1: the machine is shared)")
    parser.add_argument("--images-64", type=int, default=256, help="photos encoded at 64 px")
    parser.add_argument("--images-256", type=int, default=64, help="photos encoded at 256 px")
    parser.add_argument("--batch-size", type=int, default=32, help="images per tokenizer call")
    parser.add_argument("--steps", type=int, default=40, help="measured training steps per run")
    parser.add_argument("--warmup", type=int, default=5, help="training steps not counted")
    parser.add_argument("--repeats", type=int, default=2, help="training runs per way; the fastest median is kept")
    parser.add_argument("--documents", type=int, default=3000, help="shapes-world documents encoded for training")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "encode_throughput.json"))
    parser.add_argument("--quick", action="store_true", help="smoke run: few images and steps, no file")
    args = parser.parse_args(argv)
    if args.quick:
        args.images_64, args.images_256, args.steps, args.warmup, args.repeats, args.documents = 16, 8, 3, 1, 1, 200
    torch.set_num_threads(args.threads)
    started, load_before = time.perf_counter(), os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        tokenizers = {"vqvae": image_tokenizer("discrete", work)[0], "vae": image_tokenizer("continuous", work)[0]}
        result = {
            "machine": {**machine("cpu"), "load_average_before": [round(x, 2) for x in load_before]},
            "encode": encode_rates(work, tokenizers, [64, 256], {64: args.images_64, 256: args.images_256},
                                   args.batch_size, [1, 2]),
            "training_step": step_times(work, tokenizers["vae"], args.steps, args.warmup, args.documents, args.repeats),
        }
    result["machine"]["load_average_after"] = [round(x, 2) for x in os.getloadavg()]
    result["seconds"] = round(time.perf_counter() - started, 1)
    print(json.dumps(result["training_step"]["best"], indent=2), f"speed-up {result['training_step']['speedup_median']}x")
    if not args.quick:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    sys.exit(main() and 0)
