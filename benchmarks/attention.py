"""Cost of the attention-control mechanism (asuka.attention) on an SD-1.5-sized random UNet.

    python benchmarks/attention.py [--resolution 512] [--batch 1] [--repeats 3] [--threads 2] [--device cpu|cuda]

All ratios come from one run, timed round-robin (machine load spreads evenly over the variants):

* whole UNet (one forward, ``torch.inference_mode``):
  - ``inactive / plain``: a control on all 32 attention layers, gated off — every layer delegates to its
    original SDPA processor. Goal ≤ 1.02.
  - ``store cross / plain``: an ``AttentionStore`` reading head-mean probabilities on all 16 cross-attention
    layers (the output path stays on SDPA; the reads are computed on the side).
* one self-attention layer at latent/1 (SD-1.5's ``down_blocks.0...attn1``: 4096 tokens at 512², 320 channels,
  8 heads): explicit attention (a dense score edit, so the N×N scores and probabilities are materialised) vs
  the original SDPA processor — time, and peak memory of the call (CPU: peak resident-set growth during a first
  call in a fresh process, sampled every 0.2 ms; CUDA: ``max_memory_allocated`` after a warm-up).
* one head-mean probability read with autograd, forward and backward (CorrFill's gradient-pass read on the
  latent/1 self-attention layer of a stitched ``resolution x 2·resolution`` image: the target-half query rows at
  the reference-half keys, 8 heads of 40 channels): ``head_mean_probs`` (tiles, hand-written backward) vs plain
  PyTorch autograd (each head's softmax over all keys, summed; the columns picked after) — time and peak memory
  growth of the warm-up call.

Weights are random (``asuka.models.tiny.sd15_unet``): only shapes matter for time. Nothing is downloaded.
"""

from __future__ import annotations

import argparse
import multiprocessing
import sys
from pathlib import Path

import torch
from torch import nn
from diffusers.models.attention_processor import Attention, AttnProcessor2_0
from diffusers.utils import logging as diffusers_logging

sys.path.insert(0, str(Path(__file__).resolve().parent))
from measure import PeakMemory, sync, time_stages  # noqa: E402

from asuka.attention import AttentionControl, AttentionController, AttentionStore, Read  # noqa: E402
from asuka.attention.functional import attention_scores, head_mean_probs  # noqa: E402
from asuka.attention.processor import read_tile_elements  # noqa: E402
from asuka.attention.layers import grid_at_level  # noqa: E402
from asuka.models.seeding import seeded  # noqa: E402
from asuka.models.tiny import SD15_CROSS_ATTENTION_DIM, sd15_unet  # noqa: E402


class Off(AttentionControl):
    """A control whose gate is closed (e.g. a timestep gate outside its range)."""

    def active(self, layer, state):
        return False

    def score_bias(self, call):  # never reached
        return None


class DenseIdentity(AttentionControl):
    """Forces the explicit (dense) path: a multiplicative score edit by 1."""

    def score_factor(self, call):
        return torch.ones((), device=call.query.device)


def unet_ratios(resolution: int, batch: int, repeats: int, device: torch.device, dtype: torch.dtype) -> dict[str, float]:
    unet = sd15_unet(in_channels=4).to(device, dtype)
    latent = resolution // 8
    g = torch.Generator().manual_seed(0)
    sample = torch.randn(batch, 4, latent, latent, generator=g).to(device, dtype)
    text = torch.randn(batch, 77, SD15_CROSS_ATTENTION_DIM, generator=g).to(device, dtype)

    inactive = AttentionController(unet)
    inactive.add(Off(), inactive.layers)
    reading = AttentionController(unet)
    store = reading.add(AttentionStore(Read("probs", batch="all", heads="mean")), reading.layers.select(kind="cross"))

    def run(controller=None):
        def call():
            with torch.inference_mode():
                if controller is None:
                    return unet(sample, 500, encoder_hidden_states=text).sample
                with controller:
                    out = unet(sample, 500, encoder_hidden_states=text).sample
                store.clear()
                return out
        return call

    times = time_stages({"plain": run(), "inactive": run(inactive), "store cross": run(reading)}, repeats, device)
    return {**{f"{k} s": v for k, v in times.items()},
            "inactive / plain": times["inactive"] / times["plain"],
            "store cross / plain": times["store cross"] / times["plain"]}


def _layer(device: torch.device, dtype: torch.dtype) -> Attention:
    with seeded(0):
        attn = Attention(query_dim=320, heads=8, dim_head=40, out_bias=True)
    attn.set_processor(AttnProcessor2_0())
    return attn.to(device, dtype).eval()


def _controller(attn: Attention, control: AttentionControl) -> AttentionController:
    """A controller with ``control`` on ``attn`` alone, through a UNet-shaped container holding just that layer."""
    container = nn.Module()
    container.down_blocks = nn.ModuleList([nn.Module()])
    container.down_blocks[0].attn1 = attn
    container.up_blocks = nn.ModuleList()
    controller = AttentionController(container)
    controller.add(control, controller.layers)
    return controller


def _layer_peak(explicit: bool, tokens: int, batch: int, device_name: str, dtype_name: str, queue) -> None:
    """Child process: peak memory growth (bytes) of one call of the layer."""
    torch.set_num_threads(2)
    device, dtype = torch.device(device_name), getattr(torch, dtype_name)
    attn = _layer(device, dtype)
    x = torch.randn(batch, tokens, 320).to(device, dtype)
    with torch.inference_mode(), _controller(attn, DenseIdentity() if explicit else Off()):
        if device.type == "cuda":
            attn(x)  # warm-up (kernels, allocator); on CPU none: blocks kept by malloc would hide this call's peak
        with PeakMemory(device, interval=0.0002) as peak:
            attn(x)
        queue.put(peak.peak)


def layer_ratios(resolution: int, batch: int, repeats: int, device: torch.device, dtype: torch.dtype) -> dict[str, float]:
    tokens = grid_at_level((resolution // 8, resolution // 8), 0)
    tokens = tokens[0] * tokens[1]
    attn = _layer(device, dtype)
    explicit = _controller(attn, DenseIdentity())
    x = torch.randn(batch, tokens, 320).to(device, dtype)

    def run(controller=None):
        def call():
            with torch.inference_mode():
                if controller is None:
                    return attn(x)
                with controller:
                    return attn(x)
        return call

    times = time_stages({"sdpa": run(), "explicit": run(explicit)}, repeats, device)
    ctx = multiprocessing.get_context("spawn")
    peaks = {}
    for name, flag in (("sdpa", False), ("explicit", True)):
        queue = ctx.Queue()
        child = ctx.Process(target=_layer_peak, args=(flag, tokens, batch, device.type, str(dtype).split(".")[1], queue))
        child.start()
        peaks[name] = queue.get()
        child.join()
    return {"layer sdpa s": times["sdpa"], "layer explicit s": times["explicit"],
            "layer explicit / sdpa (time)": times["explicit"] / times["sdpa"],
            "layer sdpa peak MiB": peaks["sdpa"] / 2**20, "layer explicit peak MiB": peaks["explicit"] / 2**20,
            "layer explicit / sdpa (memory)": peaks["explicit"] / max(peaks["sdpa"], 1)}


def read_ratios(resolution: int, batch: int, repeats: int, device: torch.device, dtype: torch.dtype) -> dict[str, float]:
    side, heads, width = resolution // 8, 8, 40
    g = torch.Generator().manual_seed(0)
    q = torch.randn(batch, heads, side * side, width, generator=g).to(device, dtype).requires_grad_(True)
    k = torch.randn(batch, heads, 2 * side * side, width, generator=g).to(device, dtype).requires_grad_(True)
    keys = (torch.arange(side)[:, None] * 2 * side + torch.arange(side)).reshape(-1).to(device)
    weights = torch.randn(batch, side * side, side * side, generator=g).to(device)
    scale = width ** -0.5

    def tiled():
        maps = head_mean_probs(q, k, scale, None, keys, read_tile_elements(device))
        return torch.autograd.grad((maps * weights).sum(), (q, k))

    def plain():
        maps = sum(attention_scores(q[:, h], k[:, h], scale).softmax(-1) for h in range(heads)) / heads
        return torch.autograd.grad((maps[..., keys] * weights).sum(), (q, k))

    times, peaks = time_stages({"autograd": plain, "tiled": tiled}, repeats, device, memory=True)
    return {"read autograd s": times["autograd"], "read tiled s": times["tiled"],
            "read tiled / autograd (time)": times["tiled"] / times["autograd"],
            "read autograd peak MiB": peaks["autograd"] / 2**20, "read tiled peak MiB": peaks["tiled"] / 2**20}


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--resolution", type=int, default=512)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    diffusers_logging.set_verbosity_error()
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    results = {**read_ratios(args.resolution, args.batch, args.repeats, device, dtype),
               **layer_ratios(args.resolution, args.batch, args.repeats, device, dtype),
               **unet_ratios(args.resolution, args.batch, args.repeats, device, dtype)}
    sync(device)
    width = max(map(len, results))
    for name, value in results.items():
        print(f"{name:<{width}}  {value:.4f}")
    return results


if __name__ == "__main__":
    main()
