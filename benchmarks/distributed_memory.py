"""Start-up host memory and training speed of DDP, ZeRO-2 and ZeRO-3 with 2 CPU processes (gloo).

Every configuration runs `Trainer.fit` of the transfusion model (UnifiedSystem, the shapes world at 32 px, an
untrained small VAE) in 2 fresh processes, Lightning's launcher starting the second; DeepSpeed runs through
`anymodal.systems.strategies.CPUDeepSpeedStrategy`. Each rank records:

- model built: the RSS before and the peak RSS (`ru_maxrss`) right after `configure_model` (under ZeRO-3 the
  model is built inside `deepspeed.zero.Init`, each module sharded as soon as it exists);
- start-up: the peak RSS when training starts (`on_fit_start`: the strategy set up; DeepSpeed allocates its
  fp32 master weights, AdamW's moments and its communication buckets here, DDP its gradient buckets; DDP's
  AdamW moments come at the first step);
- with `steps`: tokens per second over the steps after the first (both ranks' tokens: global throughput),
  the training peak RSS and the CPU seconds per wall second of the measured steps (the CPU may be shared).

Configurations (`--quick`: `small` for every strategy, 3 steps):
- the `1b` size (the 1b recipe's decoder, dim 2048, 22 layers; this tokenizer's small vocabulary) in the
  recipe's bf16-mixed: ZeRO-2 and ZeRO-3 to the start of training, DDP to the built model only (its start-up
  adds gradient buckets of the model's size: ~9 GB per rank, more than this shared 24 GB machine should risk);
- the `base` size, fp32, seq_len 256, batch 2 per rank, 6 steps, under all three.

    .venv/bin/python benchmarks/distributed_memory.py     # writes benchmarks/results/distributed_memory.json
    .venv/bin/python benchmarks/distributed_memory.py --quick
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TEXT_TOKENIZER = ROOT / "tokenizers" / "shapes-text"
LAUNCHER_VARIABLES = ("LOCAL_RANK", "RANK", "WORLD_SIZE", "NODE_RANK", "MASTER_ADDR", "MASTER_PORT", "PL_GLOBAL_SEED")


def rss_mib() -> float:
    """Current resident set size of this process in MiB (Linux)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


# ------------------------------------------------------------------------------------------ one rank
def worker(config_file: str) -> None:
    """One rank of one configuration (Lightning runs this again for rank 1); writes OUT/rank{r}.json."""
    spec = json.loads(Path(config_file).read_text())
    import torch
    from lightning.pytorch import Callback, Trainer, seed_everything
    from lightning.pytorch.strategies import DDPStrategy

    from anymodal.data.datamodule import UnifiedDataModule
    from anymodal.data.shapes import ShapesWorld
    from anymodal.systems.strategies import CPUDeepSpeedStrategy
    from anymodal.systems.unified import UnifiedSystem

    after_imports = rss_mib()
    torch.set_num_threads(spec["threads"])
    out = Path(spec["out"])

    class Measure(Callback):
        def __init__(self) -> None:
            self.times: list[float] = []
            self.cpu: list[float] = []

        def on_fit_start(self, trainer, module) -> None:
            self.startup = {"peak_rss_mib": peak_rss_mib(), "rss_mib": rss_mib()}
            if spec["stop"] == "setup":
                trainer.should_stop = True  # start-up only: no step (the fit loop stops before the first)

        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
            self.times.append(time.perf_counter())
            self.cpu.append(sum(os.times()[:2]))
            self.tokens = batch.tokens.numel()

    class Measured(UnifiedSystem):
        def configure_model(self) -> None:
            before = rss_mib()
            super().configure_model()
            self.built = {"rss_before_mib": before, "peak_rss_mib": peak_rss_mib(), "rss_mib": rss_mib()}
            if spec["stop"] == "model":  # every rank stops here (DDP at 1b): nothing more to measure
                (out / f"rank{self.global_rank}.json").write_text(json.dumps(
                    {"rank": self.global_rank, "after_imports_rss_mib": after_imports, "model_built": self.built,
                     "params": sum(p.numel() for p in self.model.parameters())}, indent=1))
                os._exit(0)

    seed_everything(0)
    system = Measured(text_tokenizer=str(TEXT_TOKENIZER), image_tokenizer=spec["image_tokenizer"],
                           size=spec["size"], ema_decay=0.9999, warmup_steps=10)
    data = UnifiedDataModule([ShapesWorld(size=32, seed=0)], seq_len=spec["seq_len"], batch_size=spec["batch_size"])
    strategy = (DDPStrategy(process_group_backend="gloo") if spec["strategy"] == "ddp"
                else CPUDeepSpeedStrategy(stage=int(spec["strategy"][-1]), **spec.get("deepspeed", {})))
    measure = Measure()
    trainer = Trainer(accelerator="cpu", devices=2, strategy=strategy, precision=spec["precision"],
                      max_steps=max(1, spec["steps"]), gradient_clip_val=1.0, logger=False,
                      enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                      callbacks=[measure], limit_val_batches=0, num_sanity_val_steps=0, default_root_dir=out)
    trainer.fit(system, datamodule=data)
    result = {"rank": trainer.global_rank, "after_imports_rss_mib": after_imports, "model_built": system.built,
              "startup": measure.startup,
              "params": sum(int(getattr(p, "ds_numel", p.numel())) for p in system.model.parameters())}
    if len(measure.times) > 1:
        wall = measure.times[-1] - measure.times[0]
        steps = len(measure.times) - 1
        result.update(tokens_per_s=steps * measure.tokens * trainer.world_size / wall, s_per_step=wall / steps,
                      cpu_per_wall=(measure.cpu[-1] - measure.cpu[0]) / wall, training_peak_rss_mib=peak_rss_mib())
    (out / f"rank{trainer.global_rank}.json").write_text(json.dumps(result, indent=1))


# ------------------------------------------------------------------------------------------ the driver
def run(spec: dict, root: Path) -> dict:
    out = root / f"{spec['strategy']}-{spec['size']}"
    out.mkdir()
    spec = {**spec, "out": str(out)}
    (out / "spec.json").write_text(json.dumps(spec))
    env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_VARIABLES}
    started = time.perf_counter()
    done = subprocess.run([sys.executable, __file__, "--worker", str(out / "spec.json")], cwd=ROOT, env=env,
                          capture_output=True, text=True)
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1) if (out / f"rank{r}.json").is_file()]
    if done.returncode or len(ranks) != 2:
        raise RuntimeError(f"{out.name} failed:\n{done.stderr[-4000:]}")
    return {**{k: v for k, v in spec.items() if k not in ("out", "image_tokenizer")}, "wall_s": time.perf_counter() - started,
            "params": ranks[0]["params"], "ranks": ranks}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--quick", action="store_true", help="small size, 3 steps, every strategy; no file")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per rank (2 ranks share the CPU)")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "distributed_memory.json"))
    args = parser.parse_args(argv)
    if args.worker:
        return worker(args.worker)

    import torch

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from sampling import machine

    from anymodal.tokenizers.image import save_image_tokenizer
    from anymodal.tokenizers.vae import VAE, VAEConfig

    speed = {"precision": "32-true", "seq_len": 256, "batch_size": 2, "steps": 6, "stop": None}
    if args.quick:
        specs = [{"strategy": s, "size": "small", **speed, "steps": 3} for s in ("ddp", "zero2", "zero3")]
    else:
        startup = {"precision": "bf16-mixed", "seq_len": 256, "batch_size": 1, "steps": 0}
        specs = ([{"strategy": s, "size": "1b", **startup, "stop": "model" if s == "ddp" else "setup"}
                  for s in ("zero3", "zero2", "ddp")]
                 + [{"strategy": s, "size": "base", **speed} for s in ("ddp", "zero2", "zero3")])
    load_before, started = os.getloadavg(), time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        torch.manual_seed(0)
        vae = save_image_tokenizer(VAE(VAEConfig(block_out_channels=[16, 32, 32], norm_num_groups=8)), Path(tmp) / "vae")
        results = []
        for spec in specs:
            result = run({**spec, "threads": args.threads, "image_tokenizer": str(vae)}, Path(tmp))
            results.append(result)
            ranks = result["ranks"]
            built = max(r["model_built"]["peak_rss_mib"] for r in ranks)
            notes = [f"model built: peak RSS {built:.0f} MiB per rank"]
            if "startup" in ranks[0]:
                notes.append(f"start-up {max(r['startup']['peak_rss_mib'] for r in ranks):.0f} MiB")
            if "tokens_per_s" in ranks[0]:
                notes.append(f"training {max(r['training_peak_rss_mib'] for r in ranks):.0f} MiB, "
                             f"{ranks[0]['tokens_per_s']:.0f} tokens/s")
            print(f"{spec['strategy']:>5} {spec['size']:>5} ({result['params'] / 1e6:.0f}M, {spec['precision']}): "
                  f"{'; '.join(notes)}  [{result['wall_s']:.0f} s]", flush=True)
    report = {"benchmark": "distributed_memory",
              "machine": {**machine("cpu"), "threads": args.threads, "processes": 2,
                          "load_average_before": load_before, "load_average_after": os.getloadavg()},
              "quick": args.quick, "wall_s": time.perf_counter() - started, "results": results}
    if not args.quick:
        Path(args.out).write_text(json.dumps(report, indent=2))
        print(f"wrote {args.out}")
    return report


if __name__ == "__main__":
    main()
