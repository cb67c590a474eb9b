"""Learning-rate arithmetic shared by every stage (pure functions, testable alone).

MAE recipe (He et al., MAE §A.1; official ``util/lr_sched.py``; MAE-FAR keeps it): the absolute learning rate is
``blr × effective_batch / 256``; it rises linearly from 0 during the warm-up, then follows a half-cycle cosine down to
``min_lr``. The official code evaluates the schedule at fractional epochs, i.e. once per iteration; here the unit is
the optimizer step.
"""

from __future__ import annotations

import math

from trainers.checks import check_positive_ints

__all__ = ["effective_batch_size", "scaled_lr", "warmup_cosine_factor"]


def effective_batch_size(per_device_batch: int, world_size: int, accumulate_grad_batches: int = 1) -> int:
    """Samples per optimizer step: per-device batch × devices × nodes × gradient-accumulation steps."""
    check_positive_ints(per_device_batch=per_device_batch, world_size=world_size,
                        accumulate_grad_batches=accumulate_grad_batches)
    return per_device_batch * world_size * accumulate_grad_batches


def scaled_lr(base_lr: float, effective_batch: int, reference_batch: int = 256) -> float:
    """Linear scaling rule ``lr = blr × effective_batch / reference_batch`` (MAE: reference 256)."""
    if base_lr <= 0 or effective_batch < 1 or reference_batch < 1:
        raise ValueError(
            f"base_lr must be > 0 and batch sizes >= 1, got base_lr={base_lr}, "
            f"effective_batch={effective_batch}, reference_batch={reference_batch}"
        )
    return base_lr * effective_batch / reference_batch


def warmup_cosine_factor(step: int, *, warmup_steps: int, total_steps: int, min_factor: float = 0.0) -> float:
    """Multiplier of the peak learning rate at optimizer step ``step`` (0-based).

    ``step < warmup_steps``: ``step / warmup_steps`` (linear from 0, as MAE's ``adjust_learning_rate``);
    afterwards ``min_factor + (1 - min_factor) · ½ (1 + cos(π · (step - warmup) / (total - warmup)))``,
    held at ``min_factor`` past ``total_steps``.
    """
    if warmup_steps < 0 or total_steps < 1 or warmup_steps > total_steps:
        raise ValueError(
            f"need 0 <= warmup_steps <= total_steps and total_steps >= 1, got warmup_steps={warmup_steps}, "
            f"total_steps={total_steps}"
        )
    if not 0.0 <= min_factor <= 1.0:
        raise ValueError(f"min_factor must lie in [0, 1], got {min_factor}")
    if step < warmup_steps:
        return step / warmup_steps
    if total_steps == warmup_steps:
        return 1.0
    progress = min((step - warmup_steps) / (total_steps - warmup_steps), 1.0)
    return min_factor + (1.0 - min_factor) * 0.5 * (1.0 + math.cos(math.pi * progress))
