"""How a run differs from the published experiment its recipe names (``published:``).

The commonest reason a run misses its published number is a silent difference: fewer GPUs and so
a smaller global batch, a forgotten pretrained file, a ``--set``, another precision. A recipe
that reproduces a number names the experiment (:class:`~segcli.recipe.PublishedConfig`);
:func:`compare_to_published` lists each way a run of it differs, one line each, and ``segcli
train`` and ``segcli recipe show`` show them. The comparison reads the recipe (and whether the
pretrained file exists) and nothing else: it never changes a run.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..download import is_url
from ..engine.trainer import amp_dtype
from ..recipe import PublishedConfig, Recipe, dump_recipe, load_recipe

# ``--set`` keys that do not change what is trained or measured (where the data lives, how often
# the run logs, evaluates or saves): not differences from the experiment.
BOOKKEEPING_KEYS = frozenset({
    "data.root", "data.num_workers", "train.log_interval", "train.eval_interval", "train.checkpoint_interval",
    "train.keep_checkpoints", "train.tensorboard"})
# ``--set`` keys that a line of their own judges against the published values (global and per-GPU
# batch, precision, pretrained weights): an override of them is a difference only if that line says so.
JUDGED_KEYS = frozenset({"data.batch_size", "train.accum_steps", "train.amp", "model.backbone.pretrained"})

_WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin", ".npz", ".ckpt", ".pkl", ".tar")
_DOWNLOAD_HASH = re.compile(r"-[0-9a-f]{6,}$")  # torch.hub file names end in -<sha256 prefix>


@dataclass(frozen=True)
class ExperimentCheck:
    """The published experiment of a recipe (or None) and each way a run of it differs."""

    published: PublishedConfig | None
    differences: tuple[str, ...] = ()
    world_size: int = 1
    device: str = "cuda"

    @property
    def matches(self) -> bool:
        return self.published is not None and not self.differences

    def summary(self) -> str:
        """One line naming the experiment: its numbers, where they are printed, and how it was run."""
        pub = self.published
        if pub is None:
            return "this recipe names no published experiment"
        numbers = ", ".join(f"{name} {value:g}" for name, value in pub.numbers.items())
        config = pub.official_config or "no official config"
        weights = pub.pretrained or "no pretrained weights"
        return (f"{pub.source}: {numbers} ({config}; global batch {pub.global_batch} = {_gpus(pub.gpus)} x "
                f"{pub.batch_per_gpu}, {pub.precision}, from {weights})")

    def to_event(self) -> dict:
        """The ``"experiment"`` event of ``segcli train`` and its record in ``metrics.jsonl``."""
        pub = self.published
        return {"event": "experiment", "published": self.summary() if pub else None, "matches": self.matches,
                "differences": list(self.differences), "world_size": self.world_size, "device": self.device,
                "numbers": dict(pub.numbers) if pub else None, "source": pub.source if pub else None,
                "official_config": pub.official_config if pub else None}


def weights_name(ref: str) -> str:
    """The comparable name of a weights reference: the model name of ``timm:NAME``, else the file name
    of a path or URL without its extension and without a torch.hub download hash (``-d4efb41d``), so
    that a local copy of a released file, in any folder and format, matches the name it was released
    under."""
    if ref.startswith("timm:"):
        return ref[len("timm:"):]
    name = ref.split("?", 1)[0].split("#", 1)[0].rstrip("/").rsplit("/", 1)[-1]
    for suffix in _WEIGHT_SUFFIXES:
        if name.endswith(suffix):
            name = name[: -len(suffix)]
            break
    return _DOWNLOAD_HASH.sub("", name)


def _gpus(count: int) -> str:
    return f"{count} GPU" + ("s" if count > 1 else "")


def _precision(amp: str, device: str) -> str:
    dtype = amp_dtype(amp, torch.device(device))
    return {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]


def _batch_lines(recipe: Recipe, pub: PublishedConfig, world_size: int) -> list[str]:
    batch, accum = recipe.data.batch_size, recipe.train.accum_steps
    gpus = _gpus(world_size)
    lines = []
    if batch != pub.global_batch:
        lines.append(f"global batch {batch} (data.batch_size) instead of {pub.global_batch} "
                     f"({_gpus(pub.gpus)} x {pub.batch_per_gpu})")
    if batch % (world_size * accum):
        lines.append(f"per-GPU batch: data.batch_size {batch} does not split over {gpus} x train.accum_steps "
                     f"{accum}; train refuses it")
        return lines
    micro = batch // (world_size * accum)
    if micro != pub.batch_per_gpu:
        line = f"per-GPU batch {micro}"
        if accum > 1:
            line += f" x {accum} accumulated micro-batches (train.accum_steps)"
        line += f" on each of {gpus} instead of {pub.batch_per_gpu} on each of {pub.gpus}"
        if accum > 1:
            line += f": the optimizer step still sees the global batch of {batch}"
        if batch == pub.global_batch and micro > pub.batch_per_gpu and batch % (world_size * pub.batch_per_gpu) == 0:
            line += (f"; --set train.accum_steps={batch // (world_size * pub.batch_per_gpu)} keeps the global batch "
                     f"with {pub.batch_per_gpu} per GPU")
        lines.append(line)
    elif accum > 1:
        lines.append(f"per-GPU batch {micro} as published, but {accum} accumulated micro-batches "
                     f"(train.accum_steps) on each of {gpus} stand in for {pub.gpus} GPUs: the optimizer step sees "
                     f"the same {batch} samples; BatchNorm statistics cover {micro * world_size} images, not "
                     f"{pub.global_batch}")
    return lines


def _pretrained_lines(recipe: Recipe, pub: PublishedConfig) -> list[str]:
    run = getattr(recipe.model.backbone.cfg, "pretrained", None)
    if pub.pretrained is None:
        return [f"the published run trained the backbone from scratch; this run starts from {run} "
                "(model.backbone.pretrained)"] if run else []
    if not run:
        return [f"pretrained weights missing: model.backbone.pretrained is null; the published run started "
                f"from {pub.pretrained}"]
    if weights_name(run) != weights_name(pub.pretrained):
        return [f"pretrained weights {run} (model.backbone.pretrained) are not the published ones: "
                f"{pub.pretrained}"]
    if not (run.startswith("timm:") or is_url(run)) and not Path(run).expanduser().is_file():  # names: fetched by train
        return [f"pretrained weights missing: {run} (model.backbone.pretrained) does not exist; the published "
                f"run started from {pub.pretrained}"]
    return []


def _override_lines(overrides) -> list[str]:
    lines = []
    for item in overrides:
        key = item.split("=", 1)[0].strip()
        if key in BOOKKEEPING_KEYS or key in JUDGED_KEYS:
            continue
        lines.append(f"override --set {item}")
    return lines


def compare_to_published(recipe: Recipe, overrides=(), world_size: int = 1, device: str = "cuda") -> ExperimentCheck:
    """Each way a run of ``recipe`` on ``world_size`` processes of ``device`` (``cuda``, ``cpu``, ...)
    differs from ``recipe.published``, one line each, in this order:

    * global batch: ``data.batch_size`` against ``gpus * batch_per_gpu``;
    * per-GPU batch: ``data.batch_size / world_size / train.accum_steps`` against ``batch_per_gpu``
      (accumulation keeps the global batch, so a run on fewer GPUs can match it; the line says so);
    * pretrained weights: ``model.backbone.pretrained`` null, not the named file (:func:`weights_name`),
      or a file that does not exist;
    * overrides: each ``--set KEY=VALUE`` except :data:`BOOKKEEPING_KEYS` (where the data lives, how
      often the run logs, evaluates or saves) and :data:`JUDGED_KEYS` (judged by the lines above);
    * precision: ``train.amp`` as resolved on ``device`` (``auto`` is bf16 on CUDA, fp32 on CPU)
      against ``published.precision``.

    A recipe without ``published:`` gives no lines (it claims no number).
    """
    pub = recipe.published
    if pub is None:
        return ExperimentCheck(None, (), world_size, str(device))
    lines = _batch_lines(recipe, pub, world_size) + _pretrained_lines(recipe, pub) + _override_lines(overrides)
    precision = _precision(recipe.train.amp, str(device))
    if precision != pub.precision:
        lines.append(f"precision {precision} (train.amp {recipe.train.amp} on {torch.device(device).type}) "
                     f"instead of {pub.precision}")
    return ExperimentCheck(pub, tuple(lines), world_size, str(device))


@dataclass(frozen=True)
class RecipeShow:
    """``segcli recipe show``: the resolved recipe and how a run of it differs from its experiment."""

    yaml: str
    check: ExperimentCheck
    assumed: list[str] = field(default_factory=list)  # what the comparison assumed (world size, device)


def show_recipe(path: str | Path, overrides=(), gpus: int | None = None, device: str = "cuda") -> RecipeShow:
    """The resolved recipe as ``segcli train`` writes it (``recipe.yaml``), and its differences from
    the published experiment for a run on ``gpus`` processes (1 when not given) of ``device``."""
    recipe = load_recipe(path, list(overrides))
    assumed = [_gpus(gpus or 1) + ("" if gpus else " (--gpus N for more)"),
               f"{torch.device(device).type}"]
    check = compare_to_published(recipe, overrides, world_size=gpus or 1, device=device)
    return RecipeShow(dump_recipe(recipe), check, assumed)
