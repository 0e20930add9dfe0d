"""The official model's name of each segcli parameter: the converter key maps run backwards.

An official ``paramwise_cfg`` (mmcv ``DefaultOptimizerConstructor``) picks parameters by substrings
of the *official* model's names (``'norm'``, ``'ln'``, ``'head'`` in zbwxp/SegVit's configs), and
segcli's names differ (``blocks.0.norm1`` is ``layers.0.ln1``; the Shrunk TPN ``qu.readers`` is
under ``decode_head``). So the groups are chosen on the names the official model would have.

Those names come from the key maps ``segcli convert`` uses (one source of truth): a :class:`Rule`
renames an official key into segcli's, so its target template, read as a pattern, recognises a
segcli name, and its source pattern, filled with the captured groups, writes the official key.
Each inverted name is then checked forward (the rule and the rename applied to it must give the
segcli name back), so an inversion is either exact or not made. Of the known key maps, the one that
names the most parameters is used; a parameter that no rule covers keeps its segcli name.

Renames applied after the rules (``zero_based_stages``, ``segcli_head_names``, ``setr_rename``) are
undone by trying each of their inverses on the segcli name (:data:`_UNDO`) before the templates.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable, Iterable

import torch

from .keymap import Rule, apply_rules, segcli_head_names
from .mmseg import deeplabv3plus_rules, setr_rename, setr_rules
from .segvit import dtop_rules, segvit_v1_rules, segvit_v1_shrunk_rules, zero_based_stages

try:  # the regular-expression parser (Python >= 3.11 names it re._parser)
    from re import _parser as _sre_parse  # type: ignore[attr-defined]
    from re import _constants as _sre_constants  # type: ignore[attr-defined]
except ImportError:  # pragma: no cover
    import sre_constants as _sre_constants  # type: ignore[no-redef]
    import sre_parse as _sre_parse  # type: ignore[no-redef]


@dataclass(frozen=True)
class KeyMap:
    name: str  # the ``segcli convert --from`` format
    rules: Callable[[], list[Rule]]
    rename: Callable[[str], str] | None


KEY_MAPS = (
    KeyMap("segvit-v1", segvit_v1_rules, zero_based_stages),
    KeyMap("segvit-v1-shrunk", segvit_v1_shrunk_rules, zero_based_stages),
    KeyMap("dtop", dtop_rules, segcli_head_names),
    KeyMap("mmseg-setr", setr_rules, setr_rename),
    KeyMap("mmseg-deeplabv3plus", deeplabv3plus_rules, None),
)

_STAGE = re.compile(r"(stages|readers)\.(\d+)\.")
_HEAD = re.compile(r"^(decode_head|aux_heads\.(\d+))(?=\.)")
_CONVS = re.compile(r"\.convs\.(\d+)\.")


def _undo_stages(name: str) -> str:
    return _STAGE.sub(lambda m: f"{m.group(1)}.@{int(m.group(2)) + 1}.", name)


def _undo_heads(name: str) -> str:
    return _HEAD.sub(lambda m: "@decode_head@" if m.group(2) is None else f"@auxiliary_head.{m.group(2)}@", name)


def _undo_convs(name: str) -> str:
    return _CONVS.sub(lambda m: f".convs.#{int(m.group(1)) // 4}#{int(m.group(1)) % 4}.", name)


# candidate pre-rename forms of a segcli name (each is checked forward, so extra candidates are harmless)
_UNDO = (lambda n: n, _undo_stages, _undo_heads, lambda n: _undo_convs(_undo_heads(n)))

_GROUP_REF = re.compile(r"\\g<(\w+)>|\\(\d+)")


def _template_pattern(template: str, groupindex: dict[str, int]) -> tuple[re.Pattern, list[int]] | None:
    """A template (``re`` replacement syntax) as a pattern that captures each referenced group.

    Returns the pattern and, per capture, the number of the source pattern's group it fills.
    """
    parts, numbers, pos = [], [], 0
    for ref in _GROUP_REF.finditer(template):
        parts.append(re.escape(template[pos:ref.start()]))
        key = ref.group(1) if ref.group(1) is not None else ref.group(2)
        number = int(key) if key.isdigit() else groupindex.get(key)
        if number is None:
            return None
        if number in numbers:  # the same group twice: a back-reference
            parts.append(f"(?P=g{numbers.index(number)})")
        else:
            parts.append(f"(?P<g{len(numbers)}>.+?)")
            numbers.append(number)
        pos = ref.end()
    parts.append(re.escape(template[pos:]))
    return re.compile("".join(parts)), numbers


def _fill(pattern: str, values: dict[int, str]) -> str | None:
    """The string ``pattern`` matches when its groups take ``values``; None unless every part of the
    pattern is a literal or a group with a value."""
    def walk(tokens) -> str | None:
        out = []
        for op, arg in tokens:
            if op is _sre_constants.LITERAL:
                out.append(chr(arg))
            elif op is _sre_constants.SUBPATTERN:
                group = arg[0]
                if group is not None and group in values:
                    out.append(values[group])
                    continue
                inner = walk(arg[-1])
                if inner is None:
                    return None
                out.append(inner)
            else:
                return None
        return "".join(out)

    return walk(_sre_parse.parse(pattern))


def _inverse(rule: Rule) -> list[tuple[re.Pattern, list[int]]]:
    groupindex = re.compile(rule.pattern).groupindex
    templates = rule.split or ((rule.target,) if rule.target is not None else ())
    return [inv for inv in (_template_pattern(t, dict(groupindex)) for t in templates) if inv is not None]


def _official_name(name: str, key_map: KeyMap, rules: list[Rule], inverses) -> str | None:
    for undo in _UNDO:
        candidate = undo(name)
        for rule, patterns in inverses:
            for pattern, numbers in patterns:
                match = pattern.fullmatch(candidate)
                if match is None:
                    continue
                official = _fill(rule.pattern, {n: match.group(f"g{i}") for i, n in enumerate(numbers)})
                if official is None:
                    continue
                # the forward check, with every rule (the first that matches the key is the one used)
                mapped, _ = apply_rules({official: torch.zeros(max(len(rule.split), 1))}, rules)
                renamed = {key_map.rename(k) if key_map.rename else k for k in mapped}
                if name in renamed:
                    return official
    return None


def official_names(names: Iterable[str]) -> tuple[str | None, dict[str, str]]:
    """(the key map used, {segcli name: official name}) for the names it covers; see the module doc."""
    names = list(names)
    best: tuple[str | None, dict[str, str]] = (None, {})
    for key_map in KEY_MAPS:
        rules = key_map.rules()
        inverses = [(rule, _inverse(rule)) for rule in rules]
        found = {}
        for name in names:
            official = _official_name(name, key_map, rules, inverses)
            if official is not None:
                found[name] = official
        if len(found) > len(best[1]):
            best = (key_map.name, found)
    return best
