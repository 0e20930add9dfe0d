"""The synthetic dataset: deterministic scenes, the on-disk cache, and that colour alone is not enough."""
from __future__ import annotations

import json

import numpy as np
import pytest

from segcli.data import SYNTHETIC_CLASSES, build_dataset, generate_synthetic, render_scene
from segcli.data.synthetic import MARKER
from segcli.errors import SegcliError
from segcli.recipe import DataConfig


def test_scenes_are_deterministic_and_varied():
    image, label = render_scene(64, np.random.default_rng([0, 0, 5]))
    again, label_again = render_scene(64, np.random.default_rng([0, 0, 5]))
    other, _ = render_scene(64, np.random.default_rng([0, 0, 6]))
    assert image.shape == (64, 64, 3) and image.dtype == np.uint8
    assert label.shape == (64, 64) and label.dtype == np.uint8 and label.max() < len(SYNTHETIC_CLASSES)
    np.testing.assert_array_equal(image, again)
    np.testing.assert_array_equal(label, label_again)
    assert not np.array_equal(image, other)


def test_every_class_appears_with_stuff_dominating_and_thin_poles():
    labels = np.stack([render_scene(96, np.random.default_rng([0, 0, i]))[1] for i in range(24)])
    share = np.bincount(labels.ravel(), minlength=len(SYNTHETIC_CLASSES)) / labels.size
    assert (share > 0.002).all(), share  # every class is present
    assert share[:4].sum() > 0.7  # stuff (sky, grass, water, wall) covers most pixels
    assert share[SYNTHETIC_CLASSES.index("pole")] < 0.04  # thin structures are rare pixels


def test_mean_colour_alone_does_not_separate_the_classes():
    """Nearest-class-mean colour classification must do badly: texture and shape have to matter."""
    scenes = [render_scene(64, np.random.default_rng([0, 0, i])) for i in range(24)]
    pixels = np.concatenate([image.reshape(-1, 3) for image, _ in scenes]).astype(np.float32)
    labels = np.concatenate([label.ravel() for _, label in scenes])
    k = len(SYNTHETIC_CLASSES)
    means = np.stack([pixels[labels == c].mean(0) for c in range(k)])  # [K, 3]
    predicted = np.argmin(((pixels[:, None, :] - means[None]) ** 2).sum(-1), axis=1)  # [N]
    intersection = np.bincount(labels[predicted == labels], minlength=k)
    union = np.bincount(labels, minlength=k) + np.bincount(predicted, minlength=k) - intersection
    assert (intersection / union).mean() < 0.35


def test_generation_writes_the_folder_layout(tmp_path):
    root = generate_synthetic(tmp_path / "syn", n_train=96, n_val=24, size=128)
    assert len(list((root / "images/train").glob("*.png"))) == 96
    assert len(list((root / "masks/val").glob("*.png"))) == 24
    assert (root / "classes.txt").read_text().split() == list(SYNTHETIC_CLASSES)
    val = build_dataset(DataConfig(type="synthetic", root=str(root), synthetic_train=96, synthetic_val=24), "val")
    assert val.classes == SYNTHETIC_CLASSES and val.palette.shape == (8, 3) and len(val) == 24
    image, label = val.read(0)
    assert image.shape == (128, 128, 3) and label.shape == (128, 128)


def test_cache_reuses_and_regenerates_on_other_parameters(tmp_path):
    root = generate_synthetic(tmp_path, n_train=3, n_val=2, size=48)
    first = root / "images/train/00000.png"
    stamp, content = first.stat().st_mtime_ns, first.read_bytes()
    generate_synthetic(tmp_path, n_train=3, n_val=2, size=48)
    assert first.stat().st_mtime_ns == stamp  # same parameters: nothing written
    generate_synthetic(tmp_path, n_train=5, n_val=1, size=48)
    assert len(list((root / "images/train").iterdir())) == 5 and len(list((root / "masks/val").iterdir())) == 1
    assert first.read_bytes() == content  # image i depends on (seed, split, i) only
    assert json.loads((root / MARKER).read_text())["n_train"] == 5
    generate_synthetic(tmp_path, n_train=5, n_val=1, size=48, seed=1)
    assert first.read_bytes() != content


def test_interrupted_generation_is_redone(tmp_path):
    generate_synthetic(tmp_path, n_train=2, n_val=1, size=48)
    marker = json.loads((tmp_path / MARKER).read_text())
    (tmp_path / MARKER).write_text(json.dumps({**marker, "complete": False}))
    (tmp_path / "masks/train/00001.png").unlink()
    generate_synthetic(tmp_path, n_train=2, n_val=1, size=48)
    assert (tmp_path / "masks/train/00001.png").is_file()
    assert json.loads((tmp_path / MARKER).read_text())["complete"] is True


def test_refuses_to_write_into_someone_elses_folder(tmp_path):
    (tmp_path / "important.txt").write_text("my data")
    with pytest.raises(SegcliError, match="not empty") as err:
        generate_synthetic(tmp_path, n_train=2, n_val=1, size=48)
    assert err.value.where == str(tmp_path)
    assert (tmp_path / "important.txt").read_text() == "my data"


def test_builder_defaults_to_data_synthetic_in_the_working_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    train = build_dataset(DataConfig(type="synthetic", synthetic_size=48, synthetic_train=4, synthetic_val=2,
                                     crop_size=(32, 32)), "train")
    assert len(train) == 4 and (tmp_path / "data/synthetic" / MARKER).is_file()
    assert train[0]["image"].shape == (3, 32, 32)


def test_bad_parameters_are_user_errors(tmp_path):
    with pytest.raises(SegcliError, match="at least one image"):
        generate_synthetic(tmp_path, n_train=0, n_val=1, size=64)
    with pytest.raises(SegcliError, match="at least 32 px"):
        generate_synthetic(tmp_path, n_train=1, n_val=1, size=16)
