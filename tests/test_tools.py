"""The helper workflows: data check (every problem at once), recipe show, plot."""
from __future__ import annotations

import shutil

import cv2
import numpy as np
import pytest

from conftest import REPO, overrides_dict

from segcli import api
from segcli.errors import SegcliError

SETR = REPO / "recipes" / "tiny" / "setr.yaml"


def _folder(root):
    return ["data.type=folder", f"data.root={root}"]


def test_data_check_reports_every_problem_and_the_histogram(synth_root, tmp_path):
    good = api.check_data(SETR, _folder(synth_root))
    assert good.ok and good.images == {"train": 8, "val": 3} and sum(good.pixels) == 11 * 64 * 64
    root = shutil.copytree(synth_root, tmp_path / "bad", ignore=shutil.ignore_patterns("*.json"))
    masks = sorted((root / "masks" / "train").iterdir())
    label = cv2.imread(str(masks[0]), cv2.IMREAD_UNCHANGED)
    label[:2, :2] = 40
    cv2.imwrite(str(masks[0]), label)
    cv2.imwrite(str(masks[1]), np.zeros((30, 30), np.uint8))
    sorted((root / "images" / "train").iterdir())[2].write_bytes(b"junk")
    cv2.imwrite(str(root / "masks" / "val" / "orphan.png"), np.zeros((4, 4), np.uint8))
    seen = []
    report = api.check_data(SETR, _folder(root), progress=lambda split, done, total: seen.append((split, done, total)))
    problems = dict(report.problems)
    assert not report.ok and len(report.problems) == 4
    assert "outside" in problems[str(masks[0])] and "30x30" in problems[str(masks[1])]
    assert "cannot read image" in problems[str(sorted((root / "images" / "train").iterdir())[2])]
    assert "no image" in problems[str(root / "masks" / "val" / "orphan.png")]
    assert seen[-1] == ("train", 8, 8)


def test_recipe_show_is_what_train_writes(setr_run, synth_root):
    work, _ = setr_run
    assert api.resolved_recipe_yaml(SETR, overrides_dict(synth_root)) == (work / "recipe.yaml").read_text()


def test_plot_draws_the_curves(setr_run, tmp_path):
    work, _ = setr_run
    out = api.plot_run(work, out=tmp_path / "curves.png")
    image = cv2.imread(str(out))
    assert image is not None and image.shape[0] > 100 and (image < 250).any()
    with pytest.raises(SegcliError, match="--overwrite"):
        api.plot_run(work, out=out)
    with pytest.raises(SegcliError, match="no metrics.jsonl"):
        api.plot_run(tmp_path)
