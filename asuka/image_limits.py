"""The one pixel limit of every image reader in asuka, checked from the file header before anything is decoded.

A small compressed file can hold a huge image (a 1 MB PNG of 9000×9000 decodes to 243 MB of RGB and several GB of
float work buffers; an 875 KB PNG of 30000² to 2.7 GB). Every reader — ``asuka inpaint`` / ``asuka evaluate``
inputs, ``python -m asuka.data.make_shards``, the training stream, mask and shape folders — first reads the width and
height from the header (:func:`image_size`, no pixel data) and refuses images above ``max_pixels`` with a one-line
error naming the size, the limit and how to raise it (``--max-pixels`` on the commands, ``max_pixels=`` in Python).

:data:`DEFAULT_MAX_PIXELS` = 100 megapixels (e.g. 10000×10000): 300 MB as 8-bit RGB, so a reader's peak stays well
inside a 24 GB machine even with a few loader workers. Pillow's own decompression-bomb check (about 179 MP) is
replaced by this one, so a raised limit works.

Torch-free; the error is a ``ValueError`` subclass that callers may re-raise as their own input error.
"""

from __future__ import annotations

import io
import os
import warnings
from pathlib import Path

from PIL import Image

__all__ = ["DEFAULT_MAX_PIXELS", "ImageTooLargeError", "check_pixels", "image_size", "read_header"]

DEFAULT_MAX_PIXELS = 100_000_000


class ImageTooLargeError(ValueError):
    """An image has more pixels than the reader's ``max_pixels``."""


def check_pixels(width: int, height: int, max_pixels: int | None, what: str) -> None:
    """Raise :class:`ImageTooLargeError` when ``width * height`` exceeds ``max_pixels`` (``None``: no limit)."""
    if max_pixels is not None and width * height > max_pixels:
        raise ImageTooLargeError(
            f"{what} is {width}×{height} = {width * height:,} pixels, above the limit of {max_pixels:,}; downscale "
            "it, or raise the limit (--max-pixels / max_pixels=) if the machine has the memory")


def read_header(source: str | os.PathLike | bytes) -> Image.Image:
    """The image opened lazily (header only; Pillow's decompression-bomb check off: :func:`image_size` checks)."""
    previous = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            return Image.open(io.BytesIO(source) if isinstance(source, (bytes, bytearray, memoryview)) else source)
    finally:
        Image.MAX_IMAGE_PIXELS = previous


def image_size(source: str | os.PathLike | bytes, *, max_pixels: int | None = DEFAULT_MAX_PIXELS,
               what: str | None = None) -> tuple[int, int]:
    """``(width, height)`` of an image file or encoded bytes, read from the header only; raises
    :class:`ImageTooLargeError` above ``max_pixels`` and ``ValueError`` when the header is not an image's."""
    name = what or (str(source) if isinstance(source, (str, os.PathLike)) else "the image")
    try:
        with read_header(source) as img:
            width, height = img.size
    except (OSError, SyntaxError, ValueError) as error:  # UnidentifiedImageError is an OSError
        raise ValueError(f"{name} is not a readable image ({type(error).__name__}: {error})") from None
    check_pixels(width, height, max_pixels, name)
    return width, height

