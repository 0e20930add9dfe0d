"""Optimizer with parameter groups, and the warmup + poly learning-rate rule.

Groups (MMSegmentation's ``paramwise_cfg`` habits): parameters outside the backbone take
``lr × head_lr_mult``; norm weights/biases (LayerNorm, BatchNorm, GroupNorm), position
embeddings and whatever a module lists in its ``no_weight_decay_names()`` take no weight decay (``no_wd_norm``;
``wd_embeddings`` exempts the norms only, as the released SegViT configs' ``paramwise_cfg`` does);
with ``layer_decay`` the backbone's layer ``i`` of ``L`` takes ``lr × decay^(L-1-i)`` (BEiT
fine-tuning). The lr of iteration ``it`` is a pure function of ``it`` (mmcv 0.x "poly" with linear
warmup: ``base · poly(it) · warmup(it)``), so resuming needs only the iteration number.
"""
from __future__ import annotations

import torch
from torch import nn

_NORMS = (nn.LayerNorm, nn.GroupNorm, nn.modules.batchnorm._BatchNorm)


def _no_decay_names(model: nn.Module, embeddings: bool = True) -> set[str]:
    names = set()
    for module_name, module in model.named_modules():
        if isinstance(module, _NORMS):
            names |= {f"{module_name}.{p}" if module_name else p for p, _ in module.named_parameters(recurse=False)}
        if embeddings and hasattr(module, "no_weight_decay_names"):  # position embeddings, class queries, ...
            prefix = f"{module_name}." if module_name else ""
            names |= {prefix + n for n in module.no_weight_decay_names()}
    return names


def param_groups(model: nn.Module, cfg) -> list[dict]:
    """Parameter groups for ``cfg`` (an ``OptimizerConfig``); each group carries ``lr_scale``."""
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


def lr_factor(iteration: int, train_cfg) -> float:
    """Multiplier of the base lr at ``iteration`` (0-based): poly decay × linear warmup."""
    progress = min(iteration / train_cfg.max_iters, 1.0)
    poly = (1 - progress) ** train_cfg.poly_power
    base = train_cfg.optimizer.lr
    min_factor = train_cfg.min_lr / base if base > 0 else 0.0
    factor = (1 - min_factor) * poly + min_factor
    if iteration < train_cfg.warmup_iters:
        k = (1 - iteration / train_cfg.warmup_iters) * (1 - train_cfg.warmup_ratio)
        factor *= 1 - k
    return factor


def set_lr(optimizer: torch.optim.Optimizer, iteration: int, train_cfg) -> float:
    factor = lr_factor(iteration, train_cfg)
    for group in optimizer.param_groups:
        group["lr"] = train_cfg.optimizer.lr * group["lr_scale"] * factor
    return train_cfg.optimizer.lr * factor
