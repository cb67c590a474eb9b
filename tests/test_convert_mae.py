"""MAE converters: synthetic checkpoints in MAE-FAR's and official MAE's exact key layouts."""

from __future__ import annotations

import argparse

import numpy as np
import pytest
import torch

from asuka.models.convert import (
    StateDictMismatchError,
    convert_mae_far_checkpoint,
    convert_official_mae_state_dict,
    load_strict,
    mae_prior_from_mae_far,
    mae_prior_from_official_mae,
    read_checkpoint,
)
from asuka.models.mae import MAEPrior

EMBED, DEPTH, DEC, DEC_DEPTH, PATCH, MLP = 32, 2, 24, 3, 16, 4
HEADS = dict(num_heads=2, decoder_num_heads=2)


def _mae_sincos(dim: int, grid: int, cls_row: bool) -> np.ndarray:
    """MAE's ``get_2d_sincos_pos_embed`` written from its definition (w coordinate first, then h)."""
    w_coords, h_coords = np.meshgrid(np.arange(grid, dtype=np.float64), np.arange(grid, dtype=np.float64))
    omega = 1.0 / 10000 ** (np.arange(dim // 4, dtype=np.float64) / (dim // 4))

    def enc(pos):
        out = pos.reshape(-1)[:, None] * omega[None]
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    table = np.concatenate([enc(w_coords), enc(h_coords)], axis=1)
    if cls_row:
        table = np.concatenate([np.zeros((1, dim)), table])
    return table.astype(np.float32)[None]


def _block_keys(prefix: str, dim: int) -> dict[str, tuple[int, ...]]:
    hidden = MLP * dim
    return {
        f"{prefix}.norm1.weight": (dim,), f"{prefix}.norm1.bias": (dim,),
        f"{prefix}.attn.qkv.weight": (3 * dim, dim), f"{prefix}.attn.qkv.bias": (3 * dim,),
        f"{prefix}.attn.proj.weight": (dim, dim), f"{prefix}.attn.proj.bias": (dim,),
        f"{prefix}.norm2.weight": (dim,), f"{prefix}.norm2.bias": (dim,),
        f"{prefix}.mlp.fc1.weight": (hidden, dim), f"{prefix}.mlp.fc1.bias": (hidden,),
        f"{prefix}.mlp.fc2.weight": (dim, hidden), f"{prefix}.mlp.fc2.bias": (dim,),
    }


def _mae_layout(grid: int, cls_token: bool, finetune: bool, seed: int = 0) -> dict[str, torch.Tensor]:
    """A random state dict with MAE's key names and shapes (MAE-FAR: no cls; official: cls + 1 + g² tables)."""
    shapes: dict[str, tuple[int, ...]] = {"patch_embed.proj.weight": (EMBED, 3, PATCH, PATCH),
                                          "patch_embed.proj.bias": (EMBED,)}
    for i in range(DEPTH):
        shapes.update(_block_keys(f"blocks.{i}", EMBED))
    shapes.update({"norm.weight": (EMBED,), "norm.bias": (EMBED,), "decoder_embed.weight": (DEC, EMBED),
                   "decoder_embed.bias": (DEC,), "mask_token": (1, 1, DEC)})
    for i in range(DEC_DEPTH):
        shapes.update(_block_keys(f"decoder_blocks.{i}", DEC))
    shapes.update({"decoder_norm.weight": (DEC,), "decoder_norm.bias": (DEC,),
                   "decoder_pred.weight": (PATCH * PATCH * 3, DEC), "decoder_pred.bias": (PATCH * PATCH * 3,)})
    if cls_token:
        shapes["cls_token"] = (1, 1, EMBED)
    if finetune:
        shapes.update({"decoder_patch_embed.proj.weight": (DEC, 4, PATCH, PATCH),
                       "decoder_patch_embed.proj.bias": (DEC,), "alpha": ()})
    gen = torch.Generator().manual_seed(seed)
    state = {k: torch.randn(s, generator=gen) * 0.05 for k, s in shapes.items()}
    if finetune:
        state["alpha"] = torch.tensor(0.6)
    state["pos_embed"] = torch.from_numpy(_mae_sincos(EMBED, grid, cls_token))
    state["decoder_pos_embed"] = torch.from_numpy(_mae_sincos(DEC, grid, cls_token))
    return state


def _inputs():
    gen = torch.Generator().manual_seed(0)
    image = torch.rand(1, 3, 256, 256, generator=gen) * 2 - 1
    mask = torch.zeros(1, 1, 256, 256)
    mask[..., 40:130, 30:210] = 1
    return image, mask


def test_mae_far_finetune_checkpoint_loads_every_tensor(tmp_path):
    state = _mae_layout(16, cls_token=False, finetune=True)
    path = tmp_path / "mae_300.pth"
    torch.save({"model": state, "optimizer": {"state": {}, "param_groups": []}, "epoch": 299,
                "args": argparse.Namespace(model="mae_vit_base_patch16", finetune=True)}, path)
    model = mae_prior_from_mae_far(path, **HEADS)
    assert (model.config.img_size, model.config.embed_dim, model.config.depth) == (256, EMBED, DEPTH)
    assert (model.config.decoder_embed_dim, model.config.decoder_depth, model.config.feature_layer) == (DEC, DEC_DEPTH, 3)
    loaded = model.state_dict()
    assert set(loaded) == set(state)
    for key, value in state.items():
        assert torch.equal(loaded[key], value), key
    assert convert_mae_far_checkpoint(path).keys() == state.keys()  # the trainer's entry point
    out = model.prior(*_inputs())
    assert out.features.shape == (1, 256, DEC) and torch.isfinite(out.image).all()


def test_mae_far_checkpoint_with_ddp_prefix():
    state = {f"module.{k}": v for k, v in _mae_layout(16, cls_token=False, finetune=True).items()}
    model = mae_prior_from_mae_far({"model": state}, **HEADS)
    assert torch.equal(model.alpha, torch.tensor(0.6))


def test_mae_far_pretrain_checkpoint_gets_inactive_extras():
    state = _mae_layout(16, cls_token=False, finetune=False)
    model = mae_prior_from_mae_far(state, **HEADS).eval()
    assert model.alpha.item() == 1.0 and torch.equal(model.decoder_patch_embed.proj.bias, torch.zeros(DEC))
    image, mask = _inputs()
    with torch.no_grad():
        before = model.prior(image, mask)
        model.decoder_patch_embed.proj.weight.normal_()
        after = model.prior(image, mask)
    assert torch.equal(before.features, after.features)  # alpha = 1: the new branch is switched off
    again = mae_prior_from_mae_far(state, **HEADS)
    assert torch.equal(again.decoder_patch_embed.proj.weight,
                       mae_prior_from_mae_far(state, **HEADS).decoder_patch_embed.proj.weight)  # seeded


def test_missing_unexpected_and_mismatched_keys_are_named():
    state = _mae_layout(16, cls_token=False, finetune=True)
    del state["blocks.1.attn.proj.bias"]
    state["decoder_blocks.0.attn.extra"] = torch.zeros(3)
    state["decoder_pred.bias"] = torch.zeros(5)
    with pytest.raises(StateDictMismatchError) as info:
        mae_prior_from_mae_far(state, **HEADS)
    message = str(info.value)
    assert "blocks.1.attn.proj.bias" in message and "decoder_blocks.0.attn.extra" in message
    assert "decoder_pred.bias (5,) vs (768,)" in message
    assert info.value.missing == ["blocks.1.attn.proj.bias"]
    assert info.value.unexpected == ["decoder_blocks.0.attn.extra"]


def test_mae_far_converter_rejects_official_and_partial_extras():
    with pytest.raises(StateDictMismatchError, match="cls_token.*\n.*convert_official_mae_state_dict"):
        mae_prior_from_mae_far(_mae_layout(16, cls_token=True, finetune=False), **HEADS)
    partial = _mae_layout(16, cls_token=False, finetune=True)
    del partial["alpha"]
    with pytest.raises(StateDictMismatchError, match="alpha"):
        mae_prior_from_mae_far(partial, **HEADS)


def test_official_mae_drops_cls_and_regrids_sincos(tmp_path):
    state = _mae_layout(14, cls_token=True, finetune=False)  # 224 px, 1 + 196 tokens
    path = tmp_path / "mae_visualize_vit_base.pth"
    torch.save({"model": state}, path)
    model = mae_prior_from_official_mae(path, **HEADS)
    assert model.config.img_size == 256 and model.num_tokens == 256 and not model.config.norm_pix_loss
    loaded = model.state_dict()
    assert "cls_token" not in loaded
    np.testing.assert_allclose(loaded["pos_embed"].numpy(), _mae_sincos(EMBED, 16, False), atol=1e-6)
    np.testing.assert_allclose(loaded["decoder_pos_embed"].numpy(), _mae_sincos(DEC, 16, False), atol=1e-6)
    for key in ("patch_embed.proj.weight", "blocks.1.mlp.fc2.weight", "decoder_pred.weight", "mask_token"):
        assert torch.equal(loaded[key], state[key]), key
    assert model.alpha.item() == 1.0
    out = model.prior(*_inputs())
    assert out.features.shape == (1, 256, DEC)


def test_official_mae_full_is_norm_pix_and_gives_no_image():
    model = mae_prior_from_official_mae({"model": _mae_layout(14, cls_token=True, finetune=False)},
                                        norm_pix_loss=True, **HEADS)
    out = model.prior(*_inputs())
    assert out.image is None and out.features.shape == (1, 256, DEC)


def test_official_mae_rejects_learned_pos_embed():
    state = _mae_layout(14, cls_token=True, finetune=False)
    state["pos_embed"] = state["pos_embed"] + 0.01
    with pytest.raises(ValueError, match="pos_embed is not MAE's fixed 2-D sin-cos"):
        convert_official_mae_state_dict(state)
    without_cls = _mae_layout(14, cls_token=True, finetune=False)
    del without_cls["cls_token"]
    with pytest.raises(StateDictMismatchError, match="cls_token"):
        convert_official_mae_state_dict(without_cls)


def test_converted_model_round_trips_through_save_pretrained(tmp_path):
    model = mae_prior_from_mae_far(_mae_layout(16, cls_token=False, finetune=True), **HEADS).eval()
    model.save_pretrained(tmp_path / "mae")
    loaded = MAEPrior.from_pretrained(tmp_path / "mae").eval()
    image, mask = _inputs()
    with torch.no_grad():
        a, b = model.prior(image, mask), loaded.prior(image, mask)
    assert torch.equal(a.features, b.features) and torch.equal(a.image, b.image)


def test_read_checkpoint_errors_and_safetensors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_checkpoint(tmp_path / "nope.pth")
    torch.save({"model": {"a": torch.ones(1)}, "extra": np.dtype("float32").type}, tmp_path / "unsafe.pth")
    with pytest.raises(ValueError, match="weights_only=True"):
        read_checkpoint(tmp_path / "unsafe.pth")
    torch.save({"epoch": 3, "optimizer": {}}, tmp_path / "no_model.pth")
    with pytest.raises(ValueError, match="not a state dict.*top-level keys: epoch, optimizer"):
        read_checkpoint(tmp_path / "no_model.pth")
    from safetensors.torch import save_file

    save_file({"w": torch.arange(3.0)}, str(tmp_path / "w.safetensors"))
    assert torch.equal(read_checkpoint(tmp_path / "w.safetensors")["w"], torch.arange(3.0))


def test_load_strict_is_generic():
    layer = torch.nn.Linear(2, 3)
    with pytest.raises(StateDictMismatchError, match=r"missing keys \(1\): bias"):
        load_strict(layer, {"weight": torch.zeros(3, 2)}, source="toy")
    assert load_strict(layer, {"weight": torch.zeros(3, 2), "bias": torch.ones(3)}) is layer
    assert torch.equal(layer.bias, torch.ones(3))
