"""Method plumbing: typed options and presets, --set/--preset/--describe, per-stem inputs, extra weights, the decoder
swap for every registered method, the seed rule, a broken method module, torch-free listing."""

from __future__ import annotations

import inspect
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from jsonschema import Draft202012Validator
from PIL import Image

from asuka.api import Inpainter, per_stem_inputs, read_text_table
from asuka.cli import main
from asuka.errors import InputError
from asuka.options import Input, MethodSpec, Option, Preset, Weights
from asuka.pipelines import _registry as registry
from asuka.pipelines._registry import available_methods, get_method

ROOT = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------------- a recording method
class Recorder:
    """Records what it was called with; returns the negated image (so outputs are checkable)."""

    multiple = 8

    def __init__(self, calls: list, weights: dict) -> None:
        self.calls, self.weights = calls, weights

    def __call__(self, image, mask, *, generator, progress_bar, steps=20, scale=2.5, mode="fast", sharp=False,
                 layers=(1, 2), gains=(0.5,), seed_offset=None, prompt=None, reference=None, control_image=None):
        self.calls.append(dict(shape=tuple(image.shape), generators=len(generator), steps=steps, scale=scale,
                               mode=mode, sharp=sharp, layers=layers, gains=gains, seed_offset=seed_offset,
                               prompt=prompt, reference=reference, control_image=control_image))
        return -image


OPTIONS = [
    Option("steps", "int", 20, "steps", "test", min=1, max=100),
    Option("scale", "float", 2.5, "scale", "test", min=0, min_exclusive=True),
    Option("mode", "str", "fast", "mode", "test", choices=("fast", "slow")),
    Option("sharp", "bool", False, "sharp", "test"),
    Option("layers", "int_list", (1, 2), "layers", "test", min=0),
    Option("gains", "float_list", (0.5,), "gains", "test"),
    Option("seed_offset", "int", None, "optional", "test", nullable=True),
]
PRESETS = [Preset("paper", {"steps": 50, "mode": "slow"}, "the paper's", "test §1")]
INPUTS = [Input("prompt", "text", "prompt", default=""), Input("reference", "image", "exemplar"),
          Input("control_image", "image", "control", aligned=True)]


@pytest.fixture
def recorder(monkeypatch):
    monkeypatch.setattr(registry, "_METHODS", dict(registry._METHODS))
    calls, weights = [], {}

    def build(model, *, device, dtype, vae, controlnet=None):
        weights.update(model=model, vae=vae, controlnet=controlnet)
        return Recorder(calls, weights)

    registry.register_method("recorder-test", build=build, default_model="none", description="records its calls",
                             options=OPTIONS, presets=PRESETS, inputs=INPUTS,
                             weights=[Weights("controlnet", "ControlNet folder", source="test")])
    return calls, weights


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """Two 40x32 images with masks, references, control images and prompt tables."""
    root = tmp_path_factory.mktemp("plumbing")
    for sub in ("images", "masks", "refs", "controls"):
        (root / sub).mkdir()
    rng = np.random.default_rng(0)
    for stem in ("a", "b"):
        Image.fromarray(rng.integers(0, 255, (32, 40, 3), np.uint8)).save(root / "images" / f"{stem}.png")
        mask = np.zeros((32, 40), np.uint8)
        mask[8:20, 10:30] = 255
        Image.fromarray(mask).save(root / "masks" / f"{stem}.png")
        Image.fromarray(rng.integers(0, 255, (24, 24, 3), np.uint8)).save(root / "refs" / f"{stem}.png")
        Image.fromarray(rng.integers(0, 255, (32, 40, 3), np.uint8)).save(root / "controls" / f"{stem}.png")
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(root / "small.png")
    (root / "prompts.json").write_text(json.dumps({"a": "a red door", "b": "a blue sky"}))
    (root / "prompts.txt").write_text("# per-stem prompts\na\ta red door\nb: a blue sky\n")
    (root / "partial.json").write_text(json.dumps({"a": "only a"}))
    return root


def _cli(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


# --------------------------------------------------------------------------------------------------- options
def test_option_values_are_typed_and_checked():
    spec = MethodSpec(OPTIONS, INPUTS, PRESETS)
    assert spec.resolve() == {"steps": 20, "scale": 2.5, "mode": "fast", "sharp": False, "layers": (1, 2),
                              "gains": (0.5,), "seed_offset": None}
    assert spec.resolve("paper", {"steps": 7}, {"layers": "3, 4", "sharp": "yes", "seed_offset": "none",
                                                  "scale": "1"}) == {
        "steps": 7, "scale": 1.0, "mode": "slow", "sharp": True, "layers": (3, 4), "gains": (0.5,),
        "seed_offset": None}
    bad = [({"steps": "x"}, "options.steps", "expected an integer, got 'x'"),
           ({"steps": "101"}, "options.steps", "out of range; expected int >= 1 and <= 100"),
           ({"scale": "0"}, "options.scale", "expected float > 0"),
           ({"scale": "nan"}, "options.scale", "finite"),
           ({"mode": "medium"}, "options.mode", "not one of the choices: fast, slow"),
           ({"sharp": "maybe"}, "options.sharp", "expected true/false"),
           ({"layers": "1,-1"}, "options.layers", "out of range"),
           ({"nope": "1"}, "options.nope", "unknown option 'nope'; valid options: steps, scale, mode")]
    for strings, field, message in bad:
        with pytest.raises(InputError, match=message) as err:
            spec.resolve(strings=strings)
        assert err.value.field == field
    with pytest.raises(InputError, match="unknown preset 'fast'; choose one of: paper"):
        spec.resolve("fast")
    with pytest.raises(ValueError, match="preset 'bad'"):
        MethodSpec(OPTIONS, presets=[Preset("bad", {"steps": 0}, "out of range")])
    with pytest.raises(ValueError, match="reserved"):
        MethodSpec([Option("generator", "int", 0, "x")])
    with pytest.raises(ValueError, match="option 'x': bad default: 2.0 is out of range"):
        Option("x", "float", 2.0, "x", max=1)


def test_describe_json_validates_against_itself(capsys):
    for name in available_methods():
        code, out, _ = _cli(capsys, "inpaint", "--method", name, "--describe", "--json")
        assert code == 0
        schema = json.loads(out)
        Draft202012Validator.check_schema(schema)
        spec = get_method(name).spec
        defaults = {"options": {k: list(v) if isinstance(v, tuple) else v for k, v in spec.defaults().items()},
                    "inputs": {i.role: "x" for i in spec.inputs if i.required},
                    "weights": {w.name: "x" for w in spec.weights if w.required}}
        Draft202012Validator(schema).validate(defaults)
        for preset in schema["x-presets"].values():
            Draft202012Validator(schema).validate({**defaults, "options": preset["values"]})


def test_describe_json_schema_rejects_what_the_cli_rejects(recorder, capsys):
    code, out, _ = _cli(capsys, "inpaint", "--method", "recorder-test", "--describe", "--json")
    validator = Draft202012Validator(json.loads(out))
    good = {"options": {"steps": 3, "layers": [1], "seed_offset": None}, "inputs": {"prompt": "x"}, "preset": "paper",
            "weights": {"controlnet": "dir"}}
    assert not list(validator.iter_errors(good))
    for bad in ({"options": {"steps": 0}}, {"options": {"mode": "medium"}}, {"options": {"nope": 1}},
                {"inputs": {"mask2": "x"}}, {"preset": "other"}, {"options": {"layers": [-1]}}):
        assert list(validator.iter_errors(bad)), bad
    code, out, _ = _cli(capsys, "inpaint", "--method", "recorder-test", "--describe")
    assert code == 0 and "mode" in out and "fast / slow" in out and "paper" in out and "controlnet" in out


def test_every_option_reaches_the_runner_from_the_cli(recorder, folder, tmp_path, capsys):
    calls, weights = recorder
    base = ["inpaint", "--method", "recorder-test", "--image", folder / "images" / "a.png", "--mask",
            folder / "masks" / "a.png", "--out", tmp_path / "o.png"]
    assert _cli(capsys, *base)[0] == 0
    assert {k: calls[-1][k] for k in ("steps", "scale", "mode", "sharp", "layers", "gains", "seed_offset")} == \
        get_method("recorder-test").spec.defaults()
    assert calls[-1]["prompt"] == [""] and calls[-1]["generators"] == 1
    assert weights == {"model": "none", "vae": None, "controlnet": None}
    assert _cli(capsys, *base, "--preset", "paper", "--set", "steps=9", "--set", "scale=0.25", "--set",
                "mode=slow", "--set", "sharp=true", "--set", "layers=3,4,5", "--set", "gains=0.1,0.2",
                "--set", "seed_offset=7", "--controlnet", tmp_path / "cn")[0] == 0
    assert {k: calls[-1][k] for k in ("steps", "scale", "mode", "sharp", "layers", "gains", "seed_offset")} == \
        {"steps": 9, "scale": 0.25, "mode": "slow", "sharp": True, "layers": (3, 4, 5), "gains": (0.1, 0.2),
         "seed_offset": 7}
    assert weights["controlnet"] == str(tmp_path / "cn")
    assert _cli(capsys, *base, "--preset", "paper")[0] == 0
    assert (calls[-1]["steps"], calls[-1]["mode"]) == (50, "slow")


@pytest.mark.parametrize("args, message", [
    (["--set", "steps=0"], "--set steps: 0 is out of range; expected int >= 1 and <= 100"),
    (["--set", "steps=two"], "--set steps: expected an integer, got 'two'"),
    (["--set", "mode=medium"], "--set mode: 'medium' is not one of the choices: fast, slow"),
    (["--set", "colour=red"], "--set colour: unknown option 'colour'; valid options: steps, scale, mode, sharp"),
    (["--set", "steps"], "--set: expected KEY=VALUE, got 'steps'"),
    (["--preset", "fast"], "--preset: unknown preset 'fast'; choose one of: paper"),
    (["--guidance-scale", "3"], "--guidance-scale: method 'recorder-test' has no guidance_scale option"),
    (["--negative-prompt", "x"], "--negative-prompt: this method takes no 'negative_prompt' input"),
    (["--lora", "x"], "--lora: this method loads no 'lora' weights; it takes: controlnet"),
])
def test_bad_method_flags_are_one_line_errors_before_loading(recorder, folder, tmp_path, capsys, args, message):
    calls, weights = recorder
    code, _, err = _cli(capsys, "inpaint", "--method", "recorder-test", "--image", folder / "images",
                        "--mask", folder / "masks", "--out", tmp_path / "o", *args)
    assert code == 1 and err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith(f"asuka inpaint: error: {message}"), err
    assert not calls and not weights  # nothing was loaded


# ------------------------------------------------------------------------------------------ per-stem inputs
def test_per_stem_inputs_pair_by_stem(recorder, folder, tmp_path, capsys):
    calls, _ = recorder
    for table in ("prompts.json", "prompts.txt"):
        calls.clear()
        assert _cli(capsys, "inpaint", "--method", "recorder-test", "--image", folder / "images", "--mask",
                    folder / "masks", "--out", tmp_path / table, "--prompt", folder / table, "--reference",
                    folder / "refs", "--control-image", folder / "controls")[0] == 0
        assert [c["prompt"] for c in calls] == [["a red door"], ["a blue sky"]]
        for call, stem in zip(calls, "ab"):
            ref = np.asarray(Image.open(folder / "refs" / f"{stem}.png")).astype(np.float32) / 127.5 - 1
            assert torch.equal(call["reference"][0][0], torch.from_numpy(ref).permute(2, 0, 1))
            control = np.asarray(Image.open(folder / "controls" / f"{stem}.png")).astype(np.float32) / 127.5 - 1
            # aligned: padded with the image (32x40 is a multiple of 8: unchanged)
            assert torch.equal(call["control_image"][0], torch.from_numpy(control).permute(2, 0, 1))
    calls.clear()
    assert _cli(capsys, "inpaint", "--method", "recorder-test", "--image", folder / "images", "--mask",
                folder / "masks", "--out", tmp_path / "one", "--prompt", "same for all", "--reference",
                folder / "refs" / "a.png")[0] == 0
    assert [c["prompt"] for c in calls] == [["same for all"]] * 2 and calls[0]["control_image"] is None
    assert torch.equal(calls[0]["reference"][0], calls[1]["reference"][0])


@pytest.mark.parametrize("args, message", [
    (["--prompt", "{f}/partial.json"], "--prompt: no prompt for b in"),
    (["--reference", "{f}/controls/a.png", "--control-image", "{f}/small.png"],
     "--control-image: {f}/small.png is 16x16 but image a is 40x32"),
    (["--reference", "{f}/missing"], "--reference: not found: {f}/missing"),
])
def test_per_stem_inputs_fail_before_loading(recorder, folder, tmp_path, capsys, args, message):
    calls, weights = recorder
    argv = [a.format(f=folder) for a in args]
    code, _, err = _cli(capsys, "inpaint", "--method", "recorder-test", "--image", folder / "images", "--mask",
                        folder / "masks", "--out", tmp_path / "o", *argv)
    assert code == 1 and err.count("\n") == 1 and message.format(f=folder) in err, err
    assert not weights


def test_aligned_inputs_are_compared_as_loaded_with_exif_orientation(tmp_path):
    """The size check of an aligned input reads the size the loader will give (EXIF rotation applied), as the
    image's own size is read."""
    from asuka.pipelines._common import load_image

    spec = MethodSpec(inputs=[Input("control_image", "image", "control", aligned=True)])
    exif = Image.Exif()
    exif[0x0112] = 6  # stored 32 wide and 40 high, shown rotated by 90 degrees: 40 wide and 32 high
    Image.new("RGB", (32, 40)).save(tmp_path / "a.jpg", exif=exif)
    assert tuple(load_image(tmp_path / "a.jpg").shape[-2:]) == (32, 40)
    given = {"control_image": tmp_path / "a.jpg"}
    assert per_stem_inputs(spec, ["a"], given, sizes={"a": (40, 32)}) == {"a": given}
    with pytest.raises(InputError, match="is 40x32 but image a is 32x40"):
        per_stem_inputs(spec, ["a"], given, sizes={"a": (32, 40)})


def test_required_inputs_and_text_tables(folder):
    spec = MethodSpec(inputs=[Input("reference", "image", "exemplar image", required=True)])
    with pytest.raises(InputError, match="this method needs a reference") as err:
        per_stem_inputs(spec, ["a"], {})
    assert err.value.field == "inputs.reference"
    refs = per_stem_inputs(spec, ["a", "b"], {"reference": folder / "refs"})
    assert refs == {s: {"reference": folder / "refs" / f"{s}.png"} for s in "ab"}
    assert read_text_table(folder / "prompts.txt", "prompt") == read_text_table(folder / "prompts.json", "prompt")
    bad = folder / "bad.txt"
    bad.write_text("no separator here\n")
    with pytest.raises(InputError, match=r"bad.txt:1: expected 'stem<TAB>text'"):
        read_text_table(bad, "prompt")


# -------------------------------------------------------------------------------------------------- seeds
def test_seed_rule_batch_equals_single_runs(monkeypatch):
    """Every item gets its own generator seeded with ``seed``: a batch equals its single runs."""
    monkeypatch.setattr(registry, "_METHODS", dict(registry._METHODS))

    class Noise:
        multiple = 8

        def __call__(self, image, mask, *, generator, progress_bar):
            return torch.stack([torch.rand(image.shape[1:], generator=g) * 2 - 1 for g in generator])

    registry.register_method("noise-seed-test", build=lambda model, **_: Noise(), default_model="none")
    painter = Inpainter("noise-seed-test")
    image = torch.zeros(3, 3, 16, 16)
    mask = torch.ones(3, 1, 16, 16)
    batch = painter(image, mask, seed=5)
    single = painter(image[:1], mask[:1], seed=5)
    assert torch.equal(batch[0], single[0]) and torch.equal(batch[2], single[0])
    assert not torch.equal(painter(image[:1], mask[:1], seed=6), single)


# --------------------------------------------------------------------------------------- registry robustness
def test_broken_method_module_is_listed_as_unavailable(tmp_path, monkeypatch, capsys):
    import asuka.pipelines as package

    (tmp_path / "broken_test_method.py").write_text("raise ImportError('needs the frobnicate package')\n")
    monkeypatch.setattr(package, "__path__", [*package.__path__, str(tmp_path)])
    monkeypatch.setattr(registry, "_UNAVAILABLE", {})
    monkeypatch.delitem(sys.modules, "asuka.pipelines.broken_test_method", raising=False)
    code, out, _ = _cli(capsys, "inpaint", "--list-methods")
    assert code == 0 and any(line.startswith("sd: ") for line in out.splitlines())
    assert "broken_test_method: unavailable (ImportError: needs the frobnicate package)" in out.splitlines()
    code, _, err = _cli(capsys, "inpaint", "--method", "broken_test_method", "--describe")
    assert code == 1 and "--method: method 'broken_test_method' is unavailable" in err and "frobnicate" in err


def test_listing_and_describe_do_not_import_torch():
    code = ("import sys; from asuka.cli import main; "
            "assert main(['inpaint', '--list-methods']) == 0; "
            "[main(['inpaint', '--method', m, '--describe', *j]) for m in ('sd', 'asuka') for j in ([], ['--json'])]; "
            "heavy = sorted(m for m in ('torch', 'diffusers', 'transformers', 'numpy') if m in sys.modules); "
            "print('HEAVY', heavy)")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().splitlines()[-1] == "HEAVY []"


# --------------------------------------------------------------------------------------------- every method
def _photo(size=(48, 64)) -> tuple[np.ndarray, np.ndarray]:
    import skimage.data

    photo = np.array(Image.fromarray(skimage.data.coffee()).resize(size[::-1]))
    mask = np.zeros(size, np.uint8)
    mask[10:30, 16:48] = 255
    return photo, mask


@pytest.mark.parametrize("name", available_methods())
def test_declared_defaults_and_decoder_swap_for_every_method(name, tmp_path):
    """For every registered method: the runner's signature defaults are the declared defaults, and ``decoder=`` (an
    export folder of a HarmonizingDecoderKL built from the method's own VAE) changes the hole and nothing else."""
    from asuka.models.decoder import HarmonizingDecoderKL
    from asuka.models.seeding import seeded

    quick = get_method(name).quick
    plain = Inpainter(name, options=quick, device="cpu")
    params = inspect.signature(plain.runner).parameters
    for option in plain.spec.options:
        assert option.name in params or any(p.kind is p.VAR_KEYWORD for p in params.values()), option.name
        if option.name in params and params[option.name].default is not inspect.Parameter.empty:
            assert params[option.name].default == option.default, option.name
    with seeded(0):
        decoder = HarmonizingDecoderKL.from_vae(plain.runner.pipe.vae.float())
        with torch.no_grad():  # from a harmonizing VAE, from_vae computes the same: make this one differ
            for weight in decoder.decoder.parameters():
                weight.add_(torch.randn_like(weight) * 0.05)
    decoder.save_pretrained(tmp_path / "decoder")
    swapped = Inpainter(name, options=quick, decoder=tmp_path / "decoder", device="cpu")
    photo, mask = _photo()
    inputs = {i.role: "a photo" if i.kind == "text" else photo for i in plain.spec.inputs if i.required}
    out_plain, out_swapped = (p(photo, mask, inputs=inputs, seed=0) for p in (plain, swapped))
    assert type(swapped.runner.pipe.vae).__name__ == "HarmonizingDecoderKL"
    hole = torch.from_numpy(mask >= 128)[None, None].expand_as(out_plain)
    assert torch.equal(out_plain[~hole], out_swapped[~hole])  # paste-back
    assert (out_plain[hole] - out_swapped[hole]).abs().amax() > 1e-3


def test_sd_decoder_equals_a_direct_harmonizing_decode(tiny_inpaint_dir, tmp_path):
    """``decoder=`` on ``sd``: the output is ``HarmonizingDecoderKL.decode`` of the very latents the plain run
    decodes with its VAE; the two differ exactly as the two decoders differ on those latents."""
    from diffusers import StableDiffusionInpaintPipeline

    from asuka.models.decoder import HarmonizingDecoderKL
    from asuka.models.seeding import seeded

    photo, mask = _photo()
    pipe = StableDiffusionInpaintPipeline.from_pretrained(tiny_inpaint_dir, safety_checker=None,
                                                          requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    with seeded(1):
        decoder = HarmonizingDecoderKL.from_vae(pipe.vae).eval()
    decoder.save_pretrained(tmp_path / "decoder")
    kwargs = dict(num_inference_steps=2)
    plain = Inpainter("sd", tiny_inpaint_dir, options=kwargs, device="cpu")(photo, mask, seed=3, paste_back=False)
    swapped = Inpainter("sd", tiny_inpaint_dir, options=kwargs, decoder=tmp_path / "decoder", device="cpu")(
        photo, mask, seed=3, paste_back=False)
    latents = pipe(prompt="", image=Image.fromarray(photo), mask_image=Image.fromarray(mask), height=48, width=64,
                   generator=torch.Generator().manual_seed(3), output_type="latent", **kwargs).images
    image = torch.from_numpy(photo).permute(2, 0, 1)[None].float() / 127.5 - 1
    hole = torch.from_numpy(mask >= 128).float()[None, None]
    with torch.no_grad():
        z = latents / pipe.vae.config.scaling_factor
        direct = decoder.decode(z, image=image, mask=hole).sample.clamp(-1, 1)
        by_vae = pipe.vae.decode(z).sample.clamp(-1, 1)
    step = 2 / 255 + 1e-5  # diffusers rounds nothing here; allow float noise of the two code paths
    torch.testing.assert_close(swapped, direct, atol=step, rtol=0)
    torch.testing.assert_close(plain, by_vae, atol=step, rtol=0)
    torch.testing.assert_close(swapped - plain, direct - by_vae, atol=2 * step, rtol=0)
    assert (direct - by_vae).abs().amax() > 0.05


# ------------------------------------------------------------------------------------------ several methods
class Shift:
    """image + offset in the hole (an option), so two methods give different, checkable scores."""

    multiple = 8

    def __call__(self, image, mask, *, generator, progress_bar, offset=0.5, prompt=None):
        return (image + offset).clamp(-1, 1)


@pytest.fixture
def two_methods(monkeypatch):
    monkeypatch.setattr(registry, "_METHODS", dict(registry._METHODS))
    options = [Option("offset", "float", 0.5, "brightness added", "test", min=-2, max=2)]
    loads = []

    def build(model, **_):
        loads.append(model)
        return Shift()

    for name in ("bright-test", "dark-test"):
        registry.register_method(name, build=build, default_model="none", options=options,
                                 inputs=[Input("prompt", "text", "prompt", default="")])
    return loads


def test_evaluate_several_methods_one_report(two_methods, folder, tmp_path, capsys):
    out = tmp_path / "cmp"
    args = ["evaluate", "--method", "bright-test,dark-test", "--data", folder / "images", "--masks",
            folder / "masks",
            "--out", out, "--set", "dark-test.offset=-0.5", "--prompt", folder / "prompts.json", "--no-progress",
            "--seed", "4"]
    code, stdout, err = _cli(capsys, *args)
    assert code == 0, err
    assert "## PSNR↑" in stdout and "| subset | n | bright-test | dark-test |" in stdout
    report = (out / "comparison.md").read_text()
    assert "| hole 10-20% | 2 |" in report
    assert Image.open(out / "comparison.png").size[0] == 4 * 160  # input | mask | two methods
    first = {p: p.stat().st_mtime_ns for p in out.glob("*/predictions/*.png")}
    assert len(first) == 4
    settings = {m: json.loads((out / m / "metrics.json").read_text())["settings"]
                for m in ("bright-test", "dark-test")}
    assert settings["bright-test"]["options"] == {"offset": 0.5}
    assert settings["dark-test"]["options"] == {"offset": -0.5}
    assert settings["dark-test"]["seed"] == 4 and settings["dark-test"]["seed_rule"].startswith("per item")
    assert settings["dark-test"]["inputs"] == {"prompt": str(folder / "prompts.json")}
    comparison = json.loads((out / "comparison.json").read_text())["methods"]
    assert comparison["bright-test"]["overall"]["psnr"] != comparison["dark-test"]["overall"]["psnr"]
    assert len(two_methods) == 2
    code, stdout, _ = _cli(capsys, *args)  # resumed per method: nothing recomputed, nothing loaded
    assert code == 0 and len(two_methods) == 2 and "dark-test: reused 2 predictions, computed 0" in stdout
    assert {p: p.stat().st_mtime_ns for p in out.glob("*/predictions/*.png")} == first
    code, _, err = _cli(capsys, "evaluate", "--method", "bright-test,dark-test", "--data", folder / "images",
                        "--masks", folder / "masks", "--out", tmp_path / "x", "--set", "offset=9")
    assert code == 1 and "--set offset: method 'bright-test': 9.0 is out of range" in err


def test_shards_with_different_settings_refuse_to_merge(two_methods, folder, tmp_path, capsys):
    out = tmp_path / "sharded"
    common = ["evaluate", "--method", "bright-test", "--data", folder / "images", "--masks", folder / "masks",
              "--out", out, "--no-progress"]
    assert _cli(capsys, *common, "--shard", "0/2")[0] == 0
    assert _cli(capsys, *common, "--shard", "1/2", "--set", "offset=0.25")[0] == 0
    code, _, err = _cli(capsys, "evaluate", "--merge", "--out", out)
    assert code == 1 and "different settings" in err


def test_readme_method_tables_are_generated_from_the_declarations():
    from asuka.readme_tables import block

    assert block() in (ROOT / "README.md").read_text(encoding="utf-8"), \
        "README's method tables drifted from the declarations: run `python -m asuka.readme_tables`"
