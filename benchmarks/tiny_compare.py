"""Train tiny recipes at the same budget and compare their validation metrics (mIoU after training).

Each recipe is trained with :func:`segcli.train` into ``OUT/<recipe stem>`` (skipped when
``OUT/<stem>/last.pt`` already exists, so an interrupted comparison can be continued), then its
``last.pt`` is evaluated with :func:`segcli.evaluate` (``--trimap W`` adds the boundary-band mIoU,
``--flops`` the per-image-averaged GFLOPs). A table is printed and ``OUT/summary.json`` written.

    python benchmarks/tiny_compare.py --out runs/compare recipes/tiny/nrd.yaml recipes/tiny/bilinear.yaml --trimap 3
    python benchmarks/tiny_compare.py --out runs/compare recipes/tiny/segvit.yaml recipes/tiny/setr.yaml
    python benchmarks/tiny_compare.py --out runs/compare recipes/tiny/segvit.yaml \\
        recipes/tiny/segvit_shrunk.yaml recipes/tiny/segvit_shrunk_qd0.yaml --flops

``--set KEY=VALUE`` applies to every recipe (e.g. ``--set train.max_iters=300``); a recipe given as
``PATH@NAME`` is trained under the name NAME, and ``PATH@NAME:KEY=VALUE,KEY=VALUE`` adds overrides
for that recipe only (e.g. ``recipes/tiny/segvit.yaml@segvit_full:model.decode_head.mask_resolution=full``).
All numbers come from the runs themselves; nothing is cached between invocations except the
trained checkpoints in OUT.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import segcli  # noqa: E402


def parse_entry(entry: str) -> tuple[str, str, list[str]]:
    """``PATH[@NAME[:K=V,K=V]]`` -> (path, name, per-recipe overrides)."""
    path, _, rest = entry.partition("@")
    name, _, sets = rest.partition(":")
    name = name or Path(path).stem
    return path, name, [s for s in sets.split(",") if s]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("recipes", nargs="+")
    ap.add_argument("--out", default="runs/compare")
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    ap.add_argument("--trimap", type=int, default=None)
    ap.add_argument("--flops", action="store_true")
    args = ap.parse_args()

    out = Path(args.out)
    rows = []
    for entry in args.recipes:
        path, name, own = parse_entry(entry)
        overrides = [*args.overrides, *own]
        work = out / name
        t0 = time.perf_counter()
        if not (work / "last.pt").exists():
            segcli.train(path, work_dir=work, overrides=overrides)
        train_s = time.perf_counter() - t0
        res = segcli.evaluate(work / "last.pt", trimap=args.trimap, flops=args.flops)
        row = {"name": name, "recipe": path, "overrides": overrides, "train_s": round(train_s, 1),
               "mIoU": res["mIoU"], "mAcc": res["mAcc"], "aAcc": res["aAcc"],
               "per_class": {c["class"]: c["IoU"] for c in res["per_class"]}}
        for key, value in res.items():  # trimap_mIoU, gflops_avg, model statistics (kept tokens, exits)
            if key not in row and key not in ("per_class", "checkpoint", "num_images"):
                row[key] = value
        rows.append(row)
        print(json.dumps(row), flush=True)

    keys = ["mIoU", "mAcc", "aAcc"] + [k for k in ("trimap_mIoU", "gflops_avg") if any(k in r for r in rows)]
    print("\n| recipe | " + " | ".join(keys) + " | train s |")
    print("|---" * (len(keys) + 2) + "|")
    for r in rows:
        vals = " | ".join(f"{r[k]:.2f}" if isinstance(r.get(k), (int, float)) else "-" for k in keys)
        print(f"| {r['name']} | {vals} | {r['train_s']} |")
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
