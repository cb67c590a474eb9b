"""Per-image metrics and Inception features for one shard of an evaluation set.

Protocol (ASUKA ``eval/*.py``, LaMa): the mask is thresholded at 0.5 and every metric except the
known-region ones is computed on the *composite* ``pred · m + gt · (1 − m)`` (known pixels from the ground
truth). ``psnr_known``/``ssim_known`` use the raw prediction over the known pixels (background
preservation; 70 dB / 1.0 for a method that pastes back). FID/KID/IDS compare Inception features of the
ground-truth images (real) with those of the composites (fake), paired by item.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
from tqdm.auto import tqdm

from asuka.errors import InputError, InputFileNotFoundError
from asuka.tensors import MASK_THRESHOLD, paste_back
from asuka.pipelines._common import load_image

from . import METRICS
from .dataset import EvalItem, find_prediction, load_pair

SET_METRICS = ("fid", "kid", "ids")
OFFLINE_METRICS = ("psnr", "ssim", "grad")


@dataclass
class MetricConfig:
    """Which metrics to compute and the weights they use (see ``asuka evaluate --help``).

    ``metrics=None`` picks the default set: psnr, ssim, grad (offline, always), plus lpips when
    ``lpips_weights`` is given, fid/kid/ids when ``inception_weights`` is given (either also with
    ``allow_download``), plus clip when ``clip_model`` is given. Metrics named explicitly must have
    their weights: a missing one is an error naming the option, never a silent skip or download.
    """

    metrics: Sequence[str] | None = None
    lpips_net: str = "alex"
    lpips_weights: str | None = None
    inception_weights: str | None = None
    inception_variant: str = "fidelity"
    inception_resize: str = "tensor"
    clip_model: str | None = None
    clip_region: str = "hole"
    ssim_gray: bool = True
    ids_pca_dim: int | None = None
    grad_empty_edge: str = "nan"
    protocol: str = "default"
    kid_subsets: int = 100
    kid_subset_size: int = 1000
    allow_download: bool = False

    def resolved(self) -> tuple[str, ...]:
        if self.metrics is None:
            names = list(OFFLINE_METRICS)
            if self.lpips_weights or self.allow_download:
                names.append("lpips")
            if self.inception_weights or self.allow_download:
                names += list(SET_METRICS)
            if self.clip_model:
                names.append("clip")
            return tuple(names)
        unknown = sorted(set(self.metrics) - set(METRICS))
        if unknown:
            raise InputError(f"unknown metric(s) {unknown}; choose from {','.join(METRICS)}", "metrics")
        if "clip" in self.metrics and not self.clip_model:
            raise InputError("the clip metric needs a CLIP model (a local CLIP folder or a hub id such as "
                             "openai/clip-vit-large-patch14)", "clip_model")
        return tuple(dict.fromkeys(self.metrics))

    def describe(self) -> dict:
        """The settings that change the numbers, for the report."""
        names = self.resolved()
        out = {"protocol": self.protocol, "metrics": list(names),
               "composite": "composite = pred*m + gt*(1-m), m = mask >= 0.5; "
                                                   "*_known on the raw prediction over known pixels",
               "ssim": "grayscale (ASUKA)" if self.ssim_gray else "RGB mean", "psnr_eps": 1e-7}
        if "lpips" in names:
            out["lpips_net"] = self.lpips_net
        if set(SET_METRICS) & set(names):
            out["inception_variant"] = self.inception_variant
            out["inception_resize"] = self.inception_resize
        if "ids" in names:
            out["ids_pca_dim"] = self.ids_pca_dim
        if "grad" in names:
            out["grad_empty_edge"] = self.grad_empty_edge
        if "kid" in names:
            out["kid_subsets"] = self.kid_subsets
        if "clip" in names:
            out.update(clip_model=self.clip_model, clip_region=self.clip_region)
        return out


class MetricSuite:
    """Builds the requested backbones once; :meth:`score` returns per-image values and features."""

    def __init__(self, config: MetricConfig, device: torch.device | str = "cpu") -> None:
        from asuka.metrics import LPIPS, CLIPScore, InceptionFeatures

        self.config, self.device = config, torch.device(device)
        self.names = config.resolved()
        self.lpips = (LPIPS(config.lpips_net, config.lpips_weights, allow_download=config.allow_download)
                      .to(self.device) if "lpips" in self.names else None)
        self.inception = (InceptionFeatures(config.inception_weights, variant=config.inception_variant,
                                            allow_download=config.allow_download, resize=config.inception_resize)
                          .to(self.device)
                          if set(SET_METRICS) & set(self.names) else None)
        self.clip = CLIPScore(config.clip_model, region=config.clip_region).to(self.device) \
            if "clip" in self.names else None

    @torch.no_grad()
    def score(self, raw: torch.Tensor, gt: torch.Tensor, mask: torch.Tensor
              ) -> tuple[dict[str, torch.Tensor], tuple[torch.Tensor, torch.Tensor] | None]:
        """Per-image metrics ``{name: (B,)}`` and ``(real, fake)`` Inception features (or ``None``)."""
        from asuka.metrics import boundary_gradient, psnr, ssim

        raw, gt = raw.to(self.device), gt.to(self.device)
        m = (mask.to(self.device) >= MASK_THRESHOLD).float()
        comp = paste_back(raw, gt, m)
        out: dict[str, torch.Tensor] = {"hole_ratio": m.mean(dim=(1, 2, 3)).double().cpu()}
        if "psnr" in self.names:
            out["psnr"], out["psnr_known"] = psnr(comp, gt).cpu(), psnr(raw, gt, 1 - m).cpu()
        if "ssim" in self.names:
            out["ssim"] = ssim(comp, gt, gray=self.config.ssim_gray)
            out["ssim_known"] = ssim(raw, gt, 1 - m, gray=self.config.ssim_gray)
        if self.lpips is not None:
            out[self.lpips.name] = self.lpips(comp, gt).double().cpu()
        if "grad" in self.names:
            out["grad"] = boundary_gradient(comp, gt, m, empty_edge=self.config.grad_empty_edge)
        if self.clip is not None:
            out["clip"] = self.clip(comp, gt, m)
        features = None
        if self.inception is not None:
            real, fake = self.inception(torch.cat([gt, comp])).cpu().chunk(2)
            features = (real, fake)
        return out, features


def _load_prediction(path: Path, gt: torch.Tensor, key: str) -> torch.Tensor:
    pred = load_image(str(path), name=f"prediction {path.name}")
    if pred.shape != gt.shape:
        raise InputError(f"prediction {path} is {pred.shape[-1]}x{pred.shape[-2]} but its ground truth {key} is "
                         f"{gt.shape[-1]}x{gt.shape[-2]}; save predictions at the ground-truth size")
    return pred


def score_items(items: Sequence[EvalItem], predictions: str | Path, suite: MetricSuite, *, batch_size: int = 8,
                progress: bool = True, failures: dict[str, str] | None = None
                ) -> tuple[list[dict], torch.Tensor | None, torch.Tensor | None]:
    """Score every item against ``predictions/<key>.*``; returns records and real/fake features whose rows follow
    the records. With a ``failures`` dict, an item whose ground truth cannot be read is recorded there and left
    out; without, its error stops the run."""
    predictions = Path(predictions)
    paths = {item.key: find_prediction(predictions, item.key) for item in items}
    missing = [k for k, p in paths.items() if p is None]
    if missing:
        raise InputFileNotFoundError(f"{len(missing)} prediction(s) missing in {predictions} (expected <key>.png): "
                                     f"{missing[:5]}{' ...' if len(missing) > 5 else ''}")
    records, reals, fakes = [], [], []
    for start in tqdm(range(0, len(items), batch_size), desc="score", unit="batch", disable=not progress):
        groups: dict[tuple[int, int], list] = {}
        for item in items[start:start + batch_size]:  # same-size images share one forward pass
            try:
                gt, mask = load_pair(item)
                pred = _load_prediction(paths[item.key], gt, item.key)
            except InputError as err:
                if failures is None:
                    raise
                failures[item.key] = " ".join(str(err).split())
                continue
            groups.setdefault(tuple(gt.shape[-2:]), []).append((item, pred, gt, mask))
        for group in groups.values():
            values, feats = suite.score(*(torch.cat([g[i] for g in group]) for i in (1, 2, 3)))
            columns = {k: v.tolist() for k, v in values.items()}  # one host transfer per metric, not per image
            for row, (item, *_rest) in enumerate(group):
                records.append({"key": item.key, "domain": item.domain,
                                **{k: _finite_or_none(column[row]) for k, column in columns.items()}})
            if feats is not None:
                reals.append(feats[0])
                fakes.append(feats[1])
    if not reals:
        return records, None, None
    return records, torch.cat(reals), torch.cat(fakes)


def _finite_or_none(x: float) -> float | None:
    return None if math.isnan(x) else x


def write_shard(folder: str | Path, name: str, records: list[dict], real: torch.Tensor | None,
                fake: torch.Tensor | None, meta: dict) -> Path:
    """Write ``<folder>/<name>.json`` (records + meta) and, with features, ``<name>.features.safetensors``."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if real is not None:
        save_file({"real": real.float().contiguous(), "fake": fake.float().contiguous()},
                  str(folder / f"{name}.features.safetensors"))
    path = folder / f"{name}.json"
    path.write_text(json.dumps({"meta": meta, "records": records}, indent=1))
    return path


__all__ = ["METRICS", "SET_METRICS", "OFFLINE_METRICS", "MetricConfig", "MetricSuite", "score_items",
           "write_shard"]
