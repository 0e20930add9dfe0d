"""Config parity: every recipe that names an official config trains and tests what that config does.

The official configs (zbwxp/SegVit ``configs/``, zbwxp/Dynamic-Token-Pruning ``config/prune/``,
MMSegmentation 0.24.1 ``configs/``) were loaded with their own loaders by
``tools/dump_official_configs.py`` into ``tests/fixtures/official/configs/*.json``; each dump's
``parity`` block states the settings in the flat vocabulary below. Here each shipped recipe with
``published.official_config`` is resolved and mapped onto the same vocabulary
(:func:`recipe_parity`); a setting that differs must be listed, with its reason, in the recipe's
``published.differences`` (and the recipe's header), and a listed difference must still differ.
"""
from __future__ import annotations

import inspect
import json
import math
from pathlib import Path

import pytest

from segcli.data.transforms import draw_photometric
from segcli.recipe import load_recipe, recipe_from_dict, load_raw, apply_overrides
from segcli.registry import DATASETS

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures" / "official" / "configs"
RECIPES = ROOT / "recipes"

# segcli dataset type -> the official dataset class (the class carries the label convention:
# reduce_zero_label for ADE20K, COCO-Stuff and PC59)
DATASET_CLASS = {"ade20k": "ADE20KDataset", "cityscapes": "CityscapesDataset", "pascal_context": "PascalContextDataset",
                 "pascal_context_59": "PascalContextDataset59", "coco_stuff10k": "COCOStuffDataset"}
# timm ViT names -> (embed dim, depth, heads, patch)
VIT_SIZES = {"vit_base_patch16_384": (768, 12, 12, 16), "vit_large_patch16_384": (1024, 24, 16, 16),
             "vit_base_patch16_224": (768, 12, 12, 16), "vit_large_patch16_224": (1024, 24, 16, 16)}
RESNET_DEPTH = {"resnet18": 18, "resnet50": 50, "resnet101": 101}
# segcli ResNet output stride -> MMSegmentation (strides, dilations) of the four stages
RESNET_STRIDES = {32: ([1, 2, 2, 2], [1, 1, 1, 1]), 16: ([1, 2, 2, 1], [1, 1, 1, 2]), 8: ([1, 2, 1, 1], [1, 1, 2, 4])}
HEAD_CLASS = {"atm": "ATMHead", "deeplabv3plus": "DepthwiseSeparableASPPHead", "fcn": "FCNHead",
              "setr": "SETRUPHead", "nrd": "BilinearPADHead_fast", "bilinear": "bilinear (thesis table 3.1)"}
AMP_PRECISION = {"off": "fp32", "fp16": "fp16", "bf16": "bf16", "auto": "auto (bf16 on CUDA)"}

# Every key a recipe is compared on (and may list in published.differences). Not compared: the
# decode PruneHead's `thresh` (DToP backbone/vit_prune.py calls it after the last block, so the tokens
# it would exit have no block left to skip; its output does not depend on it, prune_head.py).
VOCABULARY = (
    "dataset", "data.crop", "data.scale", "data.ratio_range", "data.cat_max_ratio", "data.flip_prob",
    "data.photometric", "data.mean", "data.std", "data.to_rgb",
    "test.mode", "test.crop", "test.stride", "test.scale", "test.min_size", "test.ratios", "test.flip",
    "optimizer.type", "optimizer.lr", "optimizer.betas", "optimizer.momentum", "optimizer.weight_decay",
    "optimizer.paramwise", "schedule.rule", "schedule.policy", "schedule.power", "schedule.min_lr", "schedule.warmup",
    "schedule.warmup_iters", "schedule.warmup_ratio", "schedule.max_iters", "schedule.poly_begin",
    "schedule.poly_end", "batch.per_gpu", "grad_clip",
    "precision", "model.num_classes", "model.backbone.type", "model.backbone.embed_dim", "model.backbone.depth",
    "model.backbone.num_heads", "model.backbone.patch_size", "model.backbone.img_size",
    "model.backbone.drop_path_rate", "model.backbone.out_indices", "model.backbone.with_cls_token",
    "model.backbone.pos_embed_resize", "model.backbone.shrink_idx", "model.backbone.strides",
    "model.backbone.dilations", "model.decode_head.type", "model.decode_head.embed_dim",
    "model.decode_head.num_heads", "model.decode_head.num_layers", "model.decode_head.use_stages",
    "model.decode_head.img_size", "model.decode_head.self_attn", "model.decode_head.channels",
    "model.decode_head.dropout", "model.decode_head.nrd", "model.aspp_dilations",
    "model.loss.loss_weight", "model.loss.mask_weight",
    "model.loss.dice_weight", "model.loss.cls_weight", "model.aux_heads", "model.aux_heads.thresh",
)
# compared only while the decode heads are of one kind (a head of another kind has other options)
HEAD_KEYS = tuple(k for k in VOCABULARY if k.startswith(("model.decode_head.", "model.loss."))
                  and k != "model.decode_head.type")


def official_dumps() -> dict[str, dict]:
    return {doc["source"]: doc for doc in (json.loads(p.read_text()) for p in sorted(FIXTURES.glob("*.json")))}


def shipped_recipes() -> list[Path]:
    return sorted(p for p in RECIPES.rglob("*.yaml") if "_base_" not in p.parts)


def published_recipes() -> list[Path]:
    """Shipped recipes whose ``published:`` names an official config."""
    out = []
    for path in shipped_recipes():
        published = load_recipe(path).published
        if published is not None and published.official_config:
            out.append(path)
    return out


def _paramwise(cfg) -> dict | str:
    if cfg.paramwise is None:
        return (f"segcli's legacy groups (head_lr_mult {cfg.head_lr_mult}, no_wd_norm {cfg.no_wd_norm}, "
                f"wd_embeddings {cfg.wd_embeddings}, layer_decay {cfg.layer_decay})")
    pw = cfg.paramwise
    if not pw.custom_keys and not pw.bypass_duplicate and all(
            v is None for v in (pw.norm_decay_mult, pw.bias_lr_mult, pw.bias_decay_mult, pw.dwconv_decay_mult)):
        return None  # one group at the base lr and weight decay: what a config without paramwise_cfg gets
    return {"custom_keys": {k: dict(sorted(v.items())) for k, v in sorted(pw.custom_keys.items())},
            "bypass_duplicate": pw.bypass_duplicate, "norm_decay_mult": pw.norm_decay_mult,
            "bias_lr_mult": pw.bias_lr_mult, "bias_decay_mult": pw.bias_decay_mult,
            "dwconv_decay_mult": pw.dwconv_decay_mult}


def recipe_parity(recipe) -> dict:
    """A resolved recipe in the vocabulary of the official dumps' ``parity`` blocks."""
    data, test, train = recipe.data, recipe.test, recipe.train
    opt = train.optimizer
    entry = DATASETS.get(data.type)
    classes = entry.classes(data) if callable(entry.classes) else entry.classes
    photometric = {k: (list(p.default) if isinstance(p.default, tuple) else p.default)
                   for k, p in inspect.signature(draw_photometric).parameters.items() if k != "rng"}
    slide = test.mode == "slide"
    out = {
        "dataset": DATASET_CLASS.get(data.type, data.type),
        "data.crop": list(data.crop_size), "data.scale": list(data.scale or data.crop_size),
        "data.ratio_range": list(data.ratio_range), "data.cat_max_ratio": data.cat_max_ratio,
        "data.flip_prob": data.flip_prob, "data.photometric": photometric if data.photometric else None,
        "data.mean": list(data.mean), "data.std": list(data.std), "data.to_rgb": True,  # segcli reads RGB
        "test.mode": test.mode, "test.crop": list(test.crop_size or data.crop_size) if slide else None,
        "test.stride": (list(test.stride) if test.stride else None) if slide else None,
        "test.scale": list(test.scale) if test.scale else None, "test.min_size": test.min_size,
        "test.ratios": list(test.scales), "test.flip": test.flip,
        "optimizer.type": {"adamw": "AdamW", "sgd": "SGD"}[opt.type], "optimizer.lr": opt.lr,
        "optimizer.betas": list(opt.betas) if opt.type == "adamw" else None,
        "optimizer.momentum": opt.momentum if opt.type == "sgd" else None,
        "optimizer.weight_decay": opt.weight_decay, "optimizer.paramwise": _paramwise(opt),
        "schedule.policy": "poly", "schedule.power": train.poly_power, "schedule.min_lr": train.min_lr,
        "schedule.warmup": "linear" if train.warmup_iters else None, "schedule.warmup_iters": train.warmup_iters,
        "schedule.warmup_ratio": train.warmup_ratio if train.warmup_iters else None,
        "schedule.max_iters": train.max_iters,
        # lr_schedule "mmcv": mmcv 1.x's poly over the whole run, the warmup multiplying it; "mmengine":
        # LinearLR for the warmup, then PolyLR from its end to poly_end (engine/optim.py)
        "schedule.rule": train.lr_schedule,
        "schedule.poly_begin": train.warmup_iters if train.lr_schedule == "mmengine" else 0,
        "schedule.poly_end": (train.poly_end or train.max_iters) if train.lr_schedule == "mmengine" else train.max_iters,
        "batch.per_gpu": recipe.published.batch_per_gpu if recipe.published else None,
        "grad_clip": {"max_norm": train.grad_clip, "norm_type": 2} if train.grad_clip else None,
        "precision": AMP_PRECISION[train.amp],
        "model.num_classes": recipe.model.num_classes or len(classes),
    }
    backbone, head = recipe.model.backbone, recipe.model.decode_head
    bb = backbone.cfg
    # a binary class head is DToP's PruneHead, which the official code runs on its ViT_prune
    prune_head = head.type == "atm" and head.cfg.class_head == "binary"
    if backbone.type == "vit":
        sizes = VIT_SIZES.get(bb.name, (None,) * 4)
        shrunk = recipe.model.type == "shrunk"
        out.update({
            "model.backbone.type": "vit_shrink" if shrunk else "ViT_prune" if prune_head else "VisionTransformer",
            "model.backbone.embed_dim": bb.embed_dim or sizes[0], "model.backbone.depth": bb.depth or sizes[1],
            "model.backbone.num_heads": bb.num_heads or sizes[2], "model.backbone.patch_size": bb.patch_size or sizes[3],
            "model.backbone.img_size": [bb.img_size, bb.img_size], "model.backbone.drop_path_rate": bb.drop_path_rate,
            "model.backbone.out_indices": list(bb.out_indices), "model.backbone.with_cls_token": bb.cls_token,
            "model.backbone.pos_embed_resize": bb.pos_embed_resize})
        if shrunk:
            out["model.backbone.shrink_idx"] = recipe.model.options.qd_index
    elif backbone.type == "resnet":
        strides, dilations = RESNET_STRIDES[bb.output_stride]
        if bb.aspp:  # the ASPP segcli attaches to the encoder is the official decode head's
            out["model.aspp_dilations"] = list(bb.aspp_dilations)
        out.update({"model.backbone.type": "ResNetV1c" if bb.deep_stem else "ResNet",
                    "model.backbone.depth": RESNET_DEPTH.get(bb.name), "model.backbone.strides": strides,
                    "model.backbone.dilations": dilations})
    hc = head.cfg
    head_type = HEAD_CLASS.get(head.type, head.type)
    if head.type == "atm" and recipe.model.type == "shrunk" and getattr(recipe.model.options, "head_mode", "") == "released":
        head_type = "TPNATMHead"
    if prune_head:
        head_type = "PruneHead"
    out["model.decode_head.type"] = head_type
    if head.type == "atm":
        width = out.get("model.backbone.embed_dim")
        embed = hc.embed_dim or (width // 2 if width else None)
        img_size = hc.mask_size or (bb.img_size if hc.mask_resolution == "full" else None)
        # TPNATMHead's use_stages counts the backbone outputs it reads (the TPN's and the ATM's)
        stages = len(bb.out_indices) if head_type == "TPNATMHead" else hc.use_stages or len(hc.in_index)
        out.update({"model.decode_head.embed_dim": embed, "model.decode_head.num_heads": hc.num_heads or embed // 32,
                    "model.decode_head.num_layers": hc.num_layers, "model.decode_head.use_stages": stages,
                    # BaseDecodeHead's `channels`: every official ATM config sets it to the input width;
                    # DToP's PruneHead uses it as its decoder width
                    "model.decode_head.channels": embed if prune_head else width,
                    "model.decode_head.img_size": img_size, "model.decode_head.self_attn": hc.self_attn,
                    "model.loss.loss_weight": hc.loss_weight, "model.loss.mask_weight": hc.focal_weight,
                    "model.loss.dice_weight": hc.dice_weight, "model.loss.cls_weight": hc.ce_weight})
    elif head.type == "nrd":  # zbwxp/NRD_decoder BilinearPADHead_fast: its ASPP width is `channels`
        out.update({"model.decode_head.channels": bb.aspp_channels if bb.aspp else None,
                    "model.decode_head.nrd": {"grid": hc.grid_size or 8, "hidden_channels": hc.hidden_channels,
                                              "guidance_channels": hc.guidance_channels},
                    "model.loss.loss_weight": hc.loss_weight})
    elif head.type in ("deeplabv3plus", "fcn", "setr"):
        out.update({"model.decode_head.channels": hc.channels, "model.decode_head.dropout": getattr(hc, "dropout", None),
                    "model.loss.loss_weight": hc.loss_weight})
    out["model.aux_heads"] = [a.cfg.loss_weight for a in recipe.model.aux_heads]
    if prune_head:  # the grading heads exit tokens above p0 (DToP only; the baseline exits none)
        p0 = recipe.model.options.p0 if recipe.model.type == "dtop" else 1.0
        out["model.aux_heads.thresh"] = [p0] * len(recipe.model.aux_heads)
    return out


def _official_value(key: str, value):
    if key == "model.aux_heads":
        return [a["loss_weight"] for a in value]
    return value


def _same(a, b) -> bool:
    if isinstance(a, bool) or isinstance(b, bool) or a is None or b is None:
        return a == b
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-12)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    return a == b


def parity_differences(recipe, official: dict) -> dict[str, tuple]:
    """``{key: (ours, official)}`` for every vocabulary key on which the recipe and the dump differ."""
    ours = recipe_parity(recipe)
    theirs = {k: _official_value(k, v) for k, v in official["parity"].items()}
    keys = [k for k in VOCABULARY if k in theirs]
    if not _same(ours.get("model.decode_head.type"), theirs.get("model.decode_head.type")):
        keys = [k for k in keys if k not in HEAD_KEYS]
    return {k: (ours.get(k), theirs[k]) for k in keys if not _same(ours.get(k), theirs[k])}


DUMPS = official_dumps()
PUBLISHED = published_recipes()


def test_every_fixture_has_a_parity_block():
    assert len(DUMPS) >= 20
    for source, doc in DUMPS.items():
        assert set(doc) >= {"source", "loader", "config", "parity"}, source
        assert "data.crop" in doc["parity"], source


def test_published_recipes_name_dumped_configs():
    """A recipe's official_config is one of the dumped configs (so the parity test below covers it)."""
    assert PUBLISHED, "no shipped recipe names an official config"
    missing = {str(p.relative_to(ROOT)): load_recipe(p).published.official_config for p in PUBLISHED
               if load_recipe(p).published.official_config not in DUMPS}
    assert not missing, f"no dump for {missing}; run tools/dump_official_configs.py"


@pytest.mark.parametrize("path", PUBLISHED, ids=lambda p: str(p.relative_to(RECIPES)))
def test_recipe_is_the_official_experiment(path):
    recipe = load_recipe(path)
    published = recipe.published
    listed = dict(published.differences)
    unknown = sorted(set(listed) - set(VOCABULARY))
    assert not unknown, f"{path.name}: published.differences keys {unknown} are not config-parity keys"
    found = parity_differences(recipe, DUMPS[published.official_config])
    unlisted = {k: v for k, v in found.items() if k not in listed}
    stale = sorted(k for k in listed if k not in found)
    assert not unlisted, (f"{path.name} differs from {published.official_config} on (ours, official): {unlisted}; "
                          "fix the recipe or list the key with its reason in published.differences")
    assert not stale, f"{path.name} lists differences that are not there (any more): {stale}"


@pytest.mark.parametrize("path", [p for p in shipped_recipes() if load_recipe(p).published is not None],
                         ids=lambda p: str(p.relative_to(RECIPES)))
def test_published_batch_and_precision_are_the_recipes(path):
    """The recipe trains the published global batch, at the published precision (the header says so)."""
    recipe = load_recipe(path)
    published = recipe.published
    assert recipe.data.batch_size == published.global_batch, (
        f"{path.name}: data.batch_size {recipe.data.batch_size} != published {published.gpus} x "
        f"{published.batch_per_gpu}")
    assert AMP_PRECISION[recipe.train.amp] == published.precision, f"{path.name}: train.amp {recipe.train.amp}"
    header = "\n".join(line for line in path.read_text().splitlines() if line.startswith("#"))
    assert f"{published.gpus} GPU" in header, f"{path.name}: the header does not state the published batch split"


def _segvit_l_ade20k(overrides=()):
    raw = apply_overrides(load_raw(RECIPES / "segvit_vit_l_ade20k.yaml"), list(overrides))
    return recipe_from_dict(raw, name="probe")


@pytest.mark.parametrize("override, key", [
    ("model.decode_head.self_attn=false", "model.decode_head.self_attn"),
    ("data.mean=[123.675,116.28,103.53]", "data.mean"),
    ("train.poly_power=0.9", "schedule.power"),
    ("train.warmup_iters=0", "schedule.warmup"),
    ("train.lr_schedule=mmengine", "schedule.rule"),
    ("train.amp=bf16", "precision"),
    ("train.grad_clip=null", "grad_clip"),
    ("test.stride=[512,512]", "test.stride"),
    ("train.optimizer.paramwise=null", "optimizer.paramwise"),
    ("data.photometric=false", "data.photometric"),
    ("model.backbone.drop_path_rate=0.1", "model.backbone.drop_path_rate"),
])
def test_the_comparison_catches_a_changed_setting(override, key):
    """Each kind of drift is reported under its key (the test above can fail)."""
    official = DUMPS["zbwxp/SegVit configs/segvit/segvit_vit-l_jax_640x640_160k_ade20k.py"]
    before = parity_differences(_segvit_l_ade20k(), official)
    after = parity_differences(_segvit_l_ade20k([override]), official)
    assert key not in before and key in after
