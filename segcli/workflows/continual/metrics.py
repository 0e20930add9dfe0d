"""The metrics of continual learning (thesis 4.3.6, tables 4.11-4.12): base/new/all mIoU, forgetting."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Callable

import torch

from ...build import build_datasets, load_checkpoint
from ...engine.checkpoint import read_checkpoint
from ...engine.evaluate import evaluate_model
from ...engine.inference import prepare_for_inference
from ...errors import SegcliError
from .protocol import Tasks, seen_classes
from .step_file import STEP_FILE, per_class_acc, per_class_iou, read_step_file, write_step_file
from .task_data import task_eval_dataset


def _miou(iou: list[float | None], classes) -> float | None:
    values = [iou[c] for c in classes if iou[c] is not None and not math.isnan(iou[c])]
    return sum(values) / len(values) if values else None


def _step_scores(root: Path, tasks: Tasks, step: int, device, progress) -> tuple[list | None, list | None, str]:
    """Per-class IoU and Acc of step ``step``'s checkpoint: from its ``cl_step.json`` while that
    still describes ``last.pt``, else evaluated now (and cached). ``(None, None, reason)`` when missing."""
    task_dir = root / f"task{step}"
    checkpoint = task_dir / "last.pt"
    if not checkpoint.is_file():
        return None, None, f"missing {checkpoint}"
    recorded = read_step_file(task_dir, step)
    if recorded is not None:
        return recorded[0], recorded[1], STEP_FILE
    loaded = load_checkpoint(checkpoint, device=device)
    prepare_for_inference(loaded.model)
    info = loaded.meta.get("cl") or {}
    if tuple(tuple(t) for t in info.get("tasks", ())) != tasks or int(info.get("task", -1)) != step:
        return None, None, f"{checkpoint} is not step {step} of this protocol"
    (val_set,) = build_datasets(loaded.recipe, splits=("val",))
    metrics = evaluate_model(loaded.model, task_eval_dataset(val_set, tasks, step), loaded.recipe, device,
                             progress=progress)
    try:
        write_step_file(task_dir, step, metrics)
    except OSError:
        pass
    return per_class_iou(metrics), per_class_acc(metrics), "evaluated"


def cl_metrics(checkpoint: str | Path, metrics: dict, meta: dict | None = None, device=None,
               progress: Callable[[int, int], None] | None = None) -> dict:
    """The ``cl`` block of ``segcli eval --json`` for a cl-step checkpoint (thesis tables 4.11, 4.12).

    ``metrics`` is the evaluation of ``checkpoint`` itself (per-class IoU, percent; evaluate on
    :func:`cl_eval_dataset`), ``meta`` its metadata (read from the file when omitted). Earlier
    steps come from ``DIR/task{j}/last.pt`` next to ``DIR/task{t}/``: their ``cl_step.json``, or an
    evaluation on the spot. Without them ``avg_mIoU`` and the forgetting table are ``None``.

    Forgetting of task j (its classes ``{first, last}``, an inclusive range of class ids: tasks
    take classes in index order) = its mIoU right after step j minus its mIoU now, in points:
    positive = forgotten, negative = improved since (backward transfer). It is not clamped at 0,
    so an improvement shows as such. ``avg_forgetting`` averages it over the tasks learnt *before*
    the current step (the current task's is 0 by definition); ``None`` at step 1.
    """
    checkpoint = Path(checkpoint)
    meta = meta if meta is not None else read_checkpoint(checkpoint)["meta"]
    info = meta.get("cl")
    if not info:
        raise SegcliError("not the checkpoint of a continual-learning step", str(checkpoint),
                          "cl metrics need a checkpoint written by `segcli cl-step`")
    tasks = tuple(tuple(t) for t in info["tasks"])
    current = int(info["task"])
    device = torch.device(device) if device is not None else torch.device("cpu")
    root = checkpoint.parent.parent if checkpoint.parent.name == f"task{current}" else None

    steps, ious = [], {}
    for step in range(1, current + 1):
        if step == current:
            iou, acc, source = per_class_iou(metrics), per_class_acc(metrics), "this evaluation"
        elif root is None:
            iou, acc, source = None, None, f"{checkpoint} is not in a DIR/task{current}/ folder"
        else:
            iou, acc, source = _step_scores(root, tasks, step, device, progress)
        ious[step] = iou
        seen = seen_classes(tasks, step)
        new = seen[len(tasks[0]):]  # tasks 2..step
        steps.append({"task": step, "source": source,
                      "base_mIoU": _miou(iou, tasks[0]) if iou else None,
                      "new_mIoU": _miou(iou, new) if iou and new else None,
                      "all_mIoU": _miou(iou, seen) if iou else None,
                      "base_mAcc": _miou(acc, tasks[0]) if acc else None})

    forgetting = []
    for step in range(1, current + 1):
        first, last = ious[step], ious[current]
        row = {"task": step, "classes": {"first": tasks[step - 1][0], "last": tasks[step - 1][-1]},
               "first": _miou(first, tasks[step - 1]) if first else None, "last": _miou(last, tasks[step - 1])}
        row["forgetting"] = None if row["first"] is None or row["last"] is None else row["first"] - row["last"]
        forgetting.append(row)
    drops = [row["forgetting"] for row in forgetting[:-1]]  # the tasks learnt before this step
    all_steps = [s["all_mIoU"] for s in steps]
    here = steps[-1]
    return {
        "protocol": info["protocol"], "setting": info["setting"], "task": current, "num_tasks": len(tasks),
        "base_mIoU": here["base_mIoU"], "new_mIoU": here["new_mIoU"], "all_mIoU": here["all_mIoU"],
        "base_mAcc": here["base_mAcc"],
        "avg_mIoU": None if None in all_steps else sum(all_steps) / len(all_steps),
        "steps": steps,
        "forgetting": forgetting,
        "avg_forgetting": None if not drops or None in drops else sum(drops) / len(drops),
    }
