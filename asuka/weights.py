"""Where weights come from: one resolver for "a local folder or a hub id" and one class-from-config dispatch.

- :func:`resolve_pretrained` checks a ``save_pretrained`` reference before diffusers/transformers see it: something
  that looks local (exists, is absolute, starts with ``.`` or ``~``) must be a folder holding ``marker``
  (``model_index.json`` for pipelines, ``config.json`` for models); anything else must be a hub id ``org/name``
  (downloaded only because the user named it). Every failure is an :class:`~asuka.errors.InputError` naming
  ``field`` (an :class:`~asuka.errors.InputFileNotFoundError`, also a ``FileNotFoundError``).
- :func:`config_class_name` reads the ``_class_name`` a folder or hub id records (``config.json`` /
  ``model_index.json``); :func:`class_from_config` returns the class it names: asuka's own
  (``HarmonizingDecoderKL``, ``MAEPrior``, ``PriorAligner``) or diffusers'.
- :func:`load_autoencoder` loads a VAE export (``AutoencoderKL``, ``AsymmetricAutoencoderKL``, asuka's
  ``HarmonizingDecoderKL``) through both: what ``decoder=`` / ``--decoder`` use.

Torch is imported only inside the loaders.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

from asuka.errors import InputError, InputFileNotFoundError

if TYPE_CHECKING:
    import torch

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
ASUKA_MODEL_MODULES = ("asuka.models.decoder", "asuka.models.mae", "asuka.models.aligner")
"""Modules whose classes a config's ``_class_name`` may name (besides diffusers')."""


def _looks_local(ref: str | Path) -> bool:
    text = str(ref)
    return isinstance(ref, Path) or text.startswith((".", "/", "~")) or Path(text).expanduser().exists()


def resolve_pretrained(ref: str | Path, *, field: str, marker: str = "config.json", what: str = "model") -> str:
    """A checked local ``save_pretrained`` folder (holding ``marker``) or hub id, as a string for
    ``from_pretrained``."""
    path = Path(ref).expanduser()
    if _looks_local(ref):
        if not path.exists():
            raise InputFileNotFoundError(f"folder not found: {ref} (pass an existing {what} folder or a hub id "
                                         "org/name)", field)
        if not (path / marker).is_file():
            raise InputFileNotFoundError(f"{path} is not a {what} folder (no {marker}); pass the folder written by "
                             "save_pretrained or a hub id such as org/name", field)
        return str(path)
    if HUB_ID.match(str(ref)):
        return str(ref)
    raise InputFileNotFoundError(f"folder not found: {ref} (pass an existing {what} folder or a hub id org/name)",
                                 field)


def config_class_name(ref: str | Path, *, field: str, config: str = "config.json") -> str | None:
    """The ``_class_name`` a ``save_pretrained`` folder (or hub id) records in ``config`` (``config.json`` for models,
    ``model_index.json`` for pipelines); ``None`` when a local folder has no such file."""
    import json

    path = Path(ref).expanduser()
    if _looks_local(ref):
        file = path / config
        return json.loads(file.read_text()).get("_class_name") if file.is_file() else None
    import diffusers

    loader = diffusers.DiffusionPipeline if config == "model_index.json" else diffusers.AutoencoderKL
    try:
        return loader.load_config(resolve_pretrained(ref, field=field, marker=config)).get("_class_name")
    except (OSError, ValueError) as err:
        raise InputError(f"cannot read the {config} of {ref}: {' '.join(str(err).split())}", field) from err


def class_from_config(ref: str | Path, *, field: str, allowed: tuple[type, ...] = ()) -> type:
    """The class named by a model folder's (or hub id's) ``config.json`` ``_class_name``: one of asuka's
    (:data:`ASUKA_MODEL_MODULES`) or diffusers'; with ``allowed``, it must subclass one of them."""
    import importlib

    import diffusers

    resolve_pretrained(ref, field=field)
    name = config_class_name(ref, field=field)
    cls = None
    for module in ASUKA_MODEL_MODULES:
        cls = cls or getattr(importlib.import_module(module), str(name), None)
    cls = cls or getattr(diffusers, str(name), None)
    if not isinstance(cls, type):
        raise InputError(f"{ref} holds a {name!r}, which is neither a diffusers class nor one of asuka's "
                         f"({', '.join(ASUKA_MODEL_MODULES)})", field)
    if allowed and not issubclass(cls, allowed):
        raise InputError(f"{ref} holds a {name}, not one of {', '.join(c.__name__ for c in allowed)}", field)
    return cls


def load_autoencoder(ref: str | Path, *, dtype: "torch.dtype | None" = None, field: str = "decoder") -> Any:
    """A VAE export (``AutoencoderKL`` / ``AsymmetricAutoencoderKL`` / ``HarmonizingDecoderKL``), its class from its
    config."""
    import warnings

    from diffusers import AsymmetricAutoencoderKL, AutoencoderKL

    cls = class_from_config(ref, field=field, allowed=(AutoencoderKL, AsymmetricAutoencoderKL))
    try:
        with warnings.catch_warnings():  # newer diffusers rename torch_dtype with a FutureWarning; the old name works
            warnings.simplefilter("ignore", FutureWarning)
            return cls.from_pretrained(resolve_pretrained(ref, field=field), torch_dtype=dtype)
    except loading_errors() as err:
        raise InputError(f"cannot load {ref} as {cls.__name__}: {' '.join(str(err).split())}", field) from err


def loading_errors() -> tuple[type[BaseException], ...]:
    """What diffusers / transformers raise for weight files that cannot be used: missing, truncated or corrupt
    safetensors, pickles refused by ``weights_only=True``, tensors of the wrong shape."""
    import pickle

    from safetensors import SafetensorError

    return (ValueError, OSError, KeyError, TypeError, EOFError, RuntimeError, pickle.UnpicklingError, SafetensorError)


__all__ = ["HUB_ID", "resolve_pretrained", "config_class_name", "class_from_config", "load_autoencoder",
           "loading_errors"]
