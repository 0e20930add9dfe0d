"""Continual semantic segmentation (SegViT-CL, thesis 4.2.3 and 4.3.6): protocols, task data, steps, metrics.

A recipe with a ``cl:`` section (``protocol: A-B``, ``setting: overlapped | disjoint``) and
``model.type: continual`` is trained one task at a time with :func:`cl_step`; the model is
``segcli/models/continual.py``. Work-dir layout: ``DIR/task{N}/`` holds the usual training files
(``last.pt``, ``best.pt``, ``metrics.jsonl``, ``recipe.yaml``) and ``cl_step.json`` (the per-class
IoU at the end of the step, reused by :func:`cl_metrics`). ``DIR`` defaults to ``runs/<recipe name>``.

Decisions (the thesis is silent; SegViT-CL was not released):

* **Protocol** ``A-B`` on a dataset of K classes: task 1 = class ids ``0..A-1``, then tasks of
  B classes in index order until K; ``(K - A)`` must be a positive multiple of B (ADE20K:
  100-50 = 2 tasks, 100-10 = 6, 50-50 = 3, 100-5 = 11; thesis 4.3.6). Class ids are the
  dataset's after its own label mapping (ADE20K: after ``reduce_zero_label``, so 100-50's base
  classes are the raw labels 1..100, as in MiB/PLOP without their background class).
* **Task images** (thesis 4.3.6, after Cermelli et al. 2020): *overlapped* — every training image
  with at least one pixel of a class of task t; *disjoint* — those of them with no pixel of a
  future task's class. Validation always uses every image.
* **Labels of a training step**: the classes of task t keep their ids, pixels of old and future
  classes become "background" (value 254), ignore stays ignore. Datasets without a background
  class (ADE20K, where raw 0 is already ignored) need a meaning for it: we make it a valid pixel of
  no class, i.e. a negative of every mask of the learning head ("no object" for its queries) rather
  than an ignored pixel. Ignoring those pixels would leave the new masks untrained on old-class
  regions, where at test time they compete with the frozen heads in the concatenated argmax; with
  negatives they learn to stay off them. (``background="ignore"`` in :func:`task_train_dataset`
  gives the other reading, for comparison.)
* **Evaluation at step t**: every validation image with its full labels; the means are over the
  classes learnt so far (tasks 1..t, the "all" of that step) and later classes' IoU is reported
  as None. Pixels of later classes stay valid: whatever the model predicts there is a false
  positive of that class, as in MiB/PLOP, which relabel future classes as a counted background
  at test time. So every step is scored on the same pixels and a base-class IoU changes between
  steps only because the model did (the new head taking pixels from, or giving pixels back to,
  the frozen ones). Ignoring those pixels instead would inflate step 1 and make a "drop" that is
  an artefact of the relabelling: on the synthetic 6-2 run of the first implementation, base
  mIoU 33.1 (ignored) vs 30.0 (counted) for the same step-1 model.
* **The class-presence index** (which classes each training image contains) is what task
  membership is computed from, for any protocol and setting, with no image decoded twice. It is
  computed once per dataset split (masks read in parallel with ``data.num_workers`` processes)
  and cached next to the dataset as ``<data.root>/.segcli/class_presence-<split>.npz``. When that
  folder is not writable the cache goes to ``$XDG_CACHE_HOME/segcli/class_presence/<hash of the
  root path>/`` (default ``~/.cache``). Invalidation key: a SHA-256 over the class count, the
  dataset's label mapping and, per mask, its path relative to the root, size and modification
  time (ns) — adding, removing, replacing or editing a mask recomputes it; stat-ing 20k files
  costs well under a second.
* **Iterations per step**: task 1 trains the whole model (``train.max_iters``); later tasks train
  one head. The thesis calls them "quick fine-tuning experiments" without numbers; recipes set
  the incremental budget with ``cl.step_iters`` (default: ``train.max_iters``). ``train.init_from``
  applies to task 1 only (later tasks start from task t-1).
* **Metrics** (:func:`cl_metrics`, thesis 4.3.6, tables 4.11-4.12): base mIoU (task-1 classes),
  new mIoU (classes of tasks 2..t), all mIoU (tasks 1..t), avg mIoU (mean of each step's all
  mIoU, Douillard et al. 2021) and forgetting per task (mIoU of its classes at the step that
  learnt it minus at step t; the average, as in table 4.12, is over tasks 2..t). Added:
  ``base_mAcc``, the base classes' mean recall, at every step. A base-class IoU can *rise* after
  a step, because the new head takes pixels of its classes that the old heads had claimed (false
  positives of base classes); the recall depends only on base-class pixels, so its fall is
  exactly the share of them that new heads took: the interference the frozen design leaves.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import re
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Literal

import numpy as np
import torch

from .data.datasets import SegDataset, read_mask
from .errors import SegcliError
from .models.continual import BACKGROUND, IGNORE
from .recipe import Recipe, apply_overrides, load_recipe, recipe_from_dict

INDEX_VERSION = 1
EVAL_VERSION = 3  # of the step evaluation in cl_step.json (2: later classes' pixels counted; 3: + Acc)
STEP_FILE = "cl_step.json"

Tasks = tuple[tuple[int, ...], ...]


# --------------------------------------------------------------------------- protocol


def parse_protocol(protocol: str, num_classes: int, where: str = "cl.protocol") -> Tasks:
    """``"A-B"`` -> the class ids of every task: ``(0..A-1), (A..A+B-1), ...`` up to ``num_classes``."""
    match = re.fullmatch(r"\s*(\d+)\s*-\s*(\d+)\s*", str(protocol))
    if match is None:
        raise SegcliError(f"protocol '{protocol}' is not of the form A-B", where,
                          "e.g. 100-50: 100 base classes, then tasks of 50 new classes")
    base, step = int(match.group(1)), int(match.group(2))
    if base < 1 or step < 1:
        raise SegcliError(f"protocol '{protocol}' needs at least one class per task", where)
    half = max(num_classes // 2, 1)
    example = f"e.g. {half}-{num_classes - half}" if num_classes > 1 else "a continual protocol needs 2+ classes"
    if base >= num_classes:
        raise SegcliError(f"protocol '{protocol}' starts with {base} classes but the dataset has {num_classes}",
                          where, f"the first task must leave classes for later tasks; {example}")
    rest = num_classes - base
    if rest % step:
        raise SegcliError(f"protocol '{protocol}': the {rest} classes after the first {base} do not split into "
                          f"tasks of {step}", where, f"choose B dividing {rest}, e.g. {base}-{rest}")
    tasks = [tuple(range(base))]
    tasks += [tuple(range(start, start + step)) for start in range(base, num_classes, step)]
    return tuple(tasks)


# --------------------------------------------------------------------------- class-presence index


@dataclass
class ClassPresence:
    """``matrix[i, c]``: training image i holds at least one pixel of class c (``[N, K]`` bool)."""

    matrix: np.ndarray
    path: Path  # where the cache lives
    reused: bool  # True when read from the cache, False when computed now


class _MaskClasses(torch.utils.data.Dataset):
    """Masks -> ``[K]`` bool presence rows (a torch Dataset so that workers can read in parallel)."""

    def __init__(self, masks: list[str], label_lut: np.ndarray | None, num_classes: int):
        self.masks, self.label_lut, self.num_classes = masks, label_lut, num_classes

    def __len__(self) -> int:
        return len(self.masks)

    def __getitem__(self, index: int) -> torch.Tensor:
        label = read_mask(self.masks[index])
        if self.label_lut is not None:
            label = self.label_lut[label]
        counts = np.bincount(label.ravel(), minlength=256)  # [256]
        return torch.from_numpy(counts[: self.num_classes] > 0)  # [K]


def _fingerprint(dataset: SegDataset, root: Path) -> str:
    digest = hashlib.sha256()
    lut = None if dataset.label_lut is None else dataset.label_lut.tolist()
    digest.update(json.dumps({"version": INDEX_VERSION, "num_classes": dataset.num_classes, "lut": lut}).encode())
    for _, mask in dataset.samples:
        stat = os.stat(mask)
        digest.update(f"{os.path.relpath(mask, root)}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def presence_cache_paths(root: Path, split: str) -> tuple[Path, Path]:
    """(next to the dataset, fallback user cache) locations of the index of ``split``."""
    name = f"class_presence-{split}.npz"
    user_cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    key = hashlib.sha1(str(root.resolve()).encode()).hexdigest()[:16]
    return root / ".segcli" / name, user_cache / "segcli" / "class_presence" / key / name


def _read_cache(path: Path, fingerprint: str, shape: tuple[int, int]) -> np.ndarray | None:
    try:
        with np.load(path, allow_pickle=False) as data:
            if str(data["fingerprint"]) != fingerprint:
                return None
            matrix = np.unpackbits(data["packed"], axis=1, count=shape[1]).astype(bool)  # [N, K]
    except (OSError, KeyError, ValueError):
        return None
    return matrix if matrix.shape == shape else None


def _write_cache(path: Path, fingerprint: str, matrix: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            np.savez_compressed(handle, fingerprint=np.array(fingerprint), packed=np.packbits(matrix, axis=1))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def class_presence(dataset: SegDataset, root: str | Path, split: str, num_workers: int = 0) -> ClassPresence:
    """Which classes every image of ``dataset`` holds, from the cache when it is still valid.

    ``root`` is the dataset folder (``data.root``) and ``split`` the split's directory name; see
    the module docstring for the cache location and its invalidation key.
    """
    root = Path(root)
    fingerprint = _fingerprint(dataset, root)
    shape = (len(dataset), dataset.num_classes)
    beside, fallback = presence_cache_paths(root, split)
    for path in (beside, fallback):
        matrix = _read_cache(path, fingerprint, shape)
        if matrix is not None:
            return ClassPresence(matrix, path, reused=True)
    reader = _MaskClasses([mask for _, mask in dataset.samples], dataset.label_lut, dataset.num_classes)
    loader = torch.utils.data.DataLoader(reader, batch_size=32, num_workers=num_workers)
    matrix = torch.cat(list(loader)).numpy() if len(reader) else np.zeros(shape, dtype=bool)  # [N, K]
    for path in (beside, fallback):
        try:
            _write_cache(path, fingerprint, matrix)
            return ClassPresence(matrix, path, reused=False)
        except OSError:
            continue
    return ClassPresence(matrix, fallback, reused=False)  # nowhere writable: computed, not cached


# --------------------------------------------------------------------------- task data views


class TaskDataset(SegDataset):
    """Some images of a dataset with a second label mapping (global ids -> task labels) after its own."""

    def __init__(self, base: SegDataset, indices, task_lut: np.ndarray, name: str,
                 mean_classes: tuple[int, ...] | None = None):
        super().__init__([base.samples[i] for i in indices], base.classes, base.palette, base.label_lut,
                         base.transform, name)
        self.task_lut = np.asarray(task_lut, dtype=np.uint8)  # [256]
        self.mean_classes = mean_classes  # the classes an evaluation averages over (None = all)

    def read(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        image, label = super().read(index)  # validated global ids
        return image, self.task_lut[label]

    def subset(self, indices) -> "TaskDataset":
        return TaskDataset(self, indices, self.task_lut, self.name, self.mean_classes)


def task_images(presence: np.ndarray, tasks: Tasks, task: int,
                setting: Literal["overlapped", "disjoint"] = "overlapped") -> np.ndarray:
    """Indices of the training images of ``task`` (1-based) under ``setting`` (module docstring)."""
    current = list(tasks[task - 1])
    future = [c for later in tasks[task:] for c in later]
    keep = presence[:, current].any(axis=1)  # [N]
    if setting == "disjoint" and future:
        keep &= ~presence[:, future].any(axis=1)
    return np.flatnonzero(keep)


def train_label_map(tasks: Tasks, task: int, background: Literal["negative", "ignore"] = "negative") -> np.ndarray:
    """``[256]`` uint8: task ``task``'s classes kept, other classes -> 254 (or 255), the rest as is."""
    lut = np.arange(256, dtype=np.uint8)
    others = [c for j, classes in enumerate(tasks) if j != task - 1 for c in classes]
    lut[others] = BACKGROUND if background == "negative" else IGNORE
    return lut


def seen_classes(tasks: Tasks, task: int) -> tuple[int, ...]:
    """The class ids learnt by the end of step ``task``: tasks 1..task."""
    return tuple(c for classes in tasks[:task] for c in classes)


def task_train_dataset(dataset: SegDataset, presence: np.ndarray, tasks: Tasks, task: int,
                       setting: Literal["overlapped", "disjoint"] = "overlapped",
                       background: Literal["negative", "ignore"] = "negative") -> TaskDataset:
    """The training data of one step: its images, its classes, old and future classes as background."""
    indices = task_images(presence, tasks, task, setting)
    return TaskDataset(dataset, indices, train_label_map(tasks, task, background), f"{dataset.name}:task{task}")


def task_eval_dataset(dataset: SegDataset, tasks: Tasks, task: int) -> TaskDataset:
    """Every validation image with its full labels; only the classes learnt by step ``task`` enter
    the means (pixels of later classes still count against whatever the model predicts there)."""
    return TaskDataset(dataset, range(len(dataset)), np.arange(256, dtype=np.uint8), f"{dataset.name}:seen{task}",
                       mean_classes=seen_classes(tasks, task))


def cl_eval_dataset(meta: dict, dataset: SegDataset) -> SegDataset:
    """The dataset to evaluate a checkpoint on: the step-t view for a cl-step checkpoint, else unchanged."""
    info = meta.get("cl")
    if not info:
        return dataset
    tasks = tuple(tuple(t) for t in info["tasks"])
    return task_eval_dataset(dataset, tasks, int(info["task"]))


# --------------------------------------------------------------------------- one step


@dataclass
class CLStepResult:
    task: int
    num_tasks: int
    classes: tuple[int, ...]  # class ids learnt in this step
    work_dir: Path  # DIR/task{N}
    checkpoint: Path  # DIR/task{N}/last.pt
    num_images: int  # training images of this task
    presence_cache: Path
    metrics: dict  # the step-end evaluation (classes of later tasks ignored)
    iterations: int


def _load(recipe: Recipe | str | Path, overrides) -> Recipe:
    if isinstance(recipe, Recipe):
        return recipe_from_dict(apply_overrides(recipe.to_dict(), list(overrides)), "recipe") if overrides else recipe
    return load_recipe(recipe, overrides)


def find_previous_step(task: int, work_dir: str | Path | None = None, runs: str | Path = "runs") -> tuple[Recipe, Path]:
    """The recipe and work dir to continue with ``--task N`` when no recipe is given.

    Decision: the recipe of a continual run is stored in every step checkpoint (``meta.cl.recipe``),
    so ``segcli cl-step --task N`` needs no recipe: it continues ``DIR/task{N-1}/last.pt``, where
    DIR is ``--work-dir`` or, without it, the one folder under ``runs/`` that holds such a step.
    Several candidates are an error that names them.
    """
    from .engine.checkpoint import read_checkpoint

    if task < 2:
        raise SegcliError("task 1 starts a continual run and needs its recipe", "--task",
                          "run `segcli cl-step RECIPE --task 1`")
    if work_dir is not None:
        candidates = [Path(work_dir)]
    else:
        candidates = sorted(p.parent.parent for p in Path(runs).glob(f"*/task{task - 1}/last.pt"))
        if not candidates:
            raise SegcliError(f"no continual run under {runs}/ has a task{task - 1}/last.pt", "--task",
                              f"give the recipe (`segcli cl-step RECIPE --task {task}`) or --work-dir")
        if len(candidates) > 1:
            raise SegcliError(f"several continual runs could continue: {', '.join(map(str, candidates))}",
                              "--work-dir", "pick one with --work-dir DIR (or give the recipe)")
    previous = candidates[0] / f"task{task - 1}" / "last.pt"
    if not previous.is_file():
        raise SegcliError(f"missing {previous}", str(candidates[0]), f"train task {task - 1} first")
    info = (read_checkpoint(previous).get("meta") or {}).get("cl") or {}
    if "recipe" not in info:
        raise SegcliError("this checkpoint does not record its continual-learning recipe", str(previous),
                          f"give the recipe: `segcli cl-step RECIPE --task {task}`")
    return recipe_from_dict(info["recipe"], str(previous)), candidates[0]


def _check_cl_recipe(recipe: Recipe):
    if recipe.cl is None:
        raise SegcliError("the recipe has no cl: section", "cl", "add e.g. cl: {protocol: 100-50, setting: overlapped}")
    if recipe.model.type != "continual":
        raise SegcliError(f"continual learning needs model.type 'continual', not '{recipe.model.type}'",
                          "model.type", "set model.type: continual (see recipes/tiny/cl.yaml)")
    return recipe.cl


def step_recipe(recipe: Recipe, tasks: Tasks, task: int) -> Recipe:
    """The recipe that trains step ``task``: the heads of tasks 1..task, and for task > 1 no
    pretrained file, no ``init_from`` and the incremental iteration budget."""
    from .api import without_pretrained

    options = {**recipe.model.options, "task_classes": [len(classes) for classes in tasks[:task]]}
    recipe = recipe.replace(model=replace(recipe.model, options=options))
    if task == 1:
        return recipe
    train = replace(recipe.train, init_from=None, max_iters=recipe.cl.step_iters or recipe.train.max_iters)
    return without_pretrained(recipe).replace(train=train)


def _previous_state(path: Path, tasks: Tasks, task: int, model: torch.nn.Module) -> dict:
    """The weights of step ``task - 1`` from ``path``, checked against the protocol and the model."""
    from .engine.checkpoint import read_checkpoint

    if not path.is_file():
        raise SegcliError(f"task {task} continues from task {task - 1}, whose checkpoint is missing", str(path),
                          f"run `segcli cl-step RECIPE --task {task - 1}` first, with the same --work-dir")
    payload = read_checkpoint(path)
    info = payload["meta"].get("cl")
    if not info:
        raise SegcliError("not the checkpoint of a continual-learning step (no cl metadata)", str(path),
                          f"train task {task - 1} with `segcli cl-step RECIPE --task {task - 1}`")
    if int(info["task"]) != task - 1:
        raise SegcliError(f"this is the checkpoint of task {info['task']}, but task {task} continues from task "
                          f"{task - 1}", str(path), f"expected DIR/task{task - 1}/last.pt of the same run")
    learnt = tuple(tuple(t) for t in info["tasks"][: task - 1])
    if learnt != tasks[: task - 1]:
        raise SegcliError(f"this checkpoint learnt protocol {info['protocol']} (its first {task - 1} tasks differ "
                          "from this recipe's)", str(path),
                          "use the same cl.protocol and dataset for every task, or another --work-dir")
    own = model.state_dict()
    new_head = f"heads.{task - 1}."
    expected = {k for k in own if not k.startswith(new_head)}
    state = payload["model"]
    missing = sorted(expected - set(state))
    unexpected = sorted(set(state) - expected)
    shapes = sorted(k for k in expected & set(state) if own[k].shape != state[k].shape)
    if missing or unexpected or shapes:
        found = [f"{what} {', '.join(keys[:2])}" for what, keys in
                 (("missing", missing), ("unexpected", unexpected), ("shapes differ in", shapes)) if keys]
        raise SegcliError("checkpoint does not fit the model of this step: " + "; ".join(found), str(path),
                          "train every task with the same model section (backbone and decode head)")
    return {k: state[k] for k in expected}


def _checkpoint_key(path: Path) -> dict:
    stat = path.stat()
    return {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def _per_class_iou(metrics: dict) -> list[float | None]:
    return [row["IoU"] for row in metrics["per_class"]]


def _per_class_acc(metrics: dict) -> list[float | None]:
    return [row["Acc"] for row in metrics["per_class"]]


def _write_step_file(task_dir: Path, task: int, metrics: dict) -> None:
    record = {"task": task, "checkpoint": _checkpoint_key(task_dir / "last.pt"), "mIoU": metrics["mIoU"],
              "per_class_iou": _per_class_iou(metrics), "per_class_acc": _per_class_acc(metrics),
              "eval_version": EVAL_VERSION}
    (task_dir / STEP_FILE).write_text(json.dumps(record, indent=1))


def cl_step(recipe: Recipe | str | Path | None, task: int, work_dir: str | Path | None = None, overrides=(),
            device: str | None = None, resume: bool = False,
            callback: Callable[[str, dict], None] | None = None) -> CLStepResult:
    """Train step ``task`` (1-based) of the recipe's protocol into ``DIR/task{task}/`` (thesis 4.2.3).

    Task 1 trains the base model. Task N > 1 loads ``DIR/task{N-1}/last.pt``, adds a head (class
    queries, ATM, class FC) for the task's classes, freezes everything else and trains it.
    ``DIR`` defaults to ``runs/<recipe name>``; with ``recipe=None`` the run to continue is found by
    :func:`find_previous_step`. Events reach ``callback`` as in :func:`segcli.api.train`.
    """
    from . import api
    from .data.synthetic import DEFAULT_ROOT
    from .engine.distributed import barrier, cleanup, init_distributed
    from .engine.evaluate import evaluate_model
    from .engine.trainer import run_training
    from .recipe import dump_recipe

    if recipe is None:  # continue the run found in work_dir or runs/ (find_previous_step)
        recipe, work_dir = find_previous_step(task, work_dir)
    recipe = _load(recipe, overrides)
    cl = _check_cl_recipe(recipe)
    root = Path(work_dir or Path("runs") / recipe.name)
    dev = api.pick_device(device)
    dist_info = init_distributed(dev)
    try:
        train_set, val_set = api.build_datasets(recipe)
        tasks = parse_protocol(cl.protocol, train_set.num_classes)
        if not 1 <= task <= len(tasks):
            raise SegcliError(f"task {task} does not exist: protocol {cl.protocol} on {train_set.num_classes} "
                              f"classes has tasks 1..{len(tasks)}", "--task")
        data_root = recipe.data.root or DEFAULT_ROOT
        split = recipe.data.train_split
        if dist_info.is_main:
            presence = class_presence(train_set, data_root, split, recipe.data.num_workers)
        barrier(dist_info)
        if not dist_info.is_main:
            presence = class_presence(train_set, data_root, split, 0)
        background = getattr(cl, "background", "negative")  # until CLConfig has the field
        train_view = task_train_dataset(train_set, presence.matrix, tasks, task, cl.setting, background)
        if len(train_view) == 0:
            raise SegcliError(f"no training image holds a class of task {task} ({cl.setting} setting)", "cl.protocol",
                              "check the protocol and the dataset's labels")
        val_view = task_eval_dataset(val_set, tasks, task)

        step = step_recipe(recipe, tasks, task)
        torch.manual_seed(step.train.seed)
        model = api.build_model(step, num_classes=train_set.num_classes)
        task_dir = root / f"task{task}"
        previous = root / f"task{task - 1}" / "last.pt"
        if task > 1 and not resume:
            model.load_state_dict(_previous_state(previous, tasks, task, model), strict=False)
        meta = {**api.dataset_meta(train_set),
                "cl": {"protocol": cl.protocol, "setting": cl.setting, "task": task,
                       "tasks": [list(t) for t in tasks], "previous": str(previous) if task > 1 else None,
                       "recipe": recipe.to_dict()}}  # the run's recipe: later steps need no recipe argument
        if dist_info.is_main:
            task_dir.mkdir(parents=True, exist_ok=True)
            (task_dir / "recipe.yaml").write_text(dump_recipe(step))
        result = run_training(step, model, train_view, val_view, task_dir, meta, dev, dist_info,
                              resume=resume, callback=callback)
        metrics = result.metrics or evaluate_model(model, val_view, step, dev, dist_info)
        if dist_info.is_main:
            _write_step_file(task_dir, task, metrics)
        return CLStepResult(task, len(tasks), tasks[task - 1], task_dir, result.last, len(train_view),
                            presence.path, metrics, result.iterations)
    finally:
        cleanup(dist_info)


# --------------------------------------------------------------------------- metrics


def _miou(iou: list[float | None], classes) -> float | None:
    values = [iou[c] for c in classes if iou[c] is not None and not math.isnan(iou[c])]
    return sum(values) / len(values) if values else None


def _step_scores(root: Path, tasks: Tasks, step: int, device, progress) -> tuple[list | None, list | None, str]:
    """Per-class IoU and Acc of step ``step``'s checkpoint: from its ``cl_step.json`` while that
    still describes ``last.pt``, else evaluated now (and cached). ``(None, None, reason)`` when missing."""
    from . import api
    from .engine.evaluate import evaluate_model

    task_dir = root / f"task{step}"
    checkpoint = task_dir / "last.pt"
    if not checkpoint.is_file():
        return None, None, f"missing {checkpoint}"
    try:
        record = json.loads((task_dir / STEP_FILE).read_text())
        if (record["checkpoint"] == _checkpoint_key(checkpoint) and record["task"] == step
                and record.get("eval_version") == EVAL_VERSION):
            return record["per_class_iou"], record["per_class_acc"], STEP_FILE
    except (OSError, ValueError, KeyError):
        pass
    loaded = api.load_checkpoint(checkpoint, device=device)
    info = loaded.meta.get("cl") or {}
    if tuple(tuple(t) for t in info.get("tasks", ())) != tasks or int(info.get("task", -1)) != step:
        return None, None, f"{checkpoint} is not step {step} of this protocol"
    (val_set,) = api.build_datasets(loaded.recipe, splits=("val",))
    metrics = evaluate_model(loaded.model, task_eval_dataset(val_set, tasks, step), loaded.recipe, device,
                             progress=progress)
    try:
        _write_step_file(task_dir, step, metrics)
    except OSError:
        pass
    return _per_class_iou(metrics), _per_class_acc(metrics), "evaluated"


def cl_metrics(checkpoint: str | Path, metrics: dict, meta: dict | None = None, device=None,
               progress: Callable[[int, int], None] | None = None) -> dict:
    """The ``cl`` block of ``segcli eval --json`` for a cl-step checkpoint (thesis tables 4.11, 4.12).

    ``metrics`` is the evaluation of ``checkpoint`` itself (per-class IoU, percent; evaluate on
    :func:`cl_eval_dataset`), ``meta`` its metadata (read from the file when omitted). Earlier
    steps come from ``DIR/task{j}/last.pt`` next to ``DIR/task{t}/``: their ``cl_step.json``, or an
    evaluation on the spot. Without them ``avg_mIoU`` and the forgetting table are ``None``.
    """
    from .engine.checkpoint import read_checkpoint

    checkpoint = Path(checkpoint)
    meta = meta if meta is not None else read_checkpoint(checkpoint)["meta"]
    info = meta.get("cl")
    if not info:
        raise SegcliError("not the checkpoint of a continual-learning step", str(checkpoint),
                          "cl metrics need a checkpoint written by `segcli cl-step`")
    tasks = tuple(tuple(t) for t in info["tasks"])
    current = int(info["task"])
    device = torch.device(device) if device is not None else torch.device("cpu")
    root = checkpoint.parent.parent if checkpoint.parent.name == f"task{current}" else None

    steps, ious = [], {}
    for step in range(1, current + 1):
        if step == current:
            iou, acc, source = _per_class_iou(metrics), _per_class_acc(metrics), "this evaluation"
        elif root is None:
            iou, acc, source = None, None, f"{checkpoint} is not in a DIR/task{current}/ folder"
        else:
            iou, acc, source = _step_scores(root, tasks, step, device, progress)
        ious[step] = iou
        seen = seen_classes(tasks, step)
        new = seen[len(tasks[0]):]  # tasks 2..step
        steps.append({"task": step, "source": source,
                      "base_mIoU": _miou(iou, tasks[0]) if iou else None,
                      "new_mIoU": _miou(iou, new) if iou and new else None,
                      "all_mIoU": _miou(iou, seen) if iou else None,
                      "base_mAcc": _miou(acc, tasks[0]) if acc else None})

    forgetting = []
    for step in range(1, current + 1):
        first, last = ious[step], ious[current]
        row = {"task": step, "classes": [tasks[step - 1][0], tasks[step - 1][-1]],
               "first": _miou(first, tasks[step - 1]) if first else None, "last": _miou(last, tasks[step - 1])}
        row["forgetting"] = None if row["first"] is None or row["last"] is None else row["first"] - row["last"]
        forgetting.append(row)
    drops = [row["forgetting"] for row in forgetting[1:]]
    all_steps = [s["all_mIoU"] for s in steps]
    here = steps[-1]
    return {
        "protocol": info["protocol"], "setting": info["setting"], "task": current, "num_tasks": len(tasks),
        "base_mIoU": here["base_mIoU"], "new_mIoU": here["new_mIoU"], "all_mIoU": here["all_mIoU"],
        "base_mAcc": here["base_mAcc"],
        "avg_mIoU": None if None in all_steps else sum(all_steps) / len(all_steps),
        "steps": steps,
        "forgetting": forgetting,
        "avg_forgetting": None if not drops or None in drops else sum(drops) / len(drops),
    }
