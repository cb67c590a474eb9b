"""HD-Painter's cost over its base inpainting pipeline, and the inpainting-specialised SR stage's over diffusers'
plain x4 upscaler, with SD-sized random weights (only shapes matter for time and memory; nothing is downloaded).

    python benchmarks/hd_painter.py [--size 512] [--steps 3] [--sr-size 512] [--sr-steps 2] [--device cpu|cuda]
                                    [--skip-sr | --skip-inpaint]

Rows (batch 1, same steps, one warm-up call each, then the variants timed round-robin so machine load spreads
evenly; peak memory = the largest resident-set (CPU) or allocated (CUDA) increase during the call):

* ``sd-inpaint``: diffusers' ``StableDiffusionInpaintPipeline`` with HD-Painter's DDIM (trailing, CFG 7.5) - the base;
* ``hd-painter``: PAIntA + RASG (defaults; ``rasg_low_memory`` on: the unconditional half without a graph);
* ``hd-painter (CFG batch graph)``: the same with ``rasg_low_memory=False`` (the official code's batching; only with
  ``--batch-graph``: it needs about twice the activation memory);
* ``painta only``, ``rasg only`` (with ``--ablations``);
* ``x4 upscaler`` vs ``inpaint SR``: diffusers' ``StableDiffusionUpscalePipeline`` vs ``InpaintSRPipeline`` (blend +
  Poisson) at the x4 upscaler's real widths, output ``--sr-size`` (2048 in practice; 512 keeps CPU runs short).

``hd_painter_rows`` / ``sr_rows`` return the rows for ``benchmarks/methods.py``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from measure import PeakMemory, sync  # noqa: E402


def measure_call(fn: Callable[[], object], device: torch.device) -> tuple[float, float]:
    """(seconds, peak memory increase in GiB) of one call."""
    sync(device)
    with PeakMemory(device) as peak:
        start = time.perf_counter()
        fn()
        sync(device)
        seconds = time.perf_counter() - start
    return seconds, peak.peak / 2 ** 30


def _round_robin(variants: dict[str, Callable[[], object]], device: torch.device, repeats: int,
                 warmup: bool = True) -> dict[str, tuple]:
    if warmup:
        for fn in variants.values():
            fn()
    results: dict[str, list] = {name: [] for name in variants}
    for _ in range(repeats):
        for name, fn in variants.items():
            results[name].append(measure_call(fn, device))
    return {name: (min(t for t, _ in r), max(m for _, m in r)) for name, r in results.items()}


def hd_painter_rows(size: int = 512, steps: int = 3, device: str = "cpu", repeats: int = 1,
                    batch_graph: bool = False, ablations: bool = False, warmup: bool = True) -> list[dict]:
    from diffusers import StableDiffusionInpaintPipeline

    from asuka.models.tiny import ddim_scheduler, sd15_text_encoder, sd15_unet, sd15_vae, tiny_tokenizer
    from asuka.pipelines.hd_painter.pipeline import HDPainterPipeline

    dev = torch.device(device)
    tokenizer = tiny_tokenizer()
    parts = dict(vae=sd15_vae(), text_encoder=sd15_text_encoder(), tokenizer=tokenizer, unet=sd15_unet(9))
    hd = HDPainterPipeline(**parts, scheduler=ddim_scheduler()).to(dev)
    base = StableDiffusionInpaintPipeline(**parts, scheduler=hd.sampling_scheduler(), safety_checker=None,
                                          feature_extractor=None, requires_safety_checker=False).to(dev)
    for pipe in (hd, base):
        pipe.set_progress_bar_config(disable=True)
    image = torch.rand(1, 3, size, size) * 2 - 1
    mask = torch.zeros(1, 1, size, size)
    mask[..., size // 4: 3 * size // 4, size // 4: 3 * size // 4] = 1
    common = dict(prompt="a red boat", num_inference_steps=steps, output_type="pt")

    def run_hd(**kw):
        return lambda: hd(image, mask, working_long_side=size, generator=torch.Generator().manual_seed(0), **common,
                          **kw)

    variants = {
        "sd-inpaint (base)": lambda: base(image=(image + 1) / 2, mask_image=mask, height=size, width=size,
                                          generator=torch.Generator().manual_seed(0), **common),
        "hd-painter": run_hd(),
    }
    if ablations:
        variants["painta only"] = run_hd(rasg=False)
        variants["rasg only"] = run_hd(painta=False)
    if batch_graph:
        variants["hd-painter (CFG batch graph)"] = run_hd(rasg_low_memory=False)
    results = _round_robin(variants, dev, repeats, warmup)
    base_time, base_mem = results["sd-inpaint (base)"]
    return [dict(row=name, size=size, steps=steps, seconds=t, seconds_per_step=t / steps, ratio=t / base_time,
                 peak_gib=m, memory_ratio=m / base_mem if base_mem > 0 else float("nan"))
            for name, (t, m) in results.items()]


def sr_rows(size: int = 512, steps: int = 2, device: str = "cpu", repeats: int = 1) -> list[dict]:
    from diffusers import DDIMScheduler, StableDiffusionUpscalePipeline

    from asuka.models.tiny import sd15_text_encoder, tiny_tokenizer
    from asuka.models.tiny_upscaler import (sd_x4_upscaler_unet, sd_x4_upscaler_vae, upscaler_low_res_scheduler,
                                            upscaler_scheduler)
    from asuka.pipelines.hd_painter.sr import InpaintSRPipeline

    dev = torch.device(device)
    text_encoder = sd15_text_encoder()   # a 768-d CLIP for OpenCLIP-H's 1024-d: the text encoder runs once per image
    unet = sd_x4_upscaler_unet(cross_attention_dim=768)
    up = StableDiffusionUpscalePipeline(vae=sd_x4_upscaler_vae(), text_encoder=text_encoder, tokenizer=tiny_tokenizer(),
                                        unet=unet, low_res_scheduler=upscaler_low_res_scheduler(),
                                        scheduler=upscaler_scheduler()).to(dev)
    sr = InpaintSRPipeline.from_upscaler(up)
    up.scheduler = DDIMScheduler.from_config(up.scheduler.config, timestep_spacing="trailing", set_alpha_to_one=True)
    for pipe in (up, sr):
        pipe.set_progress_bar_config(disable=True)
    image = torch.rand(1, 3, size, size) * 2 - 1
    mask = torch.zeros(1, 1, size, size)
    mask[..., size // 4: 3 * size // 4, size // 4: 3 * size // 4] = 1
    low = torch.rand(1, 3, size // 4, size // 4) * 2 - 1
    variants = {
        "x4 upscaler (base)": lambda: up(prompt="a red boat", image=(low + 1) / 2, num_inference_steps=steps,
                                         guidance_scale=7.5, noise_level=20, output_type="pt",
                                         generator=torch.Generator().manual_seed(0)),
        "inpaint SR": lambda: sr(image, mask, low, prompt="a red boat", num_inference_steps=steps,
                                 output_long_side=size, output_type="pt", generator=torch.Generator().manual_seed(0)),
    }
    results = _round_robin(variants, dev, repeats)
    base_time, base_mem = results["x4 upscaler (base)"]
    return [dict(row=name, size=size, steps=steps, seconds=t, seconds_per_step=t / steps, ratio=t / base_time,
                 peak_gib=m, memory_ratio=m / base_mem if base_mem > 0 else float("nan"))
            for name, (t, m) in results.items()]


def _print(rows: list[dict]) -> None:
    print("| row | size | steps | s/image | s/step | time ratio | peak GiB | memory ratio |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['row']} | {r['size']} | {r['steps']} | {r['seconds']:.1f} | {r['seconds_per_step']:.2f} | "
              f"{r['ratio']:.2f} | {r['peak_gib']:.2f} | {r['memory_ratio']:.2f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--sr-size", type=int, default=512)
    parser.add_argument("--sr-steps", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--skip-sr", action="store_true", help="only the inpainting rows")
    parser.add_argument("--skip-inpaint", action="store_true", help="only the SR rows")
    parser.add_argument("--batch-graph", action="store_true", help="also time rasg_low_memory=False")
    parser.add_argument("--ablations", action="store_true", help="also time PAIntA only and RASG only")
    parser.add_argument("--no-warmup", dest="warmup", action="store_false",
                        help="skip the warm-up calls (slow machines; the first call then includes one-off costs)")
    args = parser.parse_args()
    if args.device == "cpu":
        torch.set_num_threads(2)
    if not args.skip_inpaint:
        _print(hd_painter_rows(args.size, args.steps, args.device, args.repeats, args.batch_graph, args.ablations,
                               args.warmup))
    if not args.skip_sr:
        _print(sr_rows(args.sr_size, args.sr_steps, args.device, args.repeats))


if __name__ == "__main__":
    main()
