"""PilotInpaintPipeline on tiny real SD components: the oracles of PILOT's paper and official code, against diffusers'
own pipelines, dense references written out here, and invariants."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from asuka.attention import AttentionController
from asuka.pipelines._sampling import AlphaBar
from asuka.pipelines.pilot import controls as ctl
from asuka.pipelines.pilot.objective import PilotLoss, latent_hole_mask, word_token_mask
from asuka.pipelines.pilot.pipeline import PilotInpaintPipeline, _Conditioning
from asuka.pipelines.pilot.schedule import descend

SIZE = 64
STEPS = 4


@pytest.fixture(scope="module")
def pipe(sd_dir):
    p = PilotInpaintPipeline.from_pretrained(sd_dir)
    p.set_progress_bar_config(disable=True)
    return p


def _image(seed: int = 0) -> torch.Tensor:
    return torch.rand(1, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def _mask(top=16, left=16, h=32, w=32) -> torch.Tensor:
    m = torch.zeros(1, 1, SIZE, SIZE)
    m[..., top:top + h, left:left + w] = 1
    return m


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _run(pipe, image=None, mask=None, seed=0, **kw):
    kw = {"prompt": "a cat", "num_inference_steps": STEPS, "op_interval": 2, "num_gradient_ops": 2,
          "output_type": "latent", **kw}
    return pipe(_image() if image is None else image, _mask() if mask is None else mask,
                generator=kw.pop("generator", _gen(seed)), **kw).images


# ---------------------------------------------------------------------------------------------------- O1
def test_o1_every_switch_off_equals_stable_diffusion(pipe, sd_dir):
    from diffusers import StableDiffusionPipeline

    ref = StableDiffusionPipeline.from_pretrained(sd_dir, safety_checker=None, requires_safety_checker=False)
    ref.set_progress_bar_config(disable=True)
    expected = ref("a cat", num_inference_steps=STEPS, height=SIZE, width=SIZE, generator=_gen(),
                   output_type="latent").images
    off = _run(pipe, num_gradient_ops=0, sbc=False)
    torch.testing.assert_close(off, expected, rtol=0, atol=0)
    full_hole = _run(pipe, mask=torch.ones(1, 1, SIZE, SIZE))  # the code's special case: plain text-to-image
    torch.testing.assert_close(full_hole, expected, rtol=0, atol=0)
    assert not torch.equal(_run(pipe), expected)


# ------------------------------------------------------------------------------------------- O2, O3, O4, O16
def _loss_at(pipe, t_index=1, sbc=True, lam=0.0):
    """A PilotLoss at one timestep of a 10-step schedule, with the controls installed the pipeline's way."""
    device = pipe.device
    image, mask = _image(), _mask()
    pipe.scheduler.set_timesteps(10)
    t = pipe.scheduler.timesteps[t_index]
    source = pipe._encode_vae_image(image, _gen(1))
    hole = latent_hole_mask(mask, (SIZE // 8, SIZE // 8))
    embeds, _ = pipe.encode_prompt(["a cat"], device, 1, False)
    controller = AttentionController(pipe.unet)
    masks = ctl.hole_token_masks(hole)
    if sbc:
        controller.add(ctl.BoundaryControl(masks), controller.layers.select(kind="cross"))
    recorder = controller.add(ctl.CentralisationRecorder(masks, pipe.word_tokens(["a cat"], device)),
                              ctl.semantic_layers(controller.layers))
    controller.state.phase = ctl.GRADIENT_PHASE
    loss = PilotLoss(lambda z: pipe.conditional_noise(z, t, embeds, _Conditioning(False)), recorder.terms, source,
                     hole, AlphaBar(pipe.scheduler, device)(t), torch.full((1,), lam))
    z = torch.randn(1, 4, SIZE // 8, SIZE // 8, generator=_gen(2))
    return controller, loss, z


def test_o2_o3_background_loss_descends(pipe):
    controller, loss, z = _loss_at(pipe)
    with controller, torch.no_grad():
        bg = lambda x: float(loss.parts(x)[0])  # noqa: E731
        z_start, values = z, [bg(z)]
        for _ in range(5):  # small plain gradient steps: strictly decreasing
            z = descend(loss, z, steps=1, step=2e-4, momentum=0.0)
            values.append(bg(z))
        assert all(b < a for a, b in zip(values, values[1:])), values
        z10 = descend(loss, z_start, steps=10, step=2e-4, momentum=0.7)  # O3: better than with K = 0
        assert bg(z10) < bg(z_start)


def test_o4_semantic_loss_moves_attention_into_the_hole(pipe):
    controller, loss, z = _loss_at(pipe, lam=1.0)
    semantic_only = lambda x: loss.parts(x)[1]  # noqa: E731  (L_bg weight 0)
    with controller, torch.no_grad():
        before = -float(semantic_only(z))  # mean over S of (a_fg - a_bg)
        z = descend(semantic_only, z, steps=3, step=0.5, momentum=0.0)
        after = -float(semantic_only(z))
    assert after > before


def test_o16_no_parameter_gradients_and_no_graph_growth(pipe):
    controller, loss, z = _loss_at(pipe, lam=1.0)
    peaks = []
    for steps in (1, 4):
        alive, peak = [0], [0]

        class Packed:
            def __init__(self, t):
                self.t = t
                alive[0] += 1
                peak[0] = max(peak[0], alive[0])

            def __del__(self):
                alive[0] -= 1

        with controller, torch.no_grad(), torch.autograd.graph.saved_tensors_hooks(Packed, lambda p: p.t):
            descend(loss, z, steps=steps, step=1e-3, momentum=0.7)
        peaks.append(peak[0])
        assert alive[0] == 0  # every graph freed
    assert peaks[0] == peaks[1] > 0
    _run(pipe)
    for module in (pipe.unet, pipe.vae, pipe.text_encoder):
        assert all(p.grad is None for p in module.parameters())
        assert all(p.requires_grad for p in module.parameters())  # flags restored


# ---------------------------------------------------------------------------------------------------- O5, O6
def _capture_layer(pipe, layer, mask, zero_word_values=False):
    """Run the UNet once with SBC on; return (input hidden states, text states, pre-to_out output) of ``layer``."""
    seen = {}
    attn = layer.module
    hooks = [attn.register_forward_pre_hook(lambda m, a, k: seen.update(h=a[0], e=k["encoder_hidden_states"]),
                                            with_kwargs=True),
             attn.to_out[0].register_forward_pre_hook(lambda m, a: seen.update(out=a[0]))]
    if zero_word_values:
        def zero(m, a, out):
            out = out.clone()
            out[:, 1:] = 0
            return out
        hooks.append(attn.to_v.register_forward_hook(zero))
    controller = AttentionController(pipe.unet)
    hole = latent_hole_mask(mask, (SIZE // 8, SIZE // 8))
    controller.add(ctl.BoundaryControl(ctl.hole_token_masks(hole)), controller.layers.select(kind="cross"))
    embeds, _ = pipe.encode_prompt(["a cat"], pipe.device, 1, False)
    z = torch.randn(1, 4, SIZE // 8, SIZE // 8, generator=_gen(3))
    try:
        with controller, torch.no_grad():
            controller.state.phase = ctl.GUIDED_PHASE
            pipe.unet(z, 500, encoder_hidden_states=embeds)
    finally:
        for hook in hooks:
            hook.remove()
    return seen, ctl.hole_token_masks(hole).at(layer.grid((SIZE // 8, SIZE // 8)))[0]


def test_o5_sbc_background_rows_are_p_bos_times_v_bos(pipe):
    layer = AttentionController(pipe.unet).layers.select(kind="cross", levels=0)[0]
    seen, hole = _capture_layer(pipe, layer, _mask())
    attn, heads = layer.module, layer.module.heads
    split = lambda x: x.unflatten(-1, (heads, -1)).transpose(1, 2)  # noqa: E731
    q, k, v = split(attn.to_q(seen["h"])), split(attn.to_k(seen["e"])), split(attn.to_v(seen["e"]))
    probs = torch.softmax(q @ k.transpose(-1, -2) * attn.scale, -1)
    out = split(seen["out"])  # (1, heads, N, d)
    bg, fg = hole == 0, hole == 1
    assert bg.any() and fg.any()
    torch.testing.assert_close(out[:, :, bg], (probs[:, :, bg, :1] * v[:, :, :1]), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out[:, :, fg], (probs @ v)[:, :, fg], rtol=1e-4, atol=1e-5)
    zeroed, _ = _capture_layer(pipe, layer, _mask(), zero_word_values=True)  # word values never reach the background
    torch.testing.assert_close(split(zeroed["out"])[:, :, bg], out[:, :, bg], rtol=0, atol=0)


def test_o6_sbc_with_an_all_hole_mask_is_the_plain_layer(pipe):
    controller = AttentionController(pipe.unet)
    hole = torch.ones(1, 1, SIZE // 8, SIZE // 8)
    controller.add(ctl.BoundaryControl(ctl.hole_token_masks(hole)), controller.layers.select(kind="cross"))
    embeds, _ = pipe.encode_prompt(["a cat"], pipe.device, 1, False)
    z = torch.randn(1, 4, SIZE // 8, SIZE // 8, generator=_gen(4))
    with torch.no_grad():
        plain = pipe.unet(z, 500, encoder_hidden_states=embeds).sample
        with controller:
            controller.state.phase = ctl.GUIDED_PHASE
            sbc = pipe.unet(z, 500, encoder_hidden_states=embeds).sample
    torch.testing.assert_close(sbc, plain, rtol=0, atol=1e-5)


# ---------------------------------------------------------------------------------------------------- O8
def test_o8_unet_call_counts(pipe):
    calls = {"grad": 0, "plain": 0}

    def count(module, args, kwargs):
        calls["grad" if torch.is_grad_enabled() else "plain"] += 1

    hook = pipe.unet.register_forward_pre_hook(count, with_kwargs=True)
    try:
        _run(pipe, num_inference_steps=20, op_interval=5, num_gradient_ops=3, lr=1e-3)
        assert calls == {"grad": 12, "plain": 20}
        calls.update(grad=0, plain=0)
        _run(pipe, num_inference_steps=5, op_interval=5, num_gradient_ops=3, gamma=0.0)
        assert calls == {"grad": 0, "plain": 5}
    finally:
        hook.remove()


# ---------------------------------------------------------------------------------------------------- O9
def test_o9_a_batch_equals_its_single_runs(pipe):
    images, masks = torch.cat([_image(0), _image(1)]), torch.cat([_mask(), _mask(0, 8, 40, 24)])
    kw = dict(gamma=0.5, num_inference_steps=6, prompt=["a cat", "a red chair"])
    batch = _run(pipe, images, masks, generator=[_gen(10), _gen(11)], **kw)
    for i, prompt in enumerate(kw.pop("prompt")):
        single = _run(pipe, images[i:i + 1], masks[i:i + 1], generator=_gen(10 + i), prompt=prompt, **kw)
        torch.testing.assert_close(batch[i:i + 1], single, rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------------------------------------------- O10
def test_o10_gamma_zero_is_blended_latent_diffusion(pipe):
    """With γ = 0 and SBC off, PILOT is Blended Latent Diffusion; the reference loop is written out with the noise
    drawn in the pipeline's order (initial noise, VAE posterior sample, one blend noise per step)."""
    from diffusers.utils.torch_utils import randn_tensor

    image, mask, steps = _image(), _mask(), 5
    out = _run(pipe, image, mask, gamma=0.0, sbc=False, num_inference_steps=steps, guidance_scale=5.0)
    g = _gen(0)
    shape = (1, 4, SIZE // 8, SIZE // 8)
    z = randn_tensor(shape, generator=g)
    source = pipe.vae.encode(image).latent_dist.sample(g) * pipe.vae.config.scaling_factor
    hole = F.interpolate(mask, size=shape[-2:], mode="nearest")
    pos, neg = pipe.encode_prompt(["a cat"], "cpu", 1, True, [""])
    pipe.scheduler.set_timesteps(steps)
    with torch.no_grad():
        for t in pipe.scheduler.timesteps:
            ab = pipe.scheduler.alphas_cumprod[t]
            eps_i = randn_tensor(shape, generator=g)
            background = ab.sqrt() * source + (1 - ab).sqrt() * eps_i
            z = hole * z + (1 - hole) * background
            assert torch.equal(z[(1 - hole).bool().expand_as(z)], background[(1 - hole).bool().expand_as(z)])
            e_u, e_c = pipe.unet(torch.cat([z, z]), t, encoder_hidden_states=torch.cat([neg, pos])).sample.chunk(2)
            z = pipe.scheduler.step(e_u + 5.0 * (e_c - e_u), t, z).prev_sample
    torch.testing.assert_close(out, z, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------------- O12
def test_o12_eleven_semantic_layers_on_sd15():
    from accelerate import init_empty_weights
    from asuka.attention import LayerTable
    from asuka.models.tiny import SD15_CROSS_ATTENTION_DIM, _unet

    with init_empty_weights():
        unet = _unet((320, 640, 1280, 1280), 32, 8, 4, SD15_CROSS_ATTENTION_DIM, 64)
    names = [layer.name for layer in ctl.semantic_layers(LayerTable(unet))]
    assert len(names) == 11 and all(n.endswith("attn2") for n in names)
    assert all(re.match(r"(down_blocks\.[12]|mid_block|up_blocks\.[12])\.", n) for n in names)
    assert len(LayerTable(unet).select(kind="cross")) == 16


# ------------------------------------------------------------------------------------------------- O13-O15
def test_no_hole_means_no_sbc(pipe):
    """The code's other special case: nothing to inpaint -> no attention mask (SBC off), L_bg still optimised."""
    empty = torch.zeros(1, 1, SIZE, SIZE)
    torch.testing.assert_close(_run(pipe, mask=empty), _run(pipe, mask=empty, sbc=False), rtol=0, atol=1e-4)


def test_o13_mask_polarity(pipe):
    mask = _mask()
    torch.testing.assert_close(_run(pipe, mask=1 - mask, mask_convention="pilot"), _run(pipe, mask=mask),
                               rtol=0, atol=0)


def test_o14_deterministic_and_no_cuda_literal(pipe):
    torch.testing.assert_close(_run(pipe), _run(pipe), rtol=0, atol=0)
    package = Path(ctl.__file__).parent
    for path in [*package.glob("*.py"), package.parents[1] / "models" / "tiny_adapters.py"]:
        assert not re.search(r"""["']cuda|\.cuda\(""", path.read_text()), path


def test_o15_paste_back_is_exact(pipe):
    image, mask = _image(), _mask()
    out = _run(pipe, image, mask, output_type="pt", paste_back=True)
    keep = (mask < 0.5).expand_as(image)
    torch.testing.assert_close(out[keep], (image / 2 + 0.5).clamp(0, 1)[keep], rtol=0, atol=0)
    raw = _run(pipe, image, mask, output_type="pt")
    assert not torch.equal(raw[keep], out[keep])


# ------------------------------------------------------------------------------------------------- inputs
def test_word_tokens_exclude_bos_eos_and_padding(pipe):
    tok = pipe.tokenizer
    words = pipe.word_tokens(["a cat", ""], "cpu")
    n = len(tok("a cat").input_ids) - 2
    assert words[0, 1:1 + n].eq(1).all() and words[0].sum() == n and words[1].sum() == 0
    torch.testing.assert_close(word_token_mask(torch.tensor([[5, 1, 2, 6, 6]]), (5, 6)),
                               torch.tensor([[0.0, 1, 1, 0, 0]]))


@pytest.mark.parametrize("kwargs, field", [
    (dict(gamma=1.5), "gamma"), (dict(op_interval=0), "op_interval"), (dict(lr_schedule="cosine"), "lr_schedule"),
    (dict(mask_convention="white"), "mask_convention"), (dict(control_image=np.zeros((64, 64, 3))), "control_image"),
    (dict(ip_adapter_image=np.zeros((64, 64, 3))), "ip_adapter_image"),
])
def test_bad_options_are_one_line_input_errors(pipe, kwargs, field):
    from asuka.errors import InputError

    with pytest.raises(InputError, match=field):
        _run(pipe, **kwargs)


def test_size_must_be_a_multiple_of_64(pipe):
    from asuka.errors import InputError

    with pytest.raises(InputError, match="multiple of 64"):
        pipe(torch.zeros(1, 3, 64, 96), torch.zeros(1, 1, 64, 96), num_inference_steps=1)


def test_non_square_multiple_of_64(pipe):
    image = torch.rand(1, 3, 64, 128, generator=_gen(5)) * 2 - 1
    mask = torch.zeros(1, 1, 64, 128)
    mask[..., 8:40, 70:120] = 1
    out = _run(pipe, image, mask, output_type="pt", paste_back=True)
    assert out.shape == (1, 3, 64, 128) and torch.isfinite(out).all()
