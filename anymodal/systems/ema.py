"""The exponential moving average (EMA) of the weights that sampling uses: fp32, over what each rank owns.

Each rank averages its own piece of every trained weight, read from the weights the optimizer steps:

| strategy            | a rank's piece of a weight                                    | EMA memory per rank |
|---------------------|---------------------------------------------------------------|---------------------|
| one process, DDP    | the whole weight                                              | 4 bytes / parameter |
| DeepSpeed ZeRO-1/2  | its fragment of the fp32 master weights (`param._hp_mapping`)  | 4 / ranks           |
| DeepSpeed ZeRO-3    | its partition of the fp32 master weights                      | 4 / ranks           |

So the EMA never becomes bf16 (DeepSpeed casts every module it wraps, and a bf16 EMA at decay 0.9999 moves
16x less than an fp32 one), it is not a module (so no strategy casts, shards or optimizes it), and it needs no
copy of the model (`torch.optim.swa_utils.AveragedModel` deep-copies it: under ZeRO-3's zero.Init that copy's
parameters have shape (0,)). The update is AveragedModel's with `get_ema_multi_avg_fn`: the first copies the
weights, later ones move toward them by `1 - decay`.

A checkpoint holds `state_dict()`: plain types and tensors, readable with `torch.load(weights_only=True)`.
Under ZeRO-3 every rank writes its own partition into its own file; under ZeRO-1/2 DeepSpeed writes only rank
0's, so `state_dict()` gathers the whole weights there first. `assemble_weights` puts the records of every
rank back together (export).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

WHOLE, FRAGMENTS, PARTITIONS = "whole", "fragments", "partitions"


@dataclass
class Piece:
    """A rank's part of one weight: elements [start, start + numel) of the flattened weight of `shape`."""

    shape: tuple[int, ...]
    start: int
    values: torch.Tensor  # (numel,) float32


def owned_pieces(model: nn.Module) -> Iterator[tuple[str, str, Piece]]:
    """(name, layout, piece) of every trained weight of `model`, the piece being what the optimizer of this rank
    steps (a view: no copy). layout is WHOLE, FRAGMENTS (ZeRO-1/2) or PARTITIONS (ZeRO-3)."""
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if hasattr(param, "ds_id"):  # ZeRO-3: the fp32 master partition; the last rank's is padded
            from deepspeed import comm
            from deepspeed.utils import safe_get_local_fp32_param

            size = param.ds_tensor.ds_numel
            start = size * comm.get_rank(group=param.ds_process_group)
            count = max(0, min(size, param.ds_numel - start))
            yield name, PARTITIONS, Piece(tuple(param.ds_shape), start, safe_get_local_fp32_param(param)[:count])
        elif hasattr(param, "_hp_mapping"):  # ZeRO-1/2: the fragment of the fp32 master partition, if any
            mapping = param._hp_mapping
            if mapping is None:
                yield name, FRAGMENTS, Piece(tuple(param.shape), 0, param.new_empty(0, dtype=torch.float32))
            else:
                start = mapping.lp_fragment_address.start
                yield name, FRAGMENTS, Piece(tuple(param.shape), start, mapping.get_hp_fragment().view(-1))
        else:
            yield name, WHOLE, Piece(tuple(param.shape), 0, param.detach().reshape(-1))


class WeightEMA:
    """fp32 EMA of a model's trained weights over the pieces this rank owns (see the module docstring).

    Call `update(model)` after every optimizer step; `averaged_model(model)` gives a model holding the
    averages where a rank holds whole weights (one process, DDP).
    """

    def __init__(self, decay: float) -> None:
        if not 0.0 < decay < 1.0:
            raise ValueError(f"ema_decay={decay} must be in (0, 1), or 0 to keep no EMA")
        self.decay = decay
        self.updates = 0
        self.layout: str | None = None
        self.pieces: dict[str, Piece] = {}
        self._copy: nn.Module | None = None  # WHOLE layout: a copy of the model whose weights are the averages
        self._loaded: dict | None = None

    # ------------------------------------------------------------------------------------------ averaging
    def _attach(self, model: nn.Module) -> None:
        """Lay the pieces out as `model`'s optimizer holds its weights (once), then apply a loaded state."""
        if self.layout is not None:
            return
        owned = list(owned_pieces(model))
        self.layout = owned[0][1] if owned else WHOLE
        if self.layout == WHOLE:
            self._copy = copy.deepcopy(model).float().requires_grad_(False)
            weights = dict(self._copy.named_parameters())
            self.pieces = {name: Piece(piece.shape, 0, weights[name].data.view(-1)) for name, _, piece in owned}
        else:
            self.pieces = {name: Piece(piece.shape, piece.start, piece.values.detach().float().clone())
                           for name, _, piece in owned}
        if self._loaded is not None:
            self._load_pieces(self._loaded)
            self._loaded = None

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """Move the averages toward `model`'s weights (the first update copies them)."""
        self._attach(model)
        for name, _, source in owned_pieces(model):
            average = self.pieces[name].values
            if self.updates == 0:
                average.copy_(source.values)
            else:
                average.lerp_(source.values.to(average.dtype), 1.0 - self.decay)
        self.updates += 1

    def averaged_model(self, model: nn.Module) -> nn.Module | None:
        """A copy of `model` holding the averaged weights; None where they are sharded over ZeRO ranks."""
        self._attach(model)
        return self._copy

    # ------------------------------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict:
        """Plain types and tensors. Under ZeRO-1/2 this gathers whole weights on every rank (a collective:
        every rank calls it, as every rank saves a checkpoint)."""
        state = {"decay": self.decay, "updates": self.updates, "weights": {}}
        if self.layout is None:  # never updated nor attached: a loaded state is still waiting
            return self._loaded or state
        for name, piece in self.pieces.items():
            start, values = piece.start, piece.values
            if self.layout == FRAGMENTS:
                whole = values.new_zeros(math.prod(piece.shape))
                whole[start:start + values.numel()] = values
                torch.distributed.all_reduce(whole)  # the fragments of the ranks are disjoint
                start, values = 0, whole
            state["weights"][name] = {"shape": list(piece.shape), "start": start, "values": values.detach().cpu().clone()}
        return state

    def load_state_dict(self, state: dict) -> None:
        """Restore a `state_dict()`; the pieces are filled when the EMA first meets the model."""
        self.decay, self.updates = float(state["decay"]), int(state["updates"])
        if self.layout is None:
            self._loaded = state
        else:
            self._load_pieces(state)

    @torch.no_grad()
    def _load_pieces(self, state: dict) -> None:
        if not state["weights"]:
            return
        for name, piece in self.pieces.items():
            saved = state["weights"].get(name)
            if saved is None or list(saved["shape"]) != list(piece.shape):
                raise ValueError(f"the checkpoint's EMA has no weight {name!r} of shape {list(piece.shape)}: it "
                                 "belongs to another model")
            offset = piece.start - int(saved["start"])
            if offset < 0 or offset + piece.values.numel() > saved["values"].numel():
                raise ValueError(f"the checkpoint's EMA of {name!r} holds elements {saved['start']}.. of another "
                                 "sharding; resume a ZeRO-3 run with the number of processes that wrote it")
            piece.values.copy_(saved["values"][offset:offset + piece.values.numel()])


def assemble_weights(records: list[dict]) -> dict[str, torch.Tensor]:
    """Whole fp32 weights from the EMA `state_dict()`s of every rank of a run (one suffices unless ZeRO-3).

    Raises ValueError when some element of a weight is in no record (a rank's file missing)."""
    shapes: dict[str, list[int]] = {}
    for record in records:
        for name, saved in record["weights"].items():
            shapes.setdefault(name, list(saved["shape"]))
    weights = {}
    for name, shape in shapes.items():
        whole = torch.empty(math.prod(shape), dtype=torch.float32)
        seen = torch.zeros(whole.numel(), dtype=torch.bool)
        for record in records:
            saved = record["weights"].get(name)
            if saved is not None:
                start, values = int(saved["start"]), saved["values"]
                whole[start:start + values.numel()] = values
                seen[start:start + values.numel()] = True
        if not seen.all():
            raise ValueError(f"the EMA of {name!r} misses {int((~seen).sum())} of its {whole.numel()} elements: "
                             "a rank's file of the sharded checkpoint is missing")
        weights[name] = whole.view(shape)
    return weights
