"""Evaluation reports: ``metrics.json`` (everything), ``metrics.md`` (one table) and ``examples.png``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F

from asuka.errors import InputError
from asuka.tensors import MASK_THRESHOLD, paste_back
from asuka.pipelines._common import load_image, to_pil

from .dataset import EvalItem, find_prediction, load_pair

# column order of the Markdown tables; metrics that are absent are left out
COLUMNS = ("psnr", "ssim", "lpips_alex", "lpips_vgg", "lpips_squeeze", "fid", "kid_mean", "u_ids", "p_ids",
            "grad", "clip", "psnr_known", "ssim_known")
_PERCENT = {"u_ids", "p_ids"}
LABELS = {"psnr": "PSNR↑", "ssim": "SSIM↑", "lpips_alex": "LPIPS-alex↓", "lpips_vgg": "LPIPS-vgg↓",
           "lpips_squeeze": "LPIPS-squeeze↓", "fid": "FID↓", "kid_mean": "KID↓", "u_ids": "U-IDS(%)↑",
           "p_ids": "P-IDS(%)↑", "grad": "Grad↓", "clip": "CLIP↑", "psnr_known": "PSNR known↑",
           "ssim_known": "SSIM known↑"}


def cell(name: str, value) -> str:
    if value is None:
        return "–"
    return f"{100 * value:.2f}" if name in _PERCENT else f"{value:.4g}" if abs(value) < 1 else f"{value:.3f}"


def summary_rows(summary: dict) -> list[tuple[str, dict]]:
    """``(label, metrics)`` rows of a summary: overall, then per domain and per hole-ratio bin."""
    rows = [("overall", summary["overall"])]
    rows += [(f"domain: {k}", v) for k, v in summary.get("by_domain", {}).items()]
    rows += [(f"hole {k}", v) for k, v in summary.get("by_hole_ratio", {}).items()]
    return rows


def markdown_table(summary: dict, title: str = "") -> str:
    """One table: overall, then per-domain and per-hole-ratio rows."""
    rows = summary_rows(summary)
    columns = [c for c in COLUMNS if any(c in r for _, r in rows)]
    lines = [f"# {title}", ""] if title else []
    lines.append("| subset | n | " + " | ".join(LABELS[c] for c in columns) + " |")
    lines.append("|---|---:|" + "---:|" * len(columns))
    for label, row in rows:
        lines.append(f"| {label} | {row['n']} | " + " | ".join(cell(c, row.get(c)) for c in columns) + " |")
    note = ids_note(row for _, row in rows)
    return "\n".join(lines) + "\n" + (f"\n{note}\n" if note else "")


def ids_note(rows) -> str:
    """The footnote explaining IDS cells left out (or flagged) by the group-size rule, or ``""``."""
    rows = [row for row in rows if "ids_min_pairs" in row]
    if not rows:
        return ""
    minimum = rows[0]["ids_min_pairs"]
    text = (f"U-/P-IDS are shown for groups of at least {minimum} image pairs (4 × (D + 1), D = the SVM's input "
            "dimension); in smaller groups a linear SVM separates real from fake features even when they come from "
            "one distribution, so those cells are left empty (–).")
    if any(row.get("ids_reliable") is False for row in rows):
        text += " The overall U-/P-IDS come from fewer pairs than that and are biased low; compare them only with " \
                "numbers computed on the same set size."
    return text


def example_grid(items: Sequence[EvalItem], predictions: Path, path: Path, *, count: int = 8,
                 height: int = 128) -> Path | None:
    """Rows of (masked input | raw prediction | composite | ground truth) for the first ``count`` items."""
    rows = []
    for item in list(items)[:count]:
        pred_path = find_prediction(predictions, item.key)
        if pred_path is None:
            continue
        try:
            gt, mask = load_pair(item)
            pred = load_image(str(pred_path))
        except InputError:  # an unreadable item: already reported by scoring, not shown
            continue
        rows.append(grid_row([hole_grey(gt, mask), pred, paste_back(pred, gt, mask), gt], height))
    return save_grid(rows, path)


def hole_grey(image: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The input as a grid shows it: the hole (``mask`` >= 0.5) grey (0 in [-1, 1])."""
    return torch.where(mask >= MASK_THRESHOLD, torch.zeros_like(image), image)


def grid_row(tiles: Sequence[torch.Tensor], height: int) -> torch.Tensor:
    """Tiles (1,3,H,W) of one size side by side, resized (bilinear, antialiased) to ``height`` rows."""
    tiles = torch.cat(list(tiles))
    width = max(1, round(height * tiles.shape[-1] / tiles.shape[-2]))
    return torch.cat(list(F.interpolate(tiles, size=(height, width), mode="bilinear", antialias=True,
                                        align_corners=False)), dim=-1)


def save_grid(rows: Sequence[torch.Tensor], path: Path) -> Path | None:
    """Rows of :func:`grid_row` stacked (shorter ones padded white on the right) and saved as ``path``; ``None``
    (nothing written) without rows."""
    if not rows:
        return None
    width = max(r.shape[-1] for r in rows)
    grid = torch.cat([F.pad(r, (0, width - r.shape[-1]), value=1.0) for r in rows], dim=-2)
    path.parent.mkdir(parents=True, exist_ok=True)
    to_pil(grid.clamp(-1, 1)).save(path)
    return path


def write_reports(out: Path, summary: dict, meta: dict, records: list[dict], *, title: str) -> dict[str, Path]:
    """Write ``metrics.json`` (settings + summary), ``per_image.jsonl`` and ``metrics.md``."""
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "metrics.json", "per_image": out / "per_image.jsonl", "markdown": out / "metrics.md"}
    paths["json"].write_text(json.dumps({"settings": meta, **summary}, indent=2))
    paths["per_image"].write_text("".join(json.dumps(r) + "\n" for r in records))
    paths["markdown"].write_text(markdown_table(summary, title))
    return paths
