"""Optimizer and schedule parity with the official training code (issue 22).

Fixture ``tests/fixtures/official/segvit-optim*`` (tools/make_parity_fixtures.py, format
``segvit-optim``): mmcv 1.7.2 ``build_optimizer`` with each official SegViT config's
``paramwise_cfg`` on the reduced models of the ``segvit-v1`` / ``segvit-v1-shrunk`` fixtures,
``PolyLrUpdaterHook`` lrs, the official ``ATMLoss`` on fixed random outputs, and one
``train_step`` + ``OptimizerHook`` step of the ADE20K config.
"""
from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch
from torch import nn

from conftest import REPO

from segcli import api
from segcli.convert.keymap import apply_rules
from segcli.convert.official_names import official_names
from segcli.convert.segvit import segvit_v1_rules, zero_based_stages
from segcli.engine.optim import build_optimizer, group_lr, mmengine_group_lr, param_groups, set_lr
from segcli.errors import SegcliError
from segcli.models.atm_criterion import ATMCriterion
from segcli.recipe import OptimizerConfig, ParamwiseConfig, TrainConfig

FIXTURES = REPO / "tests" / "fixtures" / "official"
RECIPES = REPO / "tests" / "fixtures" / "recipes"
INFO = json.loads((FIXTURES / "segvit-optim.json").read_text())
SMALL = {"segvit-v1": "segvit_v1_small.yaml", "segvit-v1-shrunk": "segvit_v1_shrunk_small.yaml"}


def train_overrides(config: dict) -> list[str]:
    """The official config's optimizer, schedule and clip as recipe overrides (paramwise verbatim)."""
    opt, lr_cfg = config["optimizer"], config["lr_config"]
    optimizer = dict(type=opt["type"].lower(), lr=opt["lr"], betas=list(opt["betas"]),
                     weight_decay=opt["weight_decay"], paramwise=opt["paramwise_cfg"])
    return [f"train.optimizer={json.dumps(optimizer)}", f"train.max_iters={config['max_iters']}",
            f"train.warmup_iters={lr_cfg['warmup_iters']}", f"train.warmup_ratio={lr_cfg['warmup_ratio']}",
            f"train.poly_power={lr_cfg['power']}", f"train.min_lr={lr_cfg['min_lr']}",
            f"train.grad_clip={config['optimizer_config']['grad_clip']['max_norm']}"]


def official_groups(model: nn.Module, optimizer_cfg) -> dict[str, tuple[float, float]]:
    """{official name: (lr, weight decay)} of segcli's groups."""
    _, official = official_names(n for n, _ in model.named_parameters())
    out = {}
    for group in param_groups(model, optimizer_cfg):
        for name in group["names"]:
            out[official[name]] = (optimizer_cfg.lr * group["lr_scale"], group["weight_decay"])
    return out


@pytest.mark.parametrize("config_path", sorted(INFO["configs"]))
def test_param_groups_match_official_build_optimizer(config_path):
    config = INFO["configs"][config_path]
    recipe = api.load_recipe(RECIPES / SMALL[config["model"]], train_overrides(config))
    model = api.build_model(recipe, num_classes=6)
    ours = official_groups(model, recipe.train.optimizer)
    theirs = {k: tuple(v) for k, v in config["params"].items() if k != "backbone.cls_token"}  # segcli has none
    assert set(ours) == set(theirs)
    wrong = {k: (ours[k], v) for k, v in theirs.items() if not all(math.isclose(a, b, rel_tol=1e-12, abs_tol=0)
                                                                   for a, b in zip(ours[k], v))}
    assert not wrong
    # what the longest-key rule decides: a head norm keeps its weight decay, a backbone norm has none
    assert theirs["decode_head.decoder_1.layers.0.norm1.weight"][1] == config["optimizer"]["weight_decay"]
    assert theirs["backbone.layers.0.ln1.weight"][1] == 0.0


@pytest.mark.parametrize("config_path", sorted(INFO["configs"]))
def test_lr_schedule_matches_poly_lr_updater_hook(config_path):
    config = INFO["configs"][config_path]
    recipe = api.load_recipe(RECIPES / SMALL[config["model"]], train_overrides(config))
    scales = {"backbone": 1.0, "head": config["optimizer"]["paramwise_cfg"]["custom_keys"]["head"]["lr_mult"]}
    for iteration, lrs in config["lr_at"].items():
        for part, lr in lrs.items():
            assert math.isclose(group_lr(int(iteration), recipe.train, scales[part]), lr, rel_tol=1e-9), (iteration, part)


def test_min_lr_is_one_absolute_floor_for_every_group():
    """mmcv PolyLrUpdaterHook: ``(initial_lr - min_lr) * coeff + min_lr`` per group, with the same
    ``min_lr`` for a x10 head group (not 10 x min_lr)."""
    train = TrainConfig(max_iters=100, warmup_iters=0, min_lr=1e-4, poly_power=0.9,
                        optimizer=OptimizerConfig(lr=0.01))
    assert math.isclose(group_lr(100, train, 10.0), 1e-4)
    assert math.isclose(group_lr(50, train, 10.0), (0.1 - 1e-4) * 0.5 ** 0.9 + 1e-4)


def test_atm_loss_matches_the_official_criterion():
    """Default ``mask_loss_ignore="negative"``: ignore pixels are negatives of every mask, as in
    zbwxp/SegVit losses/atm_loss.py + criterion.py; ``"exclude"`` gives other mask losses here."""
    io = torch.load(FIXTURES / "segvit-optim_io.pt", weights_only=True)
    ref = INFO["atm_loss"]
    logits, masks = io["atm.pred_logits"], io["atm.pred_masks"]
    outputs = {"pred_logits": logits[-1], "pred_masks": masks[-1],
               "aux_outputs": [{"pred_logits": logits[i], "pred_masks": masks[i]} for i in range(2)]}
    names = {"loss_ce": "loss_ce", "loss_focal": "loss_mask", "loss_dice": "loss_dice"}

    def official_key(key: str) -> str:
        stage, _, term = key.rpartition(".")
        return names[term] + (f"_{stage[1:]}" if stage else "")

    ours = ATMCriterion(ref["num_classes"])(outputs, io["atm.labels"])
    assert {official_key(k) for k in ours} == set(ref["losses"])
    for key, value in ours.items():
        assert math.isclose(float(value), ref["losses"][official_key(key)], rel_tol=1e-5), key
    exclude = ATMCriterion(ref["num_classes"], mask_loss_ignore="exclude")(outputs, io["atm.labels"])
    assert not math.isclose(float(exclude["loss_focal"]), ref["losses"]["loss_mask"], rel_tol=1e-3)


def _key_bias(name: str, tensor: torch.Tensor) -> torch.Tensor:
    """Elements that are attention *key* biases: their exact gradient is zero (softmax ignores a
    constant added to one query's logits), so AdamW moves them by float noise scaled to +-lr."""
    mask = torch.zeros_like(tensor, dtype=torch.bool)
    if name.endswith("k_proj.bias"):
        mask[:] = True
    elif name.endswith("qkv.bias"):
        third = tensor.numel() // 3
        mask[third:2 * third] = True
    return mask


def test_one_training_step_matches_the_official_step(tmp_path):
    """Same weights (segvit-v1 fixture, through segcli convert), same batch, dropout and drop-path
    off on both sides: loss terms, gradient norms before and after clipping (max_norm 35 clips
    here) and the parameters after one AdamW step at iteration 1000 (in the warmup)."""
    torch.manual_seed(0)
    step = INFO["step"]
    config = INFO["configs"][step["config"]]
    io = torch.load(FIXTURES / "segvit-optim_io.pt", weights_only=True)
    recipe = api.load_recipe(RECIPES / "segvit_v1_small.yaml", train_overrides(config))
    out = api.convert(FIXTURES / "segvit-v1.pth", recipe=RECIPES / "segvit_v1_small.yaml", out=tmp_path / "m.pt")
    model = api.load_checkpoint(out.path).model.train()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = build_optimizer(model, recipe.train.optimizer)
    set_lr(optimizer, step["iteration"], recipe.train)
    losses = model(io["step.images"], io["step.labels"])
    logged = {k: v for k, v in step["log_vars"].items() if "loss" in k and k != "loss"}
    assert len(losses) == len(logged)
    total = sum(losses.values())
    assert math.isclose(float(total.detach()), step["log_vars"]["loss"], rel_tol=1e-5)
    optimizer.zero_grad()
    total.backward()
    norm = nn.utils.clip_grad_norm_(model.parameters(), recipe.train.grad_clip)
    assert norm > recipe.train.grad_clip  # clipping is part of this step
    assert math.isclose(float(norm), step["grad_norm"], rel_tol=1e-5)

    _, official = official_names(before)
    squares: dict[str, float] = {}
    for name, param in model.named_parameters():  # in_proj = q, k, v: norms combine over the split
        squares[official[name]] = squares.get(official[name], 0.0) + float(param.grad.norm()) ** 2
    for name, (ref_norm, _) in step["grad_stats"].items():
        if name.endswith("k.bias") or name == "backbone.cls_token":
            continue  # zero in exact arithmetic (see _key_bias); segcli has no cls token
        assert math.isclose(math.sqrt(squares[name]), ref_norm, rel_tol=1e-4), name
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
    optimizer.step()

    updates = {k.removeprefix("step.update."): v for k, v in io.items() if k.startswith("step.update.")}
    mapped, unmatched = apply_rules(updates, segvit_v1_rules())
    assert not unmatched  # (the cls token is dropped by its rule: segcli has none)
    expected = {zero_based_stages(k): v for k, v in mapped.items()}
    assert set(expected) == set(before)
    worst, skipped = 0.0, 0
    for name, param in model.named_parameters():
        grad = grads[name]
        # left out: key biases and the few elements whose gradient is below AdamW's eps scale,
        # where g / (|g| + eps) follows float rounding
        noisy = (grad.abs() <= 1e-7) & (_key_bias(name, grad) | (grad != 0))
        theirs = before[name] + expected[name]
        error = ((param.detach() - theirs).abs() * ~noisy).max() / theirs.abs().max()
        worst, skipped = max(worst, float(error)), skipped + int(noisy.sum())
        # the update itself (the group's lr, the schedule), to a few float32 steps of the parameter
        moved = ((param.detach() - before[name]) - expected[name]).abs() * ~noisy
        ulp = torch.finfo(torch.float32).eps * float(theirs.abs().max())
        assert float(moved.max()) <= 1e-3 * float(expected[name].abs().max()) + 4 * ulp, name
    assert worst < 1e-5
    assert skipped < 0.01 * sum(p.numel() for p in before.values())


def test_clip_matches_official_clip_grads():
    """mmcv OptimizerHook.clip_grads (max_norm = half the total norm) = torch clip_grad_norm_ on the
    same gradients: per-tensor norms after clipping (the fixture's clip_test)."""
    clip = INFO["step"]["clip_test"]
    ratio = clip["max_norm"] / clip["total_norm"]
    for name, (norm, _) in clip["clipped_stats"].items():
        assert math.isclose(norm, INFO["step"]["grad_stats"][name][0] * ratio, rel_tol=1e-4, abs_tol=1e-12), name


def test_paramwise_and_legacy_fields_conflict():
    paramwise = '{custom_keys: {head: {lr_mult: 10.0}}}'
    with pytest.raises(SegcliError, match="wd_embeddings"):
        api.load_recipe(RECIPES / "segvit_v1_small.yaml",
                        [f"train.optimizer.paramwise={paramwise}", "train.optimizer.wd_embeddings=true"])
    with pytest.raises(SegcliError, match="custom_keys.head"):
        api.load_recipe(RECIPES / "segvit_v1_small.yaml", ["train.optimizer.paramwise={custom_keys: {head: {lr: 1}}}"])


class _Tiny(nn.Module):
    """No converter key map: the segcli names are matched as they are."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3)
        self.dw = nn.Conv2d(8, 8, 3, groups=8)
        self.bn = nn.BatchNorm2d(8)
        self.head_norm = nn.LayerNorm(8)
        self.head = nn.Linear(8, 2)


def test_paramwise_rules_on_segcli_names():
    """mmcv DefaultOptimizerConstructor: longest key first (ties alphabetical), then norm > dwconv > bias."""
    cfg = OptimizerConfig(lr=1.0, weight_decay=0.1, head_lr_mult=10.0, paramwise=ParamwiseConfig(
        custom_keys={"head": {"lr_mult": 5.0}, "head_norm": {"decay_mult": 0.5}, "norm": {"lr_mult": 3.0}},
        norm_decay_mult=0.0, bias_decay_mult=0.2, dwconv_decay_mult=0.3, bias_lr_mult=2.0))
    got = {}
    for group in param_groups(_Tiny(), cfg):
        got.update({n: (group["lr_scale"], group["weight_decay"]) for n in group["names"]})
    assert got["head_norm.weight"] == (1.0, 0.05)  # 'head_norm' is longer than 'head' / 'norm'
    assert got["head.weight"] == (5.0, 0.1)
    assert got["bn.weight"] == (1.0, 0.0) and got["bn.bias"] == (1.0, 0.0)  # norm: no bias_lr_mult
    assert got["dw.weight"] == (1.0, 0.1 * 0.3) and got["dw.bias"] == (2.0, 0.1 * 0.3)
    assert got["stem.weight"] == (1.0, 0.1) and got["stem.bias"] == (2.0, pytest.approx(0.02))


@pytest.mark.parametrize("recipe, keys", [("dtop_small.yaml", "dtop"), ("mmseg_setr_small.yaml", "mmseg-setr"),
                                          ("mmseg_deeplabv3plus_small.yaml", "mmseg-deeplabv3plus")])
def test_official_names_invert_the_converter_key_maps(recipe, keys):
    num_classes = json.loads((FIXTURES / f"{keys}.json").read_text())["num_classes"]
    model = api.build_model(api.load_recipe(RECIPES / recipe), num_classes=num_classes)
    names = [n for n, _ in model.named_parameters()]
    used, official = official_names(names)
    listed = {line.split("\t")[0] for line in (FIXTURES / f"{keys}_keys.txt").read_text().splitlines()}
    assert used == keys and set(official) == set(names) and set(official.values()) <= listed


# --------------------------------------------------------------------------- DToP (MMEngine 0.7)
# tests/fixtures/official/dtop_optim.json (tools/make_dtop_optim_fixture.py): build_optim_wrapper
# and the param_scheduler of every zbwxp/Dynamic-Token-Pruning config/prune/ config on the reduced
# model of the dtop fixture.
DTOP = json.loads((FIXTURES / "dtop_optim.json").read_text())


def dtop_train(config: dict) -> TrainConfig:
    opt = config["optim_wrapper"]["optimizer"]
    linear, poly = config["param_scheduler"]
    assert (linear["type"], linear["begin"], poly["type"], poly["begin"]) == ("LinearLR", 0, "PolyLR", linear["end"])
    paramwise = ParamwiseConfig(**config["optim_wrapper"]["paramwise_cfg"])
    return TrainConfig(max_iters=config["max_iters"], warmup_iters=linear["end"], warmup_ratio=linear["start_factor"],
                       poly_power=poly["power"], min_lr=poly["eta_min"], grad_clip=config["clip_grad"],
                       lr_schedule="mmengine", poly_end=poly["end"],
                       optimizer=OptimizerConfig(type=opt["type"].lower(), lr=opt["lr"], betas=tuple(opt["betas"]),
                                                 weight_decay=opt["weight_decay"], paramwise=paramwise))


@pytest.mark.parametrize("config_name", sorted(DTOP["configs"]))
def test_dtop_param_groups_match_mmengine(config_name):
    config = DTOP["configs"][config_name]
    train = dtop_train(config)
    model = api.build_model(api.load_recipe(RECIPES / "dtop_small.yaml"), num_classes=5)
    ours = official_groups(model, train.optimizer)
    theirs = {k: tuple(v) for k, v in config["params"].items() if k != "backbone.cls_token"}
    assert set(ours) == set(theirs)
    assert all(math.isclose(a, b, rel_tol=1e-12, abs_tol=0) for k, v in theirs.items() for a, b in zip(ours[k], v))
    assert config["clip_grad"] is None  # MMEngine clips only with optim_wrapper.clip_grad


@pytest.mark.parametrize("config_name", sorted(DTOP["configs"]))
def test_dtop_lr_schedule_matches_mmengine(config_name):
    config = DTOP["configs"][config_name]
    train = dtop_train(config)
    poly_end = config["param_scheduler"][1]["end"]
    scales = {"backbone": 1.0, "head": config["optim_wrapper"]["paramwise_cfg"]["custom_keys"]["head"]["lr_mult"]}
    for iteration, lrs in config["lr_at"].items():
        for part, lr in lrs.items():
            ours = mmengine_group_lr(int(iteration), train, scales[part], poly_end=poly_end)
            assert math.isclose(ours, lr, rel_tol=1e-9, abs_tol=1e-18), (iteration, part)
            # what training sets: train.lr_schedule: mmengine dispatches to the same rule
            assert math.isclose(group_lr(int(iteration), train, scales[part]), lr, rel_tol=1e-9, abs_tol=1e-18)
    # the mmcv rule differs: poly counted from iteration 0 and warmup over the decayed lr
    mmcv = dataclasses.replace(train, lr_schedule="mmcv")
    assert not math.isclose(group_lr(1500, mmcv), config["lr_at"]["1500"]["backbone"], rel_tol=1e-4)
