"""Tiny, seeded, *real* Paint-by-Example components (no downloads): diffusers' ``PaintByExamplePipeline`` with a
tiny ``PaintByExampleImageEncoder`` (a real transformers CLIP vision tower + diffusers' mapper), the tiny SD-1.5
layout 9-channel UNet of :mod:`asuka.models.tiny` conditioned on the image embedding, the tiny VAE, and the
scheduler of ``Fantasy-Studio/Paint-by-Example`` (PNDM, SD's scaled-linear schedule, ``skip_prk_steps``).

``save_tiny_paint_by_example(path)`` writes a folder that ``PaintByExamplePipeline.from_pretrained`` loads.
"""

from __future__ import annotations

from pathlib import Path

from diffusers import PNDMScheduler
from transformers import CLIPImageProcessor, CLIPVisionConfig

from asuka.models.seeding import seeded
from asuka.models.tiny import SD15_SCHEDULE, TINY_CROSS_ATTENTION_DIM, tiny_unet, tiny_vae

TINY_EXAMPLE_IMAGE_SIZE = 32


def example_encoder_class():
    """diffusers' ``PaintByExampleImageEncoder`` (moved under ``pipelines.deprecated`` in recent versions)."""
    try:
        from diffusers.pipelines.deprecated.paint_by_example import PaintByExampleImageEncoder
    except ImportError:  # diffusers before the move
        from diffusers.pipelines.paint_by_example import PaintByExampleImageEncoder
    return PaintByExampleImageEncoder


def tiny_example_encoder(proj_size: int = TINY_CROSS_ATTENTION_DIM, seed: int = 0):
    """A real ``PaintByExampleImageEncoder`` (4-layer CLIP vision tower at 32 px, one mapper block)."""
    config = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_hidden_layers=4,
                              image_size=TINY_EXAMPLE_IMAGE_SIZE, patch_size=8, projection_dim=proj_size)
    with seeded(seed):
        return example_encoder_class()(config, proj_size=proj_size).eval()


def tiny_example_feature_extractor() -> CLIPImageProcessor:
    """CLIP preprocessing (resize, centre crop, CLIP mean/std) at the tiny encoder's 32 px."""
    size = TINY_EXAMPLE_IMAGE_SIZE
    return CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size})


def paint_by_example_scheduler() -> PNDMScheduler:
    """The scheduler of ``Fantasy-Studio/Paint-by-Example``: PNDM with SD's schedule, PLMS steps only."""
    return PNDMScheduler(**SD15_SCHEDULE, skip_prk_steps=True, set_alpha_to_one=False, steps_offset=1)


def tiny_paint_by_example_components(seed: int = 0) -> dict:
    """All components of a diffusers ``PaintByExamplePipeline``, tiny and seeded (safety checker off)."""
    return dict(
        vae=tiny_vae(seed),
        image_encoder=tiny_example_encoder(seed=seed),
        unet=tiny_unet(9, TINY_CROSS_ATTENTION_DIM, seed),
        scheduler=paint_by_example_scheduler(),
        safety_checker=None,
        feature_extractor=tiny_example_feature_extractor(),
    )


def save_tiny_paint_by_example(path: str | Path, seed: int = 0) -> Path:
    """Write a complete ``PaintByExamplePipeline`` folder that diffusers' ``from_pretrained`` loads."""
    from diffusers import PaintByExamplePipeline

    path = Path(path)
    PaintByExamplePipeline(**tiny_paint_by_example_components(seed)).save_pretrained(path, safe_serialization=True)
    return path
