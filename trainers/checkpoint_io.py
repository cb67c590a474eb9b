"""Checkpoint files that survive crashes: atomic writes, safe reads, and the newest readable checkpoint for resume.

* :class:`AtomicCheckpointIO` (installed by ``python -m trainers.fit``) writes every checkpoint to a temporary file
  in the *same* folder, flushes it to disk (``fsync``) and renames it over the target (``os.replace``), so a kill, a
  full disk or a power loss leaves either the previous file or the complete new one, never a truncated one.
  Lightning's default writer stages the file in the system temp folder and *copies* it when that is another file
  system (the usual case on clusters), which is not atomic. Reads always use ``weights_only=True``.
* :func:`resolve_resume_path` turns ``--ckpt_path last`` into the newest checkpoint of the run's checkpoint folder
  that can be opened (``last.ckpt`` first when it is intact), warning about every newer one that cannot.
"""

from __future__ import annotations

import os
import warnings
import zipfile
from pathlib import Path
from typing import Any, Callable

import torch
from lightning.fabric.utilities.cloud_io import get_filesystem
from lightning.pytorch.plugins.io import TorchCheckpointIO

from asuka.atomic import atomic_path

__all__ = ["AtomicCheckpointIO", "atomic_torch_save", "checkpoint_problem", "resolve_resume_path"]


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save(obj, path)`` through :func:`asuka.atomic.atomic_path` (same-folder temporary file, ``fsync``,
    ``os.replace``)."""
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning ``CheckpointIO``: atomic local writes (module docstring); ``weights_only=True`` loads."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        if storage_options is not None or type(get_filesystem(path)).__name__ != "LocalFileSystem":
            return super().save_checkpoint(checkpoint, path, storage_options)  # remote: fsspec's transaction
        atomic_torch_save(checkpoint, path)

    def load_checkpoint(self, path: Any, map_location: Callable | None = lambda storage, loc: storage,
                        weights_only: bool | None = None) -> dict[str, Any]:
        return super().load_checkpoint(path, map_location=map_location, weights_only=True)


def checkpoint_problem(path: str | os.PathLike) -> str | None:
    """Why ``path`` cannot be a checkpoint (missing, empty, truncated: no complete zip archive), or ``None``.

    Cheap: reads the archive's directory, not the tensors.
    """
    path = Path(path)
    if not path.is_file():
        return "no such file"
    if path.stat().st_size == 0:
        return "empty file"
    try:
        with zipfile.ZipFile(path) as archive:
            if not any(name.endswith("data.pkl") for name in archive.namelist()):
                return "not a torch checkpoint archive"
    except (zipfile.BadZipFile, OSError) as error:
        return f"unreadable ({error}); the write was probably interrupted"
    return None


def resolve_resume_path(ckpt_path: str | None, folder: str | os.PathLike | None) -> str | None:
    """``ckpt_path`` itself, except ``"last"``: the newest readable ``*.ckpt`` in ``folder`` (``last.ckpt``
    preferred at equal age), with a warning naming every newer unreadable one. ``None`` (start from scratch, with a
    warning) when the folder holds no readable checkpoint. An explicit path must be readable (``ValueError``)."""
    if ckpt_path is None or ckpt_path in ("hpc", "best", "registry") or ckpt_path.startswith("registry:"):
        return ckpt_path
    if ckpt_path != "last":
        problem = checkpoint_problem(ckpt_path)
        if problem:
            raise ValueError(f"--ckpt_path {ckpt_path}: {problem}")
        return ckpt_path
    folder = Path(folder) if folder is not None else None
    found = [p for p in folder.glob("*.ckpt") if not p.name.startswith(".")] \
        if folder is not None and folder.is_dir() else []  # ".name.tmp.ckpt": a write in progress or interrupted
    candidates = sorted(found, key=lambda p: (p.stat().st_mtime, p.name.startswith("last")), reverse=True)
    skipped = []
    for path in candidates:
        problem = checkpoint_problem(path)
        if problem is None:
            if skipped:
                warnings.warn(f"--ckpt_path last: skipped {'; '.join(skipped)}; resuming from {path}", stacklevel=2)
            return str(path)
        skipped.append(f"{path.name} ({problem})")
    warnings.warn(f"--ckpt_path last: no readable checkpoint in {folder}"
                  f"{' (skipped ' + '; '.join(skipped) + ')' if skipped else ''}; starting from scratch", stacklevel=2)
    return None
