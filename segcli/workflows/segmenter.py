"""In-memory inference: ``Segmenter(checkpoint)(image) -> labels`` for notebooks, services and scripts.

Decisions:

* Images are RGB ``uint8`` arrays ``[H, W, 3]`` (what ``segcli.data.read_image`` and PIL give;
  OpenCV users convert from BGR first) or paths to image files. A list of images gives a list
  of results; images keep their own sizes, so they run one after another.
* The recipe's test pipeline is applied as ``segcli eval`` / ``predict`` apply it (whole or
  slide mode, test scale, flips), and labels are formed band by band without the full-size
  score tensor (``engine/inference.py``).
* ``probabilities=True`` returns ``[K, H, W]`` float32 class probabilities: the softmax over
  classes of the model's scores, which is what MMSegmentation's inference reports for every head
  (for an ATM head the scores of eq. 4.4 are not normalised, so they are normalised this way too);
  with several test views, the mean of their probabilities (mmseg's ``aug_test``).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..build import LoadedModel, load_checkpoint, pick_device
from ..data import read_image
from ..data.transforms import image_tensor
from ..engine.inference import infer_labels, infer_probabilities, prepare_for_inference
from ..errors import SegcliError

Image = np.ndarray | str | Path


class Segmenter:
    """A checkpoint loaded once, called on images: ``labels = Segmenter("best.pt")(image)``."""

    def __init__(self, checkpoint: str | Path, device: str | None = None):
        self.device = pick_device(device)
        self.loaded: LoadedModel = load_checkpoint(checkpoint, device=self.device)
        prepare_for_inference(self.loaded.model)

    @property
    def classes(self) -> list[str]:
        return list(self.loaded.meta["classes"])

    @property
    def palette(self) -> np.ndarray:
        return np.asarray(self.loaded.meta["palette"], dtype=np.uint8)  # [K, 3] RGB

    def _tensor(self, image: Image) -> torch.Tensor:
        if isinstance(image, (str, Path)):
            image = read_image(str(image))
        if not isinstance(image, np.ndarray) or image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            shape = getattr(image, "shape", None)
            raise SegcliError(f"expected an RGB uint8 array [H, W, 3] or an image path, got {type(image).__name__} "
                              f"{shape}", "image", "e.g. segcli.data.read_image(path)")
        return image_tensor(image).to(self.device)  # [1, 3, H, W] uint8: resized and normalised per test view

    @torch.no_grad()
    def _one(self, image: Image, probabilities: bool) -> np.ndarray:
        tensor = self._tensor(image)
        model, recipe = self.loaded.model, self.loaded.recipe
        data = recipe.data
        if probabilities:
            probs = infer_probabilities(model, tensor, recipe.test, data.crop_size, data.mean, data.std)  # [1, K, H, W]
            return probs.float()[0].cpu().numpy()  # [K, H, W]
        labels = infer_labels(model, tensor, recipe.test, data.crop_size, mean=data.mean, std=data.std)[0]  # [H, W]
        dtype = np.uint8 if len(self.classes) <= 256 else np.int32
        return labels.cpu().numpy().astype(dtype)

    def __call__(self, images: Image | list[Image], probabilities: bool = False) -> np.ndarray | list[np.ndarray]:
        """Labels ``[H, W]`` (class ids) per image, or ``[K, H, W]`` probabilities."""
        if isinstance(images, (list, tuple)):
            return [self._one(image, probabilities) for image in images]
        return self._one(images, probabilities)
