"""Side-by-side report of several methods evaluated on the same items with the same seeds.

``comparison.md``: one table per metric, rows = overall, MISATO domains and hole-ratio bins, columns = methods
(best value in bold). ``comparison.json``: every method's ``metrics.json``. ``comparison.png``: per item a row
input (hole grey) | mask | each method's composite.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Mapping, Sequence

from asuka.errors import InputError
from asuka.pipelines._common import load_image
from asuka.tensors import paste_back

from .dataset import EvalItem, find_prediction, load_pair
from .report import COLUMNS, LABELS, cell, grid_row, hole_grey, ids_note, save_grid, summary_rows

_LOWER_IS_BETTER = {"lpips_alex", "lpips_vgg", "lpips_squeeze", "fid", "kid_mean", "grad"}


def comparison_markdown(results: Mapping[str, dict]) -> str:
    """One table per metric: rows overall / domain / hole-ratio bin, one column per method."""
    names = list(results)
    rows = {label: None for r in results.values() for label, _ in summary_rows(r)}
    by_method = {name: dict(summary_rows(r)) for name, r in results.items()}
    lines = [f"# {' vs '.join(names)}", ""]
    for metric in COLUMNS:
        if not any(metric in row for r in by_method.values() for row in r.values()):
            continue
        lines += [f"## {LABELS[metric]}", "", "| subset | n | " + " | ".join(names) + " |",
                  "|---|---:|" + "---:|" * len(names)]
        for label in rows:
            values = [by_method[n].get(label, {}).get(metric) for n in names]
            known = [v for v in values if v is not None]
            best = (min if metric in _LOWER_IS_BETTER else max)(known) if len(known) > 1 else None
            n = next((by_method[m][label]["n"] for m in names if label in by_method[m]), 0)
            cells = [f"**{cell(metric, v)}**" if v is not None and v == best else cell(metric, v) for v in values]
            lines.append(f"| {label} | {n} | " + " | ".join(cells) + " |")
        if metric in ("u_ids", "p_ids") and (note := ids_note(row for r in by_method.values() for row in r.values())):
            lines += ["", note]
        lines.append("")
    return "\n".join(lines)


def comparison_grid(items: Sequence[EvalItem], predictions: Mapping[str, Path], path: Path, *, count: int = 8,
                    height: int = 128) -> Path | None:
    """Per item a row: input (hole grey) | mask | each method's composite (prediction in the hole)."""
    rows = []
    for item in list(items)[:count]:
        preds = {name: find_prediction(folder, item.key) for name, folder in predictions.items()}
        if any(p is None for p in preds.values()):
            continue
        try:
            gt, mask = load_pair(item)
            tiles = [hole_grey(gt, mask), (mask * 2 - 1).expand_as(gt)]
            tiles += [paste_back(load_image(str(p)), gt, mask) for p in preds.values()]
        except InputError:  # an unreadable item: already reported by scoring, not shown
            continue
        rows.append(grid_row(tiles, height))
    return save_grid(rows, path)


def write_comparison(out: Path, results: Mapping[str, dict], items: Sequence[EvalItem],
                     predictions: Mapping[str, Path], *, count: int = 8) -> dict:
    """Write ``comparison.{md,json,png}`` under ``out``; returns ``{"methods": results, "files": ...}``."""
    out.mkdir(parents=True, exist_ok=True)
    files = {"markdown": out / "comparison.md", "json": out / "comparison.json"}
    files["markdown"].write_text(comparison_markdown(results))
    files["json"].write_text(json.dumps({"methods": results}, indent=2))
    grid = comparison_grid(items, predictions, out / "comparison.png", count=count)
    if grid is not None:
        files["grid"] = grid
    return {"methods": dict(results), "files": {k: str(v) for k, v in files.items()}}


__all__ = ["comparison_markdown", "comparison_grid", "write_comparison"]
