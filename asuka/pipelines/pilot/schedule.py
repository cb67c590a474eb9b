"""PILOT's schedules and update rules, as pure functions (paper §4.1-4.2, Eqs. 15, 17-18; official code
``pipeline/pipeline_pilot.py``: ``lr_scheduler``, ``coef_scheduler``, ``optimize_xt`` and the denoising loop).

The official code hard-codes T = 1000 training timesteps; here T is the scheduler's ``num_train_timesteps``.
Schedules take Python numbers (the timesteps are read once per call), so nothing in the denoising loop syncs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from asuka.pipelines._sampling import latent_gradient

LR_SCHEDULES = ("exp", "constant", "linear")
COEF_SCHEDULES = ("linear", "constant")
LR_GROWTH = 1.002
"""``lr_f="exp"``: η_t = lr · 1.002^(T − t), growing as t falls."""
COEF_FLOOR = 0.1
COEF_KNEE = 0.3
"""``coef_f="linear"``: λ falls linearly from c at t = T−1 to 0.1c at t = 0.3T and stays 0.1c below."""


@dataclass(frozen=True)
class StepPlan:
    """What happens at one denoising step: latent optimisation (``optimise``), background blending (``blend``)."""

    optimise: bool
    blend: bool


def step_plan(timesteps: list[int], interval: int, gamma: float, num_train_timesteps: int,
              gradient_steps: int) -> list[StepPlan]:
    """τ / K / γ scheduling (paper §4.2; code loop): optimise at step i iff ``i % interval == 0`` and
    ``t_i >= (1 − γ)·T`` (and ``gradient_steps > 0``); steps with ``t_i < (1 − γ)·T`` form the blend stage."""
    boundary = num_train_timesteps * (1 - gamma)
    return [StepPlan(optimise=gradient_steps > 0 and i % interval == 0 and not t < boundary, blend=t < boundary)
            for i, t in enumerate(timesteps)]


def area_coefficient(coef: float, hole: torch.Tensor, area_norm: float) -> torch.Tensor:
    """Area-normalised λ base per sample: ``c = coef · N_bg / area_norm`` with N_bg the number of background cells of
    the (B, 1, h, w) latent mask (code: ``count_white / std`` with std = 1499, read from item 0 only). Returns (B,)."""
    return coef * (1 - hole).flatten(1).sum(1) / area_norm


def coef_factor(t: int, schedule: str, num_train_timesteps: int) -> float:
    """λ_t / c: ``"linear"`` (code ``coef_f="linear"``: ``[0.1c]*300 + linspace(0.1c, c, 700)`` indexed by t) or
    ``"constant"`` (1)."""
    if schedule == "constant":
        return 1.0
    if schedule != "linear":
        raise ValueError(f"coef_schedule must be one of {COEF_SCHEDULES}, got {schedule!r}")
    knee = COEF_KNEE * num_train_timesteps
    if t < knee:
        return COEF_FLOOR
    return COEF_FLOOR + (1 - COEF_FLOOR) * (t - knee) / (num_train_timesteps - 1 - knee)


def step_size(t: int, *, lr: float, schedule: str, num_train_timesteps: int, first: bool, warmup: float) -> float:
    """η_t (code ``lr_scheduler``): ``"exp"`` lr·1.002^(T − t), ``"constant"`` lr, ``"linear"`` 10 → 0.01 over t
    (ignores lr). At the first inference timestep η = ``warmup`` (code: ``lr_xt[timesteps[0]] = lr_warmup``)."""
    if first:
        return warmup
    if schedule == "exp":
        return lr * LR_GROWTH ** (num_train_timesteps - t)
    if schedule == "constant":
        return lr
    if schedule == "linear":
        return 10.0 + (0.01 - 10.0) * t / num_train_timesteps
    raise ValueError(f"lr_schedule must be one of {LR_SCHEDULES}, got {schedule!r}")


def momentum_step(latents: torch.Tensor, velocity: torch.Tensor, grad: torch.Tensor, step: float,
                  momentum: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Heavy-ball update (code ``optimize_xt``): ``v ← μv − η g``, ``z ← z + v``; returns (z, v). A sample whose
    gradient is not finite (fp16 overflow) gets a zero gradient instead."""
    finite = torch.isfinite(grad).flatten(1).all(1).view(-1, *([1] * (grad.dim() - 1)))
    grad = torch.where(finite, grad, torch.zeros_like(grad))
    velocity = momentum * velocity - step * grad
    return latents + velocity, velocity


def noised(source_latents: torch.Tensor, noise: torch.Tensor, alpha_bar: torch.Tensor) -> torch.Tensor:
    """Forward diffusion of the source latents to level t: ``√ᾱ_t z_in + √(1 − ᾱ_t) ε`` (paper Eq. 17)."""
    return alpha_bar.sqrt() * source_latents + (1 - alpha_bar).sqrt() * noise


def blend(latents: torch.Tensor, noised_source: torch.Tensor, hole: torch.Tensor) -> torch.Tensor:
    """Blend stage (paper Eq. 18): the hole from ``latents``, the background from the noised source, exactly (a
    select, so background values equal :func:`noised` bit for bit)."""
    return torch.where(hole >= 0.5, latents, noised_source.to(latents.dtype))


def descend(loss_of: Callable[[torch.Tensor], torch.Tensor], latents: torch.Tensor, *, steps: int, step: float,
            momentum: float) -> torch.Tensor:
    """``steps`` heavy-ball steps on ``latents`` of ``loss_of(z).sum()`` (code ``optimize_xt``; the momentum buffer
    starts at 0 at every optimised timestep). ``loss_of`` returns per-sample losses (B,), so each sample descends
    its own loss. Gradients are taken with respect to the latent only; no graph survives a step."""
    velocity = torch.zeros_like(latents)
    for _ in range(steps):
        grad, _ = latent_gradient(lambda z: loss_of(z).sum(), latents)
        latents, velocity = momentum_step(latents, velocity, grad, step, momentum)
    return latents
