"""2-process DDP (gloo, CPU) equals a single process with the same global batch."""
from __future__ import annotations

import os
import subprocess
import sys

import torch

from conftest import REPO, tiny_overrides

SEGVIT = REPO / "recipes" / "tiny" / "segvit.yaml"


def _run(args: list[str], env_extra: dict | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env_extra or {})}
    return subprocess.run(args, capture_output=True, text=True, env=env, timeout=timeout)


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_two_process_ddp_matches_single_process(synth_root, tmp_path):
    # LayerNorm-only model (no BatchNorm: SyncBN needs CUDA) and no dropout, so that the two runs
    # compute the same function; global batch 2 = 2 processes x 1. SGD, because Adam's first steps
    # (update ~ lr * sign(grad)) turn float-level gradient differences into lr-sized ones.
    overrides = tiny_overrides(synth_root, **{
        "train.max_iters": 3, "train.eval_interval": 3, "model.decode_head.dropout": 0.0,
        "model.backbone.depth": 2, "model.backbone.out_indices": "[0, 1]", "model.decode_head.in_index": "[1, 0]",
        "model.decode_head.num_layers": 1, "train.optimizer.type": "sgd", "train.optimizer.lr": 0.05})
    single, multi = tmp_path / "single", tmp_path / "ddp"
    res = _run([sys.executable, "-m", "segcli", "train", str(SEGVIT), "--work-dir", str(single), *overrides])
    assert res.returncode == 0, res.stderr[-2000:]
    res = _run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={_free_port()}",
                "-m", "segcli", "train", str(SEGVIT), "--work-dir", str(multi), *overrides])
    assert res.returncode == 0, res.stderr[-3000:]
    a = torch.load(single / "last.pt", weights_only=True)
    b = torch.load(multi / "last.pt", weights_only=True)
    assert a["iteration"] == b["iteration"] == 3
    for key, value in a["model"].items():
        assert torch.allclose(value.float(), b["model"][key].float(), atol=2e-5, rtol=1e-4), key
    # distributed evaluation merged the confusion matrices of both ranks
    import json

    evals = [json.loads(line) for line in (multi / "metrics.jsonl").read_text().splitlines() if "mIoU" in line]
    evals_single = [json.loads(line) for line in (single / "metrics.jsonl").read_text().splitlines() if "mIoU" in line]
    assert abs(evals[-1]["mIoU"] - evals_single[-1]["mIoU"]) < 1e-3


NAN_ON_RANK_1 = """
import os, sys
import torch
from torch.nn.parallel import DistributedDataParallel

forward, calls = DistributedDataParallel.forward, [0]


def nan_on_rank_1(self, *args, **kwargs):  # rank 1 alone sees a non-finite loss at its 2nd step
    losses = forward(self, *args, **kwargs)
    calls[0] += 1
    if os.environ["RANK"] == "1" and calls[0] == 2:
        losses = {key: value * float("nan") for key, value in losses.items()}
    return losses


DistributedDataParallel.forward = nan_on_rank_1
from segcli.cli import main

sys.argv = ["segcli", *sys.argv[1:]]
main()
"""


def test_a_non_finite_loss_on_one_rank_stops_every_rank(synth_root, tmp_path):
    """The bug: the check was rank-local; the rank that raised left the other blocked in the next
    all-reduce forever. The flag is reduced first, and every rank stops with the same line."""
    script = tmp_path / "nan_on_rank_1.py"
    script.write_text(NAN_ON_RANK_1)
    overrides = tiny_overrides(synth_root, **{
        "train.max_iters": 4, "train.eval_interval": 4, "model.backbone.depth": 2,
        "model.backbone.out_indices": "[0, 1]", "model.decode_head.in_index": "[1, 0]",
        "model.decode_head.num_layers": 1})
    res = _run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={_free_port()}",
                str(script), "train", str(SEGVIT), "--work-dir", str(tmp_path / "run"), *overrides], timeout=240)
    assert res.returncode != 0
    assert res.stderr.count("the loss became non-finite (nan or inf) at iteration 2") == 2, res.stderr[-3000:]
