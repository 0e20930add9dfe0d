"""``DIR/task{N}/cl_step.json``: the per-class scores of a step's ``last.pt``, reused by the metrics."""
from __future__ import annotations

import json
from pathlib import Path

EVAL_VERSION = 3  # of the step evaluation in cl_step.json (2: later classes' pixels counted; 3: + Acc)
STEP_FILE = "cl_step.json"


def checkpoint_key(path: Path) -> dict:
    stat = path.stat()
    return {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def per_class_iou(metrics: dict) -> list[float | None]:
    return [row["IoU"] for row in metrics["per_class"]]


def per_class_acc(metrics: dict) -> list[float | None]:
    return [row["Acc"] for row in metrics["per_class"]]


def write_step_file(task_dir: Path, task: int, metrics: dict) -> None:
    record = {"task": task, "checkpoint": checkpoint_key(task_dir / "last.pt"), "mIoU": metrics["mIoU"],
              "per_class_iou": per_class_iou(metrics), "per_class_acc": per_class_acc(metrics),
              "eval_version": EVAL_VERSION}
    (task_dir / STEP_FILE).write_text(json.dumps(record, indent=1))


def read_step_file(task_dir: Path, task: int) -> tuple[list, list] | None:
    """(per-class IoU, per-class Acc) of ``task_dir``'s record while it still describes its ``last.pt``."""
    try:
        record = json.loads((task_dir / STEP_FILE).read_text())
        if (record["checkpoint"] == checkpoint_key(task_dir / "last.pt") and record["task"] == task
                and record.get("eval_version") == EVAL_VERSION):
            return record["per_class_iou"], record["per_class_acc"]
    except (OSError, ValueError, KeyError):
        pass
    return None
