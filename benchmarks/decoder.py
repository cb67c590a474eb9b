"""Harmonizing decoder vs the plain SD VAE decoder: speed, memory, and a consistency report.

``python benchmarks/decoder.py`` prints two tables.

1. **Decode cost** at ``--size`` (default 512²): wall time (median of ``--repeats`` after a warm-up) and peak memory of
   ``AutoencoderKL.decode`` vs ``HarmonizingDecoderKL.decode(image=, mask=)`` with SD-1.5-sized random weights (or the
   ``--vae``/``--decoder`` given). Peak memory is ``torch.cuda.max_memory_allocated`` on CUDA; on CPU it is the growth
   of the process's peak resident set during the decode, measured in a fresh subprocess per decoder. Goal: the
   harmonizing decode takes at most 1.3x the plain decode's time.
2. **Consistency** on images + masks (default: scikit-image photographs with ``misato_eval`` masks): both decoders
   decode the latents of the ground truth (``z = E(x)``, so only the decoder differs) and are scored against it:
   the mean absolute error in the known region (0-255), the mean colour shift of the hole (|mean RGB of the hole -
   that of the ground truth|, 0-255), and Grad, the boundary gradient error of the paste-back composite
   (``asuka.metrics.grad``, ASUKA ``cal_grad.py``). With random weights these numbers say nothing about quality; pass
   real exports (``--vae DIR --decoder DIR``) for meaningful ones.

Examples::

    python benchmarks/decoder.py                                      # SD-size random weights, CPU or CUDA
    python benchmarks/decoder.py --vae tiny --decoder checkpoints/tiny-decoder/export --size 256
    python benchmarks/decoder.py --vae SD_INPAINT_DIR --decoder checkpoints/decoder/export --images DIR --masks DIR
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import resource
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from asuka.models.decoder import HarmonizingDecoderKL  # noqa: E402
from benchmarks.measure import sync  # noqa: E402

TIME_GOAL = 1.3


def load_models(vae: str | None, decoder: str | None, dtype: torch.dtype):
    """(plain AutoencoderKL, HarmonizingDecoderKL): given folders, or SD-1.5-sized random weights."""
    from diffusers import AutoencoderKL

    from asuka.models.tiny import sd15_vae

    if vae is None:
        plain = sd15_vae(0)
    else:
        from trainers.decoder import vae_folder

        plain = AutoencoderKL.from_pretrained(vae_folder(vae))
    if decoder is None:
        torch.manual_seed(0)
        harmonizing = HarmonizingDecoderKL.from_vae(plain)
    else:
        harmonizing = HarmonizingDecoderKL.from_pretrained(decoder)
    if dtype != torch.float32:
        plain, harmonizing = plain.to(dtype), harmonizing.to(dtype)
    return plain.eval(), harmonizing.eval()


def _inputs(size: int, device: torch.device, dtype: torch.dtype, batch: int = 1):
    g = torch.Generator().manual_seed(0)
    z = torch.randn(batch, 4, size // 8, size // 8, generator=g)
    image = torch.rand(batch, 3, size, size, generator=g) * 2 - 1
    mask = torch.zeros(batch, 1, size, size)
    mask[:, :, size // 4: 3 * size // 4, size // 5: 3 * size // 5] = 1
    return z.to(device, dtype), image.to(device, dtype), mask.to(device, dtype)


def _decode_fn(which: str, plain, harmonizing, image, mask):
    if which == "plain":
        return lambda z: plain.decode(z).sample
    return lambda z: harmonizing.decode(z, image=image, mask=mask).sample


def time_decoder(which: str, args, device: torch.device, dtype: torch.dtype) -> dict:
    plain, harmonizing = load_models(args.vae, args.decoder, dtype)
    plain.to(device)
    harmonizing.to(device)
    z, image, mask = _inputs(args.size, device, dtype, args.batch)
    fn = _decode_fn(which, plain, harmonizing, image, mask)
    times = []
    from torch.utils.flop_counter import FlopCounterMode

    with torch.inference_mode():
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        counter = FlopCounterMode(display=False)
        with counter:  # warm-up, counting the FLOPs (device-independent cost)
            fn(z)
        sync(device)
        for _ in range(args.repeats):
            start = time.perf_counter()
            fn(z)
            sync(device)
            times.append(time.perf_counter() - start)
        peak = (torch.cuda.max_memory_allocated(device) if device.type == "cuda"
                else (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) * 1024)
    return {"time": statistics.median(times), "peak": peak, "flops": counter.get_total_flops()}


def _worker(which, args, device, dtype, queue) -> None:
    torch.set_num_threads(args.threads) if args.threads else None
    queue.put(time_decoder(which, args, torch.device(device), dtype))


def measure(which: str, args, device: torch.device, dtype: torch.dtype) -> dict:
    """Run :func:`time_decoder` in a fresh process on CPU (clean peak-RSS accounting), in process on CUDA."""
    if device.type == "cuda":
        return time_decoder(which, args, device, dtype)
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_worker, args=(which, args, str(device), dtype, queue))
    proc.start()
    result = queue.get()
    proc.join()
    return result


# ---------------------------------------------------------------------------------------------- consistency
def default_cases(size: int, count: int) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """scikit-image photographs (centre crop, resized) with seeded ``misato_eval`` masks."""
    import cv2
    from skimage import data

    from asuka.masks import get_mask_generator

    names = ["astronaut", "chelsea", "coffee", "rocket", "immunohistochemistry", "camera"][:count]
    generator = get_mask_generator("misato_eval")
    rng = np.random.default_rng(0)
    cases = []
    for name in names:
        img = getattr(data, name)()
        img = np.stack([img] * 3, -1) if img.ndim == 2 else img[..., :3]
        side = min(img.shape[:2])
        y, x = (img.shape[0] - side) // 2, (img.shape[1] - side) // 2
        img = cv2.resize(np.ascontiguousarray(img[y:y + side, x:x + side]), (size, size), interpolation=cv2.INTER_AREA)
        cases.append((name, img, generator(size, size, rng)))
    return cases


def folder_cases(images: Path, masks: Path, size: int) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """Pairs by sorted file name: ``images/*`` (RGB) and ``masks/*`` (white = hole), resized to ``size``²."""
    import cv2

    from asuka.pipelines._common import load_image, load_mask

    image_files = sorted(p for p in images.iterdir() if p.is_file())
    mask_files = sorted(p for p in masks.iterdir() if p.is_file())
    if not image_files or len(image_files) != len(mask_files):
        raise ValueError(f"--images and --masks must hold the same (non-zero) number of files, got "
                         f"{len(image_files)} and {len(mask_files)}")
    cases = []
    for ip, mp_ in zip(image_files, mask_files):
        img = ((load_image(ip)[0].permute(1, 2, 0).numpy() + 1) * 127.5).round().astype(np.uint8)
        mask = load_mask(mp_)[0, 0].numpy()
        img = cv2.resize(img, (size, size), interpolation=cv2.INTER_AREA)
        mask = (cv2.resize(mask, (size, size), interpolation=cv2.INTER_NEAREST) > 0.5).astype(np.float32)
        cases.append((ip.stem, img, mask))
    return cases


def consistency(plain, harmonizing, cases, device: torch.device) -> dict[str, dict[str, float]]:
    """Per decoder: known-region MAE, hole colour shift and Grad, averaged over the cases (0-255 scale)."""
    from asuka.metrics.grad import boundary_gradient

    scores: dict[str, dict[str, list[float]]] = {"plain": {}, "harmonizing": {}}
    for _, rgb, hole in cases:
        gt = torch.from_numpy(rgb).permute(2, 0, 1)[None].float().div(127.5).sub(1).to(device)
        mask = torch.from_numpy(hole)[None, None].float().to(device)
        with torch.inference_mode():
            z = plain.encode(gt).latent_dist.mode()
            outputs = {"plain": plain.decode(z).sample,
                       "harmonizing": harmonizing.decode(z, image=gt, mask=mask).sample}
        known = 1 - mask
        for name, out in outputs.items():
            out = out.float().clamp(-1, 1)
            err = (out - gt).abs() * 127.5
            row = scores[name]
            row.setdefault("known_mae", []).append(float((err * known).sum() / (3 * known.sum()).clamp_min(1)))
            hole_mean = lambda x: (x * mask).sum(dim=(2, 3)) / mask.sum().clamp_min(1)  # noqa: E731
            row.setdefault("hole_color_shift", []).append(float((hole_mean(out) - hole_mean(gt)).abs().mean() * 127.5))
            composite = gt * known + out * mask
            row.setdefault("grad", []).append(float(boundary_gradient(composite.cpu(), gt.cpu(), mask.cpu())[0]))
    return {name: {k: float(np.nanmean(v)) for k, v in row.items()} for name, row in scores.items()}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--vae", default=None, help="SD VAE folder or SD pipeline folder ('tiny' = demo); "
                                                    "default: SD-1.5-sized random weights")
    parser.add_argument("--decoder", default=None, help="HarmonizingDecoderKL export; default: from_vae(--vae)")
    parser.add_argument("--size", type=int, default=512, help="decode resolution (default 512)")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    parser.add_argument("--images", type=Path, default=None, help="folder of images for the consistency report")
    parser.add_argument("--masks", type=Path, default=None, help="folder of masks (white = hole), paired by name")
    parser.add_argument("--consistency-size", type=int, default=None, help="default: --size")
    parser.add_argument("--num-images", type=int, default=4, help="default photographs to score (max 6)")
    parser.add_argument("--skip-timing", action="store_true")
    parser.add_argument("--skip-consistency", action="store_true")
    args = parser.parse_args(argv)
    if args.size % 8 or args.size < 8:
        raise SystemExit(f"--size must be a positive multiple of 8, got {args.size}")
    if (args.images is None) != (args.masks is None):
        raise SystemExit("pass both --images and --masks, or neither")
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"device {device}, dtype {args.dtype}, torch threads {torch.get_num_threads()}, "
          f"weights: {args.vae or 'SD-1.5-sized random'} / {args.decoder or 'HarmonizingDecoderKL.from_vae'}")

    if not args.skip_timing:
        plain = measure("plain", args, device, dtype)
        harmonizing = measure("harmonizing", args, device, dtype)
        ratio = harmonizing["time"] / plain["time"]
        print(f"\nDecode cost at {args.size}x{args.size}, batch {args.batch} (median of {args.repeats})")
        print(f"{'decoder':<14}{'time (s)':>10}{'peak memory (MiB)':>20}{'GFLOP':>10}")
        for name, r in (("plain VAE", plain), ("harmonizing", harmonizing)):
            print(f"{name:<14}{r['time']:>10.3f}{r['peak'] / 2**20:>20.0f}{r['flops'] / 1e9:>10.0f}")
        verdict = "meets" if ratio <= TIME_GOAL else "misses"
        print(f"time ratio harmonizing / plain: {ratio:.2f}x ({verdict} the <= {TIME_GOAL}x goal); "
              f"memory ratio {harmonizing['peak'] / max(plain['peak'], 1):.2f}x; "
              f"FLOP ratio {harmonizing['flops'] / max(plain['flops'], 1):.2f}x")

    if not args.skip_consistency:
        size = args.consistency_size or args.size
        cases = (folder_cases(args.images, args.masks, size) if args.images is not None
                 else default_cases(size, args.num_images))
        plain_model, harmonizing_model = load_models(args.vae, args.decoder, dtype)
        scores = consistency(plain_model.to(device), harmonizing_model.to(device), cases, device)
        print(f"\nConsistency on {len(cases)} images at {size}x{size} (latents of the ground truth; 0-255 scale; "
              "lower is better)")
        print(f"{'decoder':<14}{'known MAE':>11}{'hole colour shift':>19}{'Grad':>9}")
        for name, row in scores.items():
            print(f"{name:<14}{row['known_mae']:>11.2f}{row['hole_color_shift']:>19.2f}{row['grad']:>9.2f}")


if __name__ == "__main__":
    main()
