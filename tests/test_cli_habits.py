"""The CLI habits of issue #14: --version, flags shown as flags, help on every option that needs it,
--json summaries, the start banner, Ctrl-C's resume command, one-line refusals (exit 2)."""
from __future__ import annotations

import json
import shutil

import pytest

from conftest import REPO, tiny_overrides

from segcli.cli import app
from segcli.errors import SegcliError

SETR = REPO / "recipes" / "tiny" / "setr.yaml"


def command_paths() -> list[tuple[str, ...]]:
    """Every command the CLI has, sub-apps included (``data show``, ``recipe show``, ...), as the
    words that reach it: Typer's click tree walked recursively, so a new command or group is covered
    without touching this file."""
    import typer

    def walk(command, path):
        yield path
        for name, sub in sorted((getattr(command, "commands", None) or {}).items()):
            yield from walk(sub, (*path, name))

    return list(walk(typer.main.get_command(app), ()))


COMMANDS = command_paths()


def test_the_walk_reaches_the_sub_apps():
    groups = {path[0] for path in COMMANDS if len(path) == 2}
    assert {"data", "recipe"} <= groups and ("data", "show") in COMMANDS and ("recipe", "show") in COMMANDS
    assert ("train",) in COMMANDS and () in COMMANDS


def test_version(cli):
    from segcli.version import __version__

    res = cli("--version")
    assert res.exit_code == 0 and res.output.strip() == f"segcli {__version__}"


@pytest.mark.parametrize("command", COMMANDS, ids=lambda path: " ".join(path) or "segcli")
def test_help_shows_flags_as_flags_and_explains_device(cli, command):
    res = cli(*command, "--help")
    assert res.exit_code == 0, res.output
    assert "<bool>" not in res.output
    for line in res.output.splitlines():
        if line.strip().startswith("--device"):
            assert "cpu" in line, line  # every --device says what it takes


def test_train_json_banner_and_refusal(cli, synth_root, tmp_path):
    work = tmp_path / "run"
    args = ["train", SETR, "--work-dir", work, "--json", *tiny_overrides(synth_root, **{"train.max_iters": 1,
                                                                                       "train.eval_interval": 1})]
    res = cli(*args)
    assert res.exit_code == 0, res.output
    summary = json.loads(res.stdout)
    assert summary["iterations"] == 1 and summary["last"] == str(work / "last.pt") and "mIoU" in summary["metrics"]
    assert "M parameters" in res.stderr and "8 train / 3 val images" in res.stderr  # the banner, at once
    res = cli(*args)  # the same work dir again
    assert res.exit_code == 2 and "earlier run" in res.stderr and "--overwrite" in res.stderr
    assert "Traceback" not in res.output
    res = cli(*args, "--overwrite")
    assert res.exit_code == 0, res.output


def test_ctrl_c_says_what_was_saved_and_how_to_resume(cli, monkeypatch, tmp_path):
    from segcli import api

    def interrupted_train(recipe, work_dir, callback, **_):
        callback("checkpoint", {"path": f"{work_dir}/last.pt", "iter": 7})
        raise KeyboardInterrupt

    monkeypatch.setattr(api, "train", interrupted_train)
    res = cli("train", SETR, "--work-dir", tmp_path / "my run", "--set", "train.max_iters=9")
    assert res.exit_code == 130
    assert f"saved {tmp_path}/my run/last.pt at iteration 7" in res.output
    assert f"segcli train {SETR} --work-dir '{tmp_path}/my run' --resume --set train.max_iters=9" in res.output


def test_predict_json_and_refusal_of_an_earlier_run(cli, setr_run, synth_root, tmp_path):
    work, _ = setr_run
    image = next((synth_root / "images" / "val").iterdir())
    res = cli("predict", image, "--checkpoint", work / "best.pt", "--out", tmp_path / "p", "--json")
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["written"] == [str(tmp_path / "p" / f"{image.stem}{s}.png") for s in ("", "_color")]
    res = cli("predict", image, "--checkpoint", work / "best.pt", "--out", tmp_path / "p")
    assert res.exit_code == 2 and "--overwrite" in res.output and "Traceback" not in res.output
    inputs = shutil.copytree(synth_root / "images" / "val", tmp_path / "in")
    res = cli("predict", inputs, "--checkpoint", work / "best.pt", "--out", inputs, "--overwrite")
    assert res.exit_code == 2 and "input image would be overwritten" in res.output


def test_bad_numbers_exit_2_naming_the_flag(cli, setr_run):
    work, _ = setr_run
    res = cli("flops", SETR, "--shape", "0", "512")
    assert res.exit_code == 2 and "--shape" in res.output and "Traceback" not in res.output
    for flag, value in (("--trimap", "-1"), ("--limit", "0")):
        res = cli("eval", work / "best.pt", flag, value)
        assert res.exit_code == 2 and flag in res.output, res.output
    res = cli("flops", work / "best.pt", "--shape", "64", "64", "--json")  # a checkpoint is fine
    assert res.exit_code == 0 and json.loads(res.stdout)["gflops"] > 0
    res = cli("train", work / "best.pt")
    assert res.exit_code == 2 and "is it a checkpoint?" in res.output


@pytest.mark.parametrize("command", ["eval", "predict"])
def test_compile_without_a_compiler_is_one_line_before_anything_is_written(cli, command, setr_run, synth_root,
                                                                           tmp_path, monkeypatch):
    import shutil

    work, _ = setr_run
    monkeypatch.setattr(shutil, "which", lambda name: None)
    out = tmp_path / "preds"
    image = next((synth_root / "images" / "val").iterdir())
    args = [work / "best.pt", "--compile"] if command == "eval" else \
        [image, "--checkpoint", work / "best.pt", "--out", out, "--compile"]
    res = cli(command, *args)
    assert res.exit_code == 2 and "C++ compiler" in res.output
    assert not out.exists()


def test_eval_with_compile_gives_the_eager_metrics(setr_run):
    from segcli import api
    from segcli.engine.inference import cpu_vector_isa

    work, _ = setr_run
    if cpu_vector_isa() == "avx2":  # inductor's AVX2 kernels gave NaN scores: refused (engine/inference.py)
        with pytest.raises(SegcliError, match="AVX2"):
            api.evaluate(work / "best.pt", limit=1, device="cpu", compile=True)
        return
    eager = api.evaluate(work / "best.pt", limit=2, device="cpu")
    compiled = api.evaluate(work / "best.pt", limit=2, device="cpu", compile=True)
    assert compiled["mIoU"] == pytest.approx(eager["mIoU"], rel=1e-3)
    with pytest.raises(SegcliError, match="--flops"):
        api.evaluate(work / "best.pt", limit=1, compile=True, flops=True)
