"""Tiny, seeded, *real* Stable Diffusion components for tests and demos (no downloads).

Every builder returns the genuine diffusers / transformers class with Stable Diffusion 1.5's exact
block layout (4 down blocks, 3 with cross-attention; a mid block; 4 up blocks; 2 layers per down
block and 3 per up block; a VAE with 4 levels, i.e. downsampling factor 8, and 4 latent channels)
at a tiny width. The UNet therefore has SD's 16 self-attention (``attn1``) and 16 cross-attention
(``attn2``) layers at SD's relative resolutions (latent/1, /2, /4 and the /8 mid block), which is
what the training-free methods hook into.

``sd15_unet`` / ``sd15_vae`` / ``sd15_text_encoder`` build the same classes at SD-1.5's real widths
with random weights, for benchmarks.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable

from diffusers import AutoencoderKL, DDIMScheduler, DDPMScheduler, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from asuka.models.seeding import seeded

TINY_CROSS_ATTENTION_DIM = 32
SD15_CROSS_ATTENTION_DIM = 768
SD15_SCALING_FACTOR = 0.18215
TOKENIZER_MAX_LENGTH = 77

# SD-1.5's noise schedule (v1-inference.yaml): scaled_linear from 0.00085 to 0.012 over 1000 steps.
SD15_SCHEDULE = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
)

_DOWN_BLOCKS = ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D")
_UP_BLOCKS = ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D")
_VAE_DOWN = ("DownEncoderBlock2D",) * 4
_VAE_UP = ("UpDecoderBlock2D",) * 4


def _unet(widths: tuple[int, ...], groups: int, heads: int, in_channels: int, cross_attention_dim: int,
          sample_size: int) -> UNet2DConditionModel:
    return UNet2DConditionModel(
        sample_size=sample_size,
        in_channels=in_channels,
        out_channels=4,
        down_block_types=_DOWN_BLOCKS,
        up_block_types=_UP_BLOCKS,
        block_out_channels=widths,
        layers_per_block=2,
        norm_num_groups=groups,
        attention_head_dim=heads,  # diffusers' historical name: SD-1.5 passes the number of heads here
        cross_attention_dim=cross_attention_dim,
    )


def tiny_unet(in_channels: int = 9, cross_attention_dim: int = TINY_CROSS_ATTENTION_DIM, seed: int = 0,
              sample_size: int = 8) -> UNet2DConditionModel:
    """SD-1.5 UNet layout at width (32, 32, 64, 64). ``in_channels`` 9 = inpainting, 4 = text-to-image."""
    with seeded(seed):
        return _unet((32, 32, 64, 64), 8, 2, in_channels, cross_attention_dim, sample_size).eval()


def sd15_unet(in_channels: int = 9, seed: int = 0) -> UNet2DConditionModel:
    """SD-1.5-sized UNet (about 860M parameters) with random weights, for benchmarks."""
    with seeded(seed):
        return _unet((320, 640, 1280, 1280), 32, 8, in_channels, SD15_CROSS_ATTENTION_DIM, 64).eval()


def _vae(widths: tuple[int, ...], groups: int, sample_size: int) -> AutoencoderKL:
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=_VAE_DOWN,
        up_block_types=_VAE_UP,
        block_out_channels=widths,
        layers_per_block=2,
        latent_channels=4,
        norm_num_groups=groups,
        sample_size=sample_size,
        scaling_factor=SD15_SCALING_FACTOR,
    )


def tiny_vae(seed: int = 0) -> AutoencoderKL:
    """SD's VAE layout (4 levels, factor 8, 4 latent channels, scaling 0.18215) at width (8, 16, 32, 32)."""
    with seeded(seed):
        return _vae((8, 16, 32, 32), 4, 64).eval()


def sd15_vae(seed: int = 0) -> AutoencoderKL:
    """SD-1.5-sized VAE (widths 128/256/512/512) with random weights, for benchmarks."""
    with seeded(seed):
        return _vae((128, 256, 512, 512), 32, 512).eval()


def _byte_unicode() -> list[str]:
    """GPT-2 / CLIP byte-to-unicode table: 256 printable characters, one per byte value."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = [], 0
    for b in range(256):
        if b in keep:
            chars.append(chr(b))
        else:
            chars.append(chr(256 + extra))
            extra += 1
    return chars


# A few merges so that real words are split into more than single characters, like CLIP's BPE.
_MERGES = ["t h", "th e</w>", "a n", "i n", "e r</w>", "o n</w>", "a t</w>", "e n", "o r</w>", "s t", "a r", "in g</w>"]


def write_tiny_tokenizer(path: str | Path) -> Path:
    """Write a byte-level CLIP BPE tokenizer folder (vocab, merges, config) generated locally."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    chars = _byte_unicode()
    tokens = chars + [c + "</w>" for c in chars] + [m.replace(" ", "") for m in _MERGES]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {tok: i for i, tok in enumerate(dict.fromkeys(tokens))}
    (path / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (path / "merges.txt").write_text("#version: 0.2\n" + "\n".join(_MERGES) + "\n", encoding="utf-8")
    (path / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "CLIPTokenizer", "model_max_length": TOKENIZER_MAX_LENGTH,
        "bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>"}), encoding="utf-8")
    return path


def tiny_tokenizer(path: str | Path | None = None) -> CLIPTokenizer:
    """A real ``CLIPTokenizer`` (max length 77) over the locally generated vocabulary."""
    if path is None:
        path = Path(tempfile.mkdtemp(prefix="asuka-tiny-tokenizer-"))
    path = write_tiny_tokenizer(path)
    return CLIPTokenizer.from_pretrained(path)


def tiny_text_encoder(hidden_size: int = TINY_CROSS_ATTENTION_DIM, vocab_size: int = 600, seed: int = 0) -> CLIPTextModel:
    """A real ``CLIPTextModel`` (2 layers) whose hidden size matches the tiny UNet's cross-attention."""
    config = CLIPTextConfig(
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_attention_heads=4,
        num_hidden_layers=2,
        vocab_size=vocab_size,
        max_position_embeddings=TOKENIZER_MAX_LENGTH,
        projection_dim=hidden_size,
        bos_token_id=vocab_size - 2,
        eos_token_id=vocab_size - 1,
        pad_token_id=vocab_size - 1,
    )
    with seeded(seed):
        return CLIPTextModel(config).eval()


def sd15_text_encoder(seed: int = 0) -> CLIPTextModel:
    """CLIP ViT-L/14 text tower (SD-1.5's text encoder) with random weights, for benchmarks."""
    config = CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_attention_heads=12, num_hidden_layers=12,
                            vocab_size=49408, max_position_embeddings=77, projection_dim=768, hidden_act="quick_gelu")
    with seeded(seed):
        return CLIPTextModel(config).eval()


def ddim_scheduler() -> DDIMScheduler:
    """DDIM with SD-1.5's schedule and its inference settings (no clipping, steps_offset 1)."""
    return DDIMScheduler(**SD15_SCHEDULE, clip_sample=False, set_alpha_to_one=False, steps_offset=1)


def ddpm_scheduler() -> DDPMScheduler:
    """DDPM with SD-1.5's training schedule (epsilon prediction)."""
    return DDPMScheduler(**SD15_SCHEDULE, clip_sample=False, steps_offset=1)


def tiny_sd_components(in_channels: int = 9, cross_attention_dim: int = TINY_CROSS_ATTENTION_DIM,
                       seed: int = 0) -> dict:
    """All components of a diffusers Stable Diffusion pipeline, tiny and seeded."""
    tokenizer = tiny_tokenizer()
    return dict(
        vae=tiny_vae(seed),
        unet=tiny_unet(in_channels, cross_attention_dim, seed),
        text_encoder=tiny_text_encoder(cross_attention_dim, vocab_size=len(tokenizer), seed=seed),
        tokenizer=tokenizer,
        scheduler=ddim_scheduler(),
        safety_checker=None,
        feature_extractor=None,
    )


def _save(pipeline_cls, path: str | Path, in_channels: int, cross_attention_dim: int, seed: int) -> Path:
    path = Path(path)
    pipe = pipeline_cls(**tiny_sd_components(in_channels, cross_attention_dim, seed), requires_safety_checker=False)
    pipe.save_pretrained(path, safe_serialization=True)
    return path


def save_tiny_sd_inpaint(path: str | Path, cross_attention_dim: int = TINY_CROSS_ATTENTION_DIM, seed: int = 0) -> Path:
    """Write a complete ``StableDiffusionInpaintPipeline`` folder (9-channel UNet) that diffusers loads."""
    from diffusers import StableDiffusionInpaintPipeline

    return _save(StableDiffusionInpaintPipeline, path, 9, cross_attention_dim, seed)


def save_tiny_sd(path: str | Path, cross_attention_dim: int = TINY_CROSS_ATTENTION_DIM, seed: int = 0) -> Path:
    """Write a complete text-to-image ``StableDiffusionPipeline`` folder (4-channel UNet)."""
    from diffusers import StableDiffusionPipeline

    return _save(StableDiffusionPipeline, path, 4, cross_attention_dim, seed)


def cached_pipeline_dir(name: str, write: Callable[[Path], object]) -> Path:
    """A demo pipeline folder ``<cache>/<name>`` (cache: ``$ASUKA_CACHE`` or ``~/.cache/asuka``), written once.

    ``write(folder)`` saves the pipeline into a fresh temporary folder, which is then renamed into place, so a
    reader never sees a half-written folder; when another process finished first, its copy is kept.
    """
    root = Path(os.environ.get("ASUKA_CACHE", Path.home() / ".cache" / "asuka"))
    path = root / name
    if not (path / "model_index.json").is_file():
        root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f"{name}.", dir=root))
        write(tmp)
        try:
            tmp.rename(path)
        except OSError:  # another process wrote it first
            shutil.rmtree(tmp, ignore_errors=True)
    return path


def default_tiny_inpaint_dir() -> Path:
    """The tiny SD-inpainting folder used by demos, written once to the cache folder (:func:`cached_pipeline_dir`)
    under ``tiny-sd-inpaint``."""
    return cached_pipeline_dir("tiny-sd-inpaint", save_tiny_sd_inpaint)


def expand_tiny(path: str | Path) -> str | Path:
    """``path`` itself, or when ``path`` is ``"tiny"`` the tiny random SD-inpainting pipeline folder of the CPU demos
    (:func:`default_tiny_inpaint_dir`): the shorthand every trainer path option and ``AsukaInpaintPipeline.from_parts``
    accept, so the README's snippets and the tiny configs run offline as written."""
    return str(default_tiny_inpaint_dir()) if str(path) == "tiny" else path
