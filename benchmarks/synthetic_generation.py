"""Time to generate the quickstart's synthetic dataset (120 images at 128 px), CPU and wall clock.

Run by hand: ``python benchmarks/synthetic_generation.py [--repeats 3]``. Prints one line per run
and the median; the dataset is written to a temporary folder that is removed afterwards.
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from segcli.data import generate_synthetic


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--size", type=int, default=128)
    args = parser.parse_args()
    cpu, wall = [], []
    for run in range(args.repeats):
        with tempfile.TemporaryDirectory() as tmp:
            start_cpu, start_wall = time.process_time(), time.perf_counter()
            generate_synthetic(Path(tmp) / "syn", n_train=96, n_val=24, size=args.size)
            cpu.append(time.process_time() - start_cpu)
            wall.append(time.perf_counter() - start_wall)
        print(f"run {run + 1}: {cpu[-1]:.2f} s CPU, {wall[-1]:.2f} s wall")
    print(f"median: {statistics.median(cpu):.2f} s CPU, {statistics.median(wall):.2f} s wall "
          f"(96 + 24 images at {args.size} px)")


if __name__ == "__main__":
    main()
