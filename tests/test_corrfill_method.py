"""The registered ``corrfill`` method: declarations, the runner through the plumbing (API, CLI with per-stem
references), the four baselines on tiny real components (LeftRefill embeddings files, IP-Adapter-Plus through
diffusers' ``load_ip_adapter``, Paint-by-Example with its inverted mask and channel order) and the decoder swap."""

from __future__ import annotations

import inspect

import numpy as np
import pytest
import torch
from PIL import Image

from asuka.errors import InputError
from asuka.pipelines._registry import get_method

SIZE = 64
FAST = {"num_inference_steps": 2}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("corrfill-files")
    rng = np.random.default_rng(0)
    for sub in ("image", "mask", "reference"):
        (root / sub).mkdir()
    for stem in ("a", "b"):
        ref = rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)
        Image.fromarray(ref).save(root / "reference" / f"{stem}.png")
        Image.fromarray(np.roll(ref, 6, axis=1)).save(root / "image" / f"{stem}.png")
        mask = np.zeros((SIZE, SIZE), np.uint8)
        mask[16:48, 20:44] = 255
        Image.fromarray(mask).save(root / "mask" / f"{stem}.png")
    Image.fromarray(rng.integers(0, 256, (SIZE, 2 * SIZE, 3), dtype=np.uint8)).save(root / "wide.png")
    return root


@pytest.fixture(scope="module")
def tensors(files):
    from asuka.pipelines._common import load_image, load_mask

    return (load_image(files / "image" / "a.png"), load_mask(files / "mask" / "a.png"),
            load_image(files / "reference" / "a.png"))


def test_declarations_presets_and_runner_defaults_agree():
    from asuka.pipelines.corrfill.runner import CorrFillRunner

    spec = get_method("corrfill").spec
    runner = inspect.signature(CorrFillRunner.__call__).parameters
    for name, value in spec.defaults().items():
        assert runner[name].default == value, name
    assert len(spec.presets) == 10
    s1 = spec.resolve("leftrefill-megadepth", None, None)
    assert (s1["baseline"], s1["step_masking"], s1["step_optimize"], s1["mask_boost"]) == ("leftrefill", 5, 5, 0)
    assert spec.input("reference").required and spec.input("reference").aligned


def test_api_run_composites_outside_the_hole(tiny_inpaint_dir, tensors):
    from asuka.api import Inpainter

    image, mask, reference = tensors
    out = Inpainter("corrfill", model=tiny_inpaint_dir, options=FAST)(image, mask, inputs={"reference": reference})
    keep = (mask < 0.5).expand_as(image)
    assert out.shape == image.shape and torch.isfinite(out).all()
    assert torch.equal(out[keep], image[keep]) and not torch.equal(out[~keep], image[~keep])


def test_cli_with_a_reference_file_and_with_folders_matched_by_stem(tiny_inpaint_dir, files, tmp_path):
    from asuka.cli import main

    out = tmp_path / "one.png"
    assert main(["inpaint", "--method", "corrfill", "--model", str(tiny_inpaint_dir), "--baseline",
                 "side-by-side", "--reference", str(files / "reference" / "a.png"), "--image",
                 str(files / "image" / "a.png"), "--mask", str(files / "mask" / "a.png"), "--steps", "2",
                 "--out", str(out)]) == 0
    assert Image.open(out).size == (SIZE, SIZE)
    folder = tmp_path / "many"
    assert main(["inpaint", "--method", "corrfill", "--model", str(tiny_inpaint_dir), "--reference",
                 str(files / "reference"), "--image", str(files / "image"), "--mask", str(files / "mask"),
                 "--steps", "1", "--set", "enable_latent_opt=false", "--out", str(folder)]) == 0
    assert sorted(p.stem for p in folder.iterdir()) == ["a", "b"]


def test_evaluate_takes_the_reference_folder_beside_image_and_mask(tiny_inpaint_dir, files, tmp_path):
    """``DATA/{image,mask,reference}``: the composited targets are scored with PSNR and grayscale SSIM (paper §5.2;
    LPIPS-alex with --lpips-weights)."""
    import json

    from asuka.cli import main

    out = tmp_path / "eval"
    assert main(["evaluate", "--method", "corrfill", "--model", str(tiny_inpaint_dir), "--baseline", "side-by-side",
                 "--data", str(files), "--out", str(out), "--steps", "1", "--set", "enable_latent_opt=false",
                 "--no-progress"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["overall"]["n"] == 2
    assert {"psnr", "ssim"} <= set(metrics["overall"])
    assert "reference" in json.dumps(metrics["settings"])


def test_missing_or_mis_sized_reference_is_a_clear_error(tiny_inpaint_dir, files, capsys):
    from asuka.api import Inpainter
    from asuka.cli import main

    base = ["inpaint", "--method", "corrfill", "--model", str(tiny_inpaint_dir), "--image",
            str(files / "image" / "a.png"), "--mask", str(files / "mask" / "a.png"), "--steps", "1"]
    assert main(base) != 0
    assert "--reference" in capsys.readouterr().err
    assert main(base + ["--reference", str(files / "wide.png")]) != 0
    assert "--reference" in capsys.readouterr().err
    image = torch.zeros(1, 3, SIZE, SIZE)
    mask = torch.ones(1, 1, SIZE, SIZE)
    with pytest.raises(InputError) as err:
        Inpainter("corrfill", model=tiny_inpaint_dir, options=FAST)(image, mask,
                                                                    inputs={"reference": torch.zeros(1, 3, 32, 32)})
    assert err.value.field == "inputs.reference"


def test_leftrefill_reads_learned_embeddings_from_pt_and_safetensors(tiny_inpaint_dir, tensors, tmp_path):
    from safetensors.torch import save_file

    from asuka.api import Inpainter
    from asuka.models.tiny import TINY_CROSS_ATTENTION_DIM

    image, mask, reference = tensors
    g = torch.Generator().manual_seed(0)
    pos, neg = (torch.randn(1, 77, TINY_CROSS_ATTENTION_DIM, generator=g) for _ in range(2))
    torch.save(pos, tmp_path / "pos.pt")
    save_file({"embeds": neg}, str(tmp_path / "neg.safetensors"))
    options = {**FAST, "baseline": "leftrefill", "prompt_embeds": str(tmp_path / "pos.pt"),
               "negative_prompt_embeds": str(tmp_path / "neg.safetensors")}
    painter = Inpainter("corrfill", model=tiny_inpaint_dir, options=options)
    out = painter(image, mask, inputs={"reference": reference})
    assert torch.isfinite(out).all()
    torch.save(pos[0, :, :8], tmp_path / "bad.pt")
    with pytest.raises(InputError) as err:
        Inpainter("corrfill", model=tiny_inpaint_dir, options={**options, "prompt_embeds": str(tmp_path / "bad.pt")})(
            image, mask, inputs={"reference": reference})
    assert err.value.field == "options.prompt_embeds"
    with pytest.raises(InputError) as err:
        Inpainter("corrfill", model=tiny_inpaint_dir, options={**FAST, "baseline": "leftrefill"})(
            image, mask, inputs={"reference": reference})
    assert err.value.field == "options.prompt_embeds"


def test_ip_adapter_plus_through_diffusers_load_ip_adapter(tiny_inpaint_dir, tensors, tmp_path):
    from diffusers import UNet2DConditionModel

    from asuka.models.tiny_ip_adapter import save_tiny_ip_adapter
    from asuka.pipelines.corrfill.runner import build

    unet = UNet2DConditionModel.from_pretrained(tiny_inpaint_dir, subfolder="unet")
    folder = save_tiny_ip_adapter(tmp_path / "ipa", unet)
    runner = build(tiny_inpaint_dir, device=torch.device("cpu"), dtype=torch.float32)
    image, mask, reference = tensors
    defaults = {**get_method("corrfill").spec.defaults(), **FAST}
    images, masks = torch.cat([image, image.flip(-1)]), torch.cat([mask, mask])
    references = torch.cat([reference, reference.flip(-1)])

    def run(**kw):
        return runner(images, masks, generator=[torch.Generator().manual_seed(0) for _ in range(2)],
                      progress_bar=False, reference=references, **{**defaults, "baseline": "ip-adapter-plus",
                                                                   "ip_adapter": str(folder), **kw})

    out = run()
    assert runner.pipe.image_encoder is not None and torch.isfinite(out).all()
    assert not torch.allclose(out, run(ip_adapter_scale=0.0))
    side = runner(images, masks, generator=[torch.Generator().manual_seed(0) for _ in range(2)], progress_bar=False,
                  reference=references, **{**defaults, "baseline": "side-by-side"})  # adapter unloaded again
    assert getattr(runner.pipe.unet, "encoder_hid_proj", None) is None and torch.isfinite(side).all()
    with pytest.raises(InputError) as err:
        run(ip_adapter=None)
    assert err.value.field == "options.ip_adapter"


@pytest.fixture(scope="module")
def pbe_dir(tmp_path_factory):
    from asuka.models.tiny_paint_by_example import save_tiny_paint_by_example

    return save_tiny_paint_by_example(tmp_path_factory.mktemp("tiny-pbe"))


def test_paint_by_example_all_off_is_diffusers_pipeline_bit_for_bit(pbe_dir, tensors):
    from diffusers import PaintByExamplePipeline

    from asuka.pipelines.corrfill.config import make_config
    from asuka.pipelines.corrfill.runner import load_paint_by_example

    from diffusers import DDIMScheduler

    pipe = load_paint_by_example(pbe_dir, torch.float32)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config, clip_sample=False)
    pipe.set_progress_bar_config(disable=True)
    image, mask, reference = tensors
    off = make_config("paint-by-example", enable_masking=False, enable_latent_opt=False)
    got = pipe(reference, image, mask, config=off, num_inference_steps=3, output_type="latent",
               generator=torch.Generator().manual_seed(0)).images
    base = PaintByExamplePipeline(**pipe.components)
    base.set_progress_bar_config(disable=True)
    pixels = pipe.feature_extractor(images=[((reference[0] + 1) / 2).clamp(0, 1)], do_rescale=False,
                                    return_tensors="pt").pixel_values
    expected = base(example_image=pixels, image=torch.cat([reference, image], -1),
                    mask_image=torch.cat([torch.zeros_like(mask), mask], -1), num_inference_steps=3,
                    guidance_scale=5.0, eta=1.0, output_type="latent",
                    generator=torch.Generator().manual_seed(0)).images
    assert torch.equal(got, expected)
    full = pipe(reference, image, mask, config=make_config("paint-by-example", step_masking=3, step_optimize=3),
                num_inference_steps=3, output_type="latent", generator=torch.Generator().manual_seed(0)).images
    assert torch.isfinite(full).all() and not torch.equal(full, got)


def test_paint_by_example_pipeline_is_not_announced_as_deprecated(pbe_dir):
    """diffusers' deprecation warning of its PaintByExamplePipeline base would name our class; only it is dropped."""
    import logging

    from asuka.pipelines.corrfill.runner import load_paint_by_example

    log = logging.getLogger("diffusers.pipelines.pipeline_utils")
    seen: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: seen.append(record.getMessage())
    log.addHandler(handler)
    filters, level = list(log.filters), log.level
    log.setLevel(logging.WARNING)  # the test session may silence diffusers
    try:
        load_paint_by_example(pbe_dir, torch.float32)
        log.warning("The PaintByExamplePipeline has been deprecated")   # other messages still pass
    finally:
        log.removeHandler(handler)
        log.setLevel(level)
    assert seen == ["The PaintByExamplePipeline has been deprecated"] and log.filters == filters


def test_paint_by_example_folder_through_the_api_and_baseline_mismatch(pbe_dir, tiny_inpaint_dir, tensors):
    from asuka.api import Inpainter

    image, mask, reference = tensors
    out = Inpainter("corrfill", model=pbe_dir, options={**FAST, "baseline": "paint-by-example"})(
        image, mask, inputs={"reference": reference})
    assert torch.isfinite(out).all()
    with pytest.warns(UserWarning, match="no effect with PNDMScheduler"):  # the official code's sampler
        Inpainter("corrfill", model=pbe_dir, options={**FAST, "baseline": "paint-by-example", "scheduler": "model"})(
            image, mask, inputs={"reference": reference})
    with pytest.raises(InputError) as err:
        Inpainter("corrfill", model=pbe_dir, options=FAST)(image, mask, inputs={"reference": reference})
    assert err.value.field == "options.baseline"


def test_harmonizing_decoder_replaces_the_vae(tiny_inpaint_dir, tensors, tmp_path):
    from diffusers import AutoencoderKL

    from asuka.api import Inpainter
    from asuka.models.decoder import HarmonizingDecoderKL

    vae = AutoencoderKL.from_pretrained(tiny_inpaint_dir, subfolder="vae")
    HarmonizingDecoderKL.from_vae(vae).save_pretrained(tmp_path / "decoder")
    image, mask, reference = tensors
    painter = Inpainter("corrfill", model=tiny_inpaint_dir, decoder=tmp_path / "decoder", options=FAST)
    out = painter(image, mask, inputs={"reference": reference})
    assert isinstance(painter.runner.pipe.vae, HarmonizingDecoderKL) and torch.isfinite(out).all()
