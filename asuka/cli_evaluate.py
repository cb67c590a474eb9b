"""``asuka evaluate``: argument parsing only at import time (the work, :mod:`asuka.evaluation`, is imported inside
``run``; the evaluation package itself never imports the CLI)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from asuka.cli import CommandError, Subcommand, add_method_arguments, method_requests, positive_int
from asuka.evaluation import METRICS as _METRIC_NAMES
from asuka.evaluation.protocols import PROTOCOLS, protocol_settings


def _metric_list(text: str) -> list[str]:
    names = [t.strip() for t in text.split(",") if t.strip()]
    unknown = sorted(set(names) - set(_METRIC_NAMES))
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"unknown metric(s) {unknown}; choose from {','.join(_METRIC_NAMES)}")
    return names


def add_arguments(p: argparse.ArgumentParser) -> None:
    what = p.add_argument_group("what to evaluate")
    source = what.add_mutually_exclusive_group()
    source.add_argument("--method", help="run this registered method, or several a,b,c over the same items and seeds "
                                         "with one comparative report (see `asuka inpaint --list-methods`); outputs "
                                         "go to OUT/predictions (OUT/<method>/predictions for several) and finished "
                                         "ones are not recomputed")
    source.add_argument("--predictions", help="score outputs made elsewhere: a folder of <key>.png (same stems and "
                                              "sizes as the ground-truth images)")
    what.add_argument("--merge", action="store_true", help="only merge OUT/shards (after `--shard i/n` jobs) and "
                                                           "write the reports")
    what.add_argument("--data", help="MISATO root (DATA/512/image, DATA/512/mask), a MISATO 512/1024 folder, or a "
                                     "folder with image/ and mask/ subfolders (masks: white = hole, matched by stem)")
    what.add_argument("--masks", help="mask folder when --data is a plain folder of images")
    what.add_argument("--resolution", type=int, default=512, choices=(512, 1024), help="MISATO resolution (512)")
    what.add_argument("--out", required=True, help="output folder (predictions, shard results, reports)")
    what.add_argument("--limit", type=positive_int, help="evaluate only the first N items (quick checks)")
    what.add_argument("--fail-fast", action="store_true",
                      help="stop at the first unreadable image, mask or prediction (default: leave it out of the "
                           "scores, list it at the end and exit with status 1)")

    add_method_arguments(p)
    run = p.add_argument_group("running")
    run.add_argument("--batch-size", type=positive_int, default=4, help="images per forward pass (default 4)")
    run.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda:LOCAL_RANK when available, else cpu)")
    run.add_argument("--shard", help="this process's part i/n (0-based) for independent jobs; under torchrun the "
                                     "split follows RANK/WORLD_SIZE and rank 0 merges automatically")
    run.add_argument("--no-progress", dest="progress", action="store_false", help="hide progress bars")

    m = p.add_argument_group("metrics (default: psnr,ssim,grad offline; +lpips with --lpips-weights; +fid,kid,ids "
                             "with --inception-weights; +clip with --clip-model)")
    m.add_argument("--metrics", type=_metric_list, help=f"comma list from {','.join(_METRIC_NAMES)}; a listed metric "
                                                        "whose weights are missing is an error")
    m.add_argument("--allow-download", action="store_true",
                   help="let missing LPIPS/Inception backbones download into the torch hub cache (off by default)")
    m.add_argument("--protocol", choices=tuple(PROTOCOLS), default="default",
                   help="set every metric convention of one paper's tables at once: "
                        + "; ".join(f"{p.name}: {p.description}" for p in PROTOCOLS.values())
                        + ". Options below that contradict the protocol are an error")
    m.add_argument("--lpips-net", choices=("alex", "vgg", "squeeze"),
                   help="LPIPS backbone: alex (ASUKA, MAT; default), vgg (LaMa), squeeze (BrushNet)")
    m.add_argument("--lpips-weights", help="torchvision ImageNet state dict of the LPIPS backbone, e.g. "
                                           "alexnet-owt-7be5be79.pth from download.pytorch.org/models")
    m.add_argument("--inception-weights", help="Inception-v3 weights: weights-inception-2015-12-05-6726825d.pth "
                                               "(torch-fidelity v0.2.0 release) for the default variant")
    m.add_argument("--inception-variant", choices=("fidelity", "torchvision"),
                   help="fidelity: TF-Inception as torch-fidelity/pytorch-fid (comparable FID; default); "
                        "torchvision: IMAGENET1K_V1 as ASUKA's cal_ids.py (inception_v3_google-0cc3c7bd.pth)")
    m.add_argument("--inception-resize", choices=("tensor", "pil"),
                   help="torchvision variant's preprocessing on float tensors on the device (default) or on 8-bit PIL "
                        "images as ASUKA's cal_ids.py")
    m.add_argument("--grad-empty-edge", choices=("nan", "zero"),
                   help="Grad of a mask without an edge: nan = undefined, left out of the mean (default); zero = ASUKA")
    m.add_argument("--ids-pca-dim", type=positive_int,
                   help="PCA the Inception features to this many dims before the IDS SVM (ASUKA passes the "
                        "resolution, 512; Co-Mod-GAN: none, the default)")
    m.add_argument("--kid-subsets", type=positive_int, default=100, help="KID subsets (default 100)")
    m.add_argument("--kid-subset-size", type=positive_int, default=1000,
                   help="KID subset size (default 1000; clamped to the number of images)")
    m.add_argument("--ssim-color", choices=("gray", "rgb"),
                   help="SSIM on grayscale (ASUKA; default) or averaged over RGB channels")
    m.add_argument("--clip-model", help="CLIP folder or hub id (e.g. openai/clip-vit-large-patch14) for the CLIP "
                                        "score between composite and ground truth")
    m.add_argument("--clip-region", choices=("hole", "full"), default="hole",
                   help="CLIP on the hole only (both images masked, ASUKA; default) or on the whole images")


def run(args: argparse.Namespace) -> int:
    from asuka.evaluation.distributed import parse_shard
    from asuka.evaluation.report import markdown_table
    from asuka.evaluation.runner import EvalConfig, MethodRun, evaluate, merge
    from asuka.evaluation.scoring import MetricConfig

    if args.merge:
        if args.method or args.predictions or args.shard:
            raise CommandError("--merge takes only --out (it merges OUT/shards)")
        result = merge(args.out)
    else:
        if args.data is None:
            raise CommandError("--data is required (the ground-truth set)")
        if not (args.method or args.predictions):
            raise CommandError("pass --method NAME to run a method or --predictions DIR to score existing outputs")
        try:
            shard = parse_shard(args.shard) if args.shard else None
        except ValueError as err:
            raise CommandError(str(err)) from None
        conventions = protocol_settings(args.protocol, resolution=args.resolution, explicit=dict(
            metrics=args.metrics, lpips_net=args.lpips_net, inception_variant=args.inception_variant,
            inception_resize=args.inception_resize, ids_pca_dim=args.ids_pca_dim,
            ssim_gray=None if args.ssim_color is None else args.ssim_color == "gray",
            grad_empty_edge=args.grad_empty_edge))
        metrics = MetricConfig(
            **conventions, lpips_weights=args.lpips_weights, inception_weights=args.inception_weights,
            clip_model=args.clip_model, clip_region=args.clip_region, kid_subsets=args.kid_subsets,
            kid_subset_size=args.kid_subset_size, allow_download=args.allow_download)
        methods = [m.strip() for m in (args.method or "").split(",") if m.strip()]
        requests, given = method_requests(args, methods) if methods else ([], {})
        if not methods and (given or args.model or args.decoder or args.preset or args.set_options):
            raise CommandError("method options and inputs need --method (--predictions scores existing outputs)")
        config = EvalConfig(data=args.data, out=args.out, methods=[MethodRun(**r) for r in requests],
                            predictions=args.predictions, masks=args.masks, resolution=args.resolution,
                            inputs=given, seed=args.seed, batch_size=args.batch_size, limit=args.limit,
                            device=args.device, shard=shard, progress=args.progress, metrics=metrics,
                            fail_fast=args.fail_fast)
        result = evaluate(config)
    if result is not None:
        if "methods" in result:
            print(Path(result["files"]["markdown"]).read_text())
        else:
            print(markdown_table(result))
        print("asuka evaluate: wrote " + ", ".join(result["files"].values()))
    failures = {} if args.merge else config.failures
    if failures:  # left out of the scores: never silent
        for key, message in failures.items():
            print(f"asuka evaluate: failed: {key}: {message}", file=sys.stderr)
        print(f"asuka evaluate: error: {len(failures)} item(s) could not be read and are not in the scores (listed "
              "above; --fail-fast stops at the first)", file=sys.stderr)
        return 1
    return 0


EVALUATE = Subcommand("evaluate", "run a method over an evaluation set (or score existing outputs) and report "
                                  "PSNR/SSIM/LPIPS/FID/KID/U-IDS/P-IDS/Grad/CLIP, by domain and hole ratio",
                      add_arguments, run)
