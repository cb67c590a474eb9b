"""Image/mask I/O conventions, bad inputs, padding, HD strategies, paste-back and run_inpainting."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import skimage.data
import torch
from PIL import Image

from asuka.errors import InputError, InputFileNotFoundError
from asuka.pipelines._common import (
    SoftMaskWarning, list_image_files, load_image, load_mask, mask_to_pil, per_image, prepare_inputs, run_inpainting,
    to_pil,
)
from asuka.pipelines._hd import HDStrategy, crop_region, expand_box, hole_bbox, resize_target
from asuka.tensors import MASK_THRESHOLD, crop_padding, pad_to_multiple, paste_back, resize_mask, to_numpy_uint8


@pytest.fixture(scope="module")
def photo() -> np.ndarray:
    """A real photograph, 61 x 75 (sizes deliberately not multiples of 8)."""
    return np.ascontiguousarray(skimage.data.astronaut()[100:161, 150:225])


@pytest.fixture(scope="module")
def hole() -> np.ndarray:
    m = np.zeros((61, 75), np.uint8)
    m[20:40, 10:50] = 255
    return m


def _expected(u8: np.ndarray) -> torch.Tensor:
    """The convention by hand: uint8 HWC -> (1,3,H,W) float32 u8 / 127.5 - 1."""
    return torch.from_numpy(u8.astype(np.float32) / 255 * 2 - 1).permute(2, 0, 1)[None]


class Recorder:
    """A fake model: records its inputs, returns ``fill`` (or the image itself) in the hole."""

    def __init__(self, fill: float | None = 0.25):
        self.calls: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.fill = fill

    def __call__(self, x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
        self.calls.append((x.clone(), m.clone()))
        return x.clone() if self.fill is None else torch.full_like(x, self.fill)


def _must_not_run(x, m):
    raise AssertionError("the model must not be called")


# ------------------------------------------------------------------------------------------ image loading
def test_image_from_path_pil_numpy_tensor_agree(photo, tmp_path):
    path = tmp_path / "photo.png"
    Image.fromarray(photo).save(path)
    expected = _expected(photo)
    for source in (path, str(path), Image.fromarray(photo), photo, expected[0], expected):
        x = load_image(source)
        assert x.shape == (1, 3, 61, 75) and x.dtype == torch.float32
        assert torch.equal(x, expected)


def test_image_rgba_drops_alpha_keeping_rgb(photo):
    rgba = np.concatenate([photo, np.full(photo.shape[:2] + (1,), 7, np.uint8)], axis=-1)
    assert torch.equal(load_image(Image.fromarray(rgba, "RGBA")), _expected(photo))
    assert torch.equal(load_image(rgba), _expected(photo))


def test_image_grayscale_replicated(photo):
    gray = photo[..., 1]
    expected = _expected(np.repeat(gray[..., None], 3, axis=-1))
    assert torch.equal(load_image(Image.fromarray(gray, "L")), expected)
    assert torch.equal(load_image(gray), expected)
    assert torch.equal(load_image(gray[..., None]), expected)
    la = Image.fromarray(np.stack([gray, gray], -1), "LA")
    assert torch.equal(load_image(la), expected)


def test_image_palette_with_and_without_transparency(photo):
    pal = Image.fromarray(photo).quantize(16)
    assert torch.equal(load_image(pal), _expected(np.asarray(pal.convert("RGB"))))
    pal.info["transparency"] = 0
    assert torch.equal(load_image(pal), _expected(np.asarray(pal.convert("RGBA"))[..., :3]))


def test_image_16bit(tmp_path):
    values = np.array([[0, 1000], [40000, 65535]], np.uint16)
    expected = torch.from_numpy(values.astype(np.float32) / 65535 * 2 - 1)[None, None].expand(1, 3, 2, 2)
    path = tmp_path / "sixteen.png"
    Image.fromarray(values).save(path)
    assert Image.open(path).mode.startswith("I")
    assert torch.allclose(load_image(path), expected, atol=1e-6)
    assert torch.allclose(load_image(values), expected, atol=1e-6)
    assert torch.allclose(load_image(np.repeat(values[..., None], 3, -1)), expected, atol=1e-6)


def test_image_numpy_float_and_batches(photo):
    f = photo.astype(np.float64) / 255
    assert torch.allclose(load_image(f), _expected(photo), atol=1e-6)
    batch = np.stack([photo, photo[::-1]])
    x = load_image(batch)
    assert x.shape == (2, 3, 61, 75) and torch.equal(x[1], _expected(np.ascontiguousarray(photo[::-1]))[0])


def test_image_exif_orientation_applied(photo, tmp_path):
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display upright
    path = tmp_path / "rotated.jpg"
    Image.fromarray(photo).save(path, exif=exif, quality=95)
    assert load_image(path).shape == (1, 3, 75, 61)


def test_image_half_and_bf16_tensors_become_float32(photo):
    x = _expected(photo)
    for dtype in (torch.float16, torch.bfloat16, torch.float64):
        y = load_image(x.to(dtype))
        assert y.dtype == torch.float32 and torch.allclose(y, x, atol=1e-2)


# -------------------------------------------------------------------------------------- image bad inputs
def test_missing_file(tmp_path):
    with pytest.raises(InputFileNotFoundError, match=r"image: file not found: .*nope\.png") as err:
        load_image(tmp_path / "nope.png")
    assert isinstance(err.value, FileNotFoundError) and isinstance(err.value, InputError)
    assert issubclass(InputError, ValueError)
    with pytest.raises(FileNotFoundError, match="mask"):
        load_mask(tmp_path / "nope.png")


def test_decompression_bomb(photo, tmp_path):
    path = tmp_path / "big.png"
    Image.fromarray(photo).save(path)
    with pytest.raises(InputError, match="pixels, above the limit of 100;.*--max-pixels"):
        load_image(path, max_pixels=100)  # asuka.image_limits, checked from the header (replaces Pillow's own)


def test_folder_given_as_file(tmp_path):
    with pytest.raises(InputError, match="is a folder"):
        load_image(tmp_path)


def test_unreadable_and_truncated_files(photo, tmp_path):
    garbage = tmp_path / "garbage.png"
    garbage.write_bytes(b"this is not an image")
    with pytest.raises(InputError, match=r"image: cannot read .*garbage\.png"):
        load_image(garbage)
    for suffix in ("png", "jpg"):
        full = tmp_path / f"full.{suffix}"
        Image.fromarray(photo).save(full)
        cut = tmp_path / f"cut.{suffix}"
        cut.write_bytes(full.read_bytes()[: full.stat().st_size // 2])
        with pytest.raises(InputError, match="truncated"):
            load_image(cut)


def test_zero_size_images():
    for source in (Image.new("RGB", (0, 5)), np.zeros((0, 5, 3), np.uint8), torch.zeros(1, 3, 4, 0)):
        with pytest.raises(InputError, match="zero-size"):
            load_image(source)
    with pytest.raises(InputError, match="mask: zero-size"):
        load_mask(np.zeros((3, 0), np.uint8))


def test_wrong_dtypes():
    with pytest.raises(InputError, match=r"not floating point.*x.float\(\) / 127.5 - 1"):
        load_image(torch.zeros(1, 3, 8, 8, dtype=torch.uint8))
    with pytest.raises(InputError, match="unsupported dtype int64"):
        load_image(np.zeros((8, 8, 3), np.int64))
    with pytest.raises(InputError, match="boolean array is not an image"):
        load_image(np.zeros((8, 8), bool))
    with pytest.raises(InputError, match="m.float\\(\\) / 255"):
        load_mask(torch.zeros(1, 1, 8, 8, dtype=torch.uint8))
    with pytest.raises(InputError, match="unsupported type list"):
        load_image([[0.0]])


def test_wrong_channel_counts():
    for shape in ((1, 1, 8, 8), (1, 4, 8, 8), (2, 8, 8)):
        with pytest.raises(InputError, match=r"image tensors must be \(3,H,W\) or \(B,3,H,W\)"):
            load_image(torch.zeros(shape))
    with pytest.raises(InputError, match="C in 1/3/4"):
        load_image(np.zeros((8, 8, 2), np.uint8))
    with pytest.raises(InputError, match=r"mask tensors must be .*m\[:, :1\]"):
        load_mask(torch.zeros(1, 3, 8, 8))
    with pytest.raises(InputError, match="C in 1-4"):
        load_mask(np.zeros((8, 8, 5), np.uint8))


def test_value_range_and_non_finite():
    with pytest.raises(InputError, match=r"must be in \[-1, 1\].*x / 127.5 - 1"):
        load_image(torch.full((1, 3, 4, 4), 255.0))
    with pytest.raises(InputError, match=r"float arrays must be in \[0, 1\]"):
        load_image(np.full((4, 4, 3), 255.0))
    with pytest.raises(InputError, match=r"mask tensors must be in \[0, 1\]"):
        load_mask(torch.full((1, 1, 4, 4), 255.0))
    for bad in (float("nan"), float("inf"), -float("inf")):
        x = torch.zeros(1, 3, 4, 4)
        x[0, 1, 2, 3] = bad
        with pytest.raises(InputError, match="image: contains NaN or inf"):
            load_image(x)
        with pytest.raises(InputError, match="mask: contains NaN or inf"):
            load_mask(x[:, 1:2])
        with pytest.raises(InputError, match="NaN or inf"):
            load_image(x.permute(0, 2, 3, 1).numpy())


# ------------------------------------------------------------------------------------------------- masks
def test_mask_forms_agree(hole, tmp_path):
    expected = torch.from_numpy(hole == 255).float()[None, None]
    path = tmp_path / "mask.png"
    Image.fromarray(hole).save(path)
    sources = [path, Image.fromarray(hole), Image.fromarray(hole).convert("1"), Image.fromarray(hole).convert("RGB"),
               Image.fromarray(hole).convert("RGBA"), hole, hole == 255, (hole == 255).astype(np.uint8),
               (hole / 255).astype(np.float32), np.repeat(hole[..., None], 3, -1), hole[..., None],
               expected, expected[0], expected[0, 0], expected.bool(), Image.fromarray(hole).convert("P"),
               (hole.astype(np.uint16) * 257)]
    for source in sources:
        with warnings.catch_warnings():
            warnings.simplefilter("error", SoftMaskWarning)
            m = load_mask(source)
        assert m.shape == (1, 1, 61, 75) and m.dtype == torch.float32
        assert torch.equal(m, expected), type(source)


def test_soft_mask_binarized_at_threshold_with_warning():
    u8 = np.array([[0, 127, 128, 255]], np.uint8)
    with pytest.warns(SoftMaskWarning, match="binarized at 0.5"):
        m = load_mask(u8)
    assert m.flatten().tolist() == [0, 0, 1, 1]
    with pytest.warns(SoftMaskWarning):
        m = load_mask(torch.tensor([[0.0, 0.49, MASK_THRESHOLD, 0.9]]))
    assert m.flatten().tolist() == [0, 0, 1, 1]


def test_mask_alpha_composited_on_black(hole):
    stroke = hole == 255
    white = np.full(hole.shape + (3,), 255, np.uint8)  # transparent pixels that store white are still known
    rgba = np.concatenate([white, hole[..., None]], axis=-1)
    expected = torch.from_numpy(stroke).float()[None, None]
    for source in (rgba, Image.fromarray(rgba, "RGBA"), np.stack([white[..., 0], hole], -1),
                   Image.fromarray(np.stack([white[..., 0], hole], -1), "LA")):
        assert torch.equal(load_mask(source), expected)
    pal = Image.fromarray(hole).convert("P")
    pal.info["transparency"] = int(np.asarray(pal)[0, 0])  # the background palette entry is transparent
    assert torch.equal(load_mask(pal), expected)


def test_integer_label_masks():
    labels = np.array([[0, 1], [1, 0]])
    for dtype in (np.uint8, np.uint16):
        assert load_mask(labels.astype(dtype)).flatten().tolist() == [0, 1, 1, 0]


def test_colour_mask_rejected():
    rgb = np.zeros((4, 4, 3), np.uint8)
    rgb[1:3, 1:3, 0] = 255  # a red stroke is not a hole
    with pytest.raises(InputError, match="colour mask"):
        load_mask(rgb)
    with pytest.raises(InputError, match="colour mask"):
        load_mask(Image.fromarray(rgb))


def test_mask_to_pil_round_trip(hole):
    m = load_mask(hole)
    assert np.array_equal(np.asarray(mask_to_pil(m)[0]), hole)
    assert np.array_equal(np.asarray(mask_to_pil(m[0])), hole)


# ------------------------------------------------------------------------------------------- batch/sizes
def test_size_mismatch_is_an_error(photo):
    with pytest.raises(InputError, match=r"mask: size 75x60 differs from the image's 75x61; resize the mask"):
        prepare_inputs(photo, np.zeros((60, 75), np.uint8))


def test_batch_broadcast_and_mismatch(photo, hole):
    images = np.stack([photo] * 3)
    x, m = prepare_inputs(images, hole)
    assert x.shape == (3, 3, 61, 75) and m.shape == (3, 1, 61, 75)
    x, m = prepare_inputs(photo, [hole, 255 - hole])
    assert x.shape == (2, 3, 61, 75) and torch.equal(m[0] + m[1], torch.ones(1, 61, 75))
    with pytest.raises(InputError, match="mask: batch size 2 differs from the image batch size 3"):
        prepare_inputs(images, [hole, hole])
    with pytest.raises(InputError, match="different sizes"):
        prepare_inputs([photo, photo[:-1]], hole)
    with pytest.raises(InputError, match="empty list"):
        prepare_inputs([], hole)


def test_per_image_prompts():
    assert per_image("a cat", 3, "prompt") == ["a cat"] * 3
    assert per_image(["a cat"], 2, "prompt") == ["a cat"] * 2
    assert per_image(("a", "b"), 2, "prompt") == ["a", "b"]
    with pytest.raises(InputError, match="2 prompts for 3 images; pass one prompt or one per image") as err:
        per_image(["a", "b"], 3, "negative_prompt")
    assert err.value.field == "negative_prompt"


def test_pad_to_multiple_round_trip(photo, hole):
    x, m = prepare_inputs(photo, hole)
    for multiple in (8, 64):
        xp, pad = pad_to_multiple(x, multiple)
        mp, mpad = pad_to_multiple(m, multiple, mode="constant")
        assert pad == mpad and xp.shape[-2] % multiple == 0 and xp.shape[-1] % multiple == 0
        assert torch.equal(crop_padding(xp, pad), x) and torch.equal(crop_padding(mp, pad), m)
        assert mp.sum() == m.sum()  # padding is known context, never hole
    xp, pad = pad_to_multiple(x, 8)
    assert pad == (0, 5, 0, 3)
    assert torch.equal(xp[..., 61, :75], x[..., 59, :])  # reflection of the last row about the border
    tiny = torch.rand(1, 3, 3, 2) * 2 - 1  # too small to reflect 5 px: replicated
    tp, tpad = pad_to_multiple(tiny, 8)
    assert tp.shape == (1, 3, 8, 8) and torch.equal(crop_padding(tp, tpad), tiny)
    same, nopad = pad_to_multiple(torch.zeros(1, 3, 16, 8))
    assert nopad == (0, 0, 0, 0) and same.shape == (1, 3, 16, 8)


def test_resize_mask_keeps_thin_strokes():
    m = torch.zeros(1, 1, 64, 64)
    m[..., 31, :] = 1  # a 1-pixel line
    small = resize_mask(m, (16, 16))
    assert small[..., 7, :].eq(1).all() and small.sum() == 16
    assert set(resize_mask(small, (64, 64)).unique().tolist()) == {0.0, 1.0}


# ------------------------------------------------------------------------------------------- paste-back
def test_uint8_round_trip_is_exact_for_every_value():
    u8 = np.arange(256, dtype=np.uint8).reshape(16, 16)
    rgb = np.stack([u8, u8[::-1], u8.T], -1)
    assert np.array_equal(to_numpy_uint8(load_image(rgb))[0], rgb)
    assert np.array_equal(np.asarray(to_pil(load_image(Image.fromarray(rgb)))[0]), rgb)
    assert np.array_equal(np.asarray(to_pil(load_image(rgb)[0])), rgb)


def test_paste_back_is_bit_exact(photo, hole):
    x, m = prepare_inputs(photo, hole)
    out = paste_back(torch.rand_like(x) * 2 - 1, x, m)
    known = (m == 0).expand_as(x)
    assert torch.equal(out[known], x[known])
    with pytest.raises(InputError, match="differs from the image"):
        paste_back(x[..., :-1], x, m)


def test_run_inpainting_uint8_output_bit_exact_outside_hole(photo, hole):
    model = Recorder(fill=0.3)
    out = run_inpainting(model, Image.fromarray(photo), Image.fromarray(hole))
    result = np.asarray(to_pil(out)[0])
    known = hole == 0
    assert np.array_equal(result[known], photo[known])
    assert np.all(result[~known] == round((0.3 + 1) * 127.5))


def test_run_inpainting_pads_to_multiple_and_crops_back(photo, hole):
    for multiple in (8, 64):
        model = Recorder(fill=None)
        out = run_inpainting(model, photo, hole, multiple=multiple, paste_back=False)
        (x, m), = model.calls
        assert x.shape[-2] % multiple == 0 and x.shape[-1] % multiple == 0 and m.shape[1] == 1
        assert out.shape == (1, 3, 61, 75) and torch.equal(out, _expected(photo))


def test_no_paste_back_keeps_model_pixels(photo, hole):
    out = run_inpainting(Recorder(fill=0.3), photo, hole, paste_back=False)
    assert torch.all(out == 0.3)


def test_no_hole_returns_input_without_calling_the_model(photo):
    empty = np.zeros(photo.shape[:2], np.uint8)
    out = run_inpainting(_must_not_run, photo, empty)
    assert torch.equal(out, _expected(photo))
    assert torch.equal(run_inpainting(_must_not_run, photo, empty, paste_back=False), _expected(photo))


def test_items_without_hole_skip_the_model(photo, hole):
    model = Recorder(fill=0.3)
    out = run_inpainting(model, photo, [np.zeros_like(hole), hole], paste_back=False)
    assert len(model.calls) == 1 and model.calls[0][0].shape[0] == 1
    assert torch.equal(out[0], _expected(photo)[0]) and torch.all(out[1] == 0.3)


def test_all_hole_mask(photo):
    out = run_inpainting(Recorder(fill=-0.5), photo, np.full(photo.shape[:2], 255, np.uint8))
    assert torch.all(out == -0.5)


def test_model_returning_wrong_shape_is_reported(photo, hole):
    with pytest.raises(RuntimeError, match="returned shape"):
        run_inpainting(lambda x, m: x[..., :-8, :], photo, hole)


def test_working_size(photo, hole):
    model = Recorder(fill=None)
    out = run_inpainting(model, photo, hole, working_size=(32, 48))
    assert model.calls[0][0].shape == (1, 3, 32, 48) and out.shape == (1, 3, 61, 75)


# ----------------------------------------------------------------------------------------- HD strategies
def _large(h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    image = np.asarray(Image.fromarray(skimage.data.astronaut()).resize((w, h)))
    mask = np.zeros((h, w), np.uint8)
    mask[300:340, 400:464] = 255
    return image, mask


def test_hd_geometry():
    m = torch.zeros(2, 1, 100, 120)
    assert hole_bbox(m) is None
    m[0, 0, 10:20, 30:40] = 1
    m[1, 0, 50:52, 5:6] = 1
    assert hole_bbox(m) == (10, 52, 5, 40)
    assert expand_box((10, 52, 5, 40), 16, 100, 120) == (0, 68, 0, 56)
    assert crop_region(m, HDStrategy("crop", trigger_size=100, margin=16)) == (0, 68, 0, 56)
    assert crop_region(m, HDStrategy("crop", trigger_size=120)) is None  # not above the trigger size
    assert crop_region(m, HDStrategy("original", trigger_size=10)) is None
    assert resize_target(1000, 2560, HDStrategy("resize")) == (500, 1280)
    assert resize_target(1000, 1280, HDStrategy("resize")) is None
    with pytest.raises(ValueError, match="hd_strategy: must be one of original, crop, resize"):
        HDStrategy("tile")
    with pytest.raises(ValueError, match="margin"):
        HDStrategy(margin=-1)


def test_hd_crop_round_trip():
    image, mask = _large(900, 1000)
    model = Recorder(fill=None)
    out = run_inpainting(model, image, mask, paste_back=False)  # default: crop, trigger 800, margin 128
    assert model.calls[0][0].shape == (1, 3, 40 + 2 * 128, 64 + 2 * 128)  # 296 x 320: multiples of 8, no padding
    assert torch.equal(out, _expected(image))  # identity model: crop, process, paste is exact


def test_hd_crop_processes_only_the_box():
    image, mask = _large(900, 1000)
    out = run_inpainting(Recorder(fill=0.5), image, mask, paste_back=False, hd_strategy="crop")
    x = _expected(image)
    inside = torch.zeros(900, 1000, dtype=torch.bool)
    inside[300 - 128:340 + 128, 400 - 128:464 + 128] = True
    assert torch.all(out[..., inside] == 0.5) and torch.equal(out[..., ~inside], x[..., ~inside])
    pasted = run_inpainting(Recorder(fill=0.5), image, mask)
    known = torch.from_numpy(mask == 0)
    assert torch.equal(pasted[..., known], x[..., known]) and torch.all(pasted[..., ~known] == 0.5)


def test_hd_original_and_resize():
    image, mask = _large(700, 1400)
    model = Recorder(fill=None)
    run_inpainting(model, image, mask, hd_strategy="original")
    assert model.calls[-1][0].shape == (1, 3, 704, 1400)
    out = run_inpainting(model, image, mask, hd_strategy="resize")
    assert model.calls[-1][0].shape == (1, 3, 640, 1280) and out.shape == (1, 3, 700, 1400)
    known = torch.from_numpy(mask == 0)
    assert torch.equal(out[..., known], _expected(image)[..., known])


def test_max_size_limit_names_the_options():
    image, mask = _large(700, 1400)
    with pytest.raises(InputError, match=r"max_size: the image's 1400x700 exceeds max_size=1024.*raise max_size, or set hd_strategy to crop"):
        run_inpainting(_must_not_run, image, mask, hd_strategy="original", max_size=1024)
    with pytest.raises(InputError, match="max_size=1024"):
        prepare_inputs(image, mask, max_size=1024)
    model = Recorder(fill=None)  # the crop is small enough; raising the limit also works
    run_inpainting(model, image, mask, hd_strategy="crop", max_size=1024)
    run_inpainting(model, image, mask, hd_strategy="original", max_size=1400)
    assert len(model.calls) == 2


def test_list_image_files(tmp_path):
    for name in ("b.png", "a.jpg", "notes.txt"):
        (tmp_path / name).write_bytes(b"")
    (tmp_path / "sub.png").mkdir()
    assert [p.name for p in list_image_files(tmp_path)] == ["a.jpg", "b.png"]
