"""CPU wall-clock of batched DToP at full size: ViT-B 512² (recipes/dtop_vit_b_ade20k.yaml), pruned vs not.

``benchmarks/dtop_speed.py`` times a trained tiny model, whose operations are so small that fixed
per-operation costs dominate (and depend on the thread count). This script times the same code at
the thesis' size instead. Random weights grade no token as confident, so the exit rule is replaced
by a stand-in that lets a chosen fraction of each image's remaining tokens exit at each stage
(``--exit 0.45,0.15``: a fraction per stage, varied per image by up to ``--jitter`` so that the
images of a batch keep different token counts and padding is exercised). Everything else, the
grading head's scores included, is the real pruned forward. Batches of ``--batch-sizes`` images,
``--repeats`` timed forwards after a warm-up; minimum and median seconds. GFLOPs per image
(fvcore, attention counted) with and without the auxiliary heads.

    python benchmarks/dtop_speed_vitb.py [--size 512] [--threads 2] [--repeats 3] [--exit 0.45,0.15]
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
from pathlib import Path

import torch
from torch import nn

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from dtop_speed import over_set  # noqa: E402  (the tiny benchmark's batching)
from timing import timed  # noqa: E402

from segcli.api import build_model  # noqa: E402
from segcli.models.dtop import atm_token_probs  # noqa: E402
from segcli.workflows.prune import gflops_split  # noqa: E402
from segcli.recipe import load_recipe  # noqa: E402


class FractionExit(nn.Module):
    """Stands in for a TokenGrader: real per-class scores, a fixed share of valid tokens exits."""

    def __init__(self, fraction: float, jitter: float, seed: int):
        super().__init__()
        self.fraction, self.jitter, self.seed = fraction, jitter, seed

    def forward(self, valid, *, logits=None, class_logits=None, mask_logits=None):
        scores = atm_token_probs(class_logits, mask_logits) if logits is None else logits.transpose(1, 2).softmax(-1)
        generator = torch.Generator().manual_seed(self.seed)  # the same exits on every call
        batch, length = valid.shape
        share = self.fraction + self.jitter * (2 * torch.rand(batch, 1, generator=generator) - 1)  # [B, 1]
        noise = torch.rand(batch, length, generator=generator).masked_fill(~valid, 2.0)  # invalid never exit
        rank = noise.argsort(dim=1).argsort(dim=1)  # [B, M] random order among the valid tokens
        leave = rank < (share.clamp(0, 0.95) * valid.sum(1, keepdim=True)).long()  # [B, M]
        return scores, leave & valid


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default=str(REPO / "recipes" / "dtop_vit_b_ade20k.yaml"))
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--batch-sizes", default="1,8")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--exit", default="0.45,0.15", help="share of the remaining tokens leaving at each stage")
    parser.add_argument("--jitter", type=float, default=0.15)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    def model(p0: float):
        rec = load_recipe(args.recipe, ["model.backbone.pretrained=null", f"model.backbone.img_size={args.size}",
                                        "model.type=dtop", f"model.options={{p0: {p0}}}"])
        torch.manual_seed(0)
        return build_model(rec, num_classes=150).eval()

    unpruned, pruned = model(1.0), model(0.5)
    pruned.load_state_dict(unpruned.state_dict())
    shares = [float(x) for x in args.exit.split(",")]
    if len(shares) != len(pruned.graders):
        raise SystemExit(f"--exit needs {len(pruned.graders)} values (one per exit stage)")
    pruned.graders = nn.ModuleList(FractionExit(f, args.jitter, seed=i) for i, f in enumerate(shares))
    images = torch.randn(args.images, 3, args.size, args.size)

    print(f"# {Path(args.recipe).name} at {args.size}², random weights, exits per stage {shares} ± {args.jitter}, "
          f"{args.threads} thread(s), load average {' '.join(f'{x:.1f}' for x in os.getloadavg())}")
    base = statistics.fmean(gflops_split(unpruned, images[i:i + 1])["gflops"] for i in range(len(images)))
    splits = [gflops_split(pruned, images[i:i + 1]) for i in range(len(images))]
    with_aux = statistics.fmean(s["gflops"] for s in splits)
    without = statistics.fmean(s["gflops_without_aux"] for s in splits)
    saving = 1 - with_aux / base
    with torch.no_grad():
        pruned(images[:1])
    print(f"GFLOPs/image: unpruned {base:.2f}; pruned {with_aux:.2f} with aux heads ({100 * saving:.1f}% less), "
          f"{without:.2f} without; kept to the decode head (image 0) {pruned.last_stats['kept_fraction']:.3f}")
    print("\n| batch | unpruned s (min / median) | pruned s (min / median) | wall saving | / GFLOPs saving |")
    print("|---|---|---|---|---|")
    for batch in (int(b) for b in args.batch_sizes.split(",")):
        t_base = timed(over_set(unpruned, images, batch), args.repeats)
        t_pruned = timed(over_set(pruned, images, batch), args.repeats)
        wall = 1 - t_pruned[0] / t_base[0]
        print(f"| {batch} | {t_base[0]:.2f} / {t_base[1]:.2f} | {t_pruned[0]:.2f} / {t_pruned[1]:.2f} | "
              f"{100 * wall:.1f}% | {wall / saving:.2f} |", flush=True)


if __name__ == "__main__":
    main()
