"""Every number a user can write has its range in its dataclass, checked at load with the key named.

The test walks the recipe's sections and every registered component's and segmentor's options
(rather than listing fields one by one), so a numeric field added without a range fails it.
"""
from __future__ import annotations

import dataclasses
import typing
from pathlib import Path

import pytest

from conftest import REPO

from segcli import registry
from segcli.configurable import Range, _convert
from segcli.errors import SegcliError
from segcli.recipe import Recipe, load_recipe

import segcli.data  # noqa: F401  (fills the registries)
import segcli.models  # noqa: F401


def _config_classes() -> list[type]:
    found: list[type] = []

    def visit(cls):
        if cls in found:
            return
        found.append(cls)
        for tp in typing.get_type_hints(cls).values():
            for part in (tp, *typing.get_args(tp)):
                if dataclasses.is_dataclass(part):
                    visit(part)

    visit(Recipe)
    for table in (registry.BACKBONES, registry.HEADS, registry.SEGMENTORS):
        for name in table.names():
            config = table.get(name).config_cls
            if config is not None:
                visit(config)
    return found


def _numbers(tp) -> list[tuple[type, Range | None]]:
    """(int or float, its Range or None) for every number inside a field type (tuples, optionals)."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is typing.Annotated:
        inner = args[0]
        ranges = [a for a in args[1:] if isinstance(a, Range)]
        return [(inner, ranges[0] if ranges else None)] if inner in (int, float) else _numbers(inner)
    if tp in (int, float):
        return [(tp, None)]
    if origin is dict:  # mappings (published.numbers, paramwise.custom_keys) are checked by their own class
        return []
    return [n for arg in args for n in _numbers(arg)]


FIELDS = [(cls, f.name, number, rule) for cls in _config_classes()
          for f in dataclasses.fields(cls) if f.init
          for number, rule in _numbers(typing.get_type_hints(cls, include_extras=True)[f.name])]


def test_the_walk_finds_the_configs():
    names = {cls.__name__ for cls, *_ in FIELDS}
    assert {"DataConfig", "TrainConfig", "TestConfig", "ViTConfig", "ATMConfig", "DToPOptions"} <= names
    assert len(FIELDS) > 100


def test_every_number_declares_its_range():
    missing = [f"{cls.__name__}.{name}" for cls, name, _, rule in FIELDS if rule is None]
    assert not missing, f"numbers without a Range (use PositiveInt, UnitFloat, ... or AnyInt): {missing}"


def _outside(number: type, rule: Range):
    if rule.low is not None:
        return number(rule.low) if rule.low_open else (rule.low - 1 if number is int else rule.low - 0.5)
    return number(rule.high + 1)


def _holding(tp, bad):
    """A value of field type ``tp`` whose numbers are all ``bad``."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is typing.Annotated or tp in (int, float):
        return bad
    if origin is tuple:
        return [bad] if len(args) == 2 and args[1] is Ellipsis else [bad] * len(args)
    return _holding(next(a for a in args if a is not type(None)), bad)  # X | None


BOUNDED = [(cls, name, number, rule) for cls, name, number, rule in FIELDS
           if rule is not None and (rule.low is not None or rule.high is not None)]


@pytest.mark.parametrize("cls, name, number, rule", BOUNDED,
                         ids=[f"{cls.__name__}.{name}" for cls, name, *_ in BOUNDED])
def test_a_value_outside_the_range_is_refused_naming_the_key(cls, name, number, rule):
    field_type = typing.get_type_hints(cls, include_extras=True)[name]
    value = _holding(field_type, _outside(number, rule))
    with pytest.raises(SegcliError, match="must be .*got") as err:
        _convert(value, field_type, f"section.{name}")
    assert err.value.where.startswith(f"section.{name}")


@pytest.mark.parametrize("override", [
    "data.crop_size=[0,0]", "data.crop_size=[-64,64]", "train.optimizer.lr=-1", "train.optimizer.weight_decay=-1",
    "train.eval_interval=0", "data.num_workers=-1", "test.stride=[0,0]", "test.crop_size=[0,0]",
    "model.backbone.img_size=0", "train.log_interval=-1", "train.warmup_iters=-1", "train.grad_clip=-1",
    "model.backbone.patch_size=-8",
])
def test_the_values_that_crashed_after_load_are_refused_at_load(override):
    """Each of these passed `recipe show` and crashed later with a traceback (some after training)."""
    key = override.split("=")[0]
    with pytest.raises(SegcliError, match="must be") as err:
        load_recipe(REPO / "recipes" / "tiny" / "setr.yaml", [override])
    assert key in err.value.where and len(str(err.value).splitlines()) == 1


def test_values_inside_the_ranges_still_load():
    recipe = load_recipe(REPO / "recipes" / "tiny" / "setr.yaml",
                         ["train.checkpoint_interval=0", "train.warmup_iters=0", "train.grad_clip=null",
                          "data.num_workers=0", "model.decode_head.in_index=-1", "data.mean=[-1.5, 0, 300]"])
    assert recipe.train.checkpoint_interval == 0 and recipe.model.decode_head.cfg.in_index == -1
    assert Path(REPO / "recipes").is_dir()
