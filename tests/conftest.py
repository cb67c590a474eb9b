"""Shared test fixtures: tiny real components written once per session, offline."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
# Tiny models: one intra-op thread is fastest, and avoids OpenMP spin-waiting when several test processes (or other
# jobs) share the cores; subprocesses (trainers, the CLI) inherit it.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_inpaint_dir(tmp_path_factory):
    """A complete tiny ``StableDiffusionInpaintPipeline`` folder (9-channel UNet, cross-attention 32)."""
    from asuka.models.tiny import save_tiny_sd_inpaint

    return save_tiny_sd_inpaint(tmp_path_factory.mktemp("tiny-sd-inpaint"))


@pytest.fixture(scope="session")
def sd_dir(tmp_path_factory):
    """A tiny Stable Diffusion text-to-image folder (4-channel UNet, cross-attention 32): PILOT's base model."""
    from asuka.models.tiny import save_tiny_sd

    return save_tiny_sd(tmp_path_factory.mktemp("tiny-sd"))


@pytest.fixture(scope="session")
def tiny_inpaint_dir_768(tmp_path_factory):
    """Tiny SD-inpainting folder whose UNet takes 768-d conditions (the aligner's output width)."""
    from asuka.models.tiny import save_tiny_sd_inpaint

    return save_tiny_sd_inpaint(tmp_path_factory.mktemp("tiny-sd-inpaint-768"), cross_attention_dim=768)


@pytest.fixture(scope="session")
def tiny_flux_fill_dir(tmp_path_factory):
    """A complete tiny ``FluxFillPipeline`` folder (384-channel transformer, 16-channel FLUX AE, CLIP + T5)."""
    from asuka.models.tiny_flux import save_tiny_flux_fill

    return save_tiny_flux_fill(tmp_path_factory.mktemp("tiny-flux-fill"))


@pytest.fixture(scope="session")
def files(tmp_path_factory):
    """The method tests' input files: a 64×64 random ``photo.png``, its ``photo_mask.png`` (one rectangular hole,
    white = hole) and a random ``control.png`` (a condition image). Modules with another layout define their own."""
    import numpy as np
    from PIL import Image

    root = tmp_path_factory.mktemp("method-files")
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(root / "photo.png")
    mask = np.zeros((64, 64), np.uint8)
    mask[16:48, 20:44] = 255
    Image.fromarray(mask).save(root / "photo_mask.png")
    Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(root / "control.png")
    return root


@pytest.fixture(scope="session")
def mae_dir(tmp_path_factory):
    """A tiny seeded ``MAEPrior`` save_pretrained folder (256 tokens of 32-d features), the aligner trainers' MAE."""
    from asuka.models.mae import MAEPrior

    path = tmp_path_factory.mktemp("mae")
    MAEPrior.tiny().save_pretrained(path)
    return path
