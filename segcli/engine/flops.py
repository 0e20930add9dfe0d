"""GFLOPs with fvcore, attention included (how the thesis' tables count).

fvcore counts one multiply-add as one flop and has no handle for
``aten::scaled_dot_product_attention``; we register one that counts ``Nq·Nk·d`` (QKᵀ) plus
``Nq·Nk·dv`` (AV) per batch·head (checked against the thesis' backbone counts in the tests).
"""
from __future__ import annotations

import math
import warnings
from typing import Any

import torch
from torch import nn


def _shape(value) -> list[int]:
    return list(value.type().sizes())


def sdpa_flop_jit(inputs: list[Any], outputs: list[Any]) -> int:
    """fvcore op handle: q [..., Nq, d], k [..., Nk, d], v [..., Nk, dv].

    An additive float ``attn_mask`` (BEiT's relative position bias, DToP's padding) adds one
    flop per attention logit (Nq·Nk per batch·head), as an explicit ``attn + bias`` would.
    """
    q, k, v = (_shape(x) for x in inputs[:3])
    batch = math.prod(q[:-2])
    flops = batch * q[-2] * k[-2] * (q[-1] + v[-1])
    mask = inputs[3] if len(inputs) > 3 else None
    if mask is not None and mask.type().kind() == "TensorType":
        flops += batch * q[-2] * k[-2]
    return flops


def flop_analysis(model: nn.Module, *inputs: torch.Tensor) -> tuple[float, dict[str, int]]:
    """``(total flops, flops by module name)`` of ``model(*inputs)`` in eval mode, no grad; every
    module's training flag is restored afterwards."""
    with warnings.catch_warnings():  # fvcore's import scripts a loss with torch.jit (deprecated in new torch)
        warnings.simplefilter("ignore", FutureWarning)
        from fvcore.nn import FlopCountAnalysis

    modes = [(module, module.training) for module in model.modules()]  # restored one by one below
    model.eval()
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            analysis = FlopCountAnalysis(model, inputs)
            analysis.set_op_handle("aten::scaled_dot_product_attention", sdpa_flop_jit)
            analysis.unsupported_ops_warnings(False)
            analysis.uncalled_modules_warnings(False)
            analysis.tracer_warnings("none")
            return analysis.total(), analysis.by_module()
    finally:
        for module, training in modes:
            module.training = training


def count_flops_split(model: nn.Module, *inputs: torch.Tensor) -> tuple[float, float]:
    """``(GFLOPs of model(*inputs), GFLOPs of its auxiliary modules)``: the submodules that any
    module of ``model`` names in its ``aux_flop_modules`` attribute (DToP: auxiliary heads and
    grading), counted in the same trace."""
    total, by_module = flop_analysis(model, *inputs)
    return total / 1e9, sum(by_module.get(prefix, 0) for prefix in aux_flop_prefixes(model)) / 1e9


def aux_flop_prefixes(model: nn.Module) -> list[str]:
    """Qualified names of the auxiliary submodules that the modules of ``model`` name in their
    ``aux_flop_modules`` attribute (empty for a model without any)."""
    return [f"{name}.{aux}" if name else aux
            for name, module in model.named_modules() for aux in getattr(module, "aux_flop_modules", ())]


def count_flops(model: nn.Module, *inputs: torch.Tensor) -> float:
    """Total GFLOPs of ``model(*inputs)`` (eval mode, no grad)."""
    total, _ = flop_analysis(model, *inputs)
    return total / 1e9


def count_params(model: nn.Module) -> float:
    """Parameters in millions."""
    return sum(p.numel() for p in model.parameters()) / 1e6
