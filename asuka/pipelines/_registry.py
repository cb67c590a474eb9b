"""One registry of inference methods by name (``sd``, ``asuka``, ...), used by ``asuka inpaint``, ``asuka evaluate``,
the Python API (:mod:`asuka.api`) and the server. Torch-free: listing methods and describing them imports no torch.

A method joins with one :func:`register_method` call in its own *torch-free* module, ``asuka/pipelines/<name>.py`` or
the package ``asuka/pipelines/<name>/__init__.py`` (dashes in the name become underscores), so it is found by name and
imported only when asked for. The call declares the method's options, presets and extra inputs
(:mod:`asuka.options`) and names its builder as ``"module:function"``, imported only when the method is loaded::

    # asuka/pipelines/mymethod/__init__.py   (imports nothing heavy)
    from asuka.options import Input, Option, Preset
    from asuka.pipelines._registry import register_method

    register_method(
        "mymethod", build="asuka.pipelines.mymethod.pipeline:build", default_model=lambda: "org/weights",
        description="one line",
        options=[Option("num_inference_steps", "int", 50, "denoising steps", "paper §4.1", min=1)],
        inputs=[Input("prompt", "text", "text prompt", default="")],
        presets=[Preset("fast", {"num_inference_steps": 20}, "fewer steps")],
    )

Modules and packages of ``asuka/pipelines`` whose name starts with ``_`` are infrastructure, never methods.

**Builder**: ``build(model, *, device, dtype, vae, **weights) -> runner``; ``model`` is a folder or hub id (checked
with :func:`resolve_model`), ``vae`` is ``None`` (keep the model's own) or an autoencoder module to use instead (e.g.
a ``HarmonizingDecoderKL``: decode with the image and mask, see ``asuka.pipelines._sampling.decode``); ``weights``
are the declared :class:`~asuka.options.Weights` (a folder, file or hub id each, ``None`` when not given).

**Runner**: ``runner(image, mask, *, generator, progress_bar, **options, **inputs) -> image`` with an attribute
``multiple`` (the size multiple it needs, 8 or 64). ``image`` is ``(B,3,H,W)`` in [-1,1], ``mask`` ``(B,1,H,W)`` in
{0,1} (1 = hole), ``generator`` a list of ``B`` ``torch.Generator`` (one per item), ``options`` every declared
option's resolved value, ``inputs`` every declared input by role: text -> a list of ``B`` strings (``None`` when
not given and without default); aligned image -> a ``(B,3,H,W)`` tensor in [-1,1] processed like ``image``; other
image -> a list of ``B`` ``(1,3,h,w)`` tensors in [-1,1] (``None`` when not given). Runners are driven through
:mod:`asuka.api` (I/O, per-item inputs, seeds, HD strategy, paste-back).
"""

from __future__ import annotations

import importlib
from contextlib import contextmanager
import importlib.util
import pkgutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping, Protocol, Sequence

from asuka.errors import InputError
from asuka.options import Input, MethodSpec, Option, Preset, Weights

if TYPE_CHECKING:
    import torch


class InpaintRunner(Protocol):
    """What a method's builder returns (see the module docstring for the call contract)."""

    multiple: int

    def __call__(self, image: "torch.Tensor", mask: "torch.Tensor", *, generator: "list[torch.Generator]",
                 progress_bar: bool, **options_and_inputs: Any) -> "torch.Tensor": ...


Builder = Callable[..., InpaintRunner]


class PipelineRunner:
    """Base of runners that wrap a diffusers pipeline returning [0, 1] images: holds ``pipe`` and turns one call
    of it into ``(B,3,H,W)`` in [-1, 1]; subclasses spell out their options in ``__call__``."""

    multiple = 8

    def __init__(self, pipe) -> None:
        self.pipe = pipe

    def _run(self, like: "torch.Tensor", progress_bar: bool, **call_kwargs: Any) -> "torch.Tensor":
        """``pipe(**call_kwargs, output_type="pt")`` -> images in [-1, 1] with ``like``'s device and dtype."""
        self.pipe.set_progress_bar_config(disable=not progress_bar)
        return self.pipe(**call_kwargs, output_type="pt").images.to(like) * 2 - 1


def _import_attribute(reference: str) -> Any:
    module, _, attribute = reference.partition(":")
    return getattr(importlib.import_module(module), attribute)


@dataclass(frozen=True)
class InpaintMethod:
    """A registered method: its name, builder (a callable or ``"module:function"``), default weights, one-line
    description and declarations (:class:`~asuka.options.MethodSpec`)."""

    name: str
    build: Builder | str
    default_model: Callable[[], str | Path] | str | None = None
    description: str = ""
    spec: MethodSpec = field(default_factory=MethodSpec)
    quick: Mapping[str, Any] = field(default_factory=dict)
    """Option values for smoke tests and benchmarks: the cheapest setting that still runs every stage."""

    def builder(self) -> Builder:
        return _import_attribute(self.build) if isinstance(self.build, str) else self.build

    def load(self, model: str | Path | None = None, *, device: "torch.device | str" = "cpu",
             dtype: "torch.dtype | None" = None, decoder: Any = None,
             weights: Mapping[str, Any] | None = None) -> InpaintRunner:
        """Build the runner from ``model`` (a folder or hub id; the method's default when ``None``), its VAE
        replaced by ``decoder`` (a loaded autoencoder or an export folder / hub id) when given, and the declared
        extra ``weights`` (``{name: folder, file or hub id}``; every declared one reaches the builder, ``None`` when
        not given)."""
        import torch

        extra = self.spec.resolve_weights(weights)
        if model is None:
            if self.default_model is None:
                raise InputError(f"method {self.name!r} has no default weights; pass a folder or hub id", "model")
            model = self.default_model() if callable(self.default_model) else self.default_model
        dtype = dtype or torch.float32
        if isinstance(decoder, (str, Path)):
            from asuka.weights import load_autoencoder

            decoder = load_autoencoder(decoder, dtype=dtype, field="decoder")
        from asuka.weights import loading_errors

        build = self.builder()
        try:
            with _hub_quiet():
                return build(model, device=torch.device(device), dtype=dtype, vae=decoder, **extra)
        except InputError:
            raise
        except loading_errors() as err:  # truncated / pickled / mis-shaped weight files
            raise InputError(f"cannot load {str(model)!r} as method {self.name!r}: {loading_error_text(err)}",
                             "model") from err


_NOT_CACHED = ("not fully cached locally", "outgoing traffic has been disabled", "couldn't connect to",
               "Cannot reach https://huggingface.co")


def loading_error_text(err: BaseException) -> str:
    """One line for a diffusers/transformers loading failure: a hub id that is neither cached nor reachable says so
    (instead of the libraries' advice to read a stack trace that is not shown)."""
    text = " ".join(str(err).split())
    if any(marker.lower() in text.lower() for marker in _NOT_CACHED):
        return ("it is not in the local Hugging Face cache and the Hub cannot be reached (offline); download it "
                "once with network access (e.g. `huggingface-cli download ID`) or pass a local folder")
    return text.replace(" Please check out the root cause in the stacktrace above.", "")


@contextmanager
def _hub_quiet():
    """diffusers' and transformers' loggers at error level while a method loads: their "Couldn't connect to the Hub /
    Will try to load from local cache" warnings are not actionable; a real failure is raised and reported once."""
    import diffusers
    import transformers

    levels = (diffusers.utils.logging.get_verbosity(), transformers.utils.logging.get_verbosity())
    diffusers.utils.logging.set_verbosity_error()
    transformers.utils.logging.set_verbosity_error()
    try:
        yield
    finally:
        diffusers.utils.logging.set_verbosity(levels[0])
        transformers.utils.logging.set_verbosity(levels[1])


def resolve_model(model: str | Path, *, name: str = "model") -> str:
    """A local diffusers pipeline folder (holding ``model_index.json``) or a hub id, checked before diffusers sees it
    (:func:`asuka.weights.resolve_pretrained`)."""
    from asuka.weights import resolve_pretrained

    return resolve_pretrained(model, field=name, marker="model_index.json", what="diffusers pipeline")


def load_pipeline(pipeline_cls: Any, model: str | Path, dtype: "torch.dtype", *, vae: Any = None,
                  **kwargs: Any) -> Any:
    """``pipeline_cls.from_pretrained`` on a checked folder or hub id (:func:`resolve_model`) in ``dtype``; ``vae``
    (a loaded autoencoder, e.g. a ``HarmonizingDecoderKL``; moved to ``dtype``) replaces the folder's when given.

    Newer diffusers rename ``torch_dtype`` to ``dtype`` with a FutureWarning; the old name works in every supported
    version, so it is passed and the rename warning silenced.
    """
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        if vae is not None:
            kwargs["vae"] = vae.to(dtype)
        return pipeline_cls.from_pretrained(resolve_model(model), torch_dtype=dtype, **kwargs)


_METHODS: dict[str, InpaintMethod] = {}
_UNAVAILABLE: dict[str, str] = {}  # method module name -> why it failed to import


def register_method(name: str, *, build: Builder | str | None = None,
                    default_model: Callable[[], str | Path] | str | None = None, description: str = "",
                    options: Sequence[Option] = (), inputs: Sequence[Input] = (),
                    presets: Sequence[Preset] = (), weights: Sequence[Weights] = (),
                    quick: Mapping[str, Any] | None = None) -> Any:
    """Register method ``name``: its builder (``"module:function"``, or a callable), default weights, description
    and declarations. ``quick``: option values for smoke tests and benchmarks (default: 2 steps when the method has
    ``num_inference_steps``), the cheapest setting that still runs every stage. Returns the
    :class:`InpaintMethod`; without ``build`` it is a decorator for the builder function (returned unchanged).
    Invalid declarations raise ``ValueError`` at registration."""
    if build is None:
        def decorator(function: Builder) -> Builder:
            register_method(name, build=function, default_model=default_model, description=description,
                            options=options, inputs=inputs, presets=presets, weights=weights, quick=quick)
            return function

        return decorator
    if not description and callable(build):
        description = (build.__doc__ or "").strip().split("\n")[0]
    spec = MethodSpec(options, inputs, presets, weights)
    if quick is None:
        quick = {"num_inference_steps": 2} if "num_inference_steps" in spec.by_name else {}
    try:
        spec.resolve(values=quick)
    except InputError as err:
        raise ValueError(f"method {name!r}: quick settings: {err}") from None
    method = InpaintMethod(name, build, default_model, description, spec, dict(quick))
    previous = _METHODS.get(name)
    if previous is not None and previous.build is not build and previous.build != build:
        where = previous.build if isinstance(previous.build, str) else previous.build.__module__
        raise ValueError(f"inference method {name!r} is already registered by {where}")
    _METHODS[name] = method
    return method


def _module_for(name: str) -> str:
    return f"asuka.pipelines.{name.replace('-', '_')}"


def _import_method_module(module: str) -> None:
    """Import a method module; a failure is remembered (and listed) instead of raised."""
    try:
        importlib.import_module(module)
    except Exception as err:  # noqa: BLE001 - any broken method module must not break the others
        _UNAVAILABLE[module.rpartition(".")[2]] = f"{type(err).__name__}: {' '.join(str(err).split())}"


def get_method(name: str) -> InpaintMethod:
    """The method registered as ``name``, importing ``asuka.pipelines.<name>`` on first use."""
    if name not in _METHODS:
        module = _module_for(name)
        if name.replace("-", "_").isidentifier() and importlib.util.find_spec(module) is not None:
            _import_method_module(module)
            reason = _UNAVAILABLE.get(module.rpartition(".")[2])
            if name not in _METHODS and reason:
                raise InputError(f"method {name!r} is unavailable: its module {module} failed to import ({reason})",
                                 "method")
    if name not in _METHODS:
        raise InputError(f"unknown inference method {name!r}; available: {', '.join(available_methods())}", "method")
    return _METHODS[name]


def _discover() -> None:
    import asuka.pipelines as package

    for info in pkgutil.iter_modules(package.__path__):
        if not info.name.startswith("_"):  # _common, _registry, _hd...: infrastructure, not methods
            _import_method_module(f"{package.__name__}.{info.name}")


def available_methods() -> list[str]:
    """Names of the methods that import, importing every method module of ``asuka.pipelines``."""
    _discover()
    return sorted(_METHODS)


def unavailable_methods() -> dict[str, str]:
    """Method modules that failed to import -> the reason (``ExceptionType: message``)."""
    _discover()
    return {name: reason for name, reason in sorted(_UNAVAILABLE.items()) if name not in _METHODS}


__all__ = ["InpaintMethod", "InpaintRunner", "PipelineRunner", "register_method", "get_method", "available_methods",
           "unavailable_methods", "resolve_model", "load_pipeline"]
