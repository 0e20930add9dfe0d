"""Peak memory of predicting labels: the full-score path (``infer(...).argmax(1)``) against the
band-by-band label path (``infer_labels``), each in a fresh subprocess.

Rows (random weights, ``pretrained`` cleared, batch 1, ``torch.no_grad``):

* SegViT ViT-B (``recipes/segvit_vit_b_ade20k.yaml``, 150 classes), whole mode, 2048×2048;
* slide mode (512² windows, stride 341: 324 windows) on a 6000×6000 image with 150 classes, on
  ``recipes/tiny/segvit.yaml``'s small ViT so that it runs in minutes on CPU (what grows with the
  image is the score path, not the backbone); the full-score path would allocate a 21.6 GB
  ``[1, 150, 6000, 6000]`` sum, so only the label path runs (``--big 0`` skips the row).

The figure is the growth of the resident set's high-water mark (``VmHWM``, reset through
``/proc/self/clear_refs`` after the model is built and the image made) during inference.

    python benchmarks/label_memory.py [--threads 2] [--big 6000]
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def child(path: str, size: int, mode: str, threads: int) -> None:
    import dataclasses

    import torch

    sys.path.insert(0, str(REPO))
    from segcli.build import build_model, without_pretrained
    from segcli.engine.inference import infer, infer_labels
    from segcli.recipe import load_recipe

    torch.set_num_threads(threads)
    name = "segvit_vit_b_ade20k.yaml" if mode == "whole" else "tiny/segvit.yaml"
    recipe = without_pretrained(load_recipe(REPO / "recipes" / name))
    test = dataclasses.replace(recipe.test, mode=mode, scale=None, scales=(1.0,), flip=False,
                               crop_size=(512, 512), stride=(341, 341))
    model = build_model(recipe, num_classes=150).eval()
    images = torch.randn(1, 3, size, size)
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current resident set
    before = _status_kib("VmRSS")
    start = time.perf_counter()
    with torch.no_grad():
        if path == "scores":
            labels = infer(model, images, test, recipe.data.crop_size).argmax(1)
        else:
            labels = infer_labels(model, images, test, recipe.data.crop_size)
    seconds = time.perf_counter() - start
    print(json.dumps({"path": path, "size": size, "mode": mode, "peak_growth_mib": (_status_kib("VmHWM") - before) / 1024,
                      "seconds": seconds, "labels": list(labels.shape)}))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--big", type=int, default=6000, help="slide-mode image side (0 = skip)")
    parser.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        path, size, mode, threads = args.child
        child(path, int(size), mode, int(threads))
        return
    runs = [("scores", 2048, "whole"), ("labels", 2048, "whole")]
    if args.big:
        runs += [("labels", args.big, "slide")]
    print(f"150 classes, random weights, batch 1, {args.threads} threads (whole: SegViT ViT-B; slide: tiny SegViT)")
    print(f"{'path':8s} {'image':>11s} {'mode':6s} {'peak RSS growth':>16s} {'seconds':>8s}")
    for path, size, mode in runs:
        out = subprocess.run([sys.executable, __file__, "--child", path, str(size), mode, str(args.threads)],
                             capture_output=True, text=True, check=True).stdout
        row = json.loads(out.strip().splitlines()[-1])
        print(f"{path:8s} {size:>5d}x{size:<5d} {mode:6s} {row['peak_growth_mib']:>12.0f} MiB {row['seconds']:8.1f}")


if __name__ == "__main__":
    main()
