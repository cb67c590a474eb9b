"""Every registered method against its base pipeline: time per image and peak memory, one table.

    python benchmarks/methods.py [--resolution 512] [--steps 4] [--repeats 2] [--threads 2] [--device cpu|cuda]
                                 [--only sd,asuka]

Each row runs a method and its base pipeline through :class:`asuka.api.Inpainter` (the same path as
``asuka inpaint``) at ``--resolution``² with SD-1.5-sized random weights (``asuka.models.tiny.sd15_*``; saved once
under ``$ASUKA_CACHE``/``~/.cache/asuka`` as ``sd15-random-*``, about 4 GB each) and ``--steps`` denoising steps, a
centred square hole of 25 %, batch 1. After one warm-up call each, method and base are called alternately
``--repeats`` times (so machine load spreads evenly) and the median time is reported; the ratios come from the
same run. Peak memory is the growth of resident memory during a call over the memory before it (sampled every
5 ms from ``/proc/self/statm``; on CUDA ``torch.cuda.max_memory_allocated`` growth), plus the weights' size.

**Adding a row** (one small function per method): write ``def row_<method>() -> Row`` returning the method, its
base method, the model folders for both (cached SD-sized random weights: reuse :func:`sd15_inpaint_dir` or write
your own with :func:`asuka.models.tiny.cached_pipeline_dir`), and any options/inputs/weights the row needs; then
add it to :data:`ROWS`. Options not given are the method's declared defaults, except ``num_inference_steps``,
which is ``--steps`` for both sides.
"""

from __future__ import annotations

import argparse
import os
import statistics
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from asuka.api import Inpainter
from asuka.models.tiny import cached_pipeline_dir


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


def row_sd() -> Row:
    """``sd`` against itself: the table's unit (ratios 1.00 up to noise)."""
    return Row("sd", "sd", sd15_inpaint_dir)


def row_asuka() -> Row:
    """``asuka`` (no CFG) against SD-inpainting with diffusers' default CFG 7.5 and an empty prompt."""
    return Row("asuka", "sd", sd15_asuka_dir)


ROWS: list[Callable[[], Row]] = [row_sd, row_asuka]
"""One entry per method: add yours here."""


# ---------------------------------------------------------------------------------------------- measuring
class PeakMemory:
    """Peak growth of memory during a block: resident set size on CPU (sampled), allocator peak on CUDA."""

    def __init__(self, device: torch.device) -> None:
        self.device, self.peak, self._stop = device, 0, threading.Event()

    @staticmethod
    def _rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def _watch(self, start: int) -> None:
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, self._rss() - start)

    def __enter__(self) -> "PeakMemory":
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._start = torch.cuda.memory_allocated(self.device)
        else:
            self._thread = threading.Thread(target=self._watch, args=(self._rss(),), daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak = torch.cuda.max_memory_allocated(self.device) - self._start
        else:
            self._stop.set()
            self._thread.join()


def _weights_bytes(painter: Inpainter) -> int:
    pipe = getattr(painter.runner, "pipe", None)
    modules = [m for m in getattr(pipe, "components", {}).values() if isinstance(m, torch.nn.Module)]
    return sum(p.numel() * p.element_size() for m in modules for p in m.parameters())


def _inputs(resolution: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (resolution, resolution, 3), np.uint8)
    mask = np.zeros((resolution, resolution), np.uint8)
    lo, hi = resolution // 4, 3 * resolution // 4
    mask[lo:hi, lo:hi] = 255
    return image, mask


def measure(row: Row, *, resolution: int, steps: int, repeats: int, device: torch.device) -> dict[str, Any]:
    """Median seconds per image and peak memory of ``row.method`` and ``row.base``, measured alternately."""
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
    peaks: dict[str, int] = {side: 0 for side in painters}
    with torch.inference_mode():
        for side, painter in painters.items():  # warm-up (and loading)
            painter(image, mask, inputs=inputs[side], seed=0)
        for _ in range(repeats):
            for side, painter in painters.items():
                with PeakMemory(device) as peak:
                    start = time.perf_counter()
                    painter(image, mask, inputs=inputs[side], seed=0)
                    if device.type == "cuda":
                        torch.cuda.synchronize(device)
                    times[side].append(time.perf_counter() - start)
                peaks[side] = max(peaks[side], peak.peak)
    result = {"method": row.method, "base": row.base}
    for side, painter in painters.items():
        result[f"{side}_s"] = statistics.median(times[side])
        result[f"{side}_peak_gb"] = peaks[side] / 2**30
        result[f"{side}_weights_gb"] = _weights_bytes(painter) / 2**30
        painter.release()
    result["time_ratio"] = result["method_s"] / result["base_s"]
    result["peak_ratio"] = result["method_peak_gb"] / max(result["base_peak_gb"], 1e-9)
    return result


def table(results: list[dict[str, Any]], *, resolution: int, steps: int, device: torch.device) -> str:
    lines = [f"Methods vs base, {resolution}², {steps} steps, batch 1, {device.type}, "
             f"{torch.get_num_threads()} threads, SD-1.5-sized random weights", "",
             "| method | base | s / image | base s / image | time ratio | peak GB (call) | base peak GB | "
             "peak ratio | weights GB | base weights GB |", "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        lines.append(f"| {r['method']} | {r['base']} | {r['method_s']:.2f} | {r['base_s']:.2f} | "
                     f"{r['time_ratio']:.2f} | {r['method_peak_gb']:.2f} | {r['base_peak_gb']:.2f} | "
                     f"{r['peak_ratio']:.2f} | {r['method_weights_gb']:.2f} | {r['base_weights_gb']:.2f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--resolution", type=int, default=512)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--only", help="comma list of methods (default: every row)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    rows = [make() for make in ROWS]
    if args.only:
        wanted = set(args.only.split(","))
        rows = [r for r in rows if r.method in wanted]
    results = []
    for row in rows:
        results.append(measure(row, resolution=args.resolution, steps=args.steps, repeats=args.repeats,
                               device=device))
        print(table(results[-1:], resolution=args.resolution, steps=args.steps, device=device).splitlines()[-1],
              flush=True)
    print(table(results, resolution=args.resolution, steps=args.steps, device=device))


if __name__ == "__main__":
    main()
