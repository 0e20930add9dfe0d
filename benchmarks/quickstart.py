"""Time the README's first run (``segcli train recipes/quickstart.yaml``) phase by phase.

Each run is a fresh Python process, as the command is: it imports segcli, generates the synthetic
data into an empty temporary folder, trains and evaluates through :func:`segcli.train` (the API
the CLI calls), and reports when each phase ended through the training callback:

* ``start``    - interpreter start-up and imports (torch, segcli's training code);
* ``data``     - generating the synthetic set (first use) and building the model;
* ``train``    - the iterations, up to the last ``"step"`` event;
* ``eval``     - the final validation, up to the ``"eval"`` event;
* ``rest``     - checkpoints and leaving;

``total`` is the wall time of the process. Variants (``NAME:KEY=VALUE,KEY=VALUE``) are run
round-robin with the recipe itself (``--rounds`` times each), so that on a shared machine they
see the same load: compare the ratios, not the seconds. The table gives the median of each
column and the mIoU of each run (the runs of one variant repeat the same seed unless its
overrides set ``train.seed``). Time on an otherwise idle machine: on busy cores the compute threads
of one process wait for one another at every operator, which makes the runs many times slower and
even the ratios meaningless (``OMP_NUM_THREADS=1`` suffers far less).

To time the AVX2-only machine the README quotes, emulate it on any x86 CPU:

    ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 python benchmarks/quickstart.py
    python benchmarks/quickstart.py --rounds 2 old:train.max_iters=600,data.crop_size=[128,128]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PHASES = ("start", "data", "train", "eval", "rest", "total")


def run_once(recipe: str, overrides: list[str], started: float) -> dict:
    """One quickstart in this process (``started``: the parent's clock when it launched us)."""
    sys.path.insert(0, str(REPO))
    # what `segcli train` imports before its first step (segcli itself imports lazily): part of the start-up
    import torch  # noqa: F401, PLC0415
    import segcli  # noqa: PLC0415
    import segcli.workflows.train  # noqa: F401, PLC0415

    marks = {"start": time.time() - started}
    t0 = time.time()
    last_step = [t0]

    def callback(event: str, info: dict) -> None:
        now = time.time()
        if event == "start":
            marks["data"] = now - t0
        elif event == "step":
            last_step[0] = now
        elif event == "eval":
            marks["train"] = last_step[0] - t0 - marks["data"]
            marks["eval"] = now - last_step[0]
            marks["eval_at"] = now

    with tempfile.TemporaryDirectory(prefix="segcli-quickstart-") as tmp:
        sets = [f"data.root={Path(tmp) / 'synthetic'}", *overrides]
        result = segcli.train(recipe, work_dir=Path(tmp) / "run", overrides=sets, callback=callback)
        marks["rest"] = time.time() - marks.pop("eval_at")
    marks["mIoU"] = result.best_miou
    return marks


def launch(recipe: str, overrides: list[str]) -> dict:
    """Run :func:`run_once` in a child process; adds its wall time as ``total``."""
    start = time.time()
    child = subprocess.run([sys.executable, __file__, "--child", json.dumps([recipe, overrides, start])],
                           capture_output=True, text=True, env=os.environ.copy())
    total = time.time() - start
    if child.returncode != 0:
        sys.exit(f"run failed ({' '.join(overrides) or 'no overrides'}):\n{child.stderr[-2000:]}")
    marks = json.loads(child.stdout.strip().splitlines()[-1])
    return {**marks, "total": total}


def parse_variant(text: str) -> tuple[str, list[str]]:
    """``NAME:KEY=VALUE,KEY=VALUE`` -> (name, overrides); commas inside ``[...]`` stay in the value."""
    name, _, sets = text.partition(":")
    overrides, depth, item = [], 0, ""
    for char in sets:
        depth += char == "["
        depth -= char == "]"
        if char == "," and depth == 0:
            overrides.append(item)
            item = ""
        else:
            item += char
    return name, [s for s in overrides + [item] if s]


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == "--child":
        recipe, overrides, started = json.loads(sys.argv[2])
        print(json.dumps(run_once(recipe, overrides, started)))
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("variants", nargs="*", help="NAME:KEY=VALUE,... runs alongside the recipe as is")
    parser.add_argument("--recipe", default=str(REPO / "recipes" / "quickstart.yaml"))
    parser.add_argument("--rounds", type=int, default=1, help="runs of each variant, round-robin")
    parser.add_argument("--variants-only", action="store_true",
                        help="leave out the recipe as is (ratios are then to the first variant)")
    args = parser.parse_args()
    variants = [] if args.variants_only else [("recipe", [])]
    variants += [parse_variant(v) for v in args.variants]
    if not variants:
        parser.error("--variants-only needs at least one variant")
    runs: dict[str, list[dict]] = {name: [] for name, _ in variants}
    isa = os.environ.get("ATEN_CPU_CAPABILITY", "native")
    print(f"{args.recipe}, {args.rounds} round(s), CPU kernels: {isa}, "
          f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}", file=sys.stderr)
    for round_ in range(args.rounds):
        for name, overrides in variants:
            marks = launch(args.recipe, overrides)
            runs[name].append(marks)
            print(f"round {round_ + 1} {name}: " + ", ".join(f"{p} {marks[p]:.1f} s" for p in PHASES)
                  + f", mIoU {marks['mIoU']:.2f}", file=sys.stderr)
    base_total = statistics.median(m["total"] for m in runs[variants[0][0]])
    print("| variant | " + " | ".join(f"{p} (s)" for p in PHASES) + f" | vs {variants[0][0]} | mIoU |")
    print("|---" * (len(PHASES) + 3) + "|")
    for name, marks in runs.items():
        medians = [statistics.median(m[p] for m in marks) for p in PHASES]
        mious = ", ".join(f"{m['mIoU']:.2f}" for m in marks)
        print(f"| {name} | " + " | ".join(f"{v:.1f}" for v in medians)
              + f" | {medians[-1] / base_total:.2f} | {mious} |")


if __name__ == "__main__":
    main()
