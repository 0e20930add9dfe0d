"""NRD R50 vs SMP's DeepLabV3Plus R50 at Cityscapes size (1024x2048), image -> labels, CPU.

The model a user would pick instead of NRD is segmentation_models_pytorch's ``DeepLabV3Plus``
(ResNet-50 encoder, output stride 16, 19 classes). Both run image -> labels: segcli through the
engine's label path (:func:`segcli.engine.inference.infer_labels`), SMP as ``model(x).argmax(1)``.
segcli's model as ``predict`` runs it (prepared for inference: BatchNorms folded, channels-last),
SMP's as its README shows (eval mode). Both with random weights (speed does not depend on them),
timed round-robin in one process (so both get the same allocator: segcli's CLI setting unless
``--system-allocator``) so
that machine load hits both alike; medians, minima, the NRD/SMP ratio, and user/system CPU
seconds per call (system time is the kernel mapping and zeroing fresh pages).

    pip install segmentation-models-pytorch   # not a segcli dependency
    python benchmarks/nrd_vs_smp.py [--size 1024 2048] [--threads 2] [--repeats 5]
                                    [--system-allocator] [--unprepared]
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from segcli.build import as_recipe, build_model, without_pretrained  # noqa: E402
from segcli.allocator import retain_freed_memory  # noqa: E402
from segcli.engine.inference import infer_labels, prepare_for_inference  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, nargs=2, default=(1024, 2048), metavar=("H", "W"))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--recipe", default="recipes/nrd_r50_cityscapes.yaml")
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="recipe override key=value")
    parser.add_argument("--system-allocator", action="store_true",
                        help="keep glibc's defaults (the CLI retains freed memory; see segcli/allocator.py)")
    parser.add_argument("--unprepared", action="store_true", help="skip prepare_for_inference (BN folding, channels-last)")
    args = parser.parse_args()
    allocator = "glibc defaults" if args.system_allocator or not retain_freed_memory() else "freed memory retained"

    try:
        import segmentation_models_pytorch as smp
    except ImportError:
        sys.exit("this benchmark needs segmentation-models-pytorch: pip install segmentation-models-pytorch")

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    recipe = without_pretrained(as_recipe(args.recipe, args.overrides))
    nrd = build_model(recipe).eval()
    if not args.unprepared:
        prepare_for_inference(nrd)
    reference = smp.DeepLabV3Plus("resnet50", encoder_weights=None, classes=19, encoder_output_stride=16).eval()
    image = torch.rand(1, 3, *args.size) * 255
    test = recipe.test.__class__(mode="whole")
    runs = {
        "segcli NRD R50": lambda: infer_labels(nrd, image, test, tuple(recipe.data.crop_size)),
        "SMP DeepLabV3Plus R50 (OS16)": lambda: reference(image).argmax(1),
    }
    times = {name: [] for name in runs}
    cpu = {name: [] for name in runs}
    with torch.inference_mode():
        for fn in runs.values():
            fn()
        for _ in range(args.repeats):
            for name, fn in runs.items():
                before, start = os.times(), time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - start)
                after = os.times()
                cpu[name].append((after.user - before.user, after.system - before.system))
    first = statistics.median(times["segcli NRD R50"])
    print(f"{args.size[0]}x{args.size[1]}, batch 1, {args.threads} threads, {args.repeats} round-robin repeats, "
          f"allocator: {allocator}, segcli model {'as built' if args.unprepared else 'prepared for inference'}")
    for name in runs:
        med = statistics.median(times[name])
        user = statistics.median(u for u, _ in cpu[name])
        system = statistics.median(s for _, s in cpu[name])
        print(f"{name:32s} median {med:6.2f} s  min {min(times[name]):6.2f} s  user {user:5.1f} s  sys {system:5.1f} s")
    print(f"NRD / SMP latency ratio (medians): {first / statistics.median(times['SMP DeepLabV3Plus R50 (OS16)']):.3f}")


if __name__ == "__main__":
    main()
