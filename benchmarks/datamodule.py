"""Training-stream throughput of InpaintingDataModule: samples/s at 256² with 2 workers.

    python benchmarks/datamodule.py [--shards DIR_OR_PATTERN] [--resolution 256] [--batches 40]
        [--batch-size 16] [--workers 0 2] [--mask-recipe asuka_train]

Default shards: the bundled sample set (JPEG q95, shorter side 320). Each configuration pulls 3
warm-up batches (worker start-up), then times ``--batches`` batches; the ratio column
is relative to the first ``--workers`` entry (0 = in-process baseline). On a machine shared with
other jobs the multi-worker speed-up is bounded by the free cores.
"""

from __future__ import annotations

import argparse
import tempfile
import time

from trainers.datamodule import InpaintingDataModule


def measure(shards, *, resolution: int, batch_size: int, workers: int, batches: int, recipe: str,
            sample_root: str) -> float:
    warmup = 3  # start workers, fill shuffle buffers
    dm = InpaintingDataModule(train_shards=shards, resolution=resolution, batch_size=batch_size, num_workers=workers,
                              mask_recipe=recipe, epoch_batches=batches + warmup, shuffle_buffer=200,
                              sample_root=sample_root)
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
    with tempfile.TemporaryDirectory() as root:
        rates = {w: measure(args.shards, resolution=args.resolution, batch_size=args.batch_size, workers=w,
                            batches=args.batches, recipe=args.mask_recipe, sample_root=root) for w in args.workers}
    base = rates[args.workers[0]]
    print(f"training stream, {args.resolution}², batch {args.batch_size}, mask recipe {args.mask_recipe}, "
          f"shards: {args.shards or 'bundled sample set'}")
    print(f"{'workers':>8}{'samples/s':>12}{'ms/sample':>11}{'ratio':>8}")
    for w, r in rates.items():
        print(f"{w:>8}{r:>12.1f}{1000 / r:>11.2f}{r / base:>8.2f}")


if __name__ == "__main__":
    main()
