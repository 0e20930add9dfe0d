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

Events reach the caller through ``callback(event, info)``: ``"step"`` (iteration, lr, losses,
it/s), ``"eval"`` (metrics), ``"checkpoint"`` (path). The library never prints. ``records`` given by
the caller (e.g. how the run differs from its published experiment) are appended to
``metrics.jsonl`` before the first iteration, tagged with the iteration they start at.
"""
from __future__ import annotations

import json
import math
import signal
import threading
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from ..version import __version__
from ..errors import SegcliError
from .checkpoint import load_model_state, read_checkpoint, save_checkpoint
from .distributed import DistInfo, all_reduce_numbers
from .evaluate import evaluate_model
from .optim import build_optimizer, set_lr

Callback = Callable[[str, dict], None]


@dataclass
class TrainResult:
    work_dir: Path
    last: Path
    best: Path | None
    best_miou: float
    metrics: dict | None
    iterations: int


def amp_dtype(setting: str, device: torch.device) -> torch.dtype | None:
    if device.type != "cuda" or setting == "off":
        return None
    if setting == "fp16":
        return torch.float16
    return torch.bfloat16  # "auto" and "bf16"


def _rng_state(device: torch.device) -> dict:
    state = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def _append_jsonl(path: Path, record: dict) -> None:
    with path.open("a") as handle:
        handle.write(json.dumps(record) + "\n")


def _truncate_jsonl(path: Path, after_iter: int) -> None:
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
    import os
    import shutil

    snapshot = last_path.parent / f"iter_{iteration}.pt"
    snapshot.unlink(missing_ok=True)
    try:
        os.link(last_path, snapshot)  # last.pt is replaced by rename later, so the link keeps this state
    except OSError:
        shutil.copy2(last_path, snapshot)
    for old in snapshot_paths(last_path.parent)[:-keep]:
        old.unlink(missing_ok=True)


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


def _mean_across_ranks(terms: dict[str, float], dist_info: DistInfo) -> dict[str, float]:
    return {key: value / dist_info.world_size for key, value in zip(terms, all_reduce_numbers(list(terms.values())))}


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
    if dist_info.enabled:
        if device.type == "cuda" and recipe.model.sync_bn:
            core = nn.SyncBatchNorm.convert_sync_batchnorm(core)
        ddp = nn.parallel.DistributedDataParallel(
            core, device_ids=[device.index] if device.type == "cuda" else None, find_unused_parameters=False)
        run_model = ddp
    else:
        run_model = core
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
        _set_rng_state(payload["rng"], device)
        if dist_info.is_main:
            _truncate_jsonl(metrics_path, start_iter)
    elif dist_info.is_main and metrics_path.exists():
        metrics_path.unlink()

    def weights_at(iteration: int) -> dict:
        """What best.pt holds: enough to evaluate, predict, prune or fine-tune from, not to resume."""
        return {
            "version": __version__,
            "recipe": recipe.to_dict(),
            "meta": meta,
            "model": core.state_dict(),
            "iteration": iteration,
            "best_miou": best_miou,
        }

    def payload_at(iteration: int) -> dict:
        """What last.pt (and iter_N.pt) hold: the weights and everything that resuming needs."""
        return {
            **weights_at(iteration),
            "optimizer": optimizer.state_dict(),
            "scaler": scaler.state_dict(),
            "rng": _rng_state(device),
        }

    saved_at = [start_iter if resume else -1]  # the iteration last.pt holds

    def save_last(iteration: int) -> None:
        saved_at[0] = iteration
        if dist_info.is_main:
            save_checkpoint(last_path, payload_at(iteration))
            if cfg.keep_checkpoints:
                keep_snapshot(last_path, iteration, cfg.keep_checkpoints)
            callback("checkpoint", {"path": str(last_path), "iter": iteration})

    def evaluate(iteration: int) -> dict:
        nonlocal best_miou
        metrics = evaluate_model(core, val_set, recipe, device, dist_info)
        record = {"iter": iteration, "mIoU": metrics["mIoU"], "mAcc": metrics["mAcc"], "aAcc": metrics["aAcc"]}
        if dist_info.is_main:
            _append_jsonl(metrics_path, record)
            if not math.isnan(metrics["mIoU"]) and metrics["mIoU"] > best_miou:
                best_miou = metrics["mIoU"]
                save_checkpoint(best_path, weights_at(iteration))
        callback("eval", {"iter": iteration, **metrics})
        return metrics

    loader = build_train_loader(train_set, recipe.data.batch_size, recipe.data.num_workers, cfg.seed,
                                dist_info.rank, dist_info.world_size, start_iter=start_iter,
                                accum_steps=cfg.accum_steps)
    for message in init_warnings:
        callback("warning", {"message": message})
    records = tuple(records) + tuple({"event": "warning", "message": message} for message in init_warnings)
    if dist_info.is_main:
        for record in records:
            _append_jsonl(metrics_path, {"iter": start_iter, **record})
    batches = iter(loader)
    metrics = None
    iteration = start_iter
    core.train()
    tic, tic_iter = time.perf_counter(), start_iter
    with IterationBoundaryInterrupt() as interrupt:
        while iteration < cfg.max_iters:
            if interrupt.stop(dist_info):  # Ctrl-C: leave at this boundary, with last.pt at it
                if saved_at[0] != iteration:
                    save_last(iteration)
                raise KeyboardInterrupt
            lr = set_lr(optimizer, iteration, cfg)
            optimizer.zero_grad(set_to_none=True)
            loss_terms: dict[str, float] = {}
            for micro in range(cfg.accum_steps):
                batch = next(batches)
                images = batch["image"].to(device, non_blocking=True)
                labels = batch["label"].to(device, non_blocking=True)
                sync = nullcontext() if (micro == cfg.accum_steps - 1 or not dist_info.enabled) else run_model.no_sync()
                with sync:
                    with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
                        losses = run_model(images, labels)
                    loss = sum(losses.values())
                    scaler.scale(loss / cfg.accum_steps).backward()
                for key, value in losses.items():
                    loss_terms[key] = loss_terms.get(key, 0.0) + float(value.detach()) / cfg.accum_steps
            total = sum(loss_terms.values())
            if not _finite_on_every_rank(total, dist_info):  # decided together: no rank waits for one that left
                raise SegcliError(f"the loss became non-finite (nan or inf) at iteration {iteration + 1}",
                                  "train.optimizer.lr", "lower the learning rate or enable grad_clip")
            if cfg.grad_clip:
                scaler.unscale_(optimizer)
                nn.utils.clip_grad_norm_(core.parameters(), cfg.grad_clip)
            scaler.step(optimizer)
            scaler.update()
            iteration += 1
            if iteration % cfg.log_interval == 0 or iteration == cfg.max_iters:
                if dist_info.enabled:  # log the global batch's loss, not rank 0's share
                    loss_terms = _mean_across_ranks(loss_terms, dist_info)
                    total = sum(loss_terms.values())
                elapsed = time.perf_counter() - tic
                speed = (iteration - tic_iter) / elapsed if elapsed > 0 else 0.0
                record = {"iter": iteration, "lr": lr, "loss": total, **loss_terms, "it_per_s": speed}
                if dist_info.is_main:
                    _append_jsonl(metrics_path, record)
                tic, tic_iter = time.perf_counter(), iteration
            callback("step", {"iter": iteration, "max_iters": cfg.max_iters, "lr": lr, "loss": total})
            if iteration % cfg.eval_interval == 0 or iteration == cfg.max_iters:
                try:
                    metrics = evaluate(iteration)
                except SegcliError as err:  # e.g. a bad validation mask: keep what was trained
                    save_last(iteration)
                    hint = f"{err.hint}; " if err.hint else ""
                    raise SegcliError(err.message, err.where,
                                      f"{hint}the weights trained so far are in {last_path}: fix the data, then "
                                      f"`segcli eval {last_path}`") from None
                core.train()
                save_last(iteration)
            elif cfg.checkpoint_interval and iteration % cfg.checkpoint_interval == 0:
                save_last(iteration)
    return TrainResult(work_dir, last_path, best_path if best_path.exists() else None, best_miou, metrics, iteration)
