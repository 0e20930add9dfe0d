"""What one slide window costs against whole mode: image -> labels through the engine.

``recipes/segvit_vit_b_ade20k.yaml`` tests in slide mode (crop 512, stride 341); on a 512² image
that is one window, which must cost what ``whole`` mode costs (issue 23: it cost 1.37x the bare
timm encoder, against 1.11x in whole mode). Random weights (no download), batch 1, the models
timed round-robin (median of ``repeats`` after a warm-up) so that machine load affects every row
alike; the ratios are the figures to read, not the seconds.

Rows: the bare ``timm`` ViT-B encoder (cls token dropped, no head); the recipe's SegViT, image ->
labels with ``infer_labels`` in whole mode and under the recipe's own ``test`` (slide).

    python benchmarks/slide_vs_whole.py [--threads 2] [--repeats 5] [--size 512]
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path

import timm
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from segcli.api import build_model  # noqa: E402
from segcli.engine.inference import infer_labels, prepare_for_inference  # noqa: E402
from segcli.recipe import load_recipe  # noqa: E402

sys.path.insert(0, str(REPO / "benchmarks"))
from segvit_latency import round_robin  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--size", type=int, default=512)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    size = args.size
    recipe = load_recipe(REPO / "recipes" / "segvit_vit_b_ade20k.yaml",
                         ["model.backbone.pretrained=null", f"model.backbone.img_size={size}"])
    model = prepare_for_inference(build_model(recipe, num_classes=150))
    encoder = timm.create_model("vit_base_patch16_384", pretrained=False, num_classes=0, img_size=size,
                                class_token=False, global_pool="avg").eval()
    images = torch.randn(1, 3, size, size)
    slide, crop = recipe.test, tuple(recipe.data.crop_size)
    whole = replace(slide, mode="whole")
    with torch.inference_mode():
        medians = round_robin({
            "timm ViT-B encoder": lambda: encoder.forward_features(images),
            "SegViT labels, whole": lambda: infer_labels(model, images, whole, crop),
            f"SegViT labels, slide {slide.crop_size}/{slide.stride}": lambda: infer_labels(model, images, slide, crop),
        }, args.repeats)
    base = medians["timm ViT-B encoder"]
    print(f"{size}x{size}, batch 1, {args.threads} threads, median of {args.repeats}, round-robin, random weights")
    print(f"{'':40s} {'median s':>9s} {'x encoder':>10s}")
    for name, median in medians.items():
        print(f"{name:40s} {median:9.3f} {median / base:10.3f}")
    names = list(medians)
    print(f"slide / whole: {medians[names[2]] / medians[names[1]]:.3f}")


if __name__ == "__main__":
    main()
