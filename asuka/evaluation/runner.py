"""One evaluation: discover the set, take this process's shard, predict (resumable), score, merge, report.

Output folder layout::

    OUT/predictions/<key>.png          raw method outputs (--method runs; kept between runs)
    OUT/shards/NNNN-of-MMMM.json       per-image metrics of one shard (+ .features.safetensors)
    OUT/metrics.json  metrics.md  per_image.jsonl  examples.png      after the merge
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from .dataset import discover
from .distributed import Shard, barrier, torchrun_shard
from .scoring import MetricConfig

REPORT_GRID = 8


@dataclass
class EvalConfig:
    """Everything ``asuka evaluate`` takes; exactly one of ``method`` / ``predictions``."""

    data: str
    out: str
    method: str | None = None
    model: str | None = None
    predictions: str | None = None
    masks: str | None = None
    resolution: int = 512
    steps: int | None = None
    prompt: str | None = None
    guidance_scale: float | None = None
    seed: int = 0
    batch_size: int = 4
    limit: int | None = None
    device: str | None = None
    shard: Shard | None = None
    progress: bool = True
    metrics: MetricConfig = field(default_factory=MetricConfig)

    def meta(self) -> dict:
        """Settings recorded with every shard (must agree across shards) and in ``metrics.json``."""
        return {"method": self.method, "model": None if self.model is None else str(self.model),
                "predictions": self.predictions, "data": str(self.data), "masks": self.masks,
                "resolution": self.resolution, "steps": self.steps, "seed": self.seed, "limit": self.limit,
                **self.metrics.describe(), "kid_subsets": self.metrics.kid_subsets,
                "kid_subset_size": self.metrics.kid_subset_size, "ids_pca_dim": self.metrics.ids_pca_dim}


def _device(name: str | None):
    import os

    import torch

    if name is not None:
        return torch.device(name)
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def _predict(config: EvalConfig, mine, folder: Path, device) -> None:
    from asuka.cli import method_options
    from asuka.pipelines._registry import get_method

    from .predict import predict

    runner = get_method(config.method).load(config.model, device=device)
    options = method_options(runner, config.method, steps=config.steps, prompt=config.prompt,
                             guidance_scale=config.guidance_scale, progress_bar=False)
    predict(mine, folder, runner, options=options, batch_size=config.batch_size, seed=config.seed,
            multiple=runner.multiple, device=device, progress=config.progress)


def evaluate(config: EvalConfig) -> dict | None:
    """Run this process's share; returns the merged summary where this process merges, else ``None``."""
    from asuka.errors import InputError

    from .scoring import MetricSuite, score_items, write_shard

    if (config.method is None) == (config.predictions is None):
        raise InputError("pass exactly one of --method NAME (run a method) or --predictions DIR (score outputs)")
    under_torchrun = config.shard is None and torchrun_shard() is not None
    shard = config.shard or torchrun_shard() or Shard()
    items = discover(config.data, resolution=config.resolution, masks=config.masks)[:config.limit]
    mine = shard.take(list(enumerate(items)))
    device = _device(config.device)
    suite = MetricSuite(config.metrics, device)  # builds backbones first: a missing weight fails before inference
    out = Path(config.out)
    predictions = out / "predictions" if config.method else Path(config.predictions)
    if config.method:
        _predict(config, mine, predictions, device)
    records, real, fake = score_items([item for _, item in mine], predictions, suite,
                                      batch_size=config.batch_size, progress=config.progress)
    write_shard(out / "shards", shard.name, records, real, fake, config.meta())
    if under_torchrun:
        barrier()
        return merge(out, count=shard.count) if shard.index == 0 else None
    if shard.count == 1:
        return merge(out, count=1)
    print(f"asuka evaluate: shard {shard.index}/{shard.count} written to {out / 'shards'}; when every shard has "
          f"finished run: asuka evaluate --merge --out {out}")
    return None


def merge(out: str | Path, *, count: int | None = None) -> dict:
    """Merge ``out/shards``, compute set-level metrics and write the reports; returns the ``metrics.json`` dict."""
    from .aggregate import load_shards, summarise
    from .report import example_grid, write_reports

    out = Path(out)
    meta, records, real, fake = load_shards(out / "shards", count)
    summary = summarise(meta, records, real, fake)
    title = f"{meta['method'] or meta['predictions']} on {meta['data']}"
    paths = write_reports(out, summary, meta, records, title=title)
    predictions = out / "predictions" if meta["method"] else Path(meta["predictions"])
    items = discover(meta["data"], resolution=meta["resolution"], masks=meta["masks"])[:meta["limit"]]
    grid = example_grid(items, predictions, out / "examples.png", count=REPORT_GRID)
    return {"settings": meta, **summary, "files": {k: str(v) for k, v in {**paths, "grid": grid}.items() if v}}
