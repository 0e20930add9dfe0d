"""SegViT-CL: protocols, task data, the class-presence cache, frozen steps and CL metrics."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from segcli import api
from segcli.workflows.continual import (class_presence, cl_eval_dataset, cl_metrics, cl_step,
                              parse_protocol, task_eval_dataset, task_images, task_train_dataset, train_label_map)
from segcli.data import build_dataset
from segcli.errors import SegcliError
from segcli.models.continual import BACKGROUND, ContinualSegmentor, head_label_map
from segcli.recipe import load_recipe

REPO = Path(__file__).resolve().parents[1]
RECIPE = REPO / "recipes" / "tiny" / "cl.yaml"


def small(data_root: Path, **extra) -> list[str]:
    """Overrides that make tiny/cl.yaml a seconds-long run: 64 px, a 3-block ViT, 1 iteration."""
    values = {
        "data.root": str(data_root), "data.synthetic_size": 64, "data.synthetic_train": 8, "data.synthetic_val": 3,
        "data.crop_size": "[64, 64]", "data.batch_size": 2, "data.num_workers": 0,
        "train.max_iters": 1, "train.warmup_iters": 1, "train.eval_interval": 1, "train.log_interval": 1,
        "model.backbone.patch_size": 16, "model.backbone.img_size": 64, "model.backbone.depth": 3,
        "model.backbone.out_indices": "[0, 1, 2]", "model.decode_head.num_layers": 1,
        "model.backbone.pretrained": "null", "data.synthetic_seed": 0, "cl.step_iters": "null",
    }
    values.update(extra)
    return [f"{key}={value}" for key, value in values.items()]


@pytest.fixture(scope="module")
def cl_run(tmp_path_factory, synth_root):
    """Tasks 1 and 2 of protocol 4-4 on the synthetic data (module-wide: the slow part)."""
    work = tmp_path_factory.mktemp("cl_run")
    first = cl_step(RECIPE, 1, work, small(synth_root))
    second = cl_step(RECIPE, 2, work, small(synth_root, **{"train.max_iters": 2}))
    return work, first, second


# --------------------------------------------------------------------------- protocols


def test_protocols_split_classes_in_index_order():
    assert parse_protocol("4-4", 8) == ((0, 1, 2, 3), (4, 5, 6, 7))
    assert parse_protocol("6-1", 8) == ((0, 1, 2, 3, 4, 5), (6,), (7,))
    assert [len(t) for t in parse_protocol("100-10", 150)] == [100, 10, 10, 10, 10, 10]
    assert len(parse_protocol("50-50", 150)) == 3
    assert len(parse_protocol("100-5", 150)) == 11
    assert parse_protocol("100-50", 150)[1] == tuple(range(100, 150))


@pytest.mark.parametrize("protocol, words", [
    ("100-50", "dataset has 8"),  # ADE20K protocol on an 8-class dataset
    ("8-1", "dataset has 8"),  # nothing left for a second task
    ("3-2", "do not split"),  # 5 classes after the base do not make tasks of 2
    ("4", "form A-B"),
    ("4-0", "at least one class"),
])
def test_bad_protocols_name_the_key(protocol, words):
    with pytest.raises(SegcliError) as err:
        parse_protocol(protocol, 8)
    assert err.value.where == "cl.protocol"
    assert words in err.value.message


def test_unknown_task_and_missing_cl_section(tmp_path, synth_root):
    with pytest.raises(SegcliError, match="tasks 1..2") as err:
        cl_step(RECIPE, 3, tmp_path, small(synth_root))
    assert err.value.where == "--task"
    with pytest.raises(SegcliError) as err:
        cl_step(REPO / "recipes" / "tiny" / "segvit.yaml", 1, tmp_path,
                [o for o in small(synth_root) if not o.startswith("cl.")])
    assert err.value.where == "cl"


# --------------------------------------------------------------------------- task data


def write_folder_dataset(root: Path, masks: dict[str, list[np.ndarray]], classes: list[str]) -> Path:
    """A folder-layout dataset whose images are noise and whose masks are the given arrays."""
    rng = np.random.default_rng(0)
    for split, arrays in masks.items():
        (root / "images" / split).mkdir(parents=True, exist_ok=True)
        (root / "masks" / split).mkdir(parents=True, exist_ok=True)
        for i, mask in enumerate(arrays):
            cv2.imwrite(str(root / "images" / split / f"{i:03d}.png"), rng.integers(0, 255, (*mask.shape, 3), np.uint8))
            cv2.imwrite(str(root / "masks" / split / f"{i:03d}.png"), mask.astype(np.uint8))
    (root / "classes.txt").write_text("\n".join(classes) + "\n")
    return root


def quadrants(*values: int, size: int = 32) -> np.ndarray:
    """A mask whose four quadrants (TL, TR, BL, BR) hold the given labels."""
    mask = np.zeros((size, size), np.uint8)
    half = size // 2
    for (row, col), value in zip([(0, 0), (0, 1), (1, 0), (1, 1)], values):
        mask[row * half:(row + 1) * half, col * half:(col + 1) * half] = value
    return mask


@pytest.fixture()
def folder4(tmp_path) -> Path:
    """4 classes; protocol 2-1 -> tasks {0, 1}, {2}, {3}."""
    train = [quadrants(0, 1, 0, 1), quadrants(0, 2, 1, 255), quadrants(2, 3, 0, 0), quadrants(3, 3, 3, 3)]
    return write_folder_dataset(tmp_path / "folder4", {"train": train, "val": [quadrants(0, 1, 2, 3)]},
                                ["a", "b", "c", "d"])


def folder_recipe(root: Path, *extra: str):
    return load_recipe(RECIPE, [f"data.type=folder", f"data.root={root}", "data.num_workers=0", *extra])


def test_task_images_overlapped_and_disjoint(folder4):
    recipe = folder_recipe(folder4)
    dataset = build_dataset(recipe.data, "train")
    presence = class_presence(dataset, folder4, "train").matrix
    assert presence.tolist() == [[1, 1, 0, 0], [1, 1, 1, 0], [1, 0, 1, 1], [0, 0, 0, 1]]
    tasks = parse_protocol("2-1", 4)
    assert task_images(presence, tasks, 1, "overlapped").tolist() == [0, 1, 2]
    assert task_images(presence, tasks, 1, "disjoint").tolist() == [0]  # 1 and 2 hold future classes
    assert task_images(presence, tasks, 2, "overlapped").tolist() == [1, 2]
    assert task_images(presence, tasks, 2, "disjoint").tolist() == [1]  # image 2 holds class 3 (task 3)
    assert task_images(presence, tasks, 3, "disjoint").tolist() == [2, 3]


def test_label_remapping_overlapped_vs_disjoint(folder4):
    dataset = build_dataset(folder_recipe(folder4).data, "train")
    tasks = parse_protocol("2-1", 4)
    presence = class_presence(dataset, folder4, "train").matrix
    overlapped = task_train_dataset(dataset, presence, tasks, 2, "overlapped")
    disjoint = task_train_dataset(dataset, presence, tasks, 2, "disjoint")
    assert len(overlapped) == 2 and len(disjoint) == 1
    bg = BACKGROUND
    # image 1 (quadrants 0, 2, 1, ignore): old classes -> background, task 2's class kept, ignore kept
    for view in (overlapped, disjoint):
        _, label = view.read(0)
        assert np.array_equal(label, quadrants(bg, 2, bg, 255))
    # image 2 (2, 3, 0, 0) is only in the overlapped view: the future class 3 is background too
    _, label = overlapped.read(1)
    assert np.array_equal(label, quadrants(2, bg, bg, bg))
    # "ignore" reading of background, and the evaluation view (full labels, means over seen classes)
    ignored = task_train_dataset(dataset, presence, tasks, 2, "overlapped", background="ignore")
    assert np.array_equal(ignored.read(1)[1], quadrants(2, 255, 255, 255))
    val = build_dataset(folder_recipe(folder4).data, "val")
    assert np.array_equal(task_eval_dataset(val, tasks, 2).read(0)[1], quadrants(0, 1, 2, 3))
    assert task_eval_dataset(val, tasks, 2).mean_classes == (0, 1, 2)
    assert task_eval_dataset(val, tasks, 3).subset([0]).mean_classes == (0, 1, 2, 3)
    assert train_label_map(tasks, 1)[[0, 1, 2, 3, 255]].tolist() == [0, 1, bg, bg, 255]
    assert len(overlapped.subset([1])) == 1 and np.array_equal(overlapped.subset([1]).read(0)[1], label)


def test_presence_index_is_cached_reused_and_invalidated(folder4, tmp_path, monkeypatch):
    import segcli.workflows.continual.presence as continual

    monkeypatch.setenv("SEGCLI_CACHE", str(tmp_path / "cache"))
    reads = []
    original = continual.read_mask
    monkeypatch.setattr(continual, "read_mask", lambda path: reads.append(path) or original(path))
    dataset = build_dataset(folder_recipe(folder4).data, "train")
    before = sorted(p.name for p in folder4.iterdir())
    first = class_presence(dataset, folder4, "train")
    assert not first.reused and len(reads) == 4
    assert tmp_path / "cache" in first.path.parents and first.path.is_file()
    assert sorted(p.name for p in folder4.iterdir()) == before  # nothing written into the dataset
    second = class_presence(dataset, folder4, "train")
    assert second.reused and len(reads) == 4  # no mask read again
    assert np.array_equal(first.matrix, second.matrix)
    # editing a mask changes the key: recomputed (and the new content is seen)
    mask_path = Path(dataset.samples[3][1])
    cv2.imwrite(str(mask_path), quadrants(3, 3, 3, 0))
    os.utime(mask_path, ns=(1, 1))  # a different mtime even on coarse-grained file systems
    third = class_presence(dataset, folder4, "train")
    assert not third.reused and len(reads) == 8 and third.matrix[3].tolist() == [True, False, False, True]
    # another label mapping is another index
    remapped = build_dataset(folder_recipe(folder4, "data.reduce_zero_label=true").data, "train")
    assert not class_presence(remapped, folder4, "train").reused


def test_presence_index_on_a_read_only_dataset_and_an_unwritable_cache(folder4, tmp_path, monkeypatch):
    """The bug: cl-step wrote its cache into the dataset and failed on a read-only mount."""
    dataset = build_dataset(folder_recipe(folder4).data, "train")
    modes = {path: path.stat().st_mode for path in [folder4, *folder4.rglob("*")] if path.is_dir()}
    monkeypatch.setenv("SEGCLI_CACHE", str(tmp_path / "cache"))
    try:
        for folder in modes:
            folder.chmod(0o555)
        first = class_presence(dataset, folder4, "train")
        assert tmp_path / "cache" in first.path.parents and first.path.is_file()
        assert class_presence(dataset, folder4, "train").reused
    finally:
        for folder, mode in modes.items():
            folder.chmod(mode)
    (tmp_path / "blocked").write_text("a file where the cache folder would go")  # mkdir fails: OSError
    monkeypatch.setenv("SEGCLI_CACHE", str(tmp_path / "blocked"))
    computed = class_presence(dataset, folder4, "train")
    assert not computed.reused and np.array_equal(computed.matrix, first.matrix)


# --------------------------------------------------------------------------- the model


def test_frozen_parts_stay_in_eval_mode_and_only_the_last_head_learns(synth_root):
    recipe = load_recipe(RECIPE, small(synth_root, **{"model.options.task_classes": "[4, 4]"}))
    model = api.build_model(recipe)
    assert isinstance(model, ContinualSegmentor) and model.task_classes == (4, 4) and model.num_classes == 8
    model.train()
    assert not model.backbone.training and not model.heads[0].training and model.heads[1].training
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable == {name for name, _ in model.named_parameters() if name.startswith("heads.1.")}
    images = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        features = model.backbone(images)
        in_train = model.heads[0].seg_logits(model.heads[0](features), (64, 64))
        model.eval()
        in_eval = model.heads[0].seg_logits(model.heads[0](features), (64, 64))
    assert torch.equal(in_train, in_eval)  # no dropout in the frozen head although the model trains
    labels = torch.tensor([[0, 3, 4, 7, BACKGROUND, 255]])
    assert head_label_map(4, 4)[labels].tolist() == [[4, 4, 0, 3, 4, 255]]  # other classes -> background 4
    one_task = api.build_model(load_recipe(RECIPE, small(synth_root)))
    assert one_task.task_classes == (8,) and all(p.requires_grad for p in one_task.parameters())


def test_step_keeps_old_parameters_and_scores_bit_identical(cl_run, synth_root):
    work, first, second = cl_run
    assert first.checkpoint == work / "task1" / "last.pt" and second.checkpoint == work / "task2" / "last.pt"
    assert second.classes == (4, 5, 6, 7) and second.num_tasks == 2
    old = api.load_checkpoint(first.checkpoint).model
    new = api.load_checkpoint(second.checkpoint).model
    assert old.task_classes == (4,) and new.task_classes == (4, 4)
    new_state = new.state_dict()
    for name, value in old.state_dict().items():
        assert torch.equal(value, new_state[name]), name
    torch.manual_seed(0)  # cl_step's seed: `init` starts where step 2 started
    init = api.build_model(load_recipe(RECIPE, small(synth_root, **{"model.options.task_classes": "[4, 4]"})))
    changed = [n for n, v in init.state_dict().items() if n.startswith("heads.1.") and not torch.equal(v, new_state[n])]
    assert changed  # the new head did train (from the same initial values)
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(2, 3, 64, 64, generator=generator)
    with torch.no_grad():
        before, after = old(images), new(images)
    assert before.shape == (2, 4, 64, 64) and after.shape == (2, 8, 64, 64)
    assert torch.equal(after[:, :4], before)  # the old task's per-class scores, bit for bit


def test_wrong_previous_checkpoints_are_refused(cl_run, tmp_path, synth_root):
    work, first, _ = cl_run
    with pytest.raises(SegcliError, match="--task 1"):  # task 2 before task 1
        cl_step(RECIPE, 2, tmp_path / "empty", small(synth_root))
    wrong_task = tmp_path / "wrong_task"
    (wrong_task / "task2").mkdir(parents=True)
    shutil.copy(first.checkpoint, wrong_task / "task2" / "last.pt")  # the task-1 file where task 2's should be
    with pytest.raises(SegcliError, match="checkpoint of task 1, but task 3"):
        cl_step(RECIPE, 3, wrong_task, small(synth_root, **{"cl.protocol": "4-2"}))
    with pytest.raises(SegcliError, match="first 1 tasks differ"):  # same folder, another protocol
        cl_step(RECIPE, 2, work, small(synth_root, **{"cl.protocol": "2-2"}))
    plain = api.train(RECIPE, tmp_path / "plain", small(synth_root))
    (tmp_path / "plain_run" / "task1").mkdir(parents=True)
    shutil.copy(plain.last, tmp_path / "plain_run" / "task1" / "last.pt")
    with pytest.raises(SegcliError, match="no cl metadata"):
        cl_step(RECIPE, 2, tmp_path / "plain_run", small(synth_root))
    with pytest.raises(SegcliError, match="does not fit"):  # same protocol, another decode head
        cl_step(RECIPE, 2, work, small(synth_root, **{"model.decode_head.num_layers": 2}))


# --------------------------------------------------------------------------- metrics and evaluation


def test_eval_and_cl_metrics_of_a_step(cl_run):
    work, first, second = cl_run
    loaded = api.load_checkpoint(second.checkpoint)
    (val_set,) = api.build_datasets(loaded.recipe, splits=("val",))
    assert cl_eval_dataset({}, val_set) is val_set
    first_meta = api.load_checkpoint(first.checkpoint).meta
    assert cl_eval_dataset(first_meta, val_set).mean_classes == (0, 1, 2, 3)
    metrics = api.evaluate(second.checkpoint)
    cl = cl_metrics(second.checkpoint, metrics, loaded.meta)
    iou = [row["IoU"] for row in metrics["per_class"]]
    mean = lambda values: float(np.mean([v for v in values if v is not None]))  # noqa: E731
    assert cl["task"] == 2 and cl["num_tasks"] == 2 and cl["protocol"] == "4-4"
    assert cl["base_mIoU"] == pytest.approx(mean(iou[:4]))
    assert cl["base_mAcc"] == pytest.approx(mean([row["Acc"] for row in metrics["per_class"]][:4]))
    assert cl["new_mIoU"] == pytest.approx(mean(iou[4:]))
    assert cl["all_mIoU"] == pytest.approx(mean(iou))
    step1 = first.metrics["per_class"]
    assert cl["steps"][0]["source"] == "cl_step.json"
    assert cl["steps"][0]["all_mIoU"] == pytest.approx(mean([r["IoU"] for r in step1[:4]]))
    assert cl["avg_mIoU"] == pytest.approx((cl["steps"][0]["all_mIoU"] + cl["all_mIoU"]) / 2)
    assert cl["forgetting"][0]["forgetting"] == pytest.approx(cl["steps"][0]["base_mIoU"] - cl["base_mIoU"])
    assert cl["forgetting"][1]["forgetting"] == 0
    # the average is over the tasks before this step (it was over the current one: always 0)
    assert cl["avg_forgetting"] == pytest.approx(cl["forgetting"][0]["forgetting"])
    assert [row["classes"] for row in cl["forgetting"]] == [{"first": 0, "last": 3}, {"first": 4, "last": 7}]
    # a stale step file (the checkpoint changed since) is not trusted: the step is evaluated again
    os.utime(first.checkpoint, ns=(1, 1))
    again = cl_metrics(second.checkpoint, metrics)
    assert again["steps"][0]["source"] == "evaluated"
    assert again["steps"][0]["all_mIoU"] == pytest.approx(cl["steps"][0]["all_mIoU"])
    with pytest.raises(SegcliError, match="continual-learning step"):
        cl_metrics(second.checkpoint, metrics, {"num_classes": 8})


def test_protocol_override_on_a_folder_dataset(tmp_path):
    rng = np.random.default_rng(1)
    masks = [rng.integers(0, 3, (4, 4)).repeat(16, 0).repeat(16, 1).astype(np.uint8) for _ in range(4)]
    root = write_folder_dataset(tmp_path / "folder3", {"train": masks, "val": masks[:1]}, ["x", "y", "z"])
    extra = ["data.type=folder", "cl.protocol=1-1"]
    first = cl_step(RECIPE, 1, tmp_path / "run", small(root) + extra)
    assert first.num_tasks == 3 and first.classes == (0,)
    cl_step(RECIPE, 2, tmp_path / "run", small(root) + extra)
    third = cl_step(RECIPE, 3, tmp_path / "run", small(root) + extra)
    assert third.classes == (2,) and api.load_checkpoint(third.checkpoint).model.task_classes == (1, 1, 1)
    with pytest.raises(SegcliError) as err:
        cl_step(RECIPE, 1, tmp_path / "bad", small(root, **{"cl.protocol": "100-50"}) + ["data.type=folder"])
    assert err.value.where == "cl.protocol"


def test_cl_steps_through_the_cli(cli, synth_root, tmp_path, monkeypatch):
    """`segcli cl-step RECIPE --task 1`, then `segcli cl-step --task 2` (no recipe: the run is found
    under runs/), then `segcli eval --json` with the cl block."""
    monkeypatch.chdir(tmp_path)
    sets = [arg for value in small(synth_root) for arg in ("--set", value)]
    res = cli("cl-step", RECIPE, "--task", "1", *sets)
    assert res.exit_code == 0, res.output
    assert (tmp_path / "runs" / "cl" / "task1" / "last.pt").is_file()
    assert "segcli cl-step --task 2" in res.output
    res = cli("cl-step", "--task", "2", "--set", "train.max_iters=2")
    assert res.exit_code == 0, res.output
    res = cli("eval", "runs/cl/task2/last.pt", "--json")
    assert res.exit_code == 0, res.output
    cl = json.loads(res.stdout)["cl"]
    assert cl["task"] == 2 and cl["steps"][0]["base_mIoU"] is not None and cl["new_mIoU"] is not None
    # a second run makes the recipe-less form ambiguous; task 1 has nothing to continue
    (tmp_path / "runs" / "other" / "task2").mkdir(parents=True)
    (tmp_path / "runs" / "other" / "task2" / "last.pt").write_bytes(b"")
    (tmp_path / "runs" / "cl" / "task3").mkdir()
    res = cli("cl-step", "--task", "3")
    assert res.exit_code == 2 and "several continual runs" in res.output
    res = cli("cl-step", "--task", "1")
    assert res.exit_code == 2 and "needs its recipe" in res.output
