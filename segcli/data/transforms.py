"""Training and evaluation transforms: OpenCV on numpy arrays in, tensors out.

The training pipeline is MMSegmentation's (the one every SegViT/DToP/NRD config uses):
``RandomResize -> RandomCrop(cat_max_ratio) -> RandomFlip -> PhotoMetricDistortion ->
Normalize -> Pad``. Images stay RGB uint8 ``[H, W, 3]`` until normalisation; labels are uint8
``[H, W]`` with 255 = ignore.

Every random choice is drawn from an explicit ``np.random.Generator`` handed in by the caller
(the dataset derives it from (seed, iteration, slot, index), see ``loader.py``), in a fixed
order, so a sample's augmentation does not depend on worker processes or global RNG state.

Decisions where MMSegmentation leaves room:

* Labels are resized with ``cv2.INTER_NEAREST_EXACT`` (pixel-centre aligned, like the bilinear
  image resize) instead of ``INTER_NEAREST``, whose sampling is shifted by half a source
  pixel; the label then lines up with the image it annotates.
* Photometric distortion converts to HSV once for saturation and hue together (MMSegmentation
  round-trips through HSV for each); the only difference is one fewer uint8 rounding.
* Padding happens after normalisation, so padded image pixels are 0 in normalised space (as
  MMSegmentation's ``Pad`` after ``Normalize`` and its data preprocessor do); labels pad with 255.
"""
from __future__ import annotations

import cv2
import numpy as np
import torch

IGNORE_INDEX = 255
CAT_MAX_RATIO_TRIES = 10  # MMSegmentation's RandomCrop retries


def fit_scale(height: int, width: int, scale: tuple[int, int]) -> tuple[int, int]:
    """Size ``(h, w)`` that fits ``scale = (long, short)`` with the aspect ratio kept.

    The factor is the largest one that keeps the long side <= ``max(scale)`` and the short side
    <= ``min(scale)`` (mmcv's ``rescale_size``); sizes are rounded to the nearest pixel.
    """
    long_edge, short_edge = max(scale), min(scale)
    factor = min(long_edge / max(height, width), short_edge / min(height, width))
    return max(1, int(height * factor + 0.5)), max(1, int(width * factor + 0.5))


def resize_image(image: np.ndarray, size_hw: tuple[int, int]) -> np.ndarray:
    """Bilinear resize of an image to ``(h, w)`` (no-op when the size already matches)."""
    if image.shape[:2] == tuple(size_hw):
        return image
    return cv2.resize(image, (size_hw[1], size_hw[0]), interpolation=cv2.INTER_LINEAR)


def resize_label(label: np.ndarray, size_hw: tuple[int, int]) -> np.ndarray:
    """Nearest-neighbour (pixel-centre aligned) resize of a label map to ``(h, w)``."""
    if label.shape[:2] == tuple(size_hw):
        return label
    return cv2.resize(label, (size_hw[1], size_hw[0]), interpolation=cv2.INTER_NEAREST_EXACT)


def random_resize(image, label, scale, ratio_range, rng: np.random.Generator):
    """MMSegmentation's ``RandomResize``: fit ``scale * ratio``, ratio ~ U(ratio_range)."""
    ratio = rng.uniform(ratio_range[0], ratio_range[1])
    target = (int(scale[0] * ratio), int(scale[1] * ratio))
    size_hw = fit_scale(image.shape[0], image.shape[1], target)
    return resize_image(image, size_hw), resize_label(label, size_hw)


def _random_box(height, width, crop_hw, rng) -> tuple[int, int, int, int]:
    margin_h, margin_w = max(height - crop_hw[0], 0), max(width - crop_hw[1], 0)
    top = int(rng.integers(0, margin_h + 1))
    left = int(rng.integers(0, margin_w + 1))
    return top, left, min(crop_hw[0], height), min(crop_hw[1], width)


def random_crop_box(label: np.ndarray, crop_hw, cat_max_ratio: float, rng: np.random.Generator,
                    ignore_index: int = IGNORE_INDEX) -> tuple[int, int, int, int]:
    """A random crop ``(top, left, height, width)``; images smaller than the crop keep their size.

    With ``cat_max_ratio < 1`` the box is redrawn up to 10 times until the crop holds at least
    two classes and no class covers ``cat_max_ratio`` or more of its non-ignored pixels
    (MMSegmentation's RandomCrop); the last draw is kept if none qualifies.
    """
    box = _random_box(label.shape[0], label.shape[1], crop_hw, rng)
    if cat_max_ratio >= 1.0:
        return box
    for _ in range(CAT_MAX_RATIO_TRIES):
        top, left, height, width = box
        counts = np.bincount(label[top:top + height, left:left + width].ravel(), minlength=256)
        counts = np.delete(counts, ignore_index)  # ignore pixels do not count
        present = counts[counts > 0]
        if len(present) > 1 and present.max() / present.sum() < cat_max_ratio:
            break
        box = _random_box(label.shape[0], label.shape[1], crop_hw, rng)
    return box


def _convert(values: np.ndarray, alpha: float = 1.0, beta: float = 0.0) -> np.ndarray:
    return np.clip(values.astype(np.float32) * alpha + beta, 0, 255).astype(np.uint8)


def photometric_distortion(image: np.ndarray, rng: np.random.Generator, brightness_delta: int = 32,
                           contrast_range=(0.5, 1.5), saturation_range=(0.5, 1.5),
                           hue_delta: int = 18) -> np.ndarray:
    """MMSegmentation's ``PhotoMetricDistortion`` on an RGB uint8 image.

    Each step applies with probability 0.5: brightness (+U(-32, 32)), contrast (x U(0.5, 1.5)),
    saturation (x U(0.5, 1.5) on HSV's S) and hue (+ an integer in [-18, 18) on OpenCV's
    0..179 hue, wrapping). Contrast comes first or last with probability 0.5 each.
    """
    def contrast(img):
        if rng.integers(2):
            return _convert(img, alpha=rng.uniform(*contrast_range))
        return img

    if rng.integers(2):
        image = _convert(image, beta=rng.uniform(-brightness_delta, brightness_delta))
    contrast_first = bool(rng.integers(2))
    if contrast_first:
        image = contrast(image)
    saturation = rng.uniform(*saturation_range) if rng.integers(2) else None
    hue_shift = int(rng.integers(-hue_delta, hue_delta)) if rng.integers(2) else None
    if saturation is not None or hue_shift is not None:
        hsv = cv2.cvtColor(image, cv2.COLOR_RGB2HSV)  # [H, W, 3] uint8, hue in 0..179
        if saturation is not None:
            hsv[..., 1] = _convert(hsv[..., 1], alpha=saturation)
        if hue_shift is not None:
            hsv[..., 0] = ((hsv[..., 0].astype(np.int32) + hue_shift) % 180).astype(np.uint8)
        image = cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)
    if not contrast_first:
        image = contrast(image)
    return image


def normalize(image: np.ndarray, mean: np.ndarray, std: np.ndarray) -> np.ndarray:
    """``(image - mean) / std`` per RGB channel on the 0..255 scale -> float32 ``[H, W, 3]``."""
    return (image.astype(np.float32) - mean) / std


def image_batch(image: np.ndarray, mean, std) -> torch.Tensor:
    """An RGB uint8 ``[H, W, 3]`` image as the normalised batch of one a model takes: ``[1, 3, H, W]``."""
    normalized = normalize(image, np.asarray(mean, dtype=np.float32), np.asarray(std, dtype=np.float32))
    return torch.from_numpy(np.ascontiguousarray(normalized.transpose(2, 0, 1)))[None]  # [1, 3, H, W]


def pad_to(image: np.ndarray, label: np.ndarray, size_hw) -> tuple[np.ndarray, np.ndarray]:
    """Pad bottom/right to at least ``size_hw``: image with 0, label with 255 (ignored)."""
    pad_h, pad_w = max(size_hw[0] - image.shape[0], 0), max(size_hw[1] - image.shape[1], 0)
    if pad_h == 0 and pad_w == 0:
        return image, label
    image = np.pad(image, ((0, pad_h), (0, pad_w), (0, 0)), constant_values=0)
    label = np.pad(label, ((0, pad_h), (0, pad_w)), constant_values=IGNORE_INDEX)
    return image, label


def to_tensors(image: np.ndarray, label: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """float32 ``[H, W, 3]`` image -> ``[3, H, W]`` tensor; uint8 ``[H, W]`` label -> int64 tensor."""
    image_chw = np.ascontiguousarray(image.transpose(2, 0, 1))  # [3, H, W]
    return torch.from_numpy(image_chw), torch.from_numpy(label.astype(np.int64))


class TrainTransform:
    """The training augmentation of a recipe's ``data`` section.

    ``data_cfg.scale`` is the (long, short) base scale (``None`` = the crop size);
    ``crop_size`` is (H, W). Call as ``transform(image, label, rng) -> (image [3, H, W] float32,
    label [H, W] int64)``; outputs always have the crop size (padded where the image is smaller).
    """

    def __init__(self, data_cfg):
        self.crop_hw = tuple(data_cfg.crop_size)
        self.scale = tuple(data_cfg.scale) if data_cfg.scale is not None else (
            max(self.crop_hw), min(self.crop_hw))
        self.ratio_range = tuple(data_cfg.ratio_range)
        self.cat_max_ratio = data_cfg.cat_max_ratio
        self.flip_prob = data_cfg.flip_prob
        self.photometric = data_cfg.photometric
        self.mean = np.asarray(data_cfg.mean, dtype=np.float32)
        self.std = np.asarray(data_cfg.std, dtype=np.float32)

    def __call__(self, image: np.ndarray, label: np.ndarray, rng: np.random.Generator):
        image, label = random_resize(image, label, self.scale, self.ratio_range, rng)
        top, left, height, width = random_crop_box(label, self.crop_hw, self.cat_max_ratio, rng)
        image = image[top:top + height, left:left + width]
        label = label[top:top + height, left:left + width]
        if rng.random() < self.flip_prob:
            image, label = image[:, ::-1], label[:, ::-1]
        if self.photometric:
            image = photometric_distortion(np.ascontiguousarray(image), rng)
        image = normalize(image, self.mean, self.std)
        image, label = pad_to(image, label, self.crop_hw)
        return to_tensors(image, label)

    def __repr__(self) -> str:
        return (f"TrainTransform(scale={self.scale}, ratio_range={self.ratio_range}, crop={self.crop_hw}, "
                f"cat_max_ratio={self.cat_max_ratio}, flip={self.flip_prob}, photometric={self.photometric})")


class EvalTransform:
    """Evaluation preprocessing: optional keep-ratio resize to fit ``scale`` (long, short), normalise.

    The label is returned at its original resolution (metrics are computed there; predictions
    are resized back to it). ``rng`` is accepted for signature compatibility and unused.
    """

    def __init__(self, mean, std, scale: tuple[int, int] | None = None):
        self.mean = np.asarray(mean, dtype=np.float32)
        self.std = np.asarray(std, dtype=np.float32)
        self.scale = tuple(scale) if scale is not None else None

    def __call__(self, image: np.ndarray, label: np.ndarray, rng: np.random.Generator | None = None):
        if self.scale is not None:
            image = resize_image(image, fit_scale(image.shape[0], image.shape[1], self.scale))
        return to_tensors(normalize(image, self.mean, self.std), label)

    def __repr__(self) -> str:
        return f"EvalTransform(scale={self.scale})"
