"""``segcli eval --format-only``: label maps of a split without masks, in the dataset's own ids.

Checked against ``segcli predict`` on the same images (its ``<stem>.png`` are the class ids), so
the two commands must agree; a dataset with ``reduce_zero_label`` writes ids + 1 (what ADE20K's
benchmark reads), Cityscapes its label ids. The files are what ``eval`` scores: both run one loop
(``evaluate_model``), checked with ``--aug-test`` and slide windows and on a split without masks.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from segcli import api
from segcli.data import build_dataset
from segcli.data.classes import CITYSCAPES_CLASSES, CITYSCAPES_LABEL_IDS
from segcli.engine.evaluate import evaluate_model
from segcli.engine.evaluator import SegEvaluator
from segcli.recipe import DataConfig
from test_token_stats import pruned_setup


@pytest.fixture()
def test_split(synth_root, tmp_path):
    """A copy of the synthetic dataset with a 'test' split: images only, no masks folder."""
    root = shutil.copytree(synth_root, tmp_path / "data")
    shutil.copytree(root / "images" / "val", root / "images" / "test")
    assert not (root / "masks" / "test").exists()
    return root


def _read(path: Path) -> np.ndarray:
    return cv2.imread(str(path), cv2.IMREAD_UNCHANGED)


def test_format_only_writes_the_predicted_ids_of_an_unlabelled_split(setr_run, test_split, tmp_path):
    checkpoint = setr_run[0] / "last.pt"
    out = tmp_path / "submission"
    result = api.evaluate(checkpoint, overrides=[f"data.root={test_split}"], format_only=out, split="test")
    images = sorted((test_split / "images" / "test").iterdir())
    assert result["num_images"] == len(images) == 3 and result["split"] == "test"
    assert "mIoU" not in result  # no metrics: there is no ground truth
    predicted = api.predict([str(p) for p in images], checkpoint=checkpoint, out_dir=tmp_path / "predict")
    assert predicted.written
    for image in images:
        written = _read(out / f"{image.stem}.png")
        assert written.dtype == np.uint8 and written.shape == cv2.imread(str(image)).shape[:2]
        np.testing.assert_array_equal(written, _read(tmp_path / "predict" / f"{image.stem}.png"))


def test_format_only_writes_the_masks_own_ids_under_reduce_zero_label(setr_run, test_split, tmp_path):
    checkpoint = setr_run[0] / "last.pt"
    sets = [f"data.root={test_split}"]
    api.evaluate(checkpoint, overrides=sets, format_only=tmp_path / "plain", split="test", limit=1)
    api.evaluate(checkpoint, overrides=[*sets, "data.reduce_zero_label=true"], format_only=tmp_path / "shifted",
                 split="test", limit=1)
    (plain,) = sorted((tmp_path / "plain").iterdir())
    shifted = _read(tmp_path / "shifted" / plain.name)
    np.testing.assert_array_equal(shifted.astype(int), _read(plain).astype(int) + 1)  # class c is stored as c + 1


def test_cityscapes_test_split_needs_no_masks_and_maps_train_ids_to_label_ids(tmp_path):
    city = tmp_path / "cityscapes" / "leftImg8bit" / "test" / "berlin"
    city.mkdir(parents=True)
    cv2.imwrite(str(city / "berlin_000000_000019_leftImg8bit.png"), np.zeros((8, 16, 3), np.uint8))
    cfg = DataConfig(type="cityscapes", root=str(tmp_path / "cityscapes"), val_split="test")
    dataset = build_dataset(cfg, "val", labelled=False)
    assert dataset.samples == [(str(city / "berlin_000000_000019_leftImg8bit.png"), None)]
    assert not dataset.labelled
    image, label = dataset.read(0)
    assert image.shape == (8, 16, 3) and label is None
    ids = dict(zip(CITYSCAPES_CLASSES, dataset.output_lut[:19].tolist()))
    # cityscapesScripts' labels.py: road 7, sky 23, person 24, bicycle 33
    assert (ids["road"], ids["sky"], ids["person"], ids["bicycle"]) == (7, 23, 24, 33)
    assert dataset.output_lut[:19].tolist() == list(CITYSCAPES_LABEL_IDS)
    with pytest.raises(Exception, match="mask folder not found"):
        build_dataset(cfg, "val")  # a labelled read still needs the masks


def test_cityscapes_label_ids_match_cityscapesscripts():
    labels = pytest.importorskip("cityscapesscripts.helpers.labels")
    expected = [labels.trainId2label[t].id for t in range(19)]
    assert list(CITYSCAPES_LABEL_IDS) == expected


@pytest.mark.parametrize("args, says", [
    (["--confusion", "c.png"], "--confusion"),
    (["--trimap", "3"], "--trimap"),
    (["--flops"], "--flops"),
])
def test_format_only_refuses_what_needs_ground_truth(cli, setr_run, test_split, tmp_path, args, says):
    res = cli("eval", setr_run[0] / "last.pt", "--set", f"data.root={test_split}", "--format-only",
              tmp_path / "out", "--split", "test", *args)
    assert res.exit_code == 2 and says in res.output and "Traceback" not in res.output
    assert not (tmp_path / "out").exists()


def test_split_without_format_only_is_refused(cli, setr_run, tmp_path):
    res = cli("eval", setr_run[0] / "last.pt", "--split", "test")
    assert res.exit_code == 2 and "--split" in res.output


def test_format_only_cli_says_what_it_wrote(cli, setr_run, test_split, tmp_path):
    res = cli("eval", setr_run[0] / "last.pt", "--set", f"data.root={test_split}", "--format-only",
              tmp_path / "out", "--split", "test", "--limit", "2")
    assert res.exit_code == 0, res.output
    assert "wrote 2 label map(s) of split 'test'" in " ".join(res.output.split())
    assert len(list((tmp_path / "out").iterdir())) == 2
    again = cli("eval", setr_run[0] / "last.pt", "--set", f"data.root={test_split}", "--format-only",
                tmp_path / "out", "--split", "test", "--limit", "2")
    assert again.exit_code == 2 and "--overwrite" in again.output  # an earlier run's files are kept


# --------------------------------------------------------------------------- one loop for metrics and files

SLIDE = ["test.mode=slide", "test.crop_size=[32,32]", "test.stride=[16,16]"]  # 3 x 3 windows of a 64-px image


@pytest.mark.parametrize("aug_test, sets", [(True, []), (False, SLIDE)], ids=["aug-test", "slide"])
def test_format_only_writes_what_eval_scores(setr_run, test_split, tmp_path, aug_test, sets):
    """The 'test' split holds the 'val' images: the files written are the predictions eval scores
    (the same overlays per image, and scored against the val masks they give eval's metrics), under
    the recipe's test settings and --aug-test; and those settings change the files."""
    checkpoint = setr_run[0] / "last.pt"
    overrides = [f"data.root={test_split}", *sets]
    metrics = api.evaluate(checkpoint, overrides=overrides, aug_test=aug_test, show_dir=tmp_path / "eval_show")
    api.evaluate(checkpoint, overrides=overrides, aug_test=aug_test, format_only=tmp_path / "ids", split="test",
                 show_dir=tmp_path / "ids_show")
    api.evaluate(checkpoint, overrides=[f"data.root={test_split}"], format_only=tmp_path / "plain", split="test")
    stems = [p.stem for p in sorted((test_split / "images" / "val").iterdir())]
    assert sorted(p.stem for p in (tmp_path / "ids").iterdir()) == stems
    for stem in stems:
        assert (tmp_path / "ids_show" / f"{stem}.png").read_bytes() == (tmp_path / "eval_show" / f"{stem}.png").read_bytes()
    assert any(not np.array_equal(_read(tmp_path / "ids" / f"{stem}.png"), _read(tmp_path / "plain" / f"{stem}.png"))
               for stem in stems)  # the settings matter here, so a path that ignored them would fail above
    val = build_dataset(DataConfig(type="folder", root=str(test_split)), "val")
    evaluator = SegEvaluator(val.num_classes, val.classes)
    for index, (image, _) in enumerate(val.samples):
        predicted = torch.from_numpy(_read(tmp_path / "ids" / f"{Path(image).stem}.png").astype(np.int64))
        evaluator.process(predicted[None], torch.from_numpy(val.read(index)[1].astype(np.int64))[None])
    scored = evaluator.evaluate()
    for key in ("mIoU", "mAcc", "aAcc"):
        assert scored[key] == pytest.approx(metrics[key], rel=1e-12)


def test_the_loop_runs_a_split_without_masks(synth_root):
    """``evaluate_model`` on the 'val' split read without masks: the labels and token counts of the
    labelled run, no metrics (a pruning DToP with slide windows, so that the counts are not trivial)."""
    recipe, val_set, model = pruned_setup(synth_root, "slide")
    unlabelled = build_dataset(recipe.data, "val", labelled=False)
    transform = unlabelled.transform
    runs = []
    for dataset in (val_set, unlabelled):
        seen = {}
        result = evaluate_model(model, dataset, recipe, torch.device("cpu"), limit=2,
                                on_image=lambda index, labels: seen.setdefault(index, labels.clone()))
        runs.append((result, seen))
    (labelled, labelled_seen), (bare, bare_seen) = runs
    assert sorted(bare_seen) == sorted(labelled_seen) == [0, 1]
    for index in labelled_seen:
        assert torch.equal(bare_seen[index], labelled_seen[index])
    assert "mIoU" in labelled and not {"mIoU", "mAcc", "aAcc", "per_class"} & set(bare)
    assert bare["num_images"] == 2 and 0 < bare["kept_fraction"] < 1
    assert bare["kept_fraction"] == labelled["kept_fraction"] and bare["exit_fraction"] == labelled["exit_fraction"]
    assert unlabelled.transform is transform  # the caller's dataset is left as it was
    with pytest.raises(ValueError, match="masks"):
        evaluate_model(model, unlabelled, recipe, torch.device("cpu"), limit=1, keep_confusion=True)
