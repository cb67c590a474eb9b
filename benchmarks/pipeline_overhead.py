"""ASUKA's inference overhead over plain SD-1.5 inpainting, stage by stage, with SD-1.5-sized random weights.

    python benchmarks/pipeline_overhead.py [--resolution 512] [--repeats 3] [--steps 50] [--device cpu|cuda]
                                           [--dtype float32|bfloat16|float16]

Stages (batch 1, ``torch.inference_mode``, median over ``--repeats`` after one warm-up; the stages are timed
round-robin, so machine load spreads evenly over them):

* ASUKA: MAE prior (ViT-B/16 at 256², features after 6 of 8 decoder blocks), aligner (512 -> 768, 4 blocks),
  one UNet step with the (1, 256, 768) condition and no CFG, VAE decode, paste-back.
* shared by both: VAE encode of the masked image (the UNet's extra input, computed once per image).
* plain SD-inpaint: CLIP text encoder (77 tokens), one UNet step with the (B, 77, 768) text condition; diffusers'
  default guidance 7.5 runs the UNet on a batch of 2 (CFG).

Totals extrapolated to ``--steps`` denoising steps (scheduler arithmetic is negligible and left out):
``ASUKA = MAE + aligner + encode + steps × UNet(256 tokens, B=1) + decode + paste-back``, against two baselines:

* ``SD, no CFG`` (the like-for-like baseline: ASUKA replaces the text condition, paper §3.2, and runs without CFG)
  ``= text encoder + encode + steps × UNet(77 tokens, B=1) + decode`` — the issue's goal is a ratio ≤ 1.05;
* ``SD, CFG 7.5`` (diffusers' default call) ``= text encoder + encode + steps × UNet(77 tokens, B=2) + decode``.

The weights are random (``asuka.models.tiny.sd15_*``, ``MAEPrior()``, ``PriorAligner()``): only shapes matter for
time. Nothing is downloaded.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from diffusers.utils import logging as diffusers_logging

from asuka.models.aligner import PriorAligner
from asuka.models.mae import MAEPrior
from asuka.models.tiny import sd15_text_encoder, sd15_unet, sd15_vae
from asuka.tensors import paste_back

sys.path.insert(0, str(Path(__file__).resolve().parent))
from measure import time_stages  # noqa: E402


def totals(t: dict[str, float], steps: int) -> dict[str, float]:
    """End-to-end seconds per image for ASUKA and the two SD baselines (module docstring)."""
    shared = t["vae encode (masked image)"] + t["vae decode"]
    return {
        "ASUKA (no CFG)": t["mae prior"] + t["aligner"] + steps * t["unet step, 256 tokens, B=1"] + shared
        + t["paste-back"],
        "SD-inpaint, no CFG": t["text encoder"] + steps * t["unet step, 77 tokens, B=1"] + shared,
        "SD-inpaint, CFG 7.5": t["text encoder"] + steps * t["unet step, 77 tokens, B=2"] + shared,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--resolution", type=int, default=512, help="image side in pixels (multiple of 8)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=50, help="denoising steps for the extrapolated totals")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    args = parser.parse_args(argv)
    if args.resolution % 8 or args.repeats < 1 or args.steps < 1:
        parser.error("--resolution must be a multiple of 8; --repeats and --steps must be >= 1")
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    diffusers_logging.set_verbosity_error()  # silences the "cast with to()" notes for the random models

    unet = sd15_unet().to(device, dtype)
    vae = sd15_vae().to(device, dtype)
    text_encoder = sd15_text_encoder().to(device, dtype)
    mae = MAEPrior().eval().to(device, dtype)
    aligner = PriorAligner().eval().to(device, dtype)

    g = torch.Generator().manual_seed(0)
    res, lat = args.resolution, args.resolution // 8
    image = (torch.rand(1, 3, res, res, generator=g) * 2 - 1).to(device)
    mask = torch.zeros(1, 1, res, res, device=device)
    mask[..., res // 4: 3 * res // 4, res // 4: 3 * res // 4] = 1
    unet_in = torch.randn(1, 9, lat, lat, generator=g).to(device, dtype)
    latents = torch.randn(1, 4, lat, lat, generator=g).to(device, dtype)
    features = torch.randn(1, 256, 512, generator=g).to(device, dtype)
    cond_256 = torch.randn(1, 256, 768, generator=g).to(device, dtype)
    cond_77 = torch.randn(1, 77, 768, generator=g).to(device, dtype)
    tokens = torch.randint(0, 49408, (1, 77), generator=g).to(device)
    t = torch.tensor(500, device=device)
    decoded = image.clone()

    stages = {
        "mae prior": lambda: mae.prior(image.to(dtype), mask.to(dtype), return_image=False),
        "aligner": lambda: aligner(features),
        "unet step, 256 tokens, B=1": lambda: unet(unet_in, t, encoder_hidden_states=cond_256),
        "vae encode (masked image)": lambda: vae.encode((image * (1 - mask)).to(dtype)),
        "vae decode": lambda: vae.decode(latents),
        "paste-back": lambda: paste_back(decoded, image, mask),
        "text encoder": lambda: text_encoder(tokens),
        "unet step, 77 tokens, B=1": lambda: unet(unet_in, t, encoder_hidden_states=cond_77),
        "unet step, 77 tokens, B=2": lambda: unet(unet_in.repeat(2, 1, 1, 1), t,
                                                  encoder_hidden_states=cond_77.repeat(2, 1, 1)),
    }
    with torch.inference_mode():
        times = time_stages(stages, args.repeats, device)

    print(f"\n{res}x{res}, {args.device}, {args.dtype}, {torch.get_num_threads()} threads, batch 1, "
          f"median of {args.repeats} (after 1 warm-up)\n")
    print("| stage | seconds |\n|---|---:|")
    for name, value in times.items():
        print(f"| {name} | {value:.4f} |")
    total = totals(times, args.steps)
    asuka = total["ASUKA (no CFG)"]
    print(f"\n| pipeline ({args.steps} steps, extrapolated) | seconds / image | ASUKA / this |\n|---|---:|---:|")
    for name, value in total.items():
        print(f"| {name} | {value:.2f} | {asuka / value:.3f} |")
    overhead = times["mae prior"] + times["aligner"] + times["paste-back"]
    print(f"\nASUKA's added stages (MAE + aligner + paste-back): {overhead:.3f} s = "
          f"{overhead / times['unet step, 256 tokens, B=1']:.2f} UNet steps; "
          f"UNet step 256 vs 77 condition tokens: x{times['unet step, 256 tokens, B=1'] / times['unet step, 77 tokens, B=1']:.3f}")


if __name__ == "__main__":
    main()
