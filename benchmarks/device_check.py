"""One device check: every method, the decoder and the trainers, eager vs compiled, one JSON + one Markdown table.

    python benchmarks/device_check.py --out device_check          # on a GPU: SD-1.5-sized random weights, 512²
    python benchmarks/device_check.py --tiny --out /tmp/dc        # CPU plumbing check with tiny components

Three parts (``--parts inference,decoder,train`` to run some):

1. **inference**: every registered method through :class:`asuka.api.Inpainter` (the path ``asuka inpaint`` takes),
   batch 1, a centred 25 % hole; each method is loaded once, run eager, then compiled in place with
   :func:`asuka.compile.compile_runner` (what ``compile=True`` runs at load) and run again. Real mode: the SD-sized
   rows of ``benchmarks/methods.py`` (their folders, options and inputs) with ``--steps`` denoising steps at
   ``--size``²; ``asuka-flux`` at FLUX.1-Fill's width with reduced depth (:data:`FLUX_CHECK_DEPTH`, in bf16). Tiny
   mode: the method's own tiny default weights and its ``quick`` options. One warm-up call (for the compiled side it
   includes compilation: ``first_s``), then ``--repeats`` timed calls; ``it/s`` = steps / median seconds per image
   (so it includes encoding, decoding and each method's extra work per step); ``graphs`` = graphs dynamo captured
   during the compiled calls (recompiles show here).
2. **decoder**: ``vae.decode`` of one latent with the SD VAE and a :class:`HarmonizingDecoderKL` built from it
   (image and mask given), eager vs ``decoder.compile()``.
3. **train**: the three stage modules (``trainers.mae``, ``trainers.aligner``, ``trainers.decoder``) in a Lightning
   ``Trainer`` with ``precision="bf16-mixed"``, with and without gradient checkpointing, 1 device, random in-memory
   batches: median step time after warm-up, samples/s, peak memory.

Peak memory: ``torch.cuda.max_memory_allocated`` growth on CUDA; on CPU the growth of the resident set (sampled),
a rough number. Results: ``OUT/device_check.json`` (every number) and ``OUT/device_check.md`` (the tables).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from asuka.cli import non_negative_int, positive_int  # noqa: E402
from benchmarks.measure import PeakMemory, sync  # noqa: E402
from benchmarks.methods import ROWS  # noqa: E402

PARTS = ("inference", "decoder", "train")

TINY_NOTE = ("Tiny run: it checks the plumbing (every row and column, eager vs compiled through the same code), not "
             "speed and not that each method compiles. Dynamo's `eager` backend (graph capture, no code generation), "
             "recompile limit 1 and one dynamo cache for all methods: a module is captured once, and a method whose "
             "calls need another graph runs those calls eagerly (`graphs` = graphs captured during its compiled "
             "calls; 0 = all reused or eager). tests/test_compile.py checks each method's controls under dynamo.")


def _mib(n: int | None) -> float | None:
    return None if n is None else round(n / 2**20, 1)


def _timed(fn: Callable[[], Any], device: torch.device, repeats: int) -> tuple[float, list[float], int, Any]:
    """(first call seconds, timed seconds, peak memory growth, last result). ``repeats`` = 0 times the first call
    alone (``--tiny``: its numbers show the plumbing, not speed); then the peak covers the first call."""
    sync(device)
    with PeakMemory(device) as first_peak:
        start = time.perf_counter()
        result = fn()
        sync(device)
        first = time.perf_counter() - start
    if repeats == 0:
        return first, [first], first_peak.peak, result
    times = []
    with PeakMemory(device) as peak:
        for _ in range(repeats):
            start = time.perf_counter()
            result = fn()
            sync(device)
            times.append(time.perf_counter() - start)
    return first, times, peak.peak, result


def _graphs() -> int:
    """Graphs dynamo has captured in this process so far (any backend)."""
    return int(torch._dynamo.utils.counters["stats"]["unique_graphs"])


def _release(device: torch.device) -> None:
    torch._dynamo.reset()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# ---------------------------------------------------------------------------------------------- inference
def _image_mask(size: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (size, size, 3), np.uint8)
    mask = np.zeros((size, size), np.uint8)
    mask[size // 4: 3 * size // 4, size // 4: 3 * size // 4] = 255
    return image, mask


FLUX_FILL_DEPTH = (19, 38)
"""FLUX.1-Fill-dev's double- and single-stream block counts (black-forest-labs/FLUX.1-Fill-dev transformer config)."""
FLUX_CHECK_DEPTH = (2, 4)
"""The device check's ``asuka-flux`` depth: FLUX.1-Fill's full width (24 heads of 128, T5 4096, CLIP 768) with 2
double- and 4 single-stream blocks (1.3 B transformer parameters instead of 11.9 B). A full-depth random
transformer is 24 GB in bf16 and minutes to initialise and write; per step, a double block costs about two single
ones, so a full-depth step costs about (2·19 + 38) / (2·2 + 4) = 9.5 times this one's transformer time."""


def flux_fill_asuka_dir(depth: tuple[int, int] = FLUX_CHECK_DEPTH) -> Path:
    """An ASUKA-FLUX pipeline folder at FLUX.1-Fill width and ``depth`` (double, single blocks), random weights:
    FLUX AE-sized harmonizing decoder (16 latent channels, widths 128-512), ViT-B/16 MAE, the release's heads
    (4 blocks of head width 64), zero null embeddings (no T5/CLIP needed). Written once under ``~/.cache/asuka``."""
    from diffusers import AutoencoderKL, FluxTransformer2DModel

    from asuka.models.decoder import HarmonizingDecoderKL
    from asuka.models.flux_aligner import FluxPriorAligner
    from asuka.models.mae import MAEPrior
    from asuka.models.seeding import seeded
    from asuka.models.tiny import cached_pipeline_dir
    from asuka.models.tiny_flux import FLUX_FILL_IN_CHANNELS, FLUX_SCALING_FACTOR, FLUX_SHIFT_FACTOR, flux_scheduler
    from asuka.pipelines.asuka_flux.pipeline import AsukaFluxFillPipeline

    def write(folder: Path) -> None:
        with seeded(0):
            transformer = FluxTransformer2DModel(
                patch_size=1, in_channels=FLUX_FILL_IN_CHANNELS, out_channels=64, num_layers=depth[0],
                num_single_layers=depth[1], attention_head_dim=128, num_attention_heads=24, joint_attention_dim=4096,
                pooled_projection_dim=768, guidance_embeds=True, axes_dims_rope=(16, 56, 56))
            vae = AutoencoderKL(
                in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
                up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(128, 256, 512, 512), layers_per_block=2,
                latent_channels=16, norm_num_groups=32, sample_size=1024, scaling_factor=FLUX_SCALING_FACTOR,
                shift_factor=FLUX_SHIFT_FACTOR, use_quant_conv=False, use_post_quant_conv=False)
            mae = MAEPrior()
            aligner = FluxPriorAligner(in_dim=mae.feature_dim, null_tokens=mae.num_tokens)
        pipe = AsukaFluxFillPipeline(vae=HarmonizingDecoderKL.from_vae(vae), transformer=transformer,
                                     scheduler=flux_scheduler(), mae=mae.eval(), aligner=aligner.eval())
        pipe.save_pretrained(folder)

    return cached_pipeline_dir(f"flux-fill-{depth[0]}x{depth[1]}-random-asuka", write)


def method_cases(tiny: bool, steps: int) -> list[dict[str, Any]]:
    """One case per registered method: name, model folder factory (None = its default), options, inputs."""
    from asuka.pipelines._registry import available_methods, get_method

    rows = {}
    for factory in ROWS:
        row = factory()
        rows.setdefault(row.method, row)
    cases = []
    for name in available_methods():
        registered = get_method(name)
        if tiny:
            case = dict(method=name, model=None, options=dict(registered.quick), inputs={}, weights={})
        elif name in rows:
            row = rows[name]
            row_steps = steps if row.steps is None else row.steps(steps)   # e.g. HarmonPaint's structure/style share
            case = dict(method=name, model=row.model, options={**row.options, "num_inference_steps": row_steps},
                        inputs=dict(row.inputs), weights=dict(row.weights))
        elif name == "asuka-flux":  # bf16 whatever --dtype: the release's setting (FLUX activations overflow fp16)
            case = dict(method=name, model=flux_fill_asuka_dir, options={"num_inference_steps": steps}, inputs={},
                        weights={}, dtype=torch.bfloat16, note=f"{FLUX_CHECK_DEPTH[0]}+{FLUX_CHECK_DEPTH[1]} of "
                                         f"{FLUX_FILL_DEPTH[0]}+{FLUX_FILL_DEPTH[1]} blocks")
        else:
            cases.append(dict(method=name, skipped="no SD-sized row in benchmarks/methods.py"))
            continue
        for declared in registered.spec.inputs:
            if declared.required and declared.role not in case["inputs"]:
                case["inputs"][declared.role] = "a photo" if declared.kind == "text" else _image_mask(64)[0]
        cases.append(case)
    return cases


def _run_side(painter: Any, case: dict[str, Any], image: np.ndarray, mask: np.ndarray, device: torch.device,
              repeats: int, steps: int | None) -> tuple[dict[str, Any], torch.Tensor | None]:
    call = lambda: painter(image, mask, inputs=case["inputs"], seed=0)  # noqa: E731
    graphs = _graphs()
    try:
        first, times, peak, out = _timed(call, device, repeats)
    except Exception as err:  # a failing method is a row, not the end of the check
        return {"error": f"{type(err).__name__}: {err}"[:300]}, None
    seconds = statistics.median(times)
    return {"first_s": round(first, 3), "s_per_image": round(seconds, 4), "times_s": [round(t, 4) for t in times],
            "it_per_s": None if not steps else round(steps / seconds, 2), "peak_mib": _mib(peak),
            "graphs": _graphs() - graphs}, out.float().cpu()


def inference(args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> list[dict[str, Any]]:
    """Each method loaded once: eager calls, then :func:`asuka.compile.compile_runner` on the same loaded method (the
    code ``Inpainter(compile=...)`` runs at load) and the compiled calls."""
    from asuka.api import Inpainter
    from asuka.compile import compile_runner

    image, mask = _image_mask(args.size)
    results = []
    for case in method_cases(args.tiny, args.steps):
        if args.methods and case["method"] not in args.methods:
            continue
        if "skipped" in case:
            results.append(case)
            continue
        model = case["model"]() if callable(case["model"]) else case["model"]
        steps = case["options"].get("num_inference_steps")
        run_dtype = case.get("dtype", dtype)
        entry: dict[str, Any] = {"method": case["method"], "steps": steps, "size": args.size, "dtype": str(run_dtype)}
        if case.get("note"):
            entry["note"] = case["note"]
        painter = Inpainter(case["method"], model, device=device, dtype=run_dtype, options=case["options"],
                            weights=case["weights"])
        try:
            entry["eager"], eager = _run_side(painter, case, image, mask, device, args.repeats, steps)
            if eager is not None:
                compile_runner(painter.runner, {"backend": args.backend})
                entry["compiled"], compiled = _run_side(painter, case, image, mask, device, args.repeats, steps)
                if compiled is not None:
                    entry["max_abs_diff"] = float((compiled - eager).abs().max())
                    entry["speedup"] = round(entry["eager"]["s_per_image"] / entry["compiled"]["s_per_image"], 2)
        except Exception as err:  # loading or compiling failed: still a row
            entry.setdefault("eager", {"error": f"{type(err).__name__}: {err}"[:300]})
            entry["compiled"] = {"error": f"{type(err).__name__}: {err}"[:300]}
        finally:
            painter.release()
            if not args.tiny:  # tiny: the captured graphs of shared components are reused by the next method
                _release(device)
        entry.setdefault("compiled", {"error": "not run: the eager side failed"})
        results.append(entry)
        print(f"inference {case['method']}: {json.dumps(entry)}", flush=True)
    return results


# ------------------------------------------------------------------------------------------------ decoder
def decoder(args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> list[dict[str, Any]]:
    from asuka.models.decoder import HarmonizingDecoderKL
    from asuka.models.tiny import sd15_vae, tiny_vae

    plain = (tiny_vae() if args.tiny else sd15_vae()).eval()
    torch.manual_seed(0)
    harmonizing = HarmonizingDecoderKL.from_vae(plain).eval()
    g = torch.Generator().manual_seed(0)
    image = (torch.rand(1, 3, args.size, args.size, generator=g) * 2 - 1).to(device, dtype)
    mask = torch.zeros(1, 1, args.size, args.size, device=device, dtype=dtype)
    mask[..., args.size // 4: 3 * args.size // 4, args.size // 4: 3 * args.size // 4] = 1
    factor = 2 ** (len(plain.config.block_out_channels) - 1)
    latent = torch.randn(1, plain.config.latent_channels, args.size // factor, args.size // factor,
                         generator=g).to(device, dtype)
    results = []
    for name, vae, kwargs in (("sd-vae", plain, {}), ("harmonizing", harmonizing, {"image": image, "mask": mask})):
        vae = vae.to(device, dtype)
        entry: dict[str, Any] = {"decoder": name, "size": args.size}
        outs = {}
        for compiled in (False, True):
            if compiled:
                vae.decoder.compile(backend=args.backend)
            with torch.no_grad():
                first, times, peak, out = _timed(lambda: vae.decode(latent, **kwargs).sample, device, args.repeats)
            outs[compiled] = out.float().cpu()
            entry["compiled" if compiled else "eager"] = {"first_s": round(first, 3),
                                                          "s_per_decode": round(statistics.median(times), 4),
                                                          "peak_mib": _mib(peak)}
        entry["max_abs_diff"] = float((outs[True] - outs[False]).abs().max())
        entry["speedup"] = round(entry["eager"]["s_per_decode"] / entry["compiled"]["s_per_decode"], 2)
        results.append(entry)
        vae.to("cpu")
        _release(device)
        print(f"decoder {name}: {json.dumps(entry)}", flush=True)
    return results


# -------------------------------------------------------------------------------------------------- train
class _RandomBatches(torch.utils.data.Dataset):
    def __init__(self, count: int, size: int) -> None:
        self.count, self.size = count, size

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        g = torch.Generator().manual_seed(index)
        mask = torch.zeros(1, self.size, self.size)
        mask[:, self.size // 4: 3 * self.size // 4, self.size // 4: 3 * self.size // 4] = 1
        return {"image": torch.rand(3, self.size, self.size, generator=g) * 2 - 1, "mask": mask}


def _datamodule(batch_size: int, size: int, count: int):
    from lightning import LightningDataModule

    class Data(LightningDataModule):
        def __init__(self) -> None:
            super().__init__()
            self.batch_size = batch_size

        def train_dataloader(self):
            return torch.utils.data.DataLoader(_RandomBatches(count, size), batch_size=batch_size)

    return Data()


def trainer_cases(tiny: bool, folder: Path) -> list[dict[str, Any]]:
    """(stage, module factory, batch size, image size) at tiny or real size."""
    from asuka.models.mae import MAEPrior
    from trainers.aligner import AlignerModule
    from trainers.decoder import DecoderModule
    from trainers.mae import MAEModule

    if tiny:
        from asuka.models.tiny import default_tiny_inpaint_dir

        sd = default_tiny_inpaint_dir()
        mae_config = dict(img_size=256, patch_size=16, embed_dim=32, depth=2, num_heads=2, decoder_embed_dim=32,
                          decoder_depth=2, decoder_num_heads=2, mlp_ratio=2.0, feature_layer=1)
        aligner = dict(in_dim=32, cross_attention_dim=32, head_dim=16, num_blocks=2)
        decoder_extra = dict(perceptual_net="alex", lpips_random_backbone=True, disc_channels=8)
        sizes = dict(mae=(2, 256), aligner=(2, 64), decoder=(2, 64))
    else:
        from benchmarks.methods import sd15_inpaint_dir

        sd = sd15_inpaint_dir()
        mae_config = {}  # ViT-B/16 at 256² (MAEPrior's defaults)
        aligner = None  # the paper's aligner for SD-1.5 (AlignerModule's default)
        decoder_extra = dict(perceptual_net="vgg", lpips_random_backbone=True)
        sizes = dict(mae=(32, 256), aligner=(4, 512), decoder=(4, 256))
    mae_dir = folder / "mae"
    if not (mae_dir / "config.json").is_file():
        MAEPrior(**mae_config).save_pretrained(mae_dir)
    return [
        dict(stage="mae", make=lambda gc: MAEModule(model=mae_config, gradient_checkpointing=gc), sizes=sizes["mae"]),
        dict(stage="aligner", make=lambda gc: AlignerModule(mae=str(mae_dir), sd_inpaint=str(sd), aligner=aligner,
                                                           gradient_checkpointing=gc, val_sampling_steps=1),
             sizes=sizes["aligner"]),
        dict(stage="decoder", make=lambda gc: DecoderModule(vae=str(sd), gradient_checkpointing=gc, **decoder_extra),
             sizes=sizes["decoder"]),
    ]


def train(args: argparse.Namespace, device: torch.device) -> list[dict[str, Any]]:
    from lightning import Callback, Trainer

    class StepTimes(Callback):
        def __init__(self) -> None:
            self.times: list[float] = []

        def on_train_batch_start(self, *_):
            sync(device)
            self._start = time.perf_counter()

        def on_train_batch_end(self, *_):
            sync(device)
            self.times.append(time.perf_counter() - self._start)

    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for case in trainer_cases(args.tiny, Path(tmp)):
            batch, size = case["sizes"]
            for gc in (False, True):
                entry: dict[str, Any] = {"stage": case["stage"], "gradient_checkpointing": gc, "batch": batch,
                                         "size": size, "precision": "bf16-mixed"}
                steps = args.train_warmup + args.train_steps
                times = StepTimes()
                # `steps` batches; max_steps counts optimizer steps (two per batch for the decoder's GAN) and sets the
                # learning-rate schedules' length
                trainer = Trainer(accelerator=device.type, devices=1, precision="bf16-mixed", max_epochs=1,
                                  limit_train_batches=steps, max_steps=2 * steps,
                                  logger=False, enable_checkpointing=False, enable_progress_bar=False,
                                  enable_model_summary=False, limit_val_batches=0, callbacks=[times],
                                  default_root_dir=tmp)
                try:
                    with PeakMemory(device) as peak, warnings.catch_warnings():
                        # frozen parts are in eval mode on purpose; validation is not part of the measurement
                        warnings.filterwarnings("ignore", message=r".*module\(s\) in eval mode")
                        warnings.filterwarnings("ignore", message=r".*no `val_dataloader`")
                        trainer.fit(case["make"](gc), datamodule=_datamodule(batch, size, batch * steps))
                    step = statistics.median(times.times[args.train_warmup:])
                    entry.update(step_s=round(step, 4), samples_per_s=round(batch / step, 2), peak_mib=_mib(peak.peak))
                except Exception as err:
                    entry["error"] = f"{type(err).__name__}: {err}"[:300]
                _release(device)
                results.append(entry)
                print(f"train {json.dumps(entry)}", flush=True)
    return results


# ------------------------------------------------------------------------------------------------ report
def _cell(value: Any) -> str:
    return "-" if value is None else f"{value:.3g}" if isinstance(value, float) else str(value)


def markdown(report: dict[str, Any]) -> str:
    lines = [f"# Device check ({report['device']}, {report['mode']}, {report['dtype']}, "
             f"compile backend {report['compile_backend']}, recompile limit {report['recompile_limit']})", ""]
    if report.get("note"):
        lines += [report["note"], ""]
    if report.get("inference"):
        lines += ["## Inference (batch 1, through asuka.api.Inpainter)", "",
                  "| method | steps | size | eager it/s | compiled it/s | speedup | eager s/img | compiled s/img | "
                  "compile+first s | eager peak MiB | compiled peak MiB | max abs diff | graphs |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for e in report["inference"]:
            if "skipped" in e:
                lines.append(f"| {e['method']} | skipped: {e['skipped']} |" + " |" * 11)
                continue
            a, b = e.get("eager", {}), e.get("compiled", {})
            if "error" in a or "error" in b:
                lines.append(f"| {e['method']} | error: {(a.get('error') or b.get('error'))[:120]} |" + " |" * 11)
                continue
            name = f"{e['method']} ({e['note']})" if e.get("note") else e["method"]
            lines.append("| " + " | ".join(_cell(v) for v in (
                name, e["steps"], e["size"], a["it_per_s"], b["it_per_s"], e["speedup"], a["s_per_image"],
                b["s_per_image"], b["first_s"], a["peak_mib"], b["peak_mib"], e["max_abs_diff"], b["graphs"])) + " |")
        lines.append("")
    if report.get("decoder"):
        lines += ["## Decoder (one decode)", "",
                  "| decoder | size | eager s | compiled s | speedup | eager peak MiB | compiled peak MiB | max abs diff |",
                  "|---|---|---|---|---|---|---|---|"]
        for e in report["decoder"]:
            a, b = e["eager"], e["compiled"]
            lines.append("| " + " | ".join(_cell(v) for v in (
                e["decoder"], e["size"], a["s_per_decode"], b["s_per_decode"], e["speedup"], a["peak_mib"],
                b["peak_mib"], e["max_abs_diff"])) + " |")
        lines.append("")
    if report.get("train"):
        lines += ["## Training (bf16-mixed, 1 device)", "",
                  "| stage | gradient checkpointing | batch | size | step s | samples/s | peak MiB |",
                  "|---|---|---|---|---|---|---|"]
        for e in report["train"]:
            if "error" in e:
                lines.append(f"| {e['stage']} | {e['gradient_checkpointing']} | error: {e['error'][:120]} | | | | |")
                continue
            lines.append("| " + " | ".join(_cell(v) for v in (
                e["stage"], e["gradient_checkpointing"], e["batch"], e["size"], e["step_s"], e["samples_per_s"],
                e["peak_mib"])) + " |")
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tiny", action="store_true", help="tiny components on CPU (smoke run, < 1 min)")
    p.add_argument("--out", default="device_check", help="output folder (device_check.json, device_check.md)")
    p.add_argument("--parts", default=",".join(PARTS), help=f"comma list from {','.join(PARTS)}")
    p.add_argument("--methods", help="only these methods (comma list)")
    p.add_argument("--size", type=positive_int, help="image size (default 512; 64 with --tiny)")
    p.add_argument("--steps", type=positive_int, default=20, help="denoising steps in real mode (default 20)")
    p.add_argument("--repeats", type=non_negative_int, help="timed calls after the warm-up (default 3; 0 with --tiny)")
    p.add_argument("--dtype", choices=("float32", "float16", "bfloat16"),
                   help="inference dtype (default float16 on CUDA, float32 on CPU)")
    p.add_argument("--train-steps", type=positive_int, help="timed training steps (default 10; 1 with --tiny)")
    p.add_argument("--train-warmup", type=non_negative_int, help="untimed first training steps (default 3; 1 with --tiny)")
    p.add_argument("--backend", help="torch.compile backend (default inductor; eager with --tiny: graph capture "
                                     "only, since CPU code generation takes minutes)")
    p.add_argument("--recompile-limit", type=positive_int,
                   help="torch._dynamo recompile limit per module (default: torch's, 8; 1 with --tiny)")
    p.add_argument("--threads", type=positive_int, help="CPU threads for torch (default: torch's; 1 with --tiny: tiny "
                                               "tensors gain nothing from more, and on a loaded machine idle "
                                               "OpenMP threads spinning cost more than the work)")
    p.add_argument("--device", choices=("cpu", "cuda"), help="cpu or cuda (default: cuda when available; cpu with --tiny)")
    args = p.parse_args(argv)
    args.backend = args.backend or ("eager" if args.tiny else "inductor")
    if args.tiny and args.recompile_limit is None:
        args.recompile_limit = 1
    if args.tiny and args.threads is None:
        args.threads = 1
    args.size = args.size or (64 if args.tiny else 512)
    args.repeats = args.repeats if args.repeats is not None else (0 if args.tiny else 3)
    args.train_steps = args.train_steps or (1 if args.tiny else 10)
    args.train_warmup = args.train_warmup if args.train_warmup is not None else (1 if args.tiny else 3)
    args.methods = [m.strip() for m in args.methods.split(",")] if args.methods else None
    if args.methods:
        from asuka.pipelines._registry import available_methods

        unknown = set(args.methods) - set(available_methods())
        if unknown:
            p.error(f"--methods: unknown {sorted(unknown)}; choose from {','.join(available_methods())}")
    parts = [x.strip() for x in args.parts.split(",") if x.strip()]
    unknown = set(parts) - set(PARTS)
    if unknown:
        p.error(f"--parts: unknown {sorted(unknown)}; choose from {','.join(PARTS)}")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() and not args.tiny else "cpu"))
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.float16 if device.type == "cuda" else torch.float32)
    limit = torch._dynamo.config.recompile_limit
    report: dict[str, Any] = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({platform.processor()})",
        "mode": "tiny" if args.tiny else f"SD-1.5-sized random weights, {args.size}²", "dtype": str(dtype),
        "compile_backend": args.backend, "recompile_limit": args.recompile_limit or limit,
        "threads": args.threads or torch.get_num_threads(),
        **({"note": TINY_NOTE} if args.tiny else {}),
        "torch": torch.__version__, "args": {k: v for k, v in vars(args).items()}}
    threads = torch.get_num_threads()
    if args.recompile_limit is not None:
        torch._dynamo.config.recompile_limit = args.recompile_limit
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    try:
        if "inference" in parts:
            report["inference"] = inference(args, device, dtype)
        if "decoder" in parts:
            report["decoder"] = decoder(args, device, dtype)
        if "train" in parts:
            report["train"] = train(args, device)
    finally:
        torch._dynamo.config.recompile_limit = limit
        torch.set_num_threads(threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "device_check.json").write_text(json.dumps(report, indent=2))
    (out / "device_check.md").write_text(markdown(report))
    print(markdown(report))
    print(f"wrote {out / 'device_check.json'}, {out / 'device_check.md'}")
    return report


if __name__ == "__main__":
    main()
