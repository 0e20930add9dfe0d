"""Shared fixtures: a tiny synthetic dataset on disk and a runner for the real CLI."""
from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

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


class HandCount(NamedTuple):
    flops: int  # the whole model on one image
    backbone_flops: int
    params: int


def setr_tiny_by_hand(height: int, width: int, patch: int = 8, img_size: int = 128) -> HandCount:
    """FLOPs and parameters of ``recipes/tiny/setr.yaml`` counted by hand, the independent count
    the FLOPs tests compare fvcore's with. ViT-Ti (C = 192, 12 blocks, MLP ratio 4, no class token
    in the blocks' output); SETR-naive head (LayerNorm, 1x1 conv to 128 channels, BatchNorm, x4
    bilinear upsampling, 1x1 classifier to K = 8), logits resized to the image. One multiply-add =
    one flop; attention QK^T and AV = 2 N^2 C per block; fvcore's element-wise conventions:
    LayerNorm 5, eval BatchNorm 2 per element, bilinear resizing 4 per output element."""
    c, blocks, channels, classes = 192, 12, 128, 8
    n = (height // patch) * (width // patch)  # patch tokens
    embed = n * 3 * patch * patch * c  # the patch-embedding conv
    block = 12 * n * c * c + 2 * n * n * c + 2 * 5 * n * c  # qkv 3C², proj C², MLP 8C²; attention; two LayerNorms
    backbone = embed + blocks * block
    head = 5 * n * c + n * c * channels + 2 * n * channels  # LayerNorm, 1x1 conv, BatchNorm on the token grid
    head += 4 * channels * 16 * n + 16 * n * channels * classes  # x4 upsampling (16 n pixels), classifier
    resize = 4 * classes * height * width  # the logits resized to the image
    grid = (img_size // patch) ** 2  # the position embedding's grid, + the class token's slot
    params = (3 * patch * patch * c + c) + (grid + 1) * c + blocks * (12 * c * c + 13 * c)  # 13 C: biases, norms
    params += 2 * c + c * channels + 2 * channels + channels * classes + classes  # head: LN, conv, BN, classifier
    return HandCount(backbone + head + resize, backbone, params)


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
