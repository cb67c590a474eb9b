"""HDPainterPipeline on tiny real SD-inpainting components (a tiny SD layout: latent 16 at 128 px, so the
UNet has latent/2 = 8x8 and latent/4 = 4x4 grids like SD's 32x32 and 16x16 at 512 px).

Oracles: Q2 (all switches off = diffusers' StableDiffusionInpaintPipeline with the official DDIM, bit for bit),
P1, P4, P5 (a dense re-implementation of the PAIntA block), P6, R1, R4, R5, R6 (layer count), R7; a batch equals its
single runs; save/load; a 1024-d text context; an AsymmetricAutoencoderKL decoder receives image and mask.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from diffusers import StableDiffusionInpaintPipeline, UNet2DConditionModel

from asuka.errors import InputError
from asuka.models.seeding import seeded
from asuka.models.tiny import tiny_sd_components, tiny_text_encoder
from asuka.pipelines.hd_painter import preprocess
from asuka.pipelines.hd_painter.controls import HDPainterControls
from asuka.pipelines.hd_painter.pipeline import HDPainterPipeline, SmallMaskWarning

SIZE = 128


def tiny_unet(cross_attention_dim: int = 32, seed: int = 0, **kw) -> UNet2DConditionModel:
    """A tiny SD-inpainting UNet: 4 levels, cross-attention in the top three, one layer per down block."""
    config = dict(sample_size=16, in_channels=9, out_channels=4, block_out_channels=(8, 16, 32, 32), layers_per_block=1,
                  norm_num_groups=8, down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                  up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
                  cross_attention_dim=cross_attention_dim, attention_head_dim=2) | kw
    with seeded(seed):
        return UNet2DConditionModel(**config).eval()


def make_pipe(cross_attention_dim: int = 32, **unet_kw) -> HDPainterPipeline:
    parts = tiny_sd_components()
    parts["unet"] = tiny_unet(cross_attention_dim, **unet_kw)
    if cross_attention_dim != 32:
        parts["text_encoder"] = tiny_text_encoder(cross_attention_dim, vocab_size=len(parts["tokenizer"]))
    for name in ("safety_checker", "feature_extractor"):
        parts.pop(name)
    pipe = HDPainterPipeline(**parts)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def pipe():
    return make_pipe()


def inputs(batch: int = 1):
    g = torch.Generator().manual_seed(1)
    image = torch.rand(batch, 3, SIZE, SIZE, generator=g) * 2 - 1
    mask = torch.zeros(batch, 1, SIZE, SIZE)
    mask[0, :, 32:96, 40:104] = 1
    if batch > 1:
        mask[1, :, 8:72, 16:120] = 1
    return image, mask


def run(pipe, image, mask, seed=0, **kw):
    kw = dict(prompt="a red boat", num_inference_steps=2, working_long_side=SIZE, output_type="pt") | kw
    gens = [torch.Generator().manual_seed(seed + i) for i in range(image.shape[0])]
    return pipe(image, mask, generator=gens, **kw).images


# ------------------------------------------------------------------------------------------------ UNet-level helpers
def conditioning(pipe, batch=1, negative_seed=0):
    """A CFG text batch [negative, positive], the 9-channel extras and token weights for direct UNet calls."""
    g = torch.Generator().manual_seed(negative_seed)
    positive = torch.randn(batch, 77, pipe.unet.config.cross_attention_dim, generator=torch.Generator().manual_seed(7))
    negative = torch.randn(batch, 77, pipe.unet.config.cross_attention_dim, generator=g)
    image, mask = inputs(batch)
    masked_latents = torch.randn(batch, 4, 16, 16, generator=torch.Generator().manual_seed(8))
    extra = torch.cat([preprocess.latent_mask(mask, (16, 16)), masked_latents], 1)
    weights = torch.zeros(batch, 77)
    weights[:, [1, 2, 3, 5]] = 1
    return torch.cat([negative, positive]), torch.cat([extra, extra]), mask, weights


def unet_eps(pipe, z, t, text, extra):
    return pipe.unet(torch.cat([torch.cat([z, z]), extra], 1), t, encoder_hidden_states=text).sample


# ------------------------------------------------------------------------------------------------ Q2, R1, R7
def test_q2_switches_off_equal_diffusers_inpaint_pipeline(pipe):
    image, mask = inputs()
    latents = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(5))
    seen = {}

    def keep(p, i, t, tensors):
        seen.setdefault("tensors", {k: v.clone() for k, v in tensors.items()})
        return {}

    ours = pipe(image, mask, prompt="a red boat", num_inference_steps=3, working_long_side=SIZE, painta=False,
                rasg=False, latents=latents, output_type="pt", callback_on_step_end=keep,
                callback_on_step_end_tensor_inputs=["prompt_embeds", "mask", "masked_image_latents"]).images
    tensors = seen["tensors"]
    negative, positive = tensors["prompt_embeds"].chunk(2)
    base = StableDiffusionInpaintPipeline(vae=pipe.vae, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer,
                                          unet=pipe.unet, scheduler=pipe.sampling_scheduler(), safety_checker=None,
                                          feature_extractor=None, requires_safety_checker=False)
    base.set_progress_bar_config(disable=True)
    expected = base(prompt_embeds=positive, negative_prompt_embeds=negative, image=(image + 1) / 2,
                    mask_image=F.interpolate(tensors["mask"].chunk(2)[1], scale_factor=8),
                    masked_image_latents=tensors["masked_image_latents"].chunk(2)[1], latents=latents,
                    height=SIZE, width=SIZE, num_inference_steps=3, guidance_scale=7.5, output_type="pt").images
    assert torch.equal(ours, expected)
    assert pipe.sampling_scheduler().config.timestep_spacing == "trailing"


def test_r1_eta_zero_is_deterministic_ddim_and_r7_no_randomness(pipe):
    image, mask = inputs()
    plain = run(pipe, image, mask, painta=False, rasg=False)
    state = torch.get_rng_state()
    guided = run(pipe, image, mask, painta=False, rasg=True, eta=0.0, rasg_low_memory=False)   # same CFG batching
    assert torch.equal(torch.get_rng_state(), state)             # RASG draws no random numbers
    torch.testing.assert_close(guided, plain, atol=1e-6, rtol=0)
    split = run(pipe, image, mask, painta=False, rasg=True, eta=0.0)       # separate halves: float batching effects
    torch.testing.assert_close(split, plain, atol=1e-5, rtol=0)
    full = run(pipe, image, mask)
    assert torch.equal(full, run(pipe, image, mask))             # same seed, same output
    assert not torch.equal(full, plain)


# ------------------------------------------------------------------------------------------------ P1, P4, P5, P6
def test_p6_installs_on_exactly_latent2_and_latent4_and_restores(pipe):
    text, extra, mask, weights = conditioning(pipe)
    before = dict(pipe.unet.attn_processors)
    controls = HDPainterControls(pipe.unet, mask, weights, use_painta=True, use_rasg=True)
    painta_layers = {layer.name.rsplit(".transformer_blocks", 1)[0] for layer in
                     controls.controller.layers.select(kind="self", levels=(1, 2))}
    assert painta_layers == {"down_blocks.1.attentions.0", "up_blocks.2.attentions.0", "up_blocks.2.attentions.1",
                             "down_blocks.2.attentions.0", "up_blocks.1.attentions.0", "up_blocks.1.attentions.1"}
    assert [layer.name.rsplit(".transformer_blocks", 1)[0] for layer in controls.rasg_layers] == [
        "down_blocks.2.attentions.0", "up_blocks.1.attentions.0", "up_blocks.1.attentions.1"]   # R6: 3 attn2 at 4x4
    z = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    vanilla, vanilla_early = unet_eps(pipe, z, 499, text, extra), unet_eps(pipe, z, 979, text, extra)
    with controls:
        controls.state.cfg, controls.state.timestep = True, 499       # PAIntA off below t = 500
        assert torch.equal(unet_eps(pipe, z, 499, text, extra), vanilla)
        controls.state.timestep = 979
        assert not torch.equal(unet_eps(pipe, z, 979, text, extra), vanilla_early)
    after = pipe.unet.attn_processors
    assert all(after[name] is proc for name, proc in before.items())


def test_rasg_graph_stops_after_the_last_rasg_layer(pipe):
    """RASG's gradient pass records no autograd graph in the blocks after the last latent/4 cross-attention (their
    outputs never require grad; the loss does not depend on them), the block holding it does, and the hooks that
    cut the graph are gone after the call."""
    image, mask = inputs()
    seen: dict[int, set] = {i: set() for i in range(len(pipe.unet.up_blocks))}
    handles = [block.register_forward_hook(lambda m, a, out, i=i: seen[i].add(out.requires_grad))
               for i, block in enumerate(pipe.unet.up_blocks)]
    try:
        run(pipe, image, mask)
    finally:
        for handle in handles:
            handle.remove()
    assert seen[1] == {True, False}                  # up_blocks.1 holds the last RASG layer (graph pass, no-graph pass)
    assert seen[2] == seen[3] == {False}
    assert all(not block._forward_pre_hooks for block in pipe.unet.up_blocks)


def test_p1_full_or_empty_mask_is_a_no_op(pipe):
    text, extra, _, weights = conditioning(pipe)
    z = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    vanilla = unet_eps(pipe, z, 979, text, extra)
    for value in (0.0, 1.0):
        controls = HDPainterControls(pipe.unet, torch.full((1, 1, SIZE, SIZE), value), weights, use_painta=True,
                                     use_rasg=False)
        with controls:
            controls.state.cfg, controls.state.timestep = True, 979
            # dense fp32 softmax vs SDPA: equal up to float rounding through the whole UNet
            torch.testing.assert_close(unet_eps(pipe, z, 979, text, extra), vanilla, atol=1e-5, rtol=0)


def test_p4_same_c_for_both_halves_independent_of_negative_text(pipe):
    z = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    factors, uncond = [], []
    for negative_seed in (0, 1):
        text, extra, mask, weights = conditioning(pipe, negative_seed=negative_seed)
        controls = HDPainterControls(pipe.unet, mask, weights, use_painta=True, use_rasg=False)
        seen = []
        original = controls.painta.score_factor
        controls.painta.score_factor = lambda call: seen.append(original(call)) or seen[-1]
        with controls:
            controls.state.cfg, controls.state.timestep = True, 979
            eps_painta = pipe.unet(torch.cat([torch.cat([z, z]), extra], 1), 979, encoder_hidden_states=text).sample
        eps_plain = pipe.unet(torch.cat([torch.cat([z, z]), extra], 1), 979, encoder_hidden_states=text).sample
        assert len(seen) == 6
        for f in seen:
            assert torch.equal(f[0], f[1])                          # the same c scales both CFG halves
        factors.append(seen)
        uncond.append((eps_painta[0], eps_plain[0]))
    for a, b in zip(*factors):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)        # c comes from the conditional half only
    assert not torch.allclose(*uncond[0])                          # the unconditional branch is changed


def _reference_painta_block(block, x, text, m, weights, grid):
    """Paper §3.3 / official transformerpatch written out densely for one SD BasicTransformerBlock (CFG batch)."""
    a1, a2 = block.attn1, block.attn2

    def heads(t, n):
        return t.view(t.shape[0], t.shape[1], n, -1).transpose(1, 2)

    def merge(t):
        return t.transpose(1, 2).reshape(t.shape[0], t.shape[2], -1)

    x1 = block.norm1(x)
    q, k, v = heads(a1.to_q(x1), a1.heads), heads(a1.to_k(x1), a1.heads), heads(a1.to_v(x1), a1.heads)
    logits = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    y = a1.to_out[0](merge(logits.softmax(-1) @ v))
    b = x.shape[0] // 2
    qc = heads(a2.to_q(block.norm2(x[b:] + y[b:])), a2.heads)
    kc = heads(a2.to_k(text[b:]), a2.heads)
    s = (qc @ kc.transpose(-1, -2) / math.sqrt(qc.shape[-1])).softmax(-1).mean(1)     # (b, N, 77)
    raw = (s * weights[:, None, :]).sum(-1).reshape(b, 1, *grid)
    k1 = torch.exp(-((torch.arange(3.0) - 1) / (2 * 0.5)) ** 2)
    k1 = k1 / k1.sum()
    smooth = F.conv2d(raw, (k1[:, None] * k1[None])[None, None], padding=1).flatten(1)
    c = ((smooth - smooth.median(-1, keepdim=True).values) / smooth.amax(-1, keepdim=True)).clamp(0, 1)
    c = torch.cat([c, c])
    mm = torch.cat([m, m])
    scale = torch.where((mm[:, :, None] == 1) & (mm[:, None, :] == 0), c[:, None, :], torch.ones(()))
    y_tilde = a1.to_out[0](merge((logits * scale[:, None]).softmax(-1) @ v))
    h = x + y_tilde
    h = h + a2(block.norm2(h), encoder_hidden_states=text)
    return h + block.ff(block.norm3(h))


def test_p5_matches_dense_reference_on_every_painta_block(pipe):
    text, extra, mask, weights = conditioning(pipe)
    z = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    controls = HDPainterControls(pipe.unet, mask, weights, use_painta=True, use_rasg=False)
    layers = controls.controller.layers.select(kind="self", levels=(1, 2))
    captured, hooks = [], []
    for layer in layers:
        def grab(module, args, kwargs, output, layer=layer):
            x = args[0] if args else kwargs["hidden_states"]
            captured.append((layer, module, x, kwargs["encoder_hidden_states"], output))
        hooks.append(layer.transformer_block.register_forward_hook(grab, with_kwargs=True))
    try:
        with controls:
            controls.state.cfg, controls.state.timestep = True, 979
            unet_eps(pipe, z, 979, text, extra)
    finally:
        for hook in hooks:
            hook.remove()
    assert len(captured) == 6
    for layer, block, x, txt, out in captured:
        grid = layer.grid((16, 16))
        m = preprocess.attention_mask(mask, grid).flatten(1)
        ref = _reference_painta_block(block, x, txt, m, weights, grid)
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------------------------------ R4, R5
def _rasg_loss_and_grad(pipe, z, text, extra, mask, weights, painta=False):
    controls = HDPainterControls(pipe.unet, mask, weights, use_painta=painta, use_rasg=True)
    with controls, torch.enable_grad():
        controls.state.cfg, controls.state.timestep = True, 979
        zz = z.detach().requires_grad_(True)
        unet_eps(pipe, zz, 979, text, extra)
        loss = controls.rasg_loss((16, 16))
        (grad,) = torch.autograd.grad(loss, zz)
        controls.store.clear()
    return loss.detach(), grad


def test_r4_gradient_matches_finite_differences_and_ignores_negative_text():
    pipe64 = make_pipe().to(torch.float64)
    text, extra, mask, weights = conditioning(pipe64)
    text, extra = text.double(), extra.double()
    z = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    loss, grad = _rasg_loss_and_grad(pipe64, z, text, extra, mask, weights)
    assert float(grad.abs().max()) > 0
    direction = torch.randn(z.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    eps = 1e-5
    plus, _ = _rasg_loss_and_grad(pipe64, z + eps * direction, text, extra, mask, weights)
    minus, _ = _rasg_loss_and_grad(pipe64, z - eps * direction, text, extra, mask, weights)
    numeric = (plus - minus) / (2 * eps)
    analytic = (grad * direction).sum()
    assert abs(float(numeric - analytic)) < 1e-4 * abs(float(analytic))
    text2, _, _, _ = conditioning(pipe64, negative_seed=3)
    _, grad2 = _rasg_loss_and_grad(pipe64, z, text2.double(), extra, mask, weights)
    torch.testing.assert_close(grad2, grad, atol=1e-12, rtol=1e-9)


def test_r5_standardised_gradient_descends_the_bce(pipe):
    from asuka.pipelines.hd_painter.rasg import standardise

    text, extra, mask, weights = conditioning(pipe)
    z = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    loss, grad = _rasg_loss_and_grad(pipe, z, text, extra, mask, weights, painta=True)
    step = standardise(-grad)
    after, _ = _rasg_loss_and_grad(pipe, z + 1e-2 * step, text, extra, mask, weights, painta=True)
    assert float(after) < float(loss)


# ------------------------------------------------------------------------------------------------ batches, modes
def test_batch_of_two_equals_single_runs(pipe):
    image, mask = inputs(batch=2)
    prompts = ["a red boat", "a cat"]
    both = run(pipe, image, mask, prompt=prompts)
    one = run(pipe, image[:1], mask[:1], prompt=prompts[0])
    two = run(pipe, image[1:], mask[1:], seed=1, prompt=prompts[1])
    torch.testing.assert_close(both, torch.cat([one, two]), atol=1e-5, rtol=0)
    graph = run(pipe, image, mask, prompt=prompts, rasg_low_memory=False)   # the official CFG-batch graph
    torch.testing.assert_close(graph, both, atol=1e-5, rtol=0)


def test_sigma_mode_and_independent_switches_change_the_result(pipe):
    image, mask = inputs()
    outs = [run(pipe, image, mask, **kw) for kw in (dict(), dict(painta=False), dict(rasg=False),
                                                    dict(sigma_mode="paper"))]
    for i in range(len(outs)):
        for j in range(i + 1, len(outs)):
            assert not torch.equal(outs[i], outs[j])


def test_save_load_callback_and_output_types(pipe, tmp_path):
    pipe.save_pretrained(tmp_path)
    again = HDPainterPipeline.from_pretrained(tmp_path)
    again.set_progress_bar_config(disable=True)
    image, mask = inputs()
    steps = []

    def callback(p, i, t, tensors):
        steps.append(int(t))
        return {"latents": tensors["latents"]}

    a = run(pipe, image, mask, rasg=False)
    b = run(again, image, mask, rasg=False, callback_on_step_end=callback)
    assert torch.equal(a, b) and steps == [999, 499]
    pil = again(image, mask, prompt="x", num_inference_steps=1, working_long_side=SIZE, rasg=False).images
    assert pil[0].size == (SIZE, SIZE)
    latent = run(again, image, mask, rasg=False, output_type="latent")
    assert latent.shape == (1, 4, 16, 16)


def test_loads_a_diffusers_inpaint_folder_and_working_size(tiny_inpaint_dir):
    pipe = HDPainterPipeline.from_pretrained(tiny_inpaint_dir)
    pipe.set_progress_bar_config(disable=True)
    image = torch.rand(1, 3, 48, 80) * 2 - 1
    mask = torch.zeros(1, 1, 48, 80)
    mask[..., 20:26, 16:64] = 1                  # a 6-px stroke vanishes at the latent/4 grid
    with pytest.warns(SmallMaskWarning):
        out = pipe(image, mask, prompt="a boat", num_inference_steps=1, working_long_side=64, output_type="pt").images
    assert out.shape == (1, 3, 38, 64)            # long side 64, aspect kept (official truncation), padding cropped


def test_1024_d_context_like_sd2(tmp_path):
    pipe = make_pipe(cross_attention_dim=1024, use_linear_projection=True, attention_head_dim=(2, 4, 8, 8))
    image, mask = inputs()
    out = run(pipe, image, mask, num_inference_steps=1)
    assert out.shape == (1, 3, SIZE, SIZE) and torch.isfinite(out).all()


def test_asymmetric_decoder_receives_image_and_mask(pipe):
    from asuka.models.decoder import HarmonizingDecoderKL

    vae = HarmonizingDecoderKL.from_vae(pipe.vae)
    seen = {}
    original = vae.decode

    def spy(z, *args, **kwargs):
        seen.update(kwargs)
        return original(z, *args, **kwargs)

    vae.decode = spy
    harmonized = HDPainterPipeline(vae=vae, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer, unet=pipe.unet,
                                   scheduler=pipe.scheduler)
    harmonized.set_progress_bar_config(disable=True)
    image, mask = inputs()
    out = run(harmonized, image, mask, num_inference_steps=1, rasg=False, paste_back=True)
    assert seen["image"].shape == (1, 3, SIZE, SIZE) and seen["mask"].shape == (1, 1, SIZE, SIZE)
    known = (preprocess.dilate(mask, 1) < 0.5).expand_as(out)
    torch.testing.assert_close(out[known] * 2 - 1, image[known], atol=1e-6, rtol=0)   # paste-back


def test_errors(pipe):
    image, mask = inputs()
    for kw, field in ((dict(sigma_mode="cumulative"), "sigma_mode"), (dict(working_long_side=100), "working_long_side"),
                      (dict(prompt=["a", "b"]), "prompt"), (dict(eta=-1), "eta"), (dict(output_type="jpg"), "output_type"),
                      (dict(callback_on_step_end_tensor_inputs=["x0"]), "callback_on_step_end_tensor_inputs")):
        with pytest.raises(InputError) as err:
            run(pipe, image, mask, **kw)
        assert err.value.field == field
    four = HDPainterPipeline(vae=pipe.vae, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer,
                             unet=tiny_unet(in_channels=4), scheduler=pipe.scheduler)
    with pytest.raises(InputError, match="9-channel"):
        run(four, image, mask)


def test_rasg_works_under_inference_mode(pipe):
    image, mask = inputs()
    expected = run(pipe, image, mask, num_inference_steps=1)
    with torch.inference_mode():
        assert torch.equal(run(pipe, image.clone(), mask.clone(), num_inference_steps=1), expected)
