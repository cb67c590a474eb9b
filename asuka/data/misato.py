"""MISATO evaluation set loader (paper §4; Yikai-Wang/asuka-misato README).

Layout (HF ``datasets/yikaiwang/MISATO``, unzipped)::

    ROOT/512/image/0000.png ... 1999.png      ROOT/512/mask/0000.png ... 1999.png
    ROOT/1024/image/0000.png ... 1499.png     ROOT/1024/mask/000000.png ...  ("00" + image name)

Domains by index: 0000-0499 landscape (Flickr-Landscape), 0500-0999 indoor (Matterport3D),
1000-1499 building (MegaDepth), 1500-1999 background (COCO 2014; absent at 1024). Masks are 8-bit
grey, 255 = hole; they load as 1 = hole (threshold 0.5 on the [0, 1] scale, as the official
loaders' ``/255`` then ``> 0.5``). Images and masks may be ``.png`` or ``.jpg`` (the official eval
scripts fall back from one to the other). A mask whose size differs from its image is resized to it
with nearest-neighbour interpolation, as the official ``InpaintingDataset`` does.

The dataset is research-only and is never downloaded here: pass the folder you unzipped.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch.nn.functional as F
from torch.utils.data import Dataset

from asuka.pipelines._common import load_image, load_mask

__all__ = ["MISATO_DOMAINS", "MISATO_RESOLUTIONS", "MisatoItem", "misato_domain", "list_misato", "MisatoDataset"]

MISATO_DOMAINS: tuple[tuple[str, int, int], ...] = (
    ("landscape", 0, 500), ("indoor", 500, 1000), ("building", 1000, 1500), ("background", 1500, 2000))
MISATO_RESOLUTIONS = (512, 1024)
_EXTENSIONS = (".png", ".jpg", ".jpeg")


def misato_domain(index: int) -> str:
    """Domain name of a MISATO image index (0-1999)."""
    for name, lo, hi in MISATO_DOMAINS:
        if lo <= index < hi:
            return name
    raise ValueError(f"MISATO index {index} is outside 0-1999")


@dataclass(frozen=True)
class MisatoItem:
    key: str
    index: int
    domain: str
    image_path: Path
    mask_path: Path


def _mask_stem(image_stem: str, resolution: int) -> str:
    return "00" + image_stem if resolution == 1024 else image_stem


def _find(folder: Path, stem: str) -> Path | None:
    for ext in _EXTENSIONS:
        p = folder / (stem + ext)
        if p.is_file():
            return p
    return None


def list_misato(root: str | Path, resolution: int = 512, domains: Sequence[str] | None = None) -> list[MisatoItem]:
    """The (image, mask, domain) triples of ``root/<resolution>/``, sorted by index.

    Raises FileNotFoundError naming the missing folder or the images without masks.
    """
    if resolution not in MISATO_RESOLUTIONS:
        raise ValueError(f"resolution must be one of {MISATO_RESOLUTIONS}, got {resolution}")
    known = [d[0] for d in MISATO_DOMAINS]
    if domains is not None and set(domains) - set(known):
        raise ValueError(f"unknown MISATO domains {sorted(set(domains) - set(known))}; choose from {known}")
    root = Path(root)
    base = root / str(resolution)
    for folder in (root, base, base / "image", base / "mask"):
        if not folder.is_dir():
            raise FileNotFoundError(
                f"MISATO folder missing: {folder}. Expected {root}/{resolution}/image/*.png and "
                f"{root}/{resolution}/mask/*.png (download datasets/yikaiwang/MISATO and unzip it into {root})")
    images = sorted(p for p in (base / "image").iterdir() if p.suffix.lower() in _EXTENSIONS and p.stem.isdigit())
    if not images:
        raise FileNotFoundError(f"no numbered images (0000.png ...) in {base / 'image'}")
    items, missing = [], []
    for img in images:
        mask = _find(base / "mask", _mask_stem(img.stem, resolution))
        if mask is None:
            missing.append(f"mask/{_mask_stem(img.stem, resolution)}.png")
            continue
        index = int(img.stem)
        domain = misato_domain(index)
        if domains is None or domain in domains:
            items.append(MisatoItem(key=img.stem, index=index, domain=domain, image_path=img, mask_path=mask))
    if missing:
        hint = " (at 1024 masks are named '00' + the image name)" if resolution == 1024 else ""
        raise FileNotFoundError(f"{len(missing)} MISATO image(s) in {base / 'image'} have no mask{hint}: "
                                f"{missing[:5]}{' ...' if len(missing) > 5 else ''}")
    return items


class MisatoDataset(Dataset):
    """MISATO as a map-style dataset: ``{"image": (3,H,W) [-1,1], "mask": (1,H,W) 1 = hole,
    "domain": str, "key": str, "index": int}``."""

    def __init__(self, root: str | Path, resolution: int = 512, domains: Sequence[str] | None = None):
        self.items = list_misato(root, resolution, domains)
        self.resolution = resolution

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict:
        item = self.items[i]
        image = load_image(str(item.image_path), name=f"MISATO image {item.image_path.name}")[0]
        mask = load_mask(str(item.mask_path), name=f"MISATO mask {item.mask_path.name}")
        if mask.shape[-2:] != image.shape[-2:]:
            mask = F.interpolate(mask, size=image.shape[-2:], mode="nearest")
        return {"image": image, "mask": mask[0], "domain": item.domain, "key": item.key, "index": item.index}

    def domain_counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for item in self.items:
            counts[item.domain] = counts.get(item.domain, 0) + 1
        return counts
