"""HarmonPaint's Efficient Division Strategy (paper §IV-C): timesteps ``t >= eta * T`` form the structure phase
(SAMS and the steer loss), the others the style phase (MAKVS), ``eta = 0.6``, ``T`` the scheduler's
``num_train_timesteps``. The phase follows the timestep **value**, not the step index: 50 DDIM steps
(``t = 981, 961, ..., 1``) give 20 structure steps and 30 style steps.

The paper says it "focus[es] on" structure in one phase and style in the other; the mechanisms are read as
exclusive in time, and ``sams_all_steps`` / ``makvs_all_steps`` extend one of them to every step.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence


@dataclass(frozen=True)
class StepPlan:
    """What runs at one sampling step."""

    structure: bool  # t >= eta * T
    sams: bool
    steer: bool
    makvs: bool


def plan_steps(timesteps: Sequence[float], *, eta: float = 0.6, num_train_timesteps: int = 1000,
               use_sams: bool = True, use_steer: bool = True, use_makvs: bool = True,
               sams_all_steps: bool = False, makvs_all_steps: bool = False) -> list[StepPlan]:
    """One :class:`StepPlan` per timestep value (host numbers, read once before the loop)."""
    boundary = eta * num_train_timesteps
    plans = []
    for t in timesteps:
        structure = float(t) >= boundary
        plans.append(StepPlan(structure=structure, sams=use_sams and (structure or sams_all_steps),
                              steer=use_steer and structure, makvs=use_makvs and (not structure or makvs_all_steps)))
    return plans
