"""Metrics against hand-computed values (ignore pixels, absent classes, predicted-only classes)."""
import math

import torch

from segcli.engine.evaluator import SegEvaluator, class_boundary_band


def test_hand_computed_miou_with_ignore_and_absent_classes():
    # 4 classes; class 3 absent everywhere (NaN, skipped); class 2 predicted but absent from GT (IoU 0, counts)
    label = torch.tensor([[0, 0, 1, 1],
                          [0, 0, 1, 255],
                          [1, 1, 1, 255]])
    pred = torch.tensor([[0, 1, 1, 1],
                         [0, 0, 2, 0],
                         [1, 1, 1, 3]])
    ev = SegEvaluator(4, ["a", "b", "c", "d"])
    ev.process(pred, label)
    m = ev.evaluate()
    # class 0: I=3, G=4, P=3 -> U=4 -> 0.75 ; class 1: I=5, G=6, P=6 -> U=7 -> 5/7 ; class 2: I=0,G=0,P=1 -> 0
    # class 3: predicted only on an ignore pixel -> dropped -> absent -> NaN
    ious = [r["IoU"] for r in m["per_class"]]
    assert math.isclose(ious[0], 75.0)
    assert math.isclose(ious[1], 500 / 7)
    assert ious[2] == 0.0
    assert ious[3] is None
    assert math.isclose(m["mIoU"], (75.0 + 500 / 7 + 0.0) / 3)
    assert math.isclose(m["aAcc"], 8 / 10 * 100)
    assert math.isclose(m["mAcc"], (75.0 + 500 / 6) / 2)  # Acc NaN for classes 2, 3 (no GT)


def test_accumulates_over_images_not_per_image_mean():
    ev = SegEvaluator(2)
    ev.process(torch.tensor([[0, 0]]), torch.tensor([[0, 0]]))  # image 1: perfect class 0
    ev.process(torch.tensor([[0, 1, 1, 1]]), torch.tensor([[1, 1, 1, 1]]))  # image 2
    m = ev.evaluate()
    # class 0: I=2, G=2, P=3 -> 2/3 ; class 1: I=3, G=4, P=3 -> 3/4
    assert math.isclose(m["mIoU"], (200 / 3 + 75) / 2)


def test_trimap_band():
    label = torch.zeros(1, 8, 8, dtype=torch.long)
    label[:, :, 4:] = 1
    label[:, 0, :] = 255  # an ignore row: its border with classes is not a class boundary
    band = class_boundary_band(label, 1)
    assert band[0, 3:, 3:5].all() and not band[0, 3:, :3].any() and not band[0, 3:, 5:].any()
    band2 = class_boundary_band(label, 2)
    assert band2[0, 3:, 2:6].all() and not band2[0, 3:, :2].any()
    assert not band2[0, 0].any()  # ignore pixels never count
    ev = SegEvaluator(2, trimap_width=1)
    pred = label.clone()
    pred[pred == 255] = 0
    pred[:, :, 4] = 0  # errors exactly on the boundary
    ev.process(pred, label)
    m = ev.evaluate()
    assert m["trimap_mIoU"] < m["mIoU"]


def test_mean_over_a_subset_of_classes():
    """Classes outside ``mean_classes`` keep their pixels (false positives of what is predicted
    there) but leave the means: a continual-learning step scored on the classes it has learnt."""
    label = torch.tensor([[0, 0, 1, 2]])
    pred = torch.tensor([[0, 0, 1, 0]])  # the class-2 pixel is predicted 0
    ev = SegEvaluator(3, ["a", "b", "c"], mean_classes=[0, 1])
    ev.process(pred, label)
    res = ev.evaluate()
    iou = [row["IoU"] for row in res["per_class"]]
    assert iou[0] == 2 / 3 * 100 and iou[1] == 100.0 and iou[2] is None
    assert math.isclose(res["mIoU"], (200 / 3 + 100) / 2)
    assert res["per_class"][2]["Acc"] is None and math.isclose(res["aAcc"], 75.0)
