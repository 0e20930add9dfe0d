"""CPU wall-clock of batched DToP at full size: ViT-B 512² (recipes/dtop_vit_b_ade20k.yaml), pruned vs not.

``benchmarks/dtop_speed.py`` times a trained tiny model, whose operations are so small that fixed
per-operation costs dominate (and depend on the thread count). This script times the same code at
the thesis' size instead. Random weights grade no token as confident, so the exit rule is replaced
by a stand-in that lets a chosen share of each image's remaining tokens exit at each stage.
The shares come either from a trained model (``--fractions-from CHECKPOINT``: a base DToP
checkpoint such as ``segcli train recipes/tiny/dtop.yaml``'s, pruned at ``--p0``; image i of the
batch gets the per-stage exits measured on validation image i, so the batch carries real
image-to-image variation) or from ``--exit 0.45,0.15`` varied per image by up to ``--jitter``.
Everything else, the grading head's scores included, is the real pruned forward. Batches of
``--batch-sizes`` images, ``--repeats`` timed passes after a warm-up; minimum and median seconds;
at batch > 1 also the released code's strategy, the pruned model image by image. GFLOPs per
image (fvcore, attention counted) with and without the auxiliary heads.

    python benchmarks/dtop_speed_vitb.py [--fractions-from CKPT [--p0 0.95]] [--size 512] [--threads 2]
                                         [--repeats 3] [--exit 0.45,0.15] [--batch-sizes 1,8]
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
from pathlib import Path

import torch
from torch import nn

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from dtop_speed import image_by_image, over_set  # noqa: E402  (the tiny benchmark's batching)
from timing import timed  # noqa: E402

import segcli.models.backbones.vit as vit  # noqa: E402
from segcli.allocator import retain_freed_memory  # noqa: E402
from segcli.api import build_datasets, build_model, load_checkpoint  # noqa: E402
from segcli.models.dtop import atm_token_probs  # noqa: E402
from segcli.ops.scores import token_fractions  # noqa: E402
from segcli.workflows.prune import gflops_split, prune_checkpoint  # noqa: E402
from segcli.recipe import load_recipe  # noqa: E402


class FractionExit(nn.Module):
    """Stands in for a TokenGrader: real per-class scores, a set share of each image's valid tokens exits.

    ``shares`` [n_images]: the share of the remaining tokens that leaves, per image of the set
    (batch i of a pass gets the next images' shares, in order)."""

    def __init__(self, shares: list[float], seed: int):
        super().__init__()
        self.shares, self.seed, self.cursor = torch.tensor(shares), seed, 0

    def forward(self, valid, *, logits=None, class_logits=None, mask_logits=None):
        scores = atm_token_probs(class_logits, mask_logits) if logits is None else logits.transpose(1, 2).softmax(-1)
        generator = torch.Generator().manual_seed(self.seed)  # the same exits on every call
        batch, length = valid.shape
        picks = (torch.arange(batch) + self.cursor) % len(self.shares)
        self.cursor = (self.cursor + batch) % len(self.shares)
        share = self.shares[picks][:, None]  # [B, 1]
        noise = torch.rand(batch, length, generator=generator).masked_fill(~valid, 2.0)  # invalid never exit
        rank = noise.argsort(dim=1).argsort(dim=1)  # [B, M] random order among the valid tokens
        leave = rank < (share.clamp(0, 0.98) * valid.sum(1, keepdim=True)).long()  # [B, M]
        return scores, leave & valid


def trained_shares(checkpoint: Path, p0: float, images: int) -> list[list[float]]:
    """Per stage, per validation image: the share of its remaining tokens that exits, measured
    with the trained model of ``checkpoint`` pruned at ``p0`` (its recipe's validation set)."""
    with tempfile.TemporaryDirectory() as tmp:
        loaded = load_checkpoint(prune_checkpoint(checkpoint, p0, out=Path(tmp) / "pruned.pt"))
    (val_set,) = build_datasets(loaded.recipe, splits=("val",))
    per_image = []
    with torch.no_grad():
        for i in range(min(images, len(val_set))):
            counts = loaded.model.forward_scores(val_set[i]["image"][None]).counts
            left, shares = 1.0, []
            for fraction in token_fractions(counts)["exit_fraction"]:  # shares of the whole grid
                shares.append(fraction / left if left > 0 else 0.0)
                left -= fraction
            per_image.append(shares)
    return [list(stage) for stage in zip(*per_image)]


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
    parser.add_argument("--fractions-from", type=Path, default=None, help="a trained base DToP checkpoint")
    parser.add_argument("--p0", type=float, default=0.95, help="with --fractions-from: the threshold it is pruned at")
    parser.add_argument("--no-ragged", action="store_true",
                        help="run padded batches' per-token layers on the padding too (segcli 0.1's way)")
    args = parser.parse_args()
    retain_freed_memory()  # as the CLI
    if args.no_ragged:
        vit.RAGGED_MIN_PADDING = 2.0  # never: a share of padding is at most 1
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    def model(p0: float):
        rec = load_recipe(args.recipe, ["model.backbone.pretrained=null", f"model.backbone.img_size={args.size}",
                                        "model.type=dtop", f"model.options={{p0: {p0}}}"])
        torch.manual_seed(0)
        return build_model(rec, num_classes=150).eval()

    unpruned, pruned = model(1.0), model(0.5)
    pruned.load_state_dict(unpruned.state_dict())
    if args.fractions_from is not None:
        per_stage = trained_shares(args.fractions_from, args.p0, args.images)
        source = f"exits of {args.fractions_from} at p0 {args.p0} on {len(per_stage[0])} validation images"
    else:
        gen = torch.Generator().manual_seed(0)
        per_stage = [(float(x) + args.jitter * (2 * torch.rand(args.images, generator=gen) - 1)).clamp(0, 0.95).tolist()
                     for x in args.exit.split(",")]
        source = f"exits per stage {args.exit} ± {args.jitter}"
    if len(per_stage) != len(pruned.graders):
        raise SystemExit(f"{len(pruned.graders)} exit stages, {len(per_stage)} shares given")
    pruned.graders = nn.ModuleList(FractionExit(stage, seed=i) for i, stage in enumerate(per_stage))
    images = torch.randn(args.images, 3, args.size, args.size)
    means = [round(statistics.fmean(stage), 3) for stage in per_stage]

    print(f"# {Path(args.recipe).name} at {args.size}², random weights, {source} (mean share of the remaining "
          f"tokens per stage {means}), {'no ragged layers, ' if args.no_ragged else ''}{args.threads} thread(s), "
          f"load average {' '.join(f'{x:.1f}' for x in os.getloadavg())}")
    base = statistics.fmean(gflops_split(unpruned, images[i:i + 1])["gflops"] for i in range(len(images)))
    splits = [gflops_split(pruned, images[i:i + 1]) for i in range(len(images))]
    with_aux = statistics.fmean(s["gflops"] for s in splits)
    without = statistics.fmean(s["gflops_without_aux"] for s in splits)
    saving = 1 - with_aux / base
    with torch.no_grad():
        kept = token_fractions(pruned.forward_scores(images[:1]).counts)["kept_fraction"]
    print(f"GFLOPs/image: unpruned {base:.2f}; pruned {with_aux:.2f} with aux heads ({100 * saving:.1f}% less), "
          f"{without:.2f} without; kept to the decode head (image 0) {kept:.3f}")
    print("\n| batch | unpruned s (min / median) | pruned s (min / median) | wall saving | / GFLOPs saving |")
    print("|---|---|---|---|---|")
    for batch in (int(b) for b in args.batch_sizes.split(",")):
        t_base = timed(over_set(unpruned, images, batch), args.repeats)
        t_pruned = timed(over_set(pruned, images, batch), args.repeats)
        wall = 1 - t_pruned[0] / t_base[0]
        print(f"| {batch} | {t_base[0]:.2f} / {t_base[1]:.2f} | {t_pruned[0]:.2f} / {t_pruned[1]:.2f} | "
              f"{100 * wall:.1f}% | {wall / saving:.2f} |", flush=True)
        if batch > 1:
            t_loop = timed(image_by_image(pruned, images, batch), args.repeats)
            loop = 1 - t_loop[0] / t_base[0]
            print(f"| {batch}, image by image (released) | | {t_loop[0]:.2f} / {t_loop[1]:.2f} | {100 * loop:.1f}% | "
                  f"{loop / saving:.2f} |", flush=True)


if __name__ == "__main__":
    main()
