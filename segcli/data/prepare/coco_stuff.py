"""COCO-Stuff-10K: ``cocostuff-10k-v1.1.zip`` (the zip itself, or extracted) -> the reader's layout.

The download holds ``images/<name>.jpg``, ``annotations/<name>.mat`` (array ``S``: COCO-Stuff ids,
0 = unlabeled, 1..182) and ``imageLists/{train,test}.txt`` (9000 + 1000 names). The output is
what the official converter writes (zbwxp/SegVit ``tools/convert_datasets/coco_stuff10k.py``, as
MMSegmentation's): ``images/{train2014,test2014}/<name>.jpg`` and
``annotations/{train2014,test2014}/<name>_labelTrainIds.png`` with the 182 COCO-Stuff ids packed
to 1..171 in order (0 stays 0 = unlabeled; the reader's ``reduce_zero_label`` makes it 255).

The 11 ids COCO never used (12, 26, 29, 30, 45, 66, 68, 69, 71, 83 among the things, 91 between
things and stuff) have no class. The official converter leaves such a value as it is, which
would silently become another class; here a file holding one is refused, as is any value > 182.
"""
from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np

from ...errors import SegcliError
from .common import Files, Plan, Step, apply_lut, lookup_table, mat_array, require_scipy_loadmat

UNUSED_IDS = (12, 26, 29, 30, 45, 66, 68, 69, 71, 83, 91)
MAX_ID = 182
SPLITS = {"train": "train2014", "test": "test2014"}  # imageLists/<key>.txt -> output folder
OFFICIAL_SIZE = 10000
LAYOUT = ("cocostuff-10k-v1.1.zip, or the folder it extracts to: images/*.jpg, annotations/*.mat, "
          "imageLists/{train,test}.txt")


def class_table() -> tuple[np.ndarray, np.ndarray]:
    """``(lut, valid)``: COCO-Stuff id -> written id (0 -> 0, the 171 used ids -> 1..171)."""
    used = [raw for raw in range(1, MAX_ID + 1) if raw not in UNUSED_IDS]
    return lookup_table({0: 0, **{raw: index + 1 for index, raw in enumerate(used)}}, MAX_ID + 1)


def to_train_ids(data: bytes, where: str) -> np.ndarray:
    """An ``annotations/<name>.mat`` file's bytes -> its ``[H, W]`` map of 0..171."""
    lut, valid = class_table()
    return apply_lut(mat_array(data, "S", where), lut, valid, where, "COCO-Stuff ids (0..182, 11 unused)")


def _files(src: Path) -> Files:
    """The download's files: the folder it extracts to, or the zip itself (its members under the
    folder that holds ``imageLists/train.txt``, whatever the zip calls it)."""
    if not src.is_file():
        return Files.folder(src)
    if not zipfile.is_zipfile(src):
        raise SegcliError("not a zip archive", str(src), f"expected {LAYOUT}")
    with zipfile.ZipFile(src) as archive:
        lists = [name for name in archive.namelist() if name.endswith("imageLists/train.txt")]
    if not lists:
        raise SegcliError("no imageLists/train.txt in this archive", str(src), f"expected {LAYOUT}")
    return Files.archive(src, lists[0][: -len("imageLists/train.txt")], LAYOUT)


def plan_coco_stuff10k(src: Path) -> Plan:
    require_scipy_loadmat()  # before anything is written
    tree = _files(src)
    steps: list[Step] = []
    samples: dict[str, int] = {}
    for list_name, folder in SPLITS.items():
        list_file = f"imageLists/{list_name}.txt"
        if not tree.has(list_file):
            raise SegcliError("split list not found", tree.where(list_file), f"expected {LAYOUT}")
        names = [line.strip() for line in tree.read_text(list_file).splitlines() if line.strip()]
        if not names:
            raise SegcliError("split list is empty", tree.where(list_file), "re-extract it from the download")
        for kind, suffix in (("image", ".jpg"), ("annotation", ".mat")):
            top = "images" if kind == "image" else "annotations"
            missing = [name for name in names if not tree.has(f"{top}/{name}{suffix}")]
            if missing:
                raise SegcliError(f"{kind} listed in {list_file} not found ({len(missing)} of {len(names)} missing)",
                                  tree.where(f"{top}/{missing[0]}{suffix}"), "re-extract the download completely")
        samples[folder] = len(names)
        for name in names:
            steps.append(tree.step(f"images/{folder}/{name}.jpg", f"images/{name}.jpg"))
            steps.append(tree.step(f"annotations/{folder}/{name}_labelTrainIds.png", f"annotations/{name}.mat",
                                   convert=to_train_ids))
    notes = []
    if sum(samples.values()) != OFFICIAL_SIZE:
        notes.append(f"{sum(samples.values())} images listed; the release lists {OFFICIAL_SIZE} (9000 train + 1000 test)")
    return Plan("coco_stuff10k", steps, ("coco_stuff10k",), samples, notes)
