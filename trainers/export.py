"""Export a training checkpoint as a diffusers ``save_pretrained`` folder.

``python -m trainers.export --ckpt PATH --out checkpoints/mae`` rebuilds the stage module named in the checkpoint
from its saved hyper-parameters, loads the trained weights (the EMA shadow weights when the run used
:class:`trainers.ema.EMA`, unless ``--no-ema``), and writes ``module.exportable().save_pretrained(out)``. Works for every
:class:`trainers.base.StageModule`; frozen parts missing from the checkpoint come from ``module.load_pretrained()``.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import pkgutil
from pathlib import Path
from typing import Any

import torch

import trainers
from trainers.base import CHECKPOINT_KEY, StageModule
from trainers.checks import run_command
from trainers.ema import find_ema_state

__all__ = ["export_checkpoint", "load_stage_module", "main", "stage_classes"]


def stage_classes() -> dict[str, type[StageModule]]:
    """The allow-list of classes a checkpoint may name: every concrete :class:`StageModule` subclass of the
    ``trainers`` package (its modules are imported to find them) and of the running program, by
    ``module.QualifiedName``.

    A checkpoint only *names* its class; nothing outside this list is ever imported or called, so a crafted file
    cannot run code by naming e.g. ``os.system``.
    """
    for info in pkgutil.iter_modules(trainers.__path__, prefix="trainers."):
        importlib.import_module(info.name)  # our own modules only: registers their stage classes
    found: dict[str, type[StageModule]] = {}
    pending = list(StageModule.__subclasses__())
    while pending:
        cls = pending.pop()
        pending.extend(cls.__subclasses__())
        if not inspect.isabstract(cls):  # shared bases (trainers.alignment.AlignmentStage) build no module
            found[f"{cls.__module__}.{cls.__qualname__}"] = cls
    return found


def _read_checkpoint(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--ckpt {path} is not a file; pass a Lightning .ckpt written by python -m trainers.fit")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # truncated files, pickles naming globals outside torch's weights-only set
        raise ValueError(f"cannot read {path} as a checkpoint (torch.load with weights_only=True): "
                         f"{str(error).splitlines()[0] if str(error) else type(error).__name__}") from error
    if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get(CHECKPOINT_KEY), dict) \
            or "state_dict" not in checkpoint:
        raise ValueError(f"{path} is not a checkpoint of a trainers.base.StageModule (no {CHECKPOINT_KEY!r} entry)")
    return checkpoint


def load_stage_module(ckpt: str | Path, *, use_ema: bool = True) -> StageModule:
    """Rebuild the stage module of ``ckpt`` with its trained (or EMA) weights, in eval mode on CPU."""
    checkpoint = _read_checkpoint(ckpt)
    name = checkpoint[CHECKPOINT_KEY].get("module_class")
    allowed = stage_classes()
    if name not in allowed:
        raise ValueError(f"{ckpt} asks to build {name!r}, which is not a stage class of asuka; only these can be "
                         f"built from a checkpoint: {', '.join(sorted(allowed))}")
    cls = allowed[name]
    saved = checkpoint.get("hyper_parameters", {})
    if not isinstance(saved, dict) or not all(isinstance(k, str) for k in saved):
        raise ValueError(f"{ckpt}: hyper_parameters must be a dict with string keys, got {type(saved).__name__}")
    hparams = {k: v for k, v in saved.items() if not k.startswith("_")}
    try:
        module: StageModule = cls(**hparams)
    except (TypeError, ValueError, KeyError) as error:
        raise ValueError(f"{ckpt}: its hyper_parameters do not build {name}: {error}") from error
    state = dict(checkpoint["state_dict"])
    module.check_state_keys(state.keys(), source=f"checkpoint {ckpt}")  # KeyError naming the keys
    ema = find_ema_state(checkpoint) if use_ema else None
    if ema is not None:
        for name, tensor in ema.items():
            state[name] = tensor.to(state[name].dtype)
    exported_prefix = _prefix_of(module, module.exportable())
    full_keys = set(super(StageModule, module).state_dict().keys())  # frozen parts included
    if any(key.startswith(exported_prefix) and key not in state for key in full_keys):
        module.load_pretrained()  # the exported model has frozen parts that live outside the checkpoint
    try:
        module.load_state_dict(state, strict=False)
    except RuntimeError as error:  # mis-shaped tensors: a checkpoint of another configuration
        raise ValueError(f"checkpoint {ckpt} does not fit {name} built from its hyper_parameters: "
                         f"{' '.join(str(error).split())}") from error
    return module.eval()


def export_checkpoint(ckpt: str | Path, out: str | Path, *, use_ema: bool = True) -> Path:
    """Write the exportable model of ``ckpt`` to ``out`` with ``save_pretrained``; returns ``out``."""
    module = load_stage_module(ckpt, use_ema=use_ema)
    out = Path(out)
    module.exportable().save_pretrained(out)
    return out


def _prefix_of(module: torch.nn.Module, child: torch.nn.Module) -> str:
    for name, sub in module.named_modules():
        if sub is child:
            return f"{name}." if name else ""
    raise ValueError(f"{type(module).__name__}.exportable() must return one of its own submodules")


def main(argv: list[str] | None = None) -> None:
    run_command("python -m trainers.export", _main, argv)


def _main(argv: list[str] | None) -> None:
    parser = argparse.ArgumentParser(prog="python -m trainers.export", description=__doc__.split("\n\n")[0])
    parser.add_argument("--ckpt", required=True, help="Lightning checkpoint (.ckpt) written by python -m trainers.fit")
    parser.add_argument("--out", required=True, help="output folder for save_pretrained")
    parser.add_argument("--no-ema", action="store_true", help="export the raw weights even if EMA weights exist")
    args = parser.parse_args(argv)
    out = export_checkpoint(args.ckpt, args.out, use_ema=not args.no_ema)
    print(f"exported {args.ckpt} -> {out}")


if __name__ == "__main__":
    main()
