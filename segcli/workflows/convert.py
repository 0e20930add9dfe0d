"""Bringing released models in (``segcli convert``): an official checkpoint -> a segcli checkpoint.

Formats (``--from``; detected from the keys when omitted and unambiguous):

* ``segvit-v1``: the official SegViT release (zbwxp/SegVit, MMSegmentation 0.24: ViT + ``ATMHead``).
  The result is a complete segcli checkpoint with the recipe embedded, which ``eval``,
  ``predict``, ``prune``, ``flops`` and ``cl-step`` take as is.
* ``segvit-v1-shrunk``: the released Shrunk SegViT (``backbone/vit_shrink.py`` +
  ``decode_heads/tpn_atm_head.py``): QD in one block, the TPN as segcli's learned QU
  (``qu_resize: false``, ``qu_out_proj: false``), its ``ATMSingleHead`` as a one-stage ATM head
  (``input_proj: false``, ``head_mode: released``).
* ``dtop``: a model trained with zbwxp/Dynamic-Token-Pruning (MMSegmentation 1.x, an MMEngine
  checkpoint): ViT + ``PruneHead`` s with their binary class heads; give a ``model.type: dtop``
  recipe with ``class_head: binary`` ATM heads and ``combine: released`` to reproduce it.
* ``mmseg`` (``mmseg-setr``, ``mmseg-deeplabv3plus``): MMSegmentation 0.x model-zoo SETR-UP/naive and
  DeepLabV3+ checkpoints (``segcli/convert/mmseg.py``).
* ``mmseg-vit``: an MMSegmentation-format ViT (what ``tools/model_converters/vit2mmseg.py``
  writes, which the official configs load as pretrained weights). It has no head, so the result
  is a timm-format backbone state dict for ``model.backbone.pretrained`` (which also reads the
  MMSegmentation file directly).

The architecture comes from a recipe. Without ``--recipe`` it is read from the tensors
(:func:`infer_architecture`: the ViT's width and depth, the TPN's query grid for Shrunk, the
class queries for the class count, the position grid for the training size) and the released
recipe of ``recipes/released/`` that builds exactly those shapes is taken
(:func:`pick_released_recipe`; a recipe's shapes come from its model built on the ``meta``
device, so nothing but the recipes' own settings decides). No fit, or several, is one line
naming the candidates and what to pass. The official Pascal Context config trains
``num_classes=60`` (zbwxp/SegVit ``configs/segvit/segvit_vit-l_jax_480x480_80k_pc.py``, the
60-class ``pascal_context`` dataset) while the released files are named "PC59cls": the class
queries decide, 59 is the released PC59 recipe, 60 is refused with the ``--set data.type=...``
that makes that recipe PC60, never converted onto 59 labels.
With a recipe, the checkpoint must build exactly its shapes (its dataset's class count
included); the first difference is one line naming the tensor, both shapes and the released
recipe that fits. Then every tensor of that model must be filled and nothing may be left over,
or the conversion stops with the keys named. Class names come from the checkpoint's
``meta.CLASSES`` when it has them (MMSegmentation saves them), else from the recipe's dataset.

Decision: the output never replaces an existing file unless ``overwrite``; the default name is
``<source stem>.segcli.pt`` beside the source (``<stem>.timm.pth`` for a backbone).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from ..build import as_recipe, build_model, without_pretrained
from ..convert.architecture import Architecture, architecture_of, first_difference
from ..convert.keymap import Rule, apply_rules, fill_target, map_state, segcli_head_names
from ..convert.reader import read_foreign_checkpoint, state_dict_of
from ..convert.mmseg import deeplabv3plus_rules, setr_rename, setr_rules
from ..convert.segvit import (dtop_rules, mmseg_vit_rules, segvit_v1_rules, segvit_v1_shrunk_rules,
                              zero_based_stages)
from ..data import dataset_classes
from ..data.classes import label_colormap
from ..engine.checkpoint import save_checkpoint, write_atomically
from ..errors import SegcliError
from ..outputs import check_outputs
from ..recipe import Recipe
from ..registry import DATASETS
from ..version import __version__
from ..zoo import RECIPES

RELEASED_RECIPES = RECIPES / "released"


@dataclass(frozen=True)
class Format:
    name: str
    description: str
    rules: Callable[[], list[Rule]]
    rename: Callable[[str], str] | None
    detect: Callable[[set[str]], bool]
    backbone_only: bool = False


def _is_segvit_v1(keys: set[str]) -> bool:
    return "decode_head.input_proj_1.weight" in keys and "decode_head.q.weight" in keys and not any(
        k.startswith("decode_head.atm.") for k in keys) and not any(k.startswith("auxiliary_head.") for k in keys)


def _is_segvit_v1_shrunk(keys: set[str]) -> bool:
    return "decode_head.atm.q.weight" in keys and "decode_head.q.weight" in keys


def _is_dtop(keys: set[str]) -> bool:
    return "decode_head.decoder.layers.0.linear1.weight" in keys and "decode_head.class_embed.weight" in keys


def _is_mmseg_setr(keys: set[str]) -> bool:
    return "decode_head.up_convs.0.0.conv.weight" in keys and "backbone.patch_embed.projection.weight" in keys


def _is_mmseg_deeplabv3plus(keys: set[str]) -> bool:
    return "decode_head.aspp_modules.0.conv.weight" in keys and "backbone.stem.0.weight" in keys


def _is_mmseg_vit(keys: set[str]) -> bool:
    return "patch_embed.projection.weight" in keys and "layers.0.ln1.weight" in keys


FORMATS: dict[str, Format] = {f.name: f for f in (
    Format("segvit-v1", "official SegViT (zbwxp/SegVit): ViT + ATM head", segvit_v1_rules, zero_based_stages,
           _is_segvit_v1),
    Format("segvit-v1-shrunk", "official Shrunk SegViT (zbwxp/SegVit): vit_shrink + TPN ATM head",
           segvit_v1_shrunk_rules, zero_based_stages, _is_segvit_v1_shrunk),
    Format("dtop", "a DToP model (zbwxp/Dynamic-Token-Pruning, MMSegmentation 1.x): ViT + PruneHeads",
           dtop_rules, segcli_head_names, _is_dtop),
    Format("mmseg-setr", "MMSegmentation model zoo: SETR (ViT + SETRUPHead)", setr_rules, setr_rename,
           _is_mmseg_setr),
    Format("mmseg-deeplabv3plus", "MMSegmentation model zoo: DeepLabV3+ (ResNetV1c + DSASPPHead)",
           deeplabv3plus_rules, None, _is_mmseg_deeplabv3plus),
    Format("mmseg-vit", "MMSegmentation-format ViT backbone (vit2mmseg.py)",
           lambda: mmseg_vit_rules(source_prefix="", target_prefix="", final_norm=True),
           None, _is_mmseg_vit, backbone_only=True),
)}


@dataclass
class ConvertResult:
    path: Path
    format: str
    tensors_in: int  # tensors read from the source
    tensors_out: int  # tensors of the written model / backbone
    recipe: str | None = None  # the released recipe picked from the tensors (None: given, or a backbone)
    architecture: str | None = None  # what the tensors say the model is

    def to_dict(self) -> dict:
        """The ``convert --json`` object."""
        return {"path": str(self.path), "format": self.format, "tensors_in": self.tensors_in,
                "tensors_out": self.tensors_out, "recipe": self.recipe, "architecture": self.architecture}


# released formats recognised by their keys but not converted yet: an honest one-line refusal
NOT_YET = (
    ("an MMSegmentation model-zoo checkpoint of a head segcli does not convert (only SETR-UP / DeepLabV3+)",
     lambda keys: "decode_head.conv_seg.weight" in keys),
)


ALIASES = {"mmseg": ("mmseg-setr", "mmseg-deeplabv3plus")}  # --from mmseg: the zoo model its keys show


def detect_format(keys: set[str], source: str, among: tuple[str, ...] | None = None) -> str:
    """The one format (of ``among``, default all) whose keys these are, or an error listing what was seen."""
    found = [name for name, fmt in FORMATS.items() if fmt.detect(keys) and (among is None or name in among)]
    if len(found) == 1:
        return found[0]
    for what, looks_like in NOT_YET:
        if not found and looks_like(keys):
            raise SegcliError(f"this is {what}, which segcli convert cannot read yet", source,
                              "formats read now: " + ", ".join(FORMATS))
    sample = ", ".join(sorted(keys)[:3])
    raise SegcliError(f"cannot tell the checkpoint's format ({'several match: ' + ', '.join(found) if found else 'keys such as ' + sample})",
                      source, "say it with --from " + " | ".join(FORMATS))


def _class_names(payload: object, recipe: Recipe, num_classes: int) -> list[str]:
    meta = payload.get("meta") if isinstance(payload, dict) else None
    names = meta.get("CLASSES") if isinstance(meta, dict) else None
    if isinstance(names, (list, tuple)) and len(names) == num_classes and all(isinstance(n, str) for n in names):
        return list(names)
    try:
        names = dataset_classes(recipe.data)
    except SegcliError:
        names = ()
    return list(names) if len(names) == num_classes else [f"class{i}" for i in range(num_classes)]


def _num_classes(state: dict[str, torch.Tensor], source: str) -> int:
    for key in ("decode_head.atm.q.weight", "decode_head.q.weight", "decode_head.conv_seg.weight"):  # ATM / PruneHead queries, zoo classifiers
        if key in state:
            return int(state[key].shape[0])
    raise SegcliError("cannot find the class count in the checkpoint", source, "check --from")


@dataclass(frozen=True)
class _Read:
    """A checkpoint in segcli's names: its format, its architecture, the renamed tensors, each one's source key."""
    format: str
    arch: Architecture
    mapped: dict[str, torch.Tensor]
    unmatched: list[str]
    origins: dict[str, str]


def _read(state: dict[str, torch.Tensor], fmt: Format) -> _Read:
    mapped, unmatched, origins = map_state(state, fmt.rules(), fmt.rename)
    return _Read(fmt.name, architecture_of(mapped), mapped, unmatched, origins)


def infer_architecture(state: dict[str, torch.Tensor], from_format: str | None = None,
                       source: str = "checkpoint") -> Architecture:
    """What a released checkpoint's tensors say it is (its format detected from the keys unless given)."""
    return _read(state, FORMATS[from_format or detect_format(set(state), source)]).arch


def recipe_architecture(recipe: Recipe, num_classes: int | None = None) -> tuple[Architecture, dict[str, torch.Tensor]]:
    """The architecture a recipe builds and its state dict, built on the ``meta`` device (shapes
    only). The class count is the recipe's (its dataset's); ``num_classes`` only where the recipe
    cannot say (a ``folder`` dataset without its class list here)."""
    try:
        own = recipe.model.num_classes or len(dataset_classes(recipe.data))
    except SegcliError:
        own = num_classes
    with torch.device("meta"):
        model = build_model(without_pretrained(recipe), num_classes=own)
    state = model.state_dict()
    return architecture_of(state), state


@dataclass(frozen=True)
class _Candidate:
    path: Path
    recipe: Recipe
    arch: Architecture
    state: dict[str, torch.Tensor]


def _released_candidates(arch: Architecture, overrides=(), folder: Path | None = None
                         ) -> tuple[list[_Candidate], list[_Candidate], list[str]]:
    """(released recipes that build exactly ``arch``, those that differ only in the class count,
    those that could not be built: ``name (error)``)."""
    fits, near, unreadable = [], [], []
    for path in sorted(Path(folder or RELEASED_RECIPES).glob("*.yaml")):
        try:
            recipe = as_recipe(path, overrides)
            candidate = _Candidate(path, recipe, *recipe_architecture(recipe))
        except SegcliError as err:  # e.g. overrides that do not apply to it: it cannot fit
            unreadable.append(f"{path.name} ({err.message.split(' (')[0][:80]})")
            continue
        if candidate.arch == arch:
            fits.append(candidate)
        elif dataclasses.replace(candidate.arch, num_classes=arch.num_classes) == arch:
            near.append(candidate)
    return fits, near, unreadable


def _shown(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def _datasets_with(num_classes: int) -> list[str]:
    """Registered dataset types whose fixed class list has ``num_classes`` classes."""
    return [name for name in DATASETS.names()
            if isinstance(classes := DATASETS.get(name).classes, (tuple, list)) and len(classes) == num_classes]


def _what_fits(read: _Read, overrides=(), folder: Path | None = None) -> tuple[_Candidate | None, str, str]:
    """(the one released recipe that fits or None, why not (empty when one fits), what to pass)."""
    arch = read.arch
    fits, near, unreadable = _released_candidates(arch, overrides, folder)
    more = f" and {len(unreadable) - 2} more" if len(unreadable) > 2 else ""
    skipped = f"; not read: {', '.join(unreadable[:2])}{more}" if unreadable else ""
    if len(fits) == 1:
        return fits[0], "", f"{_shown(fits[0].path)} fits: pass it with --recipe, or leave --recipe out"
    if fits:
        names = " | ".join(_shown(c.path) for c in fits)
        return None, f"several released recipes fit: {names}{skipped}", f"give one with --recipe {names}"
    if near:
        why = "; ".join(f"{_shown(c.path)} has {c.arch.num_classes} ({c.recipe.data.type}): "
                        + first_difference(arch, c.arch, read.mapped, c.state, read.origins) for c in near)
        passes = [f"--recipe {_shown(c.path)} --set data.type={name}" for c in near for name in _datasets_with(arch.num_classes)]
        todo = ("pass " + " or ".join(passes)) if passes else (
            f"pass --recipe {_shown(near[0].path)} with a dataset of {arch.num_classes} classes (--set data.classes=[...])")
        return None, f"no released recipe has {arch.num_classes} classes ({why}){skipped}", todo
    return None, f"no released recipe builds these shapes{skipped}", (
        f"give the recipe of its architecture with --recipe (those of the released files: {_shown(Path(folder or RELEASED_RECIPES))}/)")


def _pick(read: _Read, source: str, overrides=(), folder: Path | None = None) -> Path:
    fit, why, todo = _what_fits(read, overrides, folder)
    if fit is None:
        raise SegcliError(f"its tensors ({read.format}) say {read.arch.describe()}, but {why}", source, todo)
    return fit.path


def pick_released_recipe(state: dict[str, torch.Tensor], from_format: str | None = None, source: str = "checkpoint",
                         overrides=(), folder: Path | None = None) -> Path:
    """The released recipe (``folder``, default ``recipes/released/``; ``--set`` ``overrides``
    applied to each) whose model has exactly the shapes of the checkpoint ``state``, or one line
    naming the candidates and what to pass."""
    return _pick(_read(state, FORMATS[from_format or detect_format(set(state), source)]), source, overrides, folder)


def _fix(read: _Read, overrides) -> str:
    """What to pass instead of a recipe the checkpoint does not fit (the file's architecture, what fits)."""
    fit, why, todo = _what_fits(read, overrides)
    return f"the file is {read.arch.describe()}; " + (todo if fit is not None else f"{why}: {todo}")


def convert(source: str | Path, from_format: str | None = None, recipe: Recipe | str | Path | None = None,
            out: str | Path | None = None, overwrite: bool = False, overrides=()) -> ConvertResult:
    """Convert a released checkpoint (module docstring); returns where it was written."""
    source = Path(source).expanduser()
    if from_format is not None and from_format not in FORMATS and from_format not in ALIASES:
        raise SegcliError(f"unknown format '{from_format}'", "--from", "choose " + " | ".join([*FORMATS, *ALIASES]))
    given = _shown(Path(recipe)) if isinstance(recipe, (str, Path)) else "the recipe"
    if recipe is not None:
        recipe = as_recipe(recipe, overrides)
    payload = read_foreign_checkpoint(source)
    state = state_dict_of(payload, str(source))
    state = {k.removeprefix("module."): v for k, v in state.items()}
    if from_format in ALIASES:
        name = detect_format(set(state), str(source), ALIASES[from_format])
    else:
        name = from_format or detect_format(set(state), str(source))
    fmt = FORMATS[name]
    if fmt.backbone_only:
        target_path = Path(out).expanduser() if out else source.with_name(f"{source.stem}.timm.pth")
    else:
        target_path = Path(out).expanduser() if out else source.with_name(f"{source.stem}.segcli.pt")
    check_outputs([target_path], inputs=[source], overwrite=overwrite, input_name="checkpoint")

    if fmt.backbone_only:
        mapped, unmatched = apply_rules(state, fmt.rules())
        if unmatched:
            raise SegcliError(f"not a {name} checkpoint: no place for {', '.join(unmatched[:4])}", str(source),
                              "check --from")
        write_atomically(target_path, lambda handle: torch.save(mapped, handle))
        return ConvertResult(target_path, name, len(state), len(mapped))

    read = _read(state, fmt)
    picked = None
    if recipe is None:
        picked = _pick(read, str(source), overrides)
        recipe, given = as_recipe(picked, overrides), _shown(picked)
    num_classes = _num_classes(state, str(source))
    recipe_arch, recipe_state = recipe_architecture(recipe, num_classes)
    difference = first_difference(read.arch, recipe_arch, read.mapped, recipe_state, read.origins)
    if difference is not None:
        raise SegcliError(f"the checkpoint does not fit {given}: {difference}", str(source), _fix(read, overrides))
    model = build_model(without_pretrained(recipe), num_classes=num_classes)
    try:
        converted = fill_target(read.mapped, read.unmatched, read.origins, model.state_dict(), str(source), name)
    except SegcliError as err:
        raise SegcliError(err.message, err.where, _fix(read, overrides)) from None
    model.load_state_dict(converted)
    classes = _class_names(payload, recipe, num_classes)
    meta = {"classes": classes, "palette": label_colormap(num_classes + 1)[1:].astype(int).tolist(),
            "num_classes": num_classes, "ignore_index": 255,
            "converted_from": {"file": str(source), "format": name}}
    save_checkpoint(target_path, {"version": __version__, "recipe": recipe.to_dict(), "meta": meta,
                                  "model": model.state_dict()})
    return ConvertResult(target_path, name, len(state), len(converted), None if picked is None else _shown(picked),
                         read.arch.describe())

