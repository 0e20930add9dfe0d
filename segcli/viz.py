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


def save_png(path: str | Path, array: np.ndarray) -> None:
    """Write a PNG (grayscale, or BGR for 3 channels), raising a clear error on failure."""
    if not cv2.imwrite(str(path), np.ascontiguousarray(array)):
        raise SegcliError("cannot write the image", str(path), "check that the folder is writable")
