"""Fixtures shared by the PILOT test modules (import them by name into a test module)."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread for tiny models: on a loaded 2-core machine the default threads oversubscribe the CPU and
    tiny UNet calls get 10-20x slower. Restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def sd_dir(tmp_path_factory):
    """A tiny Stable Diffusion text-to-image folder (4-channel UNet, cross-attention 32)."""
    from asuka.models.tiny import save_tiny_sd

    return save_tiny_sd(tmp_path_factory.mktemp("tiny-sd"))
