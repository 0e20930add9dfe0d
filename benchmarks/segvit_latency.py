"""CPU latency of SegViT (ViT-B, 512², ATM head) against the bare timm ViT-B backbone, one run.

The thesis' ATM head is ~6% of the model's FLOPs; the head's wall-clock overhead should be close
(target: SegViT <= 1.10x the backbone). Both models are built with random weights (no download),
batch 1, ``torch.set_num_threads(threads)``, the median of ``repeats`` timed forwards after a warm-up,
interleaved so that machine load affects both alike.

    python benchmarks/segvit_latency.py [--threads 2] [--repeats 7] [--size 512]
"""
from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import timm
import torch

from segcli.api import build_model
from segcli.recipe import load_recipe


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--size", type=int, default=512)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    size = args.size
    recipe = Path(__file__).resolve().parents[1] / "recipes" / "segvit_vit_b_ade20k.yaml"
    models = {}
    for resolution in ("low", "full"):
        rec = load_recipe(recipe, ["model.backbone.pretrained=null", f"model.decode_head.mask_resolution={resolution}",
                                   f"model.backbone.img_size={size}"])
        models[f"SegViT ViT-B ({resolution})"] = build_model(rec, num_classes=150).eval()
    backbone = timm.create_model("vit_base_patch16_384", pretrained=False, num_classes=0, img_size=size,
                                 class_token=False, global_pool="avg").eval()
    models["timm ViT-B backbone"] = backbone
    images = torch.randn(1, 3, size, size)
    times: dict[str, list[float]] = {name: [] for name in models}
    with torch.inference_mode():
        for model in models.values():
            model(images)  # warm-up
        for _ in range(args.repeats):
            for name, model in models.items():
                start = time.perf_counter()
                model(images)
                times[name].append(time.perf_counter() - start)
    base = statistics.median(times["timm ViT-B backbone"])
    print(f"{size}x{size}, batch 1, {args.threads} threads, median of {args.repeats}")
    print(f"{'model':28s} {'median s':>9s} {'min s':>7s} {'x backbone (median)':>20s}")
    for name, values in times.items():
        median = statistics.median(values)
        print(f"{name:28s} {median:9.3f} {min(values):7.3f} {median / base:20.3f}")


if __name__ == "__main__":
    main()
