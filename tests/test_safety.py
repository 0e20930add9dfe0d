"""Nothing a user has is lost (issue #14): predictions never replace inputs or an earlier run unasked,
training never replaces a run unasked, a failed --resume writes nothing, bad inputs are refused
before anything is written. Through the API; the CLI's rendering of the same is in test_cli.py."""
from __future__ import annotations

import json
import shutil

import cv2
import numpy as np
import pytest
import torch

from conftest import REPO, overrides_dict

from segcli import api
from segcli.errors import SegcliError

SETR = REPO / "recipes" / "tiny" / "setr.yaml"


def _snapshot(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


def _copy_run(setr_run, tmp_path):
    work, _ = setr_run
    return shutil.copytree(work, tmp_path / "run")


# --------------------------------------------------------------------------- predict


def test_predict_never_writes_over_an_input_image(setr_run, synth_root, tmp_path):
    work, _ = setr_run
    images = shutil.copytree(synth_root / "images" / "val", tmp_path / "images")
    before = _snapshot(images)  # PNGs: <stem>.png of each is the image itself
    for overwrite in (False, True):  # not even with overwrite
        with pytest.raises(SegcliError, match="input image would be overwritten") as err:
            api.predict([str(images)], work / "best.pt", out_dir=images, device="cpu", overwrite=overwrite)
        assert err.value.where == str(images / sorted(before)[0])
        assert _snapshot(images) == before


def test_predict_refuses_an_earlier_run_unless_overwrite(setr_run, synth_root, tmp_path):
    work, _ = setr_run
    out = tmp_path / "pred"
    api.predict([str(synth_root / "images" / "val")], work / "best.pt", out_dir=out, device="cpu")
    first = _snapshot(out)
    with pytest.raises(SegcliError, match="earlier run") as err:
        api.predict([str(synth_root / "images" / "val")], work / "best.pt", out_dir=out, overlay=True, device="cpu")
    assert "--overwrite" in str(err.value) and _snapshot(out) == first  # nothing written, not even the overlays
    result = api.predict([str(synth_root / "images" / "val")], work / "best.pt", out_dir=out, overlay=True,
                         device="cpu", overwrite=True)
    assert len(result.written) == 3 * len(list((synth_root / "images" / "val").iterdir()))


# --------------------------------------------------------------------------- train into a work dir


def test_training_into_an_earlier_run_is_refused_unless_resume_or_overwrite(setr_run, synth_root, tmp_path):
    run = _copy_run(setr_run, tmp_path)
    before = _snapshot(run)
    recipe = api.load_recipe(SETR, overrides_dict(synth_root, **{"train.max_iters": 1, "train.eval_interval": 1}))
    with pytest.raises(SegcliError, match="earlier run") as err:
        api.train(recipe, work_dir=run, device="cpu")
    assert all(flag in str(err.value) for flag in ("--resume", "--work-dir", "--overwrite"))
    assert _snapshot(run) == before
    result = api.train(recipe, work_dir=run, device="cpu", overwrite=True)
    assert result.iterations == 1
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert max(r["iter"] for r in records) == 1  # the old run's metrics are gone, not mixed in


def test_a_failed_resume_writes_nothing(setr_run, synth_root, tmp_path):
    run = _copy_run(setr_run, tmp_path)
    before = _snapshot(run)
    other = api.load_recipe(SETR, overrides_dict(synth_root, **{"model.decode_head.channels": 64}))
    with pytest.raises(SegcliError, match="differs at model.decode_head.channels") as err:
        api.train(other, work_dir=run, device="cpu", resume=True)
    assert "recipe.yaml" in str(err.value)
    assert _snapshot(run) == before  # recipe.yaml was rewritten before the check
    empty = tmp_path / "empty"
    with pytest.raises(SegcliError, match="nothing to resume"):
        api.train(other, work_dir=empty, device="cpu", resume=True)
    assert not empty.exists()


def test_resume_continues_the_runs_own_recipe(setr_run, synth_root, tmp_path):
    """The bug: --resume trained with the command line's recipe and --set (another dataset, silently)
    and rewrote the run's recipe.yaml. Now the run's recipe.yaml is the recipe; only the run's length
    and logging may change, and anything else is refused by name."""
    run = _copy_run(setr_run, tmp_path)
    before = _snapshot(run)
    other_data = shutil.copytree(synth_root, tmp_path / "other_data")
    for change in ({"data.root": other_data}, {"train.optimizer.lr": 0.5}, {"data.type": "folder"}):
        other = api.load_recipe(SETR, overrides_dict(synth_root, **change))
        with pytest.raises(SegcliError, match=f"differs at {next(iter(change))}"):
            api.train(other, work_dir=run, device="cpu", resume=True)
        assert _snapshot(run) == before
    with pytest.raises(SegcliError, match="--overwrite"):
        api.train(SETR, work_dir=run, overrides=overrides_dict(synth_root), device="cpu", resume=True, overwrite=True)
    assert _snapshot(run) == before
    longer = api.load_recipe(SETR, overrides_dict(synth_root, **{"train.max_iters": 5, "train.log_interval": 5}))
    result = api.train(longer, work_dir=run, device="cpu", resume=True)
    assert result.iterations == 5
    saved = api.load_recipe(run / "recipe.yaml")
    assert saved.train.max_iters == 5 and saved.train.log_interval == 5  # the allowed changes are recorded


def test_a_bad_validation_mask_is_found_before_training(synth_root, tmp_path):
    root = shutil.copytree(synth_root, tmp_path / "data")
    mask_path = sorted((root / "masks" / "val").iterdir())[1]
    mask = cv2.imread(str(mask_path), cv2.IMREAD_UNCHANGED)
    mask[:2, :2] = 77
    cv2.imwrite(str(mask_path), mask)
    events = []
    recipe = api.load_recipe(SETR, overrides_dict(root, **{"train.warmup_iters": 10}))
    with pytest.raises(SegcliError, match="outside") as err:
        api.train(recipe, work_dir=tmp_path / "run", device="cpu", callback=lambda e, i: events.append((e, i)))
    assert mask_path.name in str(err.value)
    names = [e for e, _ in events]
    assert "step" not in names and not (tmp_path / "run").exists()
    start = dict(events)["start"]  # the banner comes first, then the warning
    assert names[:2] == ["start", "warning"] and start["train_images"] == 8 and start["val_images"] == 3
    assert start["device"] == "cpu" and start["params_m"] > 0 and "warmup_iters" in dict(events)["warning"]["message"]


# --------------------------------------------------------------------------- checkpoints


def test_best_checkpoint_holds_weights_only_and_still_serves(setr_run, synth_root, tmp_path):
    work, _ = setr_run
    best = torch.load(work / "best.pt", weights_only=True)
    last = torch.load(work / "last.pt", weights_only=True)
    assert not {"optimizer", "scaler", "rng"} & set(best) and {"optimizer", "scaler", "rng"} <= set(last)
    assert (work / "best.pt").stat().st_size < (work / "last.pt").stat().st_size
    assert api.evaluate(work / "best.pt", device="cpu", limit=1)["num_images"] == 1
    image = next((synth_root / "images" / "val").iterdir())
    assert api.predict([str(image)], work / "best.pt", out_dir=tmp_path / "p", device="cpu").written
    # prune reads what best.pt holds (version, recipe, meta, model): test_dtop prunes such payloads
    with pytest.raises(SegcliError, match="not a resumable checkpoint"):
        run = _copy_run(setr_run, tmp_path)
        shutil.copy(run / "best.pt", run / "last.pt")
        api.train(api.load_recipe(SETR, overrides_dict(synth_root)), work_dir=run, device="cpu", resume=True)


def test_keep_checkpoints_keeps_the_most_recent(synth_root, tmp_path):
    recipe = api.load_recipe(SETR, overrides_dict(synth_root, **{"train.keep_checkpoints": 2,
                                                                  "train.checkpoint_interval": 1,
                                                                  "train.eval_interval": 4}))
    api.train(recipe, work_dir=tmp_path / "run", device="cpu")
    assert sorted(p.name for p in (tmp_path / "run").glob("iter_*.pt")) == ["iter_3.pt", "iter_4.pt"]
    assert torch.load(tmp_path / "run" / "iter_3.pt", weights_only=True)["iteration"] == 3


# --------------------------------------------------------------------------- bad inputs


def test_a_binary_file_where_a_recipe_goes(setr_run, tmp_path):
    work, _ = setr_run
    (tmp_path / "photo.jpg").write_bytes(b"\xff\xd8\xff\xe0\x00\x10JFIF\x00\x01\xfe\xff")
    for path in (work / "best.pt", tmp_path / "photo.jpg"):
        with pytest.raises(SegcliError, match="not a text recipe; is it a checkpoint"):
            api.load_recipe(path)
    with pytest.raises(SegcliError, match="not a text recipe"):
        api.evaluate(work / "best.pt", recipe=tmp_path / "photo.jpg", device="cpu")
    # flops takes the checkpoint itself: its embedded recipe
    from_checkpoint = api.flops(work / "best.pt", shape=(64, 64))
    from_recipe = api.flops(api.load_checkpoint(work / "best.pt").recipe, shape=(64, 64))
    assert from_checkpoint == from_recipe


def test_an_unknown_recipe_path_suggests_a_shipped_one():
    with pytest.raises(SegcliError, match="did you mean 'recipes/nrd_r50_cityscapes.yaml'"):
        api.load_recipe("recipes/nrd_r50_cityscape.yaml")


@pytest.mark.parametrize("shape", [(0, 512), (64, -1)])
def test_flops_refuses_an_empty_shape(shape):
    with pytest.raises(SegcliError) as err:
        api.flops(SETR, shape=shape, overrides=["model.backbone.patch_size=16"])
    assert err.value.where == "--shape"


@pytest.mark.parametrize("option", [{"trimap": -1}, {"trimap": 0}, {"limit": 0}])
def test_eval_refuses_empty_trimap_and_limit(setr_run, option):
    work, _ = setr_run
    with pytest.raises(SegcliError) as err:
        api.evaluate(work / "best.pt", device="cpu", **option)
    assert err.value.where == "--" + next(iter(option))


# --------------------------------------------------------------------------- predict: what it is given


def test_predict_recurses_into_sub_folders_and_keeps_them_in_the_names(setr_run, synth_root, tmp_path):
    """The bug: a folder holding only sub-folders (Cityscapes' val/<city>/) gave nothing, exit 0."""
    work, _ = setr_run
    val = tmp_path / "val"
    for city in ("aachen", "bonn"):
        (val / city).mkdir(parents=True)
        shutil.copyfile(synth_root / "images" / "val" / "00000.png", val / city / f"{city}_000000_leftImg8bit.png")
    result = api.predict([str(val)], work / "best.pt", out_dir=tmp_path / "out", device="cpu")
    assert sorted(p.name for p in result.written) == [
        "aachen_aachen_000000_leftImg8bit.png", "aachen_aachen_000000_leftImg8bit_color.png",
        "bonn_bonn_000000_leftImg8bit.png", "bonn_bonn_000000_leftImg8bit_color.png"]


def test_predict_without_images_and_show_pruning_without_pruning_are_refused(setr_run, tmp_path):
    work, _ = setr_run
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    with pytest.raises(SegcliError, match="no images found"):
        api.predict([str(tmp_path / "empty")], work / "best.pt", out_dir=tmp_path / "out", device="cpu")
    image = tmp_path / "x.png"
    cv2.imwrite(str(image), np.zeros((32, 32, 3), np.uint8))
    with pytest.raises(SegcliError, match="prunes no tokens"):
        api.predict([str(image)], work / "best.pt", out_dir=tmp_path / "out", device="cpu", show_pruning=True)
    assert not (tmp_path / "out").exists()  # refused before anything was written


# --------------------------------------------------------------------------- eval: what MMSegmentation users keep


def test_eval_show_dir_confusion_and_aug_test(setr_run, synth_root, tmp_path):
    work, _ = setr_run
    plain = api.evaluate(work / "best.pt", device="cpu", limit=2)
    result = api.evaluate(work / "best.pt", device="cpu", limit=2, show_dir=tmp_path / "show",
                          confusion=tmp_path / "confusion.png")
    assert result["mIoU"] == plain["mIoU"] and "confusion" not in result
    shown = sorted((tmp_path / "show").iterdir())
    image = cv2.imread(str(synth_root / "images" / "val" / "00000.png"))
    assert [p.name for p in shown] == ["00000.png", "00001.png"]
    assert cv2.imread(str(shown[0])).shape[1] > image.shape[1]  # the overlay and its key
    picture = cv2.imread(str(tmp_path / "confusion.png"))
    assert picture is not None and picture.shape[0] > 100
    with pytest.raises(SegcliError, match="earlier run"):  # nothing replaced unasked
        api.evaluate(work / "best.pt", device="cpu", limit=1, confusion=tmp_path / "confusion.png")
    with pytest.raises(SegcliError, match="inside the dataset folder"):
        api.evaluate(work / "best.pt", device="cpu", limit=1, show_dir=synth_root / "images" / "val")
    tta = api.evaluate(work / "best.pt", device="cpu", limit=1, aug_test=True)
    assert 0 <= tta["mIoU"] <= 100


def test_aug_test_is_mmsegmentations():
    from segcli.build import AUG_TEST_RATIOS, with_aug_test

    recipe = with_aug_test(api.load_recipe(SETR))
    assert recipe.test.scales == AUG_TEST_RATIOS == (0.5, 0.75, 1.0, 1.25, 1.5, 1.75) and recipe.test.flip
