"""The deployable graph and its ONNX runtime counterpart (``segcli export``, ``predict`` on a .onnx).

:class:`DeployGraph` wraps a segmentor into the one function that ships: an image tensor in,
labels or class scores out. Decisions:

* **Input**: ``image`` float32 ``[B, 3, H, W]``, RGB, 0..255 (what a decoded uint8 image becomes
  with one cast). The recipe's mean/std are constants inside the graph, so a caller needs to know
  nothing about the training normalisation.
* **Padding inside**: the normalised image is zero-padded to the backbone's size divisor and the
  scores cropped back, or resized back for a ViT (as :func:`segcli.engine.inference.scores_padded`),
  so a dynamic graph takes any H, W.
* **Output**: ``labels`` int64 ``[B, H, W]`` (argmax) or ``scores`` float32 ``[B, K, H, W]``.

:class:`OnnxSegmentor` runs an exported file with onnxruntime behind the interface the inference
engine expects of a model (``model(normalised images) -> scores``), so ``segcli predict`` takes a
.onnx file through the same code path as a checkpoint. What predict needs besides the graph (class
names, palette, the recipe) travels in the ONNX ``metadata_props`` (:data:`META_KEYS`).
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..errors import SegcliError
from .inference import resizes_padded_scores, size_divisor

META_PREFIX = "segcli."
META_KEYS = ("format", "recipe", "meta", "output", "input", "dynamic", "shape", "batch", "version")
INPUT_NAME = "image"
EXTRA_HINT = 'pip install "segcli[export]"'


class DeployGraph(nn.Module):
    """Image ``[B, 3, H, W]`` float 0..255 RGB -> labels int64 ``[B, H, W]`` or scores ``[B, K, H, W]``."""

    def __init__(self, model: nn.Module, mean, std, output: str = "labels"):
        super().__init__()
        if output not in ("labels", "scores"):
            raise ValueError(f"output must be labels or scores, got {output}")
        self.model = model
        self.output = output
        self.size_divisor = size_divisor(model)
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        height, width = image.shape[-2:]
        x = (image - self.mean) / self.std  # [B, 3, H, W]
        div = self.size_divisor
        pad_h, pad_w = (div - height % div) % div, (div - width % div) % div
        x = F.pad(x, (0, pad_w, 0, pad_h))  # [B, 3, H', W'], zeros after normalisation as in predict
        scores = self.model(x)  # [B, K, H', W']
        if resizes_padded_scores(self.model):  # mmseg's ViT: the padded grid's scores resized to the image
            scores = F.interpolate(scores, size=(height, width), mode="bilinear", align_corners=False)
        else:
            scores = scores[:, :, :height, :width]  # [B, K, H, W]
        if self.output == "labels":
            return scores.argmax(1)  # [B, H, W] int64
        return scores.float()


# --------------------------------------------------------------------------- onnxruntime


def require_onnxruntime():
    try:
        import onnxruntime
    except ImportError:
        raise SegcliError("running ONNX files needs onnxruntime", "onnxruntime", f"install the extra: {EXTRA_HINT}") \
            from None
    return onnxruntime


def ort_session(path: str | Path, threads: int | None = None):
    """A CPU onnxruntime session (no network, no GPU provider: deterministic and installable anywhere)."""
    ort = require_onnxruntime()
    options = ort.SessionOptions()
    options.log_severity_level = 3
    if threads:
        options.intra_op_num_threads = threads
    try:
        return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as err:  # onnxruntime raises its own classes for corrupt / foreign files
        raise SegcliError(f"onnxruntime cannot load this file ({str(err).splitlines()[0][:160]})", str(path),
                          "give a .onnx written by `segcli export`") from None


def read_metadata(session, source: str) -> dict:
    """The ``segcli.*`` metadata an exported file carries, decoded from JSON."""
    props = session.get_modelmeta().custom_metadata_map
    if props.get(META_PREFIX + "format") != json.dumps("segcli"):
        raise SegcliError("not a segcli ONNX file (no segcli metadata)", source,
                          "export it with `segcli export CHECKPOINT`")
    return {key: json.loads(props[META_PREFIX + key]) for key in META_KEYS if META_PREFIX + key in props}


class _Backbone:
    size_divisor = 1  # the graph pads inside; the engine must not pad again


class OnnxSegmentor:
    """An exported graph behind the model interface of :mod:`segcli.engine.inference`.

    Called with *normalised* images (what the engine feeds a PyTorch model) it undoes the
    normalisation, runs the graph on 0..255 images and returns scores ``[B, K, H, W]``; a graph
    that outputs labels gives one-hot scores (so whole-image inference yields the same labels;
    TTA or sliding windows then vote instead of averaging scores).
    """

    backbone = _Backbone()

    def __init__(self, session, metadata: dict, source: str):
        self.session = session
        self.source = source
        self.output = metadata["output"]
        self.num_classes = int(metadata["meta"]["num_classes"])
        self.dynamic_axes = set(metadata.get("dynamic") or ())
        self.shape = tuple(metadata.get("shape") or ())
        self.batch = int(metadata.get("batch", 1))
        data = metadata["recipe"]["data"]
        self.mean = torch.tensor(data["mean"], dtype=torch.float32).view(1, 3, 1, 1)
        self.std = torch.tensor(data["std"], dtype=torch.float32).view(1, 3, 1, 1)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        fixed = [(axis, want, got) for axis, want, got in zip(("height", "width"), self.shape, images.shape[-2:])
                 if axis not in self.dynamic_axes and want != got]
        if fixed:
            raise SegcliError(f"this ONNX file takes {self.shape[0]}x{self.shape[1]} images, got "
                              f"{images.shape[-2]}x{images.shape[-1]}", self.source,
                              "export with --dynamic, or with --shape H W of your images")
        pixels = (images.detach().float().cpu() * self.std + self.mean).numpy()  # [B, 3, H, W] 0..255
        step = len(pixels) if "batch" in self.dynamic_axes else self.batch
        if len(pixels) % step:
            raise SegcliError(f"this ONNX file takes batches of {self.batch}", self.source, "export with --dynamic")
        outputs = [self.session.run(None, {INPUT_NAME: np.ascontiguousarray(pixels[i:i + step])})[0]
                   for i in range(0, len(pixels), step)]
        result = torch.from_numpy(np.concatenate(outputs))
        if self.output == "labels":  # [B, H, W] -> one-hot [B, K, H, W]
            return F.one_hot(result.long(), self.num_classes).permute(0, 3, 1, 2).float()
        return result.float()

    # the small part of nn.Module the workflows touch
    def to(self, *args, **kwargs):
        return self

    def eval(self):
        return self
