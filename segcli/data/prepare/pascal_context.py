"""Pascal Context (59 and 60 classes): VOC2010 + the context annotations -> the reader's layout.

Expected downloads, both extracted into SRC:

* ``VOCtrainval_03-May-2010.tar`` -> ``SRC/VOCdevkit/VOC2010/`` (``JPEGImages/*.jpg`` and the
  split lists ``ImageSets/Main/{train,val}.txt``: 4998 + 5105 images, the splits of Pascal Context
  and of the Detail API's ``train``/``val`` phases);
* ``trainval.tar.gz`` from cs.stanford.edu/~roozbeh/pascal-context -> ``SRC/trainval/<name>.mat``,
  one per image, array ``LabelMap`` of the 459 classes of its ``labels.txt`` (1-based).

MMSegmentation's converter (``tools/convert_datasets/pascal_context.py``, 0.24.1; SegViT ships the
same file) reads the Detail API's ``trainval_merged.json`` instead; that API is not on the package
index. Its masks hold Detail category ids, which are the ``labels.txt`` indices (2 = aeroplane,
9 = bag, ...), 0 where none of the 59 classes is drawn; it writes the index of each id in the sorted
list of the 59 ids and 0. From ``LabelMap`` the same ids are mapped the same way, and each of the
other 400 classes becomes 0 (background), as it is absent from the merged JSON. The output is
``VOC2010/JPEGImages``, ``SegmentationClassContext/<name>.png`` (0 = background, 1..59) and
``ImageSets/SegmentationContext/{train,val}.txt``: both ``pascal_context`` (60 classes) and
``pascal_context_59`` (0 -> 255) read it.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from ...errors import SegcliError
from .common import Plan, Step, apply_lut, list_names, lookup_table, mat_array, require_scipy_loadmat

# The Detail/labels.txt ids of the 59 classes, as listed by MMSegmentation's converter; sorted, an
# id's position is its written class id (0 = background).
CONTEXT_59_IDS = (2, 9, 18, 19, 22, 23, 25, 31, 33, 34, 44, 45, 46, 59, 65, 68, 72, 80, 85, 98, 104, 105, 113,
                  115, 144, 158, 159, 162, 187, 189, 207, 220, 232, 258, 259, 260, 284, 295, 296, 308, 324, 326,
                  347, 349, 354, 355, 360, 366, 368, 397, 415, 416, 420, 424, 427, 440, 445, 454, 458)
NUM_CONTEXT_CLASSES = 459
SPLITS = ("train", "val")
LAYOUT = ("SRC/VOCdevkit/VOC2010/{JPEGImages,ImageSets/Main/{train,val}.txt} (VOCtrainval_03-May-2010.tar) + "
          "SRC/trainval/*.mat (trainval.tar.gz from cs.stanford.edu/~roozbeh/pascal-context)")


def class_table() -> tuple[np.ndarray, np.ndarray]:
    """``(lut, valid)``: labels.txt id (0..459) -> 0 (background) or 1..59."""
    to_class = {raw: 0 for raw in range(NUM_CONTEXT_CLASSES + 1)}
    to_class.update({raw: index + 1 for index, raw in enumerate(sorted(CONTEXT_59_IDS))})
    return lookup_table(to_class, NUM_CONTEXT_CLASSES + 1)


def to_class_ids(data: bytes, where: str) -> np.ndarray:
    """A ``trainval/<name>.mat`` file's bytes -> its ``[H, W]`` map of 0..59."""
    lut, valid = class_table()
    return apply_lut(mat_array(data, "LabelMap", where), lut, valid, where, "Pascal Context ids (0..459)")


def _find(src: Path, candidates: tuple[str, ...], marker: str, what: str) -> Path:
    for candidate in candidates:
        if (src / candidate / marker).exists():
            return src / candidate
    raise SegcliError(f"{what} not found (looked for {', '.join(str(Path(c) / marker) for c in candidates)})",
                      str(src), f"expected {LAYOUT}")


def plan_pascal_context(src: Path) -> Plan:
    require_scipy_loadmat()  # before anything is written
    voc = _find(src, ("VOCdevkit/VOC2010", "VOC2010", "."), "JPEGImages", "VOC2010 images")
    context = _find(src, ("trainval", "VOCdevkit/VOC2010/trainval", "."), "", "context annotations")
    if not any(context.glob("*.mat")):
        raise SegcliError("no context annotations (*.mat) found", str(src / "trainval"), f"expected {LAYOUT}")
    steps: list[Step] = []
    samples: dict[str, int] = {}
    lists: dict[str, list[str]] = {}
    for split in SPLITS:
        list_file = voc / "ImageSets" / "Main" / f"{split}.txt"
        if not list_file.is_file():
            raise SegcliError("VOC2010 split list not found", str(list_file), f"expected {LAYOUT}")
        names = list_names(list_file)
        for folder, suffix, what in ((voc / "JPEGImages", ".jpg", "image"), (context, ".mat", "context annotation")):
            missing = [name for name in names if not (folder / (name + suffix)).is_file()]
            if missing:
                raise SegcliError(f"{what} of an image listed in {list_file.name} not found ({len(missing)} of "
                                  f"{len(names)} missing)", str(folder / (missing[0] + suffix)),
                                  "extract both downloads completely into SRC")
        lists[split] = sorted(names)
        samples[split] = len(names)
        for name in lists[split]:
            steps.append(Step(f"JPEGImages/{name}.jpg", str(voc / "JPEGImages" / f"{name}.jpg")))
            steps.append(Step(f"SegmentationClassContext/{name}.png", str(context / f"{name}.mat"),
                              convert=to_class_ids))
    for split, names in lists.items():  # last: a run that stopped early leaves no list naming missing files
        steps.append(Step(f"ImageSets/SegmentationContext/{split}.txt", str(voc / "ImageSets" / "Main" / f"{split}.txt"),
                          text="".join(name + "\n" for name in names)))
    return Plan("pascal_context", steps, ("pascal_context", "pascal_context_59"), samples)
