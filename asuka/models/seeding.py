"""Seeded weight initialisation that leaves the caller's random state alone."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch


@contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Seed torch's default CPU generator for the block (e.g. building a model with random weights) and restore
    the caller's RNG state afterwards, so the block is reproducible and leaves no trace on other randomness."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield
