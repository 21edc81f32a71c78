"""Faults in training: a stop signal costs at most the step in flight, a checkpoint is never half-written.

`StopOnSignal` (every `anymodal fit` has it, see `anymodal.train`): SIGTERM or SIGINT during fit lets the
current step finish, writes `interrupted.ckpt` (beside the ModelCheckpoint's files, else in the run's root
folder) and exits with 128 + the signal number; `--ckpt_path` resumes from it exactly. A second SIGINT stops
at once.

`SafeCheckpointIO` (the checkpoint plugin of every `anymodal fit`): Lightning's `torch.save`, but into a
temporary file beside the target that is renamed over it when complete (a full disk or a kill mid-save leaves
the last good checkpoint), and reading with `weights_only=True` (a pickle that would run code is refused).
"""

from __future__ import annotations

import signal
import sys
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch import Callback, LightningModule, Trainer

from anymodal.atomic import atomic_file
from anymodal.checkpoint import refused_pickle


class StopOnSignal(Callback):
    """On SIGTERM or SIGINT during fit: finish the step, save `filename`, exit with 128 + the signal number.

    signals:  names of the signals to catch
    filename: the checkpoint's file name, in the ModelCheckpoint's folder or else the trainer's default_root_dir
    """

    def __init__(self, signals: tuple[str, ...] = ("SIGTERM", "SIGINT"), filename: str = "interrupted.ckpt") -> None:
        self.signals = [signal.Signals[name] for name in signals]
        self.filename = filename
        self.received: int | None = None
        self._previous: dict[int, Any] = {}

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # after Lightning's own SIGTERM handler (set up before this hook), which would stop at once without saving
        self.received = None
        for sig in self.signals:
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: signals cannot be caught here
                return

    def _handle(self, signum: int, frame) -> None:
        if self.received is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C: stop now
        self.received = signum

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs, batch, batch_idx: int) -> None:
        if not trainer.strategy.reduce_boolean_decision(self.received is not None, all=False):
            return
        path = self.checkpoint_path(trainer)
        trainer.save_checkpoint(path)
        name = signal.Signals(self.received or signal.SIGTERM).name
        if trainer.is_global_zero:
            print(f"anymodal: {name} received; stopped after step {trainer.global_step} and saved {path}; resume "
                  f"with --ckpt_path {path}", file=sys.stderr, flush=True)
        raise SystemExit(128 + int(self.received or signal.SIGTERM))

    def checkpoint_path(self, trainer: Trainer) -> Path:
        folder = getattr(trainer.checkpoint_callback, "dirpath", None) or trainer.default_root_dir
        return Path(folder) / self.filename

    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        for sig, handler in self._previous.items():
            try:
                signal.signal(sig, handler)
            except ValueError:
                break
        self._previous = {}


class SafeCheckpointIO(TorchCheckpointIO):
    """Atomic local saves (temporary file, then rename) and `weights_only=True` loads with one clear refusal."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        if storage_options is not None or "://" in str(path):  # remote file systems: Lightning's own writer
            return super().save_checkpoint(checkpoint, path, storage_options)
        with atomic_file(path) as tmp:
            torch.save(checkpoint, tmp)

    def load_checkpoint(self, path, map_location: Any = lambda storage, loc: storage,
                        weights_only: bool | None = None) -> dict[str, Any]:
        try:
            return super().load_checkpoint(path, map_location, True if weights_only is None else weights_only)
        except Exception as e:
            refused = refused_pickle(e)
            if refused is None:
                raise
            raise ValueError(f"{path} was refused unread: it holds pickled {refused}, which torch's weights_only "
                             "loader does not run; resume only from checkpoints written by `anymodal fit`") from None
