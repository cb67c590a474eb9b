"""The ``asuka`` command: ``asuka inpaint | ...``.

Subcommands are :class:`Subcommand` objects listed by ``"module:attribute"`` in :data:`SUBCOMMANDS`; another
module adds one with one line there. Modules named there must stay import-light (argparse only at top
level; torch, diffusers and friends are imported inside ``run``) so that ``asuka --help`` is fast.

Bad input (:class:`~asuka.errors.InputError`, missing files, unloadable weights) ends the command
with a one-line ``asuka <command>: error: ...`` message on stderr and exit status 1, without a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

from asuka.options import STANDARD_ROLES, STANDARD_WEIGHTS
from asuka.pipelines._hd import DEFAULT_MAX_SIZE, HD_STRATEGIES, HDStrategy


@dataclass(frozen=True)
class Subcommand:
    """One ``asuka <name>`` subcommand."""

    name: str
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int | None]


SUBCOMMANDS: list[str] = [
    "asuka.cli:INPAINT",
    "asuka.cli_evaluate:EVALUATE",
    "asuka.cli_serve:SERVE",
]

DEMO_SIZE = 256  # the demo photograph is resized to DEMO_SIZE x DEMO_SIZE
DEMO_STEPS = 20  # demo default for --steps: well under a minute on a laptop CPU with the tiny model
DEMO_SEED = 0


class CommandError(Exception):
    """A usage problem found after parsing (e.g. --mask without --image); printed as one line."""


# ----------------------------------------------------------------------------------------------- inpaint
def positive_int(text: str) -> int:
    """argparse ``type`` for counts and sizes (shared by every subcommand)."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def non_negative_int(text: str) -> int:
    """argparse ``type`` for margins and offsets."""
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be an integer >= 0, got {text}")
    return value


def seed_int(text: str) -> int:
    """argparse ``type`` for seeds: integers in [0, 2**64), what ``torch.Generator.manual_seed`` takes."""
    value = int(text)
    if not 0 <= value < 2**64:
        raise argparse.ArgumentTypeError(f"must be an integer in [0, 2**64), got {text}")
    return value


def finite_float(text: str) -> float:
    """argparse ``type`` for real numbers: ``nan`` and ``inf`` are refused."""
    import math

    value = float(text)
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text}")
    return value


def add_method_arguments(p: argparse.ArgumentParser) -> None:
    """The flags that configure methods, shared by ``asuka inpaint`` and ``asuka evaluate``. With several methods
    (``evaluate --method a,b``) ``--model``/``--decoder``/``--preset`` take ``METHOD=VALUE`` for one of them and
    ``--set`` takes ``METHOD.KEY=VALUE``; unprefixed values apply to every method."""
    g = p.add_argument_group("method options (declared by each method; see asuka inpaint --method NAME --describe)")
    g.add_argument("--model", action="append", default=[], metavar="[METHOD=]DIR",
                   help="weights folder or hub id (default: the method's; for sd the tiny offline pipeline)")
    g.add_argument("--decoder", action="append", default=[], metavar="[METHOD=]DIR",
                   help="autoencoder export folder or hub id (e.g. a HarmonizingDecoderKL) replacing the method's "
                        "VAE; decodes with the image and mask")
    g.add_argument("--preset", action="append", default=[], metavar="[METHOD=]NAME",
                   help="named option values of the method (see --describe)")
    g.add_argument("--set", dest="set_options", action="append", default=[], metavar="[METHOD.]KEY=VALUE",
                   help="set a method option (repeatable; typed and range-checked; lists as a,b,c; none for unset)")
    g.add_argument("--steps", type=positive_int, help="shortcut for --set num_inference_steps=N")
    g.add_argument("--guidance-scale", type=finite_float, help="shortcut for --set guidance_scale=X")
    g.add_argument("--baseline", help="shortcut for --set baseline=NAME (methods built on a choice of baseline)")
    g.add_argument("--compile", action="store_true",
                   help="torch.compile the denoiser, VAE decoder, aligner and MAE once at load (faster repeated runs "
                        "on a GPU; the first image at each size compiles)")
    g.add_argument("--seed", type=seed_int, default=DEMO_SEED,
                   help="random seed: every image gets its own generator seeded with it (default: 0)")
    g = p.add_argument_group("extra inputs (for methods that declare them; folders are matched by file stem)")
    for role in STANDARD_ROLE_FLAGS:
        what = ("text for all images, or a .json/.txt file of per-stem texts" if STANDARD_ROLES[role] == "text"
                else "image file for all images, or a folder matched by file stem")
        g.add_argument(f"--{role.replace('_', '-')}", dest=f"input_{role}", help=f"{role.replace('_', ' ')}: {what}",
                       metavar="TEXT" if STANDARD_ROLES[role] == "text" else "PATH")
    g.add_argument("--input", dest="inputs", action="append", default=[], metavar="ROLE=VALUE",
                   help="any other input a method declares, given as the flags above")
    g = p.add_argument_group("extra weights (for methods that declare them)")
    for name in STANDARD_WEIGHTS:
        g.add_argument(f"--{name.replace('_', '-')}", dest=f"weights_{name}", metavar="PATH",
                       help=f"{name.replace('_', '-')} weights: a folder, file or hub id")
    g.add_argument("--weights", dest="weights", action="append", default=[], metavar="NAME=PATH",
                   help="any other weights a method declares")


STANDARD_ROLE_FLAGS = tuple(STANDARD_ROLES)


def _key_values(pairs: Sequence[str], flag: str) -> dict[str, str]:
    result = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise CommandError(f"{flag}: expected KEY=VALUE, got {pair!r}")
        result[key.strip()] = value
    return result


def _per_method(values: Sequence[str], methods: Sequence[str], flag: str) -> dict[str, str | None]:
    """``[METHOD=]VALUE`` entries -> each method's value (``None`` when not given)."""
    result: dict[str, str | None] = {m: None for m in methods}
    for value in values:
        name, sep, rest = value.partition("=")
        targets = [name] if sep and name in methods else list(methods)
        if sep and name in methods:
            value = rest
        for method in targets:
            if result[method] is not None:
                raise CommandError(f"{flag}: given twice for method {method!r}")
            result[method] = value
    return result


def method_requests(args: argparse.Namespace, methods: Sequence[str], *, demo: bool = False
                    ) -> tuple[list[dict], dict[str, object]]:
    """One :class:`~asuka.api.Inpainter` keyword dict per method, and the extra inputs given (by role), from the
    method flags. Options are checked here (each method's declarations), before anything loads; text inputs naming
    an existing .json/.txt file and image inputs become paths (per-stem tables / folders)."""
    from asuka.errors import InputError
    from asuka.pipelines._registry import get_method

    models, decoders = _per_method(args.model, methods, "--model"), _per_method(args.decoder, methods, "--decoder")
    presets = _per_method(args.preset, methods, "--preset")
    entries = _key_values(args.set_options, "--set")
    weights = {name: getattr(args, f"weights_{name}") for name in STANDARD_WEIGHTS
               if getattr(args, f"weights_{name}") is not None}
    weights.update(_key_values(args.weights, "--weights"))
    unused = set(weights) - {w.name for m in methods for w in get_method(m).spec.weights}
    if unused and len(methods) > 1:
        raise InputError(f"no listed method loads {sorted(unused)[0]!r} weights", f"weights.{sorted(unused)[0]}")
    requests = []
    for method in methods:
        spec = get_method(method).spec
        strings = {}
        for key, value in entries.items():
            target, dot, name = key.partition(".")
            if dot and target in methods:
                if target == method:
                    strings[name] = value
            else:
                strings[key] = value
        for flag, dest, key in OPTION_SHORTCUTS:
            value = getattr(args, dest)
            if value is not None:
                if key not in spec.by_name:
                    raise CommandError(f"{flag}: method {method!r} has no {key} option (see --describe)")
                if key in strings:
                    raise CommandError(f"{flag}: also given as --set {key}; pass one of them")
                strings[key] = str(value)
        values = {}
        preset_values = spec.preset(presets[method]).values if presets[method] else {}
        if demo and "num_inference_steps" in spec.by_name and "num_inference_steps" not in {**strings, **preset_values}:
            values["num_inference_steps"] = DEMO_STEPS
        declared = {w.name for w in spec.weights}
        request = dict(method=method, model=models[method], decoder=decoders[method], preset=presets[method],
                       options=values, option_strings=strings, compile=args.compile,
                       weights={k: v for k, v in weights.items() if len(methods) == 1 or k in declared})
        try:
            spec.resolve(request["preset"], values, strings)
            spec.resolve_weights(request["weights"])
        except InputError as err:
            if len(methods) == 1:
                raise
            raise InputError(f"method {method!r}: {err.message}", err.field) from None
        requests.append(request)
    given: dict[str, object] = {role: getattr(args, f"input_{role}") for role in STANDARD_ROLE_FLAGS
                                if getattr(args, f"input_{role}") is not None}
    given.update(_key_values(args.inputs, "--input"))
    kinds = {i.role: i.kind for m in methods for i in get_method(m).spec.inputs}
    for role, value in list(given.items()):
        kind = kinds.get(role, STANDARD_ROLES.get(role))
        path = Path(str(value))
        if kind == "image" or path.suffix.lower() in (".json", ".txt") and path.is_file():
            given[role] = path
    return requests, given


def _add_inpaint_arguments(p: argparse.ArgumentParser) -> None:
    hd = HDStrategy()
    p.add_argument("--image", help="image file or folder of images; without it, the demo runs on scikit-image's "
                                   f"astronaut photograph ({DEMO_SIZE} px) with a generated mask")
    p.add_argument("--mask", help="mask file (white = hole, threshold 128) or folder of masks matched to images by "
                                  "file stem; one mask file applies to every image of a folder")
    p.add_argument("--out", help="output file (.png/.jpg/...) or folder (default: outputs/; outputs/demo/METHOD for the "
                                 "demo); folder outputs are <stem>.png")
    p.add_argument("--method", default="sd", help="inference method (default: sd); see --list-methods")
    p.add_argument("--list-methods", action="store_true", help="print the available methods and exit")
    p.add_argument("--describe", action="store_true", help="print the method's options, presets and inputs and exit")
    p.add_argument("--json", action="store_true", help="with --describe: print them as a JSON schema")
    add_method_arguments(p)
    p.add_argument("--no-paste-back", dest="paste_back", action="store_false",
                   help="keep the model's pixels outside the hole (default: known pixels are pasted back exactly)")
    p.add_argument("--device", choices=("cpu", "cuda"), help="default: cuda when available, else cpu")
    p.add_argument("--sr", metavar="DIR", help="x4-upscaler folder or hub id (e.g. stabilityai/stable-diffusion-x4-"
                   "upscaler): HD-Painter's inpainting-specialised super-resolution of the result, long side 2048, "
                   "after any method")
    p.add_argument("--max-size", type=positive_int, default=DEFAULT_MAX_SIZE,
                   help=f"longest side a method is run at; larger inputs are an error (default: {DEFAULT_MAX_SIZE})")
    p.add_argument("--hd-strategy", choices=HD_STRATEGIES, default=hd.name,
                   help="large images: crop = process the box around the hole plus a margin, resize = process a "
                        f"downscaled copy, original = the whole image (default: {hd.name}, as IOPaint)")
    p.add_argument("--hd-trigger-size", type=positive_int, default=hd.trigger_size,
                   help=f"crop strategy: longest side above which it crops (default: {hd.trigger_size})")
    p.add_argument("--hd-margin", type=non_negative_int, default=hd.margin,
                   help=f"crop strategy: margin around the hole in pixels (default: {hd.margin})")
    p.add_argument("--hd-resize-limit", type=positive_int, default=hd.resize_limit,
                   help=f"resize strategy: longest side to process at (default: {hd.resize_limit})")
    add_reliability_arguments(p)


def add_reliability_arguments(p: argparse.ArgumentParser) -> None:
    """``--max-pixels`` and ``--fail-fast``, shared by ``asuka inpaint`` and ``asuka evaluate``."""
    from asuka.image_limits import DEFAULT_MAX_PIXELS

    p.add_argument("--max-pixels", type=positive_int, default=DEFAULT_MAX_PIXELS,
                   help="largest image (width x height) read, checked from the file header before decoding "
                        f"(default: {DEFAULT_MAX_PIXELS}, sized for a 24 GB machine)")
    p.add_argument("--fail-fast", action="store_true",
                   help="stop at the first unreadable input (default: skip it, finish the others, report every "
                        "failure at the end and exit with status 1)")


_SAVE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")


def _pairs(args: argparse.Namespace) -> list[tuple[str, object, object]]:
    """(output stem, image, mask) for every input; image/mask are paths or arrays (demo)."""
    from asuka.api import pair_files

    if args.image is None:
        if args.mask is not None:
            raise CommandError("--mask needs --image (without --image the demo generates its own mask)")
        image, mask = demo_inputs()
        return [("astronaut", image, mask)]
    if args.mask is None:
        raise CommandError("--mask is required with --image (white = hole)")
    return pair_files(args.image, args.mask)


def demo_inputs(size: int = DEMO_SIZE):
    """scikit-image's astronaut photograph at ``size`` px and a misato_eval-recipe mask (seed 0), uint8 arrays."""
    import numpy as np
    import skimage.data
    from PIL import Image

    from asuka.masks import get_mask_generator
    from asuka.tensors import MASK_THRESHOLD

    photo = Image.fromarray(skimage.data.astronaut()).resize((size, size), Image.Resampling.BICUBIC)
    mask = get_mask_generator("misato_eval")(size, size, np.random.default_rng(DEMO_SEED))
    return np.asarray(photo), (mask >= MASK_THRESHOLD).astype(np.uint8) * 255


def _out_path(out: Path, stem: str, single: bool) -> Path:
    if out.suffix.lower() in _SAVE_SUFFIXES:
        if not single:
            raise CommandError(f"--out: {out} is a file but --image is a folder; pass an output folder")
        return out
    return out / f"{stem}.png"


def list_methods() -> str:
    """``--list-methods``: every method with its description; a method whose module fails to import is listed as
    unavailable with the reason. Torch-free."""
    from asuka.pipelines._registry import available_methods, get_method, unavailable_methods

    lines = [f"{name}: {get_method(name).description}" for name in available_methods()]
    lines += [f"{name}: unavailable ({reason})" for name, reason in unavailable_methods().items()]
    return "\n".join(lines)


def describe(method: str, as_json: bool = False) -> str:
    """``--describe [--json]``: the method's options, presets and inputs as tables or a JSON schema. Torch-free."""
    import json

    from asuka.pipelines._registry import get_method

    registered = get_method(method)
    if as_json:
        return json.dumps(registered.spec.schema(method, registered.description), indent=2)
    return f"{method}: {registered.description}\n\n{registered.spec.text()}"


def _run_inpaint(args: argparse.Namespace) -> int:
    if args.list_methods:
        print(list_methods())
        return 0
    if args.json and not args.describe:
        raise CommandError("--json goes with --describe")
    if args.describe:
        print(describe(args.method, args.json))
        return 0
    from tqdm.auto import tqdm

    from asuka.api import Inpainter, image_size, per_stem_inputs, quiet_loading
    from asuka.errors import InputError
    from asuka.pipelines._common import load_image, load_mask, mask_to_pil, prepare_inputs, to_pil

    demo = args.image is None
    [request], given = method_requests(args, [args.method], demo=demo)
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise CommandError("--device cuda: no CUDA device is available; use --device cpu")
    painter = Inpainter(**request, device=args.device, sr=args.sr)  # options checked here, nothing loaded yet
    pairs = _pairs(args)
    out = Path(args.out or (f"outputs/demo/{args.method}" if demo else "outputs"))  # one demo folder per method
    single = demo or not Path(args.image).is_dir()
    targets = [_out_path(out, stem, single) for stem, _, _ in pairs]
    check_output_clashes(pairs, targets)
    aligned = any(i.aligned and i.role in given for i in painter.spec.inputs)
    sizes = {stem: image_size(image) if isinstance(image, Path) else image.shape[1::-1]
             for stem, image, _ in pairs} if aligned else None
    inputs = per_stem_inputs(painter.spec, [stem for stem, _, _ in pairs], given, sizes=sizes)
    hd = HDStrategy(args.hd_strategy, args.hd_trigger_size, args.hd_margin, args.hd_resize_limit)

    failures: list[str] = []
    for (stem, image_in, mask_in), target in tqdm(list(zip(pairs, targets)), desc="inpaint", unit="image",
                                                   disable=len(pairs) == 1):
        try:
            image, mask = prepare_inputs(  # compact: 8-bit images stay uint8, only the processed crop is float
                load_image(image_in, name=f"--image {_shown(image_in, stem)}", max_pixels=args.max_pixels,
                           compact=True),
                load_mask(mask_in, name=f"--mask {_shown(mask_in, stem)}", max_pixels=args.max_pixels, compact=True),
                compact=True)
        except InputError as err:  # an unreadable input: the others still run (unless --fail-fast or only one)
            if args.fail_fast or len(pairs) == 1:
                raise
            failures.append(f"{stem}: {' '.join(str(err).split())}")
            continue
        if bool(mask.any()) and "runner" not in painter.__dict__:
            quiet_loading()  # loaded at the first image with a hole: no hole needs no model
        result = painter(image, mask, inputs=inputs[stem], seed=args.seed, paste_back=args.paste_back,
                         hd_strategy=hd, max_size=args.max_size, progress_bar=len(pairs) == 1, compact=True)
        try:
            save_image(to_pil(result)[0], target)
            if demo:
                save_image(to_pil(image)[0], target.with_name(f"{stem}_input.png"))
                save_image(mask_to_pil(mask)[0], target.with_name(f"{stem}_mask.png"))
        except OSError as err:  # e.g. a full disk: nothing half-written is left behind
            if args.fail_fast or len(pairs) == 1:
                raise
            failures.append(f"{stem}: cannot write {target}: {err}")
    written = len(pairs) - len(failures)
    where = targets[0] if len(targets) == 1 else \
        f"{written}{f' of {len(targets)}' if failures else ''} images in {out}"
    if written:
        print(f"asuka inpaint: wrote {where}" + (" (with the demo input and mask beside it)" if demo else ""))
    if failures:
        for line in failures:
            print(f"asuka inpaint: failed: {line}", file=sys.stderr)
        print(f"asuka inpaint: error: {len(failures)} of {len(pairs)} images failed (listed above)", file=sys.stderr)
        return 1
    return 0


def check_output_clashes(pairs: Sequence[tuple[str, object, object]], targets: Sequence[Path]) -> None:
    """Refuse, before any work, outputs that would overwrite an input image or mask, and two inputs that would be
    written to the same file (``x.png`` and ``x.jpg`` in one folder both give ``x.png``)."""
    inputs = {}
    for _, image_in, mask_in in pairs:
        for what, path in (("image", image_in), ("mask", mask_in)):
            if isinstance(path, Path):
                inputs.setdefault(path.resolve(), f"input {what} {path}")
    written: dict[Path, object] = {}
    for (_, image_in, _), target in zip(pairs, targets):
        key = target.resolve()
        if key in inputs:
            raise CommandError(f"--out: writing {target} would overwrite the {inputs[key]}; choose another --out")
        if key in written:
            raise CommandError(f"--out: {written[key]} and {image_in} would both be written to {target} (outputs are "
                               "named by file stem); rename one of them or run them separately")
        written[key] = image_in


def save_image(image, target: Path) -> None:
    """Write a PIL image atomically (:func:`asuka.atomic.atomic_path`): never a half-written file."""
    from asuka.atomic import atomic_path

    target = Path(target)
    with atomic_path(target) as tmp:
        image.save(tmp, format=_pil_format(target))


def _pil_format(target: Path) -> str:
    from PIL import Image

    fmt = Image.registered_extensions().get(target.suffix.lower())
    if fmt is None:
        raise CommandError(f"--out: cannot tell the image format of {target.name}; use .png, .jpg, .webp, .tif")
    return fmt


def _shown(source, stem: str) -> str:
    """How messages name an input: its file name (a mask file serving a folder is named as itself), else the stem."""
    return source.name if isinstance(source, Path) else stem


INPAINT = Subcommand("inpaint", "inpaint an image or a folder (no --image: demo on a bundled photograph)",
                     _add_inpaint_arguments, _run_inpaint)


# -------------------------------------------------------------------------------------------------- main
def _load_subcommands() -> list[Subcommand]:
    commands = []
    for spec in SUBCOMMANDS:
        module, _, attribute = spec.partition(":")
        commands.append(getattr(importlib.import_module(module), attribute))
    return commands


def build_parser() -> tuple[argparse.ArgumentParser, dict[str, Subcommand]]:
    parser = argparse.ArgumentParser(prog="asuka", description="Diffusion image inpainting toolkit (ASUKA).")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    commands = {}
    for command in _load_subcommands():
        command.add_arguments(sub.add_parser(command.name, help=command.help, description=command.help))
        commands[command.name] = command
    return parser, commands


OPTION_SHORTCUTS = (("--steps", "steps", "num_inference_steps"), ("--guidance-scale", "guidance_scale", "guidance_scale"),
                    ("--baseline", "baseline", "baseline"))
"""Flags that stand for one method option: (flag, argparse dest, option name)."""


def flag_for(field: str, parser: argparse.ArgumentParser, args: argparse.Namespace | None = None) -> str:
    """The command-line spelling of a library field (:class:`~asuka.errors.InputError`'s ``field``): ``options.KEY``
    is ``--set KEY`` (or its shortcut flag, e.g. ``--baseline``, when the command line used that), ``inputs.ROLE`` the
    role's flag (``--input ROLE`` for roles without one), a field that is an argument's ``dest`` that argument's flag;
    anything else is printed as is."""
    flags = {action.dest: action.option_strings[0] for action in parser._actions if action.option_strings}
    head, _, key = field.partition(".")
    if head == "options" and key:
        for flag, dest, option in OPTION_SHORTCUTS:
            if option == key and getattr(args, dest, None) is not None:
                return flag
        return f"--set {key}"
    if head == "inputs" and key:
        return flags.get(f"input_{key}", f"--input {key}")
    if head == "weights" and key:
        return flags.get(f"weights_{key}", f"--weights {key}")
    return flags.get(field, field)


def error_line(err: Exception, parser: argparse.ArgumentParser, args: argparse.Namespace | None = None) -> str:
    """One line for an error: an :class:`~asuka.errors.InputError` with a field is prefixed by its flag (as the
    command line ``args`` spelled it)."""
    from asuka.errors import InputError

    text = f"{flag_for(err.field, parser, args)}: {err.message}" if isinstance(err, InputError) and err.field else str(err)
    return " ".join(text.split())


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``asuka`` console script; returns the exit status."""
    parser, commands = build_parser()
    args = parser.parse_args(argv)
    from asuka.errors import InputError

    def one_line_warning(message, category, filename, lineno, file=None, line=None) -> None:
        print(f"asuka {args.command}: warning: {' '.join(str(message).split())}", file=sys.stderr)

    with warnings.catch_warnings():
        warnings.showwarning = one_line_warning  # restored on exit
        warnings.simplefilter("default", UserWarning)  # the command reports user warnings whatever the caller's filters
        try:
            return commands[args.command].run(args) or 0
        except (InputError, CommandError, FileNotFoundError, OSError) as err:
            subparser = parser._subparsers._group_actions[0].choices[args.command]
            print(f"asuka {args.command}: error: {error_line(err, subparser, args)}", file=sys.stderr)
            return 1


if __name__ == "__main__":
    sys.exit(main())
