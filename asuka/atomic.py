"""Atomic file writes: a temporary file in the target's folder, flushed to disk, then renamed over the target.

A crash, a kill or a full disk leaves either the previous file or the complete new one — never a half-written PNG or
checkpoint. Used by the output writers of ``asuka inpaint`` / ``asuka evaluate`` and by the training checkpoints.
"""

from __future__ import annotations

import os
import stat
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

__all__ = ["atomic_path"]


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path`` (same suffix, so writers that pick the format from it work); when the
    block ends without an error, the file is flushed to disk and renamed over ``path``; otherwise it is removed.
    The file gets the permissions a plain ``open(path, "w")`` would give: those of the file it replaces, or 0o666
    less the umask for a new one (``mkstemp`` alone would leave 0o600)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, name = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=f".tmp{path.suffix}", dir=path.parent)
    os.close(handle)
    tmp = Path(name)
    try:
        yield tmp
        try:
            mode = stat.S_IMODE(path.stat().st_mode)
        except FileNotFoundError:
            mode = _new_file_mode()
        with open(tmp, "rb+") as f:
            os.fchmod(f.fileno(), mode)  # before the fsync, so the mode reaches the disk with the data
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_folder(path.parent)


def _new_file_mode() -> int:
    """0o666 less the process umask, read from /proc on Linux (``os.umask`` can only be read by setting it)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return 0o666 & ~int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return 0o666 & ~mask


def _fsync_folder(folder: Path) -> None:
    """Make a rename durable (best effort: some file systems cannot open folders)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
