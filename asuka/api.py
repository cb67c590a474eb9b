"""The one orchestration entry point: used by ``asuka inpaint``, ``asuka evaluate`` and the server alike.

What it does for every method, so no method and no front end does it again:

- **options**: resolved from the method's declarations (:mod:`asuka.options`): defaults < preset < values, each
  type- and range-checked *before* any model loads;
- **extra inputs** by role (prompt, reference image, control image...): one value for all items, or one per item
  (folders: matched by file stem; text: a ``.json``/``.txt`` table keyed by stem, see :func:`read_text_table`);
  missing required inputs, unmatched stems and aligned inputs of the wrong size are errors before any model loads;
- **loading once** (:class:`Inpainter`), with the method's VAE swapped for ``decoder=`` when given;
- **seeding** — the one seed rule (:data:`SEED_RULE`): every item gets its own ``torch.Generator`` (CPU) seeded with
  ``seed``, so an item's result depends only on its inputs, the options and the seed: not on its position in a
  folder, the batch it shares, the shard or a resumed run;
- the **HD strategy**, sizes and **paste-back** (:func:`asuka.pipelines._common.run_inpainting`).

Example::

    from asuka.api import Inpainter

    painter = Inpainter("sd", preset=None, options={"num_inference_steps": 20})
    out = painter("photo.png", "mask.png", inputs={"prompt": "a wooden bench"}, seed=0)   # (1,3,H,W) in [-1,1]
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Sequence

from asuka.errors import InputError, InputFileNotFoundError
from asuka.options import MethodSpec
from asuka.pipelines._hd import DEFAULT_MAX_SIZE, HDStrategy
from asuka.pipelines._registry import InpaintMethod, get_method

if TYPE_CHECKING:
    import torch

SEED_RULE = "per item: torch.Generator().manual_seed(seed)"
"""Recorded with every evaluation: each item's own CPU generator is seeded with ``seed``."""

TEXT_TABLE_SUFFIXES = (".json", ".txt")


# ------------------------------------------------------------------------------------------ file discovery
def image_files(folder: str | Path) -> list[Path]:
    from asuka.pipelines._common import list_image_files

    return list_image_files(folder)


def pair_files(image: str | Path, mask: str | Path) -> list[tuple[str, Path, Path]]:
    """``(stem, image, mask)`` for an image file or folder and a mask file or folder (matched by stem; one mask file
    applies to every image)."""
    image, mask = Path(image), Path(mask)
    for name, path in (("image", image), ("mask", mask)):
        if not path.exists():
            raise InputFileNotFoundError(f"not found: {path} (check the path)", name)
    images = [image] if not image.is_dir() else image_files(image)
    if not images:
        raise InputError(f"no image files in folder {image}", "image")
    if not mask.is_dir():
        return [(p.stem, p, mask) for p in images]
    masks = {p.stem: p for p in image_files(mask)}
    missing = [p.name for p in images if p.stem not in masks]
    if missing:
        raise InputFileNotFoundError(f"no mask of the same stem in {mask} for {_few(missing)} (masks are matched by "
                                     "file stem; or pass one mask file for all images)", "mask")
    return [(p.stem, p, masks[p.stem]) for p in images]


def read_text_table(path: str | Path, role: str) -> dict[str, str]:
    """Per-stem texts: a ``.json`` object ``{"stem": "text", ...}`` or a ``.txt`` file with one ``stem<TAB>text``
    (or ``stem: text``) line per image (blank lines and ``#`` comments skipped)."""
    path = Path(path)
    try:
        raw = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise InputError(f"cannot read {path}: {err}", f"inputs.{role}") from None
    if path.suffix.lower() == ".json":
        try:
            table = json.loads(raw)
        except json.JSONDecodeError as err:
            raise InputError(f"{path} is not valid JSON ({err})", f"inputs.{role}") from None
        if not isinstance(table, dict) or not all(isinstance(v, str) for v in table.values()):
            raise InputError(f"{path} must be a JSON object mapping file stems to texts", f"inputs.{role}")
        return table
    table = {}
    for number, line in enumerate(raw.splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        stem, sep, text = line.partition("\t") if "\t" in line else line.partition(": ")
        if not sep or not stem.strip():
            raise InputError(f"{path}:{number}: expected 'stem<TAB>text' or 'stem: text', got {line!r}",
                             f"inputs.{role}")
        table[stem.strip()] = text.strip()
    return table


def _few(names: Sequence[str], count: int = 5) -> str:
    return ", ".join(map(str, names[:count])) + (f" ... ({len(names)} in all)" if len(names) > count else "")


# --------------------------------------------------------------------------------------------- extra inputs
def per_stem_inputs(spec: MethodSpec, stems: Sequence[str], given: Mapping[str, Any], *,
                    sizes: Mapping[str, tuple[int, int]] | None = None) -> dict[str, dict[str, Any]]:
    """Each stem's extra inputs ``{stem: {role: value}}`` from what was given per role, checked before any model
    loads (torch-free).

    A given value is, per role: one value for every item (a text, or an image path / PIL / array / tensor); a
    ``{stem: value}`` mapping; for text roles a ``.json``/``.txt`` file (:func:`read_text_table`); for image roles a
    folder (files matched by stem). Unknown roles, a missing required input, a stem without a value and, with
    ``sizes`` (``{stem: (width, height)}``), an aligned image of another size are :class:`InputError`\\ s.
    Roles not given get their declared default (``None`` without one).
    """
    for role in given:
        spec.input(role)  # unknown role -> error naming the valid ones
    result: dict[str, dict[str, Any]] = {stem: {} for stem in stems}
    for declared in spec.inputs:
        role, value = declared.role, given.get(declared.role)
        if value is None:
            if declared.required:
                raise InputError(f"this method needs a {role.replace('_', ' ')} ({declared.help})", f"inputs.{role}")
            for stem in stems:
                result[stem][role] = declared.default
            continue
        table = _as_table(declared.kind, role, value)
        if table is not None:
            missing = [s for s in stems if s not in table]
            if missing:
                raise InputError(f"no {role.replace('_', ' ')} for {_few(missing)} in {_describe(value)} "
                                 "(matched by file stem)", f"inputs.{role}")
        for stem in stems:
            result[stem][role] = table[stem] if table is not None else value
        if declared.kind == "image":
            for stem in stems:
                _check_image_input(result[stem][role], role, stem, declared.aligned, (sizes or {}).get(stem))
    return result


def _as_table(kind: str, role: str, value: Any) -> dict[str, Any] | None:
    if isinstance(value, Mapping):
        return dict(value)
    if isinstance(value, (str, Path)):
        path = Path(value)
        if kind == "image" and path.is_dir():
            return {p.stem: p for p in image_files(path)}
        if kind == "text" and isinstance(value, Path):
            if path.suffix.lower() not in TEXT_TABLE_SUFFIXES or not path.is_file():
                raise InputError(f"{path} is not a .json or .txt file of per-stem texts", f"inputs.{role}")
            return read_text_table(path, role)
    return None


def _describe(value: Any) -> str:
    return str(value) if isinstance(value, (str, Path)) else "the given mapping"


def _check_image_input(value: Any, role: str, stem: str, aligned: bool, size: tuple[int, int] | None) -> None:
    if isinstance(value, (str, Path)):
        path = Path(value)
        if not path.is_file():
            raise InputFileNotFoundError(f"not found: {path} (for {stem})", f"inputs.{role}")
        if aligned and size is not None:
            try:
                own = image_size(path)  # as loaded (EXIF orientation applied), as the image's own size is read
            except OSError as err:
                raise InputError(f"cannot read {path} as an image ({err})", f"inputs.{role}") from None
            if tuple(own) != tuple(size):
                raise InputError(f"{path} is {own[0]}x{own[1]} but image {stem} is {size[0]}x{size[1]}; this input "
                                 "must have the image's size", f"inputs.{role}")


def image_size(path: str | Path) -> tuple[int, int]:
    """``(width, height)`` of an image file as it will be loaded (EXIF orientation applied), header only (no
    decompression-bomb check here: the loader checks the pixel count with its own limit and a clear error)."""
    from asuka.image_limits import read_header

    with read_header(path) as img:
        width, height = img.size
        orientation = img.getexif().get(0x0112, 1)
    return (height, width) if orientation in (5, 6, 7, 8) else (width, height)


def quiet_loading() -> None:
    """No weight-loading progress bars from diffusers/transformers (step bars stay)."""
    import diffusers
    import transformers

    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()


# ------------------------------------------------------------------------------------------------ running
@dataclass
class Inpainter:
    """A method with checked options, loaded once (lazily, at the first call that needs it).

    ``options`` (Python values) and ``option_strings`` (command-line text) override the ``preset``, which overrides
    the declared defaults; all are checked here, before any model loads. ``decoder``: an autoencoder export folder
    or hub id (or a loaded module) replacing the method's VAE. ``weights``: the method's declared extra weights
    (``{name: folder, file or hub id}``). ``sr``: an x4-upscaler folder or hub id; when set, every result goes
    through HD-Painter's inpainting-specialised super-resolution (long side 2048; ``sr_options`` are passed to
    :class:`asuka.pipelines.hd_painter.sr.InpaintSRPipeline`). ``compile``: ``True`` (or a dict of
    ``torch.compile`` arguments, e.g. ``{"mode": "max-autotune"}``) compiles the loaded method's denoiser, VAE decoder,
    aligner and MAE once, at load (:func:`asuka.compile.compile_runner`; results agree with eager to
    :data:`asuka.compile.COMPILE_TOLERANCE`).
    """

    method: str
    model: str | Path | None = None
    device: Any = None
    dtype: Any = None
    decoder: Any = None
    preset: str | None = None
    options: Mapping[str, Any] | None = None
    option_strings: Mapping[str, str] | None = None
    weights: Mapping[str, Any] | None = None
    sr: str | Path | None = None
    sr_options: Mapping[str, Any] | None = None
    compile: bool | Mapping[str, Any] = False
    resolved: dict[str, Any] = field(init=False)

    def __post_init__(self) -> None:
        self.registered: InpaintMethod = get_method(self.method)
        self.resolved = self.spec.resolve(self.preset, self.options, self.option_strings)
        self.spec.resolve_weights(self.weights)
        if self.sr is not None:  # checked before any model runs
            from asuka.weights import resolve_pretrained

            resolve_pretrained(self.sr, field="sr", marker="model_index.json", what="x4-upscaler pipeline")

    @property
    def spec(self) -> MethodSpec:
        return self.registered.spec

    @cached_property
    def torch_device(self) -> "torch.device":
        import torch

        return torch.device(self.device or ("cuda" if torch.cuda.is_available() else "cpu"))

    @cached_property
    def runner(self):
        """The loaded method (built at first access)."""
        runner = self.registered.load(self.model, device=self.torch_device, dtype=self.dtype, decoder=self.decoder,
                                      weights=self.weights)
        if self.compile:
            from asuka.compile import compile_runner

            compile_runner(runner, None if self.compile is True else self.compile)
        return runner

    @cached_property
    def sr_pipeline(self):
        """The loaded super-resolution stage (built at first access)."""
        from asuka.pipelines.hd_painter.sr import load_sr

        return load_sr(self.sr, device=self.torch_device, dtype=self.dtype or _float32())

    def release(self) -> None:
        """Drop the loaded models (loaded again at the next call that needs them)."""
        self.__dict__.pop("runner", None)
        self.__dict__.pop("sr_pipeline", None)

    def settings(self) -> dict[str, Any]:
        """How results are made (recorded by evaluation): method, weights, decoder, preset, every option, seed rule,
        the requested dtype (``None``: the method's default) and ``compile`` (compiled results differ from eager
        ones within :data:`asuka.compile.COMPILE_TOLERANCE`, reduced precision by more)."""
        return {"method": self.method, "model": None if self.model is None else str(self.model),
                "decoder": None if self.decoder is None or not isinstance(self.decoder, (str, Path))
                else str(self.decoder), "preset": self.preset,
                "options": {k: list(v) if isinstance(v, tuple) else v for k, v in self.resolved.items()},
                "weights": {k: None if v is None else str(v)
                            for k, v in self.spec.resolve_weights(self.weights).items()},
                "sr": None if self.sr is None else str(self.sr), "seed_rule": SEED_RULE,
                "dtype": None if self.dtype is None else str(self.dtype).removeprefix("torch."),
                "compile": self.compile if isinstance(self.compile, bool)
                else {k: v if isinstance(v, (bool, int, float, str, type(None))) else str(v)
                      for k, v in self.compile.items()}}

    def item_inputs(self, items: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        """Per-item inputs of a batch -> what the runner takes: text roles a list of strings (``None`` when no item
        has one), image roles loaded in [-1,1]: aligned ones one ``(B,3,H,W)`` tensor, others a list of
        ``(1,3,h,w)``."""
        import torch

        from asuka.pipelines._common import load_image

        batch: dict[str, Any] = {}
        for declared in self.spec.inputs:
            values = [item.get(declared.role, declared.default) for item in items]
            if all(v is None for v in values):
                batch[declared.role] = None
            elif declared.kind == "text":
                batch[declared.role] = ["" if v is None else str(v) for v in values]
            else:
                if any(v is None for v in values):
                    raise InputError("given for some items and not others; give it for every item",
                                     f"inputs.{declared.role}")
                loaded = [load_image(v, name=f"inputs.{declared.role}") for v in values]
                batch[declared.role] = torch.cat(loaded) if declared.aligned else loaded
        return batch

    def __call__(self, image, mask, *, inputs: Mapping[str, Any] | Sequence[Mapping[str, Any]] | None = None,
                 seed: int = 0, paste_back: bool = True, hd_strategy: HDStrategy | str = "crop",
                 max_size: int | None = DEFAULT_MAX_SIZE, progress_bar: bool = False,
                 compact: bool = False) -> "torch.Tensor":
        """Inpaint a batch: ``image``/``mask`` as :func:`asuka.pipelines._common.prepare_inputs` takes them;
        ``inputs`` one ``{role: value}`` for all items or a list with one per item. Returns (B,3,H,W) in [-1,1];
        with ``compact`` 8-bit inputs stay uint8, only the processed region is float, and the result is uint8
        (:func:`asuka.pipelines._common.run_inpainting`)."""
        import torch

        from asuka.pipelines._common import prepare_inputs, run_inpainting

        check_seed(seed)
        image, mask = prepare_inputs(image, mask, compact=compact)
        if compact and self.sr is not None:  # super-resolution works on the float image
            from asuka.pipelines._common import float_image

            image, mask, compact = float_image(image), mask.float(), False
        count = image.shape[0]
        per_item = [dict(inputs or {})] * count if inputs is None or isinstance(inputs, Mapping) else list(inputs)
        if len(per_item) != count:
            raise InputError(f"{len(per_item)} input sets for {count} images; pass one per image or one for all",
                             "inputs")
        for item in per_item:
            for role in item:
                self.spec.input(role)
        extras = self.item_inputs(per_item)
        if not bool((mask >= 0.5).any()):
            return self._upscale(image.clone(), image, mask, per_item, seed, progress_bar)  # nothing loaded
        runner, device = self.runner, self.torch_device

        def model(x, m, **given):
            generators = [torch.Generator().manual_seed(seed) for _ in range(x.shape[0])]
            given = {k: _to(v, device) for k, v in given.items()}
            return runner(x.to(device), m.to(device), generator=generators, progress_bar=progress_bar,
                          **self.resolved, **given)

        result = run_inpainting(model, image, mask, paste_back=paste_back, multiple=runner.multiple,
                                hd_strategy=hd_strategy, max_size=max_size, per_item=extras, compact=compact)
        return self._upscale(result, image, mask, per_item, seed, progress_bar)

    def _upscale(self, result, image, mask, per_item, seed: int, progress_bar: bool) -> "torch.Tensor":
        """With ``sr`` set: HD-Painter's x4 inpainting-specialised super-resolution of ``result`` into ``image``."""
        if self.sr is None:
            return result
        from asuka.pipelines.hd_painter.sr import super_resolve

        prompts = [str(item.get("prompt") or "") for item in per_item]
        return super_resolve(lambda: self.sr_pipeline, result, image, mask, prompts, seed=seed,
                             progress_bar=progress_bar, **dict(self.sr_options or {}))


def _float32():
    import torch

    return torch.float32


def check_seed(seed: Any) -> int:
    """``seed`` if it is an integer in ``[0, 2**64)`` (what ``torch.Generator.manual_seed`` takes), else an
    :class:`InputError` (field ``seed``)."""
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**64:
        raise InputError(f"must be an integer in [0, 2**64), got {seed!r}", "seed")
    return seed


def _to(value: Any, device) -> Any:
    import torch

    if torch.is_tensor(value):
        return value.to(device)
    if isinstance(value, list) and value and torch.is_tensor(value[0]):
        return [v.to(device) for v in value]
    return value


def inpaint(image, mask, *, method: str = "sd", model: str | Path | None = None, decoder: Any = None,
            preset: str | None = None, options: Mapping[str, Any] | None = None,
            inputs: Mapping[str, Any] | None = None, seed: int = 0, **call: Any) -> "torch.Tensor":
    """One-shot convenience: ``Inpainter(method, ...)(image, mask, ...)`` (loads the method every call)."""
    return Inpainter(method, model, decoder=decoder, preset=preset, options=options)(image, mask, inputs=inputs,
                                                                                      seed=seed, **call)


__all__ = ["SEED_RULE", "Inpainter", "check_seed", "inpaint", "pair_files", "per_stem_inputs", "read_text_table", "image_size"]
