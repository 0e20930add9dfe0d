"""DToP@Direct and the DToP FLOPs split: the workflow of ``segcli prune`` (thesis ch. 5).

:func:`prune_checkpoint` turns a trained model that has auxiliary heads (SegViT with ATM
auxiliary heads, SETR with FCN ones; a plain ``encoder_decoder``) into a pruned one with no
training (DToP@Direct, thesis 5.3.3.1): the checkpoint's embedded recipe becomes
``model.type: dtop`` with typed :class:`~segcli.models.dtop.DToPOptions` (``p0``, ``k``,
``exit_layers``), the weights are checked against the pruned model, and a checkpoint (the
trainer's payload: ``version``, ``recipe``, ``meta``, ``model``) is written that ``eval`` /
``predict`` / ``flops`` use as is. Re-pruning an already pruned checkpoint replaces those three
options and keeps the others. DToP@Finetune is a recipe (``recipes/dtop_vit_b_ade20k_finetune.yaml``:
``model.type: dtop`` + ``train.init_from``).

Errors about an option name the option (``where="p0"``, ``"k"``, ``"exit_layers"``): the
arguments of :func:`prune_checkpoint` are the options by name, and the CLI maps them onto its
flags by the same names.

:func:`gflops_split` counts one forward with fvcore (attention included, as ``engine/flops.py``)
and splits off the auxiliary heads' share: the thesis' tables 5.1-5.7 leave the auxiliary heads
out, while what really runs includes them.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
from torch import nn

from ..build import build_model, without_pretrained
from ..configurable import Component, from_dict
from ..engine.checkpoint import load_model_state, read_checkpoint, save_checkpoint
from ..engine.flops import count_flops_split
from ..errors import SegcliError
from ..models.dtop import DToPOptions
from ..outputs import check_outputs
from ..recipe import Recipe, recipe_from_dict

__all__ = ["PruneResult", "prune", "prune_checkpoint", "pruned_recipe", "dtop_options", "parse_layers", "gflops_split", "PRUNE_OPTIONS"]

PRUNE_OPTIONS = ("p0", "k", "exit_layers")  # the DToPOptions fields that prune sets


def parse_layers(text: str | None) -> tuple[int, ...] | None:
    """``"5,7"`` -> ``(5, 7)`` (0-based blocks); None or empty -> None (every auxiliary head)."""
    if text is None or not text.strip():
        return None
    try:
        return tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise SegcliError(f"'{text}' is not a list of block numbers", "exit_layers",
                          "e.g. 5,7 (0-based blocks)") from None


def dtop_options(p0: float = 0.95, k: int = 5, exit_layers: tuple[int, ...] | None = None) -> DToPOptions:
    """The options prune sets, typed as a recipe's ``model.options`` are (the same ranges), with an
    error naming the option by itself (``where="p0"``)."""
    return from_dict(DToPOptions, {"p0": p0, "k": k, "exit_layers": exit_layers}, where="")


def pruned_recipe(recipe: Recipe, options: DToPOptions) -> Recipe:
    """The recipe with ``model.type: dtop`` and ``options`` (:func:`dtop_options`). Re-pruning a
    ``dtop`` recipe replaces the :data:`PRUNE_OPTIONS` only and keeps its other options.

    DToP combines the stages' per-token predictions before upsampling, which is an ATM head's
    ``mask_resolution: low`` order; the weights do not depend on it, so heads with that setting
    are switched to it (a base model trained with ``mask_resolution: full`` prunes as is).
    """
    model = recipe.model
    if model.type not in ("encoder_decoder", "dtop"):
        raise SegcliError(f"DToP wraps an encoder_decoder model, not '{model.type}'", "model.type")
    if model.type == "dtop":
        options = dataclasses.replace(model.options, **{name: getattr(options, name) for name in PRUNE_OPTIONS})

    def low_order(head: Component) -> Component:
        if head.cfg is not None and hasattr(head.cfg, "mask_resolution"):
            return Component(head.type, dataclasses.replace(head.cfg, mask_resolution="low"))
        return head

    model = dataclasses.replace(model, type="dtop", options=options, decode_head=low_order(model.decode_head),
                                aux_heads=tuple(low_order(h) for h in model.aux_heads))
    return recipe.replace(model=model)


def prune_checkpoint(checkpoint: str | Path, p0: float = 0.95, k: int = 5,
                     exit_layers: str | tuple[int, ...] | None = None, out: str | Path | None = None,
                     overwrite: bool = False) -> Path:
    """DToP@Direct: write a pruned copy of ``checkpoint`` (default ``<stem>_dtop.pt`` beside it).

    The copy never replaces ``checkpoint`` and replaces another existing file only with
    ``overwrite`` (:func:`segcli.outputs.check_outputs`), checked before the checkpoint is read.

    ``exit_layers`` are the 0-based blocks whose auxiliary heads grade tokens (None = every
    auxiliary head before the decode head's block), as a tuple or as text (``"5,7"``). Raises :class:`SegcliError` when the model has
    no auxiliary heads, a layer has none, or an option is out of range.
    """
    if isinstance(exit_layers, str):
        exit_layers = parse_layers(exit_layers)
    options = dtop_options(p0, k, exit_layers)  # the options first: nothing read in vain
    source = Path(checkpoint).expanduser()
    target = Path(out).expanduser() if out is not None else source.with_name(f"{source.stem}_dtop.pt")
    check_outputs([target], inputs=[source], overwrite=overwrite, input_name="checkpoint")
    payload = read_checkpoint(source)
    recipe = recipe_from_dict(payload["recipe"], where=f"{source} (embedded recipe)")
    if not recipe.model.aux_heads:
        raise SegcliError("the model has no auxiliary heads to grade tokens with", str(source),
                          "DToP@Direct needs a model trained with aux_heads on the exit blocks, "
                          "e.g. recipes/dtop_vit_b_ade20k.yaml or recipes/tiny/dtop.yaml")
    recipe = pruned_recipe(recipe, options)
    try:
        model = build_model(without_pretrained(recipe), num_classes=payload["meta"]["num_classes"])
    except SegcliError as err:  # the model checks the options against its heads: name the option
        option = (err.where or "").rsplit("model.options.", 1)[-1]
        raise SegcliError(err.message, option if option in PRUNE_OPTIONS else str(source), err.hint) from None
    load_model_state(model, payload["model"], str(source))
    return save_checkpoint(target, {
        "version": payload.get("version"),
        "recipe": recipe.to_dict(),
        "meta": payload["meta"],
        "model": model.state_dict(),
    })


@dataclasses.dataclass(frozen=True)
class PruneResult:
    checkpoint: Path  # the pruned checkpoint written
    p0: float
    k: int
    exit_layers: tuple[int, ...] | None  # as given (None: every auxiliary head)

    def to_dict(self) -> dict:
        """The ``prune --json`` object."""
        return {"checkpoint": str(self.checkpoint), "p0": self.p0, "k": self.k,
                "exit_layers": list(self.exit_layers) if self.exit_layers is not None else None}


def prune(checkpoint: str | Path, p0: float = 0.95, k: int = 5, exit_layers: str | tuple[int, ...] | None = None,
          out: str | Path | None = None, overwrite: bool = False) -> PruneResult:
    """:func:`prune_checkpoint`, returning what was written with the options it was written with."""
    layers = parse_layers(exit_layers) if isinstance(exit_layers, str) else exit_layers
    path = prune_checkpoint(checkpoint, p0=p0, k=k, exit_layers=layers, out=out, overwrite=overwrite)
    return PruneResult(Path(path), p0, k, tuple(layers) if layers is not None else None)


def gflops_split(model: nn.Module, *inputs: torch.Tensor) -> dict[str, float]:
    """GFLOPs of ``model(*inputs)`` in eval mode: ``gflops`` (everything that runs),
    ``gflops_aux`` (auxiliary heads + grading) and ``gflops_without_aux`` (the thesis' figures)."""
    total, aux = count_flops_split(model, *inputs)
    return {"gflops": total, "gflops_aux": aux, "gflops_without_aux": total - aux}
