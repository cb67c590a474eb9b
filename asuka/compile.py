"""``torch.compile`` for a loaded method (``Inpainter(..., compile=True)``, ``asuka inpaint --compile``).

:func:`compile_runner` compiles, in place and once, the modules a method calls many times or at full resolution:

- the **denoiser**: ``pipe.unet`` (SD-based methods) or ``pipe.transformer`` (FLUX) — the step loop's cost;
- the **VAE decoder** (``pipe.vae.decoder``, also a harmonizing decoder's), the **aligner** and the **MAE**
  (``pipe.aligner`` / ``pipe.mae``, ASUKA) where the pipeline has them.

Modules are compiled with :meth:`torch.nn.Module.compile` (in place: the module keeps its identity, names,
``config`` and attention processors, so :class:`asuka.attention.AttentionController` and every pipeline see the
same object). The MAE is called through its own ``prior`` -> ``forward`` method, so its ``forward`` is compiled.

**Channels-last**: on CUDA the denoiser and the VAE decoder are also put in ``torch.channels_last`` memory format
(NHWC convolutions are what cuDNN's tensor-core kernels use natively; diffusers' speed guide measures it with
``torch.compile`` for SD UNets). It is not applied on CPU, where the tiny test models gain nothing from it, and not
to the FLUX transformer (no convolutions).

Agreement: compiled and eager results agree to float32 rounding (inductor fuses and reorders reductions); the
test suite checks ``max |compiled - eager| <= 1e-4`` on images in [-1, 1] (tests/test_compile.py). The first call
at each new input size compiles (minutes at SD size on a GPU); later calls at that size reuse it.
"""

from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import nn

COMPILE_TOLERANCE = 1e-4
"""Documented max |compiled - eager| of an image in [-1, 1] (float32)."""


def denoiser_of(pipe: Any) -> nn.Module:
    """The module the step loop calls: ``pipe.transformer`` (FLUX) or ``pipe.unet``."""
    module = getattr(pipe, "transformer", None)
    if module is None:
        module = getattr(pipe, "unet", None)
    if module is None:
        raise TypeError(f"{type(pipe).__name__} has neither a unet nor a transformer to compile")
    return module


def compile_pipeline(pipe: Any, options: Mapping[str, Any] | None = None, *, channels_last: bool | None = None,
                     extras: bool = True) -> list[str]:
    """Compile ``pipe``'s denoiser (and, with ``extras``, its VAE decoder, aligner and MAE) in place with
    ``torch.compile(**options)``; returns the names compiled. ``channels_last`` defaults to ``True`` on CUDA.
    Calling it again on the same pipeline does nothing (each module is compiled once)."""
    options = dict(options or {})
    denoiser = denoiser_of(pipe)
    if channels_last is None:
        channels_last = denoiser.device.type == "cuda"
    targets: list[tuple[str, nn.Module]] = [("transformer" if denoiser is getattr(pipe, "transformer", None)
                                             else "unet", denoiser)]
    vae = getattr(pipe, "vae", None)
    if extras and vae is not None and isinstance(getattr(vae, "decoder", None), nn.Module):
        targets.append(("vae.decoder", vae.decoder))
    if extras and isinstance(getattr(pipe, "aligner", None), nn.Module):
        targets.append(("aligner", pipe.aligner))
    compiled = []
    for name, module in targets:
        if getattr(module, "_compiled_call_impl", None) is not None:
            continue
        if channels_last and name in ("unet", "vae.decoder"):
            module.to(memory_format=torch.channels_last)
        module.compile(**options)
        compiled.append(name)
    mae = getattr(pipe, "mae", None)
    if extras and isinstance(mae, nn.Module) and "forward" not in vars(mae):
        mae.forward = torch.compile(mae.forward, **options)  # prior() calls self.forward, not the module
        compiled.append("mae")
    return compiled


def compile_runner(runner: Any, options: Mapping[str, Any] | None = None, **kwargs: Any) -> list[str]:
    """:func:`compile_pipeline` on a method runner's ``pipe`` (every registered method's runner holds one)."""
    pipe = getattr(runner, "pipe", None)
    if pipe is None:
        raise TypeError(f"{type(runner).__name__} holds no pipeline (runner.pipe) to compile")
    return compile_pipeline(pipe, options, **kwargs)


__all__ = ["COMPILE_TOLERANCE", "compile_pipeline", "compile_runner", "denoiser_of"]
