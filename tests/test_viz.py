"""Legends stay readable on very small and very large images."""
import numpy as np

from segcli.viz import with_legend

PALETTE = np.array([[255, 255, 255], [200, 30, 30], [30, 200, 30]], np.uint8)
CLASSES = ["sky", "building", "grass"]


def _legend_row(size: int) -> int:
    """The legend's row height on a square image of side ``size`` holding the three classes."""
    labels = np.repeat(np.arange(3), -(-size * size // 3))[: size * size].reshape(size, size)
    canvas = with_legend(np.zeros((size, size, 3), np.uint8), labels, CLASSES, PALETTE)
    panel = canvas[:, size:]
    ink = np.nonzero((panel < 250).any(axis=(1, 2)))[0]  # rows of the panel with swatches or text
    return (ink.max() - ink.min() + 1) / 3, canvas


def test_legend_text_scales_with_a_large_image():
    small, _ = _legend_row(400)
    large, _ = _legend_row(4000)
    assert large >= 5 * small  # it used to be capped at 24 px an entry, unreadable on a 4000-px picture


def test_legend_on_a_tiny_image_keeps_a_legible_size():
    row, canvas = _legend_row(32)
    assert row >= 12
    assert canvas.shape[0] > 32 and (canvas[:32, :32] == 0).all()  # the canvas grows; the image is untouched
