"""Tiny, seeded, *real* FLUX.1-Fill components for tests and demos (no downloads).

Every builder returns the genuine diffusers / transformers class with FLUX.1-Fill-dev's layout at a tiny width:

* ``FluxTransformer2DModel`` with ``in_channels=384`` as Fill (64 packed latent channels + 64 packed masked-image
  latent channels + 256 packed 8×8 mask channels), ``out_channels=64``, distilled guidance embedding, RoPE over
  (text/image id, row, column) axes;
* the FLUX ``AutoencoderKL``: 4 levels (factor 8), 16 latent channels, no quant convs, ``scaling_factor`` 0.3611 and
  ``shift_factor`` 0.1159;
* ``FlowMatchEulerDiscreteScheduler`` with FLUX's resolution-dependent shift (``use_dynamic_shifting``, base/max
  shift 0.5/1.15 over 256..4096 image tokens);
* a CLIP text encoder (pooled output = the transformer's ``pooled_projections``) and a T5 encoder (its hidden states =
  ``encoder_hidden_states``) with tokenizers generated locally (CLIP's byte-level BPE from :mod:`asuka.models.tiny`,
  a T5 SentencePiece-style Unigram vocabulary built with ``tokenizers``).

The pooled width (64) and the T5 width (128) differ on purpose, so a swapped head or slot fails loudly in tests.
:func:`save_tiny_flux_fill` writes a complete ``FluxFillPipeline`` folder that diffusers loads with
``from_pretrained``.
"""

from __future__ import annotations

from pathlib import Path

from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
from transformers import T5Config, T5EncoderModel

from asuka.models.seeding import seeded
from asuka.models.tiny import cached_pipeline_dir, tiny_text_encoder, tiny_tokenizer

TINY_POOLED_DIM = 64  # CLIP pooled width (FLUX: 768); multiples of the heads' head width 64
TINY_TEXT_DIM = 128  # T5 width = the transformer's joint_attention_dim (FLUX: 4096)
FLUX_SCALING_FACTOR = 0.3611
FLUX_SHIFT_FACTOR = 0.1159
FLUX_FILL_IN_CHANNELS = 384

# FLUX.1's scheduler config (black-forest-labs/FLUX.1-Fill-dev scheduler/scheduler_config.json).
FLUX_SCHEDULE = dict(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                     base_image_seq_len=256, max_image_seq_len=4096)

_T5_WORDS = ("the", "a", "of", "photo", "empty", "scene", "with", "and", "in", "on", "background")


def tiny_flux_transformer(seed: int = 0) -> FluxTransformer2DModel:
    """FLUX.1-Fill transformer layout (in 384, out 64, guidance embedding) with 1 double + 1 single block, 2 heads of 16."""
    with seeded(seed):
        return FluxTransformer2DModel(
            patch_size=1, in_channels=FLUX_FILL_IN_CHANNELS, out_channels=64, num_layers=1, num_single_layers=1,
            attention_head_dim=16, num_attention_heads=2, joint_attention_dim=TINY_TEXT_DIM,
            pooled_projection_dim=TINY_POOLED_DIM, guidance_embeds=True, axes_dims_rope=(4, 6, 6)).eval()


def tiny_flux_vae(seed: int = 0) -> AutoencoderKL:
    """The FLUX AE layout (4 levels, 16 latent channels, no quant convs, FLUX's scale and shift) at width (8, 16, 32, 32)."""
    with seeded(seed):
        return AutoencoderKL(
            in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(8, 16, 32, 32), layers_per_block=2,
            latent_channels=16, norm_num_groups=4, sample_size=64, scaling_factor=FLUX_SCALING_FACTOR,
            shift_factor=FLUX_SHIFT_FACTOR, use_quant_conv=False, use_post_quant_conv=False).eval()


def flux_scheduler() -> FlowMatchEulerDiscreteScheduler:
    """FLUX.1's flow-matching Euler scheduler with the resolution-dependent (dynamic) shift."""
    return FlowMatchEulerDiscreteScheduler(**FLUX_SCHEDULE)


def write_tiny_t5_tokenizer(path: str | Path):
    """Write and load a T5 tokenizer (``<pad>`` 0, ``</s>`` 1, ``<unk>`` 2, a Unigram vocabulary of characters and a few
    words, Metaspace pre-tokenizer, ``</s>`` appended) generated locally with ``tokenizers``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import T5TokenizerFast

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -1.0)]
    vocab += [(c, -2.0) for c in "abcdefghijklmnopqrstuvwxyz0123456789.,!?'-"]
    vocab += [("\u2581" + word, -1.5) for word in _T5_WORDS]
    tokenizer = Tokenizer(models.Unigram(vocab, unk_id=2))
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace()
    tokenizer.decoder = decoders.Metaspace()
    tokenizer.post_processor = processors.TemplateProcessing(single="$A </s>", pair="$A </s> $B </s>",
                                                             special_tokens=[("</s>", 1)])
    tokenizer.save(str(path / "tokenizer.json"))
    t5 = T5TokenizerFast(tokenizer_file=str(path / "tokenizer.json"), extra_ids=0, pad_token="<pad>",
                         eos_token="</s>", unk_token="<unk>", model_max_length=512)
    t5.save_pretrained(path)
    return T5TokenizerFast.from_pretrained(path)


def tiny_t5_encoder(vocab_size: int, seed: int = 0) -> T5EncoderModel:
    """A 2-layer ``T5EncoderModel`` of width 128 (= the tiny transformer's ``joint_attention_dim``)."""
    config = T5Config(vocab_size=vocab_size, d_model=TINY_TEXT_DIM, d_kv=32, d_ff=256, num_layers=2, num_heads=4,
                      relative_attention_num_buckets=8, feed_forward_proj="gated-gelu", pad_token_id=0,
                      eos_token_id=1, decoder_start_token_id=0)
    with seeded(seed):
        return T5EncoderModel(config).eval()


def tiny_flux_fill_components(seed: int = 0, workdir: str | Path | None = None) -> dict:
    """All components of a diffusers ``FluxFillPipeline``, tiny and seeded (tokenizers written under ``workdir``)."""
    import tempfile

    root = Path(workdir) if workdir is not None else Path(tempfile.mkdtemp(prefix="asuka-tiny-flux-"))
    tokenizer = tiny_tokenizer(root / "tokenizer")
    tokenizer_2 = write_tiny_t5_tokenizer(root / "tokenizer_2")
    return dict(
        scheduler=flux_scheduler(),
        vae=tiny_flux_vae(seed),
        text_encoder=tiny_text_encoder(TINY_POOLED_DIM, len(tokenizer), seed),  # pooled width 64 -> pooled_projections
        tokenizer=tokenizer,
        text_encoder_2=tiny_t5_encoder(len(tokenizer_2), seed),
        tokenizer_2=tokenizer_2,
        transformer=tiny_flux_transformer(seed),
    )


def save_tiny_flux_fill(path: str | Path, seed: int = 0) -> Path:
    """Write a complete tiny ``FluxFillPipeline`` folder (``save_pretrained``, safetensors) that diffusers loads."""
    import tempfile

    from diffusers import FluxFillPipeline

    path = Path(path)
    with tempfile.TemporaryDirectory(prefix="asuka-tiny-flux-tok-") as workdir:
        FluxFillPipeline(**tiny_flux_fill_components(seed, workdir)).save_pretrained(path, safe_serialization=True)
    return path


def default_tiny_flux_fill_dir() -> Path:
    """The tiny FLUX.1-Fill folder used by demos and tests, written once to the cache folder (``tiny-flux-fill``)."""
    return cached_pipeline_dir("tiny-flux-fill", save_tiny_flux_fill)
