"""Training one continual-learning step (``segcli cl-step``, thesis 4.2.3)."""
from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

import torch

from ...build import as_recipe, build_datasets, build_model, dataset_meta, without_pretrained
from ...data.synthetic import DEFAULT_ROOT
from ...engine.checkpoint import read_checkpoint
from ...engine.distributed import barrier
from ...engine.evaluate import evaluate_model
from ...errors import SegcliError
from ...recipe import Recipe, recipe_from_dict
from ..train import distributed_run, start_run
from .presence import class_presence
from .protocol import Tasks, parse_protocol
from .step_file import write_step_file
from .task_data import task_eval_dataset, task_train_dataset


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

    def to_dict(self) -> dict:
        """The ``cl-step --json`` object."""
        return {"task": self.task, "num_tasks": self.num_tasks, "classes": list(self.classes),
                "work_dir": str(self.work_dir), "checkpoint": str(self.checkpoint), "num_images": self.num_images,
                "iterations": self.iterations, "metrics": self.metrics}


def find_previous_step(task: int, work_dir: str | Path | None = None, runs: str | Path = "runs") -> tuple[Recipe, Path]:
    """The recipe and work dir to continue with ``--task N`` when no recipe is given.

    Decision: the recipe of a continual run is stored in every step checkpoint (``meta.cl.recipe``),
    so ``segcli cl-step --task N`` needs no recipe: it continues ``DIR/task{N-1}/last.pt``, where
    DIR is ``--work-dir`` or, without it, the one folder under ``runs/`` that holds such a step.
    Several candidates are an error that names them.
    """
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
    options = replace(recipe.model.options, task_classes=tuple(len(classes) for classes in tasks[:task]))
    recipe = recipe.replace(model=replace(recipe.model, options=options))
    if task == 1:
        return recipe
    train = replace(recipe.train, init_from=None, max_iters=recipe.cl.step_iters or recipe.train.max_iters)
    return without_pretrained(recipe).replace(train=train)


def _previous_state(path: Path, tasks: Tasks, task: int, model: torch.nn.Module) -> dict:
    """The weights of step ``task - 1`` from ``path``, checked against the protocol and the model."""
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


def cl_step(recipe: Recipe | str | Path | None, task: int, work_dir: str | Path | None = None, overrides=(),
            device: str | None = None, resume: bool = False,
            callback: Callable[[str, dict], None] | None = None, overwrite: bool = False) -> CLStepResult:
    """Train step ``task`` (1-based) of the recipe's protocol into ``DIR/task{task}/`` (thesis 4.2.3).

    Task 1 trains the base model. Task N > 1 loads ``DIR/task{N-1}/last.pt``, adds a head (class
    queries, ATM, class FC) for the task's classes, freezes everything else and trains it.
    ``DIR`` defaults to ``runs/<recipe name>``; with ``recipe=None`` the run to continue is found by
    :func:`find_previous_step`. Events reach ``callback`` as in :func:`segcli.workflows.train.train`.
    """
    if recipe is None:  # continue the run found in work_dir or runs/ (find_previous_step)
        recipe, work_dir = find_previous_step(task, work_dir)
    recipe = as_recipe(recipe, overrides)
    cl = _check_cl_recipe(recipe)
    root = Path(work_dir or Path("runs") / recipe.name)
    with distributed_run(device) as (dev, dist_info):
        train_set, val_set = build_datasets(recipe)
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
        train_view = task_train_dataset(train_set, presence.matrix, tasks, task, cl.setting)
        if len(train_view) == 0:
            raise SegcliError(f"no training image holds a class of task {task} ({cl.setting} setting)", "cl.protocol",
                              "check the protocol and the dataset's labels")
        val_view = task_eval_dataset(val_set, tasks, task)

        step = step_recipe(recipe, tasks, task)
        torch.manual_seed(step.train.seed)
        model = build_model(step, num_classes=train_set.num_classes)
        task_dir = root / f"task{task}"
        previous = root / f"task{task - 1}" / "last.pt"
        if task > 1 and not resume:
            model.load_state_dict(_previous_state(previous, tasks, task, model), strict=False)
        meta = {**dataset_meta(train_set),
                "cl": {"protocol": cl.protocol, "setting": cl.setting, "task": task,
                       "tasks": [list(t) for t in tasks], "previous": str(previous) if task > 1 else None,
                       "recipe": recipe.to_dict()}}  # the run's recipe: later steps need no recipe argument
        result = start_run(step, model, train_view, val_view, task_dir, meta, dev, dist_info, resume, callback,
                           overwrite=overwrite)
        metrics = result.metrics or evaluate_model(model, val_view, step, dev, dist_info)
        if dist_info.is_main:
            write_step_file(task_dir, task, metrics)
        return CLStepResult(task, len(tasks), tasks[task - 1], task_dir, result.last, len(train_view),
                            presence.path, metrics, result.iterations)
