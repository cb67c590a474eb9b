"""Fixtures shared by the PILOT test modules (import them by name into a test module)."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="module")
def sd_dir(tmp_path_factory):
    """A tiny Stable Diffusion text-to-image folder (4-channel UNet, cross-attention 32)."""
    from asuka.models.tiny import save_tiny_sd

    return save_tiny_sd(tmp_path_factory.mktemp("tiny-sd"))
