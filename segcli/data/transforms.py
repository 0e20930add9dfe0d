"""Training and evaluation transforms: OpenCV on numpy arrays in, tensors out.

The training pipeline is MMSegmentation's (the one every SegViT/DToP/NRD config uses):
``RandomResize -> RandomCrop(cat_max_ratio) -> RandomFlip -> PhotoMetricDistortion ->
Normalize -> Pad``. Images stay RGB uint8 ``[H, W, 3]`` until normalisation; labels are uint8
``[H, W]`` with 255 = ignore.

Every random choice is drawn from an explicit ``np.random.Generator`` handed in by the caller
(the dataset derives it from (seed, iteration, slot, index), see ``loader.py``), in the order and
with the distributions of mmseg 0.24.1's pipeline, so a sample's augmentation does not depend on
worker processes or global RNG state. Given the same draws, every step gives the image and label
that mmseg 0.24.1 (``mmseg/datasets/pipelines/transforms.py``, on mmcv 1.7.2) gives
(tests/test_train_pipeline_parity.py replays the official draws): bit for bit, except that
saturation and hue agree to one level, because OpenCV's uint8 HSV -> RGB conversion has a
vectorised and a scalar path that round differently, and which pixels take which depends on the
OpenCV build, the CPU and the image width (so mmseg's own output is defined only to that level).
This includes where the official behaviour is not the obvious one:

* Labels are resized with ``cv2.INTER_NEAREST`` (mmcv's ``'nearest'``), whose sampling sits half
  a source pixel off the bilinear image resize's, so label edges can shift by up to one source
  pixel against the image, as in every published run.
* Saturation and hue each round-trip through uint8 HSV (one more rounding than a single trip).
* Padding happens after normalisation, so padded image pixels are 0 in normalised space (as
  MMSegmentation's ``Pad`` after ``Normalize`` and its data preprocessor do); labels pad with 255.
"""
from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import cv2
import numpy as np
import torch

from .resize import imresize, keep_ratio_size, rescale_size

IGNORE_INDEX = 255
CAT_MAX_RATIO_TRIES = 10  # MMSegmentation's RandomCrop retries


def resize_label(label: np.ndarray, size_hw: tuple[int, int]) -> np.ndarray:
    """Nearest-neighbour resize of a label map to ``(h, w)`` (``cv2.INTER_NEAREST``, mmcv's 'nearest')."""
    if label.shape[:2] == tuple(size_hw):
        return label
    return cv2.resize(label, (size_hw[1], size_hw[0]), interpolation=cv2.INTER_NEAREST)


# Each random step is a ``draw_*`` function (the generator in, the parameters out, with
# MMSegmentation's distributions and bounds) and a deterministic function of those parameters,
# so a test can replay the draws the official pipeline made.


def draw_resize_ratio(rng: np.random.Generator, ratio_range: tuple[float, float]) -> float:
    """The scale ratio ~ U(ratio_range) (mmseg 0.24.1 ``Resize.random_sample_ratio``)."""
    return float(rng.uniform(ratio_range[0], ratio_range[1]))


def rescale_pair(image: np.ndarray, label: np.ndarray, scale: tuple[int, int], ratio: float):
    """Rescale image (bilinear) and label (nearest) to fit ``scale * ratio``, aspect ratio kept.

    The scale is truncated to integers before fitting, as mmseg 0.24.1 ``Resize.random_sample_ratio``
    does; size and image resize are ``mmcv.imrescale``'s (``resize.py``).
    """
    target = (int(scale[0] * ratio), int(scale[1] * ratio))
    size_hw = rescale_size(image.shape[0], image.shape[1], target)
    return imresize(image, size_hw), resize_label(label, size_hw)


def random_resize(image, label, scale, ratio_range, rng: np.random.Generator):
    """MMSegmentation's ``Resize(img_scale=scale, ratio_range=ratio_range)`` with keep_ratio."""
    return rescale_pair(image, label, scale, draw_resize_ratio(rng, ratio_range))


def draw_crop_offset(rng: np.random.Generator, shape_hw, crop_hw) -> tuple[int, int]:
    """``(top, left)``, each uniform over its margin, bounds inclusive (``RandomCrop.get_crop_bbox``)."""
    margin_h, margin_w = max(shape_hw[0] - crop_hw[0], 0), max(shape_hw[1] - crop_hw[1], 0)
    top = int(rng.integers(0, margin_h + 1))
    left = int(rng.integers(0, margin_w + 1))
    return top, left


def _box(offset, shape_hw, crop_hw) -> tuple[int, int, int, int]:
    top, left = offset
    return top, left, min(crop_hw[0], shape_hw[0] - top), min(crop_hw[1], shape_hw[1] - left)


def _class_share_ok(crop: np.ndarray, cat_max_ratio: float, ignore_index: int) -> bool:
    counts = np.bincount(crop.ravel(), minlength=256)
    counts = np.delete(counts, ignore_index)  # ignore pixels do not count
    present = counts[counts > 0]
    return len(present) > 1 and present.max() / present.sum() < cat_max_ratio


def choose_crop_box(label: np.ndarray, crop_hw, cat_max_ratio: float, offsets: Iterator[tuple[int, int]],
                    ignore_index: int = IGNORE_INDEX) -> tuple[int, int, int, int]:
    """The crop ``(top, left, height, width)`` that ``RandomCrop(cat_max_ratio)`` keeps.

    ``offsets`` yields the successive candidate offsets (see :func:`draw_crop_offset`). With
    ``cat_max_ratio < 1`` a candidate is accepted when the crop holds at least two classes and
    none covers ``cat_max_ratio`` or more of its non-ignored pixels; after 10 rejections the
    next (11th) candidate is kept unchecked (mmseg 0.24.1 ``RandomCrop.__call__``). Crops are
    clipped to the image (a smaller image keeps its size; ``Pad`` restores the crop size).
    """
    box = _box(next(offsets), label.shape, crop_hw)
    if cat_max_ratio >= 1.0:
        return box
    for _ in range(CAT_MAX_RATIO_TRIES):
        top, left, height, width = box
        if _class_share_ok(label[top:top + height, left:left + width], cat_max_ratio, ignore_index):
            break
        box = _box(next(offsets), label.shape, crop_hw)
    return box


def random_crop_box(label: np.ndarray, crop_hw, cat_max_ratio: float, rng: np.random.Generator,
                    ignore_index: int = IGNORE_INDEX) -> tuple[int, int, int, int]:
    """A random crop ``(top, left, height, width)`` with MMSegmentation's ``cat_max_ratio`` retries."""
    offsets = (draw_crop_offset(rng, label.shape, crop_hw) for _ in itertools.count())  # drawn when needed
    return choose_crop_box(label, crop_hw, cat_max_ratio, offsets, ignore_index)


def draw_flip(rng: np.random.Generator, prob: float) -> bool:
    """Flip when U(0, 1) < prob (``RandomFlip``)."""
    return bool(rng.random() < prob)


@dataclass(frozen=True)
class PhotometricDraw:
    """The draws of one ``PhotoMetricDistortion``; ``None`` = that step is skipped.

    ``brightness`` is the added offset, ``contrast`` and ``saturation`` the factors, ``hue`` the
    integer shift on OpenCV's 0..179 hue; ``contrast_first`` puts contrast before the HSV steps.
    """

    brightness: float | None = None
    contrast: float | None = None
    contrast_first: bool = True
    saturation: float | None = None
    hue: int | None = None


def draw_photometric(rng: np.random.Generator, brightness_delta: int = 32, contrast_range=(0.5, 1.5),
                     saturation_range=(0.5, 1.5), hue_delta: int = 18) -> PhotometricDraw:
    """Draws in mmseg 0.24.1 ``PhotoMetricDistortion.__call__``'s order and distributions.

    Each step applies when ``integers(2)`` gives 1; brightness ~ U(-delta, delta); then the
    contrast position (1 = first); contrast and saturation ~ U(range); hue an integer in
    ``[-hue_delta, hue_delta)`` (upper bound exclusive, as ``numpy.random.randint``).
    """
    def maybe(draw):
        return draw() if rng.integers(2) else None

    brightness = maybe(lambda: float(rng.uniform(-brightness_delta, brightness_delta)))
    contrast_first = bool(rng.integers(2) == 1)
    contrast = maybe(lambda: float(rng.uniform(*contrast_range))) if contrast_first else None
    saturation = maybe(lambda: float(rng.uniform(*saturation_range)))
    hue = maybe(lambda: int(rng.integers(-hue_delta, hue_delta)))
    if not contrast_first:
        contrast = maybe(lambda: float(rng.uniform(*contrast_range)))
    return PhotometricDraw(brightness, contrast, contrast_first, saturation, hue)


def _convert(values: np.ndarray, alpha: float = 1.0, beta: float = 0.0) -> np.ndarray:
    """``values * alpha + beta`` in float32, clipped to 0..255 and truncated to uint8
    (``PhotoMetricDistortion.convert``; the factors are float32 like numpy's scalar casting there)."""
    scaled = values.astype(np.float32) * np.float32(alpha) + np.float32(beta)
    return np.clip(scaled, 0, 255).astype(np.uint8)


def _saturation(image: np.ndarray, factor: float) -> np.ndarray:
    hsv = cv2.cvtColor(image, cv2.COLOR_RGB2HSV)  # [H, W, 3] uint8, hue 0..179
    hsv[..., 1] = _convert(hsv[..., 1], alpha=factor)
    return cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)


def _hue(image: np.ndarray, shift: int) -> np.ndarray:
    hsv = cv2.cvtColor(image, cv2.COLOR_RGB2HSV)
    hsv[..., 0] = (hsv[..., 0].astype(np.int32) + shift) % 180
    return cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)


def photometric_steps(draw: PhotometricDraw) -> list[tuple[str, Callable[[np.ndarray], np.ndarray]]]:
    """The steps a draw applies, in ``PhotoMetricDistortion``'s order, as ``(name, image -> image)``.

    Brightness and contrast are ``PhotoMetricDistortion.convert`` (float32, clip, truncate).
    Saturation and hue each round-trip through uint8 HSV (OpenCV, hue 0..179), as mmseg does
    with ``mmcv.bgr2hsv``/``hsv2bgr``. mmseg holds BGR images here; RGB2HSV of the RGB image is
    BGR2HSV of the BGR one, and brightness/contrast act per channel, so the result is the same
    image in the other channel order.
    """
    contrast = [("contrast", lambda img: _convert(img, alpha=draw.contrast))] if draw.contrast is not None else []
    steps = [("brightness", lambda img: _convert(img, beta=draw.brightness))] if draw.brightness is not None else []
    steps += contrast if draw.contrast_first else []
    steps += [("saturation", lambda img: _saturation(img, draw.saturation))] if draw.saturation is not None else []
    steps += [("hue", lambda img: _hue(img, draw.hue))] if draw.hue is not None else []
    steps += [] if draw.contrast_first else contrast
    return steps


def apply_photometric(image: np.ndarray, draw: PhotometricDraw) -> np.ndarray:
    """``PhotoMetricDistortion`` with fixed draws on an RGB uint8 image (see :func:`photometric_steps`)."""
    for _, step in photometric_steps(draw):
        image = step(image)
    return image


def photometric_distortion(image: np.ndarray, rng: np.random.Generator, brightness_delta: int = 32,
                           contrast_range=(0.5, 1.5), saturation_range=(0.5, 1.5),
                           hue_delta: int = 18) -> np.ndarray:
    """MMSegmentation's ``PhotoMetricDistortion`` on an RGB uint8 image (draw, then apply)."""
    draw = draw_photometric(rng, brightness_delta, contrast_range, saturation_range, hue_delta)
    return apply_photometric(image, draw)


def normalize(image: np.ndarray, mean: np.ndarray, std: np.ndarray) -> np.ndarray:
    """``(image - mean) / std`` per RGB channel on the 0..255 scale -> float32 ``[H, W, 3]``."""
    return (image.astype(np.float32) - mean) / std


def pad_to(image: np.ndarray, label: np.ndarray, size_hw) -> tuple[np.ndarray, np.ndarray]:
    """Pad bottom/right to at least ``size_hw``: image with 0, label with 255 (ignored)."""
    pad_h, pad_w = max(size_hw[0] - image.shape[0], 0), max(size_hw[1] - image.shape[1], 0)
    if pad_h == 0 and pad_w == 0:
        return image, label
    image = np.pad(image, ((0, pad_h), (0, pad_w), (0, 0)), constant_values=0)
    label = np.pad(label, ((0, pad_h), (0, pad_w)), constant_values=IGNORE_INDEX)
    return image, label


def to_tensors(image: np.ndarray, label: np.ndarray | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``[H, W, 3]`` image -> ``[3, H, W]`` tensor of its dtype; uint8 ``[H, W]`` label -> int64 tensor
    (``None``, a sample without a mask, stays ``None``)."""
    image_chw = np.ascontiguousarray(image.transpose(2, 0, 1))  # [3, H, W]
    return torch.from_numpy(image_chw), None if label is None else torch.from_numpy(label.astype(np.int64))


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
        # the draws are made in the official pipeline's order (a test replays mmseg's draws)
        image, label = random_resize(image, label, self.scale, self.ratio_range, rng)
        top, left, height, width = random_crop_box(label, self.crop_hw, self.cat_max_ratio, rng)
        image = image[top:top + height, left:left + width]
        label = label[top:top + height, left:left + width]
        if draw_flip(rng, self.flip_prob):
            image, label = image[:, ::-1], label[:, ::-1]
        if self.photometric:
            image = apply_photometric(np.ascontiguousarray(image), draw_photometric(rng))
        image = normalize(image, self.mean, self.std)
        image, label = pad_to(image, label, self.crop_hw)
        return to_tensors(image, label)

    def __repr__(self) -> str:
        return (f"TrainTransform(scale={self.scale}, ratio_range={self.ratio_range}, crop={self.crop_hw}, "
                f"cat_max_ratio={self.cat_max_ratio}, flip={self.flip_prob}, photometric={self.photometric})")


class EvalTransform:
    """Evaluation input: the RGB uint8 image as a ``[3, H, W]`` uint8 tensor, the label as is.

    MMSegmentation's test pipeline resizes the uint8 image and normalises it once per
    test-time scale (``MultiScaleFlipAug`` wraps ``Resize`` and ``Normalize``), so resizing and
    normalising belong to the test-time computation (``engine/inference.py`` with
    :func:`eval_view`), not to the dataset. With ``mean``/``std`` given, the transform instead
    returns that single view itself: resized to ``scale`` (keep ratio, ``min_size``; mmcv's
    rules, ``data/resize.py``) and normalised, float32 ``[3, h, w]``.

    The label keeps its original resolution (metrics are computed there; predictions are
    resized back to it, as mmseg's ``rescale=True``); a sample without a mask (a split read with
    ``labelled=False``) has ``None`` as its label. ``rng`` is accepted for signature compatibility
    and unused.
    """

    def __init__(self, mean=None, std=None, scale: tuple[int, int] | None = None, min_size: int | None = None):
        if (mean is None) != (std is None):
            raise ValueError("give both mean and std, or neither")
        self.mean = None if mean is None else np.asarray(mean, dtype=np.float32)
        self.std = None if std is None else np.asarray(std, dtype=np.float32)
        self.scale = tuple(scale) if scale is not None else None
        self.min_size = min_size

    def __call__(self, image: np.ndarray, label: np.ndarray | None, rng: np.random.Generator | None = None):
        if self.scale is not None:
            image = imresize(image, keep_ratio_size(image.shape[0], image.shape[1], self.scale, self.min_size))
        if self.mean is not None:
            image = normalize(image, self.mean, self.std)  # float32 [H, W, 3]
        return to_tensors(image, label)  # [3, H, W] uint8 or float32, [H, W] int64 or None

    def __repr__(self) -> str:
        view = "" if self.mean is None else ", normalised"
        return f"EvalTransform(scale={self.scale}, min_size={self.min_size}{view})"


def image_tensor(image: np.ndarray) -> torch.Tensor:
    """An RGB uint8 ``[H, W, 3]`` image as the uint8 batch of one the test-time computation takes:
    ``[1, 3, H, W]`` (it resizes and normalises per view, :func:`eval_view`)."""
    return to_tensors(image, None)[0][None]  # [1, 3, H, W] uint8


def eval_view(images: torch.Tensor, size_hw: tuple[int, int], mean, std) -> torch.Tensor:
    """One test-time view of uint8 RGB images ``[B, 3, H, W]``: each resized to ``size_hw`` on the
    uint8 pixels with cv2 bilinear (mmcv ``imresize``), then normalised: float32 ``[B, 3, h, w]``
    on the images' device (mmseg 0.24.1 ``Resize`` then ``Normalize``)."""
    mean = np.asarray(mean, dtype=np.float32)
    std = np.asarray(std, dtype=np.float32)
    views = []
    for image in images.permute(0, 2, 3, 1).cpu().numpy():  # [H, W, 3] uint8 each
        views.append(normalize(imresize(image, size_hw), mean, std).transpose(2, 0, 1))  # [3, h, w]
    return torch.from_numpy(np.ascontiguousarray(np.stack(views))).to(images.device)  # [B, 3, h, w]
