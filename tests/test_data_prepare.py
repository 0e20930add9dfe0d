"""``segcli data prepare``: raw downloads generated in their real formats -> the reader's layout.

The expected label maps are computed here from the published tables, independently of segcli's
code: cityscapesScripts' ``helpers/labels.py`` (id -> trainId), the official COCO-Stuff-10K
converter's ``clsID_to_trID`` (zbwxp/SegVit ``tools/convert_datasets/coco_stuff10k.py``) and
MMSegmentation's Pascal Context ``_mapping`` (``tools/convert_datasets/pascal_context.py``, with
``np.digitize`` as it uses it). Every prepared root then passes the data check.
"""
from __future__ import annotations

import hashlib
import json
import shutil
import sys
import zipfile
from pathlib import Path

import cv2
import numpy as np
import pytest

from conftest import REPO

from segcli import api
from segcli.errors import SegcliError
from segcli.workflows.data_prepare import MARKER

scipy_io = pytest.importorskip("scipy.io")  # the 'datasets' extra (in 'dev', so CI has it)

# cityscapesScripts helpers/labels.py: (id, trainId) of every label (license plate, id -1, is never drawn)
CITYSCAPES_ID_TO_TRAIN = {
    0: 255, 1: 255, 2: 255, 3: 255, 4: 255, 5: 255, 6: 255, 7: 0, 8: 1, 9: 255, 10: 255, 11: 2, 12: 3, 13: 4,
    14: 255, 15: 255, 16: 255, 17: 5, 18: 255, 19: 6, 20: 7, 21: 8, 22: 9, 23: 10, 24: 11, 25: 12, 26: 13,
    27: 14, 28: 15, 29: 255, 30: 255, 31: 16, 32: 17, 33: 18,
}
# the official converter's clsID_to_trID, keys in order (values 0..171)
COCO_KEYS = [*range(0, 12), *range(13, 26), 27, 28, *range(31, 45), *range(46, 66), 67, 70, *range(72, 83),
             *range(84, 91), *range(92, 183)]
COCO_CLS_TO_TR = dict(zip(COCO_KEYS, range(172)))
# MMSegmentation's converter, as written there (unsorted), sorted as it sorts it
PASCAL_MAPPING = np.sort(np.array([
    0, 2, 259, 260, 415, 324, 9, 258, 144, 18, 19, 22, 23, 397, 25, 284, 158, 159, 416, 33, 162, 420, 454, 295,
    296, 427, 44, 45, 46, 308, 59, 440, 445, 31, 232, 65, 354, 424, 68, 326, 72, 458, 34, 207, 80, 355, 85, 347,
    220, 349, 360, 98, 187, 104, 105, 366, 189, 368, 113, 115]))


def _tree(folder: Path) -> dict[str, tuple[str, int]]:
    """Every file's content hash and modification time: what 'untouched' means."""
    return {str(p.relative_to(folder)): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _image(path: Path, rng, size=(12, 20)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(path), rng.integers(0, 256, (*size, 3), dtype=np.uint8))


def _read(path: Path) -> np.ndarray:
    return cv2.imread(str(path), cv2.IMREAD_UNCHANGED)


def _check(recipe: str, root: Path, **extra) -> None:
    overrides = [f"data.root={root}", *(f"{k}={v}" for k, v in extra.items())]
    report = api.check_data(REPO / "recipes" / recipe, overrides)
    assert report.ok, report.problems
    assert all(n > 0 for n in report.images.values())


# --------------------------------------------------------------------------- Cityscapes

CITYSCAPES_FILES = {"train": ["aachen/aachen_000000_000019", "aachen/aachen_000001_000019", "bochum/bochum_000000_000313"],
                    "val": ["frankfurt/frankfurt_000000_000294", "lindau/lindau_000000_000019"]}


CITYSCAPES_TEST = ["berlin/berlin_000000_000019", "bielefeld/bielefeld_000000_000321"]


def _cityscapes_src(root: Path, test: bool = False) -> dict[str, np.ndarray]:
    """The two downloads extracted into ``root``; ``test``: with the test split as released (its
    gtFine/test labelIds all 0, 'unlabeled')."""
    rng = np.random.default_rng(0)
    ids = {}
    if test:
        for stem in CITYSCAPES_TEST:
            _image(root / "leftImg8bit" / "test" / f"{stem}_leftImg8bit.png", rng)
            path = root / "gtFine" / "test" / f"{stem}_gtFine_labelIds.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            cv2.imwrite(str(path), np.zeros((12, 20), np.uint8))
    for split, stems in CITYSCAPES_FILES.items():
        for stem in stems:
            _image(root / "leftImg8bit" / split / f"{stem}_leftImg8bit.png", rng)
            label = rng.integers(0, 34, (12, 20), dtype=np.uint8)  # every real id 0..33
            label[0, :20] = np.arange(14, 34)
            label[1, :14] = np.arange(0, 14)
            path = root / "gtFine" / split / f"{stem}_gtFine_labelIds.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            cv2.imwrite(str(path), label)
            cv2.imwrite(str(path).replace("_labelIds", "_color"), np.zeros((12, 20, 3), np.uint8))  # also in the zip
            ids[f"{split}/{stem}"] = label
    return ids


def test_cityscapes_writes_train_ids_from_the_label_table(tmp_path):
    src = tmp_path / "src"
    ids = _cityscapes_src(src)
    before = _tree(src)
    result = api.prepare_data("cityscapes", src, tmp_path / "root")
    assert result.samples == {"train": 3, "val": 2} and result.written == 10 and result.skipped == 0
    for key, label in ids.items():
        split, stem = key.split("/", 1)
        written = _read(tmp_path / "root" / "gtFine" / split / f"{stem}_gtFine_labelTrainIds.png")
        expected = np.vectorize(CITYSCAPES_ID_TO_TRAIN.get)(label)
        np.testing.assert_array_equal(written, expected)
        image = tmp_path / "root" / "leftImg8bit" / split / f"{stem}_leftImg8bit.png"
        assert image.read_bytes() == (src / "leftImg8bit" / split / f"{stem}_leftImg8bit.png").read_bytes()
    assert _tree(src) == before  # nothing in SRC written, not even touched
    _check("nrd_r50_cityscapes.yaml", tmp_path / "root")


def test_an_unknown_cityscapes_id_is_refused_naming_the_file(tmp_path):
    src = tmp_path / "src"
    _cityscapes_src(src)
    bad = src / "gtFine" / "val" / "lindau" / "lindau_000000_000019_gtFine_labelIds.png"
    cv2.imwrite(str(bad), np.full((12, 20), 34, np.uint8))
    with pytest.raises(SegcliError, match="34 are not Cityscapes label ids") as err:
        api.prepare_data("cityscapes", src, tmp_path / "root")
    assert err.value.where == str(bad.resolve())


def _cityscapes_zip(extracted: Path, part: str, dest: Path, skip: str | None = None,
                    compression=zipfile.ZIP_DEFLATED) -> Path:
    """``dest/<part>_trainvaltest.zip`` as cityscapes-dataset.com serves it: folder entries, members
    ``<part>/<split>/<city>/...``, and license.txt + README at the top; without member ``skip``."""
    archive = dest / f"{part}_trainvaltest.zip"
    dest.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(archive, "w", compression) as out:
        out.writestr("license.txt", "The Cityscapes Dataset license\n")
        out.writestr("README", "The Cityscapes Dataset\n")
        for path in sorted((extracted / part).rglob("*")):
            member = path.relative_to(extracted).as_posix()
            if member != skip:
                out.write(path, member)  # a folder gives its 'part/split/' entry
    return archive


@pytest.mark.parametrize("zipped", [("leftImg8bit", "gtFine"), ("gtFine",), ("leftImg8bit",)])
def test_cityscapes_from_the_zips_as_downloaded_matches_the_extracted_folders(tmp_path, zipped):
    extracted = tmp_path / "extracted"
    ids = _cityscapes_src(extracted, test=True)
    src = tmp_path / "src"  # the zips named in `zipped`, the other part extracted
    for part in ("leftImg8bit", "gtFine"):
        if part in zipped:
            _cityscapes_zip(extracted, part, src)
        else:
            shutil.copytree(extracted / part, src / part)
    before = _tree(src)
    from_folders = api.prepare_data("cityscapes", extracted, tmp_path / "from_folders")
    result = api.prepare_data("cityscapes", src, tmp_path / "root")
    assert result.samples == {"train": 3, "val": 2, "test": 2} == from_folders.samples
    assert result.written == 12 and result.skipped == 0
    written = {k: v[0] for k, v in _tree(tmp_path / "root").items() if k != MARKER}
    assert written == {k: v[0] for k, v in _tree(tmp_path / "from_folders").items() if k != MARKER}  # byte for byte
    for key, label in ids.items():
        split, stem = key.split("/", 1)
        np.testing.assert_array_equal(_read(tmp_path / "root" / "gtFine" / split / f"{stem}_gtFine_labelTrainIds.png"),
                                      np.vectorize(CITYSCAPES_ID_TO_TRAIN.get)(label))
    assert _tree(src) == before  # the zips (and a folder beside them) untouched: same hashes and mtimes
    _check("nrd_r50_cityscapes.yaml", tmp_path / "root")


def test_the_prepared_test_split_is_read_without_labels_for_format_only(tmp_path):
    from segcli.data import build_dataset
    from segcli.recipe import load_recipe

    extracted = tmp_path / "extracted"
    _cityscapes_src(extracted, test=True)
    for part in ("leftImg8bit", "gtFine"):
        _cityscapes_zip(extracted, part, tmp_path / "src")
    result = api.prepare_data("cityscapes", tmp_path / "src", tmp_path / "root")
    assert any("--split test" in note for note in result.notes)
    root = tmp_path / "root"
    assert not (root / "gtFine" / "test").exists()  # its labels are not public: nothing to write
    recipe = load_recipe(REPO / "recipes" / "nrd_r50_cityscapes.yaml", [f"data.root={root}", "data.val_split=test"])
    test_set = build_dataset(recipe.data, "val", labelled=False)  # what eval --format-only --split test reads
    assert [Path(image).relative_to(root).as_posix() for image, _ in test_set.samples] == [
        f"leftImg8bit/test/{stem}_leftImg8bit.png" for stem in CITYSCAPES_TEST]
    assert all(mask is None for _, mask in test_set.samples)
    image, _ = test_set.read(0)
    assert image.shape == (12, 20, 3)


def test_without_test_images_a_note_says_format_only_will_need_them(tmp_path):
    _cityscapes_src(tmp_path / "src")
    result = api.prepare_data("cityscapes", tmp_path / "src", tmp_path / "root")
    assert "test" not in result.samples and any("no test images" in note for note in result.notes)


def test_a_folder_extracted_beside_its_zip_is_read_and_said(tmp_path):
    src = tmp_path / "src"
    _cityscapes_src(src)
    (src / "gtFine" / "train" / "aachen" / "aachen_000000_000019_gtFine_labelIds.png").unlink()  # extraction cut short
    _cityscapes_zip(src, "gtFine", src)  # the complete zip beside it is not read: the folder is
    with pytest.raises(SegcliError, match="label not found") as err:
        api.prepare_data("cityscapes", src, tmp_path / "root")
    assert err.value.where.endswith("/src/gtFine/train/aachen/aachen_000000_000019_gtFine_labelIds.png")
    shutil.rmtree(src / "gtFine")
    _cityscapes_src(src)
    result = api.prepare_data("cityscapes", src, tmp_path / "root")
    assert "read gtFine/, not gtFine_trainvaltest.zip beside it" in result.notes


def test_a_label_missing_from_the_zip_is_named_before_anything_is_written(tmp_path):
    extracted = tmp_path / "extracted"
    _cityscapes_src(extracted)
    missing = "gtFine/val/lindau/lindau_000000_000019_gtFine_labelIds.png"
    _cityscapes_zip(extracted, "leftImg8bit", tmp_path / "src")
    archive = _cityscapes_zip(extracted, "gtFine", tmp_path / "src", skip=missing)
    with pytest.raises(SegcliError, match=r"label not found \(1 of 2 val images lack one\)") as err:
        api.prepare_data("cityscapes", tmp_path / "src", tmp_path / "root")
    assert err.value.where == f"{archive.resolve()}:{missing}"
    assert "lindau_000000_000019_leftImg8bit.png needs it" in err.value.hint
    assert "\n" not in str(err.value) and not (tmp_path / "root").exists()


def test_an_image_missing_from_the_folder_is_named_with_its_label(tmp_path):
    src = tmp_path / "src"
    _cityscapes_src(src)
    (src / "leftImg8bit" / "train" / "bochum" / "bochum_000000_000313_leftImg8bit.png").unlink()
    with pytest.raises(SegcliError, match="image not found") as err:
        api.prepare_data("cityscapes", src, tmp_path / "root")
    assert err.value.where.endswith("leftImg8bit/train/bochum/bochum_000000_000313_leftImg8bit.png")
    assert "leftImg8bit_trainvaltest.zip" in err.value.hint


def test_a_damaged_zip_is_one_error_and_a_good_one_resumes(tmp_path):
    extracted = tmp_path / "extracted"
    _cityscapes_src(extracted)
    src = tmp_path / "src"
    _cityscapes_zip(extracted, "leftImg8bit", src)
    archive = _cityscapes_zip(extracted, "gtFine", src, compression=zipfile.ZIP_STORED)
    member = "gtFine/val/lindau/lindau_000000_000019_gtFine_labelIds.png"
    data = archive.read_bytes()
    at = data.index((extracted / member).read_bytes()) + 40  # stored: the PNG's bytes lie in the zip as they are
    archive.write_bytes(data[:at] + bytes([data[at] ^ 0xFF]) + data[at + 1:])  # its CRC no longer matches
    with pytest.raises(SegcliError, match="damaged archive member") as err:
        api.prepare_data("cityscapes", src, tmp_path / "root")
    assert err.value.where == f"{archive.resolve()}:{member}"
    assert not list((tmp_path / "root").rglob("*.part"))
    _cityscapes_zip(extracted, "gtFine", src)  # downloaded again
    resumed = api.prepare_data("cityscapes", src, tmp_path / "root")
    assert resumed.skipped > 0 and resumed.skipped + resumed.written == 10
    archive.write_bytes(archive.read_bytes()[:200])  # an interrupted download
    with pytest.raises(SegcliError, match="cannot read this zip archive") as err:
        api.prepare_data("cityscapes", src, tmp_path / "again")
    assert err.value.where == str(archive.resolve())


# --------------------------------------------------------------------------- COCO-Stuff-10K


def _coco_src(root: Path) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(1)
    names = {"train": ["COCO_train2014_000000000077", "COCO_train2014_000000000078"],
             "test": ["COCO_train2014_000000000081"]}
    ids = {}
    for split, stems in names.items():
        (root / "imageLists").mkdir(parents=True, exist_ok=True)
        (root / "imageLists" / f"{split}.txt").write_text("".join(s + "\n" for s in stems))
        for stem in stems:
            _image(root / "images" / f"{stem}.jpg", rng)
            label = rng.choice(COCO_KEYS, size=(12, 20)).astype(np.uint16)  # 0 (unlabeled) .. 182
            label.ravel()[: len(COCO_KEYS)] = COCO_KEYS  # every id the table knows
            (root / "annotations").mkdir(exist_ok=True)
            scipy_io.savemat(root / "annotations" / f"{stem}.mat", {"S": label, "names": np.array(["x"])})
            ids[stem] = label
    return ids


@pytest.mark.parametrize("as_zip", [False, True])
def test_coco_stuff_from_the_folder_or_the_zip_matches_the_official_mapping(tmp_path, as_zip):
    extracted = tmp_path / "cocostuff-10k-v1.1"
    ids = _coco_src(extracted)
    src = extracted
    if as_zip:
        src = tmp_path / "cocostuff-10k-v1.1.zip"
        with zipfile.ZipFile(src, "w") as archive:
            for path in sorted(extracted.rglob("*")):
                archive.write(path, path.relative_to(extracted).as_posix())
        shutil.rmtree(extracted)
    before = _tree(tmp_path)
    result = api.prepare_data("coco_stuff10k", src, tmp_path / "root")
    assert result.samples == {"train2014": 2, "test2014": 1} and result.written == 6
    assert any("10000" in note for note in result.notes)  # a subset of the release is said to be one
    for stem, label in ids.items():
        folder = "test2014" if stem.endswith("81") else "train2014"
        written = _read(tmp_path / "root" / "annotations" / folder / f"{stem}_labelTrainIds.png")
        np.testing.assert_array_equal(written, np.vectorize(COCO_CLS_TO_TR.get)(label))
        assert (tmp_path / "root" / "images" / folder / f"{stem}.jpg").is_file()
    assert {k: v for k, v in _tree(tmp_path).items() if not k.startswith("root")} == before
    _check("segvit_vit_l_coco_stuff10k.yaml", tmp_path / "root")


def test_coco_stuff_refuses_an_id_coco_never_used(tmp_path):
    src = tmp_path / "src"
    _coco_src(src)
    bad = src / "annotations" / "COCO_train2014_000000000078.mat"
    scipy_io.savemat(bad, {"S": np.full((12, 20), 12, np.uint16)})  # official: kept as 12 = a wrong class
    with pytest.raises(SegcliError, match="12 are not COCO-Stuff ids"):
        api.prepare_data("coco_stuff10k", src, tmp_path / "root")
    scipy_io.savemat(bad, {"S": np.full((12, 20), 300, np.uint16)})  # beyond the table
    with pytest.raises(SegcliError, match="300 are not COCO-Stuff ids"):
        api.prepare_data("coco_stuff10k", src, tmp_path / "root")


def test_without_scipy_the_error_names_the_pip_command(tmp_path, monkeypatch, cli):
    src = tmp_path / "src"
    _coco_src(src)
    monkeypatch.setitem(sys.modules, "scipy.io", None)  # import scipy.io -> ImportError
    res = cli("data", "prepare", "coco_stuff10k", src, "--out", tmp_path / "root")
    assert res.exit_code == 2 and "Traceback" not in res.output
    assert "pip install 'segcli[datasets]'" in " ".join(res.output.split())
    assert not (tmp_path / "root").exists()


# --------------------------------------------------------------------------- Pascal Context

# labels.txt of the context annotations (1-based, alphabetical over the 459 classes): the 59 classes' lines
LABELS_TXT_59 = {
    2: "aeroplane", 9: "bag", 18: "bed", 19: "bedclothes", 22: "bench", 23: "bicycle", 25: "bird", 31: "boat",
    33: "book", 34: "bottle", 44: "building", 45: "bus", 46: "cabinet", 59: "car", 65: "cat", 68: "ceiling",
    72: "chair", 80: "cloth", 85: "computer", 98: "cow", 104: "cup", 105: "curtain", 113: "dog", 115: "door",
    144: "fence", 158: "floor", 159: "flower", 162: "food", 187: "grass", 189: "ground", 207: "horse",
    220: "keyboard", 232: "light", 258: "motorbike", 259: "mountain", 260: "mouse", 284: "person", 295: "plate",
    296: "platform", 308: "pottedplant", 324: "road", 326: "rock", 347: "sheep", 349: "shelves", 354: "sidewalk",
    355: "sign", 360: "sky", 366: "snow", 368: "sofa", 397: "table", 415: "track", 416: "train", 420: "tree",
    424: "truck", 427: "tvmonitor", 440: "wall", 445: "water", 454: "window", 458: "wood",
}


def test_pascal_context_class_names_are_those_of_the_ids_written():
    """The converter writes id k for labels.txt id PASCAL_MAPPING[k]: class k must bear that name
    (it was listed in another order, so per-class results were shown under other classes' names)."""
    from segcli.data import dataset_classes
    from segcli.recipe import DataConfig

    written_names = ["background"] + [LABELS_TXT_59[raw] for raw in PASCAL_MAPPING[1:]]
    assert list(dataset_classes(DataConfig(type="pascal_context"))) == written_names
    assert list(dataset_classes(DataConfig(type="pascal_context_59"))) == written_names[1:]


def _pascal_src(root: Path) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(2)
    voc = root / "VOCdevkit" / "VOC2010"
    splits = {"train": ["2008_000002", "2008_000003"], "val": ["2008_000007"]}
    ids = {}
    (voc / "ImageSets" / "Main").mkdir(parents=True)
    for split, names in splits.items():
        (voc / "ImageSets" / "Main" / f"{split}.txt").write_text("".join(n + "\n" for n in names))
        for name in names:
            _image(voc / "JPEGImages" / f"{name}.jpg", rng)
            label = rng.integers(1, 460, (12, 20)).astype(np.uint16)  # labels.txt ids 1..459
            label[:5] = rng.choice(PASCAL_MAPPING[1:], (5, 20))  # plenty of the 59
            label[5, 0] = 0
            (root / "trainval").mkdir(exist_ok=True)
            scipy_io.savemat(root / "trainval" / f"{name}.mat", {"LabelMap": label})
            ids[name] = label
    _image(voc / "JPEGImages" / "2007_000001.jpg", rng)  # VOC has images outside the context splits
    return ids


def test_pascal_context_maps_459_classes_as_mmsegmentation(tmp_path):
    src = tmp_path / "src"
    ids = _pascal_src(src)
    before = _tree(src)
    result = api.prepare_data("pascal_context", src, tmp_path / "root")
    assert result.samples == {"train": 2, "val": 1}
    for name, label in ids.items():
        in_59 = np.isin(label, PASCAL_MAPPING)
        expected = np.where(in_59, np.digitize(label, PASCAL_MAPPING, right=True), 0)  # the other 400: background
        np.testing.assert_array_equal(_read(tmp_path / "root" / "SegmentationClassContext" / f"{name}.png"), expected)
    lists = tmp_path / "root" / "ImageSets" / "SegmentationContext"
    assert (lists / "train.txt").read_text() == "2008_000002\n2008_000003\n"
    assert not (tmp_path / "root" / "JPEGImages" / "2007_000001.jpg").exists()
    assert _tree(src) == before
    _check("nrd_r101_pascal_context.yaml", tmp_path / "root")
    _check("dtop_vit_l_pascal_context_59.yaml", tmp_path / "root")


def test_pascal_context_without_the_annotations_says_which_download(tmp_path, cli):
    src = tmp_path / "src"
    _pascal_src(src)
    shutil.rmtree(src / "trainval")
    res = cli("data", "prepare", "pascal_context", src, "--out", tmp_path / "root")
    assert res.exit_code == 2 and "Traceback" not in res.output
    assert "trainval.tar.gz" in res.output and len(res.output.strip().splitlines()) == 1
    assert not (tmp_path / "root").exists()


# --------------------------------------------------------------------------- ADE20K


def _ade_src(root: Path) -> Path:
    rng = np.random.default_rng(3)
    ade = root / "ADEChallengeData2016"
    for split, n in (("training", 3), ("validation", 2)):
        for i in range(1, n + 1):
            stem = f"ADE_{'train' if split == 'training' else 'val'}_{i:08d}"
            _image(ade / "images" / split / f"{stem}.jpg", rng)
            (ade / "annotations" / split).mkdir(parents=True, exist_ok=True)
            cv2.imwrite(str(ade / "annotations" / split / f"{stem}.png"), rng.integers(0, 151, (12, 20), dtype=np.uint8))
    return ade


def test_ade20k_is_checked_and_what_is_missing_is_named(tmp_path):
    ade = _ade_src(tmp_path / "src")
    good = api.prepare_data("ade20k", tmp_path / "src")  # the parent of the extracted folder is found too
    assert good.ok and good.checked_only and good.root == ade.resolve()
    assert good.samples == {"training": 3, "validation": 2}
    _check("segvit_vit_b_ade20k.yaml", good.root)
    (ade / "annotations" / "training" / "ADE_train_00000002.png").unlink()
    shutil.rmtree(ade / "images" / "validation")
    bad = api.prepare_data("ade20k", ade)
    problems = dict(bad.problems)
    assert "ADE_train_00000002.png" in problems[str(ade.resolve() / "annotations" / "training")]
    assert "missing" in problems[str(ade.resolve() / "images" / "validation")]
    assert len(problems) == 2


# --------------------------------------------------------------------------- resume, the output rule, bad SRC


@pytest.mark.parametrize("as_zip", [False, True])
def test_an_interrupted_run_resumes_without_overwrite(tmp_path, as_zip):
    src = tmp_path / "src"
    _cityscapes_src(src)
    if as_zip:
        for part in ("leftImg8bit", "gtFine"):
            _cityscapes_zip(src, part, src)
            shutil.rmtree(src / part)
    root = tmp_path / "root"
    full = api.prepare_data("cityscapes", src, tmp_path / "full")

    def stop_after_four(done, total):
        if done == 4:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        api.prepare_data("cityscapes", src, root, progress=stop_after_four)
    first = _tree(root)
    resumed = api.prepare_data("cityscapes", src, root)
    assert (resumed.skipped, resumed.written) == (4, full.written - 4)
    assert {k: v for k, v in _tree(root).items() if k in first and k != MARKER} == {
        k: v for k, v in first.items() if k != MARKER}  # complete files are not written again
    assert {k: v[0] for k, v in _tree(root).items()} == {k: v[0] for k, v in _tree(tmp_path / "full").items()}
    assert not list(root.rglob("*.part"))
    again = api.prepare_data("cityscapes", src, root)
    assert (again.skipped, again.written) == (full.written, 0)


def test_a_users_files_and_src_are_never_written(tmp_path):
    src = tmp_path / "src"
    _cityscapes_src(src)
    with pytest.raises(SegcliError, match="inside the dataset folder"):
        api.prepare_data("cityscapes", src, src / "prepared", overwrite=True)
    root = tmp_path / "root"
    users = root / "gtFine" / "train" / "aachen" / "aachen_000000_000019_gtFine_labelTrainIds.png"
    users.parent.mkdir(parents=True)
    users.write_bytes(b"a user's file")
    with pytest.raises(SegcliError, match="earlier run"):  # no marker of this preparation: not ours to skip
        api.prepare_data("cityscapes", src, root)
    assert users.read_bytes() == b"a user's file" and not (root / MARKER).exists()
    api.prepare_data("cityscapes", src, root, overwrite=True)
    assert users.read_bytes() != b"a user's file"


def test_bad_src_is_one_line_and_exit_2(tmp_path, cli):
    src = tmp_path / "src"
    _cityscapes_src(src)
    shutil.rmtree(src / "gtFine" / "val")
    for args in (["cityscapes", src], ["cityscapes", tmp_path / "nowhere"], ["cityscape", src]):
        res = cli("data", "prepare", *args, "--out", tmp_path / "root")
        assert res.exit_code == 2, res.output
        assert "Traceback" not in res.output and len(res.output.strip().splitlines()) == 1, res.output
    assert "gtFine/val" in " ".join(cli("data", "prepare", "cityscapes", src, "--out", tmp_path / "root").output.split())
    (tmp_path / "empty").mkdir()
    a_file = src / "leftImg8bit" / "train" / "aachen" / "aachen_000000_000019_leftImg8bit.png"
    for bad_src in (tmp_path / "empty", a_file):
        res = cli("data", "prepare", "cityscapes", bad_src, "--out", tmp_path / "root")
        said = " ".join(res.output.split())
        assert res.exit_code == 2 and "Traceback" not in res.output and len(res.output.strip().splitlines()) == 1
        assert "leftImg8bit_trainvaltest.zip" in said and "gtFine_trainvaltest.zip" in said, said  # both forms named
    assert "neither leftImg8bit/ nor leftImg8bit_trainvaltest.zip" in " ".join(
        cli("data", "prepare", "cityscapes", tmp_path / "empty", "--out", tmp_path / "root").output.split())
    assert not (tmp_path / "root").exists()


def test_the_cli_prepares_from_the_two_zips(tmp_path, cli):
    extracted = tmp_path / "extracted"
    _cityscapes_src(extracted, test=True)
    for part in ("leftImg8bit", "gtFine"):
        _cityscapes_zip(extracted, part, tmp_path / "downloads")
    res = cli("data", "prepare", "cityscapes", tmp_path / "downloads", "--out", tmp_path / "root")
    assert res.exit_code == 0, res.output
    assert "wrote 12 files" in " ".join(res.output.split()) and "test: 2" in res.output


def test_the_cli_reports_what_it_wrote(tmp_path, cli):
    src = tmp_path / "src"
    _cityscapes_src(src)
    res = cli("data", "prepare", "cityscapes", src, "--out", tmp_path / "root")
    assert res.exit_code == 0, res.output
    said = " ".join(res.output.split())
    assert "wrote 10 files" in said and f"data.root={(tmp_path / 'root').resolve()}" in said
    again = cli("data", "prepare", "cityscapes", src, "--out", tmp_path / "root", "--json")
    summary = json.loads(again.stdout)
    assert again.exit_code == 0 and (summary["written"], summary["skipped"]) == (0, 10)
    assert summary["root"] == str((tmp_path / "root").resolve()) and summary["samples"] == {"train": 3, "val": 2}
