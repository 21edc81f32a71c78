"""Noise schedules for the continuous image path, on top of diffusers schedulers.

The network never draws timesteps or adds noise; an objective does, with a few verbs:
  noise(x0)                      -> NoisedLatents(x_t, timesteps, target) for training
  noise_at(x0, noise, level)     -> the same at a given noise level in (0, 1) with given noise (scoring an image)
  make_sampler(steps, sampler)   -> a diffusers scheduler with `set_timesteps` done (any of `SAMPLERS`)
  step(sampler, pred, t, x_t)    -> the next, less noisy latents
  clean(x_t, pred, t) / prediction_for(x_t, x0, t) -> the clean latents a prediction implies, and back
Timesteps handed to the network are floats in [0, num_train_timesteps]; 0 means clean.
`config()` is the objective's whole configuration (saved beside a bundle's weights as objective.json, the way
diffusers saves scheduler_config.json); `objective_from_config` rebuilds it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    FlowMatchEulerDiscreteScheduler,
    FlowMatchHeunDiscreteScheduler,
)


@dataclass
class NoisedLatents:
    """x_t: (N, C, h, w) noised latents; timesteps: (N,) float; target: (N, C, h, w) what the net predicts."""

    x_t: torch.Tensor
    timesteps: torch.Tensor
    target: torch.Tensor


class FlowMatching:
    """Rectified flow: x_t = (1 - s) x0 + s noise, the network predicts the velocity noise - x0.

    Sampling uses diffusers' FlowMatchEulerDiscreteScheduler (`euler`, the default) or
    FlowMatchHeunDiscreteScheduler (`heun`: two network calls per step but the last).
    """

    name = "flow"
    prediction = "velocity"
    SAMPLERS = {"euler": FlowMatchEulerDiscreteScheduler, "heun": FlowMatchHeunDiscreteScheduler}

    def __init__(self, num_train_timesteps: int = 1000, shift: float = 1.0, logit_normal: bool = True) -> None:
        """
        Args:
            num_train_timesteps: scale of the timestep handed to the network (sigma * this).
            shift: timestep shift of the sampler (SD3-style); 1.0 = none.
            logit_normal: draw training sigmas from a logit-normal (favours mid noise levels) instead of uniform.
        """
        self.num_train_timesteps, self.shift, self.logit_normal = num_train_timesteps, shift, logit_normal
        self.sampler = "euler"

    def config(self) -> dict[str, Any]:
        return {"name": self.name, "num_train_timesteps": self.num_train_timesteps, "shift": self.shift,
                "logit_normal": self.logit_normal}

    def noise(self, x0: torch.Tensor, generator: torch.Generator | None = None) -> NoisedLatents:
        n = x0.shape[0]
        if self.logit_normal:
            sigma = torch.sigmoid(torch.randn(n, generator=generator, device="cpu")).to(x0.device)
        else:
            sigma = torch.rand(n, generator=generator, device="cpu").to(x0.device)
        noise = torch.randn(x0.shape, generator=generator, device="cpu").to(x0.device, x0.dtype)
        return self._noised(x0, noise, sigma)

    def noise_at(self, x0: torch.Tensor, noise: torch.Tensor, level: float) -> NoisedLatents:
        """x0 (N, C, h, w) noised with `noise` at sigma = `level` in (0, 1)."""
        return self._noised(x0, noise, torch.full((x0.shape[0],), float(level), device=x0.device))

    def _noised(self, x0: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor) -> NoisedLatents:
        s = sigma.view(-1, 1, 1, 1).to(x0.dtype)
        x_t = (1 - s) * x0 + s * noise  # the same formula as FlowMatchEulerDiscreteScheduler.scale_noise
        return NoisedLatents(x_t, sigma * self.num_train_timesteps, noise - x0)

    def make_sampler(self, steps: int, sampler: str | None = None):
        cls = self.SAMPLERS[check_sampler(self, sampler)]
        sched = cls(num_train_timesteps=self.num_train_timesteps, shift=self.shift)
        sched.set_timesteps(steps)
        return sched

    def step(self, sampler, pred: torch.Tensor, t: torch.Tensor, x_t: torch.Tensor,
             generator: torch.Generator | None = None) -> torch.Tensor:
        return sampler.step(pred, t, x_t, generator=generator).prev_sample

    def clean(self, x_t: torch.Tensor, pred: torch.Tensor, t: torch.Tensor | float) -> torch.Tensor:
        """The clean latents x0 that velocity `pred` at timestep `t` implies."""
        return x_t - float(t) / self.num_train_timesteps * pred

    def prediction_for(self, x_t: torch.Tensor, x0: torch.Tensor, t: torch.Tensor | float) -> torch.Tensor:
        """The velocity that implies clean latents `x0` at timestep `t` (the inverse of `clean`)."""
        return (x_t - x0) / max(float(t) / self.num_train_timesteps, 1e-6)


class DDPM:
    """Noise prediction with a DDPM training schedule; sampling with DDIM (default) or DDPM."""

    name = "ddpm"
    prediction = "epsilon"
    SAMPLERS = {"ddim": DDIMScheduler, "ddpm": DDPMScheduler}

    def __init__(self, num_train_timesteps: int = 1000, beta_schedule: str = "squaredcos_cap_v2",
                 sampler: str = "ddim") -> None:
        """
        Args:
            num_train_timesteps: length of the training noise schedule.
            beta_schedule: diffusers beta schedule name ("linear", "scaled_linear", "squaredcos_cap_v2").
            sampler: "ddim" (deterministic, few steps) or "ddpm" (ancestral).
        """
        if sampler not in self.SAMPLERS:
            raise ValueError(f"sampler={sampler!r} must be one of {', '.join(self.SAMPLERS)}")
        self.num_train_timesteps, self.beta_schedule, self.sampler = num_train_timesteps, beta_schedule, sampler
        self.train_scheduler = DDPMScheduler(num_train_timesteps=num_train_timesteps, beta_schedule=beta_schedule,
                                             clip_sample=False)

    def noise(self, x0: torch.Tensor, generator: torch.Generator | None = None) -> NoisedLatents:
        n = x0.shape[0]
        t = torch.randint(0, self.num_train_timesteps, (n,), generator=generator).to(x0.device)
        noise = torch.randn(x0.shape, generator=generator, device="cpu").to(x0.device, x0.dtype)
        x_t = self.train_scheduler.add_noise(x0, noise, t)
        return NoisedLatents(x_t, t.float(), noise)

    def noise_at(self, x0: torch.Tensor, noise: torch.Tensor, level: float) -> NoisedLatents:
        """x0 (N, C, h, w) noised with `noise` at timestep `level` (in (0, 1)) of the training schedule."""
        step = min(int(level * self.num_train_timesteps), self.num_train_timesteps - 1)
        t = torch.full((x0.shape[0],), step, dtype=torch.long, device=x0.device)
        return NoisedLatents(self.train_scheduler.add_noise(x0, noise, t), t.float(), noise)

    def config(self) -> dict[str, Any]:
        return {"name": self.name, "num_train_timesteps": self.num_train_timesteps,
                "beta_schedule": self.beta_schedule, "sampler": self.sampler}

    def make_sampler(self, steps: int, sampler: str | None = None):
        cls = self.SAMPLERS[check_sampler(self, sampler)]
        sched = cls(num_train_timesteps=self.num_train_timesteps, beta_schedule=self.beta_schedule,
                    clip_sample=False)
        sched.set_timesteps(steps)
        return sched

    def step(self, sampler, pred: torch.Tensor, t: torch.Tensor, x_t: torch.Tensor,
             generator: torch.Generator | None = None) -> torch.Tensor:
        return sampler.step(pred, t, x_t, generator=generator).prev_sample

    def _alpha(self, t: torch.Tensor | float) -> tuple[float, float]:
        a = float(self.train_scheduler.alphas_cumprod[int(t)])
        return a ** 0.5, max(1 - a, 1e-12) ** 0.5

    def clean(self, x_t: torch.Tensor, pred: torch.Tensor, t: torch.Tensor | float) -> torch.Tensor:
        """The clean latents x0 that noise `pred` at timestep `t` implies."""
        a, s = self._alpha(t)
        return (x_t - s * pred) / a

    def prediction_for(self, x_t: torch.Tensor, x0: torch.Tensor, t: torch.Tensor | float) -> torch.Tensor:
        """The noise that implies clean latents `x0` at timestep `t` (the inverse of `clean`)."""
        a, s = self._alpha(t)
        return (x_t - a * x0) / s


OBJECTIVES = {"flow": FlowMatching, "ddpm": DDPM}


def check_sampler(objective: FlowMatching | DDPM, sampler: str | None) -> str:
    """The sampler to use: `sampler`, or the objective's own when None; one the objective can drive."""
    sampler = sampler or objective.sampler
    if sampler not in objective.SAMPLERS:
        raise ValueError(f"sampler {sampler!r} does not fit the {objective.name} objective ({objective.prediction} "
                         f"prediction); choose one of {', '.join(objective.SAMPLERS)}")
    return sampler


def build_objective(name: str, **kwargs) -> FlowMatching | DDPM:
    """'flow' (velocity, the default) or 'ddpm' (noise prediction)."""
    if name not in OBJECTIVES:
        raise ValueError(f"objective={name!r} must be one of {', '.join(OBJECTIVES)}")
    return OBJECTIVES[name](**kwargs)


def objective_from_config(config: dict[str, Any] | str) -> FlowMatching | DDPM:
    """The objective `config()` describes (a bare name, as early bundles stored it, takes its defaults)."""
    if isinstance(config, str):
        return build_objective(config)
    config = dict(config)
    try:
        return build_objective(config.pop("name"), **config)
    except (KeyError, TypeError) as e:
        raise ValueError(f"objective config {config} is not one this anymodal can rebuild ({e})") from None
