"""Optimizer with parameter groups, and the warmup + poly learning-rate rule.

Two ways to form the groups:

* ``paramwise`` (:func:`paramwise_groups`): the official configs' ``paramwise_cfg``, with mmcv
  1.7 ``DefaultOptimizerConstructor`` semantics (mmcv ``runner/optimizer/default_constructor.py``),
  matched on the official parameter names (``segcli/convert/official_names.py``).
* the legacy rules (``paramwise: null``): parameters outside the backbone take
  ``lr × head_lr_mult``; norm weights/biases (LayerNorm, BatchNorm, GroupNorm), position
  embeddings and whatever a module lists in its ``no_weight_decay_names()`` take no weight decay
  (``no_wd_norm``; ``wd_embeddings`` exempts the norms only); with ``layer_decay`` the backbone's
  layer ``i`` of ``L`` takes ``lr × decay^(L-1-i)`` (BEiT fine-tuning).

The lr of iteration ``it`` is a pure function of ``it`` (mmcv 1.x ``PolyLrUpdaterHook`` with linear
warmup, :func:`group_lr`), so resuming needs only the iteration number.
"""
from __future__ import annotations

import torch
from torch import nn

from ..convert.official_names import official_names

_NORMS = (nn.LayerNorm, nn.GroupNorm, nn.modules.batchnorm._BatchNorm)
# mmcv's ``is_norm``: _BatchNorm, _InstanceNorm, GroupNorm, LayerNorm
_MMCV_NORMS = (nn.modules.batchnorm._BatchNorm, nn.modules.instancenorm._InstanceNorm, nn.GroupNorm, nn.LayerNorm)


def _no_decay_names(model: nn.Module, embeddings: bool = True) -> set[str]:
    names = set()
    for module_name, module in model.named_modules():
        if isinstance(module, _NORMS):
            names |= {f"{module_name}.{p}" if module_name else p for p, _ in module.named_parameters(recurse=False)}
        if embeddings and hasattr(module, "no_weight_decay_names"):  # position embeddings, class queries, ...
            prefix = f"{module_name}." if module_name else ""
            names |= {prefix + n for n in module.no_weight_decay_names()}
    return names


def paramwise_groups(model: nn.Module, cfg) -> list[dict]:
    """Groups by ``cfg.paramwise`` with mmcv 1.7's ``DefaultOptimizerConstructor.add_params`` rules.

    For each trainable parameter, with ``name`` its official name (the segcli name where the model
    has no converter key map):

    * ``custom_keys``, tried longest first and alphabetically among equal lengths: the first key
      that is a substring of ``name`` sets ``lr = base lr × lr_mult`` and ``weight_decay = base wd
      × decay_mult`` (each 1 when absent), and no other rule applies. So ``head`` wins over
      ``norm`` (same length, ``head`` sorts first) and a head's norms keep their weight decay.
    * otherwise a bias (local name ``bias``, not of a norm) takes ``bias_lr_mult``; the weight decay
      multiplier is ``norm_decay_mult`` for parameters of a norm module (BatchNorm, InstanceNorm,
      GroupNorm, LayerNorm), else ``dwconv_decay_mult`` for a depth-wise conv, else
      ``bias_decay_mult`` for a bias; unset multipliers are 1, as are unmatched parameters.
    * ``bypass_duplicate``: a parameter shared by two modules is listed once by
      ``named_parameters``, so it is always one group's (mmcv without the flag would fail).

    MMEngine 0.7's ``DefaultOptimWrapperConstructor`` (DToP's configs) applies the same custom-key
    rule; it tries bias before depth-wise conv and adds ``flat_decay_mult``, which no official
    config here sets.
    """
    pw = cfg.paramwise
    sorted_keys = sorted(sorted(pw.custom_keys), key=len, reverse=True)
    modules = dict(model.named_modules())
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    _, official = official_names(n for n, _ in trainable)
    groups: dict[tuple, dict] = {}
    for name, param in trainable:
        module = modules[name.rpartition(".")[0]]
        full = official.get(name, name)
        local = full.rpartition(".")[2]  # ``in_proj_bias`` (official) is not a ``bias``
        key = next((k for k in sorted_keys if k in full), None)
        lr_mult, decay_mult = 1.0, 1.0
        if key is not None:
            lr_mult = pw.custom_keys[key].get("lr_mult", 1.0)
            decay_mult = pw.custom_keys[key].get("decay_mult", 1.0)
        else:
            is_norm = isinstance(module, _MMCV_NORMS)
            is_dwconv = isinstance(module, nn.Conv2d) and module.in_channels == module.groups
            if local == "bias" and not is_norm and pw.bias_lr_mult is not None:
                lr_mult = pw.bias_lr_mult
            if is_norm:
                decay_mult = 1.0 if pw.norm_decay_mult is None else pw.norm_decay_mult
            elif is_dwconv:
                decay_mult = 1.0 if pw.dwconv_decay_mult is None else pw.dwconv_decay_mult
            elif local == "bias":
                decay_mult = 1.0 if pw.bias_decay_mult is None else pw.bias_decay_mult
        decay = cfg.weight_decay * decay_mult
        group = groups.setdefault((round(lr_mult, 12), decay),
                                  {"params": [], "lr_scale": lr_mult, "weight_decay": decay, "names": []})
        group["params"].append(param)
        group["names"].append(name)
    return list(groups.values())


def param_groups(model: nn.Module, cfg) -> list[dict]:
    """Parameter groups for ``cfg`` (an ``OptimizerConfig``); each group carries ``lr_scale``."""
    if cfg.paramwise is not None:
        return paramwise_groups(model, cfg)
    no_decay = _no_decay_names(model, embeddings=not cfg.wd_embeddings) if cfg.no_wd_norm else set()
    backbone = getattr(model, "backbone", None)
    groups: dict[tuple, dict] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        in_backbone = name.startswith("backbone.")
        scale = 1.0 if in_backbone else cfg.head_lr_mult
        if in_backbone and cfg.layer_decay is not None and backbone is not None:
            layer = backbone.layer_id(name.removeprefix("backbone."))
            scale *= cfg.layer_decay ** (backbone.num_layers - 1 - layer)
        decay = 0.0 if name in no_decay else cfg.weight_decay
        key = (round(scale, 12), decay)
        group = groups.setdefault(key, {"params": [], "lr_scale": scale, "weight_decay": decay, "names": []})
        group["params"].append(param)
        group["names"].append(name)
    return list(groups.values())


def build_optimizer(model: nn.Module, cfg) -> torch.optim.Optimizer:
    groups = param_groups(model, cfg)
    for group in groups:
        group["lr"] = cfg.lr * group["lr_scale"]
        group.pop("names")
    # the fused kernels (one pass per tensor) when every parameter is a float tensor on the CPU or
    # a CUDA device: the same update as the per-tensor loop, several times faster on CPU (the
    # loop's many small ops were a tenth of a small model's training step)
    fused = all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for g in groups for p in g["params"])
    if cfg.type == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay,
                               fused=fused or None)
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay, fused=fused or None)


def group_lr(iteration: int, train_cfg, lr_scale: float = 1.0) -> float:
    """The lr of a group whose initial lr is ``base lr × lr_scale`` at ``iteration`` (0-based, the
    iterations done before this step): mmcv 1.7 ``PolyLrUpdaterHook`` with linear warmup
    (mmcv ``runner/hooks/lr_updater.py``).

    The regular lr is ``(initial - min_lr) · (1 - it / max_iters)^power + min_lr`` (``min_lr`` the
    same absolute floor for every group); during warmup that regular lr is multiplied by
    ``1 - (1 - it / warmup_iters) · (1 - warmup_ratio)``. ``train.lr_schedule: mmengine`` gives
    :func:`mmengine_group_lr` instead.
    """
    if train_cfg.lr_schedule == "mmengine":
        return mmengine_group_lr(iteration, train_cfg, lr_scale, train_cfg.poly_end)
    initial = train_cfg.optimizer.lr * lr_scale
    progress = min(iteration / train_cfg.max_iters, 1.0)
    lr = (initial - train_cfg.min_lr) * (1 - progress) ** train_cfg.poly_power + train_cfg.min_lr
    if iteration < train_cfg.warmup_iters:
        lr *= 1 - (1 - iteration / train_cfg.warmup_iters) * (1 - train_cfg.warmup_ratio)
    return lr


def mmengine_group_lr(iteration: int, train_cfg, lr_scale: float = 1.0, poly_end: int | None = None) -> float:
    """The lr of the DToP configs' schedule (zbwxp/Dynamic-Token-Pruning ``config/prune/*.py``:
    MMEngine 0.7 ``LinearLR(start_factor, begin=0, end=warmup_iters)`` then ``PolyLR(eta_min, power,
    begin=warmup_iters, end=poly_end)``, mmengine ``optim/scheduler/param_scheduler.py``).

    Unlike :func:`group_lr`, the poly decay starts where the warmup ends and the warmup scales the
    constant initial lr. MMEngine schedulers span ``end - begin - 1`` steps: the warmup factor is
    ``warmup_ratio + (1 - warmup_ratio) · it / (warmup_iters - 1)`` (1 at ``warmup_iters - 1``), and
    the poly reaches ``min_lr`` at ``poly_end - 1`` and stays there. ``poly_end`` defaults to
    ``max_iters``; DToP's ``BASE_segvit_ade20k.py`` trains 40k iterations with ``end=160000``.
    """
    initial = train_cfg.optimizer.lr * lr_scale
    warmup = train_cfg.warmup_iters
    if iteration < warmup:
        ratio = train_cfg.warmup_ratio
        return initial * (ratio + (1 - ratio) * iteration / max(warmup - 1, 1))
    span = (poly_end or train_cfg.max_iters) - warmup - 1
    progress = min((iteration - warmup) / span, 1.0) if span > 0 else 1.0
    return (initial - train_cfg.min_lr) * (1 - progress) ** train_cfg.poly_power + train_cfg.min_lr


def lr_factor(iteration: int, train_cfg) -> float:
    """Multiplier of the base lr at ``iteration`` (0-based): poly decay × linear warmup."""
    base = train_cfg.optimizer.lr
    return group_lr(iteration, train_cfg) / base if base > 0 else 0.0


def set_lr(optimizer: torch.optim.Optimizer, iteration: int, train_cfg) -> float:
    for group in optimizer.param_groups:
        group["lr"] = group_lr(iteration, train_cfg, group["lr_scale"])
    return group_lr(iteration, train_cfg)
