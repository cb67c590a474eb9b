"""MAE fine-tuning: Lightning (``trainers.fit`` machinery) vs a plain PyTorch loop, and peak training memory.

    python benchmarks/train_mae.py                      # CPU defaults: a small ViT at 256², batch 8
    python benchmarks/train_mae.py --model base --batch 32 --steps 50 --warmup 10   # on a GPU (bf16-mixed)

1. Throughput. The same model (same init), the same batches (real bundled photographs with ASUKA masks, prefetched
   into memory so data loading costs neither side anything), the same fused AdamW + warm-up/cosine schedule and
   masking generator. Lightning runs ``trainers.mae.MAEModule`` in a ``Trainer`` with the production callbacks
   (TensorBoard logging every 10 steps — 5x more often than configs/mae.yaml —, LR monitor, SpeedMonitor) and the
   base module's per-step gradient norm and non-finite skip; the plain loop is forward / backward / step / schedule only. Runs alternate (plain, Lightning, plain, ...)
   and each reports its median step time after warm-up; the table compares the fastest run of each side (noise
   on a shared machine only ever adds time) and lists every run.
   Goal: Lightning overhead <= 5 %.
2. Peak memory of one training step (forward, backward, AdamW step) of the paper's ViT-B/16 at 256², batch 32, with
   and without gradient checkpointing, each in a fresh process. CUDA: ``torch.cuda.max_memory_allocated``. CPU:
   the process's peak resident set (``resource.getrusage().ru_maxrss``) minus the resident set after the model,
   optimizer and batch were built — i.e. activations, gradients, AdamW state and allocator slack of the step.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from asuka.models.mae import MAEPrior, param_groups_weight_decay, preprocess  # noqa: E402
from trainers.base import adamw, warmup_cosine_scheduler  # noqa: E402

MODELS = {
    "tiny": dict(embed_dim=64, depth=2, num_heads=4, decoder_embed_dim=64, decoder_depth=2, decoder_num_heads=4,
                 mlp_ratio=2.0, feature_layer=1),
    "small": dict(embed_dim=192, depth=4, num_heads=3, decoder_embed_dim=128, decoder_depth=2, decoder_num_heads=4,
                  feature_layer=1),
    "base": {},  # the paper's ViT-B/16 with the 512-d 8-block decoder
}


def _device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _clock(device: torch.device) -> float:
    """CUDA: wall time after a sync. CPU: this process's CPU time (single-threaded by default), which other jobs
    on a shared machine do not inflate."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        return time.perf_counter()
    return time.process_time()


def _batches(count: int, batch: int, resolution: int) -> list[dict]:
    from trainers.datamodule import InpaintingDataModule

    data = InpaintingDataModule(resolution=resolution, batch_size=batch, num_workers=0, epoch_batches=count)
    data.prepare_data()
    loader = iter(data.train_dataloader())
    return [{k: v for k, v in next(loader).items() if k in ("image", "mask", "masked_image", "key")}
            for _ in range(count)]


# ------------------------------------------------------------------------------------------------ throughput
def _plain_loop(config: dict, batches: list[dict], steps: int, warmup: int, device: torch.device) -> float:
    torch.manual_seed(0)
    model = MAEPrior(**config).to(device).train()
    size = model.config.img_size
    optimizer = adamw(param_groups_weight_decay(model, 0.05), lr=1e-4, betas=(0.9, 0.95))
    scheduler = warmup_cosine_scheduler(optimizer, warmup_steps=1, total_steps=steps + warmup)["scheduler"]
    generator = torch.Generator(device=device)
    starts = []
    for step in range(steps + warmup):
        starts.append(_clock(device))
        batch = batches[step % len(batches)]
        image = batch["image"].to(device, non_blocking=True)
        mask = batch["mask"].to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            x, _ = preprocess(image, torch.zeros_like(mask), size)
            m = (torch.nn.functional.interpolate(mask, size=(size, size), mode="nearest") > 0.5).to(x.dtype)
            loss = model.forward_train(x, m, 0.75, generator=generator.manual_seed(step))["loss"]
        loss.backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
    starts.append(_clock(device))
    return statistics.median(b - a for a, b in zip(starts[warmup:-1], starts[warmup + 1:]))


def _lightning(config: dict, batches: list[dict], steps: int, warmup: int, device: torch.device) -> float:
    from lightning.pytorch import Callback, LightningDataModule, Trainer
    from lightning.pytorch.callbacks import LearningRateMonitor
    from lightning.pytorch.loggers import TensorBoardLogger
    from torch.utils.data import DataLoader

    from trainers.callbacks import SpeedMonitor
    from trainers.mae import MAEModule

    class InMemory(LightningDataModule):
        def __init__(self):
            super().__init__()
            self.batch_size = batches[0]["image"].shape[0]

        def train_dataloader(self):  # one epoch covers the run: no epoch-boundary costs on either side
            return DataLoader([batches[i % len(batches)] for i in range(steps + warmup)], batch_size=None)

    class StepTimer(Callback):
        def __init__(self):
            self.starts = []

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            self.starts.append(_clock(device))

        def on_train_end(self, trainer, pl_module):
            self.starts.append(_clock(device))

    torch.manual_seed(0)
    module = MAEModule(model=config, lr=1e-4, warmup_steps=1)
    timer = StepTimer()
    with tempfile.TemporaryDirectory() as logs:
        trainer = Trainer(
            accelerator=device.type, devices=1, max_steps=steps + warmup,
            precision="bf16-mixed" if device.type == "cuda" else "32-true",
            logger=TensorBoardLogger(logs, name="bench"), log_every_n_steps=10, enable_checkpointing=False,
            enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0, num_sanity_val_steps=0,
            callbacks=[timer, SpeedMonitor(), LearningRateMonitor(logging_interval="step")],
        )
        trainer.fit(module, datamodule=InMemory())
    starts = timer.starts
    return statistics.median(b - a for a, b in zip(starts[warmup:-1], starts[warmup + 1:]))


def throughput(args: argparse.Namespace) -> list[tuple[str, str]]:
    device = _device()
    config = dict(MODELS[args.model], img_size=args.resolution)
    batches = _batches(4, args.batch, args.resolution)
    plain, lightning = [], []
    for _ in range(args.repeats):
        plain.append(_plain_loop(config, batches, args.steps, args.warmup, device))
        lightning.append(_lightning(config, batches, args.steps, args.warmup, device))
    p, lt = min(plain), min(lightning)
    return [
        ("device / model / batch / resolution", f"{device.type} / {args.model} / {args.batch} / {args.resolution}²"),
        ("plain PyTorch loop: ms/step (runs)", f"{p * 1e3:.1f}  ({', '.join(f'{t * 1e3:.1f}' for t in plain)})"),
        ("Lightning trainers.fit: ms/step (runs)", f"{lt * 1e3:.1f}  ({', '.join(f'{t * 1e3:.1f}' for t in lightning)})"),
        ("plain / Lightning samples/s", f"{args.batch / p:.1f} / {args.batch / lt:.1f}"),
        ("Lightning overhead (goal <= 5 %)", f"{(lt / p - 1) * 100:+.1f} %"),
    ]


# ------------------------------------------------------------------------------------------------ memory
def memory_worker(args: argparse.Namespace) -> None:
    import resource

    device = _device()
    torch.manual_seed(0)
    model = MAEPrior(img_size=args.resolution, **MODELS[args.model]).to(device).train()
    if args.grad_ckpt:
        model.enable_gradient_checkpointing()
    optimizer = adamw(param_groups_weight_decay(model, 0.05), lr=1e-4)
    image = torch.rand(args.batch, 3, args.resolution, args.resolution, device=device) * 2 - 1
    mask = torch.zeros(args.batch, 1, args.resolution, args.resolution, device=device)
    mask[:, :, : args.resolution // 3, : args.resolution // 2] = 1
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # MiB (Linux reports KiB)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        x, _ = preprocess(image, torch.zeros_like(mask), args.resolution)
        loss = model.forward_train(x, mask, 0.75, generator=torch.Generator(device=device).manual_seed(0))["loss"]
    loss.backward()
    optimizer.step()
    _sync(device)
    result = {
        "seconds": time.perf_counter() - start,
        "rss_peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "rss_before_mib": rss_before,
        "params_m": sum(p.numel() for p in model.parameters()) / 1e6,
    }
    if device.type == "cuda":
        result["cuda_peak_mib"] = torch.cuda.max_memory_allocated(device) / 2**20
    print(json.dumps(result))


def memory(args: argparse.Namespace) -> list[tuple[str, str]]:
    rows = []
    for grad_ckpt in (False, True):
        command = [sys.executable, __file__, "--memory-worker", "--threads", str(torch.get_num_threads()),
                   "--model", args.memory_model, "--batch",
                   str(args.memory_batch), "--resolution", "256", *(["--grad-ckpt"] if grad_ckpt else [])]
        out = subprocess.run(command, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1]
        r = json.loads(out)
        label = f"peak memory, {args.memory_model} ({r['params_m']:.1f} M params), batch {args.memory_batch}, 256², " \
                f"grad ckpt {'on' if grad_ckpt else 'off'}"
        if "cuda_peak_mib" in r:
            value = f"CUDA peak {r['cuda_peak_mib']:.0f} MiB  ({r['seconds']:.2f} s/step)"
        else:
            value = (f"step RSS +{r['rss_peak_mib'] - r['rss_before_mib']:.0f} MiB, process peak "
                     f"{r['rss_peak_mib']:.0f} MiB  ({r['seconds']:.1f} s/step)")
        rows.append((label, value))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=sorted(MODELS), default=None, help="throughput model (CPU: small, GPU: base)")
    parser.add_argument("--batch", type=int, default=None, help="throughput batch (CPU: 8, GPU: 32)")
    parser.add_argument("--resolution", type=int, default=256)
    parser.add_argument("--steps", type=int, default=None, help="timed steps per run (CPU: 15, GPU: 50)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--memory-model", choices=sorted(MODELS), default="base")
    parser.add_argument("--memory-batch", type=int, default=32)
    parser.add_argument("--skip-memory", action="store_true")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default 1 on CPU: steadier timings on a shared machine)")
    parser.add_argument("--memory-worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--grad-ckpt", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.threads or not torch.cuda.is_available():
        torch.set_num_threads(args.threads or 1)
    if args.memory_worker:
        memory_worker(args)
        return
    gpu = torch.cuda.is_available()
    args.model = args.model or ("base" if gpu else "small")
    args.batch = args.batch or (32 if gpu else 8)
    args.steps = args.steps or (50 if gpu else 15)
    rows = throughput(args)
    if not args.skip_memory:
        rows += memory(args)
    width = max(len(name) for name, _ in rows)
    print(f"\n{'measure'.ljust(width)} | value\n{'-' * width}-+-{'-' * 40}")
    for name, value in rows:
        print(f"{name.ljust(width)} | {value}")


if __name__ == "__main__":
    main()
