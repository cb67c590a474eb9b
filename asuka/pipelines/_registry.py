"""One registry of inference methods by name (``sd``, ``asuka``, ...), used by ``asuka inpaint --method NAME``
and ``asuka evaluate --method NAME``.

A method joins with one decorator in its own module, which must be ``asuka/pipelines/<name>.py``
(dashes in the name become underscores) so it is found and imported only when asked for::

    # asuka/pipelines/mymethod.py
    from asuka.pipelines._registry import register_method

    @register_method("mymethod", default_model=lambda: "org/weights", description="one line")
    def build(model: str, *, device: torch.device, dtype: torch.dtype) -> InpaintRunner:
        ...

A builder loads the weights named by ``model`` (a folder or a hub id; :func:`resolve_model` checks a diffusers
pipeline one) and returns an :class:`InpaintRunner`:
a callable ``runner(image (B,3,H,W) [-1,1], mask (B,1,H,W) {0,1}, *, generator, **options) -> (B,3,H,W) [-1,1]``
with an attribute ``multiple`` (the size multiple it needs, 8 or 64). ``options`` are the method's own knobs
(``num_inference_steps``, ``prompt``, ``guidance_scale``...); a runner rejects ones it does not know. Runners
are driven through :func:`asuka.pipelines._common.run_inpainting`, which does the I/O, sizes and paste-back.
"""

from __future__ import annotations

import importlib
import importlib.util
import pkgutil
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Protocol

from asuka.errors import InputError

if TYPE_CHECKING:
    import torch

class InpaintRunner(Protocol):
    """What a method's builder returns."""

    multiple: int

    def __call__(self, image: "torch.Tensor", mask: "torch.Tensor", *, generator: "torch.Generator | None" = None,
                 **options: Any) -> "torch.Tensor": ...


Builder = Callable[..., InpaintRunner]


class PipelineRunner:
    """Base of runners that wrap a diffusers pipeline returning [0, 1] images: holds ``pipe`` and turns one call
    of it into ``(B,3,H,W)`` in [-1, 1]; subclasses spell out their options in ``__call__`` (the CLI reads them)."""

    multiple = 8

    def __init__(self, pipe) -> None:
        self.pipe = pipe

    def _run(self, like: "torch.Tensor", progress_bar: bool, **call_kwargs: Any) -> "torch.Tensor":
        """``pipe(**call_kwargs, output_type="pt")`` -> images in [-1, 1] with ``like``'s device and dtype."""
        self.pipe.set_progress_bar_config(disable=not progress_bar)
        return self.pipe(**call_kwargs, output_type="pt").images.to(like) * 2 - 1


@dataclass(frozen=True)
class InpaintMethod:
    """A registered method: its name, builder, default weights and a one-line description."""

    name: str
    build: Builder
    default_model: Callable[[], str | Path] | None = None
    description: str = ""

    def load(self, model: str | Path | None = None, *, device: "torch.device | str" = "cpu",
             dtype: "torch.dtype | None" = None) -> InpaintRunner:
        """Build the runner from ``model`` (a folder or hub id; the method's default when ``None``)."""
        import torch

        if model is None:
            if self.default_model is None:
                raise InputError(f"method {self.name!r} has no default weights; pass a folder or hub id", "model")
            model = self.default_model()
        try:
            return self.build(model, device=torch.device(device), dtype=dtype or torch.float32)
        except InputError:
            raise
        except (ValueError, OSError, KeyError, TypeError) as err:  # diffusers/transformers loading failures
            raise InputError(f"cannot load {str(model)!r} as method {self.name!r}: {' '.join(str(err).split())}",
                             "model") from err


_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def resolve_model(model: str | Path, *, name: str = "model") -> str:
    """A local diffusers pipeline folder or a hub id (``org/name``), checked before diffusers sees it (for
    builders whose weights are a diffusers pipeline)."""
    path = Path(model).expanduser()
    if path.exists():
        if not (path / "model_index.json").is_file():
            raise InputError(f"{path} is not a diffusers pipeline folder (no model_index.json); pass the folder written "
                             "by save_pretrained or a hub id such as org/name", name)
        return str(path)
    if isinstance(model, str) and _HUB_ID.match(model):
        return model
    raise InputError(f"folder not found: {model} (pass an existing pipeline folder or a hub id org/name)", name)


def load_pipeline(pipeline_cls: Any, model: str | Path, dtype: "torch.dtype", **kwargs: Any) -> Any:
    """``pipeline_cls.from_pretrained`` on a checked folder or hub id (:func:`resolve_model`) in ``dtype``.

    Newer diffusers rename ``torch_dtype`` to ``dtype`` with a FutureWarning; the old name works in every supported
    version, so it is passed and the rename warning silenced.
    """
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        return pipeline_cls.from_pretrained(resolve_model(model), torch_dtype=dtype, **kwargs)


_METHODS: dict[str, InpaintMethod] = {}


def register_method(name: str, *, default_model: Callable[[], str | Path] | None = None,
                    description: str = "") -> Callable[[Builder], Builder]:
    """Decorator registering ``build(model, *, device, dtype) -> InpaintRunner`` under ``name``."""

    def decorator(build: Builder) -> Builder:
        if name in _METHODS and _METHODS[name].build is not build:
            raise ValueError(f"inference method {name!r} is already registered by {_METHODS[name].build.__module__}")
        _METHODS[name] = InpaintMethod(name, build, default_model, description or (build.__doc__ or "").strip()
                                       .split("\n")[0])
        return build

    return decorator


def _module_for(name: str) -> str:
    return f"asuka.pipelines.{name.replace('-', '_')}"


def get_method(name: str) -> InpaintMethod:
    """The method registered as ``name``, importing ``asuka.pipelines.<name>`` on first use."""
    if name not in _METHODS:
        module = _module_for(name)
        if name.replace("-", "_").isidentifier() and importlib.util.find_spec(module) is not None:
            importlib.import_module(module)
    if name not in _METHODS:
        raise InputError(f"unknown inference method {name!r}; available: {', '.join(available_methods())}", "method")
    return _METHODS[name]


def available_methods() -> list[str]:
    """Names of all methods, importing every method module of ``asuka.pipelines``."""
    import asuka.pipelines as package

    for info in pkgutil.iter_modules(package.__path__):
        if not info.name.startswith("_"):  # _common, _registry, _hd...: infrastructure, not methods
            importlib.import_module(f"{package.__name__}.{info.name}")
    return sorted(_METHODS)


__all__ = ["InpaintMethod", "InpaintRunner", "PipelineRunner", "register_method", "get_method", "available_methods", "resolve_model"]
