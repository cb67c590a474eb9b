"""Batched, resumable inference over an evaluation set: one ``<key>.png`` per item, finished files kept.

Outputs are the method's raw images (``paste_back=False``): the scorer composites them with the ground
truth itself, and the raw pixels outside the hole give the known-region ("background preservation")
metrics. The whole image is processed at its own size (HD strategy ``original``, as the papers evaluate).
Each image has its own generator seeded ``seed + position in the full set``, so results do not
depend on the batch size, the shard or on resuming. Files are written atomically (temp file + rename),
so an interrupted run never leaves a truncated PNG that a resumed run would skip.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from tqdm.auto import tqdm

from asuka.tensors import MASK_THRESHOLD
from asuka.pipelines._common import run_inpainting, to_pil

from .dataset import EvalItem, load_pair


def prediction_path(folder: Path, item: EvalItem) -> Path:
    return folder / f"{item.key}.png"


def _save_atomic(image: torch.Tensor, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    to_pil(image)[0].save(tmp, format="PNG")
    os.replace(tmp, path)


def predict(items: Sequence[tuple[int, EvalItem]], folder: str | Path, runner: Callable[..., torch.Tensor], *,
            options: dict[str, Any] | None = None, batch_size: int = 1, seed: int = 0, multiple: int = 8,
            device: torch.device | str = "cpu", progress: bool = True) -> int:
    """Run ``runner`` over ``(position, item)`` pairs whose prediction is missing; returns how many ran."""
    if batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {batch_size}")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    todo = [(pos, item) for pos, item in items if not prediction_path(folder, item).is_file()]
    batches = [todo[i:i + batch_size] for i in range(0, len(todo), batch_size)]
    for batch in tqdm(batches, desc="predict", unit="batch", disable=not progress or not batches):
        loaded = [(pos, item, *load_pair(item)) for pos, item in batch]
        by_size: dict[tuple[int, int], list] = {}
        for entry in loaded:  # images of one size form one forward pass
            by_size.setdefault(tuple(entry[2].shape[-2:]), []).append(entry)
        for group in by_size.values():
            image = torch.cat([e[2] for e in group])
            mask = torch.cat([e[3] for e in group])
            holes = torch.nonzero((mask >= MASK_THRESHOLD).flatten(1).any(dim=1)).flatten().tolist()
            result = image.clone()  # an item without a hole is its own prediction
            if holes:
                gens = [torch.Generator(device).manual_seed(seed + group[i][0]) for i in holes]
                result[holes] = run_inpainting(
                    lambda x, m, gens=gens: runner(x.to(device), m.to(device), generator=gens, **(options or {})),
                    image[holes], mask[holes], paste_back=False, multiple=multiple, hd_strategy="original",
                    max_size=None).cpu()
            for (_, item, _, _), out in zip(group, result):
                _save_atomic(out[None], prediction_path(folder, item))
    return len(todo)
