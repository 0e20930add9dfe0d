"""The CLI itself: argument parsing, rendering and exit codes (behaviour is tested at the API in
test_workflows.py and the per-method test files)."""
from __future__ import annotations

import json

import cv2
import numpy as np
import pytest
import torch

from conftest import REPO, tiny_overrides

SETR = REPO / "recipes" / "tiny" / "setr.yaml"


def test_train_prints_what_to_do_next(cli, synth_root, tmp_path):
    work = tmp_path / "run"
    res = cli("train", SETR, "--work-dir", work, *tiny_overrides(synth_root, **{"train.max_iters": 1,
                                                                                 "train.eval_interval": 1}))
    assert res.exit_code == 0, res.output
    assert (work / "last.pt").is_file() and "segcli predict" in res.output and "mean" in res.output


def test_train_keeps_a_text_log_of_what_it_showed(cli, synth_root, tmp_path):
    work = tmp_path / "run"
    args = ["train", SETR, "--work-dir", work, *tiny_overrides(synth_root, **{"train.max_iters": 2,
                                                                               "train.eval_interval": 2})]
    res = cli(*args)
    assert res.exit_code == 0, res.output
    log = (work / "train.log").read_text()
    assert "setr:" in log and "iter 2/2" in log and "eval @ 2" in log and f"wrote {work / 'last.pt'}" in log
    assert "[bold" not in log  # plain text
    res = cli(*args, "--overwrite")  # a new run replaces the old log instead of appending to it
    assert res.exit_code == 0, res.output
    assert (work / "train.log").read_text().count("eval @ 2") == 1


def test_eval_json_is_one_object_on_stdout(cli, setr_run):
    work, _ = setr_run
    res = cli("eval", work / "best.pt", "--json", "--limit", "1")
    assert res.exit_code == 0, res.output
    assert set(json.loads(res.stdout)) >= {"mIoU", "mAcc", "aAcc", "per_class"}


def test_predict_reports_a_broken_file_and_exits_2(cli, setr_run, synth_root, tmp_path):
    work, _ = setr_run
    image = next((synth_root / "images" / "val").iterdir())
    (tmp_path / "broken.jpg").write_bytes(b"not an image")
    res = cli("predict", image, tmp_path / "broken.jpg", "--checkpoint", work / "best.pt", "--out", tmp_path / "p")
    assert res.exit_code == 2 and "broken.jpg" in res.output and "wrote 1 prediction" in res.output
    assert (tmp_path / "p" / f"{image.stem}.png").is_file()


def test_flops_prints_one_line_however_long(cli, tmp_path):
    res = cli("flops", SETR, "--shape", "64", "96", "--json", "--set", "model.backbone.patch_size=16")
    assert res.exit_code == 0, res.output
    flops = json.loads(res.stdout)
    long_name = tmp_path / ("a_recipe_with_a_name_longer_than_a_terminal_line_" * 2 + ".yaml")
    long_name.write_text(f"_base_: {SETR}\n")
    res = cli("flops", long_name, "--shape", "64", "96", "--set", "model.backbone.patch_size=16")
    line = f"{long_name}: {flops['gflops']:.2f} GFLOPs at 64x96, {flops['params_m']:.2f} M parameters"
    assert res.exit_code == 0 and line in res.output.splitlines(), res.output  # one line, however long


def test_prune_errors_name_the_flag(cli, setr_run):
    work, _ = setr_run
    res = cli("prune", work / "last.pt", "--p0", "1.5")
    assert res.exit_code == 2 and "--p0" in res.output and "Traceback" not in res.output


def test_bad_inputs_exit_2_without_traceback(cli, synth_root, tmp_path):
    res = cli("train", tmp_path / "nope.yaml")
    assert res.exit_code == 2 and "nope.yaml" in res.output and "Traceback" not in res.output
    res = cli("train", SETR, "--set", "train.max_iter=3")
    assert res.exit_code == 2 and "did you mean 'max_iters'" in res.output
    res = cli("train", SETR, "--set", "data.type=folder", "--set", "data.root=" + str(tmp_path / "missing"))
    assert res.exit_code == 2 and "missing" in res.output
    res = cli("eval", tmp_path / "none.pt")
    assert res.exit_code == 2 and "none.pt" in res.output
    (tmp_path / "foreign.pt").write_bytes(b"\x00\x01junk")
    image = synth_root / "images" / "val" / "00000.png"  # the images are checked first (cheap), then the model
    res = cli("predict", image, "--checkpoint", tmp_path / "foreign.pt")
    assert res.exit_code == 2 and "foreign.pt" in res.output
    res = cli("predict", "x.jpg", "--model", "segvitt")
    assert res.exit_code == 2 and "did you mean 'segvit'" in res.output


def test_checkpoint_of_the_wrong_model(cli, setr_run):
    work, _ = setr_run
    res = cli("eval", work / "last.pt", "--set", "model.decode_head.channels=64")
    assert res.exit_code == 2 and "does not fit" in res.output and "decode_head" in res.output


def test_named_model_from_cache(cli, synth_root, tmp_path, monkeypatch):
    monkeypatch.setenv("SEGCLI_CACHE", str(tmp_path / "cache"))
    res = cli("predict", "x.jpg", "--model", "quickstart")
    assert res.exit_code == 2 and "segcli train recipes/quickstart.yaml" in res.output


def test_predict_named_segvit(cli, synth_root, tmp_path, monkeypatch):
    """`segcli predict IMG --model segvit` once a (tiny) SegViT checkpoint sits in the cache."""
    from segcli import api
    from segcli.build import dataset_meta
    from segcli.engine.checkpoint import save_checkpoint

    cache = tmp_path / "cache"
    monkeypatch.setenv("SEGCLI_CACHE", str(cache))
    recipe = api.load_recipe(REPO / "recipes" / "tiny" / "segvit.yaml", tiny_overrides(synth_root)[1::2])
    (val,) = api.build_datasets(recipe, splits=("val",))
    save_checkpoint(cache / "segvit.pt", {"version": "test", "recipe": recipe.to_dict(), "meta": dataset_meta(val),
                                          "model": api.build_model(recipe).state_dict()})
    image = next((synth_root / "images" / "val").iterdir())
    res = cli("predict", image, "--model", "segvit", "--out", tmp_path / "pred")
    assert res.exit_code == 0, res.output
    label = cv2.imread(str(tmp_path / "pred" / f"{image.stem}.png"), cv2.IMREAD_UNCHANGED)
    assert label is not None and label.shape == (64, 64) and label.max() < 8
    # two inputs with the same name in different folders (and one given twice): nothing is overwritten
    for folder in ("a", "b"):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "x.png").write_bytes(image.read_bytes())
    res = cli("predict", tmp_path / "a" / "x.png", tmp_path / "b", tmp_path / "a" / "x.png", "--model", "segvit",
              "--out", tmp_path / "same")
    assert res.exit_code == 0, res.output
    assert sorted(p.name for p in (tmp_path / "same").glob("*.png") if "_color" not in p.name) == ["a_x.png", "b_x.png"]


def test_a_bad_validation_mask_stops_the_run_before_training(cli, tmp_path):
    """A validation mask with an unknown class id is found before the first iteration: exit 2, one
    line naming the file, and nothing written (it used to be found only after training)."""
    root = tmp_path / "folder"
    for split in ("train", "val"):
        (root / "images" / split).mkdir(parents=True)
        (root / "masks" / split).mkdir(parents=True)
        for i in range(2):
            mask = np.zeros((40, 56), np.uint8)
            mask[20:] = 1
            if split == "val" and i == 1:
                mask[:4, :4] = 7  # 3 classes: 7 is no class id
            cv2.imwrite(str(root / "images" / split / f"x{i}.png"), np.full((40, 56, 3), 90 * mask[..., None], np.uint8))
            cv2.imwrite(str(root / "masks" / split / f"x{i}.png"), mask)
    (root / "classes.txt").write_text("a\nb\nc\n")
    work = tmp_path / "run"
    res = cli("train", SETR, "--work-dir", work, *tiny_overrides(root, **{"data.type": "folder", "train.max_iters": 1}))
    assert res.exit_code == 2
    assert "x1.png" in res.output and "Traceback" not in res.output
    assert not work.exists()


def test_messages_keep_their_square_brackets(cli, synth_root, tmp_path, monkeypatch):
    """rich reads "[tensorboard]" as markup: the hint `pip install 'segcli[tensorboard]'` and any
    user text (paths, class names) must reach the terminal as written."""
    import segcli.workflows.train as train_module

    monkeypatch.setattr(train_module, "tensorboard_available", lambda: False)
    res = cli("train", SETR, "--work-dir", tmp_path / "run[1]",
              *tiny_overrides(synth_root, **{"train.max_iters": 1, "train.eval_interval": 1, "train.tensorboard": True}))
    assert res.exit_code == 0, res.output
    assert "segcli[tensorboard]" in res.output and "run[1]" in res.output
    res = cli("eval", tmp_path / "missing[2].pt")
    assert res.exit_code == 2 and "missing[2].pt" in res.output


def test_the_train_reporter_logs_at_the_runs_log_interval(tmp_path):
    """cl-step's reporter logged every 50 iterations whatever train.log_interval said: the interval
    now comes with the run's start event, for train and cl-step alike."""
    import io

    from rich.console import Console

    from segcli.cli import _TrainReporter

    out = io.StringIO()
    reporter = _TrainReporter(Console(file=out, force_terminal=False, width=200))
    reporter("start", {"recipe": "r", "model": "m", "params_m": 1.0, "dataset": "d", "data_root": None,
                       "train_images": 1, "val_images": 1, "max_iters": 6, "log_interval": 3, "start_iter": 0,
                       "device": "cpu", "work_dir": str(tmp_path)})
    for it in range(1, 7):
        reporter("step", {"iter": it, "max_iters": 6, "lr": 0.1, "loss": 1.0})
    reporter.close()
    assert [line.split()[1] for line in out.getvalue().splitlines() if line.startswith("iter")] == ["3/6", "6/6"]
    assert "iter 3/6" in (tmp_path / "train.log").read_text()


def _start_event(work_dir) -> dict:
    return {"recipe": "cl", "model": "m", "params_m": 1.0, "dataset": "d", "data_root": None, "train_images": 1,
            "val_images": 1, "max_iters": 4, "log_interval": 1, "start_iter": 0, "device": "cpu",
            "work_dir": str(work_dir)}


def test_cl_step_shares_trains_ctrl_c_handler_and_closing_log(cli, monkeypatch, tmp_path):
    """cl-step had its own copy of train's reporter wiring, which had drifted: its train.log lacked the
    closing lines (final metrics, what was written). One runner serves both commands now."""
    from segcli import api
    from segcli.workflows.continual import CLStepResult

    task_dir = tmp_path / "cl run" / "task2"
    task_dir.mkdir(parents=True)

    def interrupted_step(recipe, task, work_dir, callback, **_):
        callback("start", _start_event(task_dir))
        callback("checkpoint", {"path": f"{task_dir}/last.pt", "iter": 3})
        raise KeyboardInterrupt

    monkeypatch.setattr(api, "cl_step", interrupted_step)
    res = cli("cl-step", "--task", "2", "--work-dir", tmp_path / "cl run")
    assert res.exit_code == 130
    assert f"saved {task_dir}/last.pt at iteration 3" in res.output
    assert f"resume with: segcli cl-step --task 2 --work-dir '{tmp_path}/cl run' --resume" in res.output

    def finished_step(recipe, task, work_dir, callback, **_):
        callback("start", _start_event(task_dir))
        return CLStepResult(2, 2, (1,), task_dir, task_dir / "last.pt", 1, tmp_path / "presence",
                            {"mIoU": 1.0, "mAcc": 2.0, "aAcc": 3.0, "per_class": []}, 4)

    monkeypatch.setattr(api, "cl_step", finished_step)
    res = cli("cl-step", "--task", "2", "--work-dir", tmp_path / "cl run", "--json")
    assert res.exit_code == 0 and json.loads(res.stdout)["checkpoint"] == str(task_dir / "last.pt")
    log = (task_dir / "train.log").read_text()
    assert "final @ 4: mIoU 1.00" in log and f"wrote {task_dir / 'last.pt'}" in log
