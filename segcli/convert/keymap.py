"""Renaming a foreign state dict into a segcli model's, with every tensor accounted for.

A conversion is a list of :class:`Rule` s tried in order on each source key: the first whose
pattern matches renames the tensor (``re`` replacement syntax), drops it (``target=None``) or
splits it along dim 0 into several targets (``split``: fused ``in_proj`` weights -> q, k, v). After
the renaming, any source key that no rule took, any target key left empty and any shape
mismatch is an error that names the keys: nothing is silently ignored.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable

import torch

from ..errors import SegcliError


@dataclass(frozen=True)
class Rule:
    pattern: str  # a regular expression matched against the whole source key
    target: str | None  # replacement (``\\1`` groups); None = drop the tensor
    split: tuple[str, ...] = ()  # replacements of equal chunks along dim 0 (q, k, v)


def apply_rules(source: dict[str, torch.Tensor], rules: list[Rule],
                origins: dict[str, str] | None = None) -> tuple[dict[str, torch.Tensor], list[str]]:
    """(renamed tensors, source keys no rule matched); ``origins`` (if given) receives each
    renamed key's source key, so that an error can name the tensor as the file names it."""
    compiled = [(re.compile(rule.pattern), rule) for rule in rules]
    out: dict[str, torch.Tensor] = {}
    unmatched = []
    for key, tensor in source.items():
        for pattern, rule in compiled:
            match = pattern.fullmatch(key)
            if match is None:
                continue
            if rule.split:
                for chunk, name in zip(tensor.chunk(len(rule.split), dim=0), rule.split):
                    out[match.expand(name)] = chunk.clone()
                    if origins is not None:
                        origins[match.expand(name)] = key
            elif rule.target is not None:
                out[match.expand(rule.target)] = tensor
                if origins is not None:
                    origins[match.expand(rule.target)] = key
            break
        else:
            unmatched.append(key)
    return out, unmatched


def _keys(keys: list[str], limit: int = 4) -> str:
    more = f" (+{len(keys) - limit} more)" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


def map_state(source: dict[str, torch.Tensor], rules: list[Rule], rename: Callable[[str], str] | None = None
              ) -> tuple[dict[str, torch.Tensor], list[str], dict[str, str]]:
    """(tensors in segcli's names, source keys no rule took, segcli key -> source key): ``rules``
    then ``rename`` on every renamed key (renumbering that a regular expression cannot do)."""
    origins: dict[str, str] = {}
    mapped, unmatched = apply_rules(source, rules, origins)
    if rename is not None:
        mapped = {rename(k): v for k, v in mapped.items()}
        origins = {rename(k): v for k, v in origins.items()}
    return mapped, unmatched, origins


def fill_target(mapped: dict[str, torch.Tensor], unmatched: list[str], origins: dict[str, str],
                target: dict[str, torch.Tensor], where: str, what: str,
                hint: str = "check --from, and give the recipe of the released architecture with --recipe"
                ) -> dict[str, torch.Tensor]:
    """A source state dict renamed by :func:`map_state` into exactly the keys and shapes of ``target``
    (a model's state dict). What :func:`map_state` gave is checked against ``target``: every tensor placed, none missing,
    the same shapes, or one error naming the keys (a shape mismatch names the tensor as the file
    names it, ``origins``, and both shapes; ``hint`` says what to do).

    Target entries that are not learnt (buffers that the model computes, e.g. a relative-position
    index) are taken from ``target`` itself when the source has no counterpart.
    """
    problems = []
    if unmatched:
        problems.append(f"{len(unmatched)} tensors of the file have no place in the model: {_keys(unmatched)}")
    missing = [k for k in target if k not in mapped and not k.endswith(("relative_position_index", "k_bias"))]
    if missing:
        problems.append(f"{len(missing)} tensors of the model are not in the file: {_keys(missing)}")
    extra = [k for k in mapped if k not in target]
    if extra:
        problems.append(f"mapped names the model lacks: {_keys(extra)}")
    shapes = [f"{origins.get(k, k)} is {tuple(mapped[k].shape)} in the file, {k} is {tuple(target[k].shape)} in the model"
              for k in mapped if k in target and mapped[k].shape != target[k].shape]
    if shapes:
        problems.append("shape mismatch: " + _keys(shapes, 3))
    if problems:
        raise SegcliError(f"not a {what} checkpoint of this architecture: " + "; ".join(problems), where, hint)
    return {k: mapped[k].to(target[k].dtype) if k in mapped else target[k] for k in target}


_OFFICIAL_HEAD = re.compile(r"@(decode_head|auxiliary_head\.(\d+))@")


def segcli_head_names(key: str) -> str:
    """``@decode_head@`` -> ``decode_head``, ``@auxiliary_head.i@`` -> ``aux_heads.i``: MMSegmentation's
    head names (placeholders left by rules that match either head) in segcli's."""
    return _OFFICIAL_HEAD.sub(lambda m: "decode_head" if m.group(2) is None else f"aux_heads.{m.group(2)}", key)
