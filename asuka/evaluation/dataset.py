"""Evaluation sets: the MISATO layout (with domains) or any image/mask folder pair matched by file stem."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from asuka.data.misato import MISATO_RESOLUTIONS, list_misato
from asuka.errors import InputError, InputFileNotFoundError
from asuka.pipelines._common import list_image_files

ALL_DOMAIN = "all"
_IMAGE_DIRS, _MASK_DIRS = ("image", "images"), ("mask", "masks")


@dataclass(frozen=True)
class EvalItem:
    """One ground-truth image, its mask (white = hole) and its domain (``"all"`` outside MISATO)."""

    key: str
    image_path: Path
    mask_path: Path
    domain: str = ALL_DOMAIN


def _subfolder(root: Path, names: tuple[str, ...]) -> Path | None:
    return next((root / n for n in names if (root / n).is_dir()), None)


def _misato_root(data: Path, resolution: int) -> tuple[Path, int] | None:
    """``(root, resolution)`` when ``data`` is a MISATO root (``data/<res>/image``) or a ``<res>`` folder."""
    if (data / str(resolution) / "image").is_dir():
        return data, resolution
    if data.name.isdigit() and int(data.name) in MISATO_RESOLUTIONS and (data / "image").is_dir():
        return data.parent, int(data.name)
    return None


def discover(data: str | Path, *, resolution: int = 512, masks: str | Path | None = None) -> list[EvalItem]:
    """List the evaluation items of ``data``.

    * MISATO: ``data/<resolution>/{image,mask}`` or ``data`` itself being the ``512``/``1024`` folder;
      items carry the MISATO domain (landscape, indoor, building, background).
    * Folder pair: ``data/{image,images}`` + ``data/{mask,masks}``, or ``data`` = images with ``masks`` given;
      masks are matched to images by file stem; the domain is ``"all"``.
    """
    data = Path(data).expanduser()
    if not data.is_dir():
        raise InputFileNotFoundError(f"no such folder {data}", "data")
    misato = None if masks is not None else _misato_root(data, resolution)
    if misato is not None:
        return [EvalItem(m.key, m.image_path, m.mask_path, m.domain) for m in list_misato(*misato)]
    image_dir = data if masks is not None else _subfolder(data, _IMAGE_DIRS)
    mask_dir = Path(masks).expanduser() if masks is not None else _subfolder(data, _MASK_DIRS)
    if image_dir is None or mask_dir is None or not mask_dir.is_dir():
        raise InputFileNotFoundError(
            f"{data}: expected a MISATO folder ({data}/{resolution}/image, {data}/{resolution}/mask), "
            f"a folder with image/ and mask/ subfolders, or a masks folder for a folder of images", "data")
    by_stem = {p.stem: p for p in list_image_files(mask_dir)}
    images = list_image_files(image_dir)
    if not images:
        raise InputError(f"no image files in {image_dir}", "data")
    stems: dict[str, Path] = {}
    for path in images:  # predictions are <stem>.png: two images of one stem would overwrite each other
        if path.stem in stems:
            raise InputError(f"{stems[path.stem].name} and {path.name} in {image_dir} share the stem "
                             f"{path.stem!r} (predictions are named <stem>.png); rename or remove one of them", "data")
        stems[path.stem] = path
    missing = [p.name for p in images if p.stem not in by_stem]
    if missing:
        raise InputFileNotFoundError(f"{len(missing)} image(s) in {image_dir} have no mask of the same stem in "
                                     f"{mask_dir}: {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    return [EvalItem(p.stem, p, by_stem[p.stem]) for p in images]


def find_prediction(folder: Path, key: str) -> Path | None:
    """The prediction file for ``key`` in ``folder`` (``<key>.png``, else any image extension)."""
    png = folder / f"{key}.png"
    if png.is_file():
        return png
    return next((p for p in sorted(folder.glob(f"{key}.*")) if p.suffix.lower() in (".jpg", ".jpeg", ".webp",
                                                                                       ".bmp", ".tif", ".tiff")),
                None)


def load_pair(item: EvalItem):
    """``(image (1,3,H,W) [-1,1], mask (1,1,H,W) {0,1})``; a mask of another size is resized (nearest) to the
    image, as the official MISATO loader does."""
    import torch.nn.functional as F

    from asuka.pipelines._common import load_image, load_mask

    image = load_image(str(item.image_path), name=f"image {item.image_path.name}")
    mask = load_mask(str(item.mask_path), name=f"mask {item.mask_path.name}")
    if mask.shape[-2:] != image.shape[-2:]:
        mask = F.interpolate(mask, size=image.shape[-2:], mode="nearest")
    return image, mask
