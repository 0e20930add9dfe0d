"""Raw YAML dicts -> typed, frozen dataclasses, with precise errors.

The one place where untyped data becomes typed: every recipe section and every registered
component's options pass through :func:`from_dict`. Code below the recipe never sees raw dicts.

Supported field types: ``int``, ``float``, ``bool``, ``str``, ``X | None``, ``tuple[X, ...]``,
``tuple[X, Y]``, ``Literal[...]``, nested dataclasses and :class:`Component` (a registered
component chosen by its ``type`` key; the registry is named in the field's metadata). A component
may also be spelt as two sibling keys, its name and its options (``model.type`` +
``model.options``: the segmentor): :func:`options_field` types the options by the class that the
named component registered, as a :class:`Component`'s are.

Numbers carry their range in their type: ``Annotated[int, Range(1)]`` (spelt :data:`PositiveInt`
and friends), checked when the value is read, with the key named. Every ``int`` and ``float`` field
of a config declares one, unbounded (``Range()``) where any value means something
(``tests/test_config_ranges.py`` walks them all).
"""
from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal, Union

from .errors import SegcliError, did_you_mean


@dataclass(frozen=True)
class Range:
    """The values a number may take: ``low <= value <= high`` (either bound may be None = open-ended;
    ``low_open`` makes the lower bound strict: ``low < value``)."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False

    def describe(self) -> str:
        if self.low is not None and self.high is not None:
            return f"in {'(' if self.low_open else '['}{self.low:g}, {self.high:g}]"
        if self.low is not None:
            return f"{'>' if self.low_open else '>='} {self.low:g}"
        if self.high is not None:
            return f"<= {self.high:g}"
        return "any number"

    def check(self, value: float, where: str) -> None:
        too_low = self.low is not None and (value <= self.low if self.low_open else value < self.low)
        too_high = self.high is not None and value > self.high
        if too_low or too_high:
            raise SegcliError(f"must be {self.describe()}, got {value!r}", where)


PositiveInt = Annotated[int, Range(1)]
NonNegativeInt = Annotated[int, Range(0)]
AnyInt = Annotated[int, Range()]  # e.g. an index that may count from the end
PositiveFloat = Annotated[float, Range(0, low_open=True)]
NonNegativeFloat = Annotated[float, Range(0)]
UnitFloat = Annotated[float, Range(0, 1)]  # a probability or a fraction
AnyFloat = Annotated[float, Range()]  # e.g. a mean, a shift


@dataclass(frozen=True)
class Component:
    """A registered component: its registry name (``type``) and its typed options (``cfg``)."""

    type: str
    cfg: Any = None


def component_field(registry: str, default: Any = dataclasses.MISSING):
    """A dataclass field holding a :class:`Component` of the given registry ("backbone", ...)."""
    kwargs = {"metadata": {"registry": registry}}
    if default is dataclasses.MISSING:
        return field(**kwargs)
    return field(default_factory=lambda: default, **kwargs)


def options_field(registry: str, type_key: str = "type"):
    """A dataclass field holding the typed options of the ``registry`` component named by the
    sibling field ``type_key`` (None for a component that registered no options class)."""
    return field(default=None, metadata={"options_of": (registry, type_key)})


def _registry(name: str):
    from . import registry

    return {
        "backbone": registry.BACKBONES,
        "head": registry.HEADS,
        "segmentor": registry.SEGMENTORS,
        "dataset": registry.DATASETS,
    }[name]


def _describe(tp) -> str:
    if typing.get_origin(tp) is Annotated:
        tp = typing.get_args(tp)[0]
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _convert(value: Any, tp: Any, where: str, registry: str | None = None) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin is Annotated:
        converted = _convert(value, args[0], where, registry)
        for rule in args[1:]:
            if isinstance(rule, Range):
                rule.check(converted, where)
        return converted
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(value, arg, where, registry)
            except SegcliError as err:
                errors.append(err)
        raise errors[0] if len(errors) == 1 else SegcliError(
            f"expected {' or '.join(_describe(a) for a in args)}, got {value!r}", where)
    if origin is Literal:
        if isinstance(value, bool) and value not in args:  # YAML 1.1 reads off/on/no/yes as booleans
            value = next((word for word in (("on", "yes", "true") if value else ("off", "no", "false"))
                          if word in args), value)
        if value not in args:
            raise SegcliError(f"invalid value {value!r}", where, "choose one of " + ", ".join(map(repr, args)))
        return value
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            if value is None:
                raise SegcliError("expected a list, got null", where)
            value = [value]  # a scalar where a list is expected: one element
        if origin is tuple and args and (len(args) != 2 or args[1] is not Ellipsis):
            if len(value) != len(args):
                raise SegcliError(f"expected {len(args)} values, got {len(value)}: {list(value)!r}", where)
            return tuple(_convert(v, a, f"{where}[{i}]", registry) for i, (v, a) in enumerate(zip(value, args)))
        item_tp = args[0] if args else Any
        items = [_convert(v, item_tp, f"{where}[{i}]", registry) for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            raise SegcliError(f"expected a mapping, got {value!r}", where)
        return dict(value)
    if tp is Component:
        return _convert_component(value, where, registry)
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        return from_dict(tp, value, where)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise SegcliError(f"expected true or false, got {value!r}", where)
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise SegcliError(f"expected an integer, got {value!r}", where)
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:  # YAML 1.1 reads '1e-4' as a string
                return float(value)
            except ValueError:
                pass
        raise SegcliError(f"expected a number, got {value!r}", where)
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise SegcliError(f"expected a string, got {value!r}", where)
    raise TypeError(f"unsupported field type {tp!r} at {where}")


def _convert_component(value: Any, where: str, registry_name: str | None) -> Component:
    if registry_name is None:
        raise TypeError(f"Component field without registry metadata at {where}")
    if isinstance(value, Component):
        return value
    if isinstance(value, str):
        value = {"type": value}
    if not isinstance(value, dict) or "type" not in value:
        raise SegcliError("expected a mapping with a 'type' key", where)
    options = dict(value)
    name = options.pop("type")
    return Component(str(name), _component_options(registry_name, name, options, where, f"{where}.type"))


def _component_options(registry_name: str, name: Any, options: Any, where: str, type_where: str) -> Any:
    """``options`` of the ``registry_name`` component ``name`` as the dataclass it registered."""
    entry = _registry(registry_name).get(str(name), type_where)
    if entry.config_cls is None:
        if options:
            got = sorted(options) if isinstance(options, dict) else repr(options)
            raise SegcliError(f"{registry_name} '{name}' takes no options, got {got}", where)
        return None
    if isinstance(options, entry.config_cls):
        return options
    return from_dict(entry.config_cls, options, where)


def from_dict(cls: type, raw: Any, where: str) -> Any:
    """Build dataclass ``cls`` from ``raw``; unknown keys get a 'did you mean' hint."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise SegcliError(f"expected a mapping, got {raw!r}", where)
    hints = typing.get_type_hints(cls, include_extras=True)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    for key in raw:
        if key not in fields:
            raise SegcliError(f"unknown key '{key}'", f"{where}.{key}" if where else key,
                              did_you_mean(str(key), fields))
    kwargs = {}
    options_of = {name: f.metadata["options_of"] for name, f in fields.items() if "options_of" in f.metadata}
    for name, f in fields.items():
        key_where = f"{where}.{name}" if where else name
        if name in options_of:
            continue  # typed below, once the component's name is known
        if name in raw:
            kwargs[name] = _convert(raw[name], hints[name], key_where, f.metadata.get("registry"))
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise SegcliError("missing required key", key_where)
    for name, (registry_name, type_key) in options_of.items():
        component = kwargs.get(type_key, fields[type_key].default)
        kwargs[name] = _component_options(registry_name, component, raw.get(name), f"{where}.{name}" if where else name,
                                          f"{where}.{type_key}" if where else type_key)
    try:
        obj = cls(**kwargs)
    except (ValueError, TypeError) as err:  # __post_init__ validation
        raise SegcliError(str(err), where) from None
    # Defaults that are raw dicts (component defaults) are converted too.
    for name, f in fields.items():
        value = getattr(obj, name)
        if f.metadata.get("registry") and isinstance(value, dict):
            object.__setattr__(obj, name, _convert_component(value, f"{where}.{name}", f.metadata["registry"]))
    return obj


def to_dict(obj: Any) -> Any:
    """The inverse of :func:`from_dict`: plain YAML-able data (tuples become lists)."""
    if isinstance(obj, Component):
        out = {"type": obj.type}
        if obj.cfg is not None:
            out.update(to_dict(obj.cfg))
        return out
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj) if f.init}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj
