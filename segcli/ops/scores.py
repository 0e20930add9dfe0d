"""Per-class scores at the input size, formed on demand, a band of rows at a time.

Every model upsamples low-resolution scores to the input size at the very end. When only the
label map is wanted (``eval``, ``predict``) the full ``[B, K, H, W]`` tensor is the largest thing
a forward makes: 2.5 GB for 150 classes at 2048², 21 GB at 6000². A :class:`ScoreMap` is that
tensor left unformed: ``rows(start, stop)`` gives ``[B, K, stop - start, W]`` and ``full()`` the
whole tensor, so the engine can take the arg-max band by band (``engine/inference.py``
``labels_of``) and keep only ``[B, H, W]`` labels, and the full tensor (probabilities, FLOPs
tracing) is the same map asked for whole.

The contract between models and the engine: a segmentor's ``forward_scores(images)`` returns a
:class:`ScoreMap` (its ``forward(images)`` is that map's ``full()``); a head's ``score_map(outputs,
size)`` is its one scoring entry (``DecodeHead.seg_logits`` is its ``full()``). Most maps are
:class:`UpsampledScores`: low-resolution scores and the extent they are bilinearly resized to
before cropping to the input (:func:`~segcli.models.base.upsample_to_input`'s rule).

``full()`` runs whole-tensor operations (``F.interpolate``, as the heads always did, and what
FLOPs counters trace); ``rows`` computes the same bilinear interpolation for a band only
(:func:`resize_rows`: PyTorch's ``align_corners=False`` source-index rule, horizontal pass then
vertical, as ATen does), so the two agree to float rounding.

**Token counts.** A map also carries what the forward that made it did to its tokens, as counts
(``counts``: name -> 0-dim tensor, e.g. DToP's ``exited.0``, ``kept``, ``tokens``; Shrunk's ``kept``,
``edges``, ``tokens``). Counts add: a map made of others (slide windows, flips, scales) carries
the sum of theirs, so the fractions :func:`token_fractions` reports are weighted by token count
over every window and view, and summed across processes they stay exact. They travel with the
outputs rather than on the module, where only the last forward's would survive.
"""
from __future__ import annotations

from types import MappingProxyType
from typing import Callable, Mapping

import torch
import torch.nn.functional as F

RowFetch = Callable[[int, int], torch.Tensor]  # (start, stop) -> rows [B, C, stop - start, w]
Counts = Mapping[str, torch.Tensor]  # token counts by name (0-dim tensors); they add (module doc)
NO_COUNTS: Counts = MappingProxyType({})


def add_counts(*parts: Counts) -> dict[str, torch.Tensor]:
    """The key-wise sum of token counts (a key missing from a part counts 0)."""
    total: dict[str, torch.Tensor] = {}
    for part in parts:
        for key, value in part.items():
            total[key] = total[key] + value if key in total else value
    return total


def token_fractions(counts: Mapping[str, float]) -> dict:
    """What ``eval`` reports from summed counts: ``kept_fraction`` (tokens that reached the decode
    head, DToP; that stayed queries in the QD block, Shrunk), ``exit_fraction`` (one share per
    DToP exit stage, ``exited.<m>``) and ``edge_fraction`` (EQD's edge tokens), each over ``tokens``."""
    total = float(counts.get("tokens", 0))
    if total <= 0:
        return {}
    out: dict = {}
    stages = sorted(int(key.split(".", 1)[1]) for key in counts if key.startswith("exited."))
    if stages:
        out["exit_fraction"] = [float(counts[f"exited.{m}"]) / total for m in range(max(stages) + 1)]
    if "kept" in counts:
        out["kept_fraction"] = float(counts["kept"]) / total
    if "edges" in counts:
        out["edge_fraction"] = float(counts["edges"]) / total
    return out


class ScoreMap:
    """Scores ``[batch, channels, *size]`` produced by rows; subclasses implement :meth:`rows`.

    Sizes are kept as they are given, never turned into Python ints: under ``torch.export`` they
    are symbolic, and ``full()`` must stay a graph that runs at any input size (``export
    --dynamic``); the band-by-band path runs eagerly only."""

    batch: int
    channels: int
    size: tuple[int, int]
    own_counts: Counts = NO_COUNTS  # set by the segmentor whose forward made this map (with_counts)

    def children(self) -> list["ScoreMap"]:
        """The maps this one is made of (whose counts it carries too)."""
        return []

    @property
    def counts(self) -> Counts:
        """The token counts of every forward behind this map (module doc): its own and its children's."""
        return add_counts(self.own_counts, *(child.counts for child in self.children()))

    def with_counts(self, counts: Counts) -> "ScoreMap":
        """This map, carrying ``counts`` (set by the segmentor whose forward made it)."""
        self.own_counts = dict(counts)
        return self

    def rows(self, start: int, stop: int) -> torch.Tensor:  # pragma: no cover - interface
        """Rows ``start:stop`` of the scores: ``[B, K, stop - start, W]``."""
        raise NotImplementedError

    def full(self) -> torch.Tensor:
        """The whole ``[B, K, H, W]`` tensor."""
        return self.rows(0, self.size[0])

    def argmax_rows(self, start: int, stop: int) -> torch.Tensor:
        """``rows(start, stop).argmax(1)``: labels ``[B, stop - start, W]`` (a map may know a cheaper way)."""
        return self.rows(start, stop).argmax(1)

    def crop(self, height: int, width: int) -> "ScoreMap":
        """The top-left ``height × width`` of the map (padding removed)."""
        if (height, width) == tuple(self.size):
            return self
        return CroppedScores(self, height, width)


class DenseScores(ScoreMap):
    """A full tensor already formed (the fallback for heads without a lazy form)."""

    def __init__(self, scores: torch.Tensor):
        self.scores = scores  # [B, K, H, W]
        self.batch, self.channels = scores.shape[0], scores.shape[1]
        self.size = tuple(scores.shape[-2:])

    def rows(self, start: int, stop: int) -> torch.Tensor:
        return self.scores[:, :, start:stop]

    def full(self) -> torch.Tensor:
        return self.scores

    def crop(self, height: int, width: int) -> ScoreMap:
        return DenseScores(self.scores[..., :height, :width]).with_counts(self.own_counts)


class UpsampledScores(ScoreMap):
    """``resize(scores, extent)[..., :size[0], :size[1]]`` (bilinear, no corner alignment)."""

    def __init__(self, scores: torch.Tensor, extent: tuple[int, int], size: tuple[int, int] | None = None):
        self.scores = scores  # [B, K, h, w]
        self.extent = tuple(extent)
        self.size = self.extent if size is None else tuple(size)
        self.batch, self.channels = scores.shape[0], scores.shape[1]

    def rows(self, start: int, stop: int) -> torch.Tensor:
        band = resize_rows(lambda a, b: self.scores[:, :, a:b], int(self.scores.shape[-2]), self.extent, start, stop)
        return band[..., : self.size[1]]  # [B, K, stop - start, W]

    def full(self) -> torch.Tensor:
        return resize(self.scores, self.extent)[..., : self.size[0], : self.size[1]]  # [B, K, H, W]

    def crop(self, height: int, width: int) -> ScoreMap:
        return UpsampledScores(self.scores, self.extent, (height, width)).with_counts(self.own_counts)

    def argmax_rows(self, start: int, stop: int) -> torch.Tensor:
        """Labels of rows ``start:stop`` upsampling only the classes that can win there.

        Each output row lies between two source rows ``a`` and ``b`` (after the width pass) and
        its scores are ``(1 - t) a + t b``, so a class whose ``max(a, b)`` is below some class's
        ``min(a, b)`` cannot be the arg-max anywhere between them. Per source-row pair and
        column, the ``T`` classes of largest ``max(a, b)`` include every possible winner (``T`` =
        the band's largest count of classes above that bound, with a relative slack of 1e-5 so
        that near-ties from rounding stay in); only those are interpolated, in class order so that
        ties go to the lower class as in ``argmax``. The same arithmetic as :meth:`rows` (width
        pass, then the two vertical taps, element by element rather than as a matmul), so labels
        agree with ``rows(...).argmax(1)`` up to float rounding between near-equal classes. When
        ``T`` exceeds a quarter of the classes (flat scores), the dense band is cheaper and is
        used; so is it below 32 classes, where the dense band is as fast."""
        in_height, out_w = int(self.scores.shape[-2]), self.extent[1]
        if in_height == self.extent[0] or self.channels < 32:
            return super().argmax_rows(start, stop)
        first, last, index0, index1, weight1 = source_rows(in_height, self.extent[0], start, stop)
        band = self.scores[:, :, first:last + 1].contiguous(memory_format=torch.channels_last)  # [B, K, m, w]
        band = band if band.shape[-1] == out_w else _resize_width(band, out_w)  # [B, K, m, W]
        band = band[..., : self.size[1]]
        rows = band.permute(0, 2, 3, 1)  # [B, m, W, K], classes innermost (a view: the band is channels-last)
        pairs, row_pair = torch.unique(torch.stack([index0, index1], 1), dim=0, return_inverse=True)  # [P, 2], [n]
        top, bottom = rows.index_select(1, pairs[:, 0]), rows.index_select(1, pairs[:, 1])  # [B, P, W, K] each
        upper = torch.maximum(top, bottom)
        bound = torch.minimum(top, bottom).amax(-1, keepdim=True)  # [B, P, W, 1]: a winner's score is above it
        bound = bound - 1e-5 * bound.abs()
        count = int((upper >= bound).sum(-1).max())
        if 4 * count > self.channels:
            return super().argmax_rows(start, stop)
        classes = upper.topk(count, dim=-1).indices.sort(dim=-1).values  # [B, P, W, T], ascending class ids
        top, bottom = top.gather(-1, classes), bottom.gather(-1, classes)  # [B, P, W, T]
        pair_rows = torch.cat([top, bottom], 1)  # [B, 2P, W, T]: the two rows of pair p at p and P + p
        scores = vertical_taps(pair_rows, row_pair, row_pair + len(pairs), weight1)  # [B, n, W, T]
        best, winner = scores[..., 0], torch.zeros(scores.shape[:-1], dtype=torch.long, device=scores.device)
        for j in range(1, count):  # a running arg-max over the few candidates (first maximum wins, as argmax)
            better = scores[..., j] > best
            best = torch.where(better, scores[..., j], best)
            winner.masked_fill_(better, j)
        return classes.index_select(1, row_pair).gather(-1, winner.unsqueeze(-1)).squeeze(-1)  # [B, n, W] class ids


class WrappedScores(ScoreMap):
    """A map computed from one other map, ``inner``, whose token counts it carries; of the inner
    map's size unless ``size`` says otherwise."""

    def __init__(self, inner: ScoreMap, size: tuple[int, int] | None = None):
        self.inner = inner
        self.batch, self.channels = inner.batch, inner.channels
        self.size = tuple(inner.size if size is None else size)

    def children(self) -> list[ScoreMap]:
        return [self.inner]


class CroppedScores(WrappedScores):
    def __init__(self, inner: ScoreMap, height: int, width: int):
        super().__init__(inner, (height, width))

    def rows(self, start: int, stop: int) -> torch.Tensor:
        return self.inner.rows(start, stop)[..., : self.size[1]]

    def argmax_rows(self, start: int, stop: int) -> torch.Tensor:
        return self.inner.argmax_rows(start, stop)[..., : self.size[1]]  # a pixel's arg-max ignores other columns

    def full(self) -> torch.Tensor:
        return self.inner.full()[..., : self.size[0], : self.size[1]]


class ResizedScores(WrappedScores):
    """``resize(inner, size)`` (in ``dtype`` if given): a map brought to another size."""

    def __init__(self, inner: ScoreMap, size: tuple[int, int], dtype: torch.dtype | None = None):
        super().__init__(inner, size)
        self.dtype = dtype

    def rows(self, start: int, stop: int) -> torch.Tensor:
        def fetch(a: int, b: int) -> torch.Tensor:
            band = self.inner.rows(a, b)
            return band if self.dtype is None else band.to(self.dtype)

        return resize_rows(fetch, self.inner.size[0], self.size, start, stop)

    def full(self) -> torch.Tensor:
        inner = self.inner.full()
        return resize(inner if self.dtype is None else inner.to(self.dtype), self.size)


class ConcatScores(ScoreMap):
    """Maps of the same size joined along the class axis (SegViT-CL's per-task heads)."""

    def __init__(self, parts: list[ScoreMap]):
        self.parts = parts
        self.batch, self.size = parts[0].batch, tuple(parts[0].size)
        self.channels = sum(p.channels for p in parts)

    def rows(self, start: int, stop: int) -> torch.Tensor:
        return torch.cat([p.rows(start, stop) for p in self.parts], dim=1)

    def full(self) -> torch.Tensor:
        return torch.cat([p.full() for p in self.parts], dim=1)

    def children(self) -> list[ScoreMap]:
        return list(self.parts)


def resize(x: torch.Tensor, size: tuple[int, int], mode: str = "bilinear") -> torch.Tensor:
    """Bilinear resize without corner alignment (MMSegmentation's convention); no-op if equal."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    x = x.contiguous()  # NCHW: ATen's channels-last 2-D bilinear upsampling is an order of magnitude slower on CPU
    if mode == "nearest":
        return F.interpolate(x, size=size, mode="nearest")
    return F.interpolate(x, size=size, mode=mode, align_corners=False)


def source_rows(in_size: int, out_size: int, start: int, stop: int, device=None):
    """Bilinear (``align_corners=False``) taps of output rows ``start:stop`` in an input of
    ``in_size`` rows: ``(first, last)`` input rows read and, per output row, the two tap offsets
    from ``first`` and the weight of the second (PyTorch's ``area_pixel_compute_source_index``)."""
    scale = torch.tensor(in_size, dtype=torch.float32) / out_size  # float32, as ATen's opmath for float
    src = (torch.arange(start, stop, dtype=torch.float32, device=device) + 0.5) * scale.to(device) - 0.5
    src = src.clamp_min(0)
    index0 = src.long()  # floor (src >= 0)
    index1 = torch.where(index0 < in_size - 1, index0 + 1, index0)
    weight1 = (src - index0).clamp(0, 1)
    first, last = int(index0[0]), int(index1[-1])
    return first, last, index0 - first, index1 - first, weight1


def resize_rows(fetch: RowFetch, in_height: int, size: tuple[int, int], start: int, stop: int) -> torch.Tensor:
    """Rows ``start:stop`` of ``resize(x, size)`` reading only the rows of ``x`` they need
    (``fetch(a, b)`` = ``x[:, :, a:b]``; ``x`` has ``in_height`` rows)."""
    out_h, out_w = int(size[0]), int(size[1])
    if in_height == out_h:  # no vertical resampling: only the width changes
        band = fetch(start, stop)  # [B, C, n, w]
        return band if band.shape[-1] == out_w else _resize_width(band, out_w)
    first, last, index0, index1, weight1 = source_rows(in_height, out_h, start, stop)
    # classes innermost from here on ([B, C, m, w] stored as [B, m, w, C]): the small input rows are
    # reordered once, the width pass keeps the order, and the band comes out with the classes
    # contiguous, where the arg-max over them is a vectorised inner reduction (over the middle axis
    # of a plain [B, C, n, W] tensor it is several times slower on CPU)
    band = fetch(first, last + 1).contiguous(memory_format=torch.channels_last)  # [B, C, m, w]
    band = band if band.shape[-1] == out_w else _resize_width(band, out_w)  # [B, C, m, W], classes innermost
    batch, channels, m, _ = band.shape
    # the vertical taps as a [n, m] matrix with two weights a row: one pass of a matmul, faster than
    # gathering two rows per output row and blending them (several passes over a band of many classes)
    taps = torch.zeros(stop - start, m, dtype=band.dtype)  # [n, m]
    rows = torch.arange(stop - start)
    taps.index_put_((rows, index0), (1 - weight1).to(band.dtype), accumulate=True)
    taps.index_put_((rows, index1), weight1.to(band.dtype), accumulate=True)
    flat = band.permute(0, 2, 3, 1).reshape(batch, m, out_w * channels)  # [B, m, W*C] (a view)
    out = torch.matmul(taps.to(band.device), flat)  # [B, n, W*C]
    return out.view(batch, stop - start, out_w, channels).permute(0, 3, 1, 2)  # [B, C, n, W], classes innermost


def vertical_taps(rows: torch.Tensor, index0: torch.Tensor, index1: torch.Tensor, weight1: torch.Tensor) -> torch.Tensor:
    """``rows[:, index0] * (1 - w) + rows[:, index1] * w`` for ``rows`` ``[B, m, W, C]`` -> ``[B, n, W, C]``
    (the candidates' vertical pass in :meth:`UpsampledScores.argmax_rows`, where C is small)."""
    weight = weight1.to(device=rows.device, dtype=rows.dtype).view(1, -1, 1, 1)  # [1, n, 1, 1]
    out = rows.index_select(1, index0.to(rows.device)).mul_(1 - weight)
    return out.add_(rows.index_select(1, index1.to(rows.device)).mul_(weight))


def nearest_rows(fetch: RowFetch, in_height: int, size: tuple[int, int], start: int, stop: int) -> torch.Tensor:
    """Rows ``start:stop`` of ``F.interpolate(x, size, mode="nearest")`` (exact: nearest is separable)."""
    column = fetch(0, in_height)  # [B, C, h, w]: callers pass small maps (an indicator)
    tall = F.interpolate(column, size=(int(size[0]), int(column.shape[-1])), mode="nearest")  # [B, C, H, w]
    return F.interpolate(tall[:, :, start:stop], size=(stop - start, int(size[1])), mode="nearest")  # [B, C, n, W]


def _resize_width(band: torch.Tensor, width: int) -> torch.Tensor:
    """Bilinear along the last axis only: ``[B, C, m, w]`` -> ``[B, C, m, width]``."""
    return F.interpolate(band, size=(int(band.shape[-2]), width), mode="bilinear", align_corners=False)
