"""Batched, resumable inference over an evaluation set: one ``<key>.png`` per item, finished files kept.

Outputs are the method's raw images (``paste_back=False``): the scorer composites them with the ground
truth itself, and the raw pixels outside the hole give the known-region ("background preservation")
metrics. The whole image is processed at its own size (HD strategy ``original``, as the papers evaluate).
Seeds follow :data:`asuka.api.SEED_RULE` (every item its own generator seeded with ``seed``), so results do not
depend on the batch size, the shard or on resuming. Files are written atomically (temp file + rename),
so an interrupted run never leaves a truncated PNG that a resumed run would skip.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch
from tqdm.auto import tqdm

from asuka.errors import InputError
from asuka.pipelines._common import to_pil

from .dataset import EvalItem, load_pair


def prediction_path(folder: Path, item: EvalItem) -> Path:
    return folder / f"{item.key}.png"


def _save_atomic(image: torch.Tensor, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    to_pil(image)[0].save(tmp, format="PNG")
    os.replace(tmp, path)


def predict(items: Sequence[tuple[int, EvalItem]], folder: str | Path, painter: Callable[..., torch.Tensor], *,
            inputs: Mapping[str, Mapping[str, Any]] | None = None, batch_size: int = 1, seed: int = 0,
            progress: bool = True, failures: dict[str, str] | None = None) -> int:
    """Run ``painter`` (an :class:`asuka.api.Inpainter`) over ``(position, item)`` pairs whose prediction is missing,
    with each item's extra inputs ``inputs[key]``; returns how many ran. With a ``failures`` dict, an item whose files
    cannot be read is recorded there (key -> message) and skipped; without, its error stops the run."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    todo = [item for _, item in items if not prediction_path(folder, item).is_file()]
    batches = [todo[i:i + batch_size] for i in range(0, len(todo), batch_size)]
    for batch in tqdm(batches, desc="predict", unit="batch", disable=not progress or not batches):
        by_size: dict[tuple[int, int], list] = {}
        for item in batch:  # images of one size form one forward pass
            if failures is not None and item.key in failures:
                continue
            try:
                image, mask = load_pair(item)
            except InputError as err:
                if failures is None:
                    raise
                failures[item.key] = " ".join(str(err).split())
                continue
            by_size.setdefault(tuple(image.shape[-2:]), []).append((item, image, mask))
        for group in by_size.values():
            result = painter(torch.cat([g[1] for g in group]), torch.cat([g[2] for g in group]),
                             inputs=[dict((inputs or {}).get(g[0].key, {})) for g in group], seed=seed,
                             paste_back=False, hd_strategy="original", max_size=None)
            for (item, _, _), out in zip(group, result.cpu()):
                _save_atomic(out[None], prediction_path(folder, item))
    return len(todo)
