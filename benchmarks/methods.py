"""Every registered method against its base pipeline: time per image and peak memory, one table.

    python benchmarks/methods.py [--resolution 512] [--steps 4] [--repeats 2] [--threads 2] [--device cpu|cuda]
                                 [--only sd,asuka] [--sequential]

Each row runs a method and its base pipeline through :class:`asuka.api.Inpainter` (the same path as
``asuka inpaint``) at ``--resolution``² with SD-1.5-sized random weights (``asuka.models.tiny.sd15_*``; saved once
under ``$ASUKA_CACHE``/``~/.cache/asuka`` as ``sd15-random-*``, about 4 GB each) and ``--steps`` denoising steps, a
centred square hole of 25 %, batch 1. After one warm-up call each, method and base are called alternately
``--repeats`` times (so machine load spreads evenly) and the median time is reported; the ratios come from the
same run; the CPU-time ratio (``time.process_time``, every thread of the process) is the one to trust on a shared
machine, where other processes' load inflates wall time unevenly. ``--sequential`` keeps one model in memory at a
time (all method calls, then all base calls) for machines that cannot hold both. Peak memory is the growth of
resident memory during a call over the memory before it (sampled every 5 ms from ``/proc/self/statm``; on CUDA
``torch.cuda.max_memory_allocated`` growth), plus the weights' size.

**Adding a row** (one small function per method): write ``def row_<method>() -> Row`` returning the method, its
base method, the model folders for both (cached SD-sized random weights: reuse :func:`sd15_inpaint_dir` or write
your own with :func:`asuka.models.tiny.cached_pipeline_dir`), and any options/inputs/weights the row needs; then
add it to :data:`ROWS`. Options not given are the method's declared defaults, except ``num_inference_steps``,
which is ``--steps`` for both sides (or ``Row.steps(--steps)`` for a row that sets it; the table then names it).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from asuka.api import Inpainter
from asuka.cli import positive_int
from asuka.models.tiny import cached_pipeline_dir

sys.path.insert(0, str(Path(__file__).resolve().parent))
from measure import PeakMemory  # noqa: E402


# ------------------------------------------------------------------------------------------------ weights
def sd15_inpaint_dir() -> Path:
    """An SD-1.5-inpainting-sized ``StableDiffusionInpaintPipeline`` folder with random weights (written once)."""
    from diffusers import StableDiffusionInpaintPipeline

    from asuka.models.tiny import ddim_scheduler, sd15_text_encoder, sd15_unet, sd15_vae, tiny_tokenizer

    def write(folder: Path) -> None:
        tokenizer = tiny_tokenizer()  # only the token count matters for time (77 tokens either way)
        StableDiffusionInpaintPipeline(vae=sd15_vae(), unet=sd15_unet(), text_encoder=sd15_text_encoder(),
                                       tokenizer=tokenizer, scheduler=ddim_scheduler(), safety_checker=None,
                                       feature_extractor=None, requires_safety_checker=False).save_pretrained(folder)

    return cached_pipeline_dir("sd15-random-inpaint", write)


def sd15_asuka_dir() -> Path:
    """An ASUKA pipeline folder at SD-1.5 size (ViT-B MAE, 4-block aligner, SD-1.5 UNet and VAE), random weights."""
    from asuka.models.aligner import PriorAligner
    from asuka.models.mae import MAEPrior
    from asuka.models.tiny import ddim_scheduler, sd15_unet, sd15_vae
    from asuka.pipelines.asuka import AsukaInpaintPipeline

    def write(folder: Path) -> None:
        AsukaInpaintPipeline(vae=sd15_vae(), unet=sd15_unet(), scheduler=ddim_scheduler(), mae=MAEPrior(),
                             aligner=PriorAligner()).save_pretrained(folder)

    return cached_pipeline_dir("sd15-random-asuka", write)


def sd15_t2i_dir() -> Path:
    """An SD-1.5-sized text-to-image ``StableDiffusionPipeline`` folder (4-channel UNet) with random weights."""
    from diffusers import StableDiffusionPipeline

    from asuka.models.tiny import ddim_scheduler, sd15_text_encoder, sd15_unet, sd15_vae, tiny_tokenizer

    def write(folder: Path) -> None:
        StableDiffusionPipeline(vae=sd15_vae(), unet=sd15_unet(in_channels=4), text_encoder=sd15_text_encoder(),
                                tokenizer=tiny_tokenizer(), scheduler=ddim_scheduler(), safety_checker=None,
                                feature_extractor=None, requires_safety_checker=False).save_pretrained(folder)

    return cached_pipeline_dir("sd15-random-t2i", write)


# --------------------------------------------------------------------------------------------------- rows
@dataclass
class Row:
    """One table row: ``method`` against ``base``, each loaded from its folder."""

    method: str
    base: str
    model: Callable[[], Path]
    base_model: Callable[[], Path] = sd15_inpaint_dir
    options: dict[str, Any] = field(default_factory=dict)
    base_options: dict[str, Any] = field(default_factory=dict)
    inputs: dict[str, Any] = field(default_factory=dict)
    weights: dict[str, Any] = field(default_factory=dict)
    steps: Callable[[int], int] | None = None
    """``--steps`` -> the steps this row runs on both sides (None: ``--steps`` as given), for methods whose cost
    depends on which timesteps the steps land on."""
    variant: str = ""
    """Shown after the method's name, for a method with several rows (CorrFill's baselines)."""


def row_sd() -> Row:
    """``sd`` against itself: the table's unit (ratios 1.00 up to noise)."""
    return Row("sd", "sd", sd15_inpaint_dir)


def row_asuka() -> Row:
    """``asuka`` (no CFG) against SD-inpainting with diffusers' default CFG 7.5 and an empty prompt."""
    return Row("asuka", "sd", sd15_asuka_dir)


def row_pilot() -> Row:
    """``pilot`` against plain text-to-image sampling with the same SD-1.5-sized UNet, steps and CFG 7.5: the base is
    ``pilot`` with every switch off (``num_gradient_ops=0, sbc=False``), which equals ``StableDiffusionPipeline`` bit
    for bit (tests/test_pilot_pipeline.py, O1). ``op_interval = num_gradient_ops = 2`` keeps the paper's cost
    structure (one gradient step per denoising step: 200 fwd+bwd for 200 steps) at any even ``--steps``."""
    return Row("pilot", "pilot", sd15_t2i_dir, base_model=sd15_t2i_dir,
               options={"op_interval": 2, "num_gradient_ops": 2},
               base_options={"num_gradient_ops": 0, "sbc": False}, inputs={"prompt": "a photo"})


def row_hd_painter() -> Row:
    """``hd-painter`` (PAIntA + RASG, declared defaults: working size 512, RASG's graph on the conditional half) against
    SD-inpainting on the same weights, same prompt and steps, CFG 7.5. (The x4 SR stage: benchmarks/hd_painter.py.)"""
    return Row("hd-painter", "sd", sd15_inpaint_dir, inputs={"prompt": "a red boat"})


def harmonpaint_steps(requested: int) -> int:
    """The fewest DDIM steps >= ``requested`` whose structure/style split (paper §IV-C: ``t >= 0.6 T`` is structure)
    has the share of the paper's 50 steps, 20 structure steps of 50: 5 (t = 801, 601 | 401, 201, 1), 10, 20, 25, 50.
    (2 steps, t = 501, 1, would have no structure step; 4 steps, one of four.)"""
    from fractions import Fraction

    from asuka.models.tiny import ddim_scheduler
    from asuka.pipelines.harmonpaint.schedule import plan_steps

    scheduler = ddim_scheduler()  # the one sd15_inpaint_dir ships (SD-1.5's DDIM settings)

    def share(steps: int) -> Fraction:
        scheduler.set_timesteps(steps)
        return Fraction(sum(plan.structure for plan in plan_steps(scheduler.timesteps.tolist())), steps)

    steps, paper = max(requested, 1), share(50)
    while share(steps) != paper:
        steps += 1
    return steps


def row_harmonpaint() -> Row:
    """``harmonpaint`` (SAMS + steer loss + MAKVS, declared defaults) against SD-inpainting with the same SD-1.5-sized
    UNet, steps and CFG 7.5. ``--steps`` is raised to the next count with the paper's split
    (:func:`harmonpaint_steps`: 40 % structure steps, each with the steer loss's extra forward + backward; the
    table's backward count is the number of structure steps that ran)."""
    return Row("harmonpaint", "sd", sd15_inpaint_dir, inputs={"prompt": "a red boat on a lake"},
               steps=harmonpaint_steps)


# CorrFill: one row per baseline, the full method (every step masked and optimised: Table S1's RealEstate10K windows
# cover the few benchmark steps) against the same stitched baseline with CorrFill off. The reference is a 512² image,
# so run these rows at --resolution 512 (512x1024 stitched). benchmarks/corrfill.py adds masking only.
_CORRFILL_OFF = {"enable_masking": False, "enable_latent_opt": False}


def _corrfill_reference() -> np.ndarray:
    return np.random.default_rng(1).integers(0, 256, (512, 512, 3), np.uint8)


def _corrfill_row(baseline: str, model: Callable[[], Path], **options: Any) -> Row:
    options = {"baseline": baseline, **options}
    return Row("corrfill", "corrfill", model, base_model=model, options=options,
               base_options={**options, **_CORRFILL_OFF}, inputs={"reference": _corrfill_reference()},
               variant=baseline)


def sd15_paint_by_example_dir() -> Path:
    """A Paint-by-Example folder with an SD-1.5-sized UNet and VAE (768-d image embedding), random weights."""
    from diffusers import PaintByExamplePipeline

    from asuka.models.tiny import ddim_scheduler, sd15_unet, sd15_vae
    from asuka.models.tiny_paint_by_example import tiny_example_encoder, tiny_example_feature_extractor

    def write(folder: Path) -> None:
        PaintByExamplePipeline(vae=sd15_vae(), image_encoder=tiny_example_encoder(proj_size=768), unet=sd15_unet(),
                               scheduler=ddim_scheduler(), safety_checker=None,
                               feature_extractor=tiny_example_feature_extractor()).save_pretrained(folder)

    return cached_pipeline_dir("sd15-random-paint-by-example", write)


def row_corrfill_side_by_side() -> Row:
    """``corrfill`` Side-by-side (empty prompt, CFG 3) vs the stitched baseline."""
    return _corrfill_row("side-by-side", sd15_inpaint_dir)


def row_corrfill_leftrefill() -> Row:
    """``corrfill`` LeftRefill with random learned prompt embeddings (77 x 768, CFG 2.5) vs the stitched baseline."""
    folder = sd15_inpaint_dir().parent / "sd15-random-leftrefill-embeds"
    folder.mkdir(exist_ok=True)
    for name, seed in (("pos.pt", 0), ("neg.pt", 1)):
        if not (folder / name).is_file():
            torch.save(torch.randn(1, 77, 768, generator=torch.Generator().manual_seed(seed)), folder / name)
    return _corrfill_row("leftrefill", sd15_inpaint_dir, prompt_embeds=str(folder / "pos.pt"),
                         negative_prompt_embeds=str(folder / "neg.pt"))


def row_corrfill_ip_adapter_plus() -> Row:
    """``corrfill`` IP-Adapter-Plus (random adapter for the SD-1.5-sized UNet, tiny image encoder) vs the stitched
    baseline with the same adapter."""
    folder = sd15_inpaint_dir().parent / "sd15-random-ip-adapter"
    if not (folder / "models").is_dir():
        from diffusers import UNet2DConditionModel

        from asuka.models.tiny_ip_adapter import save_tiny_ip_adapter

        save_tiny_ip_adapter(folder, UNet2DConditionModel.from_pretrained(sd15_inpaint_dir(), subfolder="unet"))
    return _corrfill_row("ip-adapter-plus", sd15_inpaint_dir, ip_adapter=str(folder))


def row_corrfill_paint_by_example() -> Row:
    """``corrfill`` Paint-by-Example (DDIM, CFG 5) vs the stitched baseline."""
    return _corrfill_row("paint-by-example", sd15_paint_by_example_dir)


ROWS: list[Callable[[], Row]] = [row_sd, row_asuka, row_pilot, row_hd_painter, row_harmonpaint,
                                 row_corrfill_side_by_side, row_corrfill_leftrefill, row_corrfill_ip_adapter_plus,
                                 row_corrfill_paint_by_example]
"""One entry per method: add yours here."""


# ---------------------------------------------------------------------------------------------- measuring
def _weights_bytes(painter: Inpainter) -> int:
    pipe = getattr(painter.runner, "pipe", None)
    modules = [m for m in getattr(pipe, "components", {}).values() if isinstance(m, torch.nn.Module)]
    return sum(p.numel() * p.element_size() for m in modules for p in m.parameters())


@contextmanager
def _count_unet_calls(painter: Inpainter, counts: dict[bool, int]):
    """Count the UNet's forward calls of one call into ``counts[grad_enabled]`` (a grad-enabled forward is
    differentiated once: the backward count)."""
    unet = getattr(getattr(painter.runner, "pipe", None), "unet", None)
    if unet is None:
        yield
        return

    def count(module, args, kwargs):
        grad = torch.is_grad_enabled()
        counts[grad] = counts.get(grad, 0) + 1

    handle = unet.register_forward_pre_hook(count, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()


def _inputs(resolution: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (resolution, resolution, 3), np.uint8)
    mask = np.zeros((resolution, resolution), np.uint8)
    lo, hi = resolution // 4, 3 * resolution // 4
    mask[lo:hi, lo:hi] = 255
    return image, mask


def measure(row: Row, *, resolution: int, steps: int, repeats: int, device: torch.device,
            sequential: bool = False) -> dict[str, Any]:
    """Median seconds per image and peak memory of ``row.method`` and ``row.base``, measured alternately (or one
    after the other with ``sequential``, releasing each model before loading the next)."""
    if row.steps is not None:
        steps = row.steps(steps)
    painters = {}
    for side, method, model, options in (("method", row.method, row.model, row.options),
                                         ("base", row.base, row.base_model, row.base_options)):
        from asuka.pipelines._registry import get_method

        declared = get_method(method).spec.by_name
        steps_option = {"num_inference_steps": steps} if "num_inference_steps" in declared else {}
        painters[side] = Inpainter(method, model(), device=device, options={**steps_option, **options},
                                   weights=row.weights if side == "method" else None)
    image, mask = _inputs(resolution)
    inputs = {side: {r: v for r, v in row.inputs.items() if any(i.role == r for i in p.spec.inputs)}
              for side, p in painters.items()}
    times: dict[str, list[float]] = {side: [] for side in painters}
    cpu_times: dict[str, list[float]] = {side: [] for side in painters}
    peaks: dict[str, int] = {side: 0 for side in painters}
    weights: dict[str, int] = {}
    calls: dict[str, dict[bool, int]] = {side: {} for side in painters}

    def call(side: str) -> None:
        calls[side] = {}
        with _count_unet_calls(painters[side], calls[side]), PeakMemory(device) as peak:
            start, cpu_start = time.perf_counter(), time.process_time()
            painters[side](image, mask, inputs=inputs[side], seed=0)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            times[side].append(time.perf_counter() - start)
            cpu_times[side].append(time.process_time() - cpu_start)
        peaks[side] = max(peaks[side], peak.peak)

    groups = [[side] for side in painters] if sequential else [list(painters)]
    with torch.no_grad():  # not inference_mode: gradient-based methods (PILOT) differentiate w.r.t. the latent
        for sides in groups:
            for side in sides:  # warm-up (and loading)
                painters[side](image, mask, inputs=inputs[side], seed=0)
                weights[side] = _weights_bytes(painters[side])
            for _ in range(repeats):
                for side in sides:
                    call(side)
            for side in sides:
                painters[side].release()
    result = {"method": row.method, "variant": row.variant, "base": row.base, "steps": steps}
    for side in painters:
        result[f"{side}_s"] = statistics.median(times[side])
        result[f"{side}_cpu_s"] = statistics.median(cpu_times[side])
        result[f"{side}_peak_gb"] = peaks[side] / 2**30
        result[f"{side}_weights_gb"] = weights[side] / 2**30
        result[f"{side}_unet_forward"] = sum(calls[side].values())
        result[f"{side}_unet_backward"] = calls[side].get(True, 0)
    result["time_ratio"] = result["method_s"] / result["base_s"]
    result["cpu_time_ratio"] = result["method_cpu_s"] / result["base_cpu_s"]
    result["peak_ratio"] = result["method_peak_gb"] / max(result["base_peak_gb"], 1e-9)
    return result


def table(results: list[dict[str, Any]], *, resolution: int, steps: int, device: torch.device) -> str:
    lines = [f"Methods vs base, {resolution}², {steps} steps, batch 1, {device.type}, "
             f"{torch.get_num_threads()} threads, SD-1.5-sized random weights", "",
             "| method | base | s / image | base s / image | time ratio | CPU s | base CPU s | CPU-time ratio | "
             "peak GB (call) | base peak GB | peak ratio | weights GB | base weights GB | UNet fwd (bwd) | "
             "base UNet fwd (bwd) |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        method = " ".join(filter(None, (r["method"], r.get("variant"))))
        method = method if r["steps"] == steps else f"{method} ({r['steps']} steps)"
        lines.append(f"| {method} | {r['base']} | {r['method_s']:.2f} | {r['base_s']:.2f} | "
                     f"{r['time_ratio']:.2f} | {r['method_cpu_s']:.2f} | {r['base_cpu_s']:.2f} | "
                     f"{r['cpu_time_ratio']:.2f} | {r['method_peak_gb']:.2f} | "
                     f"{r['base_peak_gb']:.2f} | "
                     f"{r['peak_ratio']:.2f} | {r['method_weights_gb']:.2f} | {r['base_weights_gb']:.2f} | "
                     f"{r['method_unet_forward']} ({r['method_unet_backward']}) | "
                     f"{r['base_unet_forward']} ({r['base_unet_backward']}) |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--resolution", type=positive_int, default=512)
    parser.add_argument("--steps", type=positive_int, default=4)
    parser.add_argument("--repeats", type=positive_int, default=2)
    parser.add_argument("--threads", type=positive_int, default=2)
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--only", help="comma list of methods (default: every row)")
    parser.add_argument("--sequential", action="store_true", help="one model in memory at a time")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    rows = [make() for make in ROWS]
    if args.only:
        wanted = {name.strip() for name in args.only.split(",")}
        unknown = wanted - {r.method for r in rows}
        if unknown:
            parser.error(f"--only: no row for {sorted(unknown)}; choose from {sorted({r.method for r in rows})}")
        rows = [r for r in rows if r.method in wanted]
    results = []
    for row in rows:
        results.append(measure(row, resolution=args.resolution, steps=args.steps, repeats=args.repeats,
                               device=device, sequential=args.sequential))
        print(table(results[-1:], resolution=args.resolution, steps=args.steps, device=device).splitlines()[-1],
              flush=True)
    print(table(results, resolution=args.resolution, steps=args.steps, device=device))


if __name__ == "__main__":
    main()
