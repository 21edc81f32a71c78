"""The unified model's optimizers: AdamW, or Muon on the decoder's matrices with AdamW on the rest.

`torch.optim.Muon` orthogonalises the momentum of each 2-D weight (Newton-Schulz) and only takes 2-D weights, so
`MuonAdamW` gives it the matrices of the decoder's blocks (attention and MLP) and AdamW everything else: token
embeddings and head, the image projections, positions, norms and biases, as Muon's authors prescribe. Lightning's
automatic optimization wants one optimizer: `MuonAdamW` is one `torch.optim.Optimizer` whose param groups are the
two inner optimizers' own (so a learning-rate scheduler, gradient clipping and `zero_grad` see every group) and
whose state is theirs, so a checkpoint saves and restores both.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable

import torch
from torch import nn

from anymodal.hardware import native_bf16

OPTIMIZERS = ("adamw", "muon")


def trainer_steps(trainer) -> int:
    """The steps a Lightning trainer will take: `max_steps`, which a TimeBudget callback may lower during training,
    else its estimate from epochs."""
    return trainer.max_steps if trainer.max_steps > 0 else max(1, int(trainer.estimated_stepping_batches))


def warmup_cosine(warmup_steps: int, total_steps, min_ratio: float):
    """LR multiplier: linear from ~0 to 1 over `warmup_steps`, then cosine down to `min_ratio` at `total_steps`
    (an int, or a function returning it, read at every step)."""

    def factor(step: int) -> float:
        total = total_steps() if callable(total_steps) else total_steps
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = min((step - warmup_steps) / max(total - warmup_steps, 1), 1.0)
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


def check_optimizer(kind: str) -> None:
    """Refuse an optimizer name this module does not build, in one sentence."""
    if kind not in OPTIMIZERS:
        raise ValueError(f"optimizer={kind!r} must be one of {', '.join(OPTIMIZERS)}")


def muon_matrices(model: nn.Module) -> list[str]:
    """Names of the weights Muon steps: the 2-D weights inside the decoder's blocks."""
    return [name for name, p in model.named_parameters()
            if p.requires_grad and name.startswith("decoder.layers.") and p.ndim == 2]


def run_closure(closure):
    """The loss of an optimizer's `closure` (Lightning's forward and backward), run with gradients on; None without."""
    if closure is None:
        return None
    with torch.enable_grad():
        return closure()


def adjusted_lr(lr: float, adjust_lr_fn: str | None, shape: torch.Size) -> float:
    """Muon's step size for a matrix of `shape`, as `torch.optim.Muon` scales it."""
    rows, cols = shape[:2]
    if adjust_lr_fn is None or adjust_lr_fn == "original":
        return lr * math.sqrt(max(1, rows / cols))
    if adjust_lr_fn == "match_rms_adamw":
        return lr * 0.2 * math.sqrt(max(rows, cols))
    return lr


class GroupedMuon(torch.optim.Muon):
    """`torch.optim.Muon` whose Newton-Schulz iterations run once per shape on the stacked matrices of that shape
    (batched matmuls) instead of once per matrix: the same update (bf16, as the library computes it), the same
    state and hyperparameters. The library runs 15 small matmuls per matrix in turn; at the size of the shapes
    recipes (16 matrices in 4 shapes) the library's step takes 12 ms, this one 6 ms, AdamW's 2 ms
    (benchmarks/README.md, "Muon").

    The iterations run in bfloat16 where this device has native bfloat16 matmuls (CUDA, AMX, AVX512-BF16), as
    the library's do, and in float32 elsewhere: a CPU that emulates bfloat16 (an AVX2 machine: 1.9 against 80
    GFLOP/s) spent 590 ms of a 1,220 ms step of the transfusion recipe here, against ~10 ms in float32."""

    @staticmethod
    def newton_schulz_dtype(device: torch.device) -> torch.dtype:
        """bfloat16 where `device` runs it natively (anymodal.hardware.native_bf16), else float32."""
        if device.type == "cpu":
            return torch.bfloat16 if native_bf16("matmul") else torch.float32
        return torch.bfloat16

    @torch.no_grad()
    def step(self, closure=None):
        loss = run_closure(closure)
        for group in self.param_groups:
            lr, decay, momentum = group["lr"], group["weight_decay"], group["momentum"]
            a, b, c = group["ns_coefficients"]
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            if any(p.grad.is_sparse or torch.is_complex(p) for p in params):
                raise RuntimeError("Muon takes dense real matrices")
            grads = [p.grad for p in params]
            for p in params:
                if "momentum_buffer" not in self.state[p]:
                    self.state[p]["momentum_buffer"] = torch.zeros_like(p.grad, memory_format=torch.preserve_format)
            bufs = [self.state[p]["momentum_buffer"] for p in params]
            torch._foreach_lerp_(bufs, grads, 1 - momentum)
            updates = torch._foreach_lerp(grads, bufs, momentum) if group["nesterov"] else bufs
            by_shape: dict[torch.Size, list] = defaultdict(list)
            for p, update in zip(params, updates):
                by_shape[p.shape].append((p, update))
            torch._foreach_mul_(params, 1 - lr * decay)
            dtype = self.newton_schulz_dtype(params[0].device)
            for shape, items in by_shape.items():
                x = torch.stack([u for _, u in items]).to(dtype)  # (n, rows, cols)
                tall = shape[0] > shape[1]
                if tall:
                    x = x.mT
                x = x / x.norm(dim=(1, 2), keepdim=True).clamp(min=group["eps"])  # spectral norm at most 1
                for _ in range(group["ns_steps"]):
                    gram = x @ x.mT
                    x = torch.baddbmm(x, torch.baddbmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
                if tall:
                    x = x.mT
                torch._foreach_add_([p for p, _ in items], list(x.unbind(0)),
                                    alpha=-adjusted_lr(lr, group["adjust_lr_fn"], shape))
        return loss


class MuonAdamW(torch.optim.Optimizer):
    """Muon on `muon_params`, AdamW on the groups of `adamw_groups`, stepped as one optimizer.

    Args:
        muon_params: 2-D weights (Muon refuses any other shape).
        adamw_groups: AdamW param groups (dicts with "params" and optionally "lr", "weight_decay").
        lr: AdamW's learning rate (its groups' default).
        muon_lr: Muon's learning rate. With `adjust_lr_fn="match_rms_adamw"` (the default here) Muon scales
            its update to AdamW's size, so the AdamW learning rate carries over (Moonshot's rule).
        weight_decay: decoupled weight decay of the Muon matrices.
        betas: AdamW's betas.
        momentum: Muon's momentum.
        adjust_lr_fn: Muon's update scaling: "match_rms_adamw" or "original" (Keller Jordan's).
        muon_class: `GroupedMuon`, or `torch.optim.Muon` (its per-matrix loop; the benchmarks compare them).
    """

    def __init__(self, muon_params: Iterable[torch.Tensor], adamw_groups: list[dict], lr: float, muon_lr: float,
                 weight_decay: float = 0.1, betas: tuple[float, float] = (0.9, 0.95), momentum: float = 0.95,
                 adjust_lr_fn: str = "match_rms_adamw", muon_class: type = GroupedMuon) -> None:
        self.muon = muon_class([{"params": list(muon_params)}], lr=muon_lr, weight_decay=weight_decay,
                                     momentum=momentum, adjust_lr_fn=adjust_lr_fn)
        self.adamw = torch.optim.AdamW(adamw_groups, lr=lr, betas=betas)
        super().__init__(self.muon.param_groups + self.adamw.param_groups, {})
        self._share()

    def _share(self) -> None:
        """Point the inner optimizers at this optimizer's groups and state (after building or loading)."""
        n = len(self.muon.param_groups)
        self.muon.param_groups, self.adamw.param_groups = self.param_groups[:n], self.param_groups[n:]
        self.muon.state = self.adamw.state = self.state

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)  # builds new group dicts and a new state: share them again
        self._share()

    @torch.no_grad()
    def step(self, closure=None):
        loss = run_closure(closure)
        self.muon.step()
        self.adamw.step()
        return loss


def build_optimizer(kind: str, model: nn.Module, groups: list[dict], lr: float, betas: tuple[float, float],
                    weight_decay: float, muon_class: type = GroupedMuon) -> torch.optim.Optimizer:
    """AdamW over `groups` (AdamW param groups of `model`), or MuonAdamW: the decoder blocks' matrices
    (`muon_matrices`) to Muon, the rest of each group to AdamW as it was."""
    check_optimizer(kind)
    if kind == "adamw":
        return torch.optim.AdamW(groups, lr=lr, betas=betas)
    named = dict(model.named_parameters())
    muon = [named[name] for name in muon_matrices(model)]
    if not muon:
        raise ValueError("optimizer=muon found no trainable matrix under decoder.layers. of the model")
    taken = {id(p) for p in muon}
    rest = [{**g, "params": [p for p in g["params"] if id(p) not in taken]} for g in groups]
    return MuonAdamW(muon, [g for g in rest if g["params"]], lr=lr, muon_lr=lr, weight_decay=weight_decay,
                     betas=betas, muon_class=muon_class)
