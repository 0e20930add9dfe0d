"""DToP@Direct and the DToP FLOPs split: the library side of ``segcli prune`` (thesis ch. 5).

:func:`prune_checkpoint` turns a trained model that has auxiliary heads (SegViT with ATM
auxiliary heads, SETR with FCN ones; a plain ``encoder_decoder``) into a pruned one with no
training (DToP@Direct, thesis 5.3.3.1): it rewrites the checkpoint's embedded recipe to
``model.type: dtop`` with the options ``p0`` / ``k`` / ``exit_layers``, checks that the weights fit
the pruned model, and writes a checkpoint (same payload as the trainer's: ``version``,
``recipe``, ``meta``, ``model``) that ``eval`` / ``predict`` / ``flops`` use as is. Re-pruning an
already pruned checkpoint replaces its options. DToP@Finetune is a recipe
(``recipes/dtop_vit_b_ade20k_finetune.yaml``: ``model.type: dtop`` + ``train.init_from``).

:func:`gflops_split` counts one forward with fvcore (attention included, as ``engine/flops.py``)
and splits off the auxiliary heads' share, since the thesis' figures (tables 5.1-5.7) leave the
auxiliary heads out while what really runs includes them (SPEC "DToP: FLOPs").
"""
from __future__ import annotations

import copy
from pathlib import Path

import torch
from torch import nn

from .engine.checkpoint import load_model_state, read_checkpoint, save_checkpoint
from .errors import SegcliError
from .models import dtop as _dtop  # registers the 'dtop' segmentor

__all__ = ["prune_checkpoint", "pruned_recipe", "parse_layers", "gflops_split"]

_OPTION_FLAGS = {"p0": "--p0", "k": "--k", "exit_layers": "--layers"}


def parse_layers(text: str | None) -> tuple[int, ...] | None:
    """``"5,7"`` -> ``(5, 7)`` (0-based blocks); None or empty -> None (every auxiliary head)."""
    if text is None or not text.strip():
        return None
    try:
        return tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise SegcliError(f"'{text}' is not a list of block numbers", "--layers",
                          "e.g. --layers 5,7 (0-based)") from None


def pruned_recipe(recipe: dict, p0: float = 0.95, k: int = 5, layers: tuple[int, ...] | None = None) -> dict:
    """A recipe dict (as embedded in checkpoints) with ``model.type: dtop`` and these options."""
    raw = copy.deepcopy(recipe)
    model = raw.setdefault("model", {})
    if model.get("type", "encoder_decoder") not in ("encoder_decoder", "dtop"):
        raise SegcliError(f"DToP wraps an encoder_decoder model, not '{model.get('type')}'", "model.type")
    options = dict(model.get("options") or {}) if model.get("type") == "dtop" else {}
    options.update({"p0": float(p0), "k": int(k), "exit_layers": None if layers is None else [int(b) for b in layers]})
    model["type"], model["options"] = "dtop", options
    # DToP combines the stages' per-token predictions before upsampling: the ATM head's "low" order.
    # The weights do not depend on it, so a base model trained with mask_resolution: full prunes as is.
    for head in [model.get("decode_head") or {}, *(model.get("aux_heads") or [])]:
        if isinstance(head, dict) and head.get("type") == "atm":
            head["mask_resolution"] = "low"
    return raw


def prune_checkpoint(checkpoint: str | Path, p0: float = 0.95, k: int = 5, layers: tuple[int, ...] | None = None,
                     out: str | Path | None = None) -> Path:
    """DToP@Direct: write a pruned copy of ``checkpoint`` (default ``<stem>_dtop.pt`` beside it).

    ``layers`` are the 0-based blocks whose auxiliary heads grade tokens (None = every auxiliary
    head before the decode head's block). Raises :class:`SegcliError` when the model has no
    auxiliary heads, a layer has none, or the options are out of range.
    """
    from .api import build_model, without_pretrained
    from .recipe import recipe_from_dict

    if not 0.0 < p0 <= 1.0:
        raise SegcliError(f"p0 must be in (0, 1], got {p0}", "--p0", "e.g. 0.95; 1.0 = no pruning")
    if k < 0:
        raise SegcliError(f"k must be >= 0, got {k}", "--k", "the thesis uses 5")
    source = Path(checkpoint).expanduser()
    payload = read_checkpoint(source)
    model_raw = payload["recipe"].get("model", {})
    if not model_raw.get("aux_heads"):
        raise SegcliError("the model has no auxiliary heads to grade tokens with", str(source),
                          "DToP@Direct needs a model trained with aux_heads on the exit blocks, "
                          "e.g. recipes/dtop_vit_b_ade20k.yaml or recipes/tiny/dtop.yaml")
    raw = pruned_recipe(payload["recipe"], p0, k, layers)
    try:
        recipe = recipe_from_dict(raw, where="model")
        model = build_model(without_pretrained(recipe), num_classes=payload["meta"]["num_classes"])
    except SegcliError as err:  # name the flag the user typed, not the recipe key we wrote
        key = (err.where or "").rsplit("model.options.", 1)[-1].split(".")[0].split("[")[0]
        raise SegcliError(err.message, _OPTION_FLAGS.get(key, str(source)), err.hint) from None
    load_model_state(model, payload["model"], str(source))
    target = Path(out).expanduser() if out is not None else source.with_name(f"{source.stem}_dtop.pt")
    return save_checkpoint(target, {
        "version": payload.get("version"),
        "recipe": recipe.to_dict(),
        "meta": payload["meta"],
        "model": model.state_dict(),
    })


def gflops_split(model: nn.Module, *inputs: torch.Tensor) -> dict[str, float]:
    """GFLOPs of ``model(*inputs)`` in eval mode: ``gflops`` (everything that runs),
    ``gflops_aux`` (auxiliary heads + grading) and ``gflops_without_aux`` (the thesis' figures)."""
    from .engine.flops import count_flops_split

    total, aux = count_flops_split(model, *inputs)
    return {"gflops": total, "gflops_aux": aux, "gflops_without_aux": total - aux}
