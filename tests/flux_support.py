"""Test support for the ASUKA-FLUX tests: our models' weights written in the official (release) layouts, and
straightforward re-statements of the official modules (ASUKA-FLUX ``MAE/models_mae.py``,
``MAE/vision_transformer.py``, ``ldm/modules/diffusionmodules/asuka_decoder.py``) computed from those state dicts."""

from __future__ import annotations

import re

import torch
import torch.nn.functional as F


# ---------------------------------------------------------------------------------------------- layouts
def to_ldm_decoder(state: dict, levels: int) -> dict:
    """diffusers names -> the official LDM layout (the inverse of ``convert.convert_ldm_harmonizing_decoder``);
    quant convs are dropped (the FLUX AE has none)."""
    attention = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
    up = lambda m: str(levels - 1 - int(m.group(1)))  # noqa: E731
    out = {}
    for key, value in state.items():
        if key.startswith(("quant_conv", "post_quant_conv")):
            continue
        k = re.sub(r"^(encoder|decoder)\.down_blocks\.(\d+)\.resnets\.", r"\1.down.\2.block.", key)
        k = re.sub(r"^(encoder|decoder)\.down_blocks\.(\d+)\.downsamplers\.0\.", r"\1.down.\2.downsample.", k)
        k = re.sub(r"^decoder\.up_blocks\.(\d+)\.resnets\.", lambda m: f"decoder.up.{up(m)}.block.", k)
        k = re.sub(r"^decoder\.up_blocks\.(\d+)\.upsamplers\.0\.", lambda m: f"decoder.up.{up(m)}.upsample.", k)
        k = re.sub(r"^decoder\.up_blocks\.(\d+)\.attentions\.(\d+)\.(group_norm|to_q|to_k|to_v|to_out\.0)\.",
                   lambda m: f"decoder.up.{up(m)}.attn.{m.group(2)}.{attention[m.group(3)]}.", k)
        k = re.sub(r"^(encoder|decoder)\.mid_block\.resnets\.(\d)\.",
                   lambda m: f"{m.group(1)}.mid.block_{int(m.group(2)) + 1}.", k)
        k = re.sub(r"^(encoder|decoder)\.mid_block\.attentions\.0\.(group_norm|to_q|to_k|to_v|to_out\.0)\.",
                   lambda m: f"{m.group(1)}.mid.attn_{1}.{attention[m.group(2)]}.", k)
        k = re.sub(r"^(encoder|decoder)\.conv_norm_out\.", r"\1.norm_out.", k)
        k = k.replace("decoder.condition_encoder.layers.", "decoder.encoder.layers.")
        k = k.replace(".conv_shortcut.", ".nin_shortcut.")
        if re.search(r"\.(attn_1|attn\.\d+)\.(q|k|v|proj_out)\.weight$", k) and value.ndim == 2:
            value = value[:, :, None, None]
        out[k] = value
    return out


def to_sequential_head(head_state: dict, num_blocks: int) -> dict:
    """``PriorAligner`` names -> the port's ``nn.Sequential`` (``0.*`` Linear, ``1..N.*`` blocks, ``N+1.*`` LayerNorm)."""
    out = {}
    for key, value in head_state.items():
        k = re.sub(r"^proj_in\.", "0.", key)
        k = re.sub(r"^blocks\.(\d+)\.", lambda m: f"{int(m.group(1)) + 1}.", k)
        out[re.sub(r"^norm_out\.", f"{num_blocks + 1}.", k)] = value
    return out


# ---------------------------------------------------------------------------------------------- official MAE
def _vit_block(sd: dict, p: str, x: torch.Tensor, heads: int, key_mask=None, mask_decoder: bool = False):
    """``vision_transformer.Block`` with its ``Attention``: keys with ``key_mask == 1`` get -inf *unless*
    ``mask_decoder`` (then the mask only enters the returned score, which the features never use)."""
    y = F.layer_norm(x, x.shape[-1:], sd[p + "norm1.weight"], sd[p + "norm1.bias"], 1e-6)
    b, n, c = y.shape
    qkv = F.linear(y, sd[p + "attn.qkv.weight"], sd[p + "attn.qkv.bias"])
    q, k, v = qkv.reshape(b, n, 3, heads, c // heads).permute(2, 0, 3, 1, 4)
    scores = (q @ k.transpose(-2, -1)) * (c // heads) ** -0.5
    if key_mask is not None and not mask_decoder:
        scores = scores.masked_fill(key_mask == 1, float("-inf"))
    y = (scores.softmax(-1) @ v).transpose(1, 2).reshape(b, n, c)
    x = x + F.linear(y, sd[p + "attn.proj.weight"], sd[p + "attn.proj.bias"])
    y = F.layer_norm(x, x.shape[-1:], sd[p + "norm2.weight"], sd[p + "norm2.bias"], 1e-6)
    y = F.linear(F.gelu(F.linear(y, sd[p + "mlp.fc1.weight"], sd[p + "mlp.fc1.bias"])),
                 sd[p + "mlp.fc2.weight"], sd[p + "mlp.fc2.bias"])
    return x + y


def official_mae_features(sd: dict, imgs: torch.Tensor, mask: torch.Tensor, *, heads: int, decoder_heads: int,
                          depth: int, decoder_depth: int, patch: int = 16, decoder_layer: int = 6,
                          mask_concat: bool = False, mask_decoder: bool = False) -> torch.Tensor:
    """``MaskedAutoencoderViTFinetune.forward_return_feature`` + ``test_asuka_flux.py``'s NaN -> 0 (whole batch)."""
    x = F.conv2d(imgs, sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"], stride=patch)
    x = x.flatten(2).transpose(1, 2) + sd["pos_embed"]
    n, length, _ = x.shape
    s = int(length ** 0.5)
    area = F.interpolate(mask, size=[s, s], mode="area")
    touched = (area > 0).float().reshape(n, length)
    full = (area >= 1).float().reshape(n, 1, 1, length)
    for i in range(depth):
        x = _vit_block(sd, f"blocks.{i}.", x, heads, touched[:, None, None, :])
    x = F.layer_norm(x, x.shape[-1:], sd["norm.weight"], sd["norm.bias"], 1e-6)
    x = F.linear(x, sd["decoder_embed.weight"], sd["decoder_embed.bias"])
    embed = F.conv2d(torch.cat([imgs * (1 - mask), mask], 1), sd["decoder_patch_embed.proj.weight"],
                     sd["decoder_patch_embed.proj.bias"], stride=patch).flatten(2).transpose(1, 2)
    partial = touched[..., None] - (area.reshape(n, length, 1) >= 1).float()
    m = touched[..., None]
    x = x * (1 - m) + sd["mask_token"].repeat(n, length, 1) * m
    alpha = torch.clamp(sd["alpha"], 0.0, 1.0)
    x = x * (1 - partial) + (x * alpha + embed * (1 - alpha)) * partial
    x = x + sd["decoder_pos_embed"]
    feature = None
    for i in range(decoder_depth):
        if i == decoder_layer:
            feature = x
        x = _vit_block(sd, f"decoder_blocks.{i}.", x, decoder_heads, full if mask_decoder else None, mask_decoder)
    if mask_concat:
        feature = torch.cat([feature, touched[..., None]], dim=-1)
    if torch.isnan(feature).any():
        feature = torch.zeros_like(feature)
    return feature


# ---------------------------------------------------------------------------------------------- official decoder
def _gn(sd, p, x, groups):
    return F.group_norm(x, groups, sd[p + "weight"], sd[p + "bias"], 1e-6)


def _resnet(sd: dict, p: str, x: torch.Tensor, groups: int) -> torch.Tensor:
    h = F.conv2d(F.silu(_gn(sd, p + "norm1.", x, groups)), sd[p + "conv1.weight"], sd[p + "conv1.bias"], padding=1)
    h = F.conv2d(F.silu(_gn(sd, p + "norm2.", h, groups)), sd[p + "conv2.weight"], sd[p + "conv2.bias"], padding=1)
    if p + "nin_shortcut.weight" in sd:
        x = F.conv2d(x, sd[p + "nin_shortcut.weight"], sd[p + "nin_shortcut.bias"])
    return x + h


def _attn(sd: dict, p: str, x: torch.Tensor, groups: int) -> torch.Tensor:
    h = _gn(sd, p + "norm.", x, groups)
    q, k, v = (F.conv2d(h, sd[p + f"{n}.weight"], sd[p + f"{n}.bias"]) for n in "qkv")
    b, c, hh, ww = q.shape
    w = torch.bmm(q.reshape(b, c, -1).permute(0, 2, 1), k.reshape(b, c, -1)) * c ** -0.5
    out = torch.bmm(v.reshape(b, c, -1), w.softmax(dim=2).permute(0, 2, 1)).reshape(b, c, hh, ww)
    return x + F.conv2d(out, sd[p + "proj_out.weight"], sd[p + "proj_out.bias"])


def official_decoder(sd: dict, z: torch.Tensor, image: torch.Tensor, mask: torch.Tensor, *, levels: int,
                     num_res_blocks: int, groups: int, gate_conv: bool, tanh_out: bool) -> torch.Tensor:
    """``asuka_decoder.Decoder.forward(z, image, mask)`` (concat_mask=True, downsample_layer='conv') from an LDM
    state dict with ``decoder.`` keys."""
    d = {k[len("decoder."):]: v for k, v in sd.items() if k.startswith("decoder.")}
    h = F.conv2d(z, d["conv_in.weight"], d["conv_in.bias"], padding=1)
    h = _resnet(d, "mid.block_1.", h, groups)
    h = _attn(d, "mid.attn_1.", h, groups)
    h = _resnet(d, "mid.block_2.", h, groups)
    x = torch.cat([(1 - mask) * image, mask], 1)
    features = {}
    n_layers = len({k.split(".")[2] for k in d if k.startswith("encoder.layers.")})
    for l in range(n_layers):
        stride, pad = (1, 1) if l < 2 else (2, 1)
        x = F.conv2d(x, d[f"encoder.layers.{l}.weight"], d[f"encoder.layers.{l}.bias"], stride=stride, padding=pad)
        if gate_conv:
            x, gate = torch.split(x, x.shape[1] // 2, dim=1)
            x = x * torch.clamp(1 - torch.tanh(gate), 0, 1)
        features[str(tuple(x.shape))] = x
        x = F.relu(x)
    for i in reversed(range(levels)):
        m = F.interpolate(mask, size=h.shape[-2:], mode="area")
        m[m > 0] = 1
        h = h * m + features[str(tuple(h.shape))] * (1 - m)
        for j in range(num_res_blocks + 1):
            h = _resnet(d, f"up.{i}.block.{j}.", h, groups)
            if f"up.{i}.attn.{j}.q.weight" in d:
                h = _attn(d, f"up.{i}.attn.{j}.", h, groups)
        if i != 0:
            h = F.interpolate(h, scale_factor=2.0, mode="nearest")
            h = F.conv2d(h, d[f"up.{i}.upsample.conv.weight"], d[f"up.{i}.upsample.conv.bias"], padding=1)
    h = h * mask + features[str(tuple(h.shape))] * (1 - mask)
    h = F.conv2d(F.silu(_gn(d, "norm_out.", h, groups)), d["conv_out.weight"], d["conv_out.bias"], padding=1)
    return torch.tanh(h) if tanh_out else h
