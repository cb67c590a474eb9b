"""The tiny builders reproduce Stable Diffusion 1.5's layout and load through diffusers' own pipelines."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL, StableDiffusionInpaintPipeline, StableDiffusionPipeline, UNet2DConditionModel

from asuka.models import tiny


def _attention_layers(unet: UNet2DConditionModel, kind: str) -> list[str]:
    return [name for name, _ in unet.named_modules() if name.endswith(f".{kind}")]


def test_unet_has_sd15_attention_layout():
    unet = tiny.tiny_unet()
    self_attn, cross_attn = _attention_layers(unet, "attn1"), _attention_layers(unet, "attn2")
    assert len(self_attn) == 16 and len(cross_attn) == 16
    # SD-1.5: 3 cross-attention down blocks x 2 layers, the mid block, 3 cross-attention up blocks x 3 layers.
    prefixes = sorted({n.split(".attentions")[0] for n in self_attn})
    assert prefixes == ["down_blocks.0", "down_blocks.1", "down_blocks.2", "mid_block",
                        "up_blocks.1", "up_blocks.2", "up_blocks.3"]
    assert [type(b).__name__ for b in unet.down_blocks] == list(tiny._DOWN_BLOCKS)
    assert [type(b).__name__ for b in unet.up_blocks] == list(tiny._UP_BLOCKS)
    assert [len(b.resnets) for b in unet.down_blocks] == [2, 2, 2, 2]
    assert [len(b.resnets) for b in unet.up_blocks] == [3, 3, 3, 3]
    assert unet.config.in_channels == 9 and tiny.tiny_unet(in_channels=4).config.in_channels == 4


def test_attention_token_grids_in_execution_order():
    """For a 64x64 latent, self-attention runs at 64², 32², 16² (down), 8² (mid), 16², 32², 64² (up)."""
    unet = tiny.tiny_unet(cross_attention_dim=16)
    seen: list[tuple[str, int, int]] = []
    hooks = [
        module.register_forward_pre_hook(
            lambda m, args, kwargs, name=name: seen.append((name, args[0].shape[1] if args else kwargs["hidden_states"].shape[1],
                                                            (kwargs.get("encoder_hidden_states") if kwargs.get("encoder_hidden_states") is not None else args[0]).shape[1])),
            with_kwargs=True)
        for name, module in unet.named_modules() if name.endswith((".attn1", ".attn2"))
    ]
    with torch.no_grad():
        unet(torch.randn(1, 9, 64, 64), 10, encoder_hidden_states=torch.randn(1, 7, 16))
    for h in hooks:
        h.remove()
    self_grid = [q for name, q, _ in seen if name.endswith("attn1")]
    assert self_grid == [64 * 64] * 2 + [32 * 32] * 2 + [16 * 16] * 2 + [8 * 8] + [16 * 16] * 3 + [32 * 32] * 3 + [64 * 64] * 3
    assert all(kv == 7 for name, _, kv in seen if name.endswith("attn2"))


def test_vae_downsamples_by_8_with_sd_scaling():
    vae = tiny.tiny_vae()
    assert isinstance(vae, AutoencoderKL)
    assert vae.config.latent_channels == 4 and vae.config.scaling_factor == pytest.approx(0.18215)
    with torch.no_grad():
        latents = vae.encode(torch.zeros(1, 3, 64, 48)).latent_dist.mean
    assert latents.shape == (1, 4, 8, 6)


def test_tokenizer_is_offline_clip_bpe(tmp_path):
    tok = tiny.tiny_tokenizer(tmp_path)
    ids = tok("a photograph of the scene", padding="max_length", max_length=77, return_tensors="pt").input_ids
    assert ids.shape == (1, 77)
    assert ids[0, 0] == tok.bos_token_id == tok.convert_tokens_to_ids("<|startoftext|>")
    assert tok.eos_token_id == tok.convert_tokens_to_ids("<|endoftext|>")
    assert "the</w>" in tok.tokenize("the")  # merges apply, like CLIP's BPE
    assert int(ids.max()) < tiny.tiny_text_encoder(vocab_size=len(tok)).config.vocab_size


def test_builders_are_seeded_and_leave_global_rng_alone():
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    a = tiny.tiny_unet(seed=1)
    after = torch.rand(1)
    assert torch.equal(before, after)
    b = tiny.tiny_unet(seed=1)
    c = tiny.tiny_unet(seed=2)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not all(torch.equal(sa[k], sc[k]) for k in sa)


def test_schedulers_follow_sd15():
    ddim, ddpm = tiny.ddim_scheduler(), tiny.ddpm_scheduler()
    for s in (ddim, ddpm):
        assert s.config.beta_schedule == "scaled_linear"
        assert s.config.beta_start == 0.00085 and s.config.beta_end == 0.012
        assert s.config.num_train_timesteps == 1000
    expected = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float32) ** 2
    torch.testing.assert_close(ddim.betas, expected)


def test_saved_inpaint_folder_runs_in_diffusers(tiny_inpaint_dir):
    pipe = StableDiffusionInpaintPipeline.from_pretrained(tiny_inpaint_dir)
    pipe.set_progress_bar_config(disable=True)
    image = np.full((64, 64, 3), 128, np.uint8)
    mask = np.zeros((64, 64), np.uint8)
    mask[16:48, 16:48] = 255
    from PIL import Image

    out = pipe("a scene", image=Image.fromarray(image), mask_image=Image.fromarray(mask), num_inference_steps=2,
               generator=torch.Generator().manual_seed(0), output_type="np").images
    assert out.shape == (1, 64, 64, 3) and np.isfinite(out).all()


def test_saved_text_to_image_folder_runs_in_diffusers(tmp_path):
    path = tiny.save_tiny_sd(tmp_path / "sd")
    pipe = StableDiffusionPipeline.from_pretrained(path)
    pipe.set_progress_bar_config(disable=True)
    assert pipe.unet.config.in_channels == 4
    out = pipe("a scene", height=64, width=64, num_inference_steps=2, generator=torch.Generator().manual_seed(0),
               output_type="np").images
    assert out.shape == (1, 64, 64, 3) and np.isfinite(out).all()
