"""The hooks of the training loop (detectron2's ``HookBase``, ``engine/train_loop.py``).

:class:`~segcli.engine.trainer.Trainer` runs optimizer steps and nothing else; everything a run
does around them is a hook, called in the order given: the learning-rate schedule
(:class:`LRScheduleHook`), the step log (:class:`LogHook`: ``metrics.jsonl`` and the ``"step"``
event, which the console and TensorBoard read), evaluation with best-model tracking
(:class:`EvalHook`) and checkpoints (:class:`CheckpointHook`). The order is part of the contract:
the lr is set before the step; the step is logged before it is evaluated; ``last.pt`` is written
after the evaluation of its iteration, so its RNG state and ``best_miou`` are those a resumed run
must continue from.

Frozen parts (SegViT-CL's earlier tasks, DToP's ``freeze_backbone``) need no hook: the model
declares them (``FrozenPartsMixin.frozen_modules``), their parameters have no gradient so the
optimizer holds none of them, and the model's own ``train()`` keeps them in eval mode, also when
:class:`EvalHook` turns training mode back on after an evaluation. The engine knows no model.

Hooks read and write the trainer's state: ``iter`` (optimizer steps done), ``max_iters``, ``lr``,
``loss_terms``, ``best_miou``, ``metrics`` (the last evaluation), ``model``, ``optimizer``,
``scaler``, ``device``, ``dist_info``. Under DDP, rank 0 alone writes files.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import time
from pathlib import Path
from typing import Callable

import torch

from ..errors import SegcliError
from .checkpoint import save_checkpoint
from .distributed import DistInfo, all_reduce_numbers
from .optim import set_lr

Callback = Callable[[str, dict], None]


class HookBase:
    """A hook of the training loop; :meth:`Trainer.register` sets :attr:`trainer`."""

    trainer: "Trainer"  # engine/trainer.py's, which imports this module (so no import back)

    def before_train(self) -> None:
        pass

    def before_step(self) -> None:
        pass

    def after_step(self) -> None:
        """``trainer.iter`` already counts the step just taken."""

    def after_train(self) -> None:
        pass

    def on_interrupt(self) -> None:
        """Ctrl-C: the run stops at this iteration boundary (``trainer.iter`` steps done)."""


def due(iteration: int, interval: int, max_iters: int) -> bool:
    """Every ``interval`` iterations, and at the last one."""
    return iteration % interval == 0 or iteration == max_iters


def rng_state(device: torch.device) -> dict:
    state = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def append_jsonl(path: Path, record: dict) -> None:
    with path.open("a") as handle:
        handle.write(json.dumps(record) + "\n")


def truncate_jsonl(path: Path, after_iter: int) -> None:
    """Drop records newer than the checkpoint we resume from (written before a crash)."""
    if not path.exists():
        return
    kept = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line).get("iter", 0) <= after_iter]
    path.write_text("".join(line + "\n" for line in kept))


def snapshot_paths(work_dir: Path) -> list[Path]:
    """The ``iter_{N}.pt`` files of a work dir, oldest first."""
    found = [(int(p.stem[5:]), p) for p in Path(work_dir).glob("iter_*.pt") if p.stem[5:].isdigit()]
    return [p for _, p in sorted(found)]


def keep_snapshot(last_path: Path, iteration: int, keep: int) -> None:
    """``iter_{iteration}.pt`` beside ``last_path`` (a hard link to the file just written, a copy
    where links are not possible), then only the ``keep`` most recent of them."""
    snapshot = last_path.parent / f"iter_{iteration}.pt"
    snapshot.unlink(missing_ok=True)
    try:
        os.link(last_path, snapshot)  # last.pt is replaced by rename later, so the link keeps this state
    except OSError:
        shutil.copy2(last_path, snapshot)
    for old in snapshot_paths(last_path.parent)[:-keep]:
        old.unlink(missing_ok=True)


def mean_across_ranks(terms: dict[str, float], dist_info: DistInfo) -> dict[str, float]:
    return {key: value / dist_info.world_size for key, value in zip(terms, all_reduce_numbers(list(terms.values())))}


class LRScheduleHook(HookBase):
    """Sets every parameter group's lr for the step about to run (``train.optimizer``, warmup and
    poly decay: ``engine/optim.py``); the lr depends on the iteration alone, so a resumed run gets
    the same lr at the same iteration."""

    def __init__(self, train_cfg):
        self.train_cfg = train_cfg

    def before_step(self) -> None:
        self.trainer.lr = set_lr(self.trainer.optimizer, self.trainer.iter, self.train_cfg)


class LogHook(HookBase):
    """``metrics.jsonl`` (the caller's ``records`` before the first step; a loss record every
    ``log_interval`` steps and at the last) and the ``"step"`` event after every step.

    Under DDP the logged loss is the mean over the ranks (the global batch's, not rank 0's share);
    it is reduced at log steps only, so the other steps cost no all-reduce.
    """

    def __init__(self, metrics_path: Path, log_interval: int, callback: Callback, records: tuple[dict, ...] = ()):
        self.metrics_path = Path(metrics_path)
        self.log_interval = log_interval
        self.callback = callback
        self.records = tuple(records)

    def before_train(self) -> None:
        trainer = self.trainer
        if trainer.dist_info.is_main:
            for record in self.records:
                append_jsonl(self.metrics_path, {"iter": trainer.iter, **record})
        self.tic, self.tic_iter = time.perf_counter(), trainer.iter

    def after_step(self) -> None:
        trainer = self.trainer
        iteration, terms = trainer.iter, trainer.loss_terms
        if due(iteration, self.log_interval, trainer.max_iters):
            if trainer.dist_info.enabled:
                terms = mean_across_ranks(terms, trainer.dist_info)
            elapsed = time.perf_counter() - self.tic
            speed = (iteration - self.tic_iter) / elapsed if elapsed > 0 else 0.0
            record = {"iter": iteration, "lr": trainer.lr, "loss": sum(terms.values()), **terms, "it_per_s": speed}
            if trainer.dist_info.is_main:
                append_jsonl(self.metrics_path, record)
            self.tic, self.tic_iter = time.perf_counter(), iteration
        self.callback("step", {"iter": iteration, "max_iters": trainer.max_iters, "lr": trainer.lr,
                               "loss": sum(terms.values())})


class CheckpointHook(HookBase):
    """``last.pt`` after each evaluation (every ``eval_interval`` steps and at the last), every
    ``checkpoint_interval`` steps between them, and at a Ctrl-C boundary; with ``keep``, also
    ``iter_{N}.pt`` snapshots, the ``keep`` newest kept. Writes are atomic (``save_checkpoint``).

    ``header`` (version, recipe, meta) opens every payload. :meth:`weights_at` is what ``best.pt``
    holds (enough to evaluate, predict, prune or fine-tune from); :meth:`payload_at` adds what
    resuming needs (optimizer, scaler, RNG states), for ``last.pt`` and the snapshots.
    """

    def __init__(self, last_path: Path, header: dict, eval_interval: int, checkpoint_interval: int | None = None,
                 keep: int | None = None, callback: Callback | None = None, saved_at: int = -1):
        self.last_path = Path(last_path)
        self.header = header
        self.eval_interval = eval_interval
        self.checkpoint_interval = checkpoint_interval
        self.keep = keep
        self.callback = callback or (lambda event, info: None)
        self.saved_at = saved_at  # the iteration last.pt holds (a resumed run's start)

    def weights_at(self, iteration: int) -> dict:
        model = self.trainer.model
        return {**self.header, "model": model.state_dict(), "iteration": iteration, "best_miou": self.trainer.best_miou}

    def payload_at(self, iteration: int) -> dict:
        trainer = self.trainer
        return {**self.weights_at(iteration), "optimizer": trainer.optimizer.state_dict(),
                "scaler": trainer.scaler.state_dict(), "rng": rng_state(trainer.device)}

    def save_last(self, iteration: int) -> None:
        self.saved_at = iteration
        if self.trainer.dist_info.is_main:
            save_checkpoint(self.last_path, self.payload_at(iteration))
            if self.keep:
                keep_snapshot(self.last_path, iteration, self.keep)
            self.callback("checkpoint", {"path": str(self.last_path), "iter": iteration})

    def after_step(self) -> None:
        iteration = self.trainer.iter
        if due(iteration, self.eval_interval, self.trainer.max_iters) or (
                self.checkpoint_interval and iteration % self.checkpoint_interval == 0):
            self.save_last(iteration)

    def on_interrupt(self) -> None:
        if self.saved_at != self.trainer.iter:
            self.save_last(self.trainer.iter)


class EvalHook(HookBase):
    """Evaluates every ``eval_interval`` steps and at the last: a record in ``metrics.jsonl``, the
    ``"eval"`` event, and ``best.pt`` when the mIoU beats every earlier one (``trainer.best_miou``,
    carried by the checkpoints, so a resumed run keeps its best). A NaN mIoU is never best.

    ``evaluate()`` returns the metrics dict (``mIoU``, ``mAcc``, ``aAcc``, ...). A user error
    raised by it (a bad validation mask) first saves ``last.pt``: the weights trained so far are
    kept, and the error says where they are.
    """

    def __init__(self, evaluate: Callable[[], dict], eval_interval: int, metrics_path: Path, best_path: Path,
                 checkpointer: CheckpointHook, callback: Callback | None = None):
        self.evaluate = evaluate
        self.eval_interval = eval_interval
        self.metrics_path = Path(metrics_path)
        self.best_path = Path(best_path)
        self.checkpointer = checkpointer
        self.callback = callback or (lambda event, info: None)

    def after_step(self) -> None:
        trainer = self.trainer
        iteration = trainer.iter
        if not due(iteration, self.eval_interval, trainer.max_iters):
            return
        try:
            metrics = self.evaluate()
        except SegcliError as err:  # e.g. a bad validation mask: keep what was trained
            self.checkpointer.save_last(iteration)
            last = self.checkpointer.last_path
            hint = f"{err.hint}; " if err.hint else ""
            raise SegcliError(err.message, err.where, f"{hint}the weights trained so far are in {last}: fix the "
                                                      f"data, then `segcli eval {last}`") from None
        if trainer.dist_info.is_main:
            append_jsonl(self.metrics_path, {"iter": iteration, "mIoU": metrics["mIoU"], "mAcc": metrics["mAcc"],
                                             "aAcc": metrics["aAcc"]})
            if not math.isnan(metrics["mIoU"]) and metrics["mIoU"] > trainer.best_miou:
                trainer.best_miou = metrics["mIoU"]
                save_checkpoint(self.best_path, self.checkpointer.weights_at(iteration))
        self.callback("eval", {"iter": iteration, **metrics})
        trainer.metrics = metrics
        trainer.model.train()
