"""Training a recipe into a work dir (``segcli train``), and the run set-up that ``cl-step`` shares.

:func:`distributed_run` picks the device and joins the torchrun process group (if any) for the
length of a run; :func:`start_run` checks the work dir (an earlier run is never replaced unasked), the
resume checkpoint and the validation masks, then writes the run's ``recipe.yaml`` (rank 0) and
hands over to the engine's training loop. ``train`` and each continual-learning step are those two calls around
their own choice of data and model.
"""
from __future__ import annotations

import dataclasses
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import torch
import yaml

from ..build import as_recipe, build_datasets, build_model, dataset_meta, pick_device
from ..data.loader import micro_batch_size
from ..engine.checkpoint import load_model_state, read_checkpoint
from ..engine.distributed import DistInfo, barrier, cleanup, init_distributed
from ..engine.hooks import snapshot_paths
from ..engine.trainer import Callback, TrainResult, run_training
from ..errors import SegcliError
from ..models.backbones.weights import resolve_weights
from ..recipe import Recipe, dump_recipe, recipe_from_dict
from .experiment import BOOKKEEPING_KEYS, ExperimentCheck, compare_to_published
from .tensorboard import INSTALL_HINT, TensorBoardLogger, tensorboard_available, with_tensorboard


@contextmanager
def distributed_run(device: str | None) -> Iterator[tuple[torch.device, DistInfo]]:
    """(device, process-group info) for one run; the group is left on exit, also on errors."""
    dev = pick_device(device)
    dist_info = init_distributed(dev)
    try:
        yield dev, dist_info
    finally:
        cleanup(dist_info)


# what a run writes that a new run would replace (train.log: the CLI's text log of the run)
RUN_FILES = ("last.pt", "best.pt", "metrics.jsonl", "train.log")

RESUME_MISMATCH_HINT = ("resume with the recipe and --set options of that run (its recipe.yaml), "
                        "or train into another --work-dir")


def earlier_run_files(work_dir: Path) -> list[Path]:
    """The files of an earlier run in ``work_dir`` (checkpoints, metrics), which a new run would replace."""
    return [work_dir / name for name in RUN_FILES if (work_dir / name).exists()] + snapshot_paths(work_dir)


def resume_payload(work_dir: Path, model) -> dict:
    """``work_dir/last.pt``, read and checked against ``model`` (loaded into it): resuming fails here,
    before the run writes anything, if there is nothing to resume or it is another model's."""
    last = work_dir / "last.pt"
    if not last.is_file():
        raise SegcliError("nothing to resume: no last.pt", str(work_dir), "drop --resume to start a new run")
    payload = read_checkpoint(last)
    if not all(key in payload for key in ("optimizer", "scaler", "iteration", "rng")):
        raise SegcliError("not a resumable checkpoint (no optimizer state)", str(last),
                          "only last.pt and iter_N.pt written by segcli train resume; drop --resume to start anew")
    load_model_state(model, payload["model"], str(last), hint=RESUME_MISMATCH_HINT)
    return payload


# What may change when a run is resumed: its length and the bookkeeping that does not change the
# experiment (experiment.py's list), except where the data lives: a resumed run keeps its data.
RESUMABLE_CHANGES = tuple(sorted((BOOKKEEPING_KEYS - {"data.root"}) | {"train.max_iters"}))


def _flat(tree, prefix: str = "") -> dict:
    if not isinstance(tree, dict):
        return {prefix: tree}
    out = {}
    for key, value in tree.items():
        out.update(_flat(value, f"{prefix}.{key}" if prefix else str(key)))
    return out


def resumed_recipe(given: Recipe, work_dir: Path) -> Recipe:
    """The recipe a resumed run continues with: the run's own ``recipe.yaml``, with the changes of
    ``given`` (the command line's recipe and ``--set``) that :data:`RESUMABLE_CHANGES` allows.

    Decision: the saved recipe wins, and a ``given`` that differs from it anywhere else is refused,
    naming the keys, rather than ignored: a user who resumes with another dataset or learning rate
    means something the run cannot do, and should hear so.
    """
    saved_path = work_dir / "recipe.yaml"
    if not (work_dir / "last.pt").is_file():
        raise SegcliError("nothing to resume: no last.pt", str(work_dir), "drop --resume to start a new run")
    if not saved_path.is_file():
        raise SegcliError("no recipe.yaml: not a run written by segcli train", str(work_dir),
                          "drop --resume to start a new run")
    try:
        raw = yaml.safe_load(saved_path.read_text())
    except yaml.YAMLError as err:
        raise SegcliError(f"invalid YAML ({err.__class__.__name__})", str(saved_path)) from None
    saved = recipe_from_dict(raw or {}, where=str(saved_path), name=given.name)
    theirs, ours = _flat(saved.to_dict()), _flat(given.to_dict())
    changed = sorted(key for key in theirs.keys() | ours.keys()
                     if theirs.get(key) != ours.get(key) and key != "name" and not key.startswith("published."))
    refused = [key for key in changed if key not in RESUMABLE_CHANGES]
    if refused:
        shown = ", ".join(f"{key} ({theirs.get(key)!r} -> {ours.get(key)!r})" for key in refused[:6])
        more = f" and {len(refused) - 6} more" if len(refused) > 6 else ""
        raise SegcliError(f"--resume continues the run of {saved_path}, but the recipe given differs at {shown}{more}",
                          str(work_dir), "resume with that run's recipe (only " + ", ".join(RESUMABLE_CHANGES)
                          + " may change), or train into another --work-dir")
    fields: dict[str, dict] = {}  # every resumable key is a field of a section: {"train": {"max_iters": ...}}
    for key in changed:
        section, name = key.split(".", 1)
        fields.setdefault(section, {})[name] = getattr(getattr(given, section), name)
    return saved.replace(**{section: dataclasses.replace(getattr(saved, section), **values)
                            for section, values in fields.items()})


def check_val_masks(val_set) -> None:
    """Read every validation mask once (images only by their header) so that a bad one stops the
    run before the first iteration, not at the first evaluation."""
    for index in range(len(val_set)):
        val_set.check_mask(index)


def run_banner(recipe: Recipe, model, train_set, val_set, work_dir: Path, device: torch.device,
               start_iter: int) -> dict:
    """The ``"start"`` event: what is about to be trained, on what, where (the CLI prints it at once)."""
    backbone = recipe.model.backbone
    backbone_name = getattr(backbone.cfg, "name", None)
    return {"recipe": recipe.name, "model": f"{recipe.model.type}: {backbone.type}"
            + (f" ({backbone_name})" if backbone_name else "") + f" + {recipe.model.decode_head.type}",
            "params_m": sum(p.numel() for p in model.parameters()) / 1e6, "dataset": recipe.data.type,
            "data_root": recipe.data.root, "train_images": len(train_set), "val_images": len(val_set),
            "max_iters": recipe.train.max_iters, "log_interval": recipe.train.log_interval,
            "start_iter": start_iter, "device": str(device),
            "work_dir": str(work_dir)}


def start_run(recipe: Recipe, model, train_set, val_set, work_dir: Path, meta: dict, device: torch.device,
              dist_info: DistInfo, resume: bool, callback: Callback | None, overwrite: bool = False,
              experiment: ExperimentCheck | None = None) -> TrainResult:
    """Check everything, then write ``work_dir/recipe.yaml`` (rank 0) and run the training loop.

    Nothing is written before every check has passed: an earlier run in ``work_dir`` is refused
    unless ``resume`` (continue it) or ``overwrite`` (its files are deleted first); ``resume``
    needs a ``last.pt`` that fits ``model``; the global batch must split over the processes and
    accumulation steps; every validation mask is read once. Events: ``"start"``
    (:func:`run_banner`), ``"experiment"`` (:meth:`ExperimentCheck.to_event`, when ``experiment``
    names a published one; also recorded in ``metrics.jsonl``), ``"warning"`` (``{"message"}``),
    then the trainer's.
    """
    callback = callback or (lambda event, info: None)
    work_dir = Path(work_dir)
    state = None
    if resume:
        state = resume_payload(work_dir, model)
    else:
        earlier = earlier_run_files(work_dir)
        if earlier and not overwrite:
            raise SegcliError(f"holds an earlier run ({', '.join(p.name for p in earlier)})", str(work_dir),
                              "continue it with --resume, train into another --work-dir, or pass --overwrite "
                              "to replace it")
    micro_batch_size(recipe.data.batch_size, dist_info.world_size, recipe.train.accum_steps)
    callback("start", run_banner(recipe, model, train_set, val_set, work_dir, device,
                                 int(state["iteration"]) if state else 0))
    records = ()
    if experiment is not None and experiment.published is not None:
        callback("experiment", experiment.to_event())
        records = (experiment.to_event(),)
    if recipe.train.warmup_iters > recipe.train.max_iters:
        callback("warning", {"message": f"train.warmup_iters ({recipe.train.warmup_iters}) > train.max_iters "
                                        f"({recipe.train.max_iters}): the learning rate never reaches its peak"})
    check_val_masks(val_set)
    if dist_info.is_main:
        if not resume:
            for path in earlier_run_files(work_dir):  # --overwrite: no file of the old run survives
                path.unlink()
        work_dir.mkdir(parents=True, exist_ok=True)
        (work_dir / "recipe.yaml").write_text(dump_recipe(recipe))
    logger = None
    if dist_info.is_main and recipe.train.tensorboard is not False:
        if tensorboard_available():
            if not resume:  # --overwrite: the old run's curves go with it
                for old in (work_dir / "tensorboard").glob("events.out.tfevents.*"):
                    old.unlink()
            logger = TensorBoardLogger(work_dir / "tensorboard", model, val_set, recipe, device)
            callback = with_tensorboard(callback, logger)
        elif recipe.train.tensorboard:  # asked for by name: say why there are no event files
            callback("warning", {"message": INSTALL_HINT + " (or set train.tensorboard: false)"})
    try:
        return run_training(recipe, model, train_set, val_set, work_dir, meta, device, dist_info,
                            resume=resume, callback=callback, resume_state=state, records=records)
    finally:
        if logger is not None:
            logger.close()


def fetch_pretrained(recipe: Recipe, callback: Callback | None = None) -> None:
    """The backbone's ``timm:`` / URL weights into their cache before the model is built (rank 0,
    once), each transfer reported as a ``"download"`` event (``segcli/download.py`` Transfer fields)."""
    ref = getattr(recipe.model.backbone.cfg, "pretrained", None)
    if ref:
        report = (lambda transfer: callback("download", dataclasses.asdict(transfer))) if callback else None
        resolve_weights(ref, progress=report)


def train(recipe: Recipe | str | Path, work_dir: str | Path | None = None, overrides=(), resume: bool = False,
          device: str | None = None, callback: Callback | None = None, overwrite: bool = False) -> TrainResult:
    """Train a recipe; writes ``last.pt``, ``best.pt``, ``metrics.jsonl`` and ``recipe.yaml`` to ``work_dir``
    (default ``runs/<recipe name>``). A work dir holding an earlier run needs ``resume`` or ``overwrite``
    (:func:`start_run`). Events reach ``callback(event, info)`` (see :func:`start_run` and ``engine/trainer.py``);
    before the first iteration, ``"experiment"`` lists each way this run (its ``overrides``, processes,
    device) differs from the published experiment its recipe names (:func:`compare_to_published`)."""
    if resume and overwrite:
        raise SegcliError("--resume continues the run in the work dir and --overwrite replaces it", "--resume",
                          "choose one of them")
    recipe = as_recipe(recipe, overrides)
    work_dir = Path(work_dir or Path("runs") / recipe.name)
    if resume:
        recipe = resumed_recipe(recipe, work_dir)
    with distributed_run(device) as (dev, dist_info):
        if not dist_info.is_main:  # rank 0 generates/caches data (e.g. the synthetic set) first
            barrier(dist_info)
        train_set, val_set = build_datasets(recipe)
        if dist_info.is_main:
            fetch_pretrained(recipe, callback)
            barrier(dist_info)
        torch.manual_seed(recipe.train.seed)  # the initial weights depend on the seed alone
        model = build_model(recipe, num_classes=train_set.num_classes)
        experiment = compare_to_published(recipe, overrides, dist_info.world_size, str(dev))
        return start_run(recipe, model, train_set, val_set, work_dir, dataset_meta(train_set), dev, dist_info,
                         resume, callback, overwrite=overwrite, experiment=experiment)
