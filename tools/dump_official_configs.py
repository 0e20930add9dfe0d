"""Dump what the *official* configs set, as JSON fixtures for the config-parity test (run by hand).

Each official config that produced a published number (zbwxp/SegVit ``configs/``,
zbwxp/Dynamic-Token-Pruning ``config/prune/``, zbwxp/NRD_decoder ``configs/NRD/``, MMSegmentation
0.24.1 ``configs/``) is loaded
with its own framework's loader (``mmcv.Config`` for the mmcv-1.x configs, ``mmengine.Config``
for DToP's), and one JSON per config is written to ``tests/fixtures/official/configs/``::

    source     "<repo> <path>" as recipes cite it in ``published.official_config``
    loader     the loader and versions used, and the repository commit
    config     the loaded config (every key it sets, ``_base_`` resolved), JSON-converted
    defaults   constructor defaults of the official classes the config names without setting
               every argument (pipeline transforms, heads, losses), read with ``inspect``
    parity     the settings in the flat config-parity vocabulary of tests/test_config_parity.py
               (data.*, test.*, optimizer.*, schedule.*, batch.*, model.*, grad_clip, precision)

``parity`` is read from the *effective* entries (``data.train.pipeline``, ``model.test_cfg``,
``optimizer.paramwise_cfg``, ``lr_config``, ``runner``; for mmengine ``train_dataloader``,
``optim_wrapper``, ``param_scheduler``, ``train_cfg``), never from helper variables such as
``train_pipeline``, which a config may redefine without using.

The two OpenMMLab worlds cannot share one interpreter: run the mmcv-1.x world in the
/tmp/ref/v1 venv, and the DToP (mmengine) world in a separate process with mmengine first on
``PYTHONPATH``::

    /tmp/ref/v1/bin/python tools/dump_official_configs.py v0 --segvit-repo /tmp/ref/SegVit \
        --mmseg-configs /tmp/ref/v1/lib/python3.11/site-packages/mmseg/.mim/configs --nrd-repo /tmp/ref/NRD_decoder
    PYTHONPATH=/tmp/ref/mm1 /tmp/ref/v1/bin/python tools/dump_official_configs.py v1 \
        --dtop-repo /tmp/ref/Dynamic-Token-Pruning

Only configs are read (and class signatures, for defaults); no model is built. The official code
is imported from the paths given on the command line, never copied. Not run by CI.
"""
from __future__ import annotations

import argparse
import inspect
import json
import logging
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import official_env  # noqa: E402

OUT = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "official" / "configs"

SEGVIT_CONFIGS = [
    "configs/segvit/segvit_vit-l_jax_640x640_160k_ade20k.py",
    "configs/segvit/segvit_vit-l_jax_512x512_80k_cocostuff10k.py",
    "configs/segvit/segvit_vit-l_jax_480x480_80k_pc.py",
    "configs/segvit/shrink/segvit_vit-l_jax_shrink8_tpnatm.py",
    "configs/segvit/shrink/segvit_vit-l_jax_shrink8_tpnatm_coco.py",
    "configs/segvit/shrink/segvit_vit-l_jax_shrink8_tpnatm_pc.py",
]
# zbwxp/SegVit ships no ViT-B config for its ViT-B row (README: ade_51.3.pth, thesis table 4.1).
# Its configs/_base_ hold the ViT-B model (models/seg_vit-b16.py) and the 512x512 ADE20K data
# (datasets/ade20k.py); every configs/segvit/*.py adds the same optimizer / clip / lr block. This
# composes exactly those official files and that block (nothing else), as the ViT-B experiment.
SEGVIT_VIT_B_NAME = "configs/segvit/segvit_vit-b_512x512_160k_ade20k.py (composed)"
SEGVIT_VIT_B_TEXT = """_base_ = [
    '{root}/configs/_base_/models/seg_vit-b16.py', '{root}/configs/_base_/datasets/ade20k.py',
    '{root}/configs/_base_/default_runtime.py', '{root}/configs/_base_/schedules/schedule_160k.py']
"""
SEGVIT_SHARED_BLOCK = ("optimizer", "optimizer_config", "lr_config")  # copied from the ADE20K ViT-L config
MMSEG_CONFIGS = [
    "deeplabv3plus/deeplabv3plus_r50-d8_512x1024_80k_cityscapes.py",
    "deeplabv3plus/deeplabv3plus_r18-d8_512x1024_80k_cityscapes.py",
    "deeplabv3plus/deeplabv3plus_r101-d8_512x1024_80k_cityscapes.py",
    "deeplabv3plus/deeplabv3plus_r101-d8_512x512_160k_ade20k.py",
    "deeplabv3plus/deeplabv3plus_r101-d8_480x480_80k_pascal_context.py",
    "deeplabv3plus/deeplabv3plus_r101-d8_480x480_80k_pascal_context_59.py",
    "fcn/fcn_r50-d8_512x1024_80k_cityscapes.py",
    "setr/setr_naive_512x512_160k_b16_ade20k.py",
    "_base_/datasets/cityscapes.py",
    "_base_/datasets/ade20k.py",
    "_base_/datasets/pascal_context.py",
    "_base_/datasets/pascal_context_59.py",
    "_base_/datasets/coco-stuff10k.py",
]
# the NRD authors' release (zbwxp/NRD_decoder, an MMSegmentation 0.x fork; README: "The batch size is
# 16 in this work"): the configs of thesis ch. 3's numbers
NRD_CONFIGS = [
    "configs/NRD/city_abl/NRD_r50_512x1024_84k_cityscapes.py",
    "configs/NRD/city_abl/NRD_r101_512x1024_84k_cityscapes.py",
    "configs/NRD/ade20k/NRD_r101_512x512_164k_ade20k.py",
    "configs/NRD/pascal_context/NRD_r101_480x480_84k_pascal_context.py",
    "configs/NRD/pascal_context/NRD_r101_480x480_84k_pascal_context_59.py",
]
DTOP_CONFIGS = [f"config/prune/{name}.py" for name in (
    "BASE_segvit_ade20k", "BASE_segvit_ade20k_large", "BASE_segvit_cocostuff10k", "BASE_segvit_pc",
    "prune_segvit_ade20k", "prune_segvit_ade20k_large", "prune_segvit_cocostuff10k", "prune_segvit_pc")]
# runtime-only keys, not part of the experiment
SKIP_KEYS = {"log_config", "dist_params", "log_level", "load_from", "resume_from", "workflow", "cudnn_benchmark",
             "checkpoint_config", "evaluation", "default_hooks", "env_cfg", "vis_backends", "visualizer",
             "log_processor", "launcher", "default_scope", "randomness", "tta_model", "tta_pipeline"}


def jsonable(obj):
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, (str, int, float, bool)) or obj is None:
        return obj
    return repr(obj)


def git_commit(repo: Path | None) -> str | None:
    if repo is None:
        return None
    try:
        return subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip()
    except Exception:
        return None


def signature_defaults(cls) -> dict:
    """Keyword defaults of ``cls.__init__`` (the values a config gets for arguments it omits)."""
    if cls is None:
        return {}
    out = {}
    for name, param in inspect.signature(cls.__init__).parameters.items():
        if name != "self" and param.default is not inspect.Parameter.empty:
            out[name] = jsonable(param.default)
    return out


def class_defaults(config: dict, registries) -> dict:
    """``{type: defaults}`` for every ``type`` named anywhere in ``config``."""
    found: dict = {}

    def walk(node):
        if isinstance(node, dict):
            name = node.get("type")
            if isinstance(name, str) and name not in found:
                cls = None
                for registry in registries:
                    try:
                        cls = registry.get(name)
                    except Exception:
                        cls = None
                    if cls is not None:
                        break
                if cls is not None and inspect.isclass(cls):
                    found[name] = signature_defaults(cls)
            for value in node.values():
                walk(value)
        elif isinstance(node, (list, tuple)):
            for value in node:
                walk(value)

    walk(config)
    return dict(sorted(found.items()))


def with_defaults(step: dict | None, defaults: dict) -> dict | None:
    if step is None:
        return None
    out = dict(defaults.get(step.get("type"), {}))
    out.update(step)
    return out


def find_step(pipeline, name: str) -> dict | None:
    for step in pipeline or []:
        if step.get("type") == name:
            return step
        inner = find_step(step.get("transforms"), name)
        if inner is not None:
            return inner
    return None


def pair(value):
    return None if value is None else [int(v) for v in (value if isinstance(value, (list, tuple)) else (value, value))]


def photometric(step: dict | None) -> dict | None:
    if step is None:
        return None
    return {k: jsonable(v) for k, v in sorted(step.items()) if k != "type"}


# ----------------------------------------------------------------------------- parity vocabulary


def model_parity(model: dict, defaults: dict) -> dict:
    """Model sizes and head / loss settings in the parity vocabulary (both worlds)."""
    out: dict = {}
    backbone = model.get("backbone") or {}
    head = with_defaults(model.get("decode_head"), defaults) or {}
    out["model.backbone.type"] = backbone.get("type")
    if "embed_dims" in backbone:  # a ViT
        out["model.backbone.embed_dim"] = backbone.get("embed_dims")
        out["model.backbone.depth"] = backbone.get("num_layers")
        out["model.backbone.num_heads"] = backbone.get("num_heads")
        out["model.backbone.patch_size"] = backbone.get("patch_size")
        out["model.backbone.img_size"] = pair(backbone.get("img_size"))
        out["model.backbone.drop_path_rate"] = backbone.get("drop_path_rate")
        out["model.backbone.out_indices"] = list(backbone.get("out_indices", []))
        out["model.backbone.final_norm"] = backbone.get("final_norm")
        out["model.backbone.with_cls_token"] = backbone.get("with_cls_token")
        out["model.backbone.pos_embed_resize"] = backbone.get("interpolate_mode")
        if "shrink_idx" in backbone:
            out["model.backbone.shrink_idx"] = backbone["shrink_idx"]
    if "depth" in backbone:  # a ResNet
        out["model.backbone.depth"] = backbone.get("depth")
        out["model.backbone.dilations"] = list(backbone.get("dilations", []))
        out["model.backbone.strides"] = list(backbone.get("strides", []))
    out["model.num_classes"] = head.get("num_classes")
    out["model.decode_head.type"] = head.get("type")
    if "dilations" in head:  # DeepLabV3+'s ASPP (segcli: the NRD encoder's aspp_dilations)
        out["model.aspp_dilations"] = list(head["dilations"])
    if head.get("type") == "BilinearPADHead_fast":  # NRD (zbwxp/NRD_decoder decode_heads/bilinear_pad_head_fast.py)
        # upsample_factor: the s x s patch each stride-32 location predicts; dyn_branch_ch: the width of
        # the dynamic network g (DynHead `channels`); mask_head_ch: the guidance maps (DynHead `num_bases`)
        out["model.decode_head.nrd"] = {"grid": head.get("upsample_factor"), "hidden_channels": head.get("dyn_branch_ch"),
                                        "guidance_channels": head.get("mask_head_ch")}
        head = {k: v for k, v in head.items() if k != "dropout_ratio"}  # its forward applies no dropout
    for src, dst in (("embed_dims", "embed_dim"), ("num_heads", "num_heads"), ("num_layers", "num_layers"),
                     ("use_stages", "use_stages"), ("img_size", "img_size"), ("channels", "channels"),
                     ("thresh", "thresh"), ("layers_per_decoder", "num_layers"), ("in_index", "in_index"),
                     ("dropout_ratio", "dropout")):
        if src in head:
            out[f"model.decode_head.{dst}"] = jsonable(head[src])
    if head.get("type") == "PruneHead":  # DToP: `channels` is the decoder width (config/prune/*.py)
        out["model.decode_head.embed_dim"] = head.get("channels")
    if "ATM" in str(head.get("type", "")).upper() or head.get("type") == "PruneHead":
        # every official ATM decoder layer (SegVit decode_heads/atm_head.py TPN_DecoderLayer.forward,
        # DToP's copy) runs query self-attention unconditionally: there is no flag to turn it off
        out["model.decode_head.self_attn"] = True
    loss = head.get("loss_decode")
    if isinstance(loss, dict):
        loss = with_defaults(loss, defaults)
        for key in ("loss_weight", "mask_weight", "dice_weight", "cls_weight", "use_sigmoid", "avg_non_ignore"):
            if key in loss:
                out[f"model.loss.{key}"] = jsonable(loss[key])
    aux = model.get("auxiliary_head") or []
    aux = [aux] if isinstance(aux, dict) else list(aux)
    out["model.aux_heads"] = [
        {"type": a.get("type"), "in_index": jsonable(a.get("in_index")),
         "loss_weight": (a.get("loss_decode") or {}).get("loss_weight", 1.0)} for a in aux]
    if any("thresh" in a for a in aux):  # DToP's grading heads: each one's exit threshold
        out["model.aux_heads.thresh"] = [a.get("thresh") for a in aux]
    test_cfg = model.get("test_cfg") or {}
    out["test.mode"] = test_cfg.get("mode", "whole")
    out["test.crop"] = pair(test_cfg.get("crop_size")) if test_cfg.get("mode") == "slide" else None
    out["test.stride"] = pair(test_cfg.get("stride")) if test_cfg.get("mode") == "slide" else None
    return out


def paramwise_parity(paramwise: dict | None) -> dict | None:
    if not paramwise:
        return None
    custom = {str(k): {kk: float(vv) for kk, vv in sorted(v.items())}
              for k, v in sorted((paramwise.get("custom_keys") or {}).items())}
    out = {"custom_keys": custom, "bypass_duplicate": bool(paramwise.get("bypass_duplicate", False))}
    for key in ("norm_decay_mult", "bias_lr_mult", "bias_decay_mult", "dwconv_decay_mult"):
        out[key] = paramwise.get(key)
    return out


def v0_parity(cfg: dict, defaults: dict) -> dict:
    """mmcv 1.x / mmseg 0.x config -> parity vocabulary."""
    data = cfg.get("data", {})
    train = (data.get("train") or {})
    train_pipeline = train.get("pipeline") or (train.get("dataset") or {}).get("pipeline")
    test_pipeline = (data.get("test") or {}).get("pipeline")
    out: dict = {"dataset": train.get("type")}
    load = with_defaults(find_step(train_pipeline, "LoadAnnotations"), defaults) or {}
    resize = with_defaults(find_step(train_pipeline, "Resize"), defaults) or {}
    crop = with_defaults(find_step(train_pipeline, "RandomCrop"), defaults) or {}
    flip = with_defaults(find_step(train_pipeline, "RandomFlip"), defaults) or {}
    pad = with_defaults(find_step(train_pipeline, "Pad"), defaults) or {}
    norm = find_step(train_pipeline, "Normalize") or {}
    out["data.reduce_zero_label"] = bool(load.get("reduce_zero_label", False))
    out["data.crop"] = pair(crop.get("crop_size"))
    out["data.scale"] = pair(resize.get("img_scale"))
    out["data.ratio_range"] = jsonable(resize.get("ratio_range"))
    out["data.keep_ratio"] = resize.get("keep_ratio")
    out["data.cat_max_ratio"] = crop.get("cat_max_ratio")
    out["data.flip_prob"] = flip.get("prob")
    out["data.photometric"] = photometric(with_defaults(find_step(train_pipeline, "PhotoMetricDistortion"), defaults))
    out["data.mean"] = jsonable(norm.get("mean"))
    out["data.std"] = jsonable(norm.get("std"))
    out["data.to_rgb"] = norm.get("to_rgb")
    out["data.pad_val"] = pad.get("pad_val")
    out["data.seg_pad_val"] = pad.get("seg_pad_val")
    aug = with_defaults(find_step(test_pipeline, "MultiScaleFlipAug"), defaults) or {}
    test_resize = with_defaults(find_step(test_pipeline, "Resize"), defaults) or {}
    out["test.scale"] = pair(aug.get("img_scale"))
    out["test.keep_ratio"] = test_resize.get("keep_ratio")
    out["test.min_size"] = test_resize.get("min_size")
    out["test.ratios"] = jsonable(aug.get("img_ratios")) or [1.0]
    out["test.flip"] = bool(aug.get("flip", False))
    out["test.pad_size_divisor"] = (find_step(test_pipeline, "Pad") or {}).get("size_divisor")
    out["batch.per_gpu"] = data.get("samples_per_gpu")
    if "model" in cfg:
        out.update(model_parity(cfg["model"], defaults))
    optimizer = dict(cfg.get("optimizer") or {})
    if optimizer:
        out["optimizer.type"] = optimizer.get("type")
        out["optimizer.lr"] = optimizer.get("lr")
        out["optimizer.weight_decay"] = optimizer.get("weight_decay", 0.0)
        out["optimizer.momentum"] = optimizer.get("momentum")
        out["optimizer.betas"] = jsonable(optimizer.get("betas"))
        out["optimizer.paramwise"] = paramwise_parity(optimizer.get("paramwise_cfg"))
        clip = (cfg.get("optimizer_config") or {}).get("grad_clip")
        out["grad_clip"] = None if not clip else {"max_norm": clip.get("max_norm"), "norm_type": clip.get("norm_type", 2)}
        lr = cfg.get("lr_config") or {}
        out["schedule.rule"] = "mmcv"  # mmcv 1.x LrUpdaterHook: warmup multiplies the poly of the whole run
        out["schedule.policy"] = lr.get("policy")
        out["schedule.power"] = lr.get("power", 1.0)
        out["schedule.min_lr"] = lr.get("min_lr", 0.0)
        out["schedule.warmup"] = lr.get("warmup")
        out["schedule.warmup_iters"] = lr.get("warmup_iters", 0) if lr.get("warmup") else 0
        out["schedule.warmup_ratio"] = lr.get("warmup_ratio", 0.1) if lr.get("warmup") else None
        out["schedule.by_epoch"] = lr.get("by_epoch", True)
        out["schedule.max_iters"] = (cfg.get("runner") or {}).get("max_iters")
        out["precision"] = "fp16" if cfg.get("fp16") else "fp32"
    return out


def v1_parity(cfg: dict, defaults: dict) -> dict:
    """mmengine / mmseg 1.x config -> parity vocabulary (DToP)."""
    loader = cfg.get("train_dataloader") or {}
    dataset = loader.get("dataset") or {}
    train_pipeline = dataset.get("pipeline")
    test_pipeline = ((cfg.get("test_dataloader") or {}).get("dataset") or {}).get("pipeline")
    out: dict = {"dataset": dataset.get("type")}
    load = with_defaults(find_step(train_pipeline, "LoadAnnotations"), defaults) or {}
    resize = with_defaults(find_step(train_pipeline, "RandomResize"), defaults) or {}
    crop = with_defaults(find_step(train_pipeline, "RandomCrop"), defaults) or {}
    flip = with_defaults(find_step(train_pipeline, "RandomFlip"), defaults) or {}
    pre = cfg.get("data_preprocessor") or (cfg.get("model") or {}).get("data_preprocessor") or {}
    out["data.reduce_zero_label"] = bool(load.get("reduce_zero_label", False))
    out["data.crop"] = pair(crop.get("crop_size"))
    out["data.scale"] = pair(resize.get("scale"))
    out["data.ratio_range"] = jsonable(resize.get("ratio_range"))
    out["data.keep_ratio"] = resize.get("keep_ratio")
    out["data.cat_max_ratio"] = crop.get("cat_max_ratio")
    out["data.flip_prob"] = flip.get("prob")
    out["data.photometric"] = photometric(with_defaults(find_step(train_pipeline, "PhotoMetricDistortion"), defaults))
    out["data.mean"] = jsonable(pre.get("mean"))
    out["data.std"] = jsonable(pre.get("std"))
    out["data.to_rgb"] = pre.get("bgr_to_rgb")
    out["data.pad_val"] = pre.get("pad_val")
    out["data.seg_pad_val"] = pre.get("seg_pad_val")
    test_resize = with_defaults(find_step(test_pipeline, "Resize"), defaults) or {}
    out["test.scale"] = pair(test_resize.get("scale"))
    out["test.keep_ratio"] = test_resize.get("keep_ratio")
    out["test.min_size"] = None
    out["test.ratios"] = [1.0]
    out["test.flip"] = False
    out["batch.per_gpu"] = loader.get("batch_size")
    out.update(model_parity(cfg.get("model") or {}, defaults))
    wrapper = cfg.get("optim_wrapper") or {}
    optimizer = dict(wrapper.get("optimizer") or cfg.get("optimizer") or {})
    out["optimizer.type"] = optimizer.get("type")
    out["optimizer.lr"] = optimizer.get("lr")
    out["optimizer.weight_decay"] = optimizer.get("weight_decay", 0.0)
    out["optimizer.momentum"] = optimizer.get("momentum")
    out["optimizer.betas"] = jsonable(optimizer.get("betas"))
    out["optimizer.paramwise"] = paramwise_parity(wrapper.get("paramwise_cfg"))
    # mmengine reads clipping from optim_wrapper.clip_grad only; an mmcv-style optimizer_config
    # left in the file is ignored (mmengine/optim/optimizer/optimizer_wrapper.py)
    clip = wrapper.get("clip_grad")
    out["grad_clip"] = None if not clip else {"max_norm": clip.get("max_norm"), "norm_type": clip.get("norm_type", 2)}
    out["grad_clip.ignored_optimizer_config"] = jsonable((cfg.get("optimizer_config") or {}).get("grad_clip"))
    schedulers = cfg.get("param_scheduler") or []
    schedulers = [schedulers] if isinstance(schedulers, dict) else schedulers
    warm = next((s for s in schedulers if s.get("type") == "LinearLR"), None)
    poly = next((s for s in schedulers if s.get("type") == "PolyLR"), None) or {}
    out["schedule.rule"] = "mmengine"  # LinearLR, then PolyLR over [begin, end)
    out["schedule.policy"] = "poly" if poly else None
    out["schedule.power"] = poly.get("power", 1.0)
    out["schedule.min_lr"] = poly.get("eta_min", 0.0)
    out["schedule.poly_begin"] = poly.get("begin", 0)
    out["schedule.poly_end"] = poly.get("end")
    out["schedule.warmup"] = "linear" if warm else None
    out["schedule.warmup_iters"] = (warm.get("end", 0) - warm.get("begin", 0)) if warm else 0
    out["schedule.warmup_ratio"] = warm.get("start_factor") if warm else None
    out["schedule.by_epoch"] = bool(poly.get("by_epoch", True))
    out["schedule.max_iters"] = (cfg.get("train_cfg") or {}).get("max_iters")
    wrapper_type = wrapper.get("type", "OptimWrapper")
    out["precision"] = "fp16" if wrapper_type == "AmpOptimWrapper" else "fp32"
    return out


# ----------------------------------------------------------------------------- writing


def write(out_dir: Path, name: str, source: str, loader: dict, cfg: dict, defaults: dict, parity: dict) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    cfg = {k: v for k, v in cfg.items() if k not in SKIP_KEYS}
    doc = {"source": source, "loader": loader, "config": jsonable(cfg), "defaults": defaults,
           "parity": jsonable(dict(sorted(parity.items())))}
    path = out_dir / f"{name}.json"
    path.write_text(json.dumps(doc, indent=1, sort_keys=False) + "\n")
    return path


def fixture_name(prefix: str, rel: str) -> str:
    """``segvit__shrink__segvit_vit-l_jax_shrink8_tpnatm``, ``mmseg__deeplabv3plus__...``, ``dtop__prune_segvit_pc``."""
    rel = rel.split(" (")[0].removesuffix(".py")
    for head in ("configs/segvit/", "config/prune/", "configs/"):
        rel = rel.removeprefix(head)
    return f"{prefix}__" + rel.replace("/", "__")


def run_v0(args) -> None:
    import mmcv
    from mmcv import Config

    official_env.import_mmseg()
    import mmseg
    from mmseg.datasets.builder import PIPELINES
    from mmseg.models.builder import HEADS, LOSSES, BACKBONES

    official_env.import_repo_as_package(
        "segvit_official", args.segvit_repo, ["decode_heads", "backbone", "losses"],
        ["losses.atm_loss", "decode_heads.atm_head", "decode_heads.tpn_atm_head", "backbone.vit_shrink"])
    registries = (PIPELINES, HEADS, LOSSES, BACKBONES)
    segvit_commit = git_commit(args.segvit_repo)
    loader = {"loader": "mmcv.Config.fromfile", "mmcv": mmcv.__version__, "mmseg": mmseg.__version__}

    def dump(prefix, source, rel, path, repo_commit, cfg=None):
        cfg = cfg if cfg is not None else Config.fromfile(str(path))
        raw = cfg._cfg_dict.to_dict()
        defaults = class_defaults(raw, registries)
        written = write(args.out, fixture_name(prefix, rel), source,
                        dict(loader, commit=repo_commit), raw, defaults, v0_parity(raw, defaults))
        print("wrote", written)

    for rel in SEGVIT_CONFIGS:
        dump("segvit", f"zbwxp/SegVit {rel}", rel, args.segvit_repo / rel, segvit_commit)
    with tempfile.TemporaryDirectory() as tmp:
        composed = Path(tmp) / "segvit_vit-b_512x512_160k_ade20k.py"
        composed.write_text(SEGVIT_VIT_B_TEXT.format(root=args.segvit_repo))
        cfg = Config.fromfile(str(composed))
        shared = Config.fromfile(str(args.segvit_repo / SEGVIT_CONFIGS[0]))
        for key in SEGVIT_SHARED_BLOCK:
            cfg[key] = shared[key]
        dump("segvit", f"zbwxp/SegVit {SEGVIT_VIT_B_NAME}", SEGVIT_VIT_B_NAME, composed, segvit_commit, cfg=cfg)
    if args.nrd_repo is not None:
        for rel in NRD_CONFIGS:
            dump("nrd", f"zbwxp/NRD_decoder {rel}", rel.replace("configs/NRD/", "", 1), args.nrd_repo / rel,
                 git_commit(args.nrd_repo))
    for rel in MMSEG_CONFIGS:
        dump("mmseg", f"open-mmlab/mmsegmentation v0.24.1 configs/{rel}", rel, args.mmseg_configs / rel, None)


def run_v1(args) -> None:
    import mmengine
    from mmengine.config import Config

    official_env.import_mmseg()
    import mmseg
    from mmseg.registry import MODELS, TRANSFORMS
    from mmseg.utils import register_all_modules

    sys.path.insert(0, str(args.dtop_repo))
    import mmseg_custom  # noqa: F401  (the official repository's package: ViT_prune, PruneHead, ...)

    register_all_modules(init_default_scope=True)
    loader = {"loader": "mmengine.Config.fromfile", "mmengine": mmengine.__version__, "mmseg": mmseg.__version__,
              "commit": git_commit(args.dtop_repo)}
    for rel in DTOP_CONFIGS:
        cfg = Config.fromfile(str(args.dtop_repo / rel))
        raw = cfg.to_dict()
        defaults = class_defaults(raw, (TRANSFORMS, MODELS))
        written = write(args.out, fixture_name("dtop", rel), f"zbwxp/Dynamic-Token-Pruning {rel}", loader, raw,
                        defaults, v1_parity(raw, defaults))
        print("wrote", written)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="world", required=True)
    v0 = sub.add_parser("v0", help="mmcv 1.x configs (zbwxp/SegVit, MMSegmentation 0.24.1)")
    v0.add_argument("--segvit-repo", type=Path, required=True)
    v0.add_argument("--mmseg-configs", type=Path, required=True, help="MMSegmentation 0.24.1 configs/ folder")
    v0.add_argument("--nrd-repo", type=Path, default=None, help="a zbwxp/NRD_decoder checkout (configs/NRD)")
    v1 = sub.add_parser("v1", help="mmengine configs (zbwxp/Dynamic-Token-Pruning)")
    v1.add_argument("--dtop-repo", type=Path, required=True)
    for p in (v0, v1):
        p.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    for name in ("mmcv", "mmseg", "mmengine", "root"):
        logging.getLogger(name).setLevel(logging.ERROR)
    (run_v0 if args.world == "v0" else run_v1)(args)


if __name__ == "__main__":
    main()
