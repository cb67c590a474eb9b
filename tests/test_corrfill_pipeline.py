"""CorrFill pipelines on tiny real components (stitched 8x16 latents): the oracles of the paper/official code."""


import pytest
import torch
from diffusers import StableDiffusionInpaintPipeline

from asuka.errors import InputError
from asuka.models.tiny import tiny_sd_components
from asuka.pipelines.corrfill import correspondence as corr
from asuka.pipelines.corrfill.config import CorrFillConfig, make_config
from asuka.pipelines.corrfill.control import GRAD, CorrFillState
from asuka.pipelines.corrfill.pipelines import CorrFillInpaintPipeline

SIZE = 64  # per half: latent 8x8, stitched 8x16
STEPS = 3
OFF = CorrFillConfig(enable_masking=False, enable_latent_opt=False)
FULL = make_config("side-by-side", step_masking=STEPS, step_optimize=STEPS)


@pytest.fixture(scope="module")
def pipe():
    pipe = CorrFillInpaintPipeline(**tiny_sd_components(), requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture
def tiny_one_level_pipe():
    """A CorrFill pipeline whose UNet has one resolution level (self-attention layers 0-3)."""
    from diffusers import UNet2DConditionModel

    from asuka.models.tiny import TINY_CROSS_ATTENTION_DIM, seeded

    with seeded(0):
        unet = UNet2DConditionModel(
            sample_size=8, in_channels=9, out_channels=4, block_out_channels=(32,), layers_per_block=1,
            down_block_types=("CrossAttnDownBlock2D",), up_block_types=("CrossAttnUpBlock2D",),
            cross_attention_dim=TINY_CROSS_ATTENTION_DIM, attention_head_dim=8, norm_num_groups=8).eval()
    pipe = CorrFillInpaintPipeline(**{**tiny_sd_components(), "unet": unet}, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def inputs(batch=1, seed=0):
    g = torch.Generator().manual_seed(seed)
    reference = torch.rand(batch, 3, SIZE, SIZE, generator=g) * 2 - 1
    image = torch.roll(reference, 8, -1) + 0.05 * torch.randn(batch, 3, SIZE, SIZE, generator=g)
    mask = torch.zeros(batch, 1, SIZE, SIZE)
    mask[..., 16:48, 20:44] = 1
    return reference, image.clamp(-1, 1), mask


def run(pipe, config, reference, image, mask, seeds=(0,), **kw):
    gens = [torch.Generator().manual_seed(s) for s in seeds]
    return pipe(reference, image, mask, config=config, num_inference_steps=STEPS, generator=gens,
                output_type="latent", **kw).images


def base_latents(pipe, reference, image, mask, seeds=(0,)):
    """diffusers' own StableDiffusionInpaintPipeline on the stitched input, same weights and seeds."""
    base = StableDiffusionInpaintPipeline(**{k: getattr(pipe, k) for k in (
        "vae", "text_encoder", "tokenizer", "unet", "scheduler", "safety_checker", "feature_extractor")},
        requires_safety_checker=False)
    base.set_progress_bar_config(disable=True)
    stitched = torch.cat([reference, image], -1)
    wide = torch.cat([torch.zeros_like(mask), mask], -1)
    n = len(seeds)
    return base(prompt=[""] * n, image=(stitched + 1) / 2, mask_image=wide, height=SIZE, width=2 * SIZE,
                num_inference_steps=STEPS, guidance_scale=3.0, eta=1.0, output_type="latent",
                generator=[torch.Generator().manual_seed(s) for s in seeds]).images


def test_all_switches_off_is_the_base_pipeline_bit_for_bit(pipe):
    ref, img, mask = inputs()
    expected = base_latents(pipe, ref, img, mask)
    assert torch.equal(run(pipe, OFF, ref, img, mask), expected)
    zero_windows = make_config("side-by-side", step_masking=0, step_optimize=0)
    assert torch.equal(run(pipe, zero_windows, ref, img, mask), expected)


def test_estimation_and_gradient_passes_change_nothing_when_their_effect_is_zero(pipe):
    """Maps computed, votes cast, gradient passes run -- but Str_o = 0 and no masking: output and generator state
    are the baseline's (the extra passes draw no random numbers)."""
    ref, img, mask = inputs()
    passes = []
    config = make_config("side-by-side", enable_masking=False, step_optimize=2, str_optimize=0.0)
    g1 = torch.Generator().manual_seed(0)
    got = pipe(ref, img, mask, config=config, num_inference_steps=STEPS, generator=[g1], output_type="latent",
               on_grad_pass=passes.append).images
    g2 = torch.Generator().manual_seed(0)
    expected = pipe(ref, img, mask, config=OFF, num_inference_steps=STEPS, generator=[g2],
                    output_type="latent").images
    assert torch.equal(got, expected)
    assert passes == [0, 1]  # min(step_optimize, steps) gradient passes
    assert torch.equal(g1.get_state(), g2.get_state())


def test_a_mask_that_allows_everything_changes_nothing(pipe):
    """Masking on, no boost, a radius covering every reference token, no outliers: the mask is all 0."""
    ref, img, mask = inputs()
    config = make_config("side-by-side", enable_latent_opt=False, enable_filter=False, mask_boost=0.0,
                         mask_window=-2.0, step_masking=STEPS)
    torch.testing.assert_close(run(pipe, config, ref, img, mask), run(pipe, OFF, ref, img, mask),
                               rtol=1e-5, atol=1e-5)


def test_full_method_changes_the_result_and_only_the_target_half_is_optimised(pipe):
    ref, img, mask = inputs()
    full = run(pipe, FULL, ref, img, mask)
    masking_only = run(pipe, make_config("side-by-side", enable_latent_opt=False), ref, img, mask)
    off = run(pipe, OFF, ref, img, mask)
    assert torch.isfinite(full).all()
    assert not torch.equal(full, off) and not torch.equal(masking_only, off)
    assert not torch.equal(full, masking_only)


def test_no_state_leaks_between_images_and_runs_are_deterministic(pipe):
    ref_a, img_a, mask_a = inputs(seed=1)
    ref_b, img_b, mask_b = inputs(seed=2)
    alone = run(pipe, FULL, ref_b, img_b, mask_b)
    run(pipe, FULL, ref_a, img_a, mask_a)
    assert torch.equal(run(pipe, FULL, ref_b, img_b, mask_b), alone)


def _two_pairs():
    ref, img, mask = inputs(batch=2, seed=3)
    mask[1] = 0
    mask[1, :, 8:40, 8:30] = 1
    return ref, img, mask


def test_a_batch_of_two_is_two_independent_runs_bit_for_bit(pipe):
    """Nothing crosses between batch elements (state, votes, masks, gradients per image), with every default vote
    layer: element i of the batch [A, B] equals element i of [X_i, X_i] bit for bit. Comparing batches of the same
    size keeps the UNet's arithmetic identical (see the next test for why a batch of one rounds differently)."""
    ref, img, mask = _two_pairs()
    batch = run(pipe, FULL, ref, img, mask, seeds=(0, 1))
    for i in range(2):
        twins = run(pipe, FULL, ref[[i, i]], img[[i, i]], mask[[i, i]], seeds=(i, i))
        assert torch.equal(twins[0], twins[1])
        assert torch.equal(batch[i], twins[i])


def test_a_batch_of_two_equals_the_two_single_runs(pipe, monkeypatch):
    """A batch of two against the two single runs, every default vote layer. The UNet of a one-image batch rounds
    differently from a two-image batch (BLAS takes another path for one row: differences of about 1e-7, not a
    CorrFill effect), and CorrFill's estimation is discontinuous -- the argmax over reference tokens, the dominant
    count, the range check of smoothed correspondences. With random tiny weights the attention is nearly uniform, so
    top-2 margins of 1e-9 and smoothed correspondences exactly on the border of the image are common, and a
    last-bit difference can flip one correspondence, which changes the masks and the final latents by about 0.1.
    So the runs are compared where that cannot happen: the first pass's maps (nothing discrete has acted on the
    features yet) agree to float32 rounding, and so does every correspondence whose argmax margin is far larger than
    that rounding. (The previous test shows the full runs are independent per image.)"""
    ref, img, mask = _two_pairs()
    passes = {}
    vote = CorrFillState.vote

    def recording(key):
        maps = passes.setdefault(key, [])

        def record(state, tar2ref):
            if state.phase == GRAD and state.step == 0:
                maps.append(tar2ref.detach().clone())
            vote(state, tar2ref)
        return record

    monkeypatch.setattr(CorrFillState, "vote", recording("batch"))
    run(pipe, FULL, ref, img, mask, seeds=(0, 1))
    for i in range(2):
        monkeypatch.setattr(CorrFillState, "vote", recording(i))
        run(pipe, FULL, ref[i:i + 1], img[i:i + 1], mask[i:i + 1], seeds=(i,))
    monkeypatch.undo()
    side = 8
    checked = 0
    for i in range(2):
        assert len(passes[i]) == len(passes["batch"]) == len(FULL.vote_layers)
        bank_single = torch.zeros(1, side * side, side * side)
        bank_batch = torch.zeros_like(bank_single)
        for single, batched in zip(passes[i], passes["batch"]):
            torch.testing.assert_close(batched[i:i + 1], single, rtol=1e-5, atol=1e-6)
            corr.vote(bank_single, corr.upsample_keys(single, side))
            corr.vote(bank_batch, corr.upsample_keys(batched[i:i + 1], side))
        rounding = (bank_batch - bank_single).abs().max()
        top2 = bank_single.topk(2, -1).values
        clear = (top2[..., 0] - top2[..., 1]) > 100 * rounding
        assert torch.equal(bank_batch.argmax(-1)[clear], bank_single.argmax(-1)[clear])
        checked += int(clear.sum())
    assert checked >= 32  # most of the 2 x 64 target tokens have a clear match


def test_degenerate_masks_run_without_nan(pipe):
    ref, img, mask = inputs()
    assert torch.isfinite(run(pipe, FULL, ref, img, torch.zeros_like(mask))).all()
    assert torch.isfinite(run(pipe, FULL, ref, img, torch.ones_like(mask))).all()


def test_output_is_the_target_composited_outside_the_hole(pipe):
    ref, img, mask = inputs()
    out = pipe(ref, img, mask, config=FULL, num_inference_steps=2, generator=torch.Generator().manual_seed(0))
    assert out.images.shape == img.shape and out.stitched.shape == (1, 3, SIZE, 2 * SIZE)
    keep = mask == 0
    assert torch.equal(out.images[keep.expand_as(img)], img[keep.expand_as(img)])
    hole = (mask > 0).expand_as(img)
    assert torch.equal(out.images[hole], out.stitched[..., SIZE:][hole])


def test_bad_pairs_are_clear_errors(pipe):
    ref, img, mask = inputs()
    with pytest.raises(InputError, match="reference"):
        pipe(ref[..., :32], img, mask, config=FULL, num_inference_steps=1)
    with pytest.raises(InputError, match="square"):
        pipe(ref[..., :32, :], img[..., :32, :], mask[..., :32, :], config=FULL, num_inference_steps=1)


def test_runs_under_inference_mode(pipe):
    """The gradient pass re-enables autograd on normal copies of the caller's inference tensors."""
    ref, img, mask = inputs()
    with torch.inference_mode():
        got = run(pipe, FULL, ref, img, mask)
    assert torch.equal(got, run(pipe, FULL, ref, img, mask))


def test_compiled_unet_keeps_one_graph_per_kind_of_pass(tiny_one_level_pipe):
    """torch.compile (dynamo with a counting eager backend: graph capture without code generation) of the UNet: the
    gradient pass and the masked main pass are one graph each at a resolution, whatever the number of steps (the
    controls gate on a per-pass flag, never on the step index, and the state's dicts do not change shape during a
    pass); a second generation at the same size compiles nothing; the result is eager's bit for bit. A one-level
    UNet (4 self-attention layers, all voting) keeps the tracing short.

    Tolerance: with inductor (code generation, minutes on this CPU, so not run here) the tiny pipeline's latents
    differed from eager by 9.5e-6 at most (FULL, 3 steps) -- float32 rounding of fused kernels. No bound is asserted
    for it: on random weights, where top-2 margins of 1e-9 are common, such rounding can flip a correspondence (see
    the batch tests above), and one flip changes the latents by ~0.1."""
    import torch._dynamo
    from torch._dynamo.testing import CompileCounter

    pipe = tiny_one_level_pipe
    ref, img, mask = inputs()
    config = make_config("side-by-side", step_masking=STEPS, step_optimize=STEPS, vote_layers=(0, 1, 2, 3))
    eager = run(pipe, config, ref, img, mask)
    counter = CompileCounter()
    pipe.unet.compile(backend=counter)
    try:
        assert torch.equal(run(pipe, config, ref, img, mask), eager)
        assert counter.frame_count == 2  # 3 gradient passes + 3 main passes
        assert torch.equal(run(pipe, config, ref, img, mask), eager)
        assert counter.frame_count == 2
    finally:
        torch._dynamo.reset()


def test_gradient_checkpointing_changes_nothing(pipe, monkeypatch):
    """diffusers checkpoints whenever autograd is on, so the gradient pass's backward re-runs the self-attention
    layers: they must not vote or collect maps again (the official code's diffusers 0.21 did not checkpoint in eval).
    Both ways: the ``gradient_checkpointing`` setting (switched on for the gradient pass only, then restored) and a
    UNet the caller checkpoints."""
    from dataclasses import replace

    from asuka.pipelines.corrfill.control import MatchReader

    import asuka.attention.processor as processor

    computed, delivered = [], []
    read_maps, on_read = processor._read_maps, MatchReader.on_read
    monkeypatch.setattr(processor, "_read_maps", lambda *args: (computed.append(1), read_maps(*args))[1])
    monkeypatch.setattr(MatchReader, "on_read", lambda self, call, maps: (delivered.append(1), on_read(self, call, maps)))
    ref, img, mask = inputs()
    expected = run(pipe, FULL, ref, img, mask)
    plain, plain_delivered = len(computed), len(delivered)
    assert torch.equal(run(pipe, replace(FULL, gradient_checkpointing=True), ref, img, mask), expected)
    assert len(computed) - plain > plain  # the backward re-ran the layers ...
    assert len(delivered) - plain_delivered == plain_delivered  # ... and the controller kept their reads from voting
    assert not pipe.unet.is_gradient_checkpointing
    pipe.unet.enable_gradient_checkpointing()
    try:
        assert torch.equal(run(pipe, FULL, ref, img, mask), expected)
    finally:
        pipe.unet.disable_gradient_checkpointing()


def test_reader_gets_target_rows_at_reference_keys_of_the_layers_softmax(pipe):
    """MatchReader's maps: target-query rows of the cond half, the softmax over all stitched keys, at the reference
    keys only (the columns the matching map and the objective use)."""
    from asuka.attention import AttentionController
    from asuka.pipelines.corrfill.control import MatchReader

    state = CorrFillState(FULL, batch=1, side=8, device=torch.device("cpu"))
    state.begin_pass(GRAD)
    seen = []

    class Recorder(MatchReader):
        def on_read(self, call, maps):
            seen.append((call.query, call.key, maps))

    controller = AttentionController(pipe.unet)
    layer = controller.layers.select(kind="self")[0]
    controller.add(Recorder(state), [layer])
    g = torch.Generator().manual_seed(0)
    sample, text = torch.randn(2, 9, 8, 16, generator=g), torch.randn(2, 77, pipe.unet.config.cross_attention_dim, generator=g)
    with torch.no_grad(), controller:
        controller.state.cfg = True
        pipe.unet(sample, 10, encoder_hidden_states=text)
    ((q, k, maps),) = seen
    h, w = layer.grid((8, 16))
    probs = (q[1:] @ k[1:].transpose(-1, -2) * layer.module.scale).softmax(-1).mean(1)  # (1, h*w, h*w)
    grid = probs.view(1, h, w, h, w)
    ref = grid[:, :, w // 2:, :, : w // 2].reshape(1, h * h, h * h)
    torch.testing.assert_close(maps, ref, atol=1e-6, rtol=0)
