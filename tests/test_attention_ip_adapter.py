"""Controls on IP-Adapter layers keep the image branch; tiny IP-Adapter files load through diffusers' real loader."""

from __future__ import annotations

import pytest
import torch
from diffusers import StableDiffusionInpaintPipeline
from diffusers.models.attention_processor import IPAdapterAttnProcessor2_0
from diffusers.models.embeddings import ImageProjection, IPAdapterPlusImageProjection
from PIL import Image

from asuka.attention import AttentionControl, AttentionController, AttentionStore, LayerTable, Read
from asuka.models.tiny_ip_adapter import load_tiny_ip_adapter, save_tiny_ip_adapter

LATENT = (8, 8)


@pytest.fixture(scope="module")
def ip_folder(tiny_inpaint_dir, tmp_path_factory):
    pipe = StableDiffusionInpaintPipeline.from_pretrained(tiny_inpaint_dir, safety_checker=None,
                                                          requires_safety_checker=False)
    return save_tiny_ip_adapter(tmp_path_factory.mktemp("tiny-ip-adapter"), pipe.unet)


def _pipe(tiny_inpaint_dir, ip_folder, variant):
    pipe = StableDiffusionInpaintPipeline.from_pretrained(tiny_inpaint_dir, safety_checker=None,
                                                          requires_safety_checker=False)
    load_tiny_ip_adapter(pipe, ip_folder, variant)
    pipe.unet.requires_grad_(False)
    return pipe


def _unet_inputs(pipe):
    g = torch.Generator().manual_seed(0)
    image = Image.fromarray((torch.rand(40, 40, 3, generator=g) * 255).byte().numpy())
    embeds = pipe.prepare_ip_adapter_image_embeds(image, None, torch.device("cpu"), 1, True)
    sample = torch.randn(2, 9, *LATENT, generator=g)
    text = torch.randn(2, 7, pipe.unet.config.cross_attention_dim, generator=g)
    return sample, text, {"image_embeds": embeds}


def _run(unet, sample, text, added):
    return unet(sample, 400, encoder_hidden_states=text, added_cond_kwargs=added).sample


@pytest.mark.parametrize("variant, projection", [("ip-adapter", ImageProjection),
                                                 ("ip-adapter-plus", IPAdapterPlusImageProjection)])
def test_tiny_ip_adapter_files_load_through_the_real_loader(tiny_inpaint_dir, ip_folder, variant, projection):
    pipe = _pipe(tiny_inpaint_dir, ip_folder, variant)
    assert isinstance(pipe.unet.encoder_hid_proj.image_projection_layers[0], projection)
    assert len(LayerTable(pipe.unet)) == 32  # the Plus resampler's own Attention modules are not UNet layers
    cross = [p for name, p in pipe.unet.attn_processors.items() if name.endswith("attn2.processor")]
    assert len(cross) == 16 and all(isinstance(p, IPAdapterAttnProcessor2_0) for p in cross)
    sample, text, added = _unet_inputs(pipe)
    with_image = _run(pipe.unet, sample, text, added)
    pipe.set_ip_adapter_scale(0.0)
    assert (with_image - _run(pipe.unet, sample, text, added)).abs().max() > 1e-3  # the image branch matters


class Bias(AttentionControl):
    def score_bias(self, call):
        bias = torch.zeros(call.key.shape[2])
        bias[0] = 2.0
        return bias


def test_controls_on_ip_adapter_layers_keep_the_image_branch(tiny_inpaint_dir, ip_folder):
    pipe = _pipe(tiny_inpaint_dir, ip_folder, "ip-adapter")
    unet = pipe.unet
    sample, text, added = _unet_inputs(pipe)
    plain = _run(unet, sample, text, added)
    before = dict(unet.attn_processors)

    controller = AttentionController(unet)
    store = controller.add(AttentionStore(Read("probs", batch="all")), controller.layers.select(kind="cross"))
    with controller:
        params = {id(p) for p in unet.parameters()}
        assert all(id(p) in params for proc in before.values() for p in getattr(proc, "parameters", list)())
        assert torch.equal(_run(unet, sample, text, added), plain)  # reading only: bit for bit
    assert len(store.maps) == 16 and store.maps[0].shape[-1] == 7  # text keys only, image tokens not mixed in

    # IP-Adapter masks (cross_attention_kwargs) still reach the image branch through the installed processors
    region = torch.zeros(1, 1, 64, 64)
    region[..., :, :32] = 1
    masked = {"ip_adapter_masks": [region]}
    plain_masked = unet(sample, 400, encoder_hidden_states=text, added_cond_kwargs=added,
                        cross_attention_kwargs=masked).sample
    assert (plain_masked - plain).abs().max() > 1e-3
    with controller:
        out = unet(sample, 400, encoder_hidden_states=text, added_cond_kwargs=added, cross_attention_kwargs=masked).sample
        assert torch.equal(out, plain_masked)

    layer = controller.layers.select(kind="cross", levels=1)[0]
    seen = {}
    handle = layer.module.register_forward_hook(
        lambda m, a, kw, out: seen.update(x=a[0], ctx=kw["encoder_hidden_states"], out=out), with_kwargs=True)
    edited = AttentionController(unet)
    edited.add(Bias(), layer)
    try:
        with edited:
            _run(unet, sample, text, added)
    finally:
        handle.remove()
    assert all(unet.attn_processors[name] is proc for name, proc in before.items())

    attn, ip = layer.module, before[layer.name + ".processor"]
    text_states, (image_states,) = seen["ctx"]
    heads = attn.heads

    def split(t):
        return t.reshape(t.shape[0], -1, heads, t.shape[-1] // heads).transpose(1, 2)

    q, k, v = split(attn.to_q(seen["x"])), split(attn.to_k(text_states)), split(attn.to_v(text_states))
    bias = torch.zeros(k.shape[2])
    bias[0] = 2.0
    text_out = torch.softmax(q @ k.transpose(-1, -2) * attn.scale + bias, -1) @ v
    ik, iv = split(ip.to_k_ip[0](image_states)), split(ip.to_v_ip[0](image_states))
    image_out = torch.softmax(q @ ik.transpose(-1, -2) * attn.scale, -1) @ iv
    merge = lambda o: o.transpose(1, 2).reshape(o.shape[0], o.shape[2], -1)  # noqa: E731
    ref = attn.to_out[0](merge(text_out) + ip.scale[0] * merge(image_out))
    torch.testing.assert_close(seen["out"], ref, atol=1e-5, rtol=0)
    assert merge(image_out).abs().max() > 1e-2
