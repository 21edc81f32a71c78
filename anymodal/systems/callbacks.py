"""Training callbacks: image grids of what a system produces, throughput with model-FLOPs utilisation,
checkpoints whose `last.ckpt` is the final state, and progress written to a file for another process to show.

`ReconstructionGrid` writes originals (top row) above their reconstructions (bottom row) through an
image tokenizer's public API, `decode(encode(x))`.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint, ThroughputMonitor
from PIL import Image as PILImage

from anymodal.atomic import write_text
from anymodal.data.shapes import task_mix


def image_grid(rows: list[torch.Tensor], scale: int = 1, pad: int = 2) -> np.ndarray:
    """Rows of images, each (N, 3, H, W) in [0, 1], as one uint8 (H', W', 3) array on a grey ground.

    Every row has the same N, H and W; `scale` enlarges each pixel to scale x scale (nearest).
    """
    if not rows or any(r.ndim != 4 or r.shape[1] != 3 or r.shape != rows[0].shape for r in rows):
        raise ValueError(f"image_grid needs rows of equal (N, 3, H, W) tensors, got {[tuple(r.shape) for r in rows]}")
    n, _, h, w = rows[0].shape
    hs, ws = h * scale, w * scale
    grid = np.full((len(rows) * (hs + pad) + pad, n * (ws + pad) + pad, 3), 128, dtype=np.uint8)
    for r, row in enumerate(rows):
        arr = (row.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()  # (N, 3, H, W)
        arr = arr.transpose(0, 2, 3, 1).repeat(scale, axis=1).repeat(scale, axis=2)  # (N, hs, ws, 3)
        for i in range(n):
            y, x = pad + r * (hs + pad), pad + i * (ws + pad)
            grid[y:y + hs, x:x + ws] = arr[i]
    return grid


def save_image_grid(rows: list[torch.Tensor], path: str | Path, scale: int = 1) -> Path:
    """Write `image_grid(rows, scale)` as a PNG at `path` (folders made as needed)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    PILImage.fromarray(image_grid(rows, scale)).save(path)
    return path


class ReconstructionGrid(Callback):
    """Every `every_n_steps` steps and at the end of fit, a PNG of originals above reconstructions.

    Files go to `<trainer.log_dir>/samples/recon_step<step>.png` (and `recon_final.png` at the end),
    and, when the system has an `export_dir`, `reconstructions.png` there. The images are the first
    `num_images` of the first training batch, the same ones all run long.

    every_n_steps: steps between grids (0: only at the end of fit)
    num_images:    images per row
    scale:         each pixel is drawn as scale x scale pixels
    """

    def __init__(self, every_n_steps: int = 500, num_images: int = 8, scale: int = 4) -> None:
        if every_n_steps < 0 or num_images < 1 or scale < 1:
            raise ValueError(f"ReconstructionGrid needs every_n_steps >= 0, num_images >= 1, scale >= 1; got "
                             f"{every_n_steps}, {num_images}, {scale}")
        self.every_n_steps = every_n_steps
        self.num_images = num_images
        self.scale = scale
        self.images: torch.Tensor | None = None

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs, batch, batch_idx: int) -> None:
        if self.images is None:
            self.images = batch[: self.num_images].detach().float().cpu().contiguous()  # (N, 3, H, W)
        step = trainer.global_step
        if self.every_n_steps and step % self.every_n_steps == 0 and trainer.is_global_zero:
            self.write(trainer, pl_module, f"recon_step{step:06d}.png")

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.images is None or not trainer.is_global_zero:
            return
        path = self.write(trainer, pl_module, "recon_final.png")
        export_dir = getattr(pl_module, "export_dir", None)
        if export_dir:
            Path(export_dir).mkdir(parents=True, exist_ok=True)
            (Path(export_dir) / "reconstructions.png").write_bytes(path.read_bytes())

    @torch.no_grad()
    def write(self, trainer: Trainer, pl_module: LightningModule, name: str) -> Path:
        tok = pl_module.model
        was_training = tok.training
        tok.eval()
        x = self.images.to(pl_module.device)  # (N, 3, H, W)
        recon = tok.decode(tok.encode(x))  # (N, 3, H, W)
        tok.train(was_training)
        folder = Path(trainer.log_dir or trainer.default_root_dir) / "samples"
        return save_image_grid([x, recon], folder / name, self.scale)


class MFUMonitor(ThroughputMonitor):
    """Lightning's ThroughputMonitor for packed Batches, with the model-FLOPs utilisation on any device.

    Logs `train/device/tokens_per_sec`, `train/device/flops_per_sec` and `train/device/mfu` (dense attention,
    the PaLM convention) from the system's `flops_per_batch` (anymodal.flops). The peak is this device's
    measured matmul rate in the training precision (`anymodal.hardware.matmul_rate`), on CPUs and GPUs alike:
    Lightning's table has no peak for CPUs or for chips it does not name (an "NVIDIA H200" is neither its
    "h200 sxm1" nor "nvl1"), and its Hopper figures count 2:4 sparsity, twice the dense rate.
    """

    def __init__(self, window_size: int = 20) -> None:
        super().__init__(batch_size_fn=lambda batch: batch.tokens.shape[0],
                         length_fn=lambda batch: batch.tokens.numel(), window_size=window_size)

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        device = trainer.strategy.root_device
        if device.type not in ("cpu", "cuda"):
            return
        from lightning.fabric.utilities.throughput import Throughput
        from lightning.pytorch.utilities.rank_zero import rank_zero_info

        from anymodal.hardware import matmul_rate

        dtype = torch.bfloat16 if "bf16" in str(trainer.precision) else torch.float32
        self.available_flops = matmul_rate(dtype, device=device)
        where = (f"CPU, {torch.get_num_threads()} threads" if device.type == "cpu"
                 else torch.cuda.get_device_name(device))
        rank_zero_info(f"MFU is measured against {self.available_flops / 1e12:.2f} TFLOP/s ({where}, measured "
                       f"{dtype} matmul)")
        for key in self._throughputs:
            self._throughputs[key] = Throughput(available_flops=self.available_flops,
                                                world_size=trainer.world_size, **self.kwargs)


class TaskMixSwitch(Callback):
    """From step `at_step` on, every training source with a task mix (`set_tasks`, e.g. ShapesWorld) draws
    `tasks` instead: a late phase weighted toward the tasks learnt last (edits). It shows within a few batches
    (Lightning fetches ahead; a row in progress carries documents over). Needs the data in the main process
    (num_workers 0, the recipes' default): a worker process keeps its own copy of the source.

    Measured on the transfusion recipe (benchmarks/README.md, "A late phase of edits"); off in the recipes."""

    def __init__(self, at_step: int, tasks: dict[str, float]) -> None:
        task_mix(tasks)  # a typo in the recipe is refused at start, not at `at_step`
        self.at_step, self.tasks, self.switched = at_step, dict(tasks), False

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch, batch_idx: int) -> None:
        if self.switched or trainer.global_step < self.at_step:
            return
        sources = [s for s in getattr(trainer.datamodule, "sources", []) if hasattr(s, "set_tasks")]
        if not sources:
            raise ValueError("TaskMixSwitch found no training source with a task mix (such as ShapesWorld)")
        if getattr(trainer.datamodule, "num_workers", 0):
            raise ValueError("TaskMixSwitch needs num_workers 0: a worker process keeps its own copy of the source")
        for source in sources:
            source.set_tasks(self.tasks)
        self.switched = True


class FinalCheckpoint(ModelCheckpoint):
    """`ModelCheckpoint` whose `last.ckpt` is always where training stopped.

    Lightning writes `last.ckpt` at the end of training only when it wrote no checkpoint before, so a run that
    stops between two periodic saves (the shapes recipes: 2,600 steps, a save every 500) kept `last.ckpt` at
    step 2,500, and `anymodal export` of it lost the last 100 steps. Here the end of training saves it again
    whenever the last save was at another step."""

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.save_last and self._last_global_step_saved != trainer.global_step:
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))
            return
        super().on_train_end(trainer, pl_module)


def write_progress(path: str | Path, label: str, step: int = 0, total: int | None = None) -> None:
    """Write `{"label", "step", "total"}` as JSON to `path`, atomically: what a lane's progress bar shows
    (anymodal.commands.lanes reads it), from ProgressFile during training and from the lanes' other stages."""
    write_text(path, json.dumps({"label": label, "step": step, "total": total}))


class ProgressFile(Callback):
    """Writes `{"label", "step", "total"}` as JSON to `path` (atomically) at most every `every_s` seconds and at
    the end of training: how the demo's lanes (anymodal.commands.lanes) show the steps of a run whose output goes
    to a log file."""

    def __init__(self, path: str | Path, label: str = "fit", every_s: float = 1.0) -> None:
        self.path, self.label, self.every_s = Path(path), label, every_s
        self._written = float("-inf")

    def write(self, trainer: Trainer) -> None:
        total = trainer.max_steps if trainer.max_steps and trainer.max_steps > 0 else None
        write_progress(self.path, self.label, trainer.global_step, total)
        self._written = time.monotonic()

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.write(trainer)

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs, batch, batch_idx: int) -> None:
        if trainer.is_global_zero and time.monotonic() - self._written >= self.every_s:
            self.write(trainer)

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.is_global_zero:
            self.write(trainer)


class TimeBudget(Callback):
    """Trains as many steps as fit before a deadline, at most the trainer's `max_steps`.

    From step `measure_from` on (after compilation and the first steps), every `every` steps the mean seconds per
    step since then set `max_steps` to the steps the time left allows, rounded down to a multiple of `round_to`.
    A learning-rate schedule that reads `trainer.max_steps` at each step (UnifiedSystem's warm-up and cosine)
    then ends where training ends. Lightning's own `max_time` stops at the deadline wherever the schedule is,
    so the learning rate never comes down; this callback exists for that.

    seconds:  the budget, counted from the start of training; or
    deadline: the wall-clock time (time.time()) by which training ends: a budget shared with other stages."""

    def __init__(self, seconds: float | None = None, deadline: float | None = None, measure_from: int = 50,
                 every: int = 50, round_to: int = 50) -> None:
        if (seconds is None) == (deadline is None):
            raise ValueError("TimeBudget needs exactly one of seconds (from the start of training) and deadline "
                             "(a time.time() value)")
        if seconds is not None and seconds <= 0:
            raise ValueError(f"TimeBudget seconds={seconds} must be positive")
        self.seconds, self.deadline = seconds, deadline
        self.measure_from, self.every, self.round_to = measure_from, every, max(1, round_to)
        self.cap: int | None = None
        self._since: tuple[int, float] | None = None

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.max_steps is None or trainer.max_steps < 0:
            raise ValueError("TimeBudget needs trainer.max_steps (an upper bound of the steps)")
        self.cap = trainer.max_steps
        if self.seconds is not None:
            self.deadline = time.time() + self.seconds

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs, batch, batch_idx: int) -> None:
        step = trainer.global_step
        if step == self.measure_from or (self._since is None and step > self.measure_from):
            self._since = (step, time.time())
            return
        if self._since is None or (step - self._since[0]) % self.every:
            return
        first, since = self._since
        now = time.time()
        per_step = (now - since) / (step - first)
        fits = step + int(max(0.0, self.deadline - now) / per_step)
        fits = trainer.strategy.broadcast(max(step, fits // self.round_to * self.round_to), 0)  # ranks agree
        trainer.fit_loop.epoch_loop.max_steps = min(self.cap, fits)
