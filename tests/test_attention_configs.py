"""The layer table on SD-1.5, SD-2 and SDXL UNet configs built on the meta device (no weights, no memory)."""

from __future__ import annotations

import pytest
import torch
from diffusers import UNet2DConditionModel

from asuka.attention import LayerTable

SD15 = dict(sample_size=64, cross_attention_dim=768, attention_head_dim=8)
SD2 = dict(sample_size=96, cross_attention_dim=1024, attention_head_dim=(5, 10, 20, 20), use_linear_projection=True)
SDXL = dict(
    sample_size=128,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    block_out_channels=(320, 640, 1280),
    transformer_layers_per_block=(1, 2, 10),
    attention_head_dim=(5, 10, 20),
    cross_attention_dim=2048,
    addition_embed_type="text_time",
    addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816,
    use_linear_projection=True,
)


def _meta_unet(config):
    with torch.device("meta"):
        return UNet2DConditionModel(**config)


def _forward_order(unet, table, latent, cross_dim, sdxl):
    order = []
    handles = [layer.module.register_forward_pre_hook(lambda m, a, name=layer.name: order.append(name))
               for layer in table]
    try:
        with torch.device("meta"):
            added = {"text_embeds": torch.randn(1, 1280), "time_ids": torch.randn(1, 6)} if sdxl else None
            unet(torch.randn(1, 4, *latent), 10, encoder_hidden_states=torch.randn(1, 77, cross_dim),
                 added_cond_kwargs=added)
    finally:
        for handle in handles:
            handle.remove()
    return order


@pytest.mark.parametrize("name, config, self_per_level, latent, grids", [
    ("sd15", SD15, [5, 5, 5, 1], (64, 64), [(64, 64), (32, 32), (16, 16), (8, 8)]),
    ("sd2", SD2, [5, 5, 5, 1], (96, 72), [(96, 72), (48, 36), (24, 18), (12, 9)]),
    ("sdxl", SDXL, [0, 10, 60], (128, 96), [(128, 96), (64, 48), (32, 24)]),
])
def test_counts_levels_grids_and_execution_order(name, config, self_per_level, latent, grids):
    unet = _meta_unet(config)
    table = LayerTable(unet)
    total = sum(self_per_level)
    assert len(table.select(kind="self")) == total and len(table.select(kind="cross")) == total
    assert [len(table.select(kind="self", levels=level)) for level in range(len(self_per_level))] == self_per_level
    if name != "sdxl":
        assert len(table.select(kind="cross", exclude_levels=0)) == 11  # PILOT's loss layers
        assert table.select(kind="self", indices=6)[0].place == "mid"
    for level, grid in enumerate(grids):
        assert all(layer.grid(latent) == grid for layer in table.select(levels=level))
    assert _forward_order(unet, table, latent, config["cross_attention_dim"], name == "sdxl") == table.names
    assert table.names != [k.removesuffix(".processor") for k in unet.attn_processors]
