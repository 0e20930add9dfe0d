"""CPU wall-clock of Shrunk SegViT vs plain SegViT in one run, next to their GFLOPs (thesis table 4.7).

Models (random weights; speed does not depend on them): the plain one-stage SegViT of table 4.7
(ATM on block 11 with query self-attention) and the Shrunk recipes QD@6 + QU, QD@0, EQD@0, all
with ``mask_resolution: full`` as the thesis counts. EQD's cost depends on how many tokens hold
an edge; an untrained edge head predicts none, so the benchmark replaces it with a stub that marks
a fixed random ``--eqd-edges`` fraction of the tokens as edges (default 0.40: with the 2x2
subsample that keeps ~55% of the tokens, about what table 4.7's 74.6 GFLOPs implies). Each model
runs batch 1 under ``no_grad``, ``--repeats`` times after one warm-up; median and minimum seconds.

    python benchmarks/shrunk_speed.py [--size 512 512] [--threads 2] [--repeats 5] [--eqd-edges 0.4]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from segcli.api import without_pretrained  # noqa: E402
from segcli.engine.flops import count_flops  # noqa: E402
from segcli.models import build_segmentor  # noqa: E402
from segcli.models import shrunk  # noqa: E402,F401  (registers model.type: shrunk)
from segcli.ops.scores import token_fractions  # noqa: E402
from segcli.recipe import load_recipe  # noqa: E402

FULL = ["model.decode_head.mask_resolution=full"]
MODELS = {
    "plain, one ATM stage": ("segvit_vit_b_ade20k.yaml", ["model.decode_head.use_stages=1",
                                                          "model.decode_head.self_attn=true"]),
    "Shrunk QD@6 + QU (learned)": ("segvit_shrunk_qd6_vit_b_ade20k.yaml", []),
    "Shrunk QD@0 + QU (inherit)": ("segvit_shrunk_qd0_vit_b_ade20k.yaml", []),
    "Shrunk EQD@0 + QU (inherit)": ("segvit_shrunk_eqd0_vit_b_ade20k.yaml", []),
}


class RandomEdges(nn.Module):
    """Edge-head stub: marks a fixed random ``fraction`` of the tokens as edges (logits [B, N, 2])."""

    def __init__(self, fraction: float, seed: int = 0):
        super().__init__()
        self.fraction = fraction
        self.seed = seed

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        generator = torch.Generator().manual_seed(self.seed)
        edges = (torch.rand(tokens.shape[:2], generator=generator) < self.fraction).float()[..., None]  # [B, N, 1]
        return torch.cat([(1 - edges) * 5.0, edges * 5.0], dim=-1)  # [B, N, 2]


def timed(fn, repeats: int) -> tuple[float, float, float]:
    """(median wall s, min wall s, median process CPU s) of ``repeats`` calls after one warm-up.

    The process CPU time (all threads) is printed too because on a shared machine the wall clock
    mostly measures the neighbours; CPU seconds stay closer to the work done.
    """
    fn()
    walls, cpus = [], []
    for _ in range(repeats):
        start, start_cpu = time.perf_counter(), time.process_time()
        fn()
        walls.append(time.perf_counter() - start)
        cpus.append(time.process_time() - start_cpu)
    return statistics.median(walls), min(walls), statistics.median(cpus)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, nargs=2, default=(512, 512), metavar=("H", "W"))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--eqd-edges", type=float, default=0.40)
    parser.add_argument("--num-classes", type=int, default=150)
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    image = torch.randn(1, 3, *args.size)
    rows = []
    for name, (recipe_file, overrides) in MODELS.items():
        recipe = without_pretrained(load_recipe(REPO / "recipes" / recipe_file, FULL + overrides))
        torch.manual_seed(0)
        model = build_segmentor(recipe.model, args.num_classes).eval()
        if getattr(model, "edge_head", None) is not None:
            model.edge_head = RandomEdges(args.eqd_edges)
        gflops = count_flops(model, image)
        with torch.no_grad():
            median, fastest, cpu = timed(lambda m=model: m(image), args.repeats)
            counts = model.forward_scores(image).counts  # the token counts travel with the scores
        kept = token_fractions(counts).get("kept_fraction", 1.0)
        rows.append((name, gflops, kept, median, fastest, cpu))
        del model

    print(f"CPU, {args.threads} threads, batch 1, ViT-B/16, {args.size[0]}x{args.size[1]}, K = {args.num_classes}, "
          f"median of {args.repeats}; EQD stub edge fraction {args.eqd_edges}")
    width = max(len(r[0]) for r in rows)
    print(f"{'model':<{width}}  GFLOPs  kept  wall med s  wall min s  CPU med s  | ratios to plain: GFLOPs  "
          f"wall med  wall min  CPU")
    base = rows[0]
    for name, gflops, kept, median, fastest, cpu in rows:
        print(f"{name:<{width}}  {gflops:6.2f}  {kept:4.2f}  {median:10.3f}  {fastest:10.3f}  {cpu:9.3f}  | "
              f"{gflops / base[1]:22.3f}  {median / base[3]:8.3f}  {fastest / base[4]:8.3f}  {cpu / base[5]:.3f}")


if __name__ == "__main__":
    main()
