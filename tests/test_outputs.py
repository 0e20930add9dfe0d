"""The one output rule, walked over every command that writes (segcli/outputs.py).

No output may be an input (refused even with --overwrite), nothing inside a dataset's folders is
written, and no existing file is replaced without --overwrite. The command list is taken from the
CLI itself: a new command must be listed here as writing (with its cases) or as read-only, so a
command added without the rule fails :func:`test_every_command_is_walked`.
"""
from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest

from conftest import REPO, tiny_overrides

from segcli.cli import app
from segcli.errors import SegcliError
from segcli.outputs import check_outputs

READ_ONLY = {"flops", "benchmark", "data check", "recipe show", "zoo list"}
CACHE_ONLY = {"zoo fetch"}  # writes only segcli's model cache, a file there wins (tests/test_zoo.py)
# what a refusal by the rule says (the command must stop because of the rule, not for another reason)
REFUSALS = ("would be overwritten", "earlier run", "inside the dataset folder", "must end in", "not a folder")
WRITES = ["predict", "eval", "prune", "export", "convert", "plot", "data show", "data synth", "data prepare", "train",
          "cl-step"]


def _commands(typer_app, prefix: str = "") -> set[str]:
    names = {prefix + (command.name or command.callback.__name__) for command in typer_app.registered_commands}
    for group in typer_app.registered_groups:
        names |= _commands(group.typer_instance, prefix + group.name + " ")
    return names


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _tree(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): _digest(p) for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture()
def run(setr_run, tmp_path):
    return shutil.copytree(setr_run[0], tmp_path / "run")


@pytest.fixture()
def dataset(synth_root, tmp_path):
    return shutil.copytree(synth_root, tmp_path / "dataset")


# Each case: (command-line, the file that must survive unchanged). Every command that writes has a
# case where its output is one of its inputs (with --overwrite) and one where its output exists.
def _cases(run: Path, dataset: Path, tmp_path: Path) -> dict[str, list[tuple[list, Path]]]:
    checkpoint = run / "last.pt"
    image = dataset / "images" / "val" / "00000.png"
    existing = tmp_path / "existing.bin"
    existing.write_bytes(b"a user's file")
    existing_png = tmp_path / "existing.png"
    existing_png.write_bytes(b"a user's picture")
    earlier_labels = tmp_path / "submission" / f"{image.stem}.png"  # an earlier eval --format-only's output
    earlier_labels.parent.mkdir()
    earlier_labels.write_bytes(b"an earlier submission")
    released = tmp_path / "released.pth"  # an official-format checkpoint, as convert reads it
    shutil.copyfile(REPO / "tests" / "fixtures" / "official" / "segvit-v1.pth", released)
    released_recipe = REPO / "tests" / "fixtures" / "recipes" / "segvit_v1_small.yaml"
    recipe = REPO / "recipes" / "tiny" / "setr.yaml"
    cl_work = tmp_path / "cl"  # a CL run whose first step is done
    raw = tmp_path / "cityscapes_raw"  # a raw Cityscapes download, as data prepare reads it
    for split, stem in (("train", "aachen/aachen_000000_000019"), ("val", "lindau/lindau_000000_000019")):
        for folder, suffix in (("leftImg8bit", "leftImg8bit"), ("gtFine", "gtFine_labelIds")):
            (raw / folder / split / stem).parent.mkdir(parents=True, exist_ok=True)
            cv2.imwrite(str(raw / folder / split / f"{stem}_{suffix}.png"), np.full((8, 8), 7, np.uint8))
    raw_label = raw / "gtFine" / "train" / "aachen" / "aachen_000000_000019_gtFine_labelIds.png"
    prepared = tmp_path / "prepared" / "gtFine" / "train" / "aachen" / "aachen_000000_000019_gtFine_labelTrainIds.png"
    prepared.parent.mkdir(parents=True)
    prepared.write_bytes(b"a user's mask")
    shutil.copytree(run, cl_work / "task1")
    return {
        "predict": [(["predict", image, "--checkpoint", checkpoint, "--out", image.parent, "--overwrite"], image)],
        "eval": [(["eval", checkpoint, "--set", f"data.root={dataset}", "--limit", "1", "--show-dir", image.parent,
                   "--overwrite"], image),
                 (["eval", checkpoint, "--limit", "1", "--confusion", checkpoint, "--overwrite"], checkpoint),
                 (["eval", checkpoint, "--limit", "1", "--confusion", existing_png], existing_png),
                 (["eval", checkpoint, "--set", f"data.root={dataset}", "--limit", "1", "--format-only", image.parent,
                   "--overwrite"], image),
                 (["eval", checkpoint, "--set", f"data.root={dataset}", "--limit", "1", "--format-only",
                   earlier_labels.parent], earlier_labels)],
        "prune": [(["prune", checkpoint, "--out", checkpoint, "--overwrite"], checkpoint),
                  (["prune", checkpoint, "--out", existing], existing)],
        "export": [(["export", checkpoint, "--out", checkpoint, "--overwrite"], checkpoint),
                   (["export", checkpoint, "--out", existing], existing)],
        "convert": [(["convert", released, "--recipe", released_recipe, "--out", released, "--overwrite"], released),
                    (["convert", released, "--recipe", released_recipe, "--out", existing], existing)],
        "plot": [(["plot", run, "--out", run / "metrics.jsonl", "--overwrite"], run / "metrics.jsonl"),
                 (["plot", run, "--out", checkpoint, "--overwrite"], checkpoint),
                 (["plot", run, "--out", existing_png], existing_png)],
        "data show": [(["data", "show", recipe, *tiny_overrides(dataset), "--out", image.parent], image)],
        "data synth": [(["data", "synth", existing], existing)],
        "data prepare": [(["data", "prepare", "cityscapes", raw, "--out", raw / "gtFine", "--overwrite"], raw_label),
                         (["data", "prepare", "cityscapes", raw, "--out", tmp_path / "prepared"], prepared)],
        "train": [(["train", recipe, *tiny_overrides(dataset), "--work-dir", run], checkpoint)],
        "cl-step": [(["cl-step", REPO / "recipes" / "tiny" / "cl.yaml", "--task", "1",
                      *tiny_overrides(dataset, **{"data.synthetic_seed": 0, "model.backbone.pretrained": "null"}),
                      "--work-dir", cl_work], cl_work / "task1" / "last.pt")],
    }


def test_every_command_is_walked():
    assert set(WRITES) | READ_ONLY | CACHE_ONLY == _commands(app), "a command is neither walked nor declared read-only"
    assert not set(WRITES) & (READ_ONLY | CACHE_ONLY)


@pytest.mark.parametrize("command", WRITES)
def test_no_output_replaces_an_input_or_an_existing_file(command, cli, run, dataset, tmp_path):
    cases = _cases(run, dataset, tmp_path)
    assert set(cases) == set(WRITES)
    for args, survivor in cases[command]:
        before_run, before_data, before = _tree(run), _tree(dataset), _digest(survivor)
        res = cli(*args)
        assert res.exit_code == 2, (args, res.output)
        assert "Traceback" not in res.output
        said = " ".join(res.output.split())
        assert any(refusal in said for refusal in REFUSALS), (args, said)
        assert _digest(survivor) == before
        assert _tree(run) == before_run and _tree(dataset) == before_data  # nothing else written either


def test_the_rule(tmp_path):
    kept = tmp_path / "kept.pt"
    kept.write_bytes(b"x")
    with pytest.raises(SegcliError, match="would be overwritten"):
        check_outputs([tmp_path / "." / "kept.pt"], inputs=[kept], overwrite=True)  # two spellings, one file
    with pytest.raises(SegcliError, match="--overwrite"):
        check_outputs([kept])
    check_outputs([kept], overwrite=True)
    with pytest.raises(SegcliError, match="inside the dataset folder"):
        check_outputs([tmp_path / "images" / "a.png"], data_dirs=[tmp_path / "images"])
    with pytest.raises(SegcliError, match=r"must end in \.png"):
        check_outputs([tmp_path / "curves.pt"], suffixes=(".png",))
    check_outputs([tmp_path / "new.png"], inputs=[kept], data_dirs=[tmp_path / "images"], suffixes=(".png",))
