"""Shared fixtures: a tiny synthetic dataset on disk and a runner for the real CLI."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from segcli.cli import app

REPO = Path(__file__).resolve().parents[1]

torch.set_num_threads(2)


def tiny_overrides(data_root: Path, **extra) -> list[str]:
    """--set overrides that shrink a tiny recipe to seconds on CPU."""
    values = {
        "data.root": str(data_root),
        "data.synthetic_size": 64,
        "data.synthetic_train": 8,
        "data.synthetic_val": 3,
        "data.crop_size": "[64, 64]",
        "data.batch_size": 2,
        "data.num_workers": 0,
        "train.max_iters": 4,
        "train.warmup_iters": 1,
        "train.eval_interval": 2,
        "train.log_interval": 1,
        "model.backbone.patch_size": 16,
        "model.backbone.img_size": 64,
    }
    values.update(extra)
    out = []
    for key, value in values.items():
        out += ["--set", f"{key}={value}"]
    return out


@pytest.fixture(scope="session")
def synth_root(tmp_path_factory) -> Path:
    from segcli.data import generate_synthetic

    root = tmp_path_factory.mktemp("synthetic")
    generate_synthetic(root, 8, 3, 64, 0)
    return root


def overrides_dict(data_root: Path, **extra) -> list[str]:
    """:func:`tiny_overrides` as the ``KEY=VALUE`` list the API takes."""
    return tiny_overrides(data_root, **extra)[1::2]


@pytest.fixture(scope="session")
def setr_run(tmp_path_factory, synth_root):
    """A tiny SETR trained once through the API (4 iterations, evaluated at 2 and 4) for every
    test that needs a real run or checkpoint: ``(work_dir, TrainResult)``."""
    from segcli import api

    work = tmp_path_factory.mktemp("setr_run") / "run"
    recipe = api.load_recipe(REPO / "recipes" / "tiny" / "setr.yaml", overrides_dict(synth_root))
    return work, api.train(recipe, work_dir=work, device="cpu")


@pytest.fixture()
def cli():
    runner = CliRunner()

    def invoke(*args: str):
        return runner.invoke(app, [str(a) for a in args], catch_exceptions=False)

    return invoke
