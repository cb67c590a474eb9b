"""torch.compile of a loaded method (asuka.compile, ``Inpainter(compile=...)``) and of the attention controls.

Tracing even the tiny UNet with dynamo takes seconds on a 2-core CPU, so the fast tests use dynamo's ``eager``
backend (graph capture, no code generation); the inductor comparison against the documented tolerance is slow.
"""

from __future__ import annotations

import pytest
import torch
import torch._dynamo
from torch._dynamo.testing import CompileCounter

from asuka.api import Inpainter
from asuka.attention import AttentionControl, AttentionController
from asuka.compile import COMPILE_TOLERANCE, compile_pipeline
from asuka.models.tiny import tiny_unet


def _image_mask(h=32, w=32):
    g = torch.Generator().manual_seed(0)
    image = torch.rand(1, 3, h, w, generator=g) * 2 - 1
    mask = torch.zeros(1, 1, h, w)
    mask[..., h // 4: 3 * h // 4, w // 4: 3 * w // 4] = 1
    return image, mask


def _run(painter):
    image, mask = _image_mask()
    return painter(image, mask, inputs={"prompt": "a photo"}, seed=0)


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def test_inpainter_compile_compiles_once_and_matches_eager(tiny_inpaint_dir):
    options = {"num_inference_steps": 2}
    eager = _run(Inpainter("sd", tiny_inpaint_dir, device="cpu", options=options))
    counter = CompileCounter()
    painter = Inpainter("sd", tiny_inpaint_dir, device="cpu", options=options, compile={"backend": counter})
    compiled = _run(painter)
    pipe = painter.runner.pipe
    assert pipe.unet._compiled_call_impl is not None and pipe.vae.decoder._compiled_call_impl is not None
    assert counter.frame_count >= 2  # unet and decoder went through dynamo
    assert torch.equal(compiled, eager)  # the eager backend runs the captured graphs as they are
    frames = counter.frame_count
    assert compile_pipeline(pipe, {"backend": counter}) == []  # already compiled: nothing again
    torch.testing.assert_close(_run(painter), eager, rtol=0, atol=0)
    assert counter.frame_count == frames  # same size again: no recompilation


@pytest.mark.slow
def test_inductor_matches_eager_within_tolerance(tiny_inpaint_dir):
    options = {"num_inference_steps": 2}
    eager = _run(Inpainter("sd", tiny_inpaint_dir, device="cpu", options=options))
    compiled = _run(Inpainter("sd", tiny_inpaint_dir, device="cpu", options=options, compile=True))
    assert (compiled - eager).abs().max() <= COMPILE_TOLERANCE


class _Bias(AttentionControl):
    """A control with a Python gate; when active, a zero additive score bias (recomputes the layer on SDPA). It
    asks for the block input (as HD-Painter's PAIntA does), so the transformer-block pre-hook is traced too."""

    needs_block_input = True

    def __init__(self, on: bool):
        self.on = on

    def active(self, layer, state):
        return self.on

    def score_bias(self, call):
        return torch.zeros((), device=call.query.device)


def _unet_call(unet, size):
    x = torch.randn(2, 9, size, size)
    return lambda: unet(x, 10, encoder_hidden_states=torch.randn(2, 77, 32)).sample


def test_inactive_controls_cause_no_graph_break_and_active_ones_recompile_once_per_size():
    unet = tiny_unet().eval()
    with torch.no_grad():
        ctl = AttentionController(unet)
        ctl.add(_Bias(False), ctl.layers.select(kind="self"))
        with ctl:
            x = torch.randn(2, 9, 8, 8)
            explained = torch._dynamo.explain(unet)(x, 10, encoder_hidden_states=torch.randn(2, 77, 32))
        assert explained.graph_break_count == 0, [str(b.reason) for b in explained.break_reasons]
        assert explained.graph_count == 1

        counter = CompileCounter()
        unet.compile(backend=counter)
        for size in (8, 8, 16, 16):  # a new controller per generation, as every method does
            ctl = AttentionController(unet)
            ctl.add(_Bias(True), ctl.layers.select(kind="self"))
            with ctl:
                _unet_call(unet, size)()
        assert counter.frame_count <= 2, counter.frame_count  # at most once per resolution


def test_stage_module_compile_compiles_its_parts_in_place_at_setup():
    from trainers.mae import MAEModule

    TINY_MAE = dict(img_size=32, patch_size=8, embed_dim=16, depth=1, num_heads=2, decoder_embed_dim=16,
                    decoder_depth=2, decoder_num_heads=2, mlp_ratio=2.0, feature_layer=1)

    module = MAEModule(model=TINY_MAE, compile=True)
    keys = list(module.state_dict())
    module.setup("fit")
    parts = module.compiled_parts()
    assert parts and all(part._compiled_call_impl is not None for part in parts)
    assert list(module.state_dict()) == keys  # checkpoints and exports keep their parameter names

    counter = CompileCounter()
    eager = MAEModule(model=TINY_MAE)
    eager.load_state_dict(module.state_dict())
    for part in parts:  # a capture-only backend: the traced step must equal the eager one
        part.compile(backend=counter)
    x, mask = torch.randn(2, 3, 32, 32), torch.zeros(2, 1, 32, 32)
    out = module.model.forward_train(x, mask, generator=torch.Generator().manual_seed(0))["loss"]
    ref = eager.model.forward_train(x, mask, generator=torch.Generator().manual_seed(0))["loss"]
    assert counter.frame_count >= 1 and torch.equal(out, ref)


def test_compile_flag_reaches_inpainter_and_evaluate_requests():
    from asuka.cli import build_parser, method_requests
    from asuka.evaluation.runner import MethodRun

    parser, _ = build_parser()
    [request], _ = method_requests(parser.parse_args(["inpaint", "--compile"]), ["sd"])
    assert request["compile"] is True and Inpainter(**request).compile is True
    [request], _ = method_requests(parser.parse_args(["inpaint"]), ["sd"])
    assert request["compile"] is False
    args = parser.parse_args(["evaluate", "--compile", "--method", "sd", "--data", "d", "--out", "o"])
    assert MethodRun(**method_requests(args, ["sd"])[0][0]).compile is True


def test_evaluation_records_compile_and_dtype_and_refuses_to_merge_mixed_shards(tmp_path):
    import json

    from asuka.errors import InputError
    from asuka.evaluation.aggregate import load_shards
    from asuka.evaluation.distributed import Shard
    from asuka.evaluation.runner import EvalConfig, MethodRun
    from asuka.evaluation.scoring import write_shard

    config = EvalConfig(data="data", out="out", methods=[MethodRun("sd", compile=True)])
    eager, compiled = (config.meta(Inpainter("sd", compile=c).settings()) for c in (False, True))
    assert (eager["compile"], compiled["compile"], eager["dtype"]) == (False, True, None)
    half = Inpainter("sd", dtype=torch.bfloat16, compile={"mode": "max-autotune"}).settings()
    assert half["dtype"] == "bfloat16" and half["compile"] == {"mode": "max-autotune"}
    json.dumps(half)  # metrics.json and the shard files hold it

    records = [{"key": "a", "domain": "all", "hole_ratio": 0.1}]
    write_shard(tmp_path / "same", Shard(0, 2).name, records, None, None, compiled)
    write_shard(tmp_path / "same", Shard(1, 2).name, [{**records[0], "key": "b"}], None, None, compiled)
    assert [r["key"] for r in load_shards(tmp_path / "same")[1]] == ["a", "b"]
    write_shard(tmp_path / "mixed", Shard(0, 2).name, records, None, None, eager)
    write_shard(tmp_path / "mixed", Shard(1, 2).name, [{**records[0], "key": "b"}], None, None, compiled)
    with pytest.raises(InputError, match="different settings"):
        load_shards(tmp_path / "mixed")


GRAPHS_PER_RESOLUTION = {
    "hd-painter": 2,  # PAIntA main pass (no grad), RASG gradient pass
    "harmonpaint": 2,  # main pass, steer (gradient) pass
    "corrfill": 4,  # gradient, masked, unmasked-estimating and stock passes (tests/test_corrfill_pipeline.py)
    "pilot": 2,  # guided pass, gradient pass (token masks prefilled before the first pass)
}


@pytest.mark.parametrize("method", sorted(GRAPHS_PER_RESOLUTION))
def test_method_controls_recompile_at_most_once_per_resolution(method):
    """Each method's own attention controls under dynamo, on one tiny-UNet transformer block (where the controls'
    processors and hooks run; tracing the whole UNet per graph takes tens of seconds on 2 cores): a bounded number of
    graphs per resolution, whatever the step count; a second generation at the same size, or one with more steps,
    captures nothing new (a new controller per generation reuses the graphs)."""
    from asuka.pipelines._registry import get_method

    registered = get_method(method)
    painter = Inpainter(method, device="cpu", options=dict(registered.quick))
    inputs = {d.role: "a photo" for d in registered.spec.inputs if d.kind == "text"}
    block = painter.runner.pipe.unet.down_blocks[0].attentions[0].transformer_blocks[0]
    counter = CompileCounter()
    block.compile(backend=counter)
    steps = painter.resolved["num_inference_steps"]

    def generate(size, num_steps=steps):
        painter.resolved = {**painter.resolved, "num_inference_steps": num_steps}
        image, mask = _image_mask(size, size)
        reference = {"reference": image.flip(-1)} if any(d.role == "reference" for d in registered.spec.inputs) else {}
        return painter(image, mask, inputs={**inputs, **reference}, seed=0)

    per_size = []
    for size in (64, 96):
        before = counter.frame_count
        generate(size)
        per_size.append(counter.frame_count - before)
        generate(size)
        generate(size, steps + 2)
        assert counter.frame_count - before == per_size[-1], f"{method}: recompiled at the same size {size}"
    assert per_size[0] >= 1 and max(per_size) <= GRAPHS_PER_RESOLUTION[method], (method, per_size)
