"""Image sizes and resizes exactly as mmcv 1.x / MMSegmentation 0.24 compute them.

Every published SegViT/DToP/NRD number was measured with these rules, and a randomly or
lightly trained model turns a one-pixel difference in the resized image into different labels,
so segcli computes sizes with the same float expressions and the same rounding:

* :func:`rescale_size` is mmcv 1.7 ``mmcv/image/geometric.py`` ``rescale_size``: a factor, or
  the largest factor that fits a pair of edges ``(long, short)`` (the order of the pair does
  not matter), then each side ``int(side * factor + 0.5)``.
* :func:`keep_ratio_size` is mmseg 0.24.1 ``mmseg/datasets/pipelines/transforms.py``
  ``Resize._resize_img`` with ``keep_ratio=True``: without ``min_size`` it is
  :func:`rescale_size`; with ``min_size`` the *short* side becomes
  ``max(min(scale), min_size)`` and the long side follows the aspect ratio, uncapped (the
  long edge of ``scale`` is ignored). So a 500x375 image under ``scale=(520, 520)``,
  ``min_size=480`` becomes 693x520, not 520x390.
* :func:`tta_sizes` is mmseg 0.24.1 ``mmseg/datasets/pipelines/test_time_aug.py``
  ``MultiScaleFlipAug``: each ratio scales the *scale pair* with ``int()`` (not the resized
  image), or, with no scale, the image's own ``(w, h)``; then the resize rule above applies.
* :func:`imresize` is mmcv's ``imresize`` with its default backend: ``cv2.resize``
  ``INTER_LINEAR`` on the uint8 image, before normalisation (cv2 rounds to uint8 and its
  bilinear weights are fixed-point, so resizing the normalised float image is not the same).
"""
from __future__ import annotations

import cv2
import numpy as np


def scale_size(height: int, width: int, factor: float) -> tuple[int, int]:
    """``(h, w)`` scaled by ``factor`` with mmcv's rounding, ``int(side * factor + 0.5)``."""
    return int(height * float(factor) + 0.5), int(width * float(factor) + 0.5)


def rescale_size(height: int, width: int, scale) -> tuple[int, int]:
    """mmcv ``rescale_size``: ``scale`` is a factor or an edge pair that the result fits in.

    With a pair the factor is ``min(max(scale) / max(h, w), min(scale) / min(h, w))``.
    """
    if isinstance(scale, (int, float)):
        if scale <= 0:
            raise ValueError(f"scale factor must be positive, got {scale}")
        factor = scale
    else:
        factor = min(max(scale) / max(height, width), min(scale) / min(height, width))
    return scale_size(height, width, factor)


def keep_ratio_size(height: int, width: int, scale: tuple, min_size: int | None = None) -> tuple[int, int]:
    """Size after mmseg's keep-ratio ``Resize`` of an ``(h, w)`` image to ``scale`` (see module doc)."""
    if min_size is not None:
        new_short = max(min(scale), min_size)
        # the float pair mmseg hands to rescale_size, same expressions in the same order
        if height > width:
            scale = (new_short * height / width, new_short)
        else:
            scale = (new_short, new_short * width / height)
    return rescale_size(height, width, scale)


def tta_sizes(height: int, width: int, scale: tuple[int, int] | None, ratios, min_size: int | None = None):
    """The resized ``(h, w)`` of every test-time ratio (MultiScaleFlipAug, then Resize)."""
    sizes = []
    for ratio in ratios:
        if scale is None:
            target = (int(width * ratio), int(height * ratio))
        else:
            target = (int(scale[0] * ratio), int(scale[1] * ratio))
        sizes.append(keep_ratio_size(height, width, target, min_size))
    return sizes


def imresize(image: np.ndarray, size_hw: tuple[int, int]) -> np.ndarray:
    """``cv2.resize`` bilinear (``INTER_LINEAR``) of a uint8 image ``[H, W, C]`` to ``(h, w)``.

    The same size is returned unchanged (cv2 would copy it bit for bit).
    """
    if image.shape[:2] == tuple(size_hw):
        return image
    return cv2.resize(image, (int(size_hw[1]), int(size_hw[0])), interpolation=cv2.INTER_LINEAR)
