"""DToP's token statistics travel with the scores (``ops/scores.py`` counts), not on the module.

The bug (issue 23, bug 1): the model kept ``last_stats`` of its last forward and ``eval`` read it
after each image, so with slide inference the reported exit and kept fractions were those of
the last window of each image, and under DDP those of rank 0's images only. Now every window's
counts add up, and the ranks' sums are summed.

Tiny DToP of ``test_dtop.py`` (patch 8) on the 64² synthetic images; p0 is the median stage-1
confidence of the windows, so that windows differ in how many tokens exit.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from segcli.build import build_datasets
from segcli.data.transforms import eval_view
from segcli.engine.distributed import DistInfo
from segcli.engine.evaluate import evaluate_model
from segcli.ops.scores import add_counts, token_fractions
from segcli.recipe import recipe_from_dict
from test_ddp import _free_port
from test_dtop import ATM_MODEL, build, first_stage_confidence, recipe_dict, threshold_between

CROP, STRIDE = 32, 16
STARTS = (0, 16, 32)  # the windows of a 64-px side: every 16 px, the last flush with the border


def windows_of(image: torch.Tensor) -> list[torch.Tensor]:
    """The 3 x 3 slide windows [1, 3, 32, 32] of a normalised [1, 3, 64, 64] image."""
    return [image[:, :, y:y + CROP, x:x + CROP] for y in STARTS for x in STARTS]


def pruned_setup(root, mode: str):
    """(recipe, val set, DToP model) with a p0 at which about half the stage-1 tokens exit."""
    raw = recipe_dict(ATM_MODEL, root, p0=0.5, k=1)
    raw["test"] = {"mode": mode, "crop_size": [CROP, CROP], "stride": [STRIDE, STRIDE]}
    raw["data"]["type"] = "folder"  # read the session's synthetic set as it is (never regenerate it)
    recipe = recipe_from_dict(raw)
    (val_set,) = build_datasets(recipe, splits=("val",))
    image = eval_view(val_set[0]["image"][None], (64, 64), recipe.data.mean, recipe.data.std)
    plain = build(ATM_MODEL)
    confidence = torch.cat([first_stage_confidence(plain, w).flatten() for w in windows_of(image)])
    model = build(ATM_MODEL, plain.state_dict(), p0=threshold_between(confidence[None], 0.5), k=1)
    return recipe, val_set, model


def test_slide_statistics_weigh_every_window_by_its_tokens(synth_root):
    recipe, val_set, model = pruned_setup(synth_root, "slide")
    image = eval_view(val_set[0]["image"][None], (64, 64), recipe.data.mean, recipe.data.std)
    with torch.no_grad():
        alone = [model.forward_scores(window).counts for window in windows_of(image)]
    expected = token_fractions(add_counts(*alone))
    last = token_fractions(alone[-1])
    assert 0 < expected["kept_fraction"] < 1
    assert last["kept_fraction"] != pytest.approx(expected["kept_fraction"])  # what the bug reported differs
    got = evaluate_model(model, val_set, recipe, torch.device("cpu"), limit=1)
    assert got["kept_fraction"] == pytest.approx(expected["kept_fraction"], rel=1e-12)
    assert got["exit_fraction"] == pytest.approx(expected["exit_fraction"], rel=1e-12)
    assert sum(got["exit_fraction"]) + got["kept_fraction"] == pytest.approx(1.0)


RANK = """
import json, sys
import torch
import torch.distributed as dist

sys.path.insert(0, {tests!r})
torch.set_num_threads(1)
from segcli.engine.distributed import DistInfo
from segcli.engine.evaluate import evaluate_model
from test_token_stats import pruned_setup

rank = int(sys.argv[1])
dist.init_process_group("gloo", init_method="tcp://127.0.0.1:{port}", rank=rank, world_size=2)
recipe, val_set, model = pruned_setup({root!r}, "whole")
result = evaluate_model(model, val_set, recipe, torch.device("cpu"), DistInfo(rank, 2))
if rank == 0:
    print(json.dumps(result))
dist.destroy_process_group()
"""


def test_two_process_statistics_equal_one_process(synth_root):
    recipe, val_set, model = pruned_setup(synth_root, "whole")
    single = evaluate_model(model, val_set, recipe, torch.device("cpu"))
    rank0_share = evaluate_model(model, val_set.subset([0, 2]), recipe, torch.device("cpu"))  # what the bug reported
    assert rank0_share["kept_fraction"] != pytest.approx(single["kept_fraction"])
    script = RANK.format(tests=str(Path(__file__).parent), port=_free_port(), root=str(synth_root))
    procs = [subprocess.Popen([sys.executable, "-c", script, str(rank)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}) for rank in (0, 1)]
    outputs = [proc.communicate(timeout=600) for proc in procs]
    assert [proc.returncode for proc in procs] == [0, 0], outputs[0][1][-2000:] + outputs[1][1][-2000:]
    multi = json.loads(outputs[0][0].strip().splitlines()[-1])
    assert multi["kept_fraction"] == pytest.approx(single["kept_fraction"], rel=1e-12)
    assert multi["exit_fraction"] == pytest.approx(single["exit_fraction"], rel=1e-12)
    assert multi["mIoU"] == pytest.approx(single["mIoU"], rel=1e-12)
