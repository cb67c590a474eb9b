"""Metric throughput on CPU at 512²: images/s per metric, plus the cost of the set-level metrics.

    python benchmarks/metrics.py [--size 512] [--batch 4] [--repeats 3] [--set-size 1000] [--threads N]

Backbones are randomly initialised with their real architectures (LPIPS AlexNet/VGG-16/SqueezeNet,
Inception-v3 in torch-fidelity's and torchvision's layouts, CLIP ViT-B/32), which is enough for timing;
nothing is downloaded. Images are scikit-image photographs resized to ``--size`` with ``misato_eval``
masks; each per-image metric runs on the composite of a noisy prediction. Table 1: median over
``--repeats`` timed batches after one warm-up. Table 2: set-level metrics on random 2048-d features of
``--set-size`` pairs; the FID row is compared with torch-fidelity's eigenvalue formula on the same features.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def _inputs(size: int, batch: int):
    import skimage.data
    from PIL import Image

    from asuka.masks import get_mask_generator

    photos = [skimage.data.astronaut(), skimage.data.chelsea(), skimage.data.coffee(), skimage.data.rocket()]
    rng = np.random.default_rng(0)
    gen = get_mask_generator("misato_eval")
    gt = torch.stack([torch.from_numpy(np.asarray(Image.fromarray(photos[i % 4]).resize((size, size))))
                      .permute(2, 0, 1).float() / 127.5 - 1 for i in range(batch)])
    mask = torch.stack([torch.from_numpy(gen(size, size, rng))[None] for _ in range(batch)])
    g = torch.Generator().manual_seed(0)
    pred = (gt + 0.2 * torch.randn(gt.shape, generator=g)).clamp(-1, 1)
    return pred, gt, mask


def _time(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _save_clip_b32(folder: Path) -> Path:
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    from asuka.models.tiny import tiny_tokenizer

    torch.manual_seed(0)
    CLIPModel(CLIPConfig()).save_pretrained(folder)  # defaults = ViT-B/32 at 224²
    processor = CLIPProcessor(image_processor=CLIPImageProcessor(), tokenizer=tiny_tokenizer(folder / "tok"))
    processor.save_pretrained(folder)
    return folder


def per_image_table(size: int, batch: int, repeats: int, tmp: Path) -> list[tuple[str, float]]:
    import torchvision

    from asuka.metrics import (CLIPScore, InceptionFeatures, LPIPS, boundary_gradient, psnr,
                               save_random_inception_weights, ssim)
    from asuka.tensors import paste_back

    pred, gt, mask = _inputs(size, batch)
    comp = paste_back(pred, gt, mask)
    known = 1 - mask
    rows = [("psnr (composite)", lambda: psnr(comp, gt)),
            ("psnr known region", lambda: psnr(pred, gt, known)),
            ("ssim gray (skimage)", lambda: ssim(comp, gt)),
            ("ssim rgb (skimage)", lambda: ssim(comp, gt, gray=False)),
            ("ssim gray known region", lambda: ssim(pred, gt, known)),
            ("grad (cv2 Sobel/Canny)", lambda: boundary_gradient(comp, gt, mask))]
    for net, builder in (("alex", "alexnet"), ("vgg", "vgg16"), ("squeeze", "squeezenet1_1")):
        path = tmp / f"{builder}.pth"
        torch.save(getattr(torchvision.models, builder)(weights=None).features.state_dict(), path)
        state = torch.load(path, weights_only=True)
        torch.save({f"features.{k}": v for k, v in state.items()}, path)
        metric = LPIPS(net, path)
        rows.append((f"lpips {net}", lambda m=metric: m(comp, gt)))
    for variant in ("fidelity", "torchvision"):
        feats = InceptionFeatures(save_random_inception_weights(tmp / f"inc-{variant}.pth", variant=variant),
                                  variant=variant)
        rows.append((f"inception features ({variant})", lambda f=feats: f(comp)))
    clip = CLIPScore(_save_clip_b32(tmp / "clip"))
    rows.append(("clip score ViT-B/32 (2 images each)", lambda: clip(comp, gt, mask)))
    return [(name, batch / _time(fn, repeats)) for name, fn in rows]


def set_table(n: int) -> list[tuple[str, float, str]]:
    from torch_fidelity.metric_fid import fid_statistics_to_metric

    from asuka.metrics import fid_from_features, inception_discriminative_scores, kid_from_features

    g = torch.Generator().manual_seed(0)
    real = torch.randn(n, 2048, generator=g).abs() * 0.5
    fake = real + 0.1 * torch.randn(n, 2048, generator=g)
    out = []
    t0 = time.perf_counter()
    ours = fid_from_features(real, fake)
    t_ours = time.perf_counter() - t0
    t0 = time.perf_counter()
    stats = [{"mu": x.double().numpy().mean(0), "sigma": np.cov(x.double().numpy(), rowvar=False)}
             for x in (real, fake)]
    ref = fid_statistics_to_metric(*stats, verbose=False)["frechet_inception_distance"]
    t_ref = time.perf_counter() - t0
    out.append(("fid (nuclear-norm form)", t_ours, f"{t_ref / t_ours:.1f}x faster than torch-fidelity "
                                                   f"({t_ref:.1f} s); |diff| = {abs(ours - ref):.2e}"))
    t0 = time.perf_counter()
    kid_from_features(real, fake, subset_size=min(1000, n))
    out.append(("kid (100 subsets)", time.perf_counter() - t0, ""))
    t0 = time.perf_counter()
    inception_discriminative_scores(real, fake)
    out.append(("u-ids + p-ids (LinearSVC)", time.perf_counter() - t0, ""))
    t0 = time.perf_counter()
    inception_discriminative_scores(real, fake, pca_dim=min(512, 2 * n))
    out.append((f"u-ids + p-ids, PCA {min(512, 2 * n)} (ASUKA)", time.perf_counter() - t0, ""))
    return out


_FID_CHILD = """
import resource, sys, time, torch
from asuka.metrics.fid import fid_from_features, trace_sqrt_product
n, form = int(sys.argv[1]), sys.argv[2]
g = torch.Generator().manual_seed(0)
real = torch.randn(n, 2048, generator=g).abs() * 0.5
fake = real + 0.1 * torch.randn(n, 2048, generator=g)
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
t0 = time.perf_counter()
if form == "product":  # the small-N form, forced
    a, b = real.double() - real.double().mean(0), fake.double() - fake.double().mean(0)
    torch.linalg.svdvals(a @ b.T).sum()
elif form == "covariance":  # the D×D form, forced
    a, b = real.double() - real.double().mean(0), fake.double() - fake.double().mean(0)
    trace_sqrt_product(a.T @ a / (n - 1), b.T @ b / (n - 1))
else:
    fid_from_features(real, fake)
seconds = time.perf_counter() - t0
print(seconds, (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 1024)
"""


def fid_scale_table(sizes: list[int]) -> list[tuple[int, str, float, float]]:
    """FID time and peak extra memory (MiB, RSS of a fresh process) at paper-scale set sizes on synthetic 2048-d
    features: the automatic choice (covariance form beyond 2048 samples) and, where it fits, the N×N product form."""
    import subprocess
    import sys

    rows = []
    for n in sizes:
        forms = ["auto", "covariance"] if n <= 2048 else ["auto"] + (["product"] if n <= 4096 else [])
        for form in forms:
            out = subprocess.run([sys.executable, "-c", _FID_CHILD, str(n), form], capture_output=True, text=True,
                                 check=True).stdout.split()
            rows.append((n, form, float(out[0]), float(out[1])))
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--set-size", type=int, default=1000)
    parser.add_argument("--fid-sizes", default="2000,10000,36500",
                        help="comma-separated set sizes for the FID scaling table (ASUKA's Places2 test set: 36,500)")
    parser.add_argument("--only-fid-scale", action="store_true", help="print only the FID scaling table")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: torch's; on a machine shared with other jobs use 1, "
                             "OpenMP spin-waiting makes multi-threaded timings meaningless there)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    sizes = [int(v) for v in args.fid_sizes.split(",") if v]
    print(f"\nFID at paper scale, synthetic 2048-d features ({torch.get_num_threads()} threads)\n")
    print("| N | form | seconds | peak extra RSS (MiB) |\n|---:|---|---:|---:|")
    for n, form, seconds, mib in fid_scale_table(sizes):
        label = {"product": "product N×N (forced)", "covariance": "covariance D×D (forced)"}.get(
            form, "auto: product N×N" if n <= 2048 else "auto: covariance D×D")
        print(f"| {n} | {label} | {seconds:.2f} | {mib:.0f} |")
    if args.only_fid_scale:
        return
    with tempfile.TemporaryDirectory() as tmp:
        rows = per_image_table(args.size, args.batch, args.repeats, Path(tmp))
    print(f"\nPer-image metrics at {args.size}², batch {args.batch}, CPU ({torch.get_num_threads()} threads)\n")
    print("| metric | images/s |\n|---|---:|")
    for name, rate in rows:
        print(f"| {name} | {rate:.2f} |")
    print(f"\nSet-level metrics on {args.set_size} pairs of 2048-d features\n")
    print("| metric | seconds | note |\n|---|---:|---|")
    for name, seconds, note in set_table(args.set_size):
        print(f"| {name} | {seconds:.2f} | {note} |")


if __name__ == "__main__":
    main()
