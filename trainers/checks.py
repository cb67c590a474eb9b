"""Argument checks shared by the stage modules, the datamodule and the schedule arithmetic, and the one-line error
reporting of the ``python -m trainers.*`` commands."""

from __future__ import annotations

import sys
from typing import Callable, TypeVar

__all__ = ["check_positive_ints", "one_line", "run_command"]

T = TypeVar("T")


def check_positive_ints(**values: object) -> None:
    """Raise ``ValueError`` naming the first argument that is not an integer >= 1."""
    for name, value in values.items():
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")


def one_line(error: BaseException) -> str:
    """The message of ``error`` on one line. An error re-raised from a DataLoader worker ("Caught X in DataLoader
    worker process 0. Original Traceback ...") gives the original message, a ``KeyError`` its text unquoted."""
    text = str(error.args[0]) if isinstance(error, KeyError) and error.args else str(error)
    if "Original Traceback" in text:
        last = [line for line in text.splitlines() if line.strip()][-1].strip()
        name = type(error).__name__
        text = last[len(name) + 2:] if last.startswith(f"{name}: ") else last
    if text.startswith("Error(s) in loading state_dict"):  # torch's multi-line load_state_dict report
        text = "the checkpoint does not fit the model: " + "; ".join(
            line.strip() for line in text.splitlines()[1:4] if line.strip())
    return " ".join(text.split()) or type(error).__name__


def _is_user_error(error: BaseException) -> bool:
    from asuka.data.pipeline import DataStreamError

    if isinstance(error, (ValueError, KeyError, OSError, DataStreamError)):
        return True
    return isinstance(error, RuntimeError) and str(error).startswith("Error(s) in loading state_dict")


def run_command(prog: str, main: Callable[[list[str] | None], T], argv: list[str] | None) -> T:
    """``main(argv)``; bad arguments and files (``ValueError``, ``KeyError``, ``OSError``, a failing data stream, a
    checkpoint that does not fit) end with ``prog: error: <one line>`` on stderr and ``SystemExit(2)``."""
    try:
        return main(argv)
    except Exception as error:  # noqa: BLE001 - only user errors are reported; anything else keeps its traceback
        if not _is_user_error(error):
            raise
        print(f"{prog}: error: {one_line(error)}", file=sys.stderr, flush=True)
        raise SystemExit(2) from error
