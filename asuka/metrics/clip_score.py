"""CLIP score with a CLIP model the user names (local folder or hub id), via transformers.

``score = 100 · max(cos(e_a, e_b), 0)`` per image (the torchmetrics ``CLIPScore`` scale), where the
embeddings are CLIP's projected image/text features. Image–image scoring compares the prediction with the
ground truth; ``region="hole"`` (default) first multiplies both images by the hole mask so only the filled
region counts, as ASUKA's ``eval/cal_clip_score.py`` does (Yikai-Wang/asuka-misato; its later
mean-over-features step looks broken and is not reproduced). ASUKA's paper used an unreleased
mask-region CLIP; ``openai/clip-vit-large-patch14`` is the usual public choice. A hub id downloads only
because the user named it; with ``HF_HUB_OFFLINE=1`` only the local cache is used.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from asuka.tensors import to_uint8
from asuka.weights import resolve_pretrained


def _embedding(output) -> torch.Tensor:
    """transformers < 5 returns a tensor from ``get_*_features``; >= 5 a ModelOutput with ``pooler_output``."""
    return output if isinstance(output, torch.Tensor) else output.pooler_output


class CLIPScore(nn.Module):
    """Per-image CLIP score; ``forward(pred, target, mask)`` (image–image) or :meth:`text_score`."""

    def __init__(self, model: str | Path, *, region: str = "hole") -> None:
        super().__init__()
        from transformers import CLIPModel, CLIPProcessor

        if region not in ("hole", "full"):
            raise ValueError(f"region must be 'hole' or 'full', got {region!r}.")
        name = resolve_pretrained(model, field="clip_model", what="CLIPModel + CLIPProcessor")
        self.model_name = str(model)
        self.region = region
        self.model = CLIPModel.from_pretrained(name).eval().requires_grad_(False)
        self.processor = CLIPProcessor.from_pretrained(name)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @torch.no_grad()
    def image_embeddings(self, images: torch.Tensor) -> torch.Tensor:
        """L2-normalised CLIP image embeddings for (B,3,H,W) images in [-1, 1]."""
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be (B,3,H,W) in [-1,1], got shape {tuple(images.shape)}.")
        uint8 = to_uint8(images).cpu()
        pixels = self.processor(images=list(uint8), return_tensors="pt")["pixel_values"].to(self.device)
        emb = _embedding(self.model.get_image_features(pixel_values=pixels))
        return emb / emb.norm(dim=-1, keepdim=True)

    @torch.no_grad()
    def text_embeddings(self, texts: list[str]) -> torch.Tensor:
        """L2-normalised CLIP text embeddings (captions truncated to the model's context length)."""
        tok = self.processor(text=list(texts), return_tensors="pt", padding=True, truncation=True)
        emb = _embedding(self.model.get_text_features(input_ids=tok["input_ids"].to(self.device),
                                                      attention_mask=tok["attention_mask"].to(self.device)))
        return emb / emb.norm(dim=-1, keepdim=True)

    def forward(self, pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Image–image score (B,); ``mask`` (B,1,H,W), 1 = hole, required for ``region='hole'``."""
        if pred.shape != target.shape:
            raise ValueError(f"pred and target shapes differ: {tuple(pred.shape)} vs {tuple(target.shape)}.")
        if self.region == "hole":
            if mask is None:
                raise ValueError("region='hole' needs the hole mask; pass mask= or build CLIPScore(region='full').")
            keep = (mask > 0.5).to(pred.dtype)  # black outside the hole, on the [0,1] scale as ASUKA
            pred, target = (pred + 1) * keep - 1, (target + 1) * keep - 1
        cos = (self.image_embeddings(pred) * self.image_embeddings(target)).sum(-1)
        return (100.0 * cos.clamp(min=0)).double().cpu()

    def text_score(self, images: torch.Tensor, texts: list[str]) -> torch.Tensor:
        """Image–text score (B,) for one caption per image."""
        if len(texts) != images.shape[0]:
            raise ValueError(f"need one text per image: {len(texts)} texts for {images.shape[0]} images.")
        cos = (self.image_embeddings(images) * self.text_embeddings(texts)).sum(-1)
        return (100.0 * cos.clamp(min=0)).double().cpu()


def save_tiny_clip(path: str | Path, *, seed: int = 0) -> Path:
    """Write a tiny randomly initialised ``CLIPModel`` + ``CLIPProcessor`` folder (tests and benchmarks only)."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    from asuka.models.seeding import seeded
    from asuka.models.tiny import tiny_tokenizer

    path = Path(path)
    tokenizer = tiny_tokenizer(path / "tokenizer-src")
    config = CLIPConfig(
        text_config=dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=77,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id),
        vision_config=dict(image_size=32, patch_size=8, hidden_size=32, intermediate_size=37,
                           num_hidden_layers=2, num_attention_heads=4),
        projection_dim=16)
    with seeded(seed):
        model = CLIPModel(config)
    image_processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    model.save_pretrained(path)
    CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(path)
    return path
