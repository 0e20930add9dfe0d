"""Cityscapes: ``leftImg8bit_trainvaltest.zip`` + ``gtFine_trainvaltest.zip`` -> the reader's layout.

SRC holds what cityscapes-dataset.com gives: each of the two zips as downloaded (read in place,
never extracted), or extracted into SRC (``leftImg8bit/``, ``gtFine/``), or one of each. Both forms
go through :class:`~.common.Files`, so listing and pairing are one code path. Where a part is both
extracted and zipped, the folder is read (its images can be hard-linked) and a note says so.

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
drawn into either. Train and val are prepared with labels. The test split's images are placed too
(``leftImg8bit/test/<city>/``), without labels: its annotations are not public (every pixel of
``gtFine/test`` is "unlabeled"), but its images are what ``segcli eval --format-only DIR --split
test`` segments for a server submission.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from ...errors import SegcliError
from ..classes import CITYSCAPES_LABEL_IDS
from .common import Files, Plan, Step, apply_lut, decode_png, lookup_table

NUM_LABEL_IDS = 34  # cityscapesScripts' ids 0 (unlabeled) .. 33 (bicycle) are what labelIds PNGs hold
LABELLED_SPLITS = ("train", "val")
UNLABELLED_SPLIT = "test"  # images only: the annotations are not public
IMAGES, LABELS = "leftImg8bit", "gtFine"  # the two downloads' top folders
IMAGE_SUFFIX, LABEL_SUFFIX = "_leftImg8bit.png", "_gtFine_labelIds.png"
LAYOUT = ("SRC/leftImg8bit_trainvaltest.zip and SRC/gtFine_trainvaltest.zip as downloaded, or extracted into SRC: "
          "leftImg8bit/{train,val,test}/<city>/*_leftImg8bit.png, gtFine/{train,val}/<city>/*_gtFine_labelIds.png")


def archive_name(part: str) -> str:
    return f"{part}_trainvaltest.zip"


def train_id_table() -> tuple[np.ndarray, np.ndarray]:
    """``(lut, valid)``: label id -> train id (255 = ignore) for ids 0..33."""
    to_train = {label_id: 255 for label_id in range(NUM_LABEL_IDS)}
    to_train.update({label_id: train_id for train_id, label_id in enumerate(CITYSCAPES_LABEL_IDS)})
    return lookup_table(to_train, 256)


def to_train_ids(data: bytes, where: str) -> np.ndarray:
    """A ``*_gtFine_labelIds.png`` file's bytes -> its ``[H, W]`` train-id map."""
    lut, valid = train_id_table()
    return apply_lut(decode_png(data, where), lut, valid, where, "Cityscapes label ids (0..33)")


def open_part(src: Path, part: str) -> tuple[Files, list[str]]:
    """``part``'s files (the folder SRC/part, else the zip SRC/part_trainvaltest.zip) and notes."""
    folder, archive = src / part, src / archive_name(part)
    if folder.is_dir():
        notes = [f"read {part}/, not {archive.name} beside it"] if archive.is_file() else []
        return Files.folder(folder), notes
    if archive.is_file():
        return Files.archive(archive, part + "/", LAYOUT), []
    raise SegcliError(f"neither {part}/ nor {archive.name} here", str(src), f"expected {LAYOUT}")


def split_files(files: Files, split: str, suffix: str) -> dict[str, str]:
    """``{'<city>/<stem>': relative path}`` of ``split``'s files that end in ``suffix``."""
    head = split + "/"
    return {name[len(head):-len(suffix)]: name for name in files.names()
            if name.startswith(head) and name.endswith(suffix)}


def pair_split(images: Files, labels: Files, split: str) -> list[tuple[str, str]]:
    """``split``'s ``(image, label)`` relative paths, sorted; every image needs its label and back.

    The errors name the file that is missing where the user would look for it (a folder path or
    ``archive.zip:member``) and the file that needs it.
    """
    image_files = split_files(images, split, IMAGE_SUFFIX)
    if not image_files:
        raise SegcliError(f"no {split} images (*{IMAGE_SUFFIX})", images.where(split), f"expected {LAYOUT}")
    label_files = split_files(labels, split, LABEL_SUFFIX)
    if not label_files:
        raise SegcliError(f"no {split} labels (*{LABEL_SUFFIX})", labels.where(split), f"expected {LAYOUT}")
    lonely_images = sorted(set(image_files) - set(label_files))
    if lonely_images:
        key = lonely_images[0]
        raise _missing("label", labels.where(f"{split}/{key}{LABEL_SUFFIX}"), images.where(image_files[key]),
                       LABELS, f"{len(lonely_images)} of {len(image_files)} {split} images lack one")
    lonely_labels = sorted(set(label_files) - set(image_files))
    if lonely_labels:
        key = lonely_labels[0]
        raise _missing("image", images.where(f"{split}/{key}{IMAGE_SUFFIX}"), labels.where(label_files[key]),
                       IMAGES, f"{len(lonely_labels)} of {len(label_files)} {split} labels lack one")
    return [(image_files[key], label_files[key]) for key in sorted(image_files)]


def _missing(what: str, missing: str, needed_by: str, part: str, count: str) -> SegcliError:
    return SegcliError(f"{what} not found ({count})", missing,
                       f"{needed_by} needs it: extract or download {archive_name(part)} again")


def plan_cityscapes(src: Path) -> Plan:
    if src.is_file():
        raise SegcliError("a file, not a folder", str(src),
                          f"give the folder that holds {archive_name(IMAGES)} and {archive_name(LABELS)}")
    (images, image_notes), (labels, label_notes) = open_part(src, IMAGES), open_part(src, LABELS)
    steps: list[Step] = []
    samples: dict[str, int] = {}
    for split in LABELLED_SPLITS:
        pairs = pair_split(images, labels, split)
        samples[split] = len(pairs)
        for image, label in pairs:
            steps.append(images.step(f"{IMAGES}/{image}", image))
            steps.append(labels.step(f"{LABELS}/{label[: -len('_labelIds.png')]}_labelTrainIds.png", label,
                                     convert=to_train_ids))
    test_images = split_files(images, UNLABELLED_SPLIT, IMAGE_SUFFIX)
    if test_images:
        samples[UNLABELLED_SPLIT] = len(test_images)
        steps.extend(images.step(f"{IMAGES}/{name}", name) for _, name in sorted(test_images.items()))
        notes = ["test: images only, no labels (not public): for segcli eval CKPT --format-only DIR --split test"]
    else:
        notes = [f"no test images ({images.where(UNLABELLED_SPLIT)}): eval --format-only --split test will need them"]
    return Plan("cityscapes", steps, ("cityscapes",), samples, [*image_notes, *label_notes, *notes])
