"""Cityscapes: ``leftImg8bit_trainvaltest.zip`` + ``gtFine_trainvaltest.zip`` -> the reader's layout.

Decision: write ``*_gtFine_labelTrainIds.png`` next to the images rather than map
``*_gtFine_labelIds.png`` while reading. The prepared root is then the layout MMSegmentation and
SegViT's configs read (cityscapesScripts' ``createTrainIdLabelImgs`` writes the same files), the
reader keeps one format, and reading costs no per-image mapping. The mapping is cityscapesScripts'
label table (``helpers/labels.py``: ``id`` -> ``trainId``, 255 for every id that is not one of the
19 classes), taken from :data:`segcli.data.classes.CITYSCAPES_LABEL_IDS`, the one copy of that
table in segcli; the ``cityscapesscripts`` package itself is not needed (it pulls matplotlib and
more for a 34-row table).

Mapping the released ``labelIds`` PNGs gives what ``createTrainIdLabelImgs`` draws from the JSON
polygons: each pixel's final id maps to its train id, and the license plate (id -1) is never
drawn into either. Only train and val are prepared: the test annotations are not public (every
pixel of ``gtFine/test`` is "unlabeled").
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from ...errors import SegcliError
from ..classes import CITYSCAPES_LABEL_IDS
from ..datasets import pair_by_name
from .common import Plan, Step, apply_lut, decode_png, lookup_table

NUM_LABEL_IDS = 34  # cityscapesScripts' ids 0 (unlabeled) .. 33 (bicycle) are what labelIds PNGs hold
SPLITS = ("train", "val")
LAYOUT = ("SRC/leftImg8bit/{train,val}/<city>/*_leftImg8bit.png (leftImg8bit_trainvaltest.zip) + "
          "SRC/gtFine/{train,val}/<city>/*_gtFine_labelIds.png (gtFine_trainvaltest.zip), both extracted into SRC")


def train_id_table() -> tuple[np.ndarray, np.ndarray]:
    """``(lut, valid)``: label id -> train id (255 = ignore) for ids 0..33."""
    to_train = {label_id: 255 for label_id in range(NUM_LABEL_IDS)}
    to_train.update({label_id: train_id for train_id, label_id in enumerate(CITYSCAPES_LABEL_IDS)})
    return lookup_table(to_train, 256)


def to_train_ids(data: bytes, where: str) -> np.ndarray:
    """A ``*_gtFine_labelIds.png`` file's bytes -> its ``[H, W]`` train-id map."""
    lut, valid = train_id_table()
    return apply_lut(decode_png(data, where), lut, valid, where, "Cityscapes label ids (0..33)")


def plan_cityscapes(src: Path) -> Plan:
    for folder in ("leftImg8bit", "gtFine"):
        if not (src / folder).is_dir():
            raise SegcliError(f"no {folder}/ folder here", str(src), f"expected {LAYOUT}")
    steps: list[Step] = []
    samples: dict[str, int] = {}
    for split in SPLITS:
        image_dir, label_dir = src / "leftImg8bit" / split, src / "gtFine" / split
        pairs = pair_by_name(image_dir, label_dir, ("_leftImg8bit.png",), "_gtFine_labelIds.png", LAYOUT,
                             recursive=True)
        samples[split] = len(pairs)
        for image, label in pairs:
            image_rel = Path(image).relative_to(src).as_posix()
            label_rel = Path(label).relative_to(src).as_posix()
            steps.append(Step(image_rel, image))
            steps.append(Step(label_rel[: -len("_labelIds.png")] + "_labelTrainIds.png", label, convert=to_train_ids))
    notes = ["test split skipped: its annotations are not public (gtFine/test is all 'unlabeled')"]
    return Plan("cityscapes", steps, ("cityscapes",), samples, notes)
