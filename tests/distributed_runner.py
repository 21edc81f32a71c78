"""A short `Trainer.fit` of a debug-size UnifiedSystem under one strategy, for tests/test_distributed.py.

    python tests/distributed_runner.py RUN.json

RUN.json: {"strategy": "single" | "ddp" | "zero2" | "zero3", "out": folder, "image_tokenizer": folder,
"steps": int, "save_at": [step, ...], "resume": checkpoint or null, "precision": "32-true" | "bf16-mixed",
"ema_decay": float, "optimizer": "adamw" | "muon"}. Two processes except "single": started with LOCAL_RANK, WORLD_SIZE, MASTER_ADDR/PORT set
(as torchrun does), or else Lightning's launcher starts rank 1 by running this script again. Every rank sees
the same batches (`SameOnEveryRank`), so averaging the gradients of two ranks gives the
gradient of one process, and every strategy should repeat the single-process run.

Writes OUT/rank{r}.json: the loss of every step, the dtype of the EMA and the checks of the frozen image
tokenizer; and OUT/step{n}.ckpt (a folder under ZeRO) at each step of `save_at`.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
from lightning.pytorch import Callback, Trainer, seed_everything  # noqa: E402
from lightning.pytorch.strategies import DDPStrategy  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from anymodal.data.datamodule import UnifiedDataModule  # noqa: E402
from anymodal.data.shapes import ShapesWorld  # noqa: E402
from anymodal.systems.strategies import CPUDeepSpeedStrategy  # noqa: E402
from anymodal.systems.unified import UnifiedSystem  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TASKS = {"t2i": 1.0, "caption": 1.0, "vqa": 1.0, "edit": 1.0}  # documents that fit 128 tokens at 32 px


class SameOnEveryRank(ShapesWorld):
    """The shapes world as one process draws it, on every rank (a real source gives each rank its own shard)."""

    def documents(self, shard: int, num_shards: int):
        return super().documents(0, 1)


class Record(Callback):
    """Losses of every step; a checkpoint at each step of `save_at`."""

    def __init__(self, out: Path, save_at: list[int]) -> None:
        self.out, self.save_at, self.losses = out, save_at, []

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        self.losses.append(float(outputs["loss"]))
        if trainer.global_step in self.save_at:
            trainer.save_checkpoint(self.out / f"step{trainer.global_step}.ckpt")


def strategy(name: str):
    if name == "single":
        return "auto"
    if name == "ddp":
        return DDPStrategy(process_group_backend="gloo")
    deepspeed = CPUDeepSpeedStrategy(stage=int(name[-1]))
    # ZeRO-3 keeps weights under 1e5 elements whole on every rank by default: here every weight is partitioned
    deepspeed.config["zero_optimization"]["stage3_param_persistence_threshold"] = 0
    return deepspeed


def tokenizer_checks(system: UnifiedSystem, folder: str) -> dict:
    """The frozen image tokenizer: fp32, untouched by training, never seen by the strategy or the optimizer."""
    tokenizer = system.image_tokenizer
    saved = load_file(str(Path(folder) / "model.safetensors"))
    own = tokenizer.state_dict()
    in_tree = {id(p) for p in system.parameters()}
    return {"dtypes": sorted({str(p.dtype) for p in tokenizer.parameters()}),
            "unchanged": all(torch.equal(own[k], v) for k, v in saved.items()),
            "in_module_tree": any(id(p) in in_tree for p in tokenizer.parameters()),
            "trainable": any(p.requires_grad for p in tokenizer.parameters()),
            "sharded": any(hasattr(p, "ds_id") or hasattr(p, "_hp_mapping") for p in tokenizer.parameters())}


def main(run_file: str) -> None:
    run = json.loads(Path(run_file).read_text())
    out = Path(run["out"])
    torch.set_num_threads(1)  # two ranks on two cores
    seed_everything(0)
    system = UnifiedSystem(text_tokenizer=str(ROOT / "tokenizers" / "shapes-text"),
                           image_tokenizer=run["image_tokenizer"], size="debug", warmup_steps=2,
                           ema_decay=run.get("ema_decay", 0.9), optimizer=run.get("optimizer", "adamw"))
    data = UnifiedDataModule([SameOnEveryRank(size=32, seed=0, tasks=TASKS)], seq_len=128, batch_size=2, seed=0)
    record = Record(out, run.get("save_at", []))
    trainer = Trainer(accelerator="cpu", devices=1 if run["strategy"] == "single" else 2,
                      strategy=strategy(run["strategy"]), precision=run.get("precision", "32-true"),
                      max_steps=run["steps"], gradient_clip_val=1.0, logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, callbacks=[record],
                      limit_val_batches=0, num_sanity_val_steps=0, default_root_dir=out)
    seed_everything(0)  # the model is built in fit (configure_model), as the distributed strategies re-seed there
    trainer.fit(system, datamodule=data, ckpt_path=run.get("resume"))
    ema = system.ema
    result = {"losses": record.losses, "step": trainer.global_step,
              "ema": None if ema is None else {"layout": ema.layout, "updates": ema.updates,
                                               "dtypes": sorted({str(p.values.dtype) for p in ema.pieces.values()})},
              "model_dtypes": sorted({str(p.dtype) for p in system.model.parameters()}),
              "tokenizer": tokenizer_checks(system, run["image_tokenizer"])}
    (out / f"rank{trainer.global_rank}.json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main(sys.argv[1])
