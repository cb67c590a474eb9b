"""Image and mask I/O, sizes and paste-back: every inference method goes through this module.

The tensor helpers it applies (padding, resizing, paste-back, uint8 conversion, :data:`MASK_THRESHOLD`) live in
:mod:`asuka.tensors`; errors are :mod:`asuka.errors`'s.

Conventions (README "Conventions"), applied once, at the boundary:

- **Images** become ``float32`` tensors ``(B, 3, H, W)`` in ``[-1, 1]``.
  Paths, PIL images and numpy arrays are API-edge formats: ``uint8`` is read as ``[0, 255]``, 16-bit
  (PIL ``I;16``/``I`` or ``uint16`` arrays) as ``[0, 65535]``, numpy floats as ``[0, 1]``. Grayscale is
  replicated to RGB; palette (``P``) and other modes go through PIL's RGB conversion; **alpha is dropped**
  (the stored RGB values are kept as they are, not composited on a background, so they stay bit-exact).
  Files are turned upright by their EXIF orientation. Torch tensors must already follow the convention
  (floating dtype, 3 channels, values in ``[-1, 1]``); anything else is an :class:`InputError` that names the fix.
- **Masks** become ``float32`` tensors ``(B, 1, H, W)`` with values in ``{0, 1}``, **1 = hole** (white in
  files). The one threshold is :data:`MASK_THRESHOLD` = 0.5 on the ``[0, 1]`` scale: a pixel is a hole when
  ``value >= 0.5``, i.e. ``>= 128`` for ``uint8``. Soft masks (values other than 0/1, 0/255, e.g. from JPEG or
  blurring) are binarized at that threshold with a :class:`SoftMaskWarning`. ``uint8``/``uint16`` masks whose
  maximum is 1 are 0/1 label masks and read as such. Masks with alpha (RGBA, LA, transparent palette files;
  2- or 4-channel arrays) are composited on black: transparent pixels are known whatever colour they store. Colour masks are accepted only when their R, G and B channels are equal (an error
  otherwise: a red stroke is not a hole).
- **Files**: the width and height are read from the header and checked against ``max_pixels`` (default
  :data:`~asuka.image_limits.DEFAULT_MAX_PIXELS`, 100 megapixels) before anything is decoded; truncated files are
  errors; an animated file (GIF, APNG, WebP) gives its first frame with an :class:`AnimatedImageWarning`.
- **Sizes**: image and mask must have the same size (an :class:`InputError` otherwise: resizing a mask silently
  moves the hole). Methods see inputs padded on the bottom/right to a multiple (8 by default, 64 where a method
  needs it): images by reflection, masks with zeros (padding is known context, never hole); the padding is
  cropped off the output.
- **Paste-back** (on by default): outside the hole the output is bit-identical to the input, also after
  ``to_pil``/``to_numpy_uint8`` for 8-bit inputs (``u8 / 255 * 2 - 1`` round-trips exactly through float32).
  For 16-bit inputs the saved 8-bit output equals the input rounded to 8 bits.

Example::

    from asuka.pipelines._common import load_image, load_mask, run_inpainting, to_pil

    image = load_image("photo.png")          # (1,3,H,W) in [-1,1]
    mask = load_mask("mask.png")             # (1,1,H,W) in {0,1}, 1 = hole
    out = run_inpainting(lambda x, m: x * (1 - m), image, mask)   # any (image, mask) -> image callable
    to_pil(out)[0].save("out.png")
"""

from __future__ import annotations

import os
import warnings
from functools import partial
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence, Union

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from asuka.errors import InputError, InputFileNotFoundError
from asuka.image_limits import DEFAULT_MAX_PIXELS, ImageTooLargeError, image_size, read_header
from asuka.pipelines._hd import DEFAULT_MAX_SIZE, HDStrategy, crop_region, resize_target
from asuka.tensors import DEFAULT_MULTIPLE, MASK_THRESHOLD, crop_padding, pad_to_multiple, resize_image, resize_mask
from asuka.tensors import paste_back as _paste_back  # run_inpainting's ``paste_back`` flag shadows the name
from asuka.tensors import to_numpy_uint8, to_uint8

_RANGE_TOLERANCE = 1e-3  # float tensors may overshoot [-1, 1] / [0, 1] by this much (then clamped)

ImageLike = Union[str, os.PathLike, Image.Image, np.ndarray, torch.Tensor]


class SoftMaskWarning(UserWarning):
    """A mask had values other than 0/1 (or 0/255) and was binarized at :data:`MASK_THRESHOLD`."""


class AnimatedImageWarning(UserWarning):
    """An animated image file (GIF, APNG, WebP) was given; only its first frame is used."""


# ----------------------------------------------------------------------------------------------- loading
def _open(path: str | os.PathLike, name: str, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Read an image file: its size is checked from the header first (:mod:`asuka.image_limits`, ``max_pixels``),
    then it is decoded whole (truncated files are errors) with its EXIF orientation; an animated file warns
    (:class:`AnimatedImageWarning`) and gives its first frame."""
    path = Path(path)
    if not path.exists():
        raise InputFileNotFoundError(f"{name}: file not found: {path} (check the path)")
    if path.is_dir():
        raise InputError(f"{name}: {path} is a folder; pass an image file")
    try:
        image_size(path, max_pixels=max_pixels, what=f"{name}: {path}")
    except ImageTooLargeError as err:
        raise InputError(str(err)) from None
    except ValueError:
        pass  # not an image: the decoder below names the problem
    try:
        with read_header(path) as img:  # Pillow's own decompression-bomb check is replaced by the one above
            frames = getattr(img, "n_frames", 1)
            img.load()
            ImageOps.exif_transpose(img, in_place=True)  # no copy of a large image
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        raise InputError(f"{name}: cannot read {path} as an image ({type(err).__name__}: {err}); "
                         "the file is truncated, corrupt or not an image - re-export it as PNG or JPEG") from None
    if frames > 1:
        warnings.warn(f"{name}: {path} is animated ({frames} frames); only its first frame is used - export the "
                      "frame you want as PNG to silence this", AnimatedImageWarning, stacklevel=4)
    return img


def _pil_to_array(img: Image.Image, *, keep_alpha: bool) -> np.ndarray:
    """PIL image -> numpy (H, W), (H, W, 3) or, with ``keep_alpha``, (H, W, 2|4), in its natural dtype
    (uint8, uint16 or float32)."""
    mode = img.mode
    if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        return np.clip(np.asarray(img, dtype=np.int64), 0, 65535).astype(np.uint16)
    if mode == "F":
        return np.asarray(img, dtype=np.float32)
    has_alpha = mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in img.info
    if mode in ("1", "L", "LA", "La"):
        return np.asarray(img.convert("LA" if keep_alpha and has_alpha else "L"))
    if has_alpha:
        rgba = np.asarray(img.convert("RGBA"))
        return rgba if keep_alpha else rgba[..., :3]
    return np.asarray(img if mode == "RGB" else img.convert("RGB"))


def _scale_array(arr: np.ndarray, name: str, what: str) -> np.ndarray:
    """numpy array -> float32 on the [0, 1] scale, by dtype (uint8 /255, uint16 /65535, float as is)."""
    if arr.dtype == np.uint8:
        return arr.astype(np.float32) / 255.0
    if arr.dtype == np.uint16:
        return arr.astype(np.float32) / 65535.0
    if arr.dtype == np.bool_:
        if what == "image":
            raise InputError(f"{name}: a boolean array is not an image; pass uint8 [0,255] or float [0,1] "
                             "(if this is a mask, pass it as mask)")
        return arr.astype(np.float32)
    if np.issubdtype(arr.dtype, np.floating):
        arr = arr.astype(np.float32)
        _check_values(torch.from_numpy(arr), name, (0.0, 1.0), "float arrays must be in [0, 1]",
                      "divide [0,255] data by 255 (or pass uint8)")
        return np.clip(arr, 0.0, 1.0)
    raise InputError(f"{name}: unsupported dtype {arr.dtype}; pass uint8 [0,255], uint16 [0,65535] "
                     f"or float [0,1] (e.g. arr.astype(np.uint8))")


def _check_values(x: torch.Tensor, name: str, bounds: tuple[float, float], rule: str, fix: str) -> None:
    """Finite float values within ``bounds`` (give or take :data:`_RANGE_TOLERANCE`); else an :class:`InputError`
    that states ``rule`` and suggests ``fix``."""
    if not bool(torch.isfinite(x).all()):
        raise InputError(f"{name}: contains NaN or inf values; replace them (e.g. torch.nan_to_num) before inpainting")
    lo, hi = (float(v) for v in torch.aminmax(x))
    if lo < bounds[0] - _RANGE_TOLERANCE or hi > bounds[1] + _RANGE_TOLERANCE:
        raise InputError(f"{name}: {rule}, got values in [{lo:.4g}, {hi:.4g}]; {fix}")


def _check_size(h: int, w: int, name: str) -> None:
    if h == 0 or w == 0:
        raise InputError(f"{name}: zero-size image ({w}x{h}); pass an image with at least one pixel")


def _image_from_numpy(arr: np.ndarray, name: str) -> torch.Tensor:
    if arr.ndim == 2:
        arr = arr[..., None]
    if arr.ndim == 3:
        arr = arr[None]
    if arr.ndim != 4 or arr.shape[-1] not in (1, 3, 4):
        raise InputError(f"{name}: numpy images must be (H,W), (H,W,C) or (B,H,W,C) with C in 1/3/4 "
                         f"(gray/RGB/RGBA, channels last); got shape {tuple(arr.shape)}")
    _check_size(arr.shape[1], arr.shape[2], name)
    x = torch.from_numpy(np.ascontiguousarray(_scale_array(arr, name, "image")))
    x = x.permute(0, 3, 1, 2)
    x = x[:, :3] if x.shape[1] == 4 else x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x
    return (x * 2 - 1).contiguous()


def _compact_image_from_numpy(arr: np.ndarray, name: str) -> torch.Tensor:
    """8-bit image array -> uint8 ``(B,3,H,W)`` in [0, 255] (a view where possible, no float copy); other dtypes
    take the float path."""
    if arr.dtype != np.uint8:
        return _image_from_numpy(arr, name)
    if arr.ndim == 2:
        arr = arr[..., None]
    if arr.ndim == 3:
        arr = arr[None]
    if arr.ndim != 4 or arr.shape[-1] not in (1, 3, 4):
        return _image_from_numpy(arr, name)  # names the problem
    _check_size(arr.shape[1], arr.shape[2], name)
    with warnings.catch_warnings():  # PIL's arrays are read-only; the compact image is never written to (no copy)
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        x = torch.from_numpy(arr).permute(0, 3, 1, 2)
    return x[:, :3] if x.shape[1] == 4 else x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x


def _compact_mask_from_numpy(arr: np.ndarray, name: str, band_pixels: int = 1 << 22) -> torch.Tensor:
    """Mask array -> uint8 ``(B,1,H,W)`` in {0, 1}, converted in bands of rows so no full-size float copy exists;
    identical to :func:`_mask_from_numpy` (one :class:`SoftMaskWarning` at most)."""
    if arr.ndim == 4 or arr.ndim < 2 or arr.dtype not in (np.uint8, np.uint16, np.bool_):
        return _mask_from_numpy(arr, name).to(torch.uint8)
    if arr.dtype != np.bool_ and arr.max() <= 1:
        arr = arr.astype(np.bool_)  # a 0/1 label mask: decided for the whole mask, not per band
    rows = max(1, band_pixels // max(1, arr.shape[1]))
    bands, soft = [], None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", SoftMaskWarning)
        for start in range(0, arr.shape[0], rows):
            bands.append(_mask_from_numpy(arr[start:start + rows], name).to(torch.uint8))
        soft = next((w for w in caught if issubclass(w.category, SoftMaskWarning)), None)
        others = [w for w in caught if not issubclass(w.category, SoftMaskWarning)]
    for w in others:
        warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    if soft is not None:
        warnings.warn(soft.message, SoftMaskWarning, stacklevel=4)
    return torch.cat(bands, dim=2)


def _image_from_tensor(x: torch.Tensor, name: str) -> torch.Tensor:
    if not x.is_floating_point():
        raise InputError(f"{name}: tensor dtype {x.dtype} is not floating point; image tensors are float in "
                         "[-1, 1] (convert uint8 with x.float() / 127.5 - 1, or pass a numpy array/PIL image)")
    if x.ndim == 3:
        x = x[None]
    if x.ndim != 4 or x.shape[1] != 3:
        raise InputError(f"{name}: image tensors must be (3,H,W) or (B,3,H,W) RGB; got shape {tuple(x.shape)} "
                         "(repeat grayscale with x.expand(-1, 3, -1, -1), drop alpha with x[:, :3])")
    _check_size(x.shape[-2], x.shape[-1], name)
    x = x.float()
    _check_values(x, name, (-1.0, 1.0), "image tensors must be in [-1, 1]",
                  "map [0,1] tensors with x * 2 - 1 and [0,255] ones with x / 127.5 - 1")
    return x.clamp(-1, 1)


def load_image(x: ImageLike, *, name: str = "image", max_pixels: int | None = DEFAULT_MAX_PIXELS,
               compact: bool = False) -> torch.Tensor:
    """Any image input -> float32 ``(B, 3, H, W)`` in ``[-1, 1]`` (``B = 1`` except for batched arrays/tensors).

    Accepts a path, a PIL image, a numpy array (channels last; uint8, uint16 or float in [0, 1]) or a tensor
    that already follows the convention. See the module docstring for every conversion.
    """
    return _convert(x, name, from_numpy=_compact_image_from_numpy if compact else _image_from_numpy,
                    from_tensor=_compact_image_from_tensor if compact else _image_from_tensor, keep_alpha=False,
                    max_pixels=max_pixels)


def _binarize(x: torch.Tensor, name: str) -> torch.Tensor:
    """[0, 1]-scale float mask -> {0, 1}; warn when it was not binary already."""
    hole = x >= MASK_THRESHOLD
    if not bool(((x == 0) | (x == 1)).all()):
        warnings.warn(f"{name}: soft mask (values other than 0/1 or 0/255) binarized at {MASK_THRESHOLD} "
                      "(>= 128 for uint8) - pass a binary mask to silence this", SoftMaskWarning, stacklevel=3)
    return hole.float()


def _mask_from_numpy(arr: np.ndarray, name: str) -> torch.Tensor:
    if arr.ndim == 2:
        arr = arr[..., None]
    if arr.ndim == 3:
        arr = arr[None]
    if arr.ndim != 4 or arr.shape[-1] not in (1, 2, 3, 4):
        raise InputError(f"{name}: numpy masks must be (H,W), (H,W,C) or (B,H,W,C) with C in 1-4 (gray, gray+alpha, "
                         f"RGB, RGBA; channels last); got shape {tuple(arr.shape)}")
    _check_size(arr.shape[1], arr.shape[2], name)
    if arr.dtype in (np.uint8, np.uint16) and arr.max() <= 1:
        arr = arr.astype(np.bool_)  # a 0/1 label mask stored as integers
    x = _scale_array(arr, name, "mask")
    if x.shape[-1] in (2, 4):  # alpha: composited on black, so transparent pixels are known whatever their colour
        x = x[..., :-1] * x[..., -1:]
    if x.shape[-1] == 3 and not (np.array_equal(x[..., 0], x[..., 1]) and np.array_equal(x[..., 0], x[..., 2])):
        raise InputError(f"{name}: colour mask (channels differ); pass a single-channel mask, e.g. arr[..., 0] "
                         "or a grayscale image")
    m = torch.from_numpy(np.ascontiguousarray(x[..., :1])).permute(0, 3, 1, 2)
    return _binarize(m, name)


def _mask_from_tensor(x: torch.Tensor, name: str) -> torch.Tensor:
    if not (x.is_floating_point() or x.dtype == torch.bool):
        raise InputError(f"{name}: tensor dtype {x.dtype} is not float or bool; mask tensors are float in [0, 1] "
                         "(1 = hole): use m.float() / 255 for 0/255 masks or m.bool() for 0/1 masks")
    if x.ndim == 2:
        x = x[None]
    if x.ndim == 3:
        x = x[:, None]
    if x.ndim != 4 or x.shape[1] != 1:
        raise InputError(f"{name}: mask tensors must be (H,W), (B,H,W) or (B,1,H,W); got shape {tuple(x.shape)} "
                         "(take one channel with m[:, :1])")
    _check_size(x.shape[-2], x.shape[-1], name)
    x = x.float()
    _check_values(x, name, (0.0, 1.0), "mask tensors must be in [0, 1] (1 = hole)", "divide 0/255 masks by 255")
    return _binarize(x, name)


def load_mask(x: ImageLike, *, name: str = "mask", max_pixels: int | None = DEFAULT_MAX_PIXELS,
              compact: bool = False) -> torch.Tensor:
    """Any mask input -> float32 ``(B, 1, H, W)`` in ``{0, 1}``, 1 = hole (threshold :data:`MASK_THRESHOLD`);
    ``compact``: uint8 {0, 1} instead (the same values, a quarter of the memory)."""
    return _convert(x, name, from_numpy=_compact_mask_from_numpy if compact else _mask_from_numpy,
                    from_tensor=_compact_mask_from_tensor if compact else _mask_from_tensor, keep_alpha=True,
                    max_pixels=max_pixels)


def _compact_mask_from_tensor(x: torch.Tensor, name: str) -> torch.Tensor:
    """A compact (uint8 (B,1,H,W) in {0, 1}) mask passes as it is; anything else follows the tensor convention."""
    if x.dtype == torch.uint8 and x.ndim == 4 and x.shape[1] == 1 and int(x.max()) <= 1:
        return x
    return _mask_from_tensor(x, name).to(torch.uint8)


def _compact_image_from_tensor(x: torch.Tensor, name: str) -> torch.Tensor:
    """A compact (uint8 (B,3,H,W)) image passes as it is; anything else follows the tensor convention."""
    if x.dtype == torch.uint8 and x.ndim == 4 and x.shape[1] == 3:
        _check_size(x.shape[-2], x.shape[-1], name)
        return x
    return _image_from_tensor(x, name)


def float_image(x: torch.Tensor) -> torch.Tensor:
    """A compact uint8 image -> float32 in [-1, 1] with exactly the values of 8-bit loading (``u8 / 255 * 2 - 1``);
    a float image is returned as it is."""
    return (x.float() / 255.0) * 2 - 1 if x.dtype == torch.uint8 else x


def _convert(x: ImageLike, name: str, *, from_numpy: Callable[[np.ndarray, str], torch.Tensor],
             from_tensor: Callable[[torch.Tensor, str], torch.Tensor], keep_alpha: bool,
             max_pixels: int | None = DEFAULT_MAX_PIXELS) -> torch.Tensor:
    """Dispatch one image-like input (path, PIL, numpy, tensor) to the converter for its type."""
    if isinstance(x, (str, os.PathLike)):
        x = _open(x, name, max_pixels)
    if isinstance(x, Image.Image):
        _check_size(x.height, x.width, name)
        return from_numpy(_pil_to_array(x, keep_alpha=keep_alpha), name)
    if isinstance(x, np.ndarray):
        return from_numpy(x, name)
    if isinstance(x, torch.Tensor):
        return from_tensor(x, name)
    raise InputError(f"{name}: unsupported type {type(x).__name__}; pass a path, PIL image, numpy array or tensor")


def _load_many(x, loader: Callable[..., torch.Tensor], name: str) -> torch.Tensor:
    if not isinstance(x, (list, tuple)):
        return loader(x, name=name)
    if len(x) > 1:
        loader = partial(loader, compact=False)  # items of a list are concatenated: one dtype
    if len(x) == 0:
        raise InputError(f"{name}: empty list; pass at least one item")
    items = [loader(item, name=f"{name}[{i}]") for i, item in enumerate(x)]
    sizes = {tuple(t.shape[-2:]) for t in items}
    if len(sizes) > 1:
        raise InputError(f"{name}: list items have different sizes {sorted(sizes)}; a batch needs one size "
                         "(run them one at a time)")
    return torch.cat([t.to(items[0].device) for t in items])


def prepare_inputs(image, mask, *, max_size: int | None = None,
                   compact: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Load, batch and check an image/mask pair -> ``(B,3,H,W)`` in [-1,1] and ``(B,1,H,W)`` in {0,1}.

    ``image`` / ``mask`` may be anything :func:`load_image` / :func:`load_mask` take, or lists of them.
    A batch of 1 is broadcast against the other side; other differing batch sizes are an error, and so are
    differing sizes. ``max_size`` (optional) bounds the longest side. ``compact``: 8-bit images stay uint8
    ``(B,3,H,W)`` in [0, 255] and masks uint8 {0, 1} (see :func:`run_inpainting`).
    """
    image = _load_many(image, partial(load_image, compact=compact), "image")
    mask = _load_many(mask, partial(load_mask, compact=compact), "mask").to(image.device)
    if image.shape[-2:] != mask.shape[-2:]:
        (ih, iw), (mh, mw) = image.shape[-2:], mask.shape[-2:]
        raise InputError(f"mask: size {mw}x{mh} differs from the image's {iw}x{ih}; resize the mask to {iw}x{ih} "
                         "with nearest-neighbour interpolation (e.g. mask.resize((W, H), Image.NEAREST))")
    bi, bm = image.shape[0], mask.shape[0]
    if bi != bm:
        if bm == 1:
            mask = mask.expand(bi, -1, -1, -1)
        elif bi == 1:
            image = image.expand(bm, -1, -1, -1)
        else:
            raise InputError(f"mask: batch size {bm} differs from the image batch size {bi}; pass one mask per "
                             "image or a single mask for all")
    if max_size is not None:
        check_max_size(image.shape[-2], image.shape[-1], max_size)
    if image.dtype == torch.uint8:  # compact: no copy of the full image
        return image, mask
    return image.contiguous(), mask.contiguous()


def per_image(text: str | Sequence[str], batch: int, name: str) -> list[str]:
    """``text`` (a prompt) for each of ``batch`` images: one string (or a one-item list) for all, or one per image;
    another count is an :class:`~asuka.errors.InputError` naming ``name``."""
    texts = [text] if isinstance(text, str) else list(text)
    if len(texts) == 1:
        return texts * batch
    if len(texts) != batch:
        raise InputError(f"{len(texts)} prompts for {batch} images; pass one prompt or one per image", name)
    return texts


def check_max_size(height: int, width: int, max_size: int) -> None:
    """Error when the longest side exceeds ``max_size``, naming the option to raise and the HD strategies."""
    if max(height, width) > max_size:
        raise InputError(f"the image's {width}x{height} exceeds max_size={max_size} (the longest side a method is run "
                         "at); raise max_size, or set hd_strategy to crop or resize to process a crop around the hole "
                         "or a downscaled copy", "max_size")


def to_pil(x: torch.Tensor) -> Image.Image | list[Image.Image]:
    """Images in [-1, 1] (or compact uint8 images) -> RGB PIL: a list for (B,3,H,W), one image for (3,H,W)."""
    arr = x.detach().movedim(-3, -1).cpu().numpy() if x.dtype == torch.uint8 else to_numpy_uint8(x)
    if arr.ndim == 3:
        return Image.fromarray(arr)
    return [Image.fromarray(a) for a in arr]


def mask_to_pil(m: torch.Tensor) -> Image.Image | list[Image.Image]:
    """Masks {0,1} -> ``L`` PIL (hole = 255): a list for (B,1,H,W), one image for (1,H,W) or (H,W)."""
    u8 = (m.detach().float() >= MASK_THRESHOLD).to(torch.uint8).mul(255).cpu().numpy()
    if u8.ndim == 4:
        return [Image.fromarray(a[0]) for a in u8]
    return Image.fromarray(u8.reshape(u8.shape[-2:]))


# --------------------------------------------------------------------------------------------- inference
InpaintFn = Callable[..., torch.Tensor]  # (image, mask, **per_item) -> image


def run_inpainting(
    model: InpaintFn,
    image,
    mask,
    *,
    paste_back: bool = True,
    multiple: int = DEFAULT_MULTIPLE,
    working_size: tuple[int, int] | None = None,
    hd_strategy: HDStrategy | str = "crop",
    max_size: int | None = DEFAULT_MAX_SIZE,
    per_item: Mapping[str, Any] | None = None,
    compact: bool = False,
) -> torch.Tensor:
    """The image geometry every method goes through (driven by :mod:`asuka.api`).

    ``model(image, mask) -> image`` takes and returns (b,3,h,w) in [-1,1] with (b,1,h,w) masks, h and w
    multiples of ``multiple``. Steps: load and check inputs (:func:`prepare_inputs`); items whose mask has no
    hole are returned unchanged and never reach ``model`` (so an all-known batch never calls it); the HD
    strategy picks the processed region; the region's longest side must be <= ``max_size``; it is resized to
    ``working_size`` (H, W) if given, padded to ``multiple``, inpainted, cropped and resized back, written into
    the full image; finally, with ``paste_back`` on (default), known pixels are pasted back exactly
    (:func:`asuka.tensors.paste_back`); with it off, pixels outside the processed region are still the input's.
    Returns (B,3,H,W) in [-1,1].

    ``compact`` (large images): 8-bit inputs stay uint8 and only the processed region (with the ``crop`` HD
    strategy, the box around the hole) is ever converted to float; the result is uint8 (B,3,H,W), equal to
    :func:`asuka.tensors.to_uint8` of the float result. A 9000×9000 photograph with a small hole then needs about
    1 GB instead of 6.8 GB (README, "Reliability promises").

    ``per_item`` (optional): per-item extras passed on as ``model(x, m, **extras)``: ``None`` stays ``None``, a list of
    ``B`` values keeps the items that reach the model, and a ``(B,C,H,W)`` tensor the image's size (an aligned input,
    e.g. a control image) is cropped, resized and padded exactly like the image.
    """
    image, mask = prepare_inputs(image, mask, compact=compact)
    strategy = hd_strategy if isinstance(hd_strategy, HDStrategy) else HDStrategy(name=hd_strategy)
    todo = torch.nonzero(mask.flatten(1).amax(dim=1) >= MASK_THRESHOLD).flatten()  # items with a hole (one sync)
    if todo.numel() == 0:
        return image.clone()
    every = todo.numel() == image.shape[0]  # then no indexing copy of the full batch
    img, msk = (image, mask) if every else (image[todo], mask[todo])
    keep = todo.tolist()
    extras = {role: None if value is None else [value[i] for i in keep] if isinstance(value, (list, tuple))
              else _aligned(value, image, role)[todo] for role, value in (per_item or {}).items()}

    box = crop_region(msk, strategy)
    if box is None:
        box = (0, img.shape[-2], 0, img.shape[-1])
    else:
        extras = {role: v[..., box[0]:box[1], box[2]:box[3]] if torch.is_tensor(v) else v
                  for role, v in extras.items()}
    top, bottom, left, right = box
    known = float_image(img[..., top:bottom, left:right])  # the only float copy of the image
    msk = msk[..., top:bottom, left:right].float()
    region = tuple(known.shape[-2:])
    size = working_size or resize_target(*region, strategy) or region
    if max_size is not None:
        check_max_size(size[0], size[1], max_size)

    x, m = resize_image(known, size), resize_mask(msk, size)
    x, pad = pad_to_multiple(x, multiple, mode="reflect")
    m, _ = pad_to_multiple(m, multiple, mode="constant")
    extras = {role: pad_to_multiple(resize_image(v, size), multiple, mode="reflect")[0] if torch.is_tensor(v) else v
              for role, v in extras.items()}
    out = model(x, m, **extras)
    if tuple(out.shape) != tuple(x.shape):
        raise RuntimeError(f"inpainting model returned shape {tuple(out.shape)} for input {tuple(x.shape)}")
    out = resize_image(crop_padding(out.to(image.device, torch.float32), pad), region)
    if paste_back:  # outside the region the result is the input anyway
        out = _paste_back(out, known, msk)

    result = image.clone()
    out = to_uint8(out) if image.dtype == torch.uint8 else out
    if every:
        result[..., top:bottom, left:right] = out
    else:
        result[todo, :, top:bottom, left:right] = out
    return result


def _aligned(value: torch.Tensor, image: torch.Tensor, role: str) -> torch.Tensor:
    """An aligned per-item input: ``(B,C,H,W)`` with the image's batch and size (a batch of 1 is broadcast)."""
    if value.ndim != 4 or value.shape[-2:] != image.shape[-2:] or value.shape[0] not in (1, image.shape[0]):
        raise InputError(f"shape {tuple(value.shape)} does not match the image's {tuple(image.shape)}; pass an image "
                         f"of the same size ({image.shape[-1]}x{image.shape[-2]})", f"inputs.{role}")
    return value.to(image.device, torch.float32).expand(image.shape[0], -1, -1, -1)


def list_image_files(folder: str | os.PathLike) -> list[Path]:
    """Image files in ``folder`` (not recursive), sorted by name."""
    exts = {ext for ext, fmt in Image.registered_extensions().items() if fmt in Image.OPEN}
    return sorted(p for p in Path(folder).iterdir() if p.is_file() and p.suffix.lower() in exts)


__all__: Sequence[str] = (
    "DEFAULT_MAX_SIZE", "DEFAULT_MAX_PIXELS", "SoftMaskWarning", "AnimatedImageWarning", "load_image", "load_mask", "prepare_inputs", "per_image", "check_max_size", "to_pil",
    "mask_to_pil", "run_inpainting", "list_image_files",
)
