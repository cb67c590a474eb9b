"""PriorAligner: shapes, both block types against independent references, save/load, checkpointing, errors."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from asuka.models.aligner import PriorAligner


def _seeded_aligner(**kwargs) -> PriorAligner:
    torch.manual_seed(0)
    return PriorAligner(**kwargs).eval()


def _randomize(module: torch.nn.Module, seed: int = 1) -> None:
    """Non-trivial weights everywhere (LayerNorm/RMSNorm scales included) so that every term is exercised."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            is_scale = name.endswith("scale") or ("norm" in name and name.endswith("weight"))
            p.copy_(torch.randn(p.shape, generator=g) * 0.2 + (1.0 if is_scale else 0.0))


@pytest.mark.parametrize("block_type", ["prenorm", "flux_single_stream"])
def test_output_shape_sd15(block_type):
    aligner = _seeded_aligner(block_type=block_type)
    out = aligner(torch.randn(2, 256, 512))
    assert out.shape == (2, 256, 768)
    assert len(aligner.blocks) == 4
    assert torch.isfinite(out).all()


def test_prenorm_block_matches_torch_transformer_layer():
    """The paper's default block equals torch's own pre-LN TransformerEncoderLayer (GELU, no dropout)."""
    dim, heads = 128, 2
    aligner = _seeded_aligner(cross_attention_dim=dim, num_blocks=1, head_dim=64)
    _randomize(aligner)
    block = aligner.blocks[0]
    ref = torch.nn.TransformerEncoderLayer(dim, heads, dim_feedforward=4 * dim, dropout=0.0, activation="gelu",
                                           layer_norm_eps=1e-6, batch_first=True, norm_first=True).eval()
    with torch.no_grad():
        ref.self_attn.in_proj_weight.copy_(block.qkv.weight)
        ref.self_attn.in_proj_bias.copy_(block.qkv.bias)
        ref.self_attn.out_proj.weight.copy_(block.proj.weight)
        ref.self_attn.out_proj.bias.copy_(block.proj.bias)
        for name in ("norm1", "norm2"):
            getattr(ref, name).weight.copy_(getattr(block, name).weight)
            getattr(ref, name).bias.copy_(getattr(block, name).bias)
        ref.linear1.weight.copy_(block.fc1.weight)
        ref.linear1.bias.copy_(block.fc1.bias)
        ref.linear2.weight.copy_(block.fc2.weight)
        ref.linear2.bias.copy_(block.fc2.bias)
    x = torch.randn(2, 16, dim)
    with torch.no_grad():
        torch.testing.assert_close(block(x), ref(x), rtol=1e-5, atol=1e-5)


def _flux_block_reference(block, x: torch.Tensor) -> torch.Tensor:
    """FLUX single-stream block written out by hand (no modulation, no RoPE), explicit softmax attention."""
    dim, heads = x.shape[-1], block.num_heads
    head_dim, mlp_dim = dim // heads, 4 * dim
    x_mod = (x - x.mean(-1, keepdim=True)) / torch.sqrt(x.var(-1, unbiased=False, keepdim=True) + 1e-6)
    h = x_mod @ block.linear1.weight.T + block.linear1.bias
    qkv, mlp = h[..., : 3 * dim], h[..., 3 * dim:]
    assert mlp.shape[-1] == mlp_dim
    b, n = x.shape[:2]
    qkv = qkv.reshape(b, n, 3, heads, head_dim).permute(2, 0, 3, 1, 4)  # K B H L D
    q, k, v = qkv[0], qkv[1], qkv[2]
    q = q / torch.sqrt(q.pow(2).mean(-1, keepdim=True) + 1e-6) * block.norm.query_norm.scale
    k = k / torch.sqrt(k.pow(2).mean(-1, keepdim=True) + 1e-6) * block.norm.key_norm.scale
    attn = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(head_dim), dim=-1) @ v
    attn = attn.permute(0, 2, 1, 3).reshape(b, n, dim)
    gelu_tanh = 0.5 * mlp * (1 + torch.tanh(math.sqrt(2 / math.pi) * (mlp + 0.044715 * mlp.pow(3))))
    out = torch.cat([attn, gelu_tanh], -1) @ block.linear2.weight.T + block.linear2.bias
    return x + out


def test_flux_single_stream_block_matches_hand_reference():
    aligner = _seeded_aligner(cross_attention_dim=128, num_blocks=1, block_type="flux_single_stream")
    _randomize(aligner)
    block = aligner.blocks[0]
    assert isinstance(block.pre_norm, torch.nn.LayerNorm) and not block.pre_norm.elementwise_affine
    x = torch.randn(2, 16, 128)
    with torch.no_grad():
        torch.testing.assert_close(block(x), _flux_block_reference(block, x), rtol=1e-5, atol=1e-5)


def test_full_forward_is_linear_blocks_layernorm():
    aligner = _seeded_aligner(cross_attention_dim=128, num_blocks=2, block_type="flux_single_stream")
    _randomize(aligner)
    f = torch.randn(1, 8, 512)
    with torch.no_grad():
        x = f @ aligner.proj_in.weight.T + aligner.proj_in.bias
        for block in aligner.blocks:
            x = _flux_block_reference(block, x)
        ref = F.layer_norm(x, (128,), aligner.norm_out.weight, aligner.norm_out.bias, 1e-5)
        torch.testing.assert_close(aligner(f), ref, rtol=1e-4, atol=1e-4)


def test_unused_modulation_is_optional_and_inert():
    plain = _seeded_aligner(block_type="flux_single_stream")
    with_mod = PriorAligner(block_type="flux_single_stream", keep_unused_modulation=True).eval()
    assert not any("modulation" in k for k in plain.state_dict())
    mod_keys = [k for k in with_mod.state_dict() if "modulation" in k]
    assert sorted(mod_keys) == sorted(f"blocks.{i}.modulation.lin.{p}" for i in range(4) for p in ("weight", "bias"))
    # The port's 768-wide module with its unused modulation: about 35.8 M parameters (the released asuka_alignment_clip.pt).
    assert abs(sum(p.numel() for p in with_mod.parameters()) / 1e6 - 35.8) < 0.1
    missing, unexpected = with_mod.load_state_dict(plain.state_dict(), strict=False)
    assert not unexpected and sorted(missing) == sorted(mod_keys)
    f = torch.randn(1, 256, 512)
    with torch.no_grad():
        torch.testing.assert_close(with_mod(f), plain(f), rtol=0, atol=0)


@pytest.mark.parametrize("block_type", ["prenorm", "flux_single_stream"])
def test_save_pretrained_round_trip(tmp_path, block_type):
    aligner = _seeded_aligner(cross_attention_dim=128, num_blocks=2, block_type=block_type)
    aligner.save_pretrained(tmp_path / "aligner")
    assert (tmp_path / "aligner" / "diffusion_pytorch_model.safetensors").is_file()
    loaded = PriorAligner.from_pretrained(tmp_path / "aligner").eval()
    assert loaded.config.block_type == block_type and loaded.config.cross_attention_dim == 128
    f = torch.randn(1, 256, 512)
    with torch.no_grad():
        torch.testing.assert_close(loaded(f), aligner(f), rtol=0, atol=0)


def test_gradient_checkpointing_gives_same_gradients():
    aligner = _seeded_aligner(cross_attention_dim=128, num_blocks=2)
    f = torch.randn(2, 16, 512)
    aligner(f).square().mean().backward()
    ref = [p.grad.clone() for p in aligner.parameters()]
    aligner.zero_grad()
    aligner.enable_gradient_checkpointing()
    assert aligner.gradient_checkpointing
    aligner(f).square().mean().backward()
    for g_ref, p in zip(ref, aligner.parameters()):
        torch.testing.assert_close(p.grad, g_ref, rtol=1e-5, atol=1e-6)


def test_bf16_forward():
    aligner = _seeded_aligner(cross_attention_dim=128, num_blocks=1, block_type="flux_single_stream").to(torch.bfloat16)
    out = aligner(torch.randn(1, 8, 512))  # float32 features are cast to the module's dtype
    assert out.dtype == torch.bfloat16 and torch.isfinite(out.float()).all()


def test_bad_arguments_raise_clear_errors():
    with pytest.raises(ValueError, match="block_type"):
        PriorAligner(block_type="cross")
    with pytest.raises(ValueError, match="head_dim"):
        PriorAligner(cross_attention_dim=100)
    with pytest.raises(ValueError, match="keep_unused_modulation"):
        PriorAligner(keep_unused_modulation=True)
    aligner = _seeded_aligner(cross_attention_dim=128, num_blocks=1)
    with pytest.raises(ValueError, match=r"\(B, N, 512\)"):
        aligner(torch.randn(1, 256, 768))


def _flux_port_sequential(dim: int = 128, blocks: int = 2) -> torch.nn.Sequential:
    """The FLUX port's layout (``get_single_stram_blk_asuka``), built from the same block class with modulation."""
    from asuka.models.aligner import FluxSingleStreamBlock

    torch.manual_seed(5)
    seq = torch.nn.Sequential(torch.nn.Linear(512, dim),
                              *[FluxSingleStreamBlock(dim, dim // 64, keep_unused_modulation=True) for _ in range(blocks)],
                              torch.nn.LayerNorm(dim))
    _randomize(seq, seed=6)
    return seq.eval()


def test_convert_flux_port_sequential_state_dict(tmp_path):
    from asuka.models.convert import aligner_from_asuka_flux

    seq = _flux_port_sequential()
    keys = set(seq.state_dict())
    assert {"0.weight", "1.linear1.weight", "1.norm.query_norm.scale", "2.modulation.lin.weight", "3.bias"} <= keys
    torch.save({f"module.{k}": v for k, v in seq.state_dict().items()}, tmp_path / "asuka_alignment.pt")
    aligner = aligner_from_asuka_flux(tmp_path / "asuka_alignment.pt")
    cfg = aligner.config
    assert (cfg.block_type, cfg.cross_attention_dim, cfg.num_blocks, cfg.mlp_ratio, cfg.keep_unused_modulation) == (
        "flux_single_stream", 128, 2, 4.0, True)
    f = torch.randn(2, 16, 512)
    with torch.no_grad():
        torch.testing.assert_close(aligner(f), seq(f), rtol=0, atol=0)


def test_convert_flux_port_rejects_other_layouts():
    from asuka.models.convert import StateDictMismatchError, aligner_from_asuka_flux

    state = _flux_port_sequential().state_dict()
    with pytest.raises(StateDictMismatchError, match="unexpected keys.*proj_in.weight"):
        aligner_from_asuka_flux({"proj_in.weight": torch.zeros(1), **state})
    del state["1.linear2.bias"]
    with pytest.raises(StateDictMismatchError, match="missing keys.*blocks.0.linear2.bias"):
        aligner_from_asuka_flux(state)
