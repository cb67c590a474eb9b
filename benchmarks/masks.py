"""Mask generator throughput: masks per second per core at 256² and 512², for every recipe.

    python benchmarks/masks.py [--seconds 1.0] [--recipes asuka_train comod ...]

"per core" divides by this process's CPU time (``time.process_time``; generation is single-threaded),
so other jobs on a shared machine do not deflate it; wall-clock rates are printed too. Goal: the
``asuka_train`` mixture at >= 1,000 masks/s per core at 256² (object masks from pre-decoded
polygons). The last column is the rate relative to ``asuka_train`` at the same size.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from asuka.masks import available_recipes, get_mask_generator

GOAL_256 = 1000.0


def measure(gen, size: int, seconds: float, rng: np.random.Generator) -> tuple[float, float, float]:
    """(masks per CPU second, masks per wall second, mean hole ratio)."""
    for _ in range(3):  # warm-up (first call builds caches)
        gen(size, size, rng)
    n, ratio = 0, 0.0
    c0, w0 = time.process_time(), time.perf_counter()
    while time.process_time() - c0 < seconds:
        ratio += float(gen(size, size, rng).mean())
        n += 1
    cpu, wall = time.process_time() - c0, time.perf_counter() - w0
    return n / cpu, n / wall, ratio / n


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=1.0, help="CPU seconds per measurement")
    parser.add_argument("--recipes", nargs="*", default=None, help="recipes to time (default: all)")
    parser.add_argument("--sizes", nargs="*", type=int, default=[256, 512])
    args = parser.parse_args(argv)
    names = args.recipes or available_recipes()
    if "asuka_train" not in names:
        names = ["asuka_train", *names]
    rng = np.random.default_rng(0)
    gens = {name: get_mask_generator(name) for name in names}
    results = {(n, s): measure(gens[n], s, args.seconds, rng) for s in args.sizes for n in names}
    header = f"{'recipe':<22}" + "".join(f"{f'{s}² /s/core':>14}{'wall /s':>10}{'ratio':>7}{'vs mix':>8}"
                                         for s in args.sizes)
    print(header)
    print("-" * len(header))
    for n in names:
        row = f"{n:<22}"
        for s in args.sizes:
            cpu, wall, ratio = results[(n, s)]
            row += f"{cpu:>14.0f}{wall:>10.0f}{ratio:>7.2f}{cpu / results[('asuka_train', s)][0]:>8.2f}"
        print(row)
    mix = results[("asuka_train", args.sizes[0])][0]
    if args.sizes[0] == 256:
        verdict = "meets" if mix >= GOAL_256 else "MISSES"
        print(f"\nasuka_train at 256²: {mix:.0f} masks/s per core ({verdict} the {GOAL_256:.0f}/s goal)")


if __name__ == "__main__":
    main()
