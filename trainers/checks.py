"""Argument checks shared by the stage modules, the datamodule and the schedule arithmetic."""

from __future__ import annotations

__all__ = ["check_positive_ints"]


def check_positive_ints(**values: object) -> None:
    """Raise ``ValueError`` naming the first argument that is not an integer >= 1."""
    for name, value in values.items():
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
