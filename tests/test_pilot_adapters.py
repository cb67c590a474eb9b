"""PILOT with adapters and personalised weights on tiny real components: ControlNet (gradients flow through it),
T2I-Adapter and IP-Adapter (conditional half in the gradient pass), LoRA, and a harmonizing decoder as ``vae=``."""

from __future__ import annotations

import torch

from asuka.pipelines.pilot.pipeline import PilotInpaintPipeline

SIZE = 64


def _load(sd_dir, **components):
    pipe = PilotInpaintPipeline.from_pretrained(sd_dir, **components)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _inputs():
    g = torch.Generator().manual_seed(0)
    image = torch.rand(1, 3, SIZE, SIZE, generator=g) * 2 - 1
    mask = torch.zeros(1, 1, SIZE, SIZE)
    mask[..., 16:48, 8:40] = 1
    condition = torch.rand(1, 3, SIZE, SIZE, generator=g) * 2 - 1
    return image, mask, condition


def _run(pipe, **kw):
    image, mask, _ = _inputs()
    kw = {"prompt": "a cat", "num_inference_steps": 2, "op_interval": 1, "num_gradient_ops": 1,
          "output_type": "latent", **kw}
    return pipe(image, mask, generator=torch.Generator().manual_seed(0), **kw).images


def _record_batches(module, log):
    """Forward hook logging (grad enabled, batch size, whether the output carries a graph)."""
    def hook(m, args, kwargs, out):
        first = out[0][0] if isinstance(out, tuple) else out[0]
        sample = args[0] if args else kwargs.get("sample", kwargs.get("x"))
        log.append((torch.is_grad_enabled(), sample.shape[0], first.requires_grad))
    return module.register_forward_hook(hook, with_kwargs=True)


def test_controlnet_runs_in_both_passes_and_carries_the_gradient(sd_dir, tmp_path):
    from diffusers import ControlNetModel

    from asuka.models.tiny_adapters import save_tiny_controlnet

    controlnet = ControlNetModel.from_pretrained(save_tiny_controlnet(tmp_path / "cn"))
    pipe = _load(sd_dir, controlnet=controlnet)
    _, _, condition = _inputs()
    log = []
    hook = _record_batches(pipe.controlnet, log)
    try:
        with_control = _run(pipe, control_image=condition)
    finally:
        hook.remove()
    # 2 steps, op_interval 1, K = 1: [grad pass (cond half, graph through ControlNet), guided pass (CFG batch)] x 2
    assert log == [(True, 1, True), (False, 2, False)] * 2
    assert all(p.grad is None for p in pipe.controlnet.parameters())
    weaker = _run(pipe, control_image=condition, controlnet_conditioning_scale=0.0)
    assert not torch.allclose(with_control, weaker)


def test_t2i_adapter_gets_its_conditional_half_in_the_gradient_pass(sd_dir, tmp_path):
    from diffusers import T2IAdapter

    from asuka.models.tiny_adapters import save_tiny_t2i_adapter

    adapter = T2IAdapter.from_pretrained(save_tiny_t2i_adapter(tmp_path / "t2i"))
    pipe = _load(sd_dir, adapter=adapter)
    _, _, condition = _inputs()
    seen = []

    def hook(m, args, kwargs):
        states = kwargs.get("down_intrablock_additional_residuals")
        seen.append((args[0].shape[0], None if states is None else states[0].shape[0]))

    handle = pipe.unet.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        out = _run(pipe, adapter_image=condition)
    finally:
        handle.remove()
    assert seen == [(1, 1), (2, 2)] * 2
    assert not torch.allclose(out, _run(pipe, adapter_image=condition, adapter_conditioning_scale=0.0))


def test_lora_through_diffusers_loader_changes_the_result(sd_dir, tmp_path):
    from asuka.models.tiny_adapters import save_tiny_lora

    pipe = _load(sd_dir)
    base = _run(pipe)
    pipe.load_lora_weights(save_tiny_lora(tmp_path / "lora"), adapter_name="tiny")
    lora = _run(pipe)
    assert not torch.allclose(base, lora)
    pipe.set_adapters("tiny", adapter_weights=0.0)
    torch.testing.assert_close(_run(pipe), base, rtol=1e-5, atol=1e-5)


def test_harmonizing_decoder_decodes_with_image_and_mask(sd_dir):
    from diffusers import AutoencoderKL

    from asuka.models.decoder import HarmonizingDecoderKL

    decoder = HarmonizingDecoderKL.from_vae(AutoencoderKL.from_pretrained(sd_dir, subfolder="vae")).eval()
    pipe = _load(sd_dir, vae=decoder)
    image, mask, _ = _inputs()
    calls = []
    handle = decoder.decoder.register_forward_pre_hook(lambda m, a, k: calls.append(k.get("image") is not None
                                                                                     or len(a) > 2),
                                                       with_kwargs=True)
    try:
        out = pipe(image, mask, prompt="a cat", num_inference_steps=2, num_gradient_ops=1, op_interval=1,
                   generator=torch.Generator().manual_seed(0), output_type="pt").images
    finally:
        handle.remove()
    assert calls == [True] and out.shape == (1, 3, SIZE, SIZE)


def test_ip_adapter_is_wrapped_not_dropped_and_its_image_branch_acts_under_sbc(sd_dir, tmp_path):
    from diffusers.models.attention_processor import IPAdapterAttnProcessor2_0

    from asuka.attention import AttentionController
    from asuka.models.tiny_ip_adapter import load_tiny_ip_adapter, save_tiny_ip_adapter
    from asuka.pipelines.pilot import controls as ctl
    from asuka.pipelines.pilot.objective import latent_hole_mask

    pipe = _load(sd_dir)
    load_tiny_ip_adapter(pipe, save_tiny_ip_adapter(tmp_path / "ipa", pipe.unet))
    from asuka.pipelines._common import to_pil

    reference = to_pil(_inputs()[2])[0]  # as diffusers: PIL/numpy go through the CLIP image processor
    seen = []
    handle = pipe.unet.register_forward_pre_hook(
        lambda m, a, k: seen.append((a[0].shape[0], k["added_cond_kwargs"]["image_embeds"][0].shape[0])),
        with_kwargs=True)
    try:
        pipe.set_ip_adapter_scale(0.6)
        with_image = _run(pipe, ip_adapter_image=reference)
    finally:
        handle.remove()
    assert seen == [(1, 1), (2, 2)] * 2  # the gradient pass gets the conditional image embeddings only
    assert all(isinstance(p, IPAdapterAttnProcessor2_0) for n, p in pipe.unet.attn_processors.items()
               if n.endswith("attn2.processor"))  # restored after the call
    pipe.set_ip_adapter_scale(0.0)
    assert not torch.allclose(with_image, _run(pipe, ip_adapter_image=reference))

    # SBC masks the text attention only: background rows still receive the image branch
    image, mask, _ = _inputs()
    embeds, _ = pipe.encode_prompt(["a cat"], "cpu", 1, False)
    image_embeds = pipe.prepare_ip_adapter_image_embeds(reference, None, "cpu", 1, False)
    hole = latent_hole_mask(mask, (SIZE // 8, SIZE // 8))
    z = torch.randn(1, 4, SIZE // 8, SIZE // 8, generator=torch.Generator().manual_seed(1))
    outputs = {}
    for scale in (0.0, 0.6):
        pipe.set_ip_adapter_scale(scale)
        controller = AttentionController(pipe.unet)
        cross = controller.layers.select(kind="cross")
        controller.add(ctl.BoundaryControl(ctl.hole_token_masks(hole)), cross)
        layer = cross[0]
        handle = layer.module.to_out[0].register_forward_pre_hook(lambda m, a: outputs.update({scale: a[0]}))
        try:
            with controller, torch.no_grad():
                controller.state.phase = ctl.GUIDED_PHASE
                pipe.unet(z, 500, encoder_hidden_states=embeds, added_cond_kwargs={"image_embeds": image_embeds})
        finally:
            handle.remove()
    background = ctl.hole_token_masks(hole).at(layer.grid((SIZE // 8, SIZE // 8)))[0] == 0
    assert not torch.allclose(outputs[0.6][0, background], outputs[0.0][0, background])
