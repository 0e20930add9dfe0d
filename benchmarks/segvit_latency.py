"""CPU latency of SegViT (ViT-B, 512², ATM head) against the bare timm ViT-B backbone, one run.

The thesis' ATM head is ~6% of the model's FLOPs; the head's wall-clock overhead should be close
(target: SegViT <= 1.10x the backbone). All models are built with random weights (no download),
batch 1, ``torch.set_num_threads(threads)``; every figure is the median of ``repeats`` timed calls
after a warm-up, and the models are timed round-robin so that machine load affects all alike.

Rows:

* ``timm ViT-B backbone`` - ``timm`` ``vit_base_patch16_384`` at 512², cls token dropped, no head;
* ``SegViT ViT-B (low|full)`` - the whole model, image -> ``[1, 150, 512, 512]`` scores, with the
  class scores formed at 1/16 (default) or at full size (released code; see ``models/heads/atm.py``);
* ``SegViT ViT-B (low|full), labels`` - image -> ``[1, 512, 512]`` labels through the engine's
  label path (``infer_labels``: the arg-max taken by bands of rows, no full-size score tensor);
* ``SETR-naive ViT-B`` - the thesis' baseline, which returns the same full-size scores;
* a breakdown of SegViT (low): the segcli ViT-B backbone, the ATM head on its features, the
  score assembly at 1/16 and the final bilinear upsampling of the 150 score maps to 512².

The last step writes a fresh 157 MB tensor; with glibc's defaults most of its time is the kernel
mapping and zeroing new pages (the row ``(same, into a buffer)`` times the same upsampling into a
preallocated tensor to show it; ``--system-allocator`` keeps those defaults, which the CLI changes:
``segcli/allocator.py``). Any model that returns full-size scores for 150 classes pays it, SETR
included.

    python benchmarks/segvit_latency.py [--threads 2] [--repeats 7] [--size 512]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import timm
import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from segcli.allocator import retain_freed_memory  # noqa: E402
from segcli.api import build_model  # noqa: E402
from segcli.engine.inference import infer_labels, prepare_for_inference  # noqa: E402
from segcli.recipe import load_recipe  # noqa: E402


def build(recipe: str, size: int, *overrides: str):
    rec = load_recipe(REPO / "recipes" / recipe, ["model.backbone.pretrained=null", f"model.backbone.img_size={size}",
                                                  *overrides])
    return prepare_for_inference(build_model(rec, num_classes=150))


def round_robin(fns: dict, repeats: int) -> dict[str, float]:
    """Median wall seconds per entry of ``fns``, timed in turns after one warm-up call each."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for fn in fns.values():
        fn()
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--system-allocator", action="store_true",
                        help="keep glibc's defaults (the CLI retains freed memory; see segcli/allocator.py)")
    args = parser.parse_args()
    allocator = "glibc defaults" if args.system_allocator or not retain_freed_memory() else "freed memory retained"
    torch.set_num_threads(args.threads)
    size = args.size
    low = build("segvit_vit_b_ade20k.yaml", size, "model.decode_head.mask_resolution=low")
    full = build("segvit_vit_b_ade20k.yaml", size, "model.decode_head.mask_resolution=full")
    setr = build("setr_vit_b_ade20k.yaml", size)
    backbone = timm.create_model("vit_base_patch16_384", pretrained=False, num_classes=0, img_size=size,
                                 class_token=False, global_pool="avg").eval()
    images = torch.randn(1, 3, size, size)
    whole = SimpleNamespace(mode="whole", crop_size=None, stride=None, scale=None, scales=(1.0,), flip=False,
                            min_size=None)
    with torch.inference_mode():
        features = low.backbone(images)
        outputs = low.decode_head(features)
        def low_scores():  # ATM's class scores at 1/16: [1, K, h, w]
            probs = outputs["pred_logits"].softmax(-1)[..., :-1]  # [1, K, K]
            return torch.einsum("bqc,bqhw->bchw", probs, outputs["pred_masks"].sigmoid())

        scores = low_scores()
        buffer = torch.empty(1, scores.shape[1], size, size)
        fns = {
            "timm ViT-B backbone": lambda: backbone.forward_features(images),
            "SegViT ViT-B (low)": lambda: low(images),
            "SegViT ViT-B (low), labels": lambda: infer_labels(low, images, whole, (size, size)),
            "SegViT ViT-B (full), labels": lambda: infer_labels(full, images, whole, (size, size)),
            "SegViT ViT-B (full)": lambda: full(images),
            "SETR-naive ViT-B": lambda: setr(images),
            "  segcli ViT-B backbone": lambda: low.backbone(images),
            "  ATM head (3 stages)": lambda: low.decode_head(features),
            "  scores at 1/16": low_scores,
            "  upsample to full size": lambda: F.interpolate(scores, size=(size, size), mode="bilinear",
                                                             align_corners=False),
        }
        into_buffer = getattr(torch.ops.aten.upsample_bilinear2d, "out", None)  # aten's out= overload
        if into_buffer is not None:
            fns["  (same, into a buffer)"] = lambda: into_buffer(scores, [size, size], False, None, None, out=buffer)
        medians = round_robin(fns, args.repeats)
    base = medians["timm ViT-B backbone"]
    print(f"{size}x{size}, batch 1, {args.threads} threads, median of {args.repeats}, 150 classes, allocator: {allocator}")
    print(f"{'':30s} {'median s':>9s} {'x backbone':>11s}")
    for name, median in medians.items():
        print(f"{name:30s} {median:9.3f} {median / base:11.3f}")
    head = medians["  ATM head (3 stages)"] + medians["  scores at 1/16"]
    print(f"ATM head + 1/16 scores over the timm backbone: {(base + head) / base:.3f}x "
          f"(+ the final upsampling: {(base + head + medians['  upsample to full size']) / base:.3f}x)")


if __name__ == "__main__":
    main()
