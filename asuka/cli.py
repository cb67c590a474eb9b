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
import inspect
import sys
import warnings
from dataclasses import dataclass
from functools import cache, partial
from pathlib import Path
from typing import Callable, Sequence

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
    "asuka.evaluation.cli:EVALUATE",
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


def _add_inpaint_arguments(p: argparse.ArgumentParser) -> None:
    hd = HDStrategy()
    p.add_argument("--image", help="image file or folder of images; without it, the demo runs on scikit-image's "
                                   f"astronaut photograph ({DEMO_SIZE} px) with a generated mask")
    p.add_argument("--mask", help="mask file (white = hole, threshold 128) or folder of masks matched to images by "
                                  "file stem; one mask file applies to every image of a folder")
    p.add_argument("--out", help="output file (.png/.jpg/...) or folder (default: outputs/; outputs/demo for the "
                                 "demo); folder outputs are <stem>.png")
    p.add_argument("--method", default="sd", help="inference method (default: sd); see --list-methods")
    p.add_argument("--list-methods", action="store_true", help="print the available methods and exit")
    p.add_argument("--model", help="weights folder or hub id (default: the method's; for sd the tiny offline pipeline)")
    p.add_argument("--steps", type=positive_int, help="number of inference steps (default: the method's, "
                                                       f"50 for sd; {DEMO_STEPS} for the demo)")
    p.add_argument("--seed", type=int, default=DEMO_SEED, help="random seed, per image (default: 0)")
    p.add_argument("--prompt", help="text prompt (methods that take one)")
    p.add_argument("--guidance-scale", type=float, help="classifier-free guidance scale (default: the method's, "
                                                        "7.5 for sd)")
    p.add_argument("--no-paste-back", dest="paste_back", action="store_false",
                   help="keep the model's pixels outside the hole (default: known pixels are pasted back exactly)")
    p.add_argument("--device", choices=("cpu", "cuda"), help="default: cuda when available, else cpu")
    p.add_argument("--max-size", type=positive_int, default=DEFAULT_MAX_SIZE,
                   help=f"longest side a method is run at; larger inputs are an error (default: {DEFAULT_MAX_SIZE})")
    p.add_argument("--hd-strategy", choices=HD_STRATEGIES, default=hd.name,
                   help="large images: crop = process the box around the hole plus a margin, resize = process a "
                        f"downscaled copy, original = the whole image (default: {hd.name}, as IOPaint)")
    p.add_argument("--hd-trigger-size", type=positive_int, default=hd.trigger_size,
                   help=f"crop strategy: longest side above which it crops (default: {hd.trigger_size})")
    p.add_argument("--hd-margin", type=int, default=hd.margin,
                   help=f"crop strategy: margin around the hole in pixels (default: {hd.margin})")
    p.add_argument("--hd-resize-limit", type=positive_int, default=hd.resize_limit,
                   help=f"resize strategy: longest side to process at (default: {hd.resize_limit})")


_SAVE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")


def _pairs(args: argparse.Namespace) -> list[tuple[str, object, object]]:
    """(output stem, image, mask) for every input; image/mask are paths or arrays (demo)."""
    from asuka.errors import InputError, InputFileNotFoundError
    from asuka.pipelines._common import list_image_files

    if args.image is None:
        if args.mask is not None:
            raise CommandError("--mask needs --image (without --image the demo generates its own mask)")
        image, mask = demo_inputs()
        return [("astronaut", image, mask)]
    if args.mask is None:
        raise CommandError("--mask is required with --image (white = hole)")
    image, mask = Path(args.image), Path(args.mask)
    for flag, path in (("--image", image), ("--mask", mask)):
        if not path.exists():
            raise InputFileNotFoundError(f"{flag}: not found: {path} (check the path)")
    if not image.is_dir():
        if mask.is_dir():
            mask = _match_mask(image, mask)
        return [(image.stem, image, mask)]
    images = list_image_files(image)
    if not images:
        raise InputError(f"--image: no image files in folder {image}")
    return [(path.stem, path, _match_mask(path, mask) if mask.is_dir() else mask) for path in images]


def _match_mask(image: Path, mask_dir: Path) -> Path:
    from asuka.errors import InputFileNotFoundError
    from asuka.pipelines._common import list_image_files

    matches = [p for p in list_image_files(mask_dir) if p.stem == image.stem]
    if not matches:
        raise InputFileNotFoundError(f"--mask: no mask named {image.stem}.* in {mask_dir} for image {image.name} "
                                     "(masks are matched by file stem; or pass one mask file for all images)")
    return matches[0]


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


def method_options(runner, method: str, *, steps: int | None, prompt: str | None, guidance_scale: float | None,
                   progress_bar: bool) -> dict[str, object]:
    """Keyword options for a method's ``runner`` from the shared flags (``asuka inpaint`` and ``asuka evaluate``):
    ``None`` values are left to the method's default; a flag the runner does not take is an error;
    ``progress_bar`` is passed only where taken."""
    params = inspect.signature(runner).parameters
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    given = {"--steps": ("num_inference_steps", steps), "--prompt": ("prompt", prompt),
             "--guidance-scale": ("guidance_scale", guidance_scale), "": ("progress_bar", progress_bar)}
    options = {}
    for flag, (keyword, value) in given.items():
        if value is None:
            continue
        if keyword in params or takes_any:
            options[keyword] = value
        elif flag:
            raise CommandError(f"{flag}: method {method!r} does not take this option")
    return options


def _quiet_loading() -> None:
    """No weight-loading progress bars from diffusers/transformers (the step bar stays)."""
    import diffusers
    import transformers

    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()


def _run_inpaint(args: argparse.Namespace) -> int:
    import torch
    from tqdm.auto import tqdm

    from asuka.pipelines._common import load_image, load_mask, mask_to_pil, prepare_inputs, run_inpainting, to_pil
    from asuka.pipelines._registry import available_methods, get_method

    if args.list_methods:
        for name in available_methods():
            print(f"{name}: {get_method(name).description}")
        return 0
    demo = args.image is None
    pairs = _pairs(args)
    out = Path(args.out or ("outputs/demo" if demo else "outputs"))
    single = demo or not Path(args.image).is_dir()
    targets = [_out_path(out, stem, single) for stem, _, _ in pairs]
    for (_, image_in, _), target in zip(pairs, targets):
        if isinstance(image_in, Path) and target.resolve() == image_in.resolve():
            raise CommandError(f"--out: writing {target} would overwrite the input image; choose another --out")
    hd = HDStrategy(args.hd_strategy, args.hd_trigger_size, args.hd_margin, args.hd_resize_limit)

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise CommandError("--device cuda: no CUDA device is available; use --device cpu")
    method = get_method(args.method)

    @cache
    def runner():  # loaded at the first image with a hole: inputs are checked first; no hole needs no model
        _quiet_loading()
        run = method.load(args.model, device=device)
        return run, method_options(run, args.method, steps=args.steps or (DEMO_STEPS if demo else None),
                                   prompt=args.prompt, guidance_scale=args.guidance_scale,
                                   progress_bar=len(pairs) == 1)

    for (stem, image_in, mask_in), target in tqdm(list(zip(pairs, targets)), desc="inpaint", unit="image",
                                                   disable=len(pairs) == 1):
        image, mask = prepare_inputs(load_image(image_in, name=f"--image {stem}"),
                                     load_mask(mask_in, name=f"--mask {stem}"))
        result = image  # no hole: written unchanged, and the model is not even loaded
        if bool(mask.any()):
            run, options = runner()
            result = run_inpainting(partial(run, generator=torch.Generator().manual_seed(args.seed), **options),
                                    image, mask, paste_back=args.paste_back, multiple=run.multiple, hd_strategy=hd,
                                    max_size=args.max_size)
        target.parent.mkdir(parents=True, exist_ok=True)
        to_pil(result)[0].save(target)
        if demo:
            to_pil(image)[0].save(target.with_name(f"{stem}_input.png"))
            mask_to_pil(mask)[0].save(target.with_name(f"{stem}_mask.png"))
    where = targets[0] if len(targets) == 1 else f"{len(targets)} images in {out}"
    print(f"asuka inpaint: wrote {where}" + (" (with the demo input and mask beside it)" if demo else ""))
    return 0


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


def flag_for(field: str, parser: argparse.ArgumentParser) -> str:
    """The command-line spelling of a library field (:class:`~asuka.errors.InputError`'s ``field``): a
    ``options.KEY`` field is ``--set KEY``, an ``inputs.ROLE`` field ``--ROLE``, a field that is an argument's
    ``dest`` that argument's flag; anything else is printed as is."""
    head, _, key = field.partition(".")
    if head == "options" and key:
        return f"--set {key}"
    if head == "inputs" and key:
        field = key
    flags = {action.dest: action.option_strings[0] for action in parser._actions if action.option_strings}
    return flags.get(field, flags.get(field.replace("-", "_"), field))


def error_line(err: Exception, parser: argparse.ArgumentParser) -> str:
    """One line for an error: an :class:`~asuka.errors.InputError` with a field is prefixed by its flag."""
    from asuka.errors import InputError

    text = f"{flag_for(err.field, parser)}: {err.message}" if isinstance(err, InputError) and err.field else str(err)
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
        try:
            return commands[args.command].run(args) or 0
        except (InputError, CommandError, FileNotFoundError, OSError) as err:
            subparser = parser._subparsers._group_actions[0].choices[args.command]
            print(f"asuka {args.command}: error: {error_line(err, subparser)}", file=sys.stderr)
            return 1


if __name__ == "__main__":
    sys.exit(main())
