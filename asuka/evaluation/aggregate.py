"""Merge shard files and summarise: overall, per MISATO domain, per hole-ratio bin (LaMa's 10 bins).

Per-image metrics are averaged with nan-mean (an image whose value is undefined — e.g. Grad without a
mask edge, known-region metrics with a full mask — is left out and counted in ``<metric>_undefined``).
Set-level metrics (FID, KID, U-/P-IDS) are recomputed from the merged Inception features of each group;
a group with fewer than 2 images gets ``null``.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import torch

from asuka.errors import InputError, InputFileNotFoundError

HOLE_BINS = 10
_SHARD_NAME = re.compile(r"^(\d{4})-of-(\d{4})\.json$")
_NOT_METRICS = {"key", "domain", "hole_ratio"}
_SET_KEYS = {"fid": ("fid",), "kid": ("kid_mean", "kid_std", "kid_subset_size"), "ids": ("u_ids", "p_ids")}


def hole_bin(ratio: float) -> str:
    """LaMa's bins of the hole ratio: ``0-10%``, ``10-20%``, ..., ``90-100%`` (1.0 falls in the last)."""
    index = min(int(ratio * HOLE_BINS), HOLE_BINS - 1)
    step = 100 // HOLE_BINS
    return f"{index * step}-{(index + 1) * step}%"


def load_shards(folder: str | Path, count: int | None = None
                ) -> tuple[dict, list[dict], torch.Tensor | None, torch.Tensor | None]:
    """Read every ``NNNN-of-MMMM.json`` (+ features) in ``folder`` (only ``MMMM = count`` when given; otherwise
    there must be one split); records sorted by key, features aligned."""
    from safetensors.torch import load_file

    folder = Path(folder)
    shards = {}  # path -> (index, count), sorted by name
    for path in sorted(folder.glob("*.json")) if folder.is_dir() else []:
        if match := _SHARD_NAME.match(path.name):
            shards[path] = (int(match.group(1)), int(match.group(2)))
    if not shards:
        raise InputFileNotFoundError(f"no shard results in {folder}; run the shards first (asuka evaluate --shard i/n)")
    if count is not None:
        shards = {p: ic for p, ic in shards.items() if ic[1] == count}
    counts = {n for _, n in shards.values()} or {count}
    if len(counts) != 1:
        raise InputError(f"{folder} mixes shard results of different splits {sorted(counts)}; remove the stale ones")
    count = counts.pop()
    files = list(shards)
    have = {i for i, _ in shards.values()}
    if have != set(range(count)):
        raise InputFileNotFoundError(f"shards {sorted(set(range(count)) - have)} of {count} have not finished in "
                                     f"{folder}")
    metas, records, reals, fakes = [], [], [], []
    for path in files:
        data = json.loads(path.read_text())
        metas.append(data["meta"])
        records += data["records"]
        feats = path.with_name(path.name[:-5] + ".features.safetensors")
        if feats.is_file():
            tensors = load_file(str(feats))
            reals.append(tensors["real"])
            fakes.append(tensors["fake"])
    if any(m != metas[0] for m in metas):
        raise InputError(f"shard results in {folder} were made with different settings; rerun them alike")
    if reals and len(reals) != len(files):
        raise InputError(f"some shards in {folder} lack Inception features; rerun them with the same metrics")
    order = sorted(range(len(records)), key=lambda i: records[i]["key"])
    records = [records[i] for i in order]
    if not reals:
        return metas[0], records, None, None
    return metas[0], records, torch.cat(reals)[order], torch.cat(fakes)[order]


def _set_metrics(real: torch.Tensor, fake: torch.Tensor, meta: dict, *, overall: bool) -> dict:
    from asuka.metrics import fid_from_features, kid_from_features

    names = set(meta["metrics"])
    if real.shape[0] < 2:
        return {key: None for name in sorted(names & set(_SET_KEYS)) for key in _SET_KEYS[name]}
    out: dict = {}
    if "fid" in names:
        out["fid"] = fid_from_features(real, fake)
    if "kid" in names:
        out.update(kid_from_features(real, fake, subsets=meta["kid_subsets"], subset_size=meta["kid_subset_size"]))
    if "ids" in names:
        out.update(_ids(real, fake, meta.get("ids_pca_dim"), overall=overall))
    return out


def _ids(real: torch.Tensor, fake: torch.Tensor, pca: int | None, *, overall: bool) -> dict:
    """U-/P-IDS of one group under the group-size rule (:func:`asuka.metrics.ids_min_pairs` of the SVM's input
    dimension): a smaller group is left out (``None``) — its value says nothing, every labeling being nearly
    separable —, except the overall set, which papers report whatever its size, and which is then flagged
    ``ids_reliable: false``. ``ids_min_pairs`` records the bound."""
    from asuka.metrics import ids_min_pairs, inception_discriminative_scores

    n, dim = real.shape[0], pca or real.shape[1]
    minimum = ids_min_pairs(dim)
    fits = pca is None or pca <= min(2 * n, real.shape[1])
    if not fits or (n < minimum and not overall):
        return {"u_ids": None, "p_ids": None, "ids_min_pairs": minimum}
    return {**inception_discriminative_scores(real, fake, pca_dim=pca), "ids_min_pairs": minimum,
            "ids_reliable": n >= minimum}


def _summarise(rows: list[int], records: list[dict], real: torch.Tensor | None, fake: torch.Tensor | None,
               meta: dict, *, overall: bool = False) -> dict:
    out: dict = {"n": len(rows)}
    names = [k for k in records[rows[0]] if k not in _NOT_METRICS]
    for name in names:
        values = [records[i][name] for i in rows if records[i][name] is not None]
        out[name] = sum(values) / len(values) if values else None
        if len(values) < len(rows):
            out[f"{name}_undefined"] = len(rows) - len(values)
    if real is not None:
        index = torch.tensor(rows)
        out.update(_set_metrics(real[index], fake[index], meta, overall=overall))
    return {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in out.items()}


def summarise(meta: dict, records: list[dict], real: torch.Tensor | None, fake: torch.Tensor | None) -> dict:
    """``{"overall": {...}, "by_domain": {...}, "by_hole_ratio": {...}}`` (domains only when there are any)."""
    if not records:
        raise InputError("no scored images to summarise")
    groups: dict[str, dict[str, list[int]]] = {"by_domain": {}, "by_hole_ratio": {}}
    for i, record in enumerate(records):
        groups["by_domain"].setdefault(record["domain"], []).append(i)
        groups["by_hole_ratio"].setdefault(hole_bin(record["hole_ratio"]), []).append(i)
    result = {"overall": _summarise(list(range(len(records))), records, real, fake, meta, overall=True)}
    if set(groups["by_domain"]) != {"all"}:
        result["by_domain"] = {d: _summarise(r, records, real, fake, meta) for d, r in groups["by_domain"].items()}
    bins = sorted(groups["by_hole_ratio"].items(), key=lambda kv: int(kv[0].split("-")[0]))
    result["by_hole_ratio"] = {b: _summarise(r, records, real, fake, meta) for b, r in bins}
    return result
