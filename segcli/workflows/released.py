"""Named models (``--model NAME``, ``segcli zoo list``): the zoo table (``segcli/zoo.py``) made real.

:func:`resolve_model` is the one door from a name to a segcli checkpoint, shared by every command
that takes ``--model``:

1. ``$SEGCLI_CACHE/<file>`` when it is there: a file placed or converted earlier wins, and is used
   without touching the network;
2. a released model is fetched from the model hub (``huggingface_hub``: its cache, resume, etag
   checks, ``HF_HUB_OFFLINE``), converted with its released recipe (``segcli convert``'s
   workflow, :func:`segcli.workflows.convert.convert`) and the converted checkpoint cached as 1.;
3. a model that is not released (trained with segcli) is one line saying how to make it.

The hub file stays in the hub's cache, so a deleted conversion is redone offline.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from ..build import as_recipe
from ..download import Progress, cached_hub_file, fetch_hub_file
from ..errors import SegcliError
from ..zoo import ZOO, ZooEntry, checkpoint_path, lookup, recipe_path
from .convert import convert


def resolve_model(name: str, progress: Progress | None = None, zoo: Mapping[str, ZooEntry] = ZOO,
                  notify: Callable[[str], None] | None = None) -> Path:
    """The segcli checkpoint of the named model, fetched and converted on first use (module docstring).

    ``progress`` receives the download's transfer reports; ``notify`` one line when a released file
    is converted (what, with which recipe, where the result is cached), so that a first use says
    why it took longer and where the file went."""
    entry = lookup(name, zoo)
    path = checkpoint_path(entry)
    if path.is_file():
        return path
    released = entry.released
    if released is None:
        raise SegcliError(f"model '{name}' ({entry.description}) has no checkpoint at {path}", "--model",
                          f"{_train_it(entry)} (or pass --checkpoint FILE)")
    recipe = recipe_path(released.recipe)
    by_hand = (f"download {released.url} where there is a network, then `segcli convert FILE --recipe {recipe} "
               f"--out {path}`")
    raw = fetch_hub_file(released.repo, released.file, released.revision, progress, "--model", by_hand)
    convert(raw, recipe=recipe, out=path)
    if notify is not None:
        notify(f"converted {released.file} ({entry.description}) with {recipe} -> {path}; "
               f"--model {name} reads it from now on")
    return path


def fetch_models(names: list[str], progress: Progress | None = None, zoo: Mapping[str, ZooEntry] = ZOO,
                 notify: Callable[[str], None] | None = None) -> dict[str, Path]:
    """``segcli zoo fetch``: :func:`resolve_model` for each name, so that ``--model NAME`` later works
    offline (a build step, a machine about to lose its network). Every name is checked first (known,
    and either cached or released): a typo in the last name fetches nothing."""
    if not names:
        raise SegcliError("no model named", "NAME", "`segcli zoo list` shows the names")
    for name in names:
        entry = lookup(name, zoo, where="NAME")
        if entry.released is None and not checkpoint_path(entry).is_file():
            raise SegcliError(f"model '{name}' ({entry.description}) is not released: there is nothing to fetch",
                              name, _train_it(entry))
    return {name: resolve_model(name, progress, zoo, notify) for name in dict.fromkeys(names)}


def _train_it(entry: ZooEntry) -> str:
    """How to make a model that is not released: train it and place its checkpoint in the cache."""
    return f"train it: `segcli train {entry.recipe}` then copy runs/<name>/best.pt to {checkpoint_path(entry)}"


@dataclass(frozen=True)
class ZooRow:
    """One line of ``segcli zoo list``: a named model, its published figures and what is cached."""

    name: str
    description: str
    checkpoint: str  # where its segcli checkpoint is (or will be) cached
    cached: bool  # that checkpoint exists: --model NAME reads it without network
    source: str  # the released file's URL, or "segcli train <recipe>"
    released_cached: bool | None  # the released file is in the hub's cache (None: not a released model)
    numbers: dict[str, float] = field(default_factory=dict)  # published (recipe's published.numbers)
    numbers_source: str | None = None  # where they are printed (thesis table, README)

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def list_models(zoo: Mapping[str, ZooEntry] = ZOO) -> list[ZooRow]:
    """Every named model with its published figures (from its recipe) and whether it is cached; no network."""
    rows = []
    for entry in zoo.values():
        published = as_recipe(recipe_path(entry.recipe)).published
        released = entry.released
        path = checkpoint_path(entry)
        rows.append(ZooRow(
            name=entry.name, description=entry.description, checkpoint=str(path), cached=path.is_file(),
            source=released.url if released else f"segcli train {entry.recipe}",
            released_cached=None if released is None else cached_hub_file(released.repo, released.file,
                                                                          released.revision) is not None,
            numbers=dict(published.numbers) if published else {},
            numbers_source=published.source if published else None))
    return rows
