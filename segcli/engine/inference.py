"""Whole-image and sliding-window inference, with multi-scale + flip test-time augmentation.

The model is any ``nn.Module`` whose ``forward(images)`` returns per-class scores at the input
size. Inputs are padded to the backbone's ``size_divisor`` (16 for ViTs, 32 for ResNets) and the
scores cropped back, so any image size works; a ViT's scores of the padded input are instead
resized to the input, padding included, as mmseg's ViT (which pads inside its patch embedding)
and ``EncoderDecoder.encode_decode`` do. ``slide`` follows MMSegmentation: windows of
``crop`` every ``stride``, the last window flush with the border, overlapping scores averaged.

The test-time computation is MMSegmentation 0.24.1's, step for step (its pipeline
``MultiScaleFlipAug(Resize, RandomFlip, Normalize)`` and ``EncoderDecoder.inference`` /
``simple_test`` / ``aug_test``), because a released model's number was measured that way:

* Images come in as RGB uint8 ``[B, 3, H, W]`` (with the recipe's ``mean``/``std``). Each view's
  size is mmseg's (``data/resize.py``: the keep-ratio rule, ``min_size``, ``img_ratios`` of the
  scale pair, mmcv's rounding); the uint8 image is resized with cv2 bilinear and only then
  normalised (``data/transforms.py`` ``eval_view``). A float tensor is taken as already
  normalised and resized bilinearly as floats (benchmarks and synthetic inputs, whose pixels
  no released number depends on).
* Each view's scores (whole, or the average of its slide windows) are resized bilinearly
  (``align_corners=False``, as every head here and in the released configs) to the original
  image, *then* reduced: one view -> its scores (arg-max = ``simple_test``); several views (scales,
  flips) -> the mean of each view's softmax probabilities, flipped back (``aug_test``).

One pipeline: the test-time computation is a tree of :class:`~segcli.ops.scores.ScoreMap` s
(:func:`tta_scores`: a model's ``forward_scores`` - low-resolution scores and their upsampling -
or, for a model without one, its full scores; slide windows; flips; resizes to the image; the TTA
mean). What a caller asks of it decides what is formed:

* :func:`infer_labels` / :func:`labels_of`: the labels ``[B, H, W]``, a band of output rows at a
  time, never the full score tensor. Slide windows run lazily as the bands reach them and are
  dropped once every band they overlap is done, so a 6000² image holds two rows of windows'
  low-resolution scores and one band;
* :func:`infer`: the whole map's ``full()``, the scores ``[B, K, H, W]`` (probabilities, FLOPs
  tracing), formed with whole-tensor operations as mmseg forms them.

The map also carries the token counts of every forward it ran (``ScoreMap.counts``: DToP's exits,
Shrunk's kept queries), summed over windows and views; they are complete once every row has
been formed.
"""
from __future__ import annotations

import shutil
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from ..data.resize import tta_sizes
from ..data.transforms import eval_view
from ..errors import SegcliError
from ..ops.batchnorm import fold_batchnorms
from ..ops.scores import Counts, DenseScores, ResizedScores, ScoreMap, WrappedScores, add_counts, resize


def prepare_for_inference(model: nn.Module) -> nn.Module:
    """Eval mode and the inference-only rewrites, in place, for a model that will not be trained
    again (``predict``, ``eval``, ``benchmark``, :class:`~segcli.Segmenter`): BatchNorms folded into
    the convolutions they follow (:func:`~segcli.ops.batchnorm.fold_batchnorms`) and whatever a
    module does in its ``fuse_for_inference()`` (timm's ``reparameterize`` habit; the ResNets fold
    the BatchNorms of their blocks). Scores change by float rounding only. Not applied by
    ``export`` (the exporters fold on their own and the graph is checked against this model) nor to
    the model being trained (its periodic validation runs the training weights as they are)."""
    model.eval()
    fold_batchnorms(model)
    for module in list(model.modules()):
        fuse = getattr(module, "fuse_for_inference", None)
        if callable(fuse):
            fuse()
    return model


def compile_for_inference(model: nn.Module, device: torch.device) -> nn.Module:
    """``torch.compile`` the segmentor's ``backbone`` and ``decode_head`` in place (``--compile`` of
    ``benchmark``, ``eval``, ``predict``); the engine's band-by-band label loop stays eager.

    Decision: opt-in. On CPU the first call compiles for tens of seconds to minutes (per new input
    shape; images of several sizes recompile), which a few images never win back; a long ``eval``
    at one size (slide windows, or a fixed-size dataset) does. Without a C++ compiler on CPU it
    fails at once, in one line; a compilation error on the first call becomes a
    :class:`SegcliError` inside :func:`compile_failures_reported`.

    What is compiled is what the segmentor declares it calls (``compilable_parts``): a DToP model
    runs its encoder block by block and its heads token by token, so no module's ``forward`` would
    be compiled, and it is refused in one line rather than left silently eager."""
    parts = getattr(model, "compilable_parts", ())
    if not parts:
        raise SegcliError(f"--compile would compile nothing of a {type(model).__name__}: it runs its encoder "
                          "block by block, not through a module's forward()", "--compile", "run without --compile")
    if device.type == "cpu" and not any(shutil.which(cc) for cc in ("c++", "g++", "clang++")):
        raise SegcliError("torch.compile needs a C++ compiler on CPU and none was found", "--compile",
                          "install g++ (or clang++), or run without --compile")
    if device.type == "cpu" and cpu_vector_isa() == "avx2":
        raise SegcliError(f"torch.compile's AVX2 CPU kernels give wrong scores here (NaN in the ViT encoder of a "
                          f"tiny SETR with torch {torch.__version__}; right without vectorisation and with AVX-512)",
                          "--compile", "run without --compile on this CPU")
    for name in parts:
        setattr(model, name, torch.compile(getattr(model, name)))
    return model


def cpu_vector_isa() -> str:
    """The vector instruction set inductor generates CPU kernels for (``"avx2"``, ``"avx512 ..."``, ``""``).

    Decision: ``--compile`` is refused where this is AVX2 (an AVX2-only CPU, or ``ATEN_CPU_CAPABILITY=avx2``):
    there inductor's vectorised kernels turned a tiny SETR's ViT encoder into NaN (``tests/test_cli_habits.py``
    compares compiled and eager metrics), while its scalar kernels and its AVX-512 ones gave the eager
    scores. Refusing beats silently wrong labels; scalar kernels would be slower than eager."""
    try:
        from torch._inductor.cpu_vec_isa import pick_vec_isa
    except ImportError:  # an older torch: nothing known about its kernels
        return ""
    return str(pick_vec_isa() or "")


def compile_error(err: Exception, subject: str | None = None) -> SegcliError:
    """The one-line error for a ``torch.compile`` failure (it surfaces on the first call)."""
    reason = str(err).strip().splitlines()[0][:200] if str(err).strip() else type(err).__name__
    return SegcliError(f"torch.compile failed{f' on {subject}' if subject else ''}: {reason}", "--compile",
                       "run without --compile")


@contextmanager
def compile_failures_reported(active: bool):
    """While ``active`` (the model was compiled), a ``torch.compile`` failure (dynamo's exception
    family) raised inside becomes :func:`compile_error`; anything else passes unchanged."""
    try:
        yield
    except Exception as err:
        base = getattr(getattr(getattr(torch, "_dynamo", None), "exc", None), "TorchDynamoException", None)
        if active and base is not None and isinstance(err, base):
            raise compile_error(err) from None
        raise


BAND_BYTES = 32 << 20  # a band of float32 scores [B, K, rows, W] is at most this big (or one row)


def size_divisor(model) -> int:
    """What the backbone pads inputs to a multiple of (its ``size_divisor``; 32 when it names none)."""
    core = getattr(model, "module", model)
    backbone = getattr(core, "backbone", None)
    return int(getattr(backbone, "size_divisor", 32) or 1)


def _pad(model, images: torch.Tensor) -> torch.Tensor:
    div = size_divisor(model)
    height, width = images.shape[-2:]
    pad_h, pad_w = (-height) % div, (-width) % div
    return F.pad(images, (0, pad_w, 0, pad_h)) if pad_h or pad_w else images


def resizes_padded_scores(model) -> bool:
    """Whether the padded input's scores are resized to the input (not cropped): a backbone declares
    it where the official one pads inside (mmseg's ViT; ``resize_padded_scores``)."""
    core = getattr(model, "module", model)
    return bool(getattr(getattr(core, "backbone", None), "resize_padded_scores", False))


def scores_padded(model, images: torch.Tensor) -> ScoreMap:
    """The scores of images of any size: zero-padded to the size divisor, then cropped (or resized
    where the backbone says so); the model's ``forward_scores`` if it has one, else its scores."""
    height, width = (int(n) for n in images.shape[-2:])
    padded = _pad(model, images)
    forward_scores = getattr(model, "forward_scores", None)
    scores = forward_scores(padded) if forward_scores is not None else DenseScores(model(padded))
    if tuple(scores.size) != (height, width) and resizes_padded_scores(model):
        return ResizedScores(scores, (height, width))
    return scores.crop(height, width)


def _windows(size: int, crop: int, stride: int) -> list[tuple[int, int]]:
    """Window intervals along one axis (MMSegmentation: every ``stride``, the last flush with the end)."""
    count = max(size - crop + stride - 1, 0) // stride + 1
    out = []
    for i in range(count):
        end = min(i * stride + crop, size)
        out.append((max(end - crop, 0), end))
    return out


def _settings(images: torch.Tensor, test_cfg, default_crop) -> tuple:
    """(crop, stride, [(size, flip)...]) of the recipe's test-time computation for ``images``."""
    height, width = (int(n) for n in images.shape[-2:])
    crop = tuple(test_cfg.crop_size or default_crop)
    stride = tuple(test_cfg.stride or (max(1, crop[0] * 2 // 3), max(1, crop[1] * 2 // 3)))
    runs = []
    for size in tta_sizes(height, width, test_cfg.scale, test_cfg.scales, test_cfg.min_size):
        size = (max(1, size[0]), max(1, size[1]))
        runs += [(size, flip) for flip in ((False, True) if test_cfg.flip else (False,))]
    return crop, stride, runs


def _view(images: torch.Tensor, size: tuple[int, int], flip: bool, mean, std) -> torch.Tensor:
    """The normalised model input of one view (module doc: uint8 images are resized, then normalised)."""
    if images.dtype == torch.uint8:
        if mean is None or std is None:
            raise ValueError("uint8 images need the recipe's mean and std")
        x = eval_view(images, size, mean, std)  # [B, 3, h, w] float32
    else:
        x = resize(images, size)
    return x.flip(-1) if flip else x


def tta_scores(model, images: torch.Tensor, test_cfg, default_crop: tuple[int, int], mean=None,
               std=None) -> ScoreMap:
    """The recipe's test-time scores of ``images`` under ``test_cfg`` (mode, scales, flip) as a
    :class:`ScoreMap` at the size of ``images``: one view's scores, or for several views the mean
    of their softmax probabilities (module doc). Formed by rows when asked."""
    height, width = (int(n) for n in images.shape[-2:])
    crop, stride, runs = _settings(images, test_cfg, default_crop)
    parts = []
    for size, flip in runs:
        x = _view(images, size, flip, mean, std)
        part = slide_scores(model, x, crop, stride) if test_cfg.mode == "slide" else scores_padded(model, x)
        if tuple(part.size) != (height, width):
            part = ResizedScores(part, (height, width), dtype=torch.float32)
        if len(runs) > 1:
            part = SoftmaxScores(part)
        if flip:
            part = FlippedScores(part)
        parts.append(part)
    return parts[0] if len(parts) == 1 else MeanScores(parts)


def infer(model, images: torch.Tensor, test_cfg, default_crop: tuple[int, int], mean=None, std=None) -> torch.Tensor:
    """Scores [B, K, H, W] (float32): :func:`tta_scores` formed whole."""
    return tta_scores(model, images, test_cfg, default_crop, mean, std).full().float()


def infer_probabilities(model, images: torch.Tensor, test_cfg, default_crop: tuple[int, int], mean=None,
                        std=None) -> torch.Tensor:
    """Class probabilities [B, K, H, W]: what mmseg's ``inference`` / ``aug_test`` average."""
    scores = tta_scores(model, images, test_cfg, default_crop, mean, std)
    return scores.full() if isinstance(scores, MeanScores) else scores.full().float().softmax(dim=1)


# --------------------------------------------------------------------------- labels, band by band


def labels_of(scores: ScoreMap, band_bytes: int = BAND_BYTES) -> torch.Tensor:
    """Arg-max labels ``[B, H, W]`` of a score map, taken a band of rows at a time."""
    height, width = scores.size
    rows = max(1, band_bytes // (scores.batch * scores.channels * width * 4))
    labels = None
    for start in range(0, height, rows):
        band = scores.argmax_rows(start, min(start + rows, height))  # [B, n, W]
        if labels is None:
            labels = band.new_empty(scores.batch, height, width)
        labels[:, start:start + band.shape[1]] = band
    return labels


def infer_labels(model, images: torch.Tensor, test_cfg, default_crop: tuple[int, int],
                 band_bytes: int = BAND_BYTES, mean=None, std=None) -> torch.Tensor:
    """Labels ``[B, H, W]`` (long) = ``infer(...).argmax(1)`` without the full ``[B, K, H, W]`` scores."""
    return labels_of(tta_scores(model, images, test_cfg, default_crop, mean, std), band_bytes)


class SoftmaxScores(WrappedScores):
    """Softmax over the classes of a map (float32): a view's probabilities in ``aug_test``."""

    def rows(self, start: int, stop: int) -> torch.Tensor:
        return self.inner.rows(start, stop).float().softmax(dim=1)

    def full(self) -> torch.Tensor:
        return self.inner.full().float().softmax(dim=1)


class FlippedScores(WrappedScores):
    """A map mirrored left-right: a flipped view's scores brought back to the image."""

    def rows(self, start: int, stop: int) -> torch.Tensor:
        return self.inner.rows(start, stop).flip(-1)

    def full(self) -> torch.Tensor:
        return self.inner.full().flip(-1)


class MeanScores(ScoreMap):
    """The mean of maps of one size (float32): the TTA mean over views."""

    def __init__(self, parts: list[ScoreMap]):
        self.parts, self.batch, self.channels, self.size = parts, parts[0].batch, parts[0].channels, parts[0].size

    def rows(self, start: int, stop: int) -> torch.Tensor:
        return self._mean([part.rows(start, stop) for part in self.parts])

    def full(self) -> torch.Tensor:
        return self._mean([part.full() for part in self.parts])

    def _mean(self, tensors: list[torch.Tensor]) -> torch.Tensor:
        total = tensors[0].float()
        for tensor in tensors[1:]:
            total = total + tensor
        return total / len(tensors)

    def children(self) -> list[ScoreMap]:
        return list(self.parts)


def slide_scores(model, images: torch.Tensor, crop: tuple[int, int], stride: tuple[int, int]) -> ScoreMap:
    """MMSegmentation's ``slide_inference`` as a map: :class:`SlideScores`, or, where one window
    covers the image, that window's own scores (the same numbers: a sum of one divided by one),
    so that one window costs what ``whole`` mode costs."""
    height, width = (int(n) for n in images.shape[-2:])
    if len(_windows(height, crop[0], stride[0])) == 1 and len(_windows(width, crop[1], stride[1])) == 1:
        return scores_padded(model, images)
    return SlideScores(model, images, crop, stride)


class SlideScores(ScoreMap):
    """Windows of ``crop`` every ``stride``, overlapping scores averaged, by rows: a row of windows
    runs when a band first reaches it, and is dropped when a band starts below it (a band asked
    for out of order recomputes it). ``counts`` sums the windows that have run (each row once)."""

    def __init__(self, model, images: torch.Tensor, crop: tuple[int, int], stride: tuple[int, int]):
        self.model, self.images = model, images
        self.batch, self.size = int(images.shape[0]), (int(images.shape[-2]), int(images.shape[-1]))
        self.row_windows = _windows(self.size[0], crop[0], stride[0])
        self.col_windows = _windows(self.size[1], crop[1], stride[1])
        # windows form a grid, so the overlap count is (windows over a row) x (windows over a column)
        row_count = torch.zeros(self.size[0], device=images.device)
        col_count = torch.zeros(self.size[1], device=images.device)
        for y1, y2 in self.row_windows:
            row_count[y1:y2] += 1
        for x1, x2 in self.col_windows:
            col_count[x1:x2] += 1
        self.row_count, self.col_count = row_count, col_count
        self.cache: dict[int, list[ScoreMap]] = {}
        self.counted: set[int] = set()
        self.window_counts: dict[str, torch.Tensor] = {}
        self.channels = self._window_row(0)[0].channels

    @property
    def counts(self) -> Counts:
        return self.window_counts

    def _window_row(self, r: int) -> list[ScoreMap]:
        if r not in self.cache:
            y1, y2 = self.row_windows[r]
            self.cache[r] = [scores_padded(self.model, self.images[:, :, y1:y2, x1:x2]) for x1, x2 in self.col_windows]
            if r not in self.counted:
                self.counted.add(r)
                self.window_counts = add_counts(self.window_counts, *(window.counts for window in self.cache[r]))
        return self.cache[r]

    def _count(self, start: int, stop: int, dtype: torch.dtype) -> torch.Tensor:
        return (self.row_count[start:stop, None] * self.col_count[None, :]).to(dtype)  # [n, W]

    def rows(self, start: int, stop: int) -> torch.Tensor:
        for r in [r for r in self.cache if self.row_windows[r][1] <= start]:
            del self.cache[r]
        total = None
        for r, (y1, y2) in enumerate(self.row_windows):
            if y2 <= start or y1 >= stop:
                continue
            a, b = max(start, y1), min(stop, y2)
            for (x1, x2), window in zip(self.col_windows, self._window_row(r)):
                band = window.rows(a - y1, b - y1)  # [B, K, b - a, x2 - x1]
                if total is None:
                    total = band.new_zeros(self.batch, band.shape[1], stop - start, self.size[1])
                total[:, :, a - start:b - start, x1:x2] += band
        return total / self._count(start, stop, total.dtype)

    def full(self) -> torch.Tensor:
        total = None
        for r, (y1, y2) in enumerate(self.row_windows):
            for (x1, x2), window in zip(self.col_windows, self._window_row(r)):
                scores = window.full()  # [B, K, y2 - y1, x2 - x1]
                if total is None:
                    total = scores.new_zeros(self.batch, scores.shape[1], *self.size)
                total[:, :, y1:y2, x1:x2] += scores
            del self.cache[r]
        return total / self._count(0, self.size[0], total.dtype)
