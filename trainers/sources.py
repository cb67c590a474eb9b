"""Where a stage's pretrained parts come from: the ``"tiny"`` shorthand shared by every stage's path options."""

from __future__ import annotations

from pathlib import Path

__all__ = ["expand_tiny"]


def expand_tiny(path: str | Path) -> str | Path:
    """``path`` itself, or when ``path`` is ``"tiny"`` the tiny random SD-inpainting pipeline folder of the CPU demos
    (:func:`asuka.models.tiny.default_tiny_inpaint_dir`)."""
    if str(path) != "tiny":
        return path
    from asuka.models.tiny import default_tiny_inpaint_dir

    return str(default_tiny_inpaint_dir())
