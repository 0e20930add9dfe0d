"""CPU wall-clock of a DToP-pruned model vs the unpruned one, next to their GFLOPs (thesis ch. 5).

Takes a trained checkpoint with auxiliary heads (a base model, e.g. ``segcli train
recipes/tiny/dtop.yaml``, or a DToP@Finetune one), sets it to ``--p0`` and to ``p0 = 1`` (the
unpruned model: same weights, no grading) with :func:`segcli.workflows.prune.prune_checkpoint` and, on the
validation images of its recipe, times in one run:

* image -> labels as ``predict`` runs it (the engine's label path, whole image), for
  the unpruned model and the pruned one at batch 1 and batch 8 (``--batch-sizes``): the whole
  validation set in batches, ``--repeats`` times after one warm-up; min and median seconds
  (min is the robust figure on a shared machine: other processes only ever add time);
* at batch 8, the released code's strategy for comparison: the pruned model run image by image;
* the two ways of running a block on variable-length token sets: padding to the batch's longest
  set with a key padding mask (what ``segcli/models/tokens.py`` does) and packing every image's
  tokens into one sequence with a block-diagonal attention mask, for the kept-token counts that
  reach the decode head, plus the share of padded slots.

GFLOPs are per image (fvcore, pruning included), averaged over the set, with and without the
auxiliary heads; the wall-clock saving is compared with the GFLOPs saving (with auxiliary heads:
what really runs).

    python benchmarks/dtop_speed.py CHECKPOINT [--p0 0.95] [--k 5] [--threads 1] [--repeats 5]
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from segcli.api import build_datasets, load_checkpoint  # noqa: E402
from segcli.engine.flops import count_flops  # noqa: E402
from segcli.engine.inference import infer_labels  # noqa: E402
from segcli.models.tokens import select_tokens  # noqa: E402
from segcli.ops.scores import token_fractions  # noqa: E402
from segcli.workflows.prune import gflops_split, prune_checkpoint  # noqa: E402

sys.path.insert(0, str(REPO / "benchmarks"))
from timing import timed  # noqa: E402


WHOLE = SimpleNamespace(mode="whole", crop_size=None, stride=None, scale=None, scales=(1.0,), flip=False,
                        min_size=None)


def labels(model, images: torch.Tensor) -> torch.Tensor:
    """What ``predict`` runs: image -> labels through the engine's label path (whole image)."""
    return infer_labels(model, images, WHOLE, tuple(images.shape[-2:]))


def over_set(model, images: torch.Tensor, batch: int):
    def run():
        with torch.no_grad():
            for start in range(0, len(images), batch):
                labels(model, images[start:start + batch])
    return run


def image_by_image(model, images: torch.Tensor, batch: int):
    """The released code's strategy once a token has exited: a Python loop over the batch's images."""
    def run():
        with torch.no_grad():
            for start in range(0, len(images), batch):
                for image in images[start:start + batch]:
                    labels(model, image[None])
    return run


def packed_block(block, tokens: torch.Tensor, lengths: list[int]) -> torch.Tensor:
    """A timm ViT block on one packed sequence [1, ΣM, C] with a block-diagonal attention mask."""
    owner = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))  # [ΣM]
    mask = owner[:, None] == owner[None, :]  # [ΣM, ΣM]: attend within one's own image
    attn = block.attn
    x = block.norm1(tokens)
    qkv = attn.qkv(x).reshape(1, x.shape[1], 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4)  # [3, 1, h, ΣM, d]
    out = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2], attn_mask=mask)  # [1, h, ΣM, d]
    x = tokens + attn.proj(out.transpose(1, 2).flatten(2))
    return x + block.mlp(block.norm2(x))


def padding_vs_packing(pruned, images: torch.Tensor, batch: int, repeats: int) -> dict:
    """Time one block after the last exit on the kept tokens of each batch: padded vs packed."""
    backbone = pruned.backbone
    block_index = pruned.exit_layers[-1] + 1
    block = backbone.blocks[block_index]
    padded_time = packed_time = 0.0
    slots = real = 0
    for start in range(0, len(images), batch):
        chunk = images[start:start + batch]
        with torch.no_grad():
            keep = pruned.run(chunk).exit_stage < 0  # [B, N]
            tokens, grid = backbone.embed(chunk)  # [B, N, C]: stand-in features of the right shape
            packed, index, pad = select_tokens(tokens, keep)  # [B, M, C]
            lengths = keep.sum(1).tolist()
            one_sequence = packed[~pad][None]  # [1, ΣM, C]
            padded_time += timed(lambda: backbone.run_block(block_index, packed, grid, positions=index,
                                                            key_padding_mask=pad if pad.any() else None), repeats)[0]
            packed_time += timed(lambda: packed_block(block, one_sequence, lengths), repeats)[0]
        slots += pad.numel()
        real += int((~pad).sum())
    return {"padded_ms": 1000 * padded_time, "packed_ms": 1000 * packed_time, "padding_share": 1 - real / slots}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("--p0", type=float, default=0.95)
    parser.add_argument("--k", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batch-sizes", default="1,8")
    parser.add_argument("--limit", type=int, default=None, help="use the first N validation images")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    with tempfile.TemporaryDirectory() as tmp:  # p0 = 1 is the unpruned model (also for finetuned checkpoints)
        base = load_checkpoint(prune_checkpoint(args.checkpoint, 1.0, args.k, out=Path(tmp) / "unpruned.pt"))
        pruned = load_checkpoint(prune_checkpoint(args.checkpoint, args.p0, args.k, out=Path(tmp) / "pruned.pt")).model
    (val_set,) = build_datasets(base.recipe, splits=("val",))
    count = len(val_set) if args.limit is None else min(args.limit, len(val_set))
    images = torch.stack([val_set[i]["image"] for i in range(count)])  # [n, 3, H, W]

    print(f"# {args.checkpoint}  p0={args.p0} k={args.k}  {count} images {tuple(images.shape[-2:])}")
    print(f"# torch {torch.__version__}, {args.threads} thread(s), {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} CPUs, load average before: {' '.join(f'{x:.1f}' for x in os.getloadavg())}")

    unpruned_gflops = statistics.fmean(count_flops(base.model, images[i:i + 1]) for i in range(count))
    splits = [gflops_split(pruned, images[i:i + 1]) for i in range(count)]
    pruned_gflops = statistics.fmean(s["gflops"] for s in splits)
    without_aux = statistics.fmean(s["gflops_without_aux"] for s in splits)
    flops_saving = 1 - pruned_gflops / unpruned_gflops
    stats = []
    with torch.no_grad():
        for i in range(count):
            stats.append(token_fractions(pruned.forward_scores(images[i:i + 1]).counts))
    exit_fraction = [statistics.fmean(s["exit_fraction"][m] for s in stats) for m in range(len(pruned.exit_layers))]
    print(f"GFLOPs/image: unpruned {unpruned_gflops:.3f}; pruned {pruned_gflops:.3f} with aux heads, "
          f"{without_aux:.3f} without  -> saving {100 * flops_saving:.1f}% (with aux), "
          f"{100 * (1 - without_aux / unpruned_gflops):.1f}% (without)")
    print(f"exit fraction per stage {[round(f, 3) for f in exit_fraction]}, "
          f"kept to the decode head {statistics.fmean(s['kept_fraction'] for s in stats):.3f}")

    print("\n| batch | unpruned s (min / median) | pruned s (min / median) | wall saving | saving / GFLOPs saving |")
    print("|---|---|---|---|---|")
    for batch in (int(b) for b in args.batch_sizes.split(",")):
        t_base = timed(over_set(base.model, images, batch), args.repeats)
        t_pruned = timed(over_set(pruned, images, batch), args.repeats)
        saving = 1 - t_pruned[0] / t_base[0]
        print(f"| {batch} | {t_base[0]:.3f} / {t_base[1]:.3f} | {t_pruned[0]:.3f} / {t_pruned[1]:.3f} | "
              f"{100 * saving:.1f}% | {saving / flops_saving:.2f} |")
        if batch > 1:
            t_loop = timed(image_by_image(pruned, images, batch), args.repeats)
            print(f"| {batch}, image by image (released) | | {t_loop[0]:.3f} / {t_loop[1]:.3f} | "
                  f"{100 * (1 - t_loop[0] / t_base[0]):.1f}% | |")
            layout = padding_vs_packing(pruned, images, batch, args.repeats)
            print(f"\nblock {pruned.exit_layers[-1] + 1} on the tokens kept to the decode head, batch {batch}, "
                  f"summed over the set: padded + key mask {layout['padded_ms']:.1f} ms "
                  f"({100 * layout['padding_share']:.0f}% padded slots), packed + block-diagonal mask "
                  f"{layout['packed_ms']:.1f} ms")
    print(f"# load average after: {' '.join(f'{x:.1f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
