"""Training-stream throughput of InpaintingDataModule: samples/s at 256² with 2 workers.

    python benchmarks/datamodule.py [--shards DIR_OR_PATTERN] [--resolution 256] [--batches 40]
        [--batch-size 16] [--workers 0 2] [--mask-recipe asuka_train]

Default shards: the bundled sample set (JPEG q95, shorter side 320). Each configuration pulls 3
warm-up batches (worker start-up), then times ``--batches`` batches. "float" rows yield the
canonical float batches (converted in the main process); "uint8" rows use ``device_transform=True``
(compact batches; the conversion would run on the GPU after transfer). The ratio column is relative
to the first row (in-process, float). On a machine shared with other jobs the multi-worker speed-up
is bounded by the free cores.
"""

from __future__ import annotations

import argparse
import tempfile
import time

from trainers.datamodule import InpaintingDataModule


def measure(shards, *, resolution: int, batch_size: int, workers: int, batches: int, recipe: str,
            sample_root: str, device_transform: bool) -> float:
    warmup = 3  # start workers, index shards
    dm = InpaintingDataModule(train_shards=shards, resolution=resolution, batch_size=batch_size, num_workers=workers,
                              mask_recipe=recipe, epoch_batches=batches + warmup,
                              sample_root=sample_root, device_transform=device_transform)
    dm.setup("fit")
    it = iter(dm.train_dataloader())
    for _ in range(warmup):
        next(it)
    t0 = time.perf_counter()
    n = sum(batch["image"].shape[0] for batch in it)
    return n / (time.perf_counter() - t0)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shards", default=None, help="shard folder (with manifest), brace pattern or path; "
                                                       "default: the bundled sample set")
    parser.add_argument("--resolution", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--batches", type=int, default=40)
    parser.add_argument("--workers", type=int, nargs="*", default=[0, 2])
    parser.add_argument("--mask-recipe", default="asuka_train")
    args = parser.parse_args(argv)
    configs = [(w, dt) for w in args.workers for dt in (False, True)]
    with tempfile.TemporaryDirectory() as root:
        rates = {c: measure(args.shards, resolution=args.resolution, batch_size=args.batch_size, workers=c[0],
                            batches=args.batches, recipe=args.mask_recipe, sample_root=root, device_transform=c[1])
                 for c in configs}
    base = rates[configs[0]]
    print(f"training stream, {args.resolution}², batch {args.batch_size}, mask recipe {args.mask_recipe}, "
          f"shards: {args.shards or 'bundled sample set'}")
    print(f"{'workers':>8}{'batches':>9}{'samples/s':>12}{'ms/sample':>11}{'ratio':>8}")
    for (w, dt), r in rates.items():
        print(f"{w:>8}{'uint8' if dt else 'float':>9}{r:>12.1f}{1000 / r:>11.2f}{r / base:>8.2f}")


if __name__ == "__main__":
    main()
