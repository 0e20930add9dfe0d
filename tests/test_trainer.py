"""The model-agnostic trainer and each of its hooks (engine/trainer.py, engine/hooks.py), on a
one-layer model: no dataset, no segmentor."""
from __future__ import annotations

import dataclasses
import json
import math
import os
import signal
from pathlib import Path

import pytest
import torch
from torch import nn

from segcli.api import load_recipe
from segcli.engine.hooks import CheckpointHook, EvalHook, HookBase, LogHook, LRScheduleHook, snapshot_paths
from segcli.engine.optim import build_optimizer, group_lr
from segcli.engine.trainer import Trainer, TrainResult
from segcli.errors import SegcliError

REPO = Path(__file__).resolve().parents[1]


class TinyModel(nn.Module):
    """Images [B, 2] -> {"loss"}; records the lr of its optimizer at each forward."""

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(2, 1)
        self.optimizer = None
        self.lrs: list[float] = []

    def forward(self, images, labels):
        self.lrs.append(self.optimizer.param_groups[0]["lr"])
        return {"loss": ((self.linear(images).squeeze(1) - labels) ** 2).mean()}


def batches():
    generator = torch.Generator().manual_seed(0)
    while True:
        yield {"image": torch.randn(4, 2, generator=generator), "label": torch.randn(4, generator=generator)}


def train_cfg(**changes):
    cfg = load_recipe(REPO / "recipes" / "tiny" / "setr.yaml").train
    return dataclasses.replace(cfg, **changes)


def make_trainer(cfg, hooks, start_iter: int = 0, best_miou: float = -1.0) -> Trainer:
    torch.manual_seed(0)
    model = TinyModel()
    optimizer = build_optimizer(model, cfg.optimizer)
    model.optimizer = optimizer
    scaler = torch.amp.GradScaler("cuda", enabled=False)
    return Trainer(model, model, optimizer, scaler, batches(), torch.device("cpu"), max_iters=cfg.max_iters,
                   start_iter=start_iter, best_miou=best_miou, hooks=hooks)


def checkpointer(tmp_path, cfg, events, **kw) -> CheckpointHook:
    return CheckpointHook(tmp_path / "last.pt", {"version": "test"}, cfg.eval_interval, cfg.checkpoint_interval,
                          cfg.keep_checkpoints, lambda event, info: events.append((event, info["iter"])), **kw)


def test_the_lr_hook_sets_the_schedules_lr_before_each_step():
    cfg = train_cfg(max_iters=6, warmup_iters=2)
    trainer = make_trainer(cfg, [LRScheduleHook(cfg)])
    trainer.train()
    expected = [group_lr(i, cfg) for i in range(6)]
    assert len(set(expected)) == 6  # warmup then decay: a constant lr would pass anything
    assert trainer.model.lrs == pytest.approx(expected, rel=1e-12)


def test_the_trainer_without_the_lr_hook_keeps_the_optimizers_lr():
    cfg = train_cfg(max_iters=3, warmup_iters=2)
    trainer = make_trainer(cfg, [])
    trainer.train()
    assert trainer.model.lrs == pytest.approx([cfg.optimizer.lr] * 3, rel=1e-12)


def test_the_checkpoint_hook_writes_after_evaluations_and_at_its_interval(tmp_path):
    cfg = train_cfg(max_iters=10, eval_interval=4, checkpoint_interval=3, keep_checkpoints=2)
    events = []
    trainer = make_trainer(cfg, [checkpointer(tmp_path, cfg, events)])
    trainer.train()
    assert events == [("checkpoint", it) for it in (3, 4, 6, 8, 9, 10)]
    assert [p.name for p in snapshot_paths(tmp_path)] == ["iter_9.pt", "iter_10.pt"]
    payload = torch.load(tmp_path / "last.pt", weights_only=True)
    assert payload["iteration"] == 10 and payload["version"] == "test"
    assert {"optimizer", "scaler", "rng", "model", "best_miou"} <= set(payload)
    assert torch.equal(payload["model"]["linear.weight"], trainer.model.linear.weight)


class SigintAt(HookBase):
    """A real Ctrl-C during step ``iteration``'s hooks."""

    def __init__(self, iteration: int):
        self.iteration = iteration

    def after_step(self):
        if self.trainer.iter == self.iteration:
            os.kill(os.getpid(), signal.SIGINT)


@pytest.mark.parametrize("stop_at, saves", [(5, [4, 5]), (4, [4])])
def test_ctrl_c_saves_last_at_the_boundary_once(tmp_path, stop_at, saves):
    """The step under way finishes; last.pt is written at that boundary unless it already holds it."""
    cfg = train_cfg(max_iters=10, eval_interval=4, checkpoint_interval=None, keep_checkpoints=None)
    events = []
    trainer = make_trainer(cfg, [checkpointer(tmp_path, cfg, events), SigintAt(stop_at)])
    with pytest.raises(KeyboardInterrupt):
        trainer.train()
    assert trainer.iter == stop_at and len(trainer.model.lrs) == stop_at  # no step after the boundary
    assert events == [("checkpoint", it) for it in saves]
    assert torch.load(tmp_path / "last.pt", weights_only=True)["iteration"] == stop_at


def scripted_eval(values):
    values = iter(values)
    return lambda: {"mIoU": next(values), "mAcc": 1.0, "aAcc": 2.0}


def test_the_eval_hook_tracks_the_best_and_never_a_nan(tmp_path):
    cfg = train_cfg(max_iters=5, eval_interval=1, checkpoint_interval=None, keep_checkpoints=None)
    events = []
    saver = checkpointer(tmp_path, cfg, events)
    hook = EvalHook(scripted_eval([10.0, float("nan"), 30.0, 20.0, 30.0]), cfg.eval_interval,
                    tmp_path / "metrics.jsonl", tmp_path / "best.pt", saver,
                    lambda event, info: events.append((event, info["iter"])))
    trainer = make_trainer(cfg, [hook, saver])
    trainer.train()
    best = torch.load(tmp_path / "best.pt", weights_only=True)
    assert best["iteration"] == 3 and best["best_miou"] == 30.0 and "optimizer" not in best
    assert trainer.best_miou == 30.0 and trainer.metrics["mIoU"] == 30.0
    assert torch.load(tmp_path / "last.pt", weights_only=True)["best_miou"] == 30.0
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["iter"] for r in records] == [1, 2, 3, 4, 5] and math.isnan(records[1]["mIoU"])
    assert [e for e in events if e[0] == "eval"] == [("eval", it) for it in range(1, 6)]
    assert trainer.model.training  # training mode back after each evaluation


def test_the_eval_hook_keeps_a_resumed_runs_best(tmp_path):
    cfg = train_cfg(max_iters=4, eval_interval=2)
    saver = checkpointer(tmp_path, cfg, [])
    hook = EvalHook(scripted_eval([40.0, 60.0]), cfg.eval_interval, tmp_path / "metrics.jsonl",
                    tmp_path / "best.pt", saver)
    trainer = make_trainer(cfg, [hook, saver], best_miou=50.0)
    trainer.train()
    assert torch.load(tmp_path / "best.pt", weights_only=True)["iteration"] == 4  # 40 < 50 wrote nothing


def test_an_evaluation_error_keeps_the_weights_and_says_where(tmp_path):
    cfg = train_cfg(max_iters=4, eval_interval=2)

    def broken():
        raise SegcliError("bad mask", "val/x.png", "fix it")

    saver = checkpointer(tmp_path, cfg, [])
    hook = EvalHook(broken, cfg.eval_interval, tmp_path / "metrics.jsonl", tmp_path / "best.pt", saver)
    trainer = make_trainer(cfg, [hook, saver])
    with pytest.raises(SegcliError, match="fix it; the weights trained so far are in .*last.pt"):
        trainer.train()
    assert torch.load(tmp_path / "last.pt", weights_only=True)["iteration"] == 2


def test_the_log_hook_writes_records_then_a_line_per_log_interval(tmp_path):
    cfg = train_cfg(max_iters=5, log_interval=2)
    steps = []
    hook = LogHook(tmp_path / "metrics.jsonl", cfg.log_interval, lambda event, info: steps.append(info),
                   records=({"event": "warning", "message": "m"},))
    trainer = make_trainer(cfg, [LRScheduleHook(cfg), hook], start_iter=1)
    trainer.train()
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert records[0] == {"iter": 1, "event": "warning", "message": "m"}  # tagged with the start iteration
    assert [r["iter"] for r in records[1:]] == [2, 4, 5]
    assert all(r["loss"] == r["loss"] and r["lr"] == pytest.approx(group_lr(r["iter"] - 1, cfg)) for r in records[1:])
    assert [s["iter"] for s in steps] == [2, 3, 4, 5] and steps[-1]["max_iters"] == 5


def test_a_non_finite_loss_stops_before_the_optimizer_steps():
    cfg = train_cfg(max_iters=3)
    trainer = make_trainer(cfg, [])

    def nan_batches():
        while True:
            yield {"image": torch.full((4, 2), float("nan")), "label": torch.zeros(4)}

    trainer.batches = nan_batches()
    before = trainer.model.linear.weight.detach().clone()
    with pytest.raises(SegcliError, match="non-finite .* at iteration 1"):
        trainer.train()
    assert torch.equal(trainer.model.linear.weight, before)


def test_train_result_json_keys(tmp_path):
    result = TrainResult(tmp_path, tmp_path / "last.pt", None, -1.0, {"mIoU": 1.0}, 4)
    assert json.loads(json.dumps(result.to_dict())) == {
        "work_dir": str(tmp_path), "last": str(tmp_path / "last.pt"), "best": None, "best_mIoU": -1.0,
        "iterations": 4, "metrics": {"mIoU": 1.0}}


def test_the_other_results_json_keys(tmp_path):
    from segcli.workflows.continual import CLStepResult
    from segcli.workflows.convert import ConvertResult
    from segcli.workflows.data_check import DataCheckResult
    from segcli.workflows.predict import PredictResult
    from segcli.workflows.prune import PruneResult

    cl = CLStepResult(2, 3, (4, 5), tmp_path, tmp_path / "last.pt", 7, tmp_path / "presence", {"mIoU": 1.0}, 9)
    assert json.loads(json.dumps(cl.to_dict())) == {
        "task": 2, "num_tasks": 3, "classes": [4, 5], "work_dir": str(tmp_path), "checkpoint": str(tmp_path / "last.pt"),
        "num_images": 7, "iterations": 9, "metrics": {"mIoU": 1.0}}
    assert PruneResult(tmp_path / "p.pt", 0.9, 3, (5, 7)).to_dict() == {
        "checkpoint": str(tmp_path / "p.pt"), "p0": 0.9, "k": 3, "exit_layers": [5, 7]}
    assert PruneResult(tmp_path / "p.pt", 0.9, 3, None).to_dict()["exit_layers"] is None
    predicted = PredictResult([tmp_path / "a.png"], [("b.jpg", "unreadable")], tmp_path)
    assert predicted.to_dict() == {"out": str(tmp_path), "written": [str(tmp_path / "a.png")],
                                   "failed": [{"path": "b.jpg", "reason": "unreadable"}]}
    report = DataCheckResult(("a", "b"), {"train": 2}, [3, 4], 5, [("x.png", "bad")])
    assert json.loads(json.dumps(report.to_dict())) == {
        "ok": False, "images": {"train": 2}, "classes": ["a", "b"], "pixels": [3, 4], "ignored_pixels": 5,
        "problems": [{"where": "x.png", "problem": "bad"}]}
    converted = ConvertResult(tmp_path / "m.pt", "segvit-v1", 10, 9, "r.yaml", "ViT-B")
    assert converted.to_dict() == {"path": str(tmp_path / "m.pt"), "format": "segvit-v1", "tensors_in": 10,
                                   "tensors_out": 9, "recipe": "r.yaml", "architecture": "ViT-B"}
