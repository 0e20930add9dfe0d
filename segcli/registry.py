"""Name -> constructor tables.

A component (backbone, decode head, segmentor, dataset) registers its constructor together with
the dataclass that types its recipe section. Recipes are validated against that dataclass, so a
new component is one file plus one ``@REGISTRY.register`` line, and nothing else changes.

The tables are filled at import time and never mutated afterwards (they are module constants in
the same sense as timm's model registry).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from .errors import SegcliError, did_you_mean


@dataclass(frozen=True)
class Entry:
    name: str
    builder: Callable[..., Any]
    config_cls: type | None
    classes: Any = None  # datasets: their class names, a tuple or ``fn(data_cfg) -> tuple``

    def build(self, cfg: Any, *args, **kwargs) -> Any:
        """The component from its options, typed once at load (:mod:`segcli.configurable`): a config
        written in code must be typed too (``Component("atm", ATMConfig())``), nothing retypes it here."""
        expected = type(None) if self.config_cls is None else self.config_cls
        if not isinstance(cfg, expected):
            wanted = "no options" if self.config_cls is None else self.config_cls.__name__
            raise TypeError(f"'{self.name}' is built from {wanted}, got {type(cfg).__name__}")
        return self.builder(cfg, *args, **kwargs)


class Registry:
    def __init__(self, kind: str):
        self.kind = kind
        self._entries: dict[str, Entry] = {}

    def register(self, name: str, config: type | None = None, *, classes: Any = None):
        """Decorator: ``@HEADS.register("atm", ATMConfig)`` on a builder ``fn(cfg, **context)``.

        Datasets also register their class names (``classes=``), the one list of them, so that a
        model can be built for a dataset without reading it.
        """

        def deco(builder):
            if name in self._entries:
                raise RuntimeError(f"{self.kind} '{name}' registered twice")
            self._entries[name] = Entry(name, builder, config, classes)
            return builder

        return deco

    def get(self, name: str, where: str | None = None) -> Entry:
        if name not in self._entries:
            raise SegcliError(f"unknown {self.kind} '{name}'", where, did_you_mean(name, self._entries))
        return self._entries[name]

    def names(self) -> list[str]:
        return sorted(self._entries)

    def __contains__(self, name: str) -> bool:
        return name in self._entries


BACKBONES = Registry("backbone")
HEADS = Registry("decode head")
SEGMENTORS = Registry("segmentor")
DATASETS = Registry("dataset type")
