"""Reliability of data preparation and image readers (issue 17): truncated JPEGs skipped and counted, the one
pixel limit checked from the header before decoding, one-line errors for bad make_shards arguments."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import cv2
import numpy as np
import pytest

from asuka.data.make_shards import main as make_shards_main
from asuka.data.shards import decode_image, read_image_file, read_manifest
from asuka.image_limits import DEFAULT_MAX_PIXELS, ImageTooLargeError, image_size


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims ``width`` × ``height`` (no pixel data): what a decompression bomb looks like to
    a reader that checks the header first."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + \
        chunk(b"IEND", b"")


def _photos(folder: Path, n: int = 3) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    paths = []
    for i in range(n):
        path = folder / f"p{i}.jpg"
        cv2.imwrite(str(path), rng.integers(0, 256, (48, 64, 3), np.uint8))
        paths.append(path)
    return paths


def test_truncated_jpeg_is_skipped_and_counted_not_stored_grey(tmp_path, capsys):
    photos = _photos(tmp_path / "images")
    data = photos[0].read_bytes()
    photos[0].write_bytes(data[: len(data) // 2])  # cut in the middle of the entropy-coded data
    assert cv2.imread(str(photos[0])) is not None  # OpenCV alone would store it grey-filled
    with pytest.raises(ValueError, match="truncated"):
        read_image_file(photos[0])
    out = tmp_path / "shards"
    assert make_shards_main(["--images", str(tmp_path / "images"), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "(1 unreadable images skipped)" in printed and "skipped p0.jpg" in printed
    manifest = read_manifest(out)
    assert manifest["splits"]["train"]["samples"] == 2 and manifest["skipped"]["train"] == 1


def test_pixel_bombs_are_refused_from_the_header(tmp_path, capsys):
    bomb = png_header_only(30000, 30000)
    assert len(bomb) < 200
    with pytest.raises(ImageTooLargeError, match=r"30000×30000 = 900,000,000 pixels, above the limit of 100,000,000;"):
        image_size(bomb)
    with pytest.raises(ImageTooLargeError):
        decode_image(bomb)  # the training stream's decoder
    assert image_size(png_header_only(30000, 30000), max_pixels=10**9) == (30000, 30000)
    assert DEFAULT_MAX_PIXELS == 100_000_000

    _photos(tmp_path / "images", n=1)
    (tmp_path / "images" / "bomb.png").write_bytes(bomb)
    out = tmp_path / "shards"
    assert make_shards_main(["--images", str(tmp_path / "images"), "--out", str(out), "--workers", "1"]) == 0
    printed = capsys.readouterr().out
    assert "(1 unreadable images skipped)" in printed and "bomb.png" in printed and "above the limit" in printed


@pytest.mark.parametrize("args, message", [
    (["--size", "4"], "--size must be >= 8, got 4"),
    (["--maxcount", "0"], "--maxcount must be >= 1 (samples per shard), got 0"),
    (["--max-pixels", "0"], "--max-pixels must be >= 1, got 0"),
])
def test_bad_make_shards_arguments_give_one_line(tmp_path, capsys, args, message):
    _photos(tmp_path / "images", n=1)
    assert make_shards_main(["--images", str(tmp_path / "images"), "--out", str(tmp_path / "o"), *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"python -m asuka.data.make_shards: error: {message}"]
    assert not (tmp_path / "o").exists()
