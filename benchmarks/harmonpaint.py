"""HarmonPaint's cost over plain SD-inpainting (same steps, same CFG), with SD-1.5-sized random weights.

    python benchmarks/harmonpaint.py [--resolution 512] [--steps 50] [--repeats 1] [--threads 2]
                                     [--end-to-end-steps 10] [--device cpu|cuda]
    python benchmarks/harmonpaint.py --flops [--resolution 512] [--steps 50]

Per-stage times (batch 1 image, median over ``--repeats`` after one warm-up, stages timed round-robin so machine
load spreads evenly) and peak resident-memory growth per stage:

* ``CFG pass``: one U-Net call on the CFG batch of 2, plain / with SAMS (layers 2-6) / with MAKVS (layers 8-15);
* ``steer pass``: the steer loss's conditional gradient pass (batch 1, SAMS on) as HarmonPaint runs it (forward
  stopped after the last cross-attention layer the loss reads, backward to the latent) and, for the saving, with the
  full forward.

Totals for ``--steps`` DDIM steps, with ``n_s`` structure steps (``t >= 600``; 20 of 50) and ``n_t`` style steps:
``SD = steps × plain``, ``HarmonPaint = n_s × (SAMS + steer) + n_t × MAKVS`` (text encoder, VAE encode and decode are
shared and left out of both, which makes the ratio an upper bound). Then one end-to-end run of each pipeline at
``--end-to-end-steps`` steps (same seed, same components) measures the real ratio. Nothing is downloaded.

``--flops`` counts each stage's floating-point work instead (``torch.utils.flop_counter``: convolutions and matrix
products, forward and backward) on the meta device, so the SD-sized work ratio at 512² is exact and independent of
machine load, in seconds.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Callable

import torch

from asuka.attention import AttentionController, TokenMasks
from asuka.models.tiny import ddim_scheduler, sd15_text_encoder, sd15_unet, sd15_vae, tiny_tokenizer
from asuka.pipelines._sampling import Step, unet_input
from asuka.pipelines.harmonpaint.config import HarmonPaintConfig
from asuka.pipelines.harmonpaint.controls import MAIN, MAKVS, SAMS
from asuka.pipelines.harmonpaint.masks import resize_mask_to_grid
from asuka.pipelines._sampling import frozen
from asuka.pipelines.harmonpaint.pipeline import HarmonPaintPipeline, SteerHook
from asuka.pipelines.harmonpaint.schedule import StepPlan, plan_steps
from asuka.pipelines.harmonpaint.steer import prompt_token_mask

sys.path.insert(0, str(Path(__file__).resolve().parent))
from measure import PeakMemory, sync, time_stages  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--resolution", type=int, default=512)
    parser.add_argument("--steps", type=int, default=50, help="DDIM steps for the extrapolated totals")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--end-to-end-steps", type=int, default=10, help="0 skips the end-to-end runs")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--flops", action="store_true", help="count FLOPs on the meta device instead of timing")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device("meta" if args.flops else args.device)

    with torch.device(device):
        pipe = HarmonPaintPipeline(vae=sd15_vae(), text_encoder=sd15_text_encoder(), tokenizer=tiny_tokenizer(),
                                   unet=sd15_unet(), scheduler=ddim_scheduler(), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    unet, side = pipe.unet, args.resolution // 8
    config = HarmonPaintConfig.from_options()
    g = torch.Generator().manual_seed(0)
    z = torch.randn(1, 4, side, side, generator=g).to(device)
    host_mask = torch.zeros(1, 1, side, side)
    host_mask[..., side // 4: 3 * side // 4, side // 4: 3 * side // 4] = 1
    mask = host_mask.to(device)
    masked = torch.randn(1, 4, side, side, generator=g).to(device)
    text = torch.randn(2, 77, 768, generator=g).to(device)
    tensors = {"mask": torch.cat([mask, mask]), "masked_image_latents": torch.cat([masked, masked]),
               "prompt_embeds": text}
    pipe.scheduler.set_timesteps(args.steps)
    timesteps = pipe.scheduler.timesteps
    plans = plan_steps(timesteps.tolist())
    n_structure = sum(p.structure for p in plans)
    masks = TokenMasks(mask, resize=resize_mask_to_grid)
    t = timesteps[0]

    def controller_with(kind: str) -> AttentionController:
        ctl = AttentionController(unet)
        selfs = ctl.layers.select(kind="self")
        if kind == "sams":
            ctl.add(SAMS(masks, plans, config.tau, config.sams_variant, True), selfs.select(indices=config.sams_layers))
        elif kind == "makvs":
            layers = selfs.select(indices=config.makvs_layers)
            style = [StepPlan(structure=False, sams=False, steer=False, makvs=True)] * len(plans)
            # per-grid applicability is read on the host once (a meta mask has no values)
            makvs = MAKVS(TokenMasks(host_mask, resize=resize_mask_to_grid), style, config.lam, config.makvs_mode,
                          layers, (side, side))
            makvs.masks = masks
            ctl.add(makvs, layers)
        return ctl

    def cfg_pass(kind: str) -> Callable[[], object]:
        ctl = controller_with(kind)

        def run():
            with ctl, torch.no_grad():
                ctl.state.step, ctl.state.phase, ctl.state.cfg = 0, MAIN, True
                x = unet_input(pipe.scheduler, z, t, cfg=True, extra_channels=(tensors["mask"],
                                                                               tensors["masked_image_latents"]))
                unet(x, t, encoder_hidden_states=text)
        return run

    def steer_pass(truncated: bool) -> Callable[[], object]:
        ctl = controller_with("sams")
        weights = prompt_token_mask([8], 77).to(device)
        hook = SteerHook(pipe, ctl, config, plans, masks, weights, weights, timesteps.tolist(), (side, side),
                         slice(1, None))
        if not truncated:
            hook.last = list(unet.modules())[-1]  # the U-Net's last module: a full forward

        def run():
            with ctl, frozen(unet), torch.no_grad():
                hook(Step(0, t, len(plans)), z, tensors)
        return run

    stages = {"CFG pass, plain (B=2)": cfg_pass("plain"), "CFG pass + SAMS (B=2)": cfg_pass("sams"),
              "CFG pass + MAKVS (B=2)": cfg_pass("makvs"), "steer pass, stopped early (B=1)": steer_pass(True),
              "steer pass, full forward (B=1)": steer_pass(False)}
    if args.flops:
        from torch.utils.flop_counter import FlopCounterMode

        times = {}
        for name, fn in stages.items():
            with FlopCounterMode(display=False) as counter:
                fn()
            times[name] = counter.get_total_flops() / 1e12
        print(f"HarmonPaint stages at {args.resolution}², SD-1.5-sized U-Net: TFLOPs (conv + matmul, fwd + bwd)")
        for name in stages:
            print(f"  {name:34s} {times[name]:8.3f} TFLOP")
    else:
        times, memory = time_stages(stages, args.repeats, device, memory=True)
        print(f"HarmonPaint stages at {args.resolution}², SD-1.5-sized random weights, {device}, "
              f"{torch.get_num_threads()} threads")
        for name in stages:
            print(f"  {name:34s} {times[name]:8.2f} s   peak +{memory[name] / 2**30:6.2f} GiB", flush=True)
    unit = "TFLOP" if args.flops else "s"
    plain, sams, makvs = (times[k] for k in list(stages)[:3])
    steer, steer_full = times["steer pass, stopped early (B=1)"], times["steer pass, full forward (B=1)"]
    n_style = args.steps - n_structure
    sd = args.steps * plain
    hp = n_structure * (sams + steer) + n_style * makvs
    print(f"{args.steps} steps ({n_structure} structure, {n_style} style): SD-inpaint {sd:.1f} {unit}, HarmonPaint "
          f"{hp:.1f} {unit}, ratio {hp / sd:.2f} (U-Net work only)")
    every_step = args.steps * (sams + steer + makvs - 2 * plain) + sd
    print(f"  saved by stopping the steer pass early: {n_structure * (steer_full - steer):.1f} {unit} "
          f"({(steer_full - steer) / steer_full:.0%} of a steer pass); by the phase split: {every_step - hp:.1f} "
          f"{unit} (SAMS + steer + MAKVS on every step: ratio {every_step / sd:.2f}); with a full-forward steer "
          f"pass the ratio would be {(hp + n_structure * (steer_full - steer)) / sd:.2f}")

    if args.end_to_end_steps and not args.flops:
        from diffusers import StableDiffusionInpaintPipeline

        sd_pipe = StableDiffusionInpaintPipeline(**pipe.components)
        sd_pipe.set_progress_bar_config(disable=True)
        image = torch.rand(1, 3, args.resolution, args.resolution, generator=g)
        pixel_mask = torch.nn.functional.interpolate(mask.cpu(), scale_factor=8)
        call = dict(prompt="a red boat on a lake", image=image, mask_image=pixel_mask, height=args.resolution,
                    width=args.resolution, num_inference_steps=args.end_to_end_steps, output_type="pt")
        results = {}
        for name, p in (("SD-inpaint", sd_pipe), ("HarmonPaint", pipe)):
            with PeakMemory(device) as peak:
                sync(device)
                start = time.perf_counter()
                p(**call, generator=torch.Generator().manual_seed(0))
                sync(device)
            results[name] = (time.perf_counter() - start, peak.peak)
        (t_sd, m_sd), (t_hp, m_hp) = results["SD-inpaint"], results["HarmonPaint"]
        print(f"end to end, {args.end_to_end_steps} steps, CFG 7.5: SD-inpaint {t_sd:.1f} s (peak +{m_sd / 2**30:.2f} "
              f"GiB), HarmonPaint {t_hp:.1f} s (peak +{m_hp / 2**30:.2f} GiB), ratio {t_hp / t_sd:.2f}")


if __name__ == "__main__":
    main()
