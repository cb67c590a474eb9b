"""HarmonPaintPipeline end to end on tiny SD-1.5-layout components (spec oracles T1-T3, T9, T13, T14)."""

from __future__ import annotations

import math

import pytest
import torch
from diffusers import StableDiffusionInpaintPipeline

from asuka.attention import AttentionController, ControlledAttnProcessor, TokenMasks
from asuka.errors import InputError
from asuka.models.tiny import tiny_sd_components
from asuka.pipelines.harmonpaint.config import HarmonPaintConfig
from asuka.pipelines.harmonpaint.controls import MAKVS, SAMS, STEER
from asuka.pipelines.harmonpaint.masks import resize_mask_to_grid
from asuka.pipelines.harmonpaint.pipeline import HarmonPaintPipeline, SteerHook
from asuka.pipelines.harmonpaint.schedule import plan_steps
from asuka.pipelines.harmonpaint.steer import prompt_token_mask

SIZE = 64
OFF = dict(use_sams=False, use_steer=False, use_makvs=False)
PROMPTS = ["a red boat", "a cat on a mat"]


@pytest.fixture(scope="module")
def parts():
    return tiny_sd_components()


@pytest.fixture(scope="module")
def pipe(parts):
    pipe = HarmonPaintPipeline(**parts, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _inputs():
    g = torch.Generator().manual_seed(3)
    image = torch.rand(2, 3, SIZE, SIZE, generator=g)
    mask = torch.zeros(2, 1, SIZE, SIZE)
    mask[0, :, 0:40, 16:64] = 1  # hole on every grid, 2x2 included
    mask[1, :, 40:52, 4:18] = 1  # small: empty on the 2x2 grid (MAKVS bypasses this sample there)
    return image, mask


def _generators(seeds):
    return [torch.Generator().manual_seed(s) for s in seeds]


def _call(pipe, rows, steps, **kwargs):
    image, mask = _inputs()
    return pipe(prompt=[PROMPTS[r] for r in rows], image=image[rows], mask_image=mask[rows], height=SIZE, width=SIZE,
                num_inference_steps=steps, generator=_generators([10 + r for r in rows]), output_type="pt",
                **kwargs).images


@pytest.mark.parametrize("vae", ["autoencoder", "harmonizing"])
def test_all_features_off_equals_diffusers_bit_for_bit(parts, pipe, vae):  # T1 (+ vae= and paste-back)
    from asuka.models.decoder import HarmonizingDecoderKL

    if vae == "harmonizing":
        parts = {**parts, "vae": HarmonizingDecoderKL.from_vae(parts["vae"]).eval()}
        pipe = HarmonPaintPipeline(**parts, requires_safety_checker=False)
        pipe.set_progress_bar_config(disable=True)
    sd = StableDiffusionInpaintPipeline(**parts, requires_safety_checker=False)
    sd.set_progress_bar_config(disable=True)
    expected = _call(sd, [0, 1], 2)
    assert torch.equal(_call(pipe, [0, 1], 2, **OFF), expected)
    if vae == "autoencoder":
        image, mask = _inputs()
        pasted = _call(pipe, [0, 1], 2, paste_back=True, **OFF)
        hole = mask.expand_as(image) > 0.5
        assert torch.equal(pasted[hole], expected[hole])
        torch.testing.assert_close(pasted[~hole], image[~hole], atol=1e-6, rtol=0)


def test_layer_map_and_phase_schedule_by_timestep(pipe, tmp_path, monkeypatch):  # T2, T3, T14, diagnostics
    table = AttentionController(pipe.unet).layers.select(kind="self")
    assert len(table) == 16 and table[6].name == "mid_block.attentions.0.transformer_blocks.0.attn1"
    assert [l.name for l in table] != [n.removesuffix(".processor") for n in pipe.unet.attn_processors
                                       if ".attn1." in n]  # registration order puts the mid block last
    calls = []
    for cls, hook in ((SAMS, "prob_weight"), (MAKVS, "keys_values")):
        original = getattr(cls, hook)

        def record(self, call, *args, _original=original, _name=cls.__name__):
            calls.append((_name, call.state.step, call.state.phase, call.layer.kind_index))
            return _original(self, call, *args)

        monkeypatch.setattr(cls, hook, record)
    processors = dict(pipe.unet.attn_processors)
    out = _call(pipe, [0], 5, diagnostics_dir=tmp_path)
    # 5 DDIM steps: t = 801, 601, 401, 201, 1 -> structure (t >= 600) at steps 0-1 only (not the first 60 % of steps)
    assert pipe.scheduler.timesteps.tolist() == [801, 601, 401, 201, 1]
    sams = [c for c in calls if c[0] == "SAMS"]
    makvs = [c for c in calls if c[0] == "MAKVS"]
    assert {c[3] for c in sams} == {2, 3, 4, 5, 6} and {c[3] for c in makvs} == set(range(8, 16))
    assert {c[1] for c in sams} == {0, 1} and {c[1] for c in makvs} == {2, 3, 4}
    for step in (0, 1):  # a steer pass and a CFG pass per structure step, SAMS in both
        assert sorted(c[2] for c in sams if c[1] == step) == ["main"] * 5 + [STEER] * 5
    for step in (2, 3, 4):
        assert len([c for c in makvs if c[1] == step]) == 8
    # exact restore, a working U-Net afterwards, determinism (T14)
    assert dict(pipe.unet.attn_processors) == processors
    assert not any(isinstance(p, ControlledAttnProcessor) for p in pipe.unet.attn_processors.values())
    assert all(p.requires_grad for p in pipe.unet.parameters())
    monkeypatch.undo()
    with torch.inference_mode():  # the steer pass still differentiates (inference mode is switched off inside)
        assert torch.equal(_call(pipe, [0], 5, diagnostics_dir=tmp_path), out)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert "sample0_step01_t601_self4_pca.png" in names and "sample0_step04_t1_self4_pca.png" in names
    assert "sample0_step01_t601_cross4x4_token1.png" in names and "sample0_step01_t601_cross2x2_token3.png" in names


def test_batch_of_two_equals_single_runs(pipe):  # T9 end to end, per-sample masks and prompts
    both = _call(pipe, [0, 1], 5)
    torch.testing.assert_close(both[:1], _call(pipe, [0], 5), atol=1e-5, rtol=0)
    torch.testing.assert_close(both[1:], _call(pipe, [1], 5), atol=1e-5, rtol=0)


def test_steer_gradient_is_the_derivative_of_the_loss(parts):  # T13, float64
    unet = parts["unet"].double()
    try:
        pipe = HarmonPaintPipeline(**{**parts, "unet": unet}, requires_safety_checker=False)
        config = HarmonPaintConfig.from_options()
        g = torch.Generator().manual_seed(0)
        mask = torch.zeros(1, 1, 8, 8, dtype=torch.float64)
        mask[..., 2:6, 1:5] = 1
        tensors = {"mask": mask, "masked_image_latents": torch.randn(1, 4, 8, 8, generator=g, dtype=torch.float64),
                   "prompt_embeds": torch.randn(1, 77, 32, generator=g, dtype=torch.float64)}
        pipe.scheduler.set_timesteps(5)
        plans = plan_steps(pipe.scheduler.timesteps.tolist())
        controller = AttentionController(unet)
        masks = TokenMasks(mask, resize=resize_mask_to_grid)
        controller.add(SAMS(masks, plans, config.tau, config.sams_variant, True),
                       controller.layers.select(kind="self", indices=config.sams_layers))
        weights = prompt_token_mask([3], 77)
        hook = SteerHook(pipe, controller, config, plans, masks, weights, weights, [801], (8, 8), slice(None))
        z = torch.randn(1, 4, 8, 8, generator=g, dtype=torch.float64)
        t = pipe.scheduler.timesteps[0]
        with controller, torch.no_grad():
            controller.state.step, controller.state.phase, controller.state.cfg = 0, STEER, False
            with torch.enable_grad():
                leaf = z.clone().requires_grad_(True)
                loss = hook.loss(leaf, t, tensors)
                (grad,) = torch.autograd.grad(loss, leaf)
            assert not any(p.grad is not None for p in unet.parameters())
            assert torch.isfinite(grad).all() and grad.abs().sum() > 0
            d = torch.randn(z.shape, generator=g, dtype=torch.float64)
            d = d / d.norm()
            h = 1e-4
            numeric = (hook.loss(z + h * d, t, tensors) - hook.loss(z - h * d, t, tensors)) / (2 * h)
            assert math.isclose(numeric.item(), (grad * d).sum().item(), rel_tol=1e-3)
            assert hook.loss(z - 1e-4 * grad / grad.norm(), t, tensors) < hook.loss(z, t, tensors)
    finally:
        unet.float()


def test_bad_options_and_models_are_one_line_input_errors(parts, pipe):
    image, mask = _inputs()
    with pytest.raises(InputError, match="unknown option 'lamda'") as err:
        pipe(prompt="x", image=image[:1], mask_image=mask[:1], lamda=1.0)
    assert err.value.field == "options.lamda"
    with pytest.raises(InputError) as err:
        pipe(prompt="x", image=image[:1], mask_image=mask[:1], tau=1.5)
    assert err.value.field == "options.tau"
    with pytest.raises(InputError) as err:
        pipe(prompt_embeds=torch.zeros(1, 77, 32), negative_prompt_embeds=torch.zeros(1, 77, 32), image=image[:1],
             mask_image=mask[:1], num_inference_steps=3)  # t = 667 is a structure step
    assert err.value.field == "options.steer_token_indices"
    four = HarmonPaintPipeline(**tiny_sd_components(in_channels=4), requires_safety_checker=False)
    with pytest.raises(InputError, match="9-channel"):
        four(prompt="x", image=image[:1], mask_image=mask[:1])


def test_controls_on_a_real_unet_bypass_and_identities(parts):  # T6 / T8 (proc)
    unet = parts["unet"]
    g = torch.Generator().manual_seed(1)
    x, text = torch.randn(2, 9, 8, 8, generator=g), torch.randn(2, 77, 32, generator=g)
    with torch.no_grad():
        stock = unet(x, 500, encoder_hidden_states=text).sample
    plans = plan_steps([500], use_steer=False, makvs_all_steps=True, sams_all_steps=True)
    empty_and_full = torch.stack([torch.zeros(1, 8, 8), torch.ones(1, 8, 8)])
    for kind in ("makvs", "sams"):
        controller = AttentionController(unet)
        selfs = controller.layers.select(kind="self")
        masks = TokenMasks(empty_and_full, resize=resize_mask_to_grid)
        if kind == "makvs":  # no sample has both hole and known tokens: MAKVS never acts (the original processor runs)
            controller.add(MAKVS(masks, plans, 1.4, "concat", selfs, (8, 8)), selfs)
        else:  # tau = 0 with a uniform mask: W = 1, plain attention up to rounding
            controller.add(SAMS(masks, plans, 0.0, "obj_bg", False), selfs)
        with controller, torch.no_grad():
            controller.state.step, controller.state.phase, controller.state.cfg = 0, "main", False
            out = unet(x, 500, encoder_hidden_states=text).sample
        if kind == "makvs":
            assert torch.equal(out, stock)
        else:
            torch.testing.assert_close(out, stock, atol=1e-5, rtol=0)
