"""ADE20K (SceneParse150): the extracted ``ADEChallengeData2016.zip`` is already the reader's layout.

Nothing is written: the check lists, split by split, what is missing for the reader
(``images/{training,validation}/*.jpg`` each with ``annotations/<same>/<stem>.png``), every
problem at once, so ``data.root`` can point at SRC itself.
"""
from __future__ import annotations

from pathlib import Path

from .common import Plan

SPLITS = {"training": 20210, "validation": 2000}  # folder -> images in the release


def _names(folder: Path, suffix: str) -> set[str]:
    return {path.name[: -len(suffix)] for path in folder.iterdir() if path.name.lower().endswith(suffix)}


def _some(names: list[str], suffix: str) -> str:
    shown = ", ".join(name + suffix for name in names[:3])
    return shown + (f" and {len(names) - 3} more" if len(names) > 3 else "")


def check_ade20k(src: Path) -> Plan:
    if not (src / "images").is_dir() and (src / "ADEChallengeData2016").is_dir():
        src = src / "ADEChallengeData2016"
    problems: list[tuple[str, str]] = []
    notes: list[str] = []
    samples: dict[str, int] = {}
    for split, expected in SPLITS.items():
        image_dir, mask_dir = src / "images" / split, src / "annotations" / split
        missing = [folder for folder in (image_dir, mask_dir) if not folder.is_dir()]
        for folder in missing:
            problems.append((str(folder), "folder missing (extract ADEChallengeData2016.zip completely)"))
        if missing:
            samples[split] = 0
            continue
        images, masks = _names(image_dir, ".jpg"), _names(mask_dir, ".png")
        samples[split] = len(images)
        if not images:
            problems.append((str(image_dir), "no *.jpg images"))
        unpaired_images = sorted(images - masks)
        if unpaired_images:
            problems.append((str(mask_dir), f"{len(unpaired_images)} of {len(images)} images have no annotation: "
                             f"missing {_some(unpaired_images, '.png')}"))
        unpaired_masks = sorted(masks - images)
        if unpaired_masks:
            problems.append((str(image_dir), f"{len(unpaired_masks)} of {len(masks)} annotations have no image: "
                             f"missing {_some(unpaired_masks, '.jpg')}"))
        if images and len(images) != expected:
            notes.append(f"{split}: {len(images)} images; the release has {expected}")
    return Plan("ade20k", [], ("ade20k",), samples, notes, problems, ready_root=src)
