"""Inference-method registry and the ``sd`` method against diffusers' own pipeline."""

from __future__ import annotations

import numpy as np
import pytest
import skimage.data
import torch
from PIL import Image

from asuka.pipelines import _registry as registry
from asuka.errors import InputError
from asuka.pipelines._common import run_inpainting
from asuka.pipelines._registry import available_methods, get_method, register_method


def test_sd_is_found_lazily_and_listed():
    method = get_method("sd")
    assert method.name == "sd" and "StableDiffusionInpaintPipeline" in method.description
    assert "sd" in available_methods()


def test_unknown_method_lists_the_available_ones():
    with pytest.raises(InputError, match=r"method: unknown inference method 'nope'; available: .*sd"):
        get_method("nope")
    with pytest.raises(InputError, match="unknown inference method"):
        get_method("../etc")


def test_register_method_from_another_module(monkeypatch):
    monkeypatch.setattr(registry, "_METHODS", dict(registry._METHODS))

    @register_method("identity-test", default_model=lambda: "weights-dir")
    def build(model, *, device, dtype, vae):
        """Returns the input unchanged."""

        class Identity:
            multiple = 8

            def __call__(self, image, mask, *, generator, progress_bar):
                return image

        assert (model, device, dtype, vae) == ("weights-dir", torch.device("cpu"), torch.float32, None)
        return Identity()

    method = get_method("identity-test")
    assert method.description == "Returns the input unchanged." and method.load().multiple == 8
    register_method("identity-test")(build)  # the same builder again (module re-import) is fine
    with pytest.raises(ValueError, match="already registered"):
        register_method("identity-test")(lambda model, *, device, dtype, vae: None)
    no_default = register_method("no-default-test")(build)
    with pytest.raises(InputError, match="model: method 'no-default-test' has no default weights"):
        get_method("no-default-test").load()
    assert no_default is build


def test_sd_model_argument_checked(tmp_path):
    sd = get_method("sd")
    with pytest.raises(InputError, match=r"model: folder not found: .*missing"):
        sd.load(tmp_path / "missing")
    with pytest.raises(InputError, match="no model_index.json"):
        sd.load(tmp_path)


def test_sd_runner_matches_diffusers_pipeline(tiny_inpaint_dir):
    """run_inpainting + the sd runner (paste-back off) == diffusers' pipeline called directly on PIL inputs."""
    from diffusers import StableDiffusionInpaintPipeline

    photo = np.array(Image.fromarray(skimage.data.coffee()).resize((64, 48)))
    mask = np.zeros((48, 64), np.uint8)
    mask[10:30, 20:50] = 255
    runner = get_method("sd").load(tiny_inpaint_dir)
    kwargs = dict(num_inference_steps=2, guidance_scale=7.5)
    ours = run_inpainting(lambda x, m: runner(x, m, generator=[torch.Generator().manual_seed(3)], progress_bar=False,
                                              prompt=["a cup of coffee"], **kwargs), photo, mask, paste_back=False)

    pipe = StableDiffusionInpaintPipeline.from_pretrained(tiny_inpaint_dir, safety_checker=None,
                                                          requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    ref = pipe(image=Image.fromarray(photo), mask_image=Image.fromarray(mask), height=48, width=64,
               generator=torch.Generator().manual_seed(3), output_type="np", prompt="a cup of coffee", **kwargs).images
    ref = torch.from_numpy(ref).permute(0, 3, 1, 2) * 2 - 1
    assert ours.shape == ref.shape == (1, 3, 48, 64)
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=0)
    assert (ours - torch.from_numpy(photo).permute(2, 0, 1) / 127.5 + 1).abs().amax() > 0.1  # it did change pixels
