"""Recipes: YAML files -> one frozen, typed :class:`Recipe`.

A recipe has four sections (``model``, ``data``, ``train``, ``test``) and optionally ``cl``.
``_base_`` (a path or a list of paths, relative to the recipe file) is merged first, deeper
recipes override. Inheritance is explicit, as MMSegmentation's ``_delete_``: a mapping merges
into the base's key by key, so nothing inherited disappears because a neighbouring key changed
(``data.type`` swapped from one dataset to another keeps the base's root, crop and batch).
``_delete_: true`` in a mapping replaces the base's mapping instead. The one implicit replacement
is a registry component whose ``type`` changes (``model.backbone``, ``model.decode_head``; the
segmentor's ``model.options`` when ``model.type`` changes): its keys are the options of another
config class, which would be rejected as unknown. ``--set a.b.c=value`` overrides are
applied to the merged data (values parsed as YAML) before validation, so they are type-checked
like the file. Unknown keys anywhere are rejected with a "did you mean" hint.
"""
from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml

from .configurable import (AnyFloat, Component, NonNegativeFloat, NonNegativeInt, PositiveFloat, PositiveInt, Range,
                           UnitFloat, component_field, from_dict, options_field, to_dict)
from .errors import SegcliError

IMAGENET_MEAN = (123.675, 116.28, 103.53)
IMAGENET_STD = (58.395, 57.12, 57.375)


@dataclass(frozen=True)
class ModelConfig:
    """``model:`` — a segmentor (``type``) wiring a backbone, a decode head and auxiliary heads.

    ``num_classes`` comes from the dataset unless given. The segmentor is a registered component
    like the backbone and the heads, spelt as two keys so that recipes read ``type: dtop`` and
    ``options: {p0: 0.9}``: ``options`` are typed at load by the dataclass the segmentor registered
    (e.g. :class:`~segcli.models.dtop.DToPOptions`; ``None`` for segmentors without options), and
    :attr:`segmentor` is the pair as a :class:`~segcli.configurable.Component`.
    """

    backbone: Component = component_field("backbone")
    decode_head: Component = component_field("head")
    type: str = "encoder_decoder"
    aux_heads: tuple[Component, ...] = field(default=(), metadata={"registry": "head"})
    num_classes: PositiveInt | None = None
    options: Any = options_field("segmentor", type_key="type")
    sync_bn: bool = True  # BatchNorm -> SyncBatchNorm under DDP

    @property
    def segmentor(self) -> Component:
        """The segmentor: its registry name and its typed options."""
        return Component(self.type, self.options)


@dataclass(frozen=True)
class DataConfig:
    """``data:`` — which dataset, where, and the training augmentation.

    ``scale`` is MMSegmentation's base scale for random resize: the image is rescaled to fit
    ``scale`` (long, short) with its aspect ratio kept, times a ratio drawn from ``ratio_range``.
    """

    type: str = "synthetic"
    root: str | None = None
    classes: tuple[str, ...] | None = None  # override the dataset's class names (folder: classes.txt)
    reduce_zero_label: bool | None = None  # None = the dataset's convention
    crop_size: tuple[PositiveInt, PositiveInt] = (512, 512)  # (H, W)
    scale: tuple[PositiveInt, PositiveInt] | None = None  # (long, short) base scale; None = crop size
    ratio_range: tuple[PositiveFloat, PositiveFloat] = (0.5, 2.0)
    cat_max_ratio: Annotated[float, Range(0, 1, low_open=True)] = 0.75
    flip_prob: UnitFloat = 0.5
    photometric: bool = True
    mean: tuple[AnyFloat, AnyFloat, AnyFloat] = IMAGENET_MEAN
    std: tuple[PositiveFloat, PositiveFloat, PositiveFloat] = IMAGENET_STD
    batch_size: PositiveInt = 8  # global batch (split across DDP processes)
    num_workers: NonNegativeInt = 2
    train_split: str = "train"
    val_split: str = "val"
    # synthetic only
    synthetic_size: Annotated[int, Range(32)] = 128
    synthetic_train: PositiveInt = 96
    synthetic_val: PositiveInt = 24
    synthetic_seed: NonNegativeInt = 0  # another seed gives other scenes (same classes): e.g. a "pretraining" set


@dataclass(frozen=True)
class ParamwiseConfig:
    """``train.optimizer.paramwise:`` — mmcv 1.x ``DefaultOptimizerConstructor`` ``paramwise_cfg``
    (what the official configs write), copied verbatim: ``custom_keys`` match substrings of the
    *official* model's parameter names (``segcli/convert/official_names.py``); see
    :func:`segcli.engine.optim.paramwise_groups` for the rules."""

    custom_keys: dict[str, dict[str, float]] = field(default_factory=dict)  # KEY: {lr_mult, decay_mult}
    norm_decay_mult: NonNegativeFloat | None = None
    bias_lr_mult: NonNegativeFloat | None = None
    bias_decay_mult: NonNegativeFloat | None = None
    dwconv_decay_mult: NonNegativeFloat | None = None
    bypass_duplicate: bool = False

    def __post_init__(self):
        typed = {}
        for key, mults in self.custom_keys.items():
            if not isinstance(mults, dict) or set(mults) - {"lr_mult", "decay_mult"}:
                raise ValueError(f"custom_keys.{key}: expected a mapping of lr_mult / decay_mult, got {mults!r}")
            try:
                typed[str(key)] = {k: float(v) for k, v in mults.items()}
            except (TypeError, ValueError):
                raise ValueError(f"custom_keys.{key}: lr_mult / decay_mult must be numbers, got {mults!r}") from None
        object.__setattr__(self, "custom_keys", typed)


@dataclass(frozen=True)
class OptimizerConfig:
    type: Literal["adamw", "sgd"] = "adamw"
    lr: PositiveFloat = 2e-5
    weight_decay: NonNegativeFloat = 0.01
    momentum: UnitFloat = 0.9
    betas: tuple[Annotated[float, Range(0, 0.9999999)], Annotated[float, Range(0, 0.9999999)]] = (0.9, 0.999)
    head_lr_mult: NonNegativeFloat = 10.0  # lr multiplier for everything but the backbone
    layer_decay: Annotated[float, Range(0, 1, low_open=True)] | None = None  # layer-wise lr decay for ViT backbones (BEiT fine-tuning)
    no_wd_norm: bool = True  # no weight decay on norms, biases, position embeddings, queries
    # weight decay on position embeddings and class queries after all (only norms are exempt):
    # the released SegViT configs' paramwise_cfg (custom_keys norm / ln: decay 0, head: lr x10)
    wd_embeddings: bool = False
    # mmcv paramwise_cfg semantics (the official configs' groups); replaces the four rules above
    paramwise: ParamwiseConfig | None = None

    def __post_init__(self):
        if self.paramwise is None:
            return
        legacy = {"head_lr_mult": 10.0, "layer_decay": None, "no_wd_norm": True, "wd_embeddings": False}
        set_too = [k for k, default in legacy.items() if getattr(self, k) != default]
        if set_too:
            raise ValueError(f"paramwise replaces {', '.join(set_too)}: set one or the other (remove "
                             f"{', '.join(set_too)}, or paramwise: null)")


@dataclass(frozen=True)
class TrainConfig:
    max_iters: PositiveInt = 160000
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    warmup_iters: NonNegativeInt = 1500
    warmup_ratio: UnitFloat = 1e-6
    poly_power: NonNegativeFloat = 1.0
    min_lr: NonNegativeFloat = 0.0
    # how warmup and poly decay compose: "mmcv" (MMSegmentation 0.x PolyLrUpdaterHook: the SegViT and
    # MMSegmentation configs) or "mmengine" (LinearLR then PolyLR: the DToP configs); engine/optim.py
    lr_schedule: Literal["mmcv", "mmengine"] = "mmcv"
    poly_end: PositiveInt | None = None  # "mmengine": PolyLR's end (None = max_iters); DToP's base configs decay to 160k
    grad_clip: PositiveFloat | None = None  # max gradient norm; null = no clipping
    amp: Literal["auto", "off", "bf16", "fp16"] = "auto"  # auto: bf16 on CUDA, off on CPU
    accum_steps: PositiveInt = 1
    eval_interval: PositiveInt = 16000
    log_interval: PositiveInt = 50
    checkpoint_interval: NonNegativeInt = 0  # 0 = only at eval and at the end
    keep_checkpoints: NonNegativeInt = 0  # keep iter_{N}.pt beside last.pt at each save: the N most recent (0 = none)
    seed: NonNegativeInt = 0
    init_from: str | None = None  # a checkpoint whose weights start this run (e.g. DToP finetune)
    # event files in WORK_DIR/tensorboard: null = when the tensorboard package is installed, silently
    # otherwise (a first run prints nothing a newcomer cannot act on); true = asked for, so a missing
    # package is said once; false = never
    tensorboard: bool | None = None


@dataclass(frozen=True)
class TestConfig:
    """``test:`` — the test-time computation, as MMSegmentation 0.24.1's test pipeline and
    ``EncoderDecoder`` run it (``segcli/data/resize.py`` has the size rules).

    ``scale`` is the keep-ratio ``img_scale`` (long, short) the uint8 image is resized to, before
    normalisation; ``scales`` are ``MultiScaleFlipAug``'s ``img_ratios`` of that pair (or of the
    image's own size when ``scale`` is None). ``min_size`` is ``Resize(min_size=...)``: the short
    side becomes ``max(min(scale), min_size)`` and the long side follows the aspect ratio,
    uncapped (SegViT's Pascal Context and COCO-Stuff configs). With several scales or flips the
    softmax probabilities of the views are averaged (``aug_test``).
    """

    mode: Literal["whole", "slide"] = "whole"
    crop_size: tuple[PositiveInt, PositiveInt] | None = None  # slide window (H, W); None = data.crop_size
    stride: tuple[PositiveInt, PositiveInt] | None = None  # slide stride; None = 2/3 of the crop
    scale: tuple[PositiveInt, PositiveInt] | None = None  # resize to fit (long, short) before inference; None = as is
    scales: tuple[PositiveFloat, ...] = (1.0,)  # multi-scale TTA ratios of `scale`
    flip: bool = False
    batch_size: PositiveInt = 1
    min_size: PositiveInt | None = None  # short side at least this (mmseg Resize min_size); None = fit `scale`

    def __post_init__(self):
        if self.min_size is not None and self.min_size < 1:
            raise ValueError("min_size must be >= 1")


@dataclass(frozen=True)
class CLConfig:
    """``cl:`` — continual learning (SegViT-CL, thesis 4.2.3)."""

    protocol: str = "100-50"
    setting: Literal["overlapped", "disjoint"] = "overlapped"
    step_iters: PositiveInt | None = None  # iterations of every task after the first; None = train.max_iters


@dataclass(frozen=True)
class PublishedConfig:
    """``published:`` — the experiment whose number this recipe reproduces.

    Not inherited through ``_base_``: each recipe names its own experiment, and a recipe that
    changes its base's experiment restates ``published:`` or has none. ``numbers`` are as printed
    at ``source`` (a thesis table); ``official_config`` is the released config that produced them
    (null where the thesis is the only source); ``gpus * batch_per_gpu`` is the published global
    batch; ``pretrained`` names the backbone weights the published run started from (a file name,
    a URL or ``timm:NAME``; null for none); ``differences`` maps a config-parity key to the reason
    this recipe differs from ``official_config`` on purpose. Every key but ``differences`` must be
    written (null where allowed), so a recipe cannot claim a number without saying how it was made.
    """

    numbers: dict[str, float]
    source: str
    official_config: str | None
    gpus: PositiveInt
    batch_per_gpu: PositiveInt
    precision: Literal["fp32", "fp16", "bf16"]
    pretrained: str | None
    differences: dict[str, str] = field(default_factory=dict)

    def __post_init__(self):
        numbers = {}
        for key, value in self.numbers.items():
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ValueError(f"numbers.{key}: expected a number, got {value!r}")
            numbers[str(key)] = float(value)
        if not numbers:
            raise ValueError("numbers: name at least one published number")
        object.__setattr__(self, "numbers", numbers)
        for key, value in self.differences.items():
            if not isinstance(value, str) or not value.strip():
                raise ValueError(f"differences.{key}: expected the reason as a string, got {value!r}")
        object.__setattr__(self, "differences", {str(k): v for k, v in self.differences.items()})

    @property
    def global_batch(self) -> int:
        return self.gpus * self.batch_per_gpu


@dataclass(frozen=True)
class Recipe:
    model: ModelConfig
    name: str = "recipe"
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    test: TestConfig = field(default_factory=TestConfig)
    cl: CLConfig | None = None
    published: PublishedConfig | None = None  # not inherited through _base_

    def to_dict(self) -> dict:
        return to_dict(self)

    def replace(self, **sections) -> "Recipe":
        return dataclasses.replace(self, **sections)


# --------------------------------------------------------------------------- loading


def _recipe_hint(path: Path) -> str:
    """'did you mean recipes/...?' from the shipped recipes (``recipes/`` here, else the repository's)."""
    import difflib

    from .zoo import RECIPES

    folder = Path("recipes") if Path("recipes").is_dir() else RECIPES
    shipped = [p for p in folder.rglob("*.yaml") if "_base_" not in p.parts] if folder.is_dir() else []
    by_text = {str(p if folder == Path("recipes") else p.resolve()): p for p in shipped}
    close = (difflib.get_close_matches(str(path), list(by_text), n=1, cutoff=0.6)
             or [t for t in by_text if by_text[t].stem in difflib.get_close_matches(path.stem, [p.stem for p in shipped],
                                                                                   n=1, cutoff=0.6)][:1])
    return f"did you mean '{close[0]}'?" if close else "check the path"


def _read_yaml(path: Path) -> dict:
    if not path.is_file():
        raise SegcliError("recipe file not found", str(path), _recipe_hint(path))
    try:
        data = yaml.safe_load(path.read_text())
    except UnicodeDecodeError:  # a checkpoint, an image, ... given where a recipe goes
        raise SegcliError("not a text recipe; is it a checkpoint?", str(path),
                          "give a recipe .yaml (eval, predict and flops take checkpoints)") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        loc = f"{path}:{mark.line + 1}" if mark else str(path)
        raise SegcliError(f"invalid YAML: {getattr(err, 'problem', err)}", loc, "fix the syntax") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise SegcliError("a recipe must be a mapping of sections", str(path))
    return data


# Mappings whose keys are the options of the registered class named by their ``type``.
_COMPONENT_PATHS = frozenset({("model", "backbone"), ("model", "decode_head")})


def _merge(base: Any, child: Any, path: tuple[str, ...] = ()) -> Any:
    """``child`` merged into ``base`` (see the module docstring for the replacement rules)."""
    if not (isinstance(base, dict) and isinstance(child, dict)):
        return copy.deepcopy(child)
    child = dict(child)
    if child.pop("_delete_", False):
        return copy.deepcopy(child)
    if path in _COMPONENT_PATHS and "type" in child and child["type"] != base.get("type", child["type"]):
        return copy.deepcopy(child)
    if path == ("model",) and "type" in child and child["type"] != base.get("type", child["type"]):
        base = {key: value for key, value in base.items() if key != "options"}  # another segmentor's options
    out = copy.deepcopy(base)
    for key, value in child.items():
        out[key] = _merge(out[key], value, path + (str(key),)) if key in out else copy.deepcopy(value)
    return out


def load_raw(path: str | Path, _seen: tuple = ()) -> dict:
    """Read a recipe and its ``_base_`` chain into one merged dict (not yet validated)."""
    path = Path(path).resolve()
    if path in _seen:
        raise SegcliError("_base_ inherits from itself", str(path))
    data = _read_yaml(path)
    bases = data.pop("_base_", [])
    if isinstance(bases, str):
        bases = [bases]
    merged: dict = {}
    for base in bases:
        base_path = (path.parent / str(base)).resolve()
        if not base_path.is_file():
            raise SegcliError(f"_base_ file '{base}' not found", str(path), f"looked at {base_path}")
        base_data = load_raw(base_path, _seen + (path,))
        base_data.pop("published", None)  # each recipe names its own experiment (PublishedConfig)
        merged = _merge(merged, base_data)
    return _merge(merged, data)


def apply_overrides(raw: dict, overrides: list[str] | tuple[str, ...]) -> dict:
    """Apply ``a.b.c=value`` overrides (value parsed as YAML; list items by index)."""
    raw = copy.deepcopy(raw)
    for item in overrides:
        if "=" not in item:
            raise SegcliError(f"override '{item}' is not KEY=VALUE", "--set", "e.g. --set train.max_iters=100")
        key, text = item.split("=", 1)
        try:
            value = yaml.safe_load(text)
        except yaml.YAMLError:
            value = text
        parts = key.strip().split(".")
        node = raw
        for i, part in enumerate(parts[:-1]):
            if isinstance(node, list):
                if not part.isdigit() or int(part) >= len(node):
                    raise SegcliError(f"no list item {part}", f"--set {key}")
                node = node[int(part)]
                continue
            if node.get(part) is None:
                node[part] = {}
            node = node[part]
            if not isinstance(node, (dict, list)):
                raise SegcliError(f"'{'.'.join(parts[: i + 1])}' is not a section", f"--set {key}")
        last = parts[-1]
        if isinstance(node, list):
            if not last.isdigit() or int(last) >= len(node):
                raise SegcliError(f"no list item {last}", f"--set {key}")
            node[int(last)] = value
        else:
            node[last] = value
    return raw


def recipe_from_dict(raw: dict, where: str = "recipe", name: str | None = None) -> Recipe:
    """Validate a merged dict into a :class:`Recipe` (registries are populated first)."""
    from . import data as _data  # noqa: F401  (registers datasets)
    from . import models as _models  # noqa: F401  (registers backbones, heads, segmentors)
    from .registry import DATASETS

    raw = dict(raw)
    if name is not None and "name" not in raw:
        raw["name"] = name
    if "model" not in raw:
        raise SegcliError("missing the 'model' section", where)
    recipe = from_dict(Recipe, raw, where)
    DATASETS.get(recipe.data.type, f"{where}: data.type")
    return recipe


def load_recipe(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
    """Load, merge ``_base_``, apply ``--set`` overrides and validate a recipe file."""
    path = Path(path)
    raw = apply_overrides(load_raw(path), overrides)
    return recipe_from_dict(raw, where=str(path), name=path.stem)


def dump_recipe(recipe: Recipe) -> str:
    return yaml.safe_dump(recipe.to_dict(), sort_keys=False)


def resolved_recipe_yaml(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> str:
    """The resolved recipe (``_base_`` merged, ``--set`` applied, every default filled in) as the YAML
    that ``segcli train`` writes to ``WORK_DIR/recipe.yaml`` (``segcli recipe show``)."""
    return dump_recipe(load_recipe(path, overrides))
