"""The iteration-based training loop (model-agnostic).

One iteration = one optimizer step over ``data.batch_size`` samples, the global batch: each of
the W processes runs ``train.accum_steps`` micro-batches of ``batch_size / (W * accum_steps)``
samples, so accumulation keeps the global batch instead of multiplying it (MMSegmentation's
global batch is ``gpus * samples_per_gpu`` per step). The data of iteration ``i`` depends only on
(seed, i) (``data/loader.py``), the lr only on the iteration, and checkpoints carry the
optimizer, scaler and torch RNG states, so ``resume`` continues exactly where ``last.pt`` was
written. Ctrl-C (SIGINT) finishes the iteration under way, with its evaluation and checkpoint when
they are due, then writes ``last.pt`` at that iteration and leaves with ``KeyboardInterrupt``:
state saved from the middle of an iteration (weights stepped, RNG advanced, an evaluation
skipped) would resume as another run. A second Ctrl-C leaves at once, keeping the last
checkpoint written. Under DDP the ranks agree on stopping (the flag is reduced every iteration). Under DDP, rank 0 alone writes files; every rank
evaluates its share and the confusion matrices are summed.

Events reach the caller through ``callback(event, info)``: ``"warning"`` (``train.init_from``
left tensors out), ``"step"`` (iteration, lr, loss), ``"eval"`` (metrics), ``"checkpoint"`` (path).
The library never prints. ``records`` given by
the caller (e.g. how the run differs from its published experiment) are appended to
``metrics.jsonl`` before the first iteration, tagged with the iteration they start at.

:class:`Trainer` is the loop alone (detectron2's ``TrainerBase``): it knows no model, recipe or
file; the lr schedule, logging, evaluation and checkpoints are hooks (``engine/hooks.py``), which
:func:`run_training` builds from the recipe.
"""
from __future__ import annotations

import math
import signal
import threading
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import torch
from torch import nn

from ..version import __version__
from ..errors import SegcliError
from .checkpoint import load_model_state, read_checkpoint
from .distributed import DistInfo, all_reduce_numbers
from .evaluate import evaluate_model
from .hooks import Callback, CheckpointHook, EvalHook, HookBase, LogHook, LRScheduleHook, set_rng_state, truncate_jsonl
from .optim import build_optimizer

@dataclass
class TrainResult:
    work_dir: Path
    last: Path
    best: Path | None
    best_miou: float
    metrics: dict | None
    iterations: int

    def to_dict(self) -> dict:
        """The ``train --json`` object."""
        return {"work_dir": str(self.work_dir), "last": str(self.last), "best": str(self.best) if self.best else None,
                "best_mIoU": self.best_miou, "iterations": self.iterations, "metrics": self.metrics}


def amp_dtype(setting: str, device: torch.device) -> torch.dtype | None:
    if device.type != "cuda" or setting == "off":
        return None
    if setting == "fp16":
        return torch.float16
    return torch.bfloat16  # "auto" and "bf16"


class IterationBoundaryInterrupt:
    """While active (main thread only), SIGINT sets :attr:`requested` instead of raising; the loop
    stops at the next iteration boundary. The first SIGINT puts the previous handler back, so a
    second one interrupts at once."""

    def __init__(self):
        self.requested = False
        self._previous = None

    def _handle(self, signum, frame) -> None:
        self.requested = True
        signal.signal(signal.SIGINT, self._previous)

    def __enter__(self) -> "IterationBoundaryInterrupt":
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.getsignal(signal.SIGINT)
            signal.signal(signal.SIGINT, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)

    def stop(self, dist_info: DistInfo) -> bool:
        """Whether to stop now; under DDP, whether any rank was interrupted (all ranks agree)."""
        if not dist_info.enabled:
            return self.requested
        return all_reduce_numbers([float(self.requested)], op="max")[0] > 0


def init_weights_from(model: nn.Module, path: str) -> list[str]:
    """Load the weights of checkpoint ``path`` that fit ``model`` (``train.init_from``); returns one
    line for each kind of tensor left out (missing from the file, not in the model, another shape),
    which the caller reports as warnings. Refuses a checkpoint of which nothing fits.

    Decision: a partial start is allowed (a DToP fine-tune adds heads; a new class count reshapes
    the classifier) but never silent: a base model of another head layout would otherwise start its
    fine-tune with random heads and say nothing.
    """
    payload = read_checkpoint(path)
    own, theirs = model.state_dict(), payload["model"]
    state = {k: v for k, v in theirs.items() if k in own and own[k].shape == v.shape}
    if not state:
        raise SegcliError("no weights of this checkpoint fit the model", "train.init_from",
                          "give a checkpoint of this architecture (train.init_from)")
    model.load_state_dict(state, strict=False)

    def listed(keys: list[str]) -> str:
        return ", ".join(keys[:4]) + (f" and {len(keys) - 4} more" if len(keys) > 4 else "")

    missing = sorted(k for k in own if k not in theirs)
    unexpected = sorted(k for k in theirs if k not in own)
    reshaped = sorted(k for k in theirs if k in own and own[k].shape != theirs[k].shape)
    lines = []
    if missing:
        lines.append(f"train.init_from {path}: {len(missing)} tensors of the model are not in it and keep their "
                     f"initial values: {listed(missing)}")
    if unexpected:
        lines.append(f"train.init_from {path}: {len(unexpected)} of its tensors are not in the model and were "
                     f"left out: {listed(unexpected)}")
    if reshaped:
        lines.append(f"train.init_from {path}: {len(reshaped)} of its tensors have another shape in the model and "
                     f"were left out: " + ", ".join(f"{k} {tuple(theirs[k].shape)} -> {tuple(own[k].shape)}"
                                                   for k in reshaped[:4]) + (f" and {len(reshaped) - 4} more"
                                                                               if len(reshaped) > 4 else ""))
    return lines


def _finite_on_every_rank(loss: float, dist_info: DistInfo) -> bool:
    """Whether the loss is finite on every process. A check that stops one rank is reduced first:
    a rank that raised alone would leave the others blocked in the next all-reduce forever."""
    if not dist_info.enabled:
        return math.isfinite(loss)
    return all_reduce_numbers([0.0 if math.isfinite(loss) else 1.0], op="max")[0] == 0.0


class Trainer:
    """Optimizer steps from ``iter`` to ``max_iters``, with hooks around them (detectron2's
    ``TrainerBase``). A step draws ``accum_steps`` micro-batches from ``batches`` (dicts with
    ``image`` and ``label``), calls ``run_model(images, labels)`` for a dict of losses under
    autocast (``amp``), and steps ``optimizer`` through ``scaler``, clipping the gradient norm
    of ``model`` (the module under any DDP wrapper ``run_model``) to ``grad_clip`` when set.

    Ctrl-C: the step under way finishes with its hooks; at the next boundary every hook's
    ``on_interrupt`` runs, then ``KeyboardInterrupt`` (module docstring).
    """

    def __init__(self, model: nn.Module, run_model: nn.Module, optimizer: torch.optim.Optimizer, scaler,
                 batches: Iterator[dict], device: torch.device, dist_info: DistInfo = DistInfo(), *,
                 max_iters: int, start_iter: int = 0, accum_steps: int = 1, grad_clip: float | None = None,
                 amp: torch.dtype | None = None, best_miou: float = -1.0, hooks: Sequence[HookBase] = ()):
        self.model, self.run_model, self.optimizer, self.scaler = model, run_model, optimizer, scaler
        self.batches, self.device, self.dist_info = batches, device, dist_info
        self.iter, self.max_iters = start_iter, max_iters
        self.accum_steps, self.grad_clip, self.amp = accum_steps, grad_clip, amp
        self.best_miou = best_miou
        self.lr: float | None = None  # set by LRScheduleHook
        self.loss_terms: dict[str, float] = {}  # the last step's losses (means over its micro-batches)
        self.metrics: dict | None = None  # the last evaluation (EvalHook)
        self.hooks: list[HookBase] = []
        self.register(hooks)

    def register(self, hooks: Sequence[HookBase]) -> None:
        for hook in hooks:
            hook.trainer = self
            self.hooks.append(hook)

    def train(self) -> None:
        self.model.train()
        for hook in self.hooks:
            hook.before_train()
        with IterationBoundaryInterrupt() as interrupt:
            while self.iter < self.max_iters:
                if interrupt.stop(self.dist_info):  # Ctrl-C: leave at this boundary, hooks first
                    for hook in self.hooks:
                        hook.on_interrupt()
                    raise KeyboardInterrupt
                for hook in self.hooks:
                    hook.before_step()
                self.run_step()
                self.iter += 1
                for hook in self.hooks:
                    hook.after_step()
        for hook in self.hooks:
            hook.after_train()

    def run_step(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        loss_terms: dict[str, float] = {}
        for micro in range(self.accum_steps):
            batch = next(self.batches)
            images = batch["image"].to(self.device, non_blocking=True)
            labels = batch["label"].to(self.device, non_blocking=True)
            last = micro == self.accum_steps - 1
            sync = nullcontext() if (last or not self.dist_info.enabled) else self.run_model.no_sync()
            with sync:
                with torch.autocast(self.device.type, dtype=self.amp, enabled=self.amp is not None):
                    losses = self.run_model(images, labels)
                loss = sum(losses.values())
                self.scaler.scale(loss / self.accum_steps).backward()
            for key, value in losses.items():
                loss_terms[key] = loss_terms.get(key, 0.0) + float(value.detach()) / self.accum_steps
        if not _finite_on_every_rank(sum(loss_terms.values()), self.dist_info):  # decided together: no rank waits
            raise SegcliError(f"the loss became non-finite (nan or inf) at iteration {self.iter + 1}",
                              "train.optimizer.lr", "lower the learning rate or enable grad_clip")
        if self.grad_clip:
            self.scaler.unscale_(self.optimizer)
            nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.loss_terms = loss_terms


def run_training(
    recipe,
    model: nn.Module,
    train_set,
    val_set,
    work_dir: Path,
    meta: dict,
    device: torch.device,
    dist_info: DistInfo = DistInfo(),
    resume: bool = False,
    callback: Callback | None = None,
    resume_state: dict | None = None,
    records: tuple[dict, ...] = (),
) -> TrainResult:
    """Train ``model`` into ``work_dir``; with ``resume``, continue from ``resume_state`` (the payload
    of ``last.pt``, already read and checked by the caller) or else from ``work_dir/last.pt``."""
    from ..data import build_train_loader

    callback = callback or (lambda event, info: None)
    cfg = recipe.train
    work_dir = Path(work_dir)
    last_path, best_path, metrics_path = work_dir / "last.pt", work_dir / "best.pt", work_dir / "metrics.jsonl"
    torch.manual_seed(cfg.seed)

    core = model.to(device)
    init_warnings = init_weights_from(core, cfg.init_from) if cfg.init_from and not resume else []
    run_model = core
    if dist_info.enabled:
        if device.type == "cuda" and recipe.model.sync_bn:
            core = nn.SyncBatchNorm.convert_sync_batchnorm(core)
        run_model = nn.parallel.DistributedDataParallel(
            core, device_ids=[device.index] if device.type == "cuda" else None, find_unused_parameters=False)
    optimizer = build_optimizer(core, cfg.optimizer)
    dtype = amp_dtype(cfg.amp, device)
    scaler = torch.amp.GradScaler("cuda", enabled=dtype == torch.float16)

    start_iter, best_miou = 0, -1.0
    if resume:
        if resume_state is None and not last_path.is_file():
            raise SegcliError("nothing to resume: no last.pt", str(work_dir), "drop --resume to start a new run")
        payload = resume_state if resume_state is not None else read_checkpoint(last_path)
        load_model_state(core, payload["model"], str(last_path))
        optimizer.load_state_dict(payload["optimizer"])
        scaler.load_state_dict(payload["scaler"])
        start_iter = int(payload["iteration"])
        best_miou = float(payload.get("best_miou", -1.0))
        set_rng_state(payload["rng"], device)
        if dist_info.is_main:
            truncate_jsonl(metrics_path, start_iter)
    elif dist_info.is_main and metrics_path.exists():
        metrics_path.unlink()

    loader = build_train_loader(train_set, recipe.data.batch_size, recipe.data.num_workers, cfg.seed,
                                dist_info.rank, dist_info.world_size, start_iter=start_iter,
                                accum_steps=cfg.accum_steps)
    for message in init_warnings:
        callback("warning", {"message": message})
    records = tuple(records) + tuple({"event": "warning", "message": message} for message in init_warnings)
    header = {"version": __version__, "recipe": recipe.to_dict(), "meta": meta}
    checkpointer = CheckpointHook(last_path, header, cfg.eval_interval, cfg.checkpoint_interval, cfg.keep_checkpoints,
                                  callback, saved_at=start_iter if resume else -1)
    hooks = [
        LRScheduleHook(cfg),
        LogHook(metrics_path, cfg.log_interval, callback, records),
        EvalHook(lambda: evaluate_model(core, val_set, recipe, device, dist_info), cfg.eval_interval, metrics_path,
                 best_path, checkpointer, callback),
        checkpointer,  # after EvalHook: last.pt holds the evaluation's best_miou and the RNG after it
    ]
    trainer = Trainer(core, run_model, optimizer, scaler, iter(loader), device, dist_info, max_iters=cfg.max_iters,
                      start_iter=start_iter, accum_steps=cfg.accum_steps, grad_clip=cfg.grad_clip, amp=dtype,
                      best_miou=best_miou, hooks=hooks)
    trainer.train()
    return TrainResult(work_dir, last_path, best_path if best_path.exists() else None, trainer.best_miou,
                       trainer.metrics, trainer.iter)
