"""Colour maps, overlays and PNG writing for predictions."""
from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from .errors import SegcliError


def colorize(labels: np.ndarray, palette: np.ndarray) -> np.ndarray:
    """Class ids [H, W] -> RGB [H, W, 3] (ids outside the palette are black)."""
    lut = np.zeros((max(256, len(palette)), 3), dtype=np.uint8)
    lut[: len(palette)] = palette
    return lut[labels]


def overlay_image(image: np.ndarray, color: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """Blend an RGB image with its colour map."""
    return (image.astype(np.float32) * (1 - alpha) + color.astype(np.float32) * alpha).clip(0, 255).astype(np.uint8)


def with_legend(image: np.ndarray, labels: np.ndarray, classes: list[str], palette: np.ndarray,
                max_entries: int = 24) -> np.ndarray:
    """``image`` (RGB ``[H, W, 3]``) with a legend panel on its right: a colour swatch and the name of
    every class present in ``labels``, most frequent first (at most ``max_entries``).

    Decision: only the classes in the picture are listed (ADE20K has 150), and the panel is added
    beside the image rather than drawn over it, so no pixel of the overlay is hidden. The text
    scales with the image (an entry is about 1/40 of its longer side, so a 4000-px photograph
    viewed whole still shows a readable key) but never below 14 px (on a 32-px image the panel is
    taller than the image, and the canvas grows to hold it).
    """
    counts = np.bincount(labels.ravel(), minlength=len(classes))[: len(classes)]
    present = [int(c) for c in np.argsort(-counts, kind="stable") if counts[c] > 0][:max_entries]
    height = image.shape[0]
    readable = int(np.clip(round(max(image.shape[:2]) / 40), 14, 120))  # px per entry at this image's size
    row = max(14, min(readable, height // max(1, len(present))))  # and fit the image's height if possible
    scale = row / 30.0
    thickness = max(1, row // 28)
    names = [classes[c] for c in present]
    text_width = max((cv2.getTextSize(n, cv2.FONT_HERSHEY_SIMPLEX, scale, thickness)[0][0] for n in names), default=0)
    width = row + 12 + text_width
    panel = np.full((max(height, row * len(present) + 8), width, 3), 255, np.uint8)
    for i, (c, name) in enumerate(zip(present, names)):
        top = 4 + i * row
        panel[top + 2: top + row - 2, 4: 4 + row - 4] = palette[c] if c < len(palette) else 0
        cv2.rectangle(panel, (4, top + 2), (row - 1, top + row - 3), (128, 128, 128), thickness)  # light colours stay visible
        cv2.putText(panel, name, (row + 6, top + int(row * 0.75)), cv2.FONT_HERSHEY_SIMPLEX, scale, (0, 0, 0),
                    thickness, cv2.LINE_AA)
    canvas = np.full((panel.shape[0], image.shape[1] + width, 3), 255, np.uint8)
    canvas[:height, : image.shape[1]] = image
    canvas[:, image.shape[1]:] = panel
    return canvas


def confusion_image(confusion: np.ndarray, classes: list[str] | tuple[str, ...]) -> np.ndarray:
    """A confusion matrix ``[K, K]`` (rows: ground truth, columns: prediction, pixel counts) as an
    RGB picture: each row normalised by its ground-truth pixels (so a cell is the share of class
    r's pixels predicted as c; the diagonal is each class's recall), white 0 to dark blue 1, class
    names along both axes, rows of classes absent from the ground truth left grey.

    Decision: row-normalised, as MMSegmentation's confusion_matrix.py tool draws it, since raw
    counts let the largest classes hide every other; cells grow to 36 px for a few classes and
    shrink to 6 px for hundreds, so the picture stays between about 300 and 1200 px.
    """
    confusion = np.asarray(confusion, dtype=np.float64)
    k = confusion.shape[0]
    cell = int(np.clip(1000 // max(k, 1), 6, 36))
    totals = confusion.sum(axis=1, keepdims=True)
    shares = np.divide(confusion, totals, out=np.zeros_like(confusion), where=totals > 0)  # [K, K]
    blue = np.array([20, 60, 160], np.float64)
    cells = (255 - shares[..., None] * (255 - blue)).astype(np.uint8)  # [K, K, 3]
    cells[totals[:, 0] == 0] = 200
    grid = np.repeat(np.repeat(cells, cell, axis=0), cell, axis=1)  # [K*cell, K*cell, 3]
    scale = max(cell, 12) / 30.0
    label_width = max(cv2.getTextSize(str(n), cv2.FONT_HERSHEY_SIMPLEX, scale, 1)[0][0] for n in classes) + 8
    size = k * cell
    canvas = np.full((label_width + size + 4, label_width + size + 4, 3), 255, np.uint8)
    canvas[label_width:label_width + size, label_width:label_width + size] = grid
    for i, name in enumerate(classes):  # row labels on the left, column labels rotated on top
        y = label_width + i * cell + int(cell * 0.75)
        cv2.putText(canvas, str(name), (4, y), cv2.FONT_HERSHEY_SIMPLEX, scale, (0, 0, 0), 1, cv2.LINE_AA)
    top = np.full((size + 4 + label_width, label_width, 3), 255, np.uint8)
    for i, name in enumerate(classes):
        y = label_width + i * cell + int(cell * 0.75)
        cv2.putText(top, str(name), (4, y), cv2.FONT_HERSHEY_SIMPLEX, scale, (0, 0, 0), 1, cv2.LINE_AA)
    rotated = np.rot90(top)  # [label_width, size + 4 + label_width, 3]: names read bottom to top
    canvas[:label_width, :] = rotated[:, : canvas.shape[1]]
    return canvas


def save_png(path: str | Path, array: np.ndarray) -> None:
    """Write a PNG (grayscale, or BGR for 3 channels), raising a clear error on failure."""
    if not cv2.imwrite(str(path), np.ascontiguousarray(array)):
        raise SegcliError("cannot write the image", str(path), "check that the folder is writable")
