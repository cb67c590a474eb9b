"""CorrFill's cost over its baseline: time per image and peak memory of the full method and of masking only vs the
same baseline without CorrFill, at the paper's 512x1024 stitched size with SD-sized random weights.

    python benchmarks/corrfill.py [--baseline side-by-side|leftrefill|ip-adapter-plus|paint-by-example] [--size 512]
                                  [--steps 1]
                                  [--device cpu|cuda] [--threads 2] [--warmup] [--gradient-checkpointing]
                                  [--json out.json]

Configurations (see :func:`measure`): ``baseline``: CorrFill off -- the stitched baseline, bit-identical to diffusers'
pipeline; ``masking``: masking, filter and smoothing, no latent optimisation; ``full``: everything, every step
optimised and masked (the Table S1 RealEstate10K settings with the windows covering the steps). The paper reports
about 10x for the full method (Table S2: 66.5 s vs 6.7 s per image on an RTX A5000) and about 2x for masking only;
this implementation's goal is <= 3x. Steps are reduced: every step costs the same in every configuration (all steps are inside the
windows), so the ratio does not depend on the count. The weights are random (``asuka.models.tiny.sd15_*``: an
SD-1.5-sized UNet, 8 heads at every level; LeftRefill: random 77 x 768 learned prompt embeddings; IP-Adapter-Plus: a
random adapter for that UNet with a tiny image encoder, loaded through diffusers' ``load_ip_adapter`` from a temporary
folder; Paint-by-Example with the same UNet on a 768-d image embedding): only shapes matter for time. CFG 3 for every
baseline (it is on in all four; its scale does not change the cost). Nothing is downloaded.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import tempfile
import time
from pathlib import Path

BASELINES = ("side-by-side", "leftrefill", "ip-adapter-plus", "paint-by-example")


def _pipeline(baseline: str, device, dtype, workdir: Path):
    """The CorrFill pipeline of ``baseline`` and the extra call arguments that baseline needs."""
    import torch
    from diffusers import DDIMScheduler

    from asuka.models.tiny import SD15_SCHEDULE, sd15_text_encoder, sd15_unet, sd15_vae, tiny_tokenizer

    scheduler = DDIMScheduler(**SD15_SCHEDULE, clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    extra = {}
    if baseline == "paint-by-example":
        from asuka.models.tiny_paint_by_example import tiny_example_encoder, tiny_example_feature_extractor
        from asuka.pipelines.corrfill.pipelines import CorrFillPaintByExamplePipeline

        pipe = CorrFillPaintByExamplePipeline(vae=sd15_vae(), image_encoder=tiny_example_encoder(proj_size=768),
                                              unet=sd15_unet(), scheduler=scheduler, safety_checker=None,
                                              feature_extractor=tiny_example_feature_extractor())
    else:
        from asuka.pipelines.corrfill.pipelines import CorrFillInpaintPipeline

        pipe = CorrFillInpaintPipeline(vae=sd15_vae(), text_encoder=sd15_text_encoder(), tokenizer=tiny_tokenizer(),
                                       unet=sd15_unet(), scheduler=scheduler, safety_checker=None,
                                       feature_extractor=None, requires_safety_checker=False)
        if baseline == "leftrefill":
            g = torch.Generator().manual_seed(0)
            extra = {"prompt_embeds": torch.randn(1, 77, 768, generator=g).to(device, dtype),
                     "negative_prompt_embeds": torch.randn(1, 77, 768, generator=g).to(device, dtype)}
        elif baseline == "ip-adapter-plus":
            from asuka.models.tiny_ip_adapter import load_tiny_ip_adapter, save_tiny_ip_adapter

            save_tiny_ip_adapter(workdir / "ip-adapter", pipe.unet)
            load_tiny_ip_adapter(pipe, workdir / "ip-adapter", "ip-adapter-plus")
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device=device, dtype=dtype), extra


def _peak_rss_reset() -> bool:
    """Give freed heap memory back (glibc ``malloc_trim``) and reset the kernel's peak-RSS counter of this process
    (Linux: VmHWM), so the next peak is the next configuration's; False where it cannot be reset."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _rss_gib(field: str) -> float:
    """``VmRSS`` (current) or ``VmHWM`` (peak since the last reset) of this process, GiB; the running peak
    (``ru_maxrss``) where /proc is missing."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def measure(baseline: str = "side-by-side", size: int = 512, steps: int = 1, device: str = "cpu",
            dtype: str = "float32", threads: int = 2, warmup: bool = False,
            gradient_checkpointing: bool = False) -> dict:
    """Time the three configurations in this process (seconds per image for ``steps`` steps, VAE decode excluded:
    it is the same in all three, so the ratios are conservative) and their peak memory: on CPU the peak RSS of the
    process during that configuration (the kernel's counter, reset before each; it includes the weights; NaN where
    it cannot be reset), on CUDA
    the peak allocated. The full method runs first, so it pays the process's first-call costs (page faults of new
    allocations, kernel selection): ratios are conservative without a warm-up; ``warmup`` adds a one-step baseline
    call first. ``gradient_checkpointing``: the full method with the UNet's blocks checkpointed in the gradient pass."""
    import torch

    from asuka.pipelines.corrfill.config import make_config

    torch.set_num_threads(threads)
    dev, dt = torch.device(device), getattr(torch, dtype)
    with tempfile.TemporaryDirectory() as workdir:
        pipe, extra = _pipeline(baseline, dev, dt, Path(workdir))
    g = torch.Generator().manual_seed(0)
    reference = (torch.rand(1, 3, size, size, generator=g) * 2 - 1).to(dev, dt)
    image = torch.roll(reference, size // 16, -1)
    mask = torch.zeros(1, 1, size, size, device=dev, dtype=dt)
    mask[..., size // 4: 3 * size // 4, size // 4: 5 * size // 8] = 1
    configs = {
        "baseline": make_config(baseline, enable_masking=False, enable_latent_opt=False),
        "masking": make_config(baseline, enable_latent_opt=False, step_masking=steps),
        "full": make_config(baseline, step_masking=steps, step_optimize=steps,
                            gradient_checkpointing=gradient_checkpointing),
    }

    def call(config, n):
        pipe(reference, image, mask, config=config, num_inference_steps=n, guidance_scale=3.0,
             generator=torch.Generator().manual_seed(0), output_type="latent", **extra)

    if warmup:
        call(configs["baseline"], 1)
    weights_gib = _rss_gib("VmRSS") if dev.type == "cpu" else torch.cuda.memory_allocated(dev) / 2**30
    rows = {}
    for name in ("full", "masking", "baseline"):
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
            torch.cuda.reset_peak_memory_stats(dev)
        else:
            separate = _peak_rss_reset()
        before = _rss_gib("VmRSS") if dev.type == "cpu" else torch.cuda.memory_allocated(dev) / 2**30
        start = time.perf_counter()
        call(configs[name], steps)
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
            peak = torch.cuda.max_memory_allocated(dev) / 2**30
        else:
            # without a reset the kernel's counter is the process's running peak: not this configuration's
            peak = _rss_gib("VmHWM") if separate else float("nan")
        seconds = time.perf_counter() - start
        rows[name] = {"seconds": seconds, "seconds_per_step": seconds / steps, "peak_gib": peak,
                      "before_gib": before}
        print(name, rows[name], flush=True, file=sys.stderr)
    base = rows["baseline"]["seconds"]
    for row in rows.values():
        row["ratio"] = row["seconds"] / base
    return {"baseline": baseline, "size": f"{size}x{2 * size}", "steps": steps, "device": device, "dtype": dtype,
            "threads": threads, "gradient_checkpointing": gradient_checkpointing, "after_loading_gib": weights_gib, **{name: rows[name] for name in configs}}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--baseline", default="side-by-side", choices=BASELINES)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--steps", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--warmup", action="store_true", help="a one-step baseline call before the measured ones")
    parser.add_argument("--gradient-checkpointing", action="store_true",
                        help="the full method with the UNet's blocks checkpointed in the gradient pass")
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    result = measure(args.baseline, args.size, args.steps, args.device, args.dtype, args.threads, args.warmup,
                     gradient_checkpointing=args.gradient_checkpointing)
    print(json.dumps(result, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    main()
