"""Dataset readers on tiny trees in every layout, their errors, and the deterministic loaders."""
from __future__ import annotations

import pickle
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from segcli.data import (SegDataset, build_dataset, build_eval_loader, build_train_loader, generate_synthetic,
                         global_batch)
from segcli.data.transforms import EvalTransform
from segcli.errors import SegcliError
from segcli.recipe import DataConfig

SMALL = dict(crop_size=(16, 16), scale=(24, 16), num_workers=0)


def write_sample(image_path: Path, mask_path: Path, label: np.ndarray, seed: int = 0) -> None:
    """A random image and its mask (class ids) of the label's size."""
    image_path.parent.mkdir(parents=True, exist_ok=True)
    mask_path.parent.mkdir(parents=True, exist_ok=True)
    image = np.random.default_rng(seed).integers(0, 256, size=(*label.shape, 3), dtype=np.uint8)
    assert cv2.imwrite(str(image_path), image)
    assert cv2.imwrite(str(mask_path), label.astype(np.uint8))


def label_of(values, shape=(12, 16)) -> np.ndarray:
    """A label map holding each of ``values`` in vertical bands."""
    label = np.zeros(shape, np.uint8)
    for i, band in enumerate(np.array_split(np.arange(shape[1]), len(values))):
        label[:, band] = values[i]
    return label


def cfg(root, **kw) -> DataConfig:
    return DataConfig(type=kw.pop("type", "folder"), root=str(root), **{**SMALL, **kw})


# --------------------------------------------------------------------------- layouts


def test_ade20k_layout_and_reduce_zero_label(tmp_path):
    for directory, count in (("training", 3), ("validation", 2)):
        for i in range(count):
            write_sample(tmp_path / "images" / directory / f"ADE_{i}.jpg",
                         tmp_path / "annotations" / directory / f"ADE_{i}.png", label_of([0, 1, 150, 255]), i)
    train = build_dataset(cfg(tmp_path, type="ade20k"), "train")
    val = build_dataset(cfg(tmp_path, type="ade20k"), "val")
    assert (len(train), len(val), train.num_classes, train.classes[0]) == (3, 2, 150, "wall")
    assert train.palette.shape == (150, 3) and train.ignore_index == 255
    image, label = train.read(0)
    assert image.shape == (12, 16, 3) and image.dtype == np.uint8
    assert sorted(np.unique(label)) == [0, 149, 255]  # 0 -> 255, 1 -> 0, 150 -> 149, 255 stays
    raw = build_dataset(cfg(tmp_path, type="ade20k", reduce_zero_label=False, classes=tuple(map(str, range(151)))),
                        "train")
    assert sorted(np.unique(raw.read(0)[1])) == [0, 1, 150, 255]


def test_cityscapes_layout_with_cities_and_other_gtfine_files(tmp_path):
    for split, cities in (("train", ("aachen", "bremen")), ("val", ("lindau",))):
        for city in cities:
            for i in range(2):
                stem = f"{city}_{i:06d}_000019"
                write_sample(tmp_path / "leftImg8bit" / split / city / f"{stem}_leftImg8bit.png",
                             tmp_path / "gtFine" / split / city / f"{stem}_gtFine_labelTrainIds.png",
                             label_of([0, 18, 255]), i)
                # the other files of gtFine must not count as masks without images
                cv2.imwrite(str(tmp_path / "gtFine" / split / city / f"{stem}_gtFine_labelIds.png"),
                            label_of([7, 33]))
    train = build_dataset(cfg(tmp_path, type="cityscapes"), "train")
    assert (len(train), train.num_classes, train.classes[-1]) == (4, 19, "bicycle")
    assert train.palette[0].tolist() == [128, 64, 128]
    assert "bremen" in train.samples[3][0] and train.samples[3][1].endswith("_gtFine_labelTrainIds.png")
    assert sorted(np.unique(train.read(0)[1])) == [0, 18, 255]
    assert len(build_dataset(cfg(tmp_path, type="cityscapes"), "val")) == 2


def test_cityscapes_without_train_ids_says_how_to_make_them(tmp_path):
    stem = "aachen_000000_000019"
    write_sample(tmp_path / "leftImg8bit/train/aachen" / f"{stem}_leftImg8bit.png",
                 tmp_path / "gtFine/train/aachen" / f"{stem}_gtFine_labelIds.png", label_of([7]))
    with pytest.raises(SegcliError, match="labelTrainIds") as err:
        build_dataset(cfg(tmp_path, type="cityscapes"), "train")
    assert "segcli data prepare cityscapes" in err.value.hint


def _pascal_tree(root: Path) -> None:
    names = {"train": ["2008_000001", "2008_000002", "2008_000003"], "val": ["2008_000010", "2008_000011"]}
    for split, stems in names.items():
        for i, stem in enumerate(stems):
            write_sample(root / "JPEGImages" / f"{stem}.jpg", root / "SegmentationClassContext" / f"{stem}.png",
                         label_of([0, 1, 59]), i)
        (root / "ImageSets/SegmentationContext").mkdir(parents=True, exist_ok=True)
        (root / "ImageSets/SegmentationContext" / f"{split}.txt").write_text("\n".join(stems) + "\n")
    write_sample(root / "JPEGImages/2007_999999.jpg", root / "unused.png", label_of([0]))  # not in any list


def test_pascal_context_60_and_59(tmp_path):
    _pascal_tree(tmp_path)
    pc60 = build_dataset(cfg(tmp_path, type="pascal_context"), "train")
    pc59 = build_dataset(cfg(tmp_path, type="pascal_context_59"), "val")
    assert (len(pc60), pc60.num_classes, pc60.classes[0]) == (3, 60, "background")
    assert (len(pc59), pc59.num_classes, pc59.classes[0]) == (2, 59, "aeroplane")
    np.testing.assert_array_equal(pc59.palette, pc60.palette[1:])
    assert sorted(np.unique(pc60.read(0)[1])) == [0, 1, 59]
    assert sorted(np.unique(pc59.read(0)[1])) == [0, 58, 255]  # background ignored, the rest -1


def test_pascal_context_listed_image_missing(tmp_path):
    _pascal_tree(tmp_path)
    (tmp_path / "JPEGImages/2008_000002.jpg").unlink()
    with pytest.raises(SegcliError, match="1 of 3 missing") as err:
        build_dataset(cfg(tmp_path, type="pascal_context"), "train")
    assert err.value.where.endswith("2008_000002.jpg")


def test_coco_stuff10k_layout(tmp_path):
    for directory, count in (("train2014", 2), ("test2014", 3)):
        for i in range(count):
            stem = f"COCO_{directory}_{i:012d}"
            write_sample(tmp_path / "images" / directory / f"{stem}.jpg",
                         tmp_path / "annotations" / directory / f"{stem}_labelTrainIds.png", label_of([0, 1, 171]), i)
    train = build_dataset(cfg(tmp_path, type="coco_stuff10k"), "train")
    val = build_dataset(cfg(tmp_path, type="coco_stuff10k"), "val")
    assert (len(train), len(val), train.num_classes, train.classes[80]) == (2, 3, 171, "banner")
    assert sorted(np.unique(val.read(0)[1])) == [0, 170, 255]


def _folder_tree(root: Path, counts=(("train", 3), ("val", 2)), classes=("bg", "cat", "dog")) -> None:
    for split, count in counts:
        for i in range(count):
            suffix = ".jpg" if i % 2 else ".png"
            write_sample(root / "images" / split / f"s{i}{suffix}", root / "masks" / split / f"s{i}.png",
                         label_of([0, 2, 255]), i)
    (root / "classes.txt").write_text("\n".join(classes) + "\n\n")


def test_folder_layout_classes_palette_and_overrides(tmp_path):
    _folder_tree(tmp_path)
    train = build_dataset(cfg(tmp_path), "train")
    assert (len(train), train.classes) == (3, ("bg", "cat", "dog"))
    assert train.samples[1][0].endswith("s1.jpg") and train.samples[0][0].endswith("s0.png")
    assert sorted(np.unique(train.read(1)[1])) == [0, 2, 255]
    (tmp_path / "palette.txt").write_text("1 2 3\n4, 5, 6\n7 8 9\n")
    assert build_dataset(cfg(tmp_path), "val").palette.tolist() == [[1, 2, 3], [4, 5, 6], [7, 8, 9]]
    overridden = build_dataset(cfg(tmp_path, classes=("a", "b", "c"), reduce_zero_label=True), "val")
    assert overridden.classes == ("a", "b", "c")
    assert sorted(np.unique(overridden.read(0)[1])) == [1, 255]  # 0 -> 255, 2 -> 1
    custom_split = build_dataset(cfg(tmp_path, train_split="val"), "train")
    assert len(custom_split) == 2


def test_getitem_returns_normalized_tensors_and_pickles(tmp_path):
    _folder_tree(tmp_path)
    train = build_dataset(cfg(tmp_path), "train")
    item = train[0]
    assert item["image"].shape == (3, 16, 16) and item["image"].dtype == torch.float32
    assert item["label"].shape == (16, 16) and item["label"].dtype == torch.int64 and item["index"] == 0
    assert abs(float(item["image"].mean())) < 3  # normalised, not 0..255
    clone = pickle.loads(pickle.dumps(train))
    assert torch.equal(clone[0]["image"], item["image"])
    val = build_dataset(cfg(tmp_path), "val")
    assert isinstance(val.transform, EvalTransform) and val[1]["label"].shape == (12, 16)
    assert len(train.subset([2, 0])) == 2 and train.subset([2])[0]["index"] == 0


# --------------------------------------------------------------------------- errors


def test_root_errors(tmp_path):
    with pytest.raises(SegcliError, match="data.root is not set"):
        build_dataset(DataConfig(type="ade20k"), "train")
    with pytest.raises(SegcliError, match="dataset root not found") as err:
        build_dataset(cfg(tmp_path / "nowhere", type="ade20k"), "train")
    assert err.value.where == str(tmp_path / "nowhere")
    with pytest.raises(SegcliError, match="image folder not found") as err:
        build_dataset(cfg(tmp_path, type="ade20k"), "train")
    assert err.value.where == str(tmp_path / "images" / "training") and "annotations" in err.value.hint
    with pytest.raises(SegcliError, match="unknown dataset type 'ade20'"):
        build_dataset(DataConfig(type="ade20"), "train")


def test_no_images(tmp_path):
    (tmp_path / "images/train").mkdir(parents=True)
    (tmp_path / "masks/train").mkdir(parents=True)
    (tmp_path / "images/train/readme.txt").write_text("not an image")
    with pytest.raises(SegcliError, match="no images found") as err:
        build_dataset(cfg(tmp_path), "train")
    assert err.value.where == str(tmp_path / "images/train")


def test_image_without_mask_and_mask_without_image(tmp_path):
    _folder_tree(tmp_path)
    (tmp_path / "masks/train/s1.png").unlink()
    with pytest.raises(SegcliError, match=r"image has no mask \(1 of 3") as err:
        build_dataset(cfg(tmp_path), "train")
    assert err.value.where.endswith("s1.jpg") and err.value.hint.endswith("s1.png")
    _folder_tree(tmp_path)
    write_sample(tmp_path / "elsewhere/x.png", tmp_path / "masks/train/orphan.png", label_of([0]))
    with pytest.raises(SegcliError, match=r"mask has no image \(1 of 4") as err:
        build_dataset(cfg(tmp_path), "train")
    assert err.value.where.endswith("orphan.png")


def test_two_images_with_one_stem(tmp_path):
    _folder_tree(tmp_path)
    write_sample(tmp_path / "images/train/s1.png", tmp_path / "masks/train/s1.png", label_of([0]))
    with pytest.raises(SegcliError, match="two files share the name 's1'"):
        build_dataset(cfg(tmp_path), "train")


def test_corrupt_image_is_named_on_read(tmp_path):
    _folder_tree(tmp_path)
    (tmp_path / "images/train/s1.jpg").write_bytes(b"\xff\xd8 definitely not a jpeg")
    dataset = build_dataset(cfg(tmp_path), "train")  # construction does not decode
    with pytest.raises(SegcliError, match="cannot read image") as err:
        dataset.read(1)
    assert err.value.where.endswith("s1.jpg")


def test_size_mismatch_is_named_on_read(tmp_path):
    _folder_tree(tmp_path)
    cv2.imwrite(str(tmp_path / "masks/train/s2.png"), np.zeros((5, 7), np.uint8))
    dataset = build_dataset(cfg(tmp_path), "train")
    with pytest.raises(SegcliError, match="mask is 5x7 but its image .*s2.png is 12x16") as err:
        dataset[2]
    assert err.value.where.endswith("masks/train/s2.png")


def test_label_values_out_of_range(tmp_path):
    _folder_tree(tmp_path)
    cv2.imwrite(str(tmp_path / "masks/train/s0.png"), label_of([0, 3, 7, 255]))
    dataset = build_dataset(cfg(tmp_path), "train")
    dataset.read(1)  # other files are fine
    with pytest.raises(SegcliError, match=r"label values 3, 7 are outside \[0, 3\)") as err:
        dataset.read(0)
    assert err.value.where.endswith("s0.png") and "K = 3" in str(err.value)


def test_label_range_is_checked_after_the_mapping(tmp_path):
    _folder_tree(tmp_path)  # masks hold 0, 2, 255; with reduce_zero_label 2 -> 1 is fine, 3 classes
    cv2.imwrite(str(tmp_path / "masks/train/s0.png"), label_of([4, 255]))
    dataset = build_dataset(cfg(tmp_path, reduce_zero_label=True), "train")
    with pytest.raises(SegcliError, match="label values 3 after the label mapping"):
        dataset.read(0)


def test_colour_masks_are_rejected_and_palette_masks_read(tmp_path):
    from PIL import Image

    _folder_tree(tmp_path)
    cv2.imwrite(str(tmp_path / "masks/train/s0.png"), np.zeros((12, 16, 3), np.uint8))
    dataset = build_dataset(cfg(tmp_path), "train")
    with pytest.raises(SegcliError, match="3 channels") as err:
        dataset.read(0)
    assert err.value.where.endswith("s0.png")
    paletted = Image.fromarray(label_of([0, 1, 2]), mode="P")
    paletted.putpalette([0, 0, 0, 255, 0, 0, 0, 255, 0] + [0] * (768 - 9))
    paletted.save(tmp_path / "masks/train/s0.png")
    assert sorted(np.unique(dataset.read(0)[1])) == [0, 1, 2]


def test_classes_txt_missing_or_empty(tmp_path):
    _folder_tree(tmp_path)
    (tmp_path / "classes.txt").unlink()
    with pytest.raises(SegcliError, match="classes.txt not found") as err:
        build_dataset(cfg(tmp_path), "train")
    assert err.value.where == str(tmp_path / "classes.txt")
    assert build_dataset(cfg(tmp_path, classes=("a", "b", "c")), "train").num_classes == 3  # override suffices
    (tmp_path / "classes.txt").write_text("\n  \n")
    with pytest.raises(SegcliError, match="classes.txt is empty"):
        build_dataset(cfg(tmp_path), "train")
    (tmp_path / "classes.txt").write_text("a\nb\na\n")
    with pytest.raises(SegcliError, match="duplicate class names: a"):
        build_dataset(cfg(tmp_path), "train")


def test_bad_palette_file(tmp_path):
    _folder_tree(tmp_path)
    (tmp_path / "palette.txt").write_text("1 2 3\n4 5\n")
    with pytest.raises(SegcliError, match="palette.txt needs 3 lines"):
        build_dataset(cfg(tmp_path), "train")


# --------------------------------------------------------------------------- loaders


@pytest.fixture(scope="module")
def synthetic_train(tmp_path_factory) -> SegDataset:
    root = generate_synthetic(tmp_path_factory.mktemp("synthetic"), n_train=7, n_val=3, size=40)
    return build_dataset(DataConfig(type="synthetic", root=str(root), crop_size=(24, 24), scale=(40, 40)), "train")


def _take(batches, count):
    return [next(batches) for _ in range(count)]


def _assert_same(a, b):
    for key in ("image", "label", "index"):
        assert torch.equal(a[key], b[key]), key


def test_train_batches_do_not_depend_on_workers_and_resume_exactly(synthetic_train):
    serial = build_train_loader(synthetic_train, batch_size=4, num_workers=0, seed=3)
    reference = _take(serial, 5)
    assert reference[0]["image"].shape == (4, 3, 24, 24) and reference[0]["label"].shape == (4, 24, 24)
    assert serial.iteration == 5
    parallel = build_train_loader(synthetic_train, batch_size=4, num_workers=2, seed=3)
    for a, b in zip(reference, _take(parallel, 5)):
        _assert_same(a, b)
    parallel.close()
    resumed = build_train_loader(synthetic_train, batch_size=4, num_workers=0, seed=3, start_iter=3)
    for a, b in zip(reference[3:], _take(resumed, 2)):
        _assert_same(a, b)
    other_seed = _take(build_train_loader(synthetic_train, batch_size=4, num_workers=0, seed=4), 1)[0]
    assert not torch.equal(other_seed["image"], reference[0]["image"])


def test_ddp_ranks_split_the_global_batch(synthetic_train):
    single = _take(build_train_loader(synthetic_train, batch_size=4, num_workers=0, seed=1), 3)
    ranks = [_take(build_train_loader(synthetic_train, batch_size=4, num_workers=0, seed=1, rank=r, world_size=2), 3)
             for r in range(2)]
    for i in range(3):
        assert ranks[0][i]["image"].shape[0] == 2
        for key in ("image", "label", "index"):
            assert torch.equal(torch.cat([ranks[0][i][key], ranks[1][i][key]]), single[i][key])
    with pytest.raises(SegcliError, match="not divisible by 3"):
        build_train_loader(synthetic_train, batch_size=4, num_workers=0, seed=1, rank=0, world_size=3)


def test_sample_order_covers_each_epoch():
    keys = [key for it in range(6) for key in global_batch(num_samples=7, batch_size=4, seed=0, iteration=it)]
    assert sorted(k.index for k in keys[:7]) == list(range(7))  # epoch 0
    assert sorted(k.index for k in keys[7:14]) == list(range(7))  # epoch 1
    assert [k.index for k in keys[:7]] != [k.index for k in keys[7:14]]  # reshuffled
    assert keys[5].entropy == (0, 1, 1)  # (seed, iteration, slot)


def test_eval_loader_batches_of_one_and_rank_slices(tmp_path):
    for i, width in enumerate((16, 20, 24)):
        write_sample(tmp_path / "images/val" / f"v{i}.png", tmp_path / "masks/val" / f"v{i}.png",
                     label_of([0, 1], shape=(10, width)), i)
    (tmp_path / "classes.txt").write_text("a\nb\n")
    val = build_dataset(cfg(tmp_path), "val")
    batches = list(build_eval_loader(val, num_workers=0))
    assert [b["image"].shape for b in batches] == [(1, 3, 10, 16), (1, 3, 10, 20), (1, 3, 10, 24)]
    assert batches[2]["label"].shape == (1, 10, 24) and batches[2]["index"].tolist() == [2]
    rank1 = [b["index"].item() for b in build_eval_loader(val, num_workers=0, rank=1, world_size=2)]
    rank0 = [b["index"].item() for b in build_eval_loader(val, num_workers=0, rank=0, world_size=2)]
    assert (rank0, rank1) == ([0, 2], [1])
    val.set_transform(EvalTransform(val.transform.mean, val.transform.std, scale=(12, 5)))
    assert next(iter(build_eval_loader(val, num_workers=0)))["image"].shape == (1, 3, 5, 8)
