"""Where does an ATM (SegViT) model lose accuracy: its masks or its class ("presence") head?

For a trained SegViT checkpoint, evaluates the validation split (whole images, no TTA) three ways:

* ``standard``  - the model's prediction, argmax_c Σ_q P(c|q)·sigmoid(M_q) (thesis eq. 4.4);
* ``mask only`` - argmax_c sigmoid(M_c), dropping the class probabilities;
* ``oracle presence`` - sigmoid(M_c) multiplied by 1 for the classes present in the ground truth
  and 0 for the others: the ceiling of a perfect class head on these masks;

and prints, per class, the mean probability the class head gives "query c is class c" on the
images where c is present and where it is absent. A class head that says "present" everywhere
(equal means) contributes nothing; the gap between ``standard`` and ``oracle presence`` is what a
better one could add.

    python benchmarks/atm_diagnose.py runs/segvit_ft/last.pt
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from segcli.api import build_datasets, load_checkpoint  # noqa: E402
from segcli.data.transforms import eval_view  # noqa: E402
from segcli.engine.evaluator import SegEvaluator  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint")
    args = parser.parse_args()
    loaded = load_checkpoint(args.checkpoint)
    model, classes = loaded.model, loaded.meta.get("classes")
    num_classes = loaded.meta["num_classes"]
    if not hasattr(model, "decode_head") or not hasattr(model.decode_head, "class_queries"):
        sys.exit(f"{args.checkpoint}: not a SegViT (ATM) model")
    (val,) = build_datasets(loaded.recipe, splits=("val",))
    ignore = val.ignore_index
    evaluators = {name: SegEvaluator(num_classes, classes, ignore_index=ignore)
                  for name in ("standard", "mask only", "oracle presence")}
    own_prob: dict[bool, list[list[float]]] = {True: [[] for _ in range(num_classes)],
                                               False: [[] for _ in range(num_classes)]}
    with torch.inference_mode():
        for i in range(len(val)):
            sample = val[i]
            label = sample["label"].numpy()
            data = loaded.recipe.data  # the val split yields uint8 images; normalise at their own size
            image = eval_view(sample["image"][None], tuple(sample["image"].shape[-2:]), data.mean, data.std)
            outputs = model.decode_head(model.backbone(image))
            size = tuple(label.shape)
            standard = model.decode_head.seg_logits(outputs, size)[0].argmax(0)
            masks = F.interpolate(outputs["pred_masks"], size=size, mode="bilinear", align_corners=False)[0].sigmoid()
            present = np.zeros(num_classes, dtype=bool)
            present[np.unique(label[label != ignore])] = True
            oracle = (masks * torch.as_tensor(present, dtype=masks.dtype)[:, None, None]).argmax(0)
            for name, pred in (("standard", standard), ("mask only", masks.argmax(0)), ("oracle presence", oracle)):
                evaluators[name].process(pred, sample["label"])
            probs = outputs["pred_logits"][0].softmax(-1).diagonal()  # [K]: P(query c says class c)
            for c in range(num_classes):
                own_prob[bool(present[c])][c].append(float(probs[c]))
    print(f"{args.checkpoint}: {len(val)} validation images")
    for name, evaluator in evaluators.items():
        print(f"  {name:16s} mIoU {evaluator.evaluate()['mIoU']:6.2f}")
    print(f"  {'class':14s} {'P(present) where present':>26s} {'where absent':>14s}")
    for c in range(num_classes):
        name = classes[c] if classes else str(c)
        row = [f"{np.mean(v):.2f} (n={len(v)})" if v else "-" for v in (own_prob[True][c], own_prob[False][c])]
        print(f"  {name:14s} {row[0]:>26s} {row[1]:>14s}")


if __name__ == "__main__":
    main()
