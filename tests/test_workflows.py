"""The workflows end to end through the API on real files: train -> eval -> predict -> flops, resume,
wrong checkpoints (the CLI's own parsing and rendering are in test_cli.py)."""
from __future__ import annotations

import json

import cv2
import numpy as np
import pytest
import torch

from conftest import REPO, overrides_dict, setr_tiny_by_hand

import segcli
from segcli import api
from segcli.errors import SegcliError
from segcli.workflows.predict import output_stems

SETR = REPO / "recipes" / "tiny" / "setr.yaml"


def _losses(path):
    return [r["loss"] for r in map(json.loads, path.read_text().splitlines()) if "loss" in r]


def test_train_writes_the_run(setr_run):
    work, result = setr_run
    for name in ("last.pt", "best.pt", "metrics.jsonl", "recipe.yaml"):
        assert (work / name).is_file(), name
    records = [json.loads(line) for line in (work / "metrics.jsonl").read_text().splitlines()]
    assert [r["iter"] for r in records if "mIoU" in r] == [2, 4]
    assert result.iterations == 4 and result.best == work / "best.pt"


def test_evaluate_reports_metrics_trimap_and_gflops(setr_run):
    work, _ = setr_run
    metrics = api.evaluate(work / "best.pt", device="cpu", trimap=3, flops=True)
    for key in ("mIoU", "mAcc", "aAcc", "per_class", "trimap_mIoU", "gflops_avg"):
        assert key in metrics
    assert len(metrics["per_class"]) == 8
    # every val image is 64x64: the average is that size's count (SETR recipe: patch 16 here)
    count = setr_tiny_by_hand(64, 64, patch=16, img_size=64)
    assert metrics["gflops_avg"] == pytest.approx(count.flops / 1e9, rel=1e-9)


def test_predict_writes_labels_and_reports_unreadable_files(setr_run, synth_root, tmp_path):
    work, _ = setr_run
    images = synth_root / "images" / "val"
    (tmp_path / "broken.jpg").write_bytes(b"not an image")
    out = tmp_path / "pred"
    result = api.predict([str(images), str(tmp_path / "broken.jpg")], work / "best.pt", out_dir=out, overlay=True,
                         device="cpu")
    assert [path for path, _ in result.failed] == [str(tmp_path / "broken.jpg")]  # reported, the others written
    for image in images.iterdir():
        label = cv2.imread(str(out / f"{image.stem}.png"), cv2.IMREAD_UNCHANGED)
        assert label is not None and label.shape == (64, 64) and label.max() < 8
        assert (out / f"{image.stem}_color.png").is_file() and (out / f"{image.stem}_overlay.png").is_file()


def test_same_named_inputs_get_distinct_outputs(tmp_path):
    paths = [tmp_path / "a" / "x.png", tmp_path / "b" / "x.png", tmp_path / "a" / "x.jpg"]
    # twins in one folder get their extension, same stems in other folders their folder's name
    assert output_stems(paths) == ["x_png", "b_x", "x_jpg"]


def test_flops_of_a_recipe_equal_a_hand_count():
    result = api.flops(SETR, shape=(64, 96), overrides=["model.backbone.patch_size=16"])
    count = setr_tiny_by_hand(64, 96, patch=16)
    assert result["shape"] == [64, 96]
    assert result["gflops"] == pytest.approx(count.flops / 1e9, rel=1e-9)
    assert result["params_m"] == pytest.approx(count.params / 1e6, rel=1e-9)


def _sigint_at(iteration: int):
    """A callback that sends this process a real SIGINT (a terminal's Ctrl-C) after ``iteration``."""
    import os
    import signal

    def callback(event, info):
        if event == "step" and info["iter"] == iteration:
            os.kill(os.getpid(), signal.SIGINT)

    return callback


@pytest.fixture(scope="module")
def uninterrupted(synth_root, tmp_path_factory):
    """(recipe, work dir) of the 6-iteration run the Ctrl-C tests resume towards, trained once."""
    recipe = api.load_recipe(SETR, overrides_dict(synth_root, **{"train.max_iters": 6, "train.eval_interval": 3,
                                                                  "model.backbone.drop_path_rate": 0.2}))
    full = tmp_path_factory.mktemp("uninterrupted") / "full"
    api.train(recipe, work_dir=full, device="cpu")
    return recipe, full


@pytest.mark.parametrize("stop", [4, 3])  # 3: Ctrl-C lands right before that iteration's evaluation
def test_ctrl_c_then_resume_is_the_uninterrupted_run(uninterrupted, tmp_path, stop):
    """The bug: Ctrl-C saved state from the middle of an iteration (here: before its evaluation,
    whose loader draws from the RNG), so the resumed run's losses drifted from the uninterrupted one."""
    recipe, full = uninterrupted
    part = tmp_path / "part"
    with pytest.raises(KeyboardInterrupt):
        api.train(recipe, work_dir=part, device="cpu", callback=_sigint_at(stop))
    assert torch.load(part / "last.pt", weights_only=True)["iteration"] == stop
    api.train(recipe, work_dir=part, device="cpu", resume=True)
    assert _losses(part / "metrics.jsonl") == _losses(full / "metrics.jsonl")  # bit for bit
    assert (part / "metrics.jsonl").read_text().count("mIoU") == (full / "metrics.jsonl").read_text().count("mIoU")
    a = torch.load(full / "last.pt", weights_only=True)["model"]
    b = torch.load(part / "last.pt", weights_only=True)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_checkpoint_of_another_model_is_refused(setr_run):
    work, _ = setr_run
    with pytest.raises(SegcliError, match="does not fit") as err:
        api.evaluate(work / "last.pt", overrides=["model.decode_head.channels=64"], device="cpu")
    assert "decode_head" in str(err.value)


def test_segmenter_labels_equal_predict_and_probabilities_sum_to_one(setr_run, synth_root, tmp_path):
    from segcli.data import read_image

    work, _ = setr_run
    segmenter = segcli.Segmenter(work / "best.pt", device="cpu")
    images = sorted((synth_root / "images" / "val").iterdir())
    api.predict([str(images[0])], work / "best.pt", out_dir=tmp_path / "pred", device="cpu")
    written = cv2.imread(str(tmp_path / "pred" / f"{images[0].stem}.png"), cv2.IMREAD_UNCHANGED)
    labels = segmenter(read_image(str(images[0])))
    assert labels.shape == (64, 64) and np.array_equal(labels, written)  # the same pipeline as predict
    batch = segmenter([images[0], read_image(str(images[1]))])  # paths and arrays, a list in, a list out
    assert len(batch) == 2 and np.array_equal(batch[0], labels)
    probs = segmenter(images[0], probabilities=True)
    assert probs.shape == (len(segmenter.classes), 64, 64) and np.allclose(probs.sum(0), 1.0, rtol=1e-5)
    assert np.array_equal(probs.argmax(0), labels)
    with pytest.raises(SegcliError, match="RGB uint8"):
        segmenter(np.zeros((8, 8), np.float32))


def test_overlay_has_a_legend_and_an_opacity(setr_run, synth_root, tmp_path):
    from segcli.data import read_image

    work, _ = setr_run
    image = sorted((synth_root / "images" / "val").iterdir())[0]
    api.predict([str(image)], work / "best.pt", out_dir=tmp_path / "a", overlay=True, opacity=0.0, device="cpu")
    overlay = cv2.imread(str(tmp_path / "a" / f"{image.stem}_overlay.png"))[..., ::-1]  # RGB
    original = read_image(str(image))
    assert overlay.shape[1] > original.shape[1]  # the legend panel beside the image
    assert np.array_equal(overlay[: original.shape[0], : original.shape[1]], original)  # opacity 0: the image
    labels = cv2.imread(str(tmp_path / "a" / f"{image.stem}.png"), cv2.IMREAD_UNCHANGED)
    palette = np.asarray(api.load_checkpoint(work / "best.pt").meta["palette"], np.uint8)
    panel = overlay[:, original.shape[1]:].reshape(-1, 3)
    for cls in np.unique(labels):  # every predicted class has its swatch in the legend
        assert (panel == palette[cls]).all(axis=1).any()
    with pytest.raises(SegcliError, match="opacity"):
        api.predict([str(image)], work / "best.pt", out_dir=tmp_path / "b", overlay=True, opacity=1.5, device="cpu")


def test_data_show_writes_ground_truth_overlays_and_refuses_to_overwrite(synth_root, tmp_path):
    recipe = api.load_recipe(SETR, overrides_dict(synth_root))
    result = api.show_data(recipe, tmp_path / "gt", splits=("train", "val"), limit=2)
    assert sorted(p.name for p in result.written) == ["train_00000.png", "train_00001.png", "val_00000.png",
                                                        "val_00001.png"]
    shown = cv2.imread(str(result.written[0]))
    assert shown.shape[0] >= 64 and shown.shape[1] > 64  # the image and its legend
    with pytest.raises(SegcliError, match="earlier run"):
        api.show_data(recipe, tmp_path / "gt", limit=1)
    with pytest.raises(SegcliError, match="limit"):
        api.show_data(recipe, tmp_path / "other", limit=0)


def test_tensorboard_event_files_hold_curves_and_overlays(synth_root, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    recipe = api.load_recipe(SETR, overrides_dict(synth_root, **{"train.max_iters": 2, "train.eval_interval": 2}))
    api.train(recipe, work_dir=tmp_path / "run", device="cpu")
    events = EventAccumulator(str(tmp_path / "run" / "tensorboard"), size_guidance={"images": 0})
    events.Reload()
    scalars = set(events.Tags()["scalars"])
    assert {"train/loss", "train/lr", "val/mIoU", "val/aAcc"} <= scalars
    assert any(tag.startswith("val_IoU/") for tag in scalars)
    assert len(events.Scalars("train/loss")) == 2
    assert "val/prediction_0" in events.Tags()["images"]


def test_without_tensorboard_only_who_asked_for_it_is_told(synth_root, tmp_path, monkeypatch):
    """The TensorBoard hint belongs to whoever asked for TensorBoard: a first run says nothing of it."""
    import segcli.workflows.train as train_module

    monkeypatch.setattr(train_module, "tensorboard_available", lambda: False)
    for asked, expected in ((None, 0), (True, 1), (False, 0)):
        seen = []
        recipe = api.load_recipe(SETR, overrides_dict(synth_root, **{
            "train.max_iters": 1, "train.eval_interval": 1, "train.tensorboard": "null" if asked is None else asked}))
        api.train(recipe, work_dir=tmp_path / f"run{asked}", device="cpu",
                  callback=lambda event, info: seen.append((event, info)))
        warnings = [info["message"] for event, info in seen if event == "warning"]
        assert len(warnings) == expected and all("segcli[tensorboard]" in w for w in warnings)
        assert not (tmp_path / f"run{asked}" / "tensorboard").exists()


def test_init_from_says_what_it_left_out(setr_run, synth_root, tmp_path):
    """The bug: train.init_from loaded what fitted and said nothing of the rest."""
    work, _ = setr_run
    recipe = api.load_recipe(SETR, overrides_dict(synth_root, **{
        "train.init_from": work / "last.pt", "model.decode_head.channels": 64, "train.max_iters": 1,
        "train.eval_interval": 1}))
    events = []
    api.train(recipe, work_dir=tmp_path / "run", device="cpu", callback=lambda e, i: events.append((e, i)))
    warnings = [i["message"] for e, i in events if e == "warning" and "init_from" in i["message"]]
    assert len(warnings) == 1 and "another shape" in warnings[0] and "decode_head" in warnings[0]
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["message"] for r in records if r.get("event") == "warning"] == warnings
    resnet_overrides = [o for o in overrides_dict(synth_root, **{"train.init_from": work / "last.pt"})
                        if not o.startswith("model.backbone.")]
    nrd = api.load_recipe(REPO / "recipes" / "tiny" / "nrd.yaml", resnet_overrides)
    with pytest.raises(SegcliError, match="no weights of this checkpoint fit"):
        api.train(nrd, work_dir=tmp_path / "nrd", device="cpu")
