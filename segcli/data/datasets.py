"""Segmentation datasets: one reader (:class:`SegDataset`) and one layout function per dataset.

A layout function turns ``(data_cfg, split)`` into a list of ``(image_path, mask_path)`` pairs
plus the class names, palette and label mapping; :class:`SegDataset` reads any such list. The
layouts are MMSegmentation's (the authors' code is built on it):

* ``ade20k``: ROOT/images/{training,validation}/*.jpg, ROOT/annotations/{...}/*.png;
  raw 0 ("other") -> 255, the rest -1: 150 classes.
* ``cityscapes``: ROOT/leftImg8bit/{train,val}/<city>/*_leftImg8bit.png,
  ROOT/gtFine/{train,val}/<city>/*_gtFine_labelTrainIds.png: 19 classes.
* ``pascal_context``: VOC2010 — ROOT/JPEGImages/*.jpg, ROOT/SegmentationClassContext/*.png,
  ROOT/ImageSets/SegmentationContext/{train,val}.txt: 60 classes (with background).
* ``pascal_context_59``: the same files, background 0 -> 255, the rest -1: 59 classes.
* ``coco_stuff10k``: ROOT/images/{train2014,test2014}/*.jpg,
  ROOT/annotations/{train2014,test2014}/*_labelTrainIds.png: 171 classes. MMSegmentation's
  converter writes 1..171 with 0 = unlabeled, so its configs and SegViT's use
  ``reduce_zero_label``; so do we.
* ``folder``: ROOT/images/{train,val}/*.{jpg,jpeg,png}, ROOT/masks/{train,val}/<stem>.png
  (uint8 class ids, 255 = ignore), ROOT/classes.txt (one name per line, line i = id i; not
  needed when ``data.classes`` is set), optional ROOT/palette.txt ("R G B" per class).
* ``synthetic``: generated into the folder layout (``synthetic.py``).

Which thesis experiment uses which: ADE20K everywhere (3.3, 4.3.1, 5.3.1); Cityscapes for NRD
(3.3); Pascal Context with background, 60 classes, for NRD and SegViT (3.3, 4.3.1) and without,
59 classes, for DToP (5.3.1); COCO-Stuff-10K with 171 classes for SegViT and DToP (4.3.1, 5.3.1).

The recipe's logical splits ("train", "val") name directories through ``data.train_split`` /
``data.val_split``; each dataset maps the usual names to its own (ADE20K train -> training,
val -> validation; COCO-Stuff train -> train2014, val -> test2014); any other name is used as
the directory (or list file) name itself.

Checks are split by cost: directory listing and image/mask pairing at construction (no file
is decoded), decoding problems, size mismatches and out-of-range labels in :meth:`SegDataset.read`,
which decodes each file anyway — nothing reads every file twice per epoch.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, NamedTuple

import cv2
import numpy as np
from torch.utils.data import Dataset

from ..errors import SegcliError
from ..registry import DATASETS
from . import classes as known
from .transforms import IGNORE_INDEX, EvalTransform, TrainTransform

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")


class SampleKey(NamedTuple):
    """What the training loader asks for: a sample and the entropy of its augmentation.

    ``entropy`` is (seed, iteration, slot in the global batch); the augmentation generator is
    seeded with ``(*entropy, index)``, so it depends on nothing else (not on worker processes).
    """

    index: int
    entropy: tuple[int, ...]


def reduce_zero_label_lut() -> np.ndarray:
    """Lookup table for ``reduce_zero_label``: 0 -> 255, v -> v - 1, 255 stays 255."""
    lut = np.arange(256, dtype=np.int64) - 1
    lut[0] = IGNORE_INDEX
    lut[IGNORE_INDEX] = IGNORE_INDEX
    return lut.astype(np.uint8)


def output_ids_lut(label_lut: np.ndarray | None) -> np.ndarray:
    """Lookup table class id -> the id a mask of the dataset stores for it: the inverse of the label
    mapping (``reduce_zero_label``: c -> c + 1), the identity without one. ``eval --format-only``
    writes predictions in these ids, which is what a benchmark server reads (MMSegmentation's
    ``ADE20KDataset.format_results`` writes ``label + 1`` for the same reason)."""
    inverse = np.arange(256, dtype=np.int64)
    if label_lut is not None:
        for raw in range(255, -1, -1):  # the smallest raw id of a class wins
            if label_lut[raw] != IGNORE_INDEX:
                inverse[label_lut[raw]] = raw
    return inverse.astype(np.uint8)


def read_image(path: str) -> np.ndarray:
    """An RGB uint8 ``[H, W, 3]`` image; unreadable files are the user's problem."""
    image = cv2.imread(path, cv2.IMREAD_COLOR)
    if image is None:
        raise SegcliError("cannot read image (missing, corrupt or not an image)", path,
                          "replace or remove the file (and its mask)")
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


def read_mask(path: str) -> np.ndarray:
    """A uint8 ``[H, W]`` map of class ids.

    Palette ("P" mode) PNGs store class ids as palette indices; OpenCV expands them to colours,
    so those are read with Pillow instead.
    """
    mask = cv2.imread(path, cv2.IMREAD_UNCHANGED)
    if mask is None:
        raise SegcliError("cannot read mask (missing, corrupt or not an image)", path,
                          "replace or remove the file (and its image)")
    if mask.ndim == 3:
        from PIL import Image

        with Image.open(path) as pil:
            if pil.mode != "P":
                raise SegcliError(f"mask has {mask.shape[2]} channels; masks must hold one class id "
                                  "per pixel", path, "save single-channel (grayscale or palette) "
                                  "PNGs of class ids, not colour renderings")
            mask = np.asarray(pil)
    if mask.dtype != np.uint8:
        raise SegcliError(f"mask is {mask.dtype}; expected 8-bit class ids", path,
                          "save masks as 8-bit PNGs (ids 0..254, 255 = ignore)")
    return mask


class SegDataset(Dataset):
    """Pairs of (image, mask) files with class names, palette and a label mapping.

    ``read(i)`` gives the RGB uint8 image and the mapped uint8 label; ``dataset[i]`` (or
    ``dataset[SampleKey(i, entropy)]``) applies the transform and returns
    ``dict(image=[3, H, W] float32, label=[H, W] int64, index=i)``. A plain integer index seeds
    the augmentation with the index alone (the same every time); the training loader passes
    :class:`SampleKey` for per-iteration randomness. Everything is picklable (DataLoader workers).
    """

    ignore_index = IGNORE_INDEX

    def __init__(self, samples: list[tuple[str, str | None]], classes: tuple[str, ...],
                 palette: np.ndarray | None = None, label_lut: np.ndarray | None = None,
                 transform: Callable | None = None, name: str = "dataset", output_lut: np.ndarray | None = None):
        if not classes:
            raise ValueError("a dataset needs at least one class")
        self.samples = [(str(image), None if mask is None else str(mask)) for image, mask in samples]
        self.classes = tuple(classes)
        palette = known.label_colormap(len(classes) + 1)[1:] if palette is None else palette
        self.palette = np.asarray(palette, dtype=np.uint8).reshape(-1, 3)  # [K, 3] RGB
        if len(self.palette) < self.num_classes:
            raise ValueError(f"palette has {len(self.palette)} colours for {self.num_classes} classes")
        self.label_lut = None if label_lut is None else np.asarray(label_lut, dtype=np.uint8)
        self.transform = transform
        self.name = name
        self.output_lut = output_lut if output_lut is not None else output_ids_lut(self.label_lut)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def labelled(self) -> bool:
        """Whether every sample has a mask (a split read with ``labelled=False`` has none)."""
        return all(mask is not None for _, mask in self.samples)

    def __len__(self) -> int:
        return len(self.samples)

    def __repr__(self) -> str:
        return f"SegDataset({self.name!r}, {len(self)} samples, {self.num_classes} classes)"

    def set_transform(self, transform: Callable | None) -> None:
        """``transform(image, label, rng) -> (image tensor, label tensor)``; see ``transforms.py``."""
        self.transform = transform

    def read(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """Decode sample ``index``: image ``[H, W, 3]`` RGB uint8, label ``[H, W]`` uint8 (mapped).

        Checks, on the data it reads anyway: both files decode, sizes agree, and every label
        value after the mapping is a class id (< num_classes) or 255. A sample without a mask (a split
        read with ``labelled=False``) gives ``None`` for the label.
        """
        image_path, mask_path = self.samples[index]
        image = read_image(image_path)
        if mask_path is None:
            return image, None
        label = self._checked_label(read_mask(mask_path), image.shape[:2], image_path, mask_path)
        return image, label

    def check_mask(self, index: int) -> None:
        """The checks of :meth:`read` without decoding the image (its size comes from the file's
        header): cheap enough to run over a whole validation split before training starts."""
        from PIL import Image

        image_path, mask_path = self.samples[index]
        if mask_path is None:
            return
        label = read_mask(mask_path)
        try:
            with Image.open(image_path) as pil:
                size = (pil.size[1], pil.size[0])
        except (OSError, ValueError):
            size = None
        if size != label.shape:  # unreadable header, or EXIF-rotated: decode as read() does
            size = read_image(image_path).shape[:2]
        self._checked_label(label, size, image_path, mask_path)

    def _checked_label(self, label: np.ndarray, image_size: tuple[int, int], image_path: str,
                       mask_path: str) -> np.ndarray:
        """The mapped label, checked: the mask's size is the image's, every value a class id or 255."""
        if tuple(image_size) != label.shape:
            raise SegcliError(f"mask is {label.shape[0]}x{label.shape[1]} but its image {image_path} is "
                              f"{image_size[0]}x{image_size[1]}", mask_path,
                              "masks must have exactly the size of their images")
        if self.label_lut is not None:
            label = self.label_lut[label]
        bad = (label >= self.num_classes) & (label != IGNORE_INDEX)
        if bad.any():
            values = np.unique(label[bad])
            shown = ", ".join(str(v) for v in values[:10]) + (", ..." if len(values) > 10 else "")
            mapped = " after the label mapping" if self.label_lut is not None else ""
            raise SegcliError(f"label values {shown}{mapped} are outside [0, {self.num_classes}) and "
                              f"not 255 (K = {self.num_classes} classes)", mask_path,
                              "check the class list (data.classes / classes.txt), data.reduce_zero_label, "
                              "and that masks hold class ids rather than colours")
        return label

    def __getitem__(self, item: int | SampleKey) -> dict:
        if isinstance(item, SampleKey):
            index, entropy = int(item.index), tuple(item.entropy)
        else:
            index, entropy = int(item), ()
        if self.transform is None:
            raise RuntimeError(f"{self!r} has no transform; call set_transform() first")
        image, label = self.read(index)
        rng = np.random.default_rng([*entropy, index])
        image_tensor, label_tensor = self.transform(image, label, rng)
        return {"image": image_tensor, "label": label_tensor, "index": index}

    def folders(self) -> set[Path]:
        """The folders its images and masks lie in: where no command may write (``segcli/outputs.py``)."""
        return {Path(path).parent for sample in self.samples for path in sample if path is not None}

    def subset(self, indices) -> "SegDataset":
        """A dataset of the given samples with the same classes, mapping and transform."""
        return SegDataset([self.samples[i] for i in indices], self.classes, self.palette,
                          self.label_lut, self.transform, self.name, self.output_lut)


# --------------------------------------------------------------------------- pairing files


def _list_files(folder: Path, suffixes: tuple[str, ...], recursive: bool) -> dict[str, Path]:
    """``{key: path}`` for files ending in one of ``suffixes``; key = relative path minus suffix."""
    found: dict[str, Path] = {}
    paths = folder.rglob("*") if recursive else folder.iterdir()
    for path in paths:
        name = path.name.lower()
        suffix = next((s for s in suffixes if name.endswith(s.lower())), None)
        if suffix is None or not path.is_file():
            continue
        key = str(path.relative_to(folder))[: -len(suffix)]
        if key in found:
            raise SegcliError(f"two files share the name '{key}': {found[key].name} and {path.name}",
                              str(path), "keep one file per sample")
        found[key] = path
    return found


def _require_dir(path: Path, what: str, layout: str) -> None:
    if not path.is_dir():
        raise SegcliError(f"{what} folder not found", str(path), f"expected layout: {layout}")


def pair_by_name(image_dir: Path, mask_dir: Path, image_suffixes: tuple[str, ...], mask_suffix: str,
                 layout: str, recursive: bool = False, labelled: bool = True) -> list[tuple[str, str | None]]:
    """Match images and masks by relative path with their suffixes removed (sorted by name).

    Every image needs a mask and every mask an image; the error names one offender and says how
    many there are. No file is opened here. ``labelled`` False: the images alone, mask ``None``
    (a split without annotations, e.g. a benchmark's test split for ``eval --format-only``).
    """
    _require_dir(image_dir, "image", layout)
    images = _list_files(image_dir, image_suffixes, recursive)
    if not images:
        raise SegcliError(f"no images found ({', '.join('*' + s for s in image_suffixes)})",
                          str(image_dir), f"expected layout: {layout}")
    if not labelled:
        return [(str(images[key]), None) for key in sorted(images)]
    _require_dir(mask_dir, "mask", layout)
    masks = _list_files(mask_dir, (mask_suffix,), recursive)
    lonely_images = sorted(set(images) - set(masks))
    if lonely_images:
        first = lonely_images[0]
        raise SegcliError(f"image has no mask ({len(lonely_images)} of {len(images)} images lack one)",
                          str(images[first]), f"expected {mask_dir / (first + mask_suffix)}")
    lonely_masks = sorted(set(masks) - set(images))
    if lonely_masks:
        first = lonely_masks[0]
        raise SegcliError(f"mask has no image ({len(lonely_masks)} of {len(masks)} masks lack one)",
                          str(masks[first]), f"add its image to {image_dir} or remove the mask")
    return [(str(images[key]), str(masks[key])) for key in sorted(images)]


def pair_by_list(list_file: Path, image_dir: Path, mask_dir: Path, image_suffix: str,
                 mask_suffix: str, layout: str, labelled: bool = True) -> list[tuple[str, str | None]]:
    """Samples named one per line in ``list_file`` (VOC's ImageSets); both files must exist
    (the image alone, mask ``None``, when not ``labelled``)."""
    if not list_file.is_file():
        raise SegcliError("split list not found", str(list_file), f"expected layout: {layout}")
    names = [line.strip() for line in list_file.read_text().splitlines() if line.strip()]
    if not names:
        raise SegcliError("split list is empty", str(list_file), "list one image name per line")
    _require_dir(image_dir, "image", layout)
    checked = [(image_dir, image_suffix, "image")]
    if labelled:
        _require_dir(mask_dir, "mask", layout)
        checked.append((mask_dir, mask_suffix, "mask"))
    for folder, suffix, what in checked:
        present = {entry.name for entry in os.scandir(folder)}
        missing = [name for name in names if name + suffix not in present]
        if missing:
            raise SegcliError(f"{what} listed in {list_file.name} not found ({len(missing)} of "
                              f"{len(names)} missing)", str(folder / (missing[0] + suffix)),
                              f"restore the file or remove '{missing[0]}' from {list_file}")
    return [(str(image_dir / (n + image_suffix)), str(mask_dir / (n + mask_suffix)) if labelled else None)
            for n in names]


# --------------------------------------------------------------------------- recipe helpers


def dataset_root(data_cfg, example: str) -> Path:
    """``data.root`` as a path that exists."""
    if data_cfg.root is None:
        raise SegcliError("data.root is not set", "data.root", f"point it at the dataset, e.g. {example}")
    root = Path(data_cfg.root).expanduser()
    if not root.is_dir():
        raise SegcliError("dataset root not found", str(root), f"set data.root to the dataset folder, e.g. {example}")
    return root


def split_name(data_cfg, split: str, directories: dict[str, str] | None = None) -> str:
    """The directory (or list) name of logical split "train"/"val" for this dataset."""
    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', got {split!r}")
    name = data_cfg.train_split if split == "train" else data_cfg.val_split
    return (directories or {}).get(name, name)


def make_dataset(data_cfg, split: str, samples, default_classes: tuple[str, ...], default_palette,
                 default_reduce_zero_label: bool, name: str, output_lut: np.ndarray | None = None) -> SegDataset:
    """Apply the recipe's overrides (classes, reduce_zero_label) and attach the split's transform.

    The train split gets ``TrainTransform(data_cfg)``, the val split ``EvalTransform`` at the
    original size; callers replace it with :meth:`SegDataset.set_transform` (e.g. a test scale).
    ``output_lut``: the ids a benchmark server expects, where they are not the masks' own
    (Cityscapes: label ids, not train ids); default :func:`output_ids_lut`.
    """
    class_names = tuple(data_cfg.classes) if data_cfg.classes else tuple(default_classes)
    if len(set(class_names)) != len(class_names):
        raise SegcliError("class names must be unique", "data.classes")
    palette = known.palette_for(class_names, default_classes, default_palette)
    reduce = default_reduce_zero_label if data_cfg.reduce_zero_label is None else data_cfg.reduce_zero_label
    transform = TrainTransform(data_cfg) if split == "train" else EvalTransform()  # uint8: the engine normalises
    return SegDataset(samples, class_names, palette, reduce_zero_label_lut() if reduce else None,
                      transform, name=f"{name}:{split}", output_lut=output_lut)


# --------------------------------------------------------------------------- registered layouts


@DATASETS.register("ade20k", classes=known.ADE20K_CLASSES)
def build_ade20k(data_cfg, split: str, labelled: bool = True) -> SegDataset:
    """ADE20K (SceneParse150, ``ADEChallengeData2016``): 150 classes, raw 0 ignored."""
    root = dataset_root(data_cfg, "data/ade/ADEChallengeData2016")
    layout = "ROOT/images/{training,validation}/*.jpg + ROOT/annotations/{training,validation}/*.png"
    directory = split_name(data_cfg, split, {"train": "training", "val": "validation"})
    samples = pair_by_name(root / "images" / directory, root / "annotations" / directory, (".jpg",), ".png", layout,
                           labelled=labelled)
    return make_dataset(data_cfg, split, samples, known.ADE20K_CLASSES, known.ADE20K_PALETTE, True, "ade20k")


@DATASETS.register("cityscapes", classes=known.CITYSCAPES_CLASSES)
def build_cityscapes(data_cfg, split: str, labelled: bool = True) -> SegDataset:
    """Cityscapes fine annotations as the 19 train ids (``*_gtFine_labelTrainIds.png``)."""
    root = dataset_root(data_cfg, "data/cityscapes")
    layout = ("ROOT/leftImg8bit/{train,val}/<city>/*_leftImg8bit.png + "
              "ROOT/gtFine/{train,val}/<city>/*_gtFine_labelTrainIds.png")
    directory = split_name(data_cfg, split)
    mask_dir = root / "gtFine" / directory
    suffix = "_gtFine_labelTrainIds.png"
    if labelled and mask_dir.is_dir() and not any(mask_dir.rglob("*" + suffix)) and any(mask_dir.rglob("*_gtFine_labelIds.png")):
        raise SegcliError(f"no *{suffix} files (only *_gtFine_labelIds.png)", str(mask_dir),
                          "write them with: segcli data prepare cityscapes SRC --out ROOT (SRC: the folder "
                          "with the two zips as downloaded, or extracted; ROOT: the new data.root)")
    samples = pair_by_name(root / "leftImg8bit" / directory, mask_dir, ("_leftImg8bit.png",), suffix,
                           layout, recursive=True, labelled=labelled)
    label_ids = np.arange(256, dtype=np.uint8)
    label_ids[:len(known.CITYSCAPES_LABEL_IDS)] = known.CITYSCAPES_LABEL_IDS
    return make_dataset(data_cfg, split, samples, known.CITYSCAPES_CLASSES, known.CITYSCAPES_PALETTE, False,
                        "cityscapes", output_lut=label_ids)  # the benchmark reads label ids, not train ids


def _pascal_context_samples(data_cfg, split: str, labelled: bool = True) -> list[tuple[str, str | None]]:
    root = dataset_root(data_cfg, "data/VOCdevkit/VOC2010")
    layout = ("VOC2010: ROOT/JPEGImages/*.jpg, ROOT/SegmentationClassContext/*.png, "
              "ROOT/ImageSets/SegmentationContext/{train,val}.txt")
    list_file = root / "ImageSets" / "SegmentationContext" / f"{split_name(data_cfg, split)}.txt"
    return pair_by_list(list_file, root / "JPEGImages", root / "SegmentationClassContext", ".jpg", ".png", layout,
                        labelled=labelled)


@DATASETS.register("pascal_context", classes=known.PASCAL_CONTEXT_60_CLASSES)
def build_pascal_context(data_cfg, split: str, labelled: bool = True) -> SegDataset:
    """Pascal Context with background: 60 classes."""
    return make_dataset(data_cfg, split, _pascal_context_samples(data_cfg, split, labelled), known.PASCAL_CONTEXT_60_CLASSES,
                        known.PASCAL_CONTEXT_60_PALETTE, False, "pascal_context")


@DATASETS.register("pascal_context_59", classes=known.PASCAL_CONTEXT_59_CLASSES)
def build_pascal_context_59(data_cfg, split: str, labelled: bool = True) -> SegDataset:
    """Pascal Context without background (0 -> 255, the rest -1): 59 classes."""
    return make_dataset(data_cfg, split, _pascal_context_samples(data_cfg, split, labelled), known.PASCAL_CONTEXT_59_CLASSES,
                        known.PASCAL_CONTEXT_59_PALETTE, True, "pascal_context_59")


@DATASETS.register("coco_stuff10k", classes=known.COCO_STUFF_CLASSES)
def build_coco_stuff10k(data_cfg, split: str, labelled: bool = True) -> SegDataset:
    """COCO-Stuff-10K as MMSegmentation's converter writes it: 171 classes, raw 0 ignored."""
    root = dataset_root(data_cfg, "data/coco_stuff10k")
    layout = "ROOT/images/{train2014,test2014}/*.jpg + ROOT/annotations/{train2014,test2014}/*_labelTrainIds.png"
    directory = split_name(data_cfg, split, {"train": "train2014", "val": "test2014"})
    samples = pair_by_name(root / "images" / directory, root / "annotations" / directory, (".jpg",),
                           "_labelTrainIds.png", layout, labelled=labelled)
    return make_dataset(data_cfg, split, samples, known.COCO_STUFF_CLASSES, known.COCO_STUFF_PALETTE, True,
                        "coco_stuff10k")


def read_class_file(path: Path) -> tuple[str, ...]:
    """``classes.txt``: one class name per line (blank lines skipped), at least one, no duplicates."""
    if not path.is_file():
        raise SegcliError("classes.txt not found", str(path),
                          "write one class name per line (line i = class id i), or set data.classes")
    names = tuple(line.strip() for line in path.read_text().splitlines() if line.strip())
    if not names:
        raise SegcliError("classes.txt is empty", str(path), "write one class name per line (line i = class id i)")
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise SegcliError(f"duplicate class names: {', '.join(duplicates)}", str(path), "class names must be unique")
    return names


def read_palette_file(path: Path, num_classes: int) -> np.ndarray:
    """``palette.txt``: one "R G B" line (0..255, spaces or commas) per class -> ``[K, 3]`` uint8."""
    rows = [line.replace(",", " ").split() for line in path.read_text().splitlines() if line.strip()]
    try:
        palette = np.array([[int(value) for value in row] for row in rows], dtype=np.int64)
    except ValueError:
        palette = np.zeros((0, 0), dtype=np.int64)
    if palette.ndim != 2 or palette.shape[1:] != (3,) or len(palette) < num_classes or not (
            (palette >= 0) & (palette <= 255)).all():
        raise SegcliError(f"palette.txt needs {num_classes} lines of 'R G B' (0..255)", str(path),
                          "fix the file or delete it to use generated colours")
    return palette[:num_classes].astype(np.uint8)


@DATASETS.register("folder", classes=lambda data_cfg: folder_classes(data_cfg))
def build_folder(data_cfg, split: str, labelled: bool = True) -> SegDataset:
    """Any dataset in the simple folder layout (see the module docstring); classes from classes.txt."""
    root = dataset_root(data_cfg, "data/my_dataset")
    layout = "ROOT/images/{train,val}/*.{jpg,jpeg,png} + ROOT/masks/{train,val}/<same stem>.png + ROOT/classes.txt"
    return build_folder_at(root, data_cfg, split, layout, name="folder", labelled=labelled)


def folder_classes(data_cfg) -> tuple[str, ...]:
    """The class names of a folder-layout dataset: ``data.classes`` or ``ROOT/classes.txt``."""
    if data_cfg.classes:
        return tuple(data_cfg.classes)
    return read_class_file(dataset_root(data_cfg, "data/my_dataset") / "classes.txt")


def build_folder_at(root: Path, data_cfg, split: str, layout: str, name: str, labelled: bool = True) -> SegDataset:
    """The folder layout under ``root`` (shared by ``folder`` and ``synthetic``)."""
    directory = split_name(data_cfg, split)
    samples = pair_by_name(root / "images" / directory, root / "masks" / directory, IMAGE_SUFFIXES, ".png", layout,
                           labelled=labelled)
    file_classes = None if data_cfg.classes else read_class_file(root / "classes.txt")
    class_names = tuple(data_cfg.classes) if data_cfg.classes else file_classes
    palette_path = root / "palette.txt"
    palette = read_palette_file(palette_path, len(class_names)) if palette_path.is_file() else (
        known.label_colormap(len(class_names) + 1)[1:])
    return make_dataset(data_cfg, split, samples, class_names, palette, False, name)
