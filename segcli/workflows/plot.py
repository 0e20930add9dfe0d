"""Training curves of a run as a PNG (``segcli plot``), drawn with OpenCV alone (no matplotlib).

Two panels from ``metrics.jsonl``: the training loss by iteration (the log records) and the
validation mIoU by iteration (the eval records), each with its axis range written at the ticks.
"""
from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np

from ..errors import SegcliError
from ..outputs import IMAGE_SUFFIXES, check_outputs

PANEL = (420, 640)  # (H, W) of one panel
MARGIN = (40, 70, 50, 20)  # top, left, bottom, right
FONT = cv2.FONT_HERSHEY_SIMPLEX


def read_metrics(run_dir: str | Path) -> tuple[list[tuple[int, float]], list[tuple[int, float]]]:
    """``(loss by iteration, mIoU by iteration)`` from ``RUN_DIR/metrics.jsonl``."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise SegcliError("no metrics.jsonl here", str(run_dir), "give the work dir of a `segcli train` run")
    loss, miou = [], []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            raise SegcliError("not a JSON line", f"{path}:{number}", "metrics.jsonl is written by segcli train") from None
        if "loss" in record:
            loss.append((int(record["iter"]), float(record["loss"])))
        if record.get("mIoU") is not None:
            miou.append((int(record["iter"]), float(record["mIoU"])))
    if not loss and not miou:
        raise SegcliError("metrics.jsonl holds no loss or mIoU yet", str(path), "plot again after the first log step")
    return loss, miou


def _nice(value: float) -> str:
    return f"{value:.3g}" if abs(value) < 1000 else f"{value:.0f}"


def draw_panel(points: list[tuple[int, float]], title: str, color: tuple[int, int, int]) -> np.ndarray:
    """One panel ``[H, W, 3]`` BGR: axes, 5 ticks per axis with values, the curve (dots when few)."""
    height, width = PANEL
    top, left, bottom, right = MARGIN
    canvas = np.full((height, width, 3), 255, np.uint8)
    cv2.putText(canvas, title, (left, 26), FONT, 0.65, (0, 0, 0), 1, cv2.LINE_AA)
    x0, y0, x1, y1 = left, height - bottom, width - right, top  # plot area (y grows downwards)
    cv2.rectangle(canvas, (x0, y1), (x1, y0), (0, 0, 0), 1)
    if not points:
        cv2.putText(canvas, "no records", (x0 + 20, (y0 + y1) // 2), FONT, 0.6, (120, 120, 120), 1, cv2.LINE_AA)
        return canvas
    xs = np.array([p[0] for p in points], np.float64)
    ys = np.array([p[1] for p in points], np.float64)
    finite = np.isfinite(ys)
    xs, ys = xs[finite], ys[finite]
    lo_x, hi_x = (0.0, float(xs.max()) or 1.0) if len(xs) else (0.0, 1.0)
    lo_y, hi_y = (float(ys.min()), float(ys.max())) if len(ys) else (0.0, 1.0)
    if hi_y - lo_y < 1e-9:
        lo_y, hi_y = lo_y - 0.5, hi_y + 0.5
    pad = 0.05 * (hi_y - lo_y)
    lo_y, hi_y = lo_y - pad, hi_y + pad

    def to_px(x: np.ndarray, y: np.ndarray) -> np.ndarray:
        px = x0 + (x - lo_x) / (hi_x - lo_x) * (x1 - x0)
        py = y0 - (y - lo_y) / (hi_y - lo_y) * (y0 - y1)
        return np.stack([px, py], 1).round().astype(np.int32)  # [N, 2]

    for i in range(5):
        fx, fy = lo_x + i * (hi_x - lo_x) / 4, lo_y + i * (hi_y - lo_y) / 4
        (px, _), (_, py) = to_px(np.array([fx]), np.array([lo_y]))[0], to_px(np.array([lo_x]), np.array([fy]))[0]
        cv2.line(canvas, (int(px), y0), (int(px), y0 + 5), (0, 0, 0), 1)
        cv2.putText(canvas, f"{fx:.0f}", (int(px) - 14, y0 + 20), FONT, 0.42, (0, 0, 0), 1, cv2.LINE_AA)
        cv2.line(canvas, (x0 - 5, int(py)), (x0, int(py)), (0, 0, 0), 1)
        cv2.line(canvas, (x0 + 1, int(py)), (x1 - 1, int(py)), (230, 230, 230), 1)
        cv2.putText(canvas, _nice(fy), (4, int(py) + 4), FONT, 0.42, (0, 0, 0), 1, cv2.LINE_AA)
    cv2.putText(canvas, "iteration", ((x0 + x1) // 2 - 30, height - 12), FONT, 0.45, (0, 0, 0), 1, cv2.LINE_AA)
    pixels = to_px(xs, ys)
    if len(pixels) > 1:
        cv2.polylines(canvas, [pixels.reshape(-1, 1, 2)], False, color, 2, cv2.LINE_AA)
    if len(pixels) <= 40:
        for px, py in pixels:
            cv2.circle(canvas, (int(px), int(py)), 3, color, -1, cv2.LINE_AA)
    return canvas


def plot_run(run_dir: str | Path, out: str | Path | None = None, overwrite: bool = False) -> Path:
    """Write the loss and mIoU curves of a run to ``out`` (default ``RUN_DIR/curves.png``)."""
    out = Path(out) if out is not None else Path(run_dir) / "curves.png"
    loss, miou = read_metrics(run_dir)  # a missing input is told first
    check_outputs([out], inputs=[Path(run_dir) / "metrics.jsonl"], overwrite=overwrite, suffixes=IMAGE_SUFFIXES,
                  input_name="metrics file")
    best = f" (best {max(v for _, v in miou):.2f})" if miou else ""
    figure = np.concatenate([draw_panel(loss, "training loss", (180, 90, 20)),
                             draw_panel(miou, f"validation mIoU{best}", (40, 140, 40))], axis=1)  # [H, 2W, 3]
    out.parent.mkdir(parents=True, exist_ok=True)
    if not cv2.imwrite(str(out), figure):
        raise SegcliError("cannot write the image", str(out), "check that the folder is writable")
    return out
