"""Explicit weight resolution for metric backbones: nothing downloads unless the user asks.

torch-fidelity, torchmetrics and ``lpips`` all fetch their backbones from the internet when no local file
is given. Every metric here instead takes a local path, or downloads only when ``allow_download=True``
. A missing weight raises :class:`MissingWeightsError` for the parameter to set (its ``field``; the CLI names its
flag) and says where such a file comes from.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from asuka.errors import InputError


class MissingWeightsError(InputError, FileNotFoundError):
    """A metric needs backbone weights that were neither given nor allowed to download (``field``: the parameter)."""


@dataclass(frozen=True)
class WeightSource:
    """Where a backbone's weights come from, for error messages and docs."""

    what: str
    field: str
    url: str


def resolve_weights(path: str | Path | None, source: WeightSource, *, allow_download: bool) -> Path | None:
    """Return the local weight file, or ``None`` when downloading was explicitly allowed.

    Raises :class:`MissingWeightsError` when no path is given and downloading is not allowed, and when
    the given path does not exist.
    """
    if path is None:
        if allow_download:
            return None
        raise MissingWeightsError(
            f"{source.what} needs weights: pass the path of a local copy of {source.url}, or allow the download "
            "(allow_download) to fetch them into the torch hub cache", source.field)
    path = Path(path).expanduser()
    if not path.is_file():
        raise MissingWeightsError(f"no such file {str(path)!r} ({source.what}; source: {source.url})", source.field)
    return path


@contextmanager
def reading_weights(field: str) -> Iterator[None]:
    """Turn what reading a weight file raises (truncated, not a state dict, a pickle naming code, tensors of the
    wrong shape) into an :class:`~asuka.errors.InputError` for ``field`` (e.g. ``lpips_weights``)."""
    try:
        yield
    except InputError:
        raise
    except (ValueError, KeyError, RuntimeError, EOFError) as error:
        text = str(error.args[0]) if isinstance(error, KeyError) and error.args else str(error)
        raise InputError(" ".join(text.split()), field) from error
