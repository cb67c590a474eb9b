"""Learning-rate arithmetic of trainers.schedules against hand-computed values."""

import math

import pytest

from trainers.schedules import effective_batch_size, scaled_lr, warmup_cosine_factor


def test_effective_batch_and_linear_scaling():
    # configs/mae.yaml: 32 per GPU x 8 GPUs x 4 nodes x accumulation 1 = 1024 -> lr = 1.5e-4 * 1024 / 256 = 6e-4
    assert effective_batch_size(32, 32, 1) == 1024
    assert effective_batch_size(64, 8, 2) == 1024
    assert scaled_lr(1.5e-4, 1024) == pytest.approx(6e-4)
    assert scaled_lr(1.5e-4, 256) == pytest.approx(1.5e-4)


def test_warmup_is_linear_from_zero():
    factors = [warmup_cosine_factor(s, warmup_steps=4, total_steps=10) for s in range(5)]
    assert factors == pytest.approx([0.0, 0.25, 0.5, 0.75, 1.0])


def test_half_cycle_cosine_matches_mae_formula():
    warmup, total, floor = 10, 110, 0.1
    for step in (10, 35, 60, 85, 110):
        progress = (step - warmup) / (total - warmup)
        expected = floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))
        assert warmup_cosine_factor(step, warmup_steps=warmup, total_steps=total, min_factor=floor) == pytest.approx(expected)
    assert warmup_cosine_factor(60, warmup_steps=10, total_steps=110) == pytest.approx(0.5)  # half-way
    assert warmup_cosine_factor(500, warmup_steps=10, total_steps=110, min_factor=floor) == pytest.approx(floor)


@pytest.mark.parametrize(
    "kwargs",
    [dict(warmup_steps=11, total_steps=10), dict(warmup_steps=-1, total_steps=10), dict(warmup_steps=0, total_steps=0),
     dict(warmup_steps=0, total_steps=5, min_factor=1.5)],
)
def test_bad_schedule_arguments_are_rejected(kwargs):
    with pytest.raises(ValueError):
        warmup_cosine_factor(0, **kwargs)


def test_bad_batch_arguments_are_rejected():
    with pytest.raises(ValueError, match="world_size"):
        effective_batch_size(8, 0, 1)
    with pytest.raises(ValueError, match="base_lr"):
        scaled_lr(0.0, 256)
