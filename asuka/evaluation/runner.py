"""One evaluation: discover the set, take this process's shard, predict (resumable), score, merge, report.

Output folder layout, one method (or ``--predictions``)::

    OUT/predictions/<key>.png          raw method outputs (kept between runs)
    OUT/shards/NNNN-of-MMMM.json       per-image metrics of one shard (+ .features.safetensors)
    OUT/metrics.json  metrics.md  per_image.jsonl  examples.png      after the merge

Several methods (``methods=["a", "b"]``): the same layout per method under ``OUT/<method>/``, all run over the same
items with the same seeds, plus ``OUT/comparison.{md,json,png}`` (:mod:`.compare`). Each method's predictions are
resumed on their own.

``metrics.json`` records how its numbers were made (:meth:`EvalConfig.meta`): method, weights, decoder, preset,
every option value, dtype and compile, extra inputs, seed and seed rule, data and metric settings; shards made with
different settings refuse to merge.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

from asuka.errors import InputError

from .dataset import discover
from .distributed import Shard, barrier, torchrun_shard
from .scoring import MetricConfig

REPORT_GRID = 8


@dataclass
class MethodRun:
    """One method to evaluate and how (the :class:`asuka.api.Inpainter` arguments)."""

    method: str
    model: str | None = None
    decoder: str | None = None
    preset: str | None = None
    options: Mapping[str, Any] = field(default_factory=dict)
    option_strings: Mapping[str, str] = field(default_factory=dict)
    weights: Mapping[str, str] = field(default_factory=dict)
    compile: bool = False


@dataclass
class EvalConfig:
    """Everything ``asuka evaluate`` takes; exactly one of ``methods`` / ``predictions``.

    ``inputs``: extra inputs by role for every method (one value for all items, a ``{key: value}`` mapping, a
    per-key text table file or a folder matched by key; see :func:`asuka.api.per_stem_inputs`); a method receives
    the roles it declares. A ``DATA/reference`` folder (:data:`DATA_INPUT_FOLDERS`) is the ``reference`` input of
    the methods that take one unless given explicitly.
    """

    data: str
    out: str
    methods: Sequence[MethodRun] = ()
    predictions: str | None = None
    masks: str | None = None
    resolution: int = 512
    inputs: Mapping[str, Any] = field(default_factory=dict)
    seed: int = 0
    batch_size: int = 4
    limit: int | None = None
    device: str | None = None
    shard: Shard | None = None
    progress: bool = True
    metrics: MetricConfig = field(default_factory=MetricConfig)
    fail_fast: bool = False
    failures: dict[str, str] = field(default_factory=dict)  # filled by evaluate: key -> why it was left out

    def meta(self, settings: Mapping[str, Any] | None = None, inputs: Mapping[str, Any] | None = None) -> dict:
        """Settings recorded with every shard (must agree across shards) and in ``metrics.json``: the method's
        ``settings`` (:meth:`asuka.api.Inpainter.settings`) and ``inputs`` given, the seed, data and metrics."""
        method = dict(settings or {"method": None})
        return {**method, "inputs": {role: str(value) for role, value in (inputs or {}).items()},
                "predictions": self.predictions, "data": str(self.data), "masks": self.masks,
                "resolution": self.resolution, "seed": self.seed, "limit": self.limit,
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


def method_folder(out: Path, method: str, count: int) -> Path:
    """Where one method's predictions, shards and reports go: ``OUT`` alone, ``OUT/<method>`` among several."""
    return out if count == 1 else out / method


def evaluate(config: EvalConfig) -> dict | None:
    """Run this process's share; returns the merged summary where this process merges, else ``None``.

    Every method's options and inputs are checked before any model loads or any image is predicted."""
    from asuka.api import Inpainter, per_stem_inputs, quiet_loading

    from .predict import predict
    from .scoring import MetricSuite, score_items, write_shard

    if bool(config.methods) == (config.predictions is not None):
        raise InputError("pass exactly one of methods (run methods) or predictions (score outputs)", "method")
    names = [run.method for run in config.methods]
    if len(set(names)) != len(names):
        raise InputError(f"a method is listed twice: {', '.join(names)}", "method")
    under_torchrun = config.shard is None and torchrun_shard() is not None
    shard = config.shard or torchrun_shard() or Shard()
    items = discover(config.data, resolution=config.resolution, masks=config.masks)[:config.limit]
    device = _device(config.device)
    painters = [Inpainter(run.method, run.model, device=device, decoder=run.decoder, preset=run.preset,
                          options=run.options, option_strings=run.option_strings, weights=run.weights,
                          compile=run.compile)
                for run in config.methods]
    keys = [item.key for item in items]
    unused = set(config.inputs) - {r for p in painters for r in config.inputs if _takes(p, r)}
    if unused:
        raise InputError(f"no listed method takes {', '.join(sorted(unused))}", f"inputs.{sorted(unused)[0]}")
    given = {**data_inputs(config.data, config.masks), **config.inputs}
    inputs = [per_stem_inputs(p.spec, keys, {r: v for r, v in given.items() if _takes(p, r)}) for p in painters]
    mine = shard.take(list(enumerate(items)))
    if not config.progress:
        quiet_loading()
    suite = MetricSuite(config.metrics, device)  # builds backbones first: a missing weight fails before inference
    out = Path(config.out)
    runs = [(method_folder(out, p.method, len(painters)), p, i) for p, i in zip(painters, inputs)] \
        or [(out, None, {})]
    for folder, painter, per_key in runs:
        predictions = folder / "predictions" if painter is not None else Path(config.predictions)
        if painter is not None:
            computed = predict(mine, predictions, painter, inputs=per_key, batch_size=config.batch_size,
                               seed=config.seed, progress=config.progress,  # loads the model only if needed
                               failures=None if config.fail_fast else config.failures)
            print(f"asuka evaluate: {painter.method}: reused {len(mine) - computed} predictions, computed {computed}")
            painter.release()  # one method in memory at a time
        records, real, fake = score_items([item for _, item in mine if item.key not in config.failures], predictions,
                                          suite, batch_size=config.batch_size, progress=config.progress,
                                          failures=None if config.fail_fast else config.failures)
        role_values = {r: v for r, v in given.items() if painter is not None and _takes(painter, r)}
        write_shard(folder / "shards", shard.name, records, real, fake,
                    config.meta(painter.settings() if painter else None, role_values))
    if under_torchrun:
        barrier()
        return merge(out, count=shard.count) if shard.index == 0 else None
    if shard.count == 1:
        return merge(out, count=1)
    print(f"asuka evaluate: shard {shard.index}/{shard.count} written; when every shard has finished run: "
          f"asuka evaluate --merge --out {out}")
    return None


DATA_INPUT_FOLDERS = {"reference": ("reference", "references")}
"""Per-item input folders found beside ``image/`` and ``mask/`` in a data folder (matched by stem), by role."""


def data_inputs(data: str | Path, masks: str | None) -> dict[str, Path]:
    """Input folders of a folder-pair evaluation set (``DATA/{image,mask,reference}``): used for the methods that
    declare the role unless the role is given explicitly."""
    root = Path(data).expanduser()
    if masks is not None:
        return {}
    return {role: next(root / n for n in names if (root / n).is_dir())
            for role, names in DATA_INPUT_FOLDERS.items() if any((root / n).is_dir() for n in names)}


def _takes(painter, role: str) -> bool:
    return any(i.role == role for i in painter.spec.inputs)


def _merge_one(folder: Path, count: int | None) -> tuple[dict, list, dict]:
    from .aggregate import load_shards, summarise
    from .report import example_grid, write_reports

    meta, records, real, fake = load_shards(folder / "shards", count)
    summary = summarise(meta, records, real, fake)
    title = f"{meta['method'] or meta['predictions']} on {meta['data']}"
    paths = write_reports(folder, summary, meta, records, title=title)
    predictions = folder / "predictions" if meta["method"] else Path(meta["predictions"])
    items = discover(meta["data"], resolution=meta["resolution"], masks=meta["masks"])[:meta["limit"]]
    grid = example_grid(items, predictions, folder / "examples.png", count=REPORT_GRID)
    result = {"settings": meta, **summary, "files": {k: str(v) for k, v in {**paths, "grid": grid}.items() if v}}
    return result, items, {"predictions": predictions}


def merge(out: str | Path, *, count: int | None = None) -> dict:
    """Merge the shards, compute set-level metrics and write the reports; returns the ``metrics.json`` dict (one
    method) or the comparison (several: ``OUT/<method>/shards``)."""
    from .compare import write_comparison

    out = Path(out)
    if (out / "shards").is_dir():
        return _merge_one(out, count)[0]
    folders = sorted(p for p in out.iterdir() if (p / "shards").is_dir()) if out.is_dir() else []
    if not folders:
        return _merge_one(out, count)[0]  # raises: no shard results
    results = {}
    for folder in folders:
        result, items, paths = _merge_one(folder, count)
        results[folder.name] = (result, paths["predictions"])
    _check_comparable({name: r for name, (r, _) in results.items()})
    return write_comparison(out, {name: r for name, (r, _) in results.items()}, items,
                            {name: p for name, (_, p) in results.items()}, count=REPORT_GRID)


_PER_METHOD = {"method", "model", "decoder", "preset", "options", "weights", "inputs", "seed_rule", "dtype",
               "compile"}


def _check_comparable(results: Mapping[str, dict]) -> None:
    """Methods compared in one report must share data, seed and metric settings."""
    shared = [{k: v for k, v in r["settings"].items() if k not in _PER_METHOD} for r in results.values()]
    if any(s != shared[0] for s in shared):
        raise InputError("the methods under this folder were evaluated with different data, seed or metric "
                         "settings; rerun them alike", "out")


__all__ = ["EvalConfig", "MethodRun", "evaluate", "merge", "method_folder"]
