"""DToP (thesis ch. 5): the exit rule, equivalences, batching, losses, the prune API and its errors.

Tiny models: timm's test_vit (6 blocks, width 64) on 64 px images with patch 8 (64 tokens),
aux heads after blocks 2 and 3, decode head after block 5; untrained weights, so thresholds are
picked from the model's own confidences.
"""
from __future__ import annotations

import copy
import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from segcli import api
from segcli.data import SYNTHETIC_CLASSES, SYNTHETIC_PALETTE, build_dataset
from segcli.data.transforms import eval_view
from segcli.engine.checkpoint import save_checkpoint
from segcli.engine.flops import count_flops
from segcli.engine.optim import build_optimizer
from segcli.errors import SegcliError
from segcli.models.dtop import DToPSegmentor, atm_class_probs, atm_token_probs, exit_decision
from segcli.ops.scores import token_fractions
from segcli.workflows.prune import gflops_split, parse_layers, prune_checkpoint
from segcli.recipe import load_recipe, recipe_from_dict

REPO = Path(__file__).resolve().parents[1]

NUM_CLASSES = len(SYNTHETIC_CLASSES)
BACKBONE = {"type": "vit", "name": "test_vit", "img_size": 64, "patch_size": 8, "out_indices": [2, 3, 5],
            "drop_path_rate": 0.0}
ATM = {"type": "atm", "embed_dim": 32, "num_heads": 1, "num_layers": 1}
ATM_MODEL = {"backbone": BACKBONE, "decode_head": {**ATM, "in_index": [2]},
             "aux_heads": [{**ATM, "in_index": [0]}, {**ATM, "in_index": [1]}]}
# SETR decode head (a spatial map head); a 1×1 FCN (per-token) and a 3×3 FCN (spatial) grade
FCN_MODEL = {"backbone": BACKBONE, "decode_head": {"type": "setr", "in_index": 2, "channels": 16},
             "aux_heads": [{"type": "fcn", "in_index": 0, "channels": 16, "kernel_size": 1},
                           {"type": "fcn", "in_index": 1, "channels": 16, "kernel_size": 3}]}


def recipe_dict(model: dict, data_root=None, **options) -> dict:
    raw = {"model": copy.deepcopy(model), "data": {"type": "synthetic", "crop_size": [64, 64], "synthetic_size": 64,
                                                   "num_workers": 0}}
    if data_root is not None:
        raw["data"]["root"] = str(data_root)
    if options:
        raw["model"]["type"] = "dtop"
        raw["model"]["options"] = options
    return raw


def build(model: dict, state=None, **options):
    """The model of a recipe; fresh weights are sharpened so that confidences spread (an
    untrained head gives every token nearly the same probabilities)."""
    torch.manual_seed(0)
    net = api.build_model(recipe_from_dict(recipe_dict(model, **options)), num_classes=NUM_CLASSES)
    if state is not None:
        net.load_state_dict(state)
        return net.eval()
    with torch.no_grad():
        for head in [net.decode_head, *net.aux_heads]:
            if hasattr(head, "class_head"):  # ATM: peaked class probabilities, confident masks
                head.class_head.weight.mul_(40)
                head.stages[-1].layers[-1].cross_attn.q_proj.weight.mul_(8)
            else:
                head.classifier.weight.mul_(300)
    return net.eval()


@pytest.fixture(scope="module")
def images():
    torch.manual_seed(1)
    return torch.randn(2, 3, 64, 64)


def first_stage_confidence(plain, images) -> torch.Tensor:
    """The stage-1 aux head's top per-class probability per token on the unpruned model: [B, N]."""
    with torch.no_grad():
        features = plain.backbone(images)
        head = plain.aux_heads[0]
        outputs = head(features)
        if "pred_logits" in outputs:
            probs = atm_class_probs(outputs["pred_logits"], outputs["pred_masks"].flatten(2))
        else:
            probs = head.seg_logits(outputs, features[0].shape[-2:]).flatten(2).transpose(1, 2).softmax(-1)
    return probs.max(-1).values


def threshold_between(confidence: torch.Tensor, quantile: float) -> float:
    """A p0 near the ``quantile`` of the confidences, in a gap of at least 1e-4 (no near-ties)."""
    values = confidence.flatten().sort().values
    gaps = values[1:] - values[:-1]
    start = int(quantile * (len(values) - 1))
    for i in range(start, len(gaps)):
        if gaps[i] > 1e-4:
            return float((values[i] + values[i + 1]) / 2)
    raise AssertionError("no gap in the confidences")


# --------------------------------------------------------------------------- the exit rule


def test_exit_rule_keeps_top_k_per_present_class():
    # tokens:            t0 c0   t1 c0   t2 c0   t3 c1   t4 c2 (not confident)   t5 c0 (= p0)
    confidence = torch.tensor([0.99, 0.97, 0.96, 0.98, 0.50, 0.95])
    label = torch.tensor([0, 0, 0, 1, 2, 0])
    probs = torch.full((1, 6, 3), 0.0)
    probs[0, torch.arange(6), label] = confidence
    valid = torch.ones(1, 6, dtype=torch.bool)
    # class 0: t0, t1 stay as context, t2 and t5 exit; class 1 has one exiting token (< k): it stays
    assert exit_decision(probs, valid, 0.95, k=2).tolist() == [[False, False, True, False, False, True]]
    assert exit_decision(probs, valid, 0.95, k=2, strict=True).tolist() == [[False, False, True, False, False, False]]
    assert exit_decision(probs, valid, 0.95, k=0).tolist() == [[True, True, True, True, False, True]]
    # padding never exits and never counts as context
    valid[0, 0] = False
    assert exit_decision(probs, valid, 0.95, k=2).tolist() == [[False, False, False, False, False, True]]
    # rows are independent: a batch gives each image its own answer
    batch = torch.cat([probs, probs.flip(1)])
    both = exit_decision(batch, torch.ones(2, 6, dtype=torch.bool), 0.95, k=1)
    assert both[1].tolist() == exit_decision(probs.flip(1), torch.ones(1, 6, dtype=torch.bool), 0.95, k=1)[0].tolist()


def test_exit_rule_with_k0_keeps_one_token():
    probs = torch.tensor([[[0.99, 0.01], [0.98, 0.02], [0.03, 0.97]]])
    leave = exit_decision(probs, torch.ones(1, 3, dtype=torch.bool), 0.9, k=0)
    assert leave.tolist() == [[True, True, False]]  # the least confident (0.97) stays


# --------------------------------------------------------------------------- equivalences


@pytest.mark.parametrize("model", [ATM_MODEL, FCN_MODEL], ids=["atm", "fcn"])
def test_p0_one_is_the_unpruned_model(model, images):
    plain = build(model)
    pruned = build(model, plain.state_dict(), p0=1.0)
    assert isinstance(pruned, DToPSegmentor)
    with torch.no_grad():
        expected, got = plain(images), pruned(images)
    assert torch.allclose(got, expected, atol=1e-6)
    assert torch.equal(got.argmax(1), expected.argmax(1))
    with torch.no_grad():
        fractions = token_fractions(pruned.forward_scores(images).counts)
    assert fractions == {"exit_fraction": [0.0, 0.0], "kept_fraction": 1.0}
    flops_plain, flops_pruned = count_flops(plain, images[:1]), count_flops(pruned, images[:1])
    assert flops_pruned == flops_plain  # p0 = 1 runs the unpruned model's operations, no more


@pytest.mark.parametrize("model", [ATM_MODEL, FCN_MODEL], ids=["atm", "fcn"])
def test_batch_equals_each_image_alone(model, images):
    plain = build(model)
    p0 = threshold_between(first_stage_confidence(plain, images), 0.5)
    pruned = build(model, plain.state_dict(), p0=p0, k=2)
    with torch.no_grad():
        together = pruned.run(images)
        alone = [pruned.run(images[i:i + 1]) for i in range(2)]
    kept = (together.exit_stage < 0).sum(1)
    assert kept[0] != kept[1] and (together.exit_stage >= 0).any()  # different kept counts: padding is used
    for i in range(2):
        assert torch.equal(together.exit_stage[i], alone[i].exit_stage[0])
        # relative: FCN scores reach ~70, where batched and single-image kernels differ by ~5e-5
        scale = alone[i].scores[0].abs().max()
        assert torch.allclose(together.scores[i], alone[i].scores[0], rtol=1e-5, atol=1e-6 * float(scale))
    with torch.no_grad():
        assert count_flops(pruned, images[:1]) < count_flops(plain, images[:1])


def test_exited_tokens_keep_their_exit_stage_prediction(images):
    plain = build(ATM_MODEL)
    confidence = first_stage_confidence(plain, images)
    pruned = build(ATM_MODEL, plain.state_dict(), p0=threshold_between(confidence, 0.4), k=1)
    with torch.no_grad():
        trace = pruned.run(images)
        features = plain.backbone(images)
        outputs = plain.aux_heads[0](features)  # stage 1 sees every token: the unpruned head's view
        stage1 = atm_token_probs(outputs["pred_logits"], outputs["pred_masks"].flatten(2))  # [B, N, K]
    exited = trace.exit_stage == 0
    assert exited.any() and (trace.exit_stage < 0).any()
    assert torch.allclose(trace.token_scores[exited], stage1[exited], atol=1e-5)
    assert (confidence[exited] >= pruned.options.p0).all()
    # the tokens that stayed finished with the decode head: their scores are not stage 1's
    assert not torch.allclose(trace.token_scores[~exited], stage1[~exited])


def test_exit_maps_and_stats(images):
    plain = build(ATM_MODEL)
    p0 = threshold_between(first_stage_confidence(plain, images), 0.5)
    pruned = build(ATM_MODEL, plain.state_dict(), p0=p0, k=1)
    with torch.no_grad():
        stats = token_fractions(pruned.forward_scores(images[:1]).counts)
        maps = pruned.exit_maps(images[:1, :, :60, :61])  # any size: padded to the patch grid
    assert len(stats["exit_fraction"]) == 2 and stats["exit_fraction"][0] > 0
    assert abs(sum(stats["exit_fraction"]) + stats["kept_fraction"] - 1) < 1e-6
    assert [m.shape for m in maps] == [(60, 61), (60, 61)] and all(m.dtype == np.uint8 for m in maps)
    assert (maps[0] == 255).any() and set(np.unique(maps[1])) <= {0, 128, 255}
    assert ((maps[1] == 128) == (maps[0] == 255)).all()  # stage-1 exits show as "earlier" in stage 2


def test_flops_split_counts_aux_heads_apart(images):
    plain = build(ATM_MODEL)
    unpruned = gflops_split(build(ATM_MODEL, plain.state_dict(), p0=1.0), images[:1])
    assert unpruned["gflops_aux"] == 0 and unpruned["gflops"] == pytest.approx(count_flops(plain, images[:1]))
    grading = gflops_split(build(ATM_MODEL, plain.state_dict(), p0=0.9999), images[:1])  # grades, nobody exits
    assert grading["gflops_aux"] > 0
    assert grading["gflops_without_aux"] == unpruned["gflops"]  # nobody exits: the same operations


# --------------------------------------------------------------------------- training (DToP@Finetune)


def training_model(model: dict, images, **options):
    """A pruned model in training mode with dropout off (two forwards see the same network) and a p0
    at which about half of the stage-1 tokens of ``images`` exit."""
    plain = build(model)
    p0 = threshold_between(first_stage_confidence(plain, images), 0.5)
    pruned = build(model, plain.state_dict(), p0=p0, k=1, **options).train()
    for module in pruned.modules():
        if isinstance(module, (torch.nn.Dropout, torch.nn.Dropout2d)):  # the ATM layers' and the FCN heads'
            module.p = 0.0
    return pruned


def test_finetune_loss_covers_exited_tokens_with_their_stage1_mask_logits(images):
    """Released DToP: the decode head's loss sees every pixel; a token that exited at stage 1 enters
    it with the stage-1 head's mask logits, which keep their graph (zbwxp/Dynamic-Token-Pruning
    backbone/vit_prune.py canvas, decode_heads/prune_head.py)."""
    pruned = training_model(ATM_MODEL, images)
    trace = pruned.run(images, keep_outputs=True)
    exited = trace.exit_stage == 0  # [B, N]
    assert exited.any() and (trace.exit_stage < 0).any()
    (name, _, outputs, labelled), decode = trace.heads[0], trace.heads[-1]
    assert name == "aux0" and decode[0] == "decode" and bool(decode[3].all())  # every pixel is labelled
    stage1 = outputs["pred_masks"].flatten(2).transpose(1, 2)  # [B, N, K]: stage 1 saw every token
    final = decode[2]["pred_masks"].flatten(2).transpose(1, 2)  # [B, N, K]
    assert torch.equal(final[exited], stage1[exited])
    assert not torch.allclose(final[~exited], stage1[~exited])
    # the decode loss trains the head the tokens exited by
    labels = torch.randint(0, NUM_CLASSES, (2, 64, 64), generator=torch.Generator().manual_seed(3))
    decode_loss = sum(v for k, v in pruned.losses(trace, labels).items() if k.startswith("decode."))
    decode_loss.backward()
    assert pruned.aux_heads[0].stages[0].proj.weight.grad.abs().sum() > 0


def test_finetune_losses_equal_the_official_ones(tmp_path):
    """zbwxp/Dynamic-Token-Pruning's training losses on its reduced model (tests/fixtures/official/
    dtop_loss.pt, made by tools/make_dtop_loss_fixture.py): pruning active, every head's ATMLoss on
    its full canvas, ignore pixels as negatives. Converted weights, same input and labels."""
    official = REPO / "tests" / "fixtures" / "official"
    fixture = torch.load(official / "dtop_loss.pt", weights_only=True)
    negative = [f"{head}.mask_loss_ignore=negative" for head in ("model.decode_head", "model.aux_heads.0",
                                                                  "model.aux_heads.1")]
    out = api.convert(official / "dtop.pth", recipe=REPO / "tests" / "fixtures" / "recipes" / "dtop_small.yaml",
                      out=tmp_path / "m.pt", overrides=negative)
    model = api.load_checkpoint(out.path).model.eval()  # no dropout: the fixture switched it off in train mode
    with torch.no_grad():
        stage = model.run(fixture["input"]).exit_stage[0]  # [N]
    assert torch.equal(stage == 0, fixture["stage0.exited"].bool())
    assert torch.equal(stage >= 0, fixture["stage1.exited"].bool()) and (stage == 1).any()
    losses = model(fixture["input"], fixture["labels"].long())
    terms = {"loss_ce": "loss_ce", "loss_focal": "loss_mask", "loss_dice": "loss_dice"}
    for head, official_head in {"aux0": "aux_0", "aux1": "aux_1", "decode": "decode"}.items():
        for term, official_term in terms.items():
            expected = fixture[f"loss.{official_head}.{official_term}"]
            assert losses[f"{head}.{term}"].item() == pytest.approx(expected.item(), rel=1e-5), (head, term)
    # the decode loss trains the auxiliary heads through the mask logits exited tokens carry, as released
    sum(v for k, v in losses.items() if k.startswith("decode.")).backward()
    for head, official_head in {"aux_heads.0": "aux_0", "aux_heads.1": "aux_1", "decode_head": "decode"}.items():
        grad = model.get_submodule(head).stages[0].proj.weight.grad
        expected = fixture[f"grad.{official_head}.input_proj.weight"]
        assert float((grad - expected).norm() / expected.norm()) < 1e-4, head


@pytest.mark.parametrize("model", [ATM_MODEL, FCN_MODEL], ids=["atm", "fcn"])
def test_finetune_loss_changes_with_the_labels_of_exited_tokens(model, images):
    pruned = training_model(model, images)
    torch.manual_seed(2)
    labels = torch.randint(0, NUM_CLASSES, (2, 64, 64))
    with torch.no_grad():
        exited = pruned.run(images).exit_stage == 0  # [B, N]
        pixels = exited.view(2, 1, 8, 8).repeat_interleave(8, 2).repeat_interleave(8, 3)[:, 0]  # [B, H, W]
        losses = pruned(images, labels)
        changed = pruned(images, torch.where(pixels, (labels + 1) % NUM_CLASSES, labels))
    assert exited.any()
    for key in losses:  # every head's loss sees the exited tokens' pixels
        assert changed[key].item() != pytest.approx(losses[key].item(), rel=1e-6), key


def test_finetune_trains_every_parameter_unless_freeze_backbone(images):
    labels = torch.randint(0, NUM_CLASSES, (2, 64, 64), generator=torch.Generator().manual_seed(4))
    pruned = training_model(ATM_MODEL, images)  # the default: the released prune_* configs train everything
    sum(pruned(images, labels).values()).backward()
    assert all(p.requires_grad and p.grad is not None for p in pruned.parameters())
    optimizer = build_optimizer(pruned, recipe_from_dict(recipe_dict(ATM_MODEL)).train.optimizer)
    optimized = sum(p.numel() for group in optimizer.param_groups for p in group["params"])
    assert optimized == sum(p.numel() for p in pruned.parameters())
    heads_only = training_model(ATM_MODEL, images, freeze_backbone=True)  # thesis 5.3.3.1's "finetuning the heads"
    sum(heads_only(images, labels).values()).backward()
    assert all(p.grad is None for p in heads_only.backbone.parameters())
    assert heads_only.decode_head.class_queries.weight.grad is not None


# --------------------------------------------------------------------------- the published experiments

OFFICIAL_CONFIGS = REPO / "tests" / "fixtures" / "official" / "configs"
# recipe -> its official config (zbwxp/Dynamic-Token-Pruning config/prune/), dumped by tools/dump_official_configs.py
DTOP_RECIPES = {
    "dtop_vit_b_ade20k": "BASE_segvit_ade20k",
    "dtop_vit_b_ade20k_finetune": "prune_segvit_ade20k",
    "dtop_vit_b_ade20k_finetune_p095": "prune_segvit_ade20k",
    "dtop_vit_l_ade20k": "BASE_segvit_ade20k_large",
    "dtop_vit_l_ade20k_finetune": "prune_segvit_ade20k_large",
    "dtop_vit_l_pascal_context_59": "BASE_segvit_pc",
    "dtop_vit_l_pascal_context_59_finetune": "prune_segvit_pc",
    "dtop_vit_l_coco_stuff10k": "BASE_segvit_cocostuff10k",
    "dtop_vit_l_coco_stuff10k_finetune": "prune_segvit_cocostuff10k",
}
VIT_SIZES = {"vit_base_patch16_384": (12, 768, 12), "vit_large_patch16_384": (24, 1024, 16)}  # depth, width, heads


def official_dump(name: str) -> dict:
    return json.loads((OFFICIAL_CONFIGS / f"dtop__{name}.json").read_text())


def dtop_parity(recipe) -> dict:
    """A DToP recipe's settings under the config-parity keys of the official dumps, plus
    ``model.aux_heads.thresh`` (the auxiliary PruneHeads' threshold: p0, 1.0 = no pruning)."""
    data, train, test, model = recipe.data, recipe.train, recipe.test, recipe.model
    backbone, head, opt = model.backbone.cfg, model.decode_head.cfg, train.optimizer
    depth, width, heads = VIT_SIZES[backbone.name]
    paramwise = {key: getattr(opt.paramwise, key) for key in ("custom_keys", "norm_decay_mult", "bias_lr_mult",
                                                               "bias_decay_mult", "dwconv_decay_mult", "bypass_duplicate")}
    return {
        "batch.per_gpu": data.batch_size // recipe.published.gpus,
        "data.crop": list(data.crop_size), "data.scale": list(data.scale), "data.ratio_range": list(data.ratio_range),
        "data.cat_max_ratio": data.cat_max_ratio, "data.flip_prob": data.flip_prob,
        "data.mean": list(data.mean), "data.std": list(data.std), "data.photometric": data.photometric,
        "grad_clip": train.grad_clip, "precision": "fp32" if train.amp == "off" else train.amp,
        "schedule.max_iters": train.max_iters, "schedule.power": train.poly_power,
        "schedule.warmup_iters": train.warmup_iters, "schedule.warmup_ratio": train.warmup_ratio,
        "schedule.min_lr": train.min_lr,
        "schedule.poly_begin": train.warmup_iters if train.lr_schedule == "mmengine" else 0,
        "schedule.poly_end": (train.poly_end or train.max_iters) if train.lr_schedule == "mmengine" else train.max_iters,
        "optimizer.type": {"adamw": "AdamW", "sgd": "SGD"}[opt.type], "optimizer.lr": opt.lr,
        "optimizer.weight_decay": opt.weight_decay, "optimizer.betas": list(opt.betas),
        "optimizer.paramwise": paramwise,
        "model.backbone.depth": depth, "model.backbone.embed_dim": width, "model.backbone.num_heads": heads,
        "model.backbone.out_indices": list(backbone.out_indices), "model.backbone.drop_path_rate": backbone.drop_path_rate,
        "model.backbone.pos_embed_resize": backbone.pos_embed_resize,
        "model.backbone.img_size": [backbone.img_size, backbone.img_size],
        "model.decode_head.embed_dim": head.embed_dim, "model.decode_head.num_heads": head.num_heads,
        "model.decode_head.num_layers": head.num_layers, "model.decode_head.self_attn": head.self_attn,
        "model.decode_head.img_size": head.mask_size,
        "model.loss.mask_weight": head.focal_weight, "model.loss.dice_weight": head.dice_weight,
        "model.loss.cls_weight": head.ce_weight, "model.loss.loss_weight": head.loss_weight,
        "model.aux_heads": [{"in_index": h.cfg.in_index[0], "loss_weight": h.cfg.loss_weight} for h in model.aux_heads],
        "model.aux_heads.thresh": model.options.p0 if model.type == "dtop" else 1.0,
        "test.mode": test.mode, "test.crop": list(test.crop_size), "test.stride": list(test.stride),
        "test.scale": list(test.scale), "test.min_size": test.min_size, "test.flip": test.flip,
    }


def official_parity(dump: dict) -> dict:
    """The same keys from an official dump (its ``parity`` summary and, for the threshold, the config)."""
    parity = dict(dump["parity"])
    parity["data.photometric"] = bool(parity["data.photometric"])
    parity["model.aux_heads"] = [{"in_index": h["in_index"], "loss_weight": h["loss_weight"]}
                                 for h in parity["model.aux_heads"]]
    (thresh,) = {h["thresh"] for h in dump["config"]["model"]["auxiliary_head"]}  # the heads that grade
    parity["model.aux_heads.thresh"] = thresh
    return parity


def same(a, b) -> bool:
    if isinstance(a, float) or isinstance(b, float):
        return a is not None and b is not None and a == pytest.approx(b, rel=1e-9)
    return a == b


@pytest.mark.parametrize("name", sorted(DTOP_RECIPES))
def test_dtop_recipes_are_the_official_configs_or_say_why_not(name):
    """Each DToP recipe against its official config: every setting equal, or listed with its reason in
    ``published.differences`` (and nothing listed that is equal). No gradient clipping, fp32,
    binary class heads, every parameter trained, thresholds per config."""
    recipe = load_recipe(REPO / "recipes" / f"{name}.yaml")
    dump = official_dump(DTOP_RECIPES[name])
    assert recipe.published is not None and recipe.published.official_config.endswith(f"config/prune/{DTOP_RECIPES[name]}.py")
    ours, official = dtop_parity(recipe), official_parity(dump)
    differing = {key for key in ours if not same(ours[key], official[key])}
    assert differing == set(recipe.published.differences), {k: (ours[k], official[k]) for k in differing}
    assert recipe.train.grad_clip is None and recipe.published.precision == "fp32" == official["precision"]
    assert recipe.published.batch_per_gpu == official["batch.per_gpu"]
    assert recipe.published.gpus * recipe.published.batch_per_gpu == recipe.data.batch_size
    heads = [recipe.model.decode_head, *recipe.model.aux_heads]
    assert all(h.type == "atm" and h.cfg.class_head == "binary" and h.cfg.mask_loss_ignore == "negative"
               and h.cfg.mask_resolution == "low" for h in heads)
    if "finetune" in name:
        options = recipe.model.options
        assert (options.k, options.strict, options.combine, options.freeze_backbone) == (5, True, "released", False)
        assert options.exit_layers == recipe.model.backbone.cfg.out_indices[:2]
    else:
        assert recipe.model.type == "encoder_decoder"


def test_vit_l_ade20k_recipes_resize_to_2560_640():
    for name in ("dtop_vit_l_ade20k", "dtop_vit_l_ade20k_finetune"):
        recipe = load_recipe(REPO / "recipes" / f"{name}.yaml")
        assert recipe.data.scale == (2560, 640) and recipe.test.scale == (2560, 640)


@pytest.mark.parametrize("name", ["dtop_vit_b_ade20k_finetune", "dtop_vit_l_ade20k_finetune"])
def test_finetune_recipes_build_and_train_every_parameter(name):
    """A ViT-B and a ViT-L fine-tune recipe build their pruned model (a narrow ViT of the recipe's
    depth) and one training step reaches every parameter."""
    recipe = load_recipe(REPO / "recipes" / f"{name}.yaml",
                         ["model.backbone.embed_dim=32", "model.backbone.num_heads=2", "model.backbone.img_size=64",
                          "model.decode_head.embed_dim=32", "model.decode_head.num_heads=2",
                          "model.aux_heads=[{type: atm, in_index: [0], embed_dim: 32, num_heads: 2, self_attn: true, "
                          "class_head: binary}, {type: atm, in_index: [1], embed_dim: 32, num_heads: 2, "
                          "self_attn: true, class_head: binary}]"])
    torch.manual_seed(0)
    model = api.build_model(recipe, num_classes=NUM_CLASSES).train()
    assert isinstance(model, DToPSegmentor) and model.exit_layers == recipe.model.options.exit_layers
    losses = model(torch.randn(2, 3, 64, 64), torch.randint(0, NUM_CLASSES, (2, 64, 64)))
    sum(losses.values()).backward()
    assert all(p.requires_grad and p.grad is not None for p in model.parameters())


def test_setr_dtop_recipe_has_no_gradient_clipping():
    recipe = load_recipe(REPO / "recipes" / "setr_dtop_vit_b_ade20k.yaml")
    assert recipe.train.grad_clip is None and recipe.train.amp == "off"


# --------------------------------------------------------------------------- prune API and errors


def write_base_checkpoint(path, model: dict, data_root) -> None:
    recipe = recipe_from_dict(recipe_dict(model, data_root))
    net = build(model)
    meta = {"classes": list(SYNTHETIC_CLASSES), "palette": SYNTHETIC_PALETTE.astype(int).tolist(),
            "num_classes": NUM_CLASSES, "ignore_index": 255}
    save_checkpoint(path, {"version": "test", "recipe": recipe.to_dict(), "meta": meta, "model": net.state_dict()})


def test_prune_writes_a_checkpoint_that_evaluates(synth_root, tmp_path):
    base = tmp_path / "base.pt"
    write_base_checkpoint(base, ATM_MODEL, synth_root)
    out = prune_checkpoint(base, p0=0.5, k=1, exit_layers=parse_layers("2,3"), out=tmp_path / "pruned.pt")
    loaded = api.load_checkpoint(out)
    assert isinstance(loaded.model, DToPSegmentor) and loaded.model.exit_layers == (2, 3)
    options = loaded.recipe.model.options  # typed DToPOptions
    assert (options.p0, options.k, options.exit_layers) == (0.5, 1, (2, 3))
    seen = []
    metrics = api.evaluate(out, device="cpu", flops=True, limit=2, progress=lambda done, total: seen.append(total))
    assert seen == [2, 2]  # the progress total is the image count, also while FLOPs are counted
    assert len(metrics["exit_fraction"]) == 2 and 0 <= metrics["kept_fraction"] <= 1
    assert metrics["gflops_avg"] > 0 and not np.isnan(metrics["aAcc"])
    assert 0 < metrics["gflops_avg_without_aux"] < metrics["gflops_avg"]  # p0 = 0.5 grades: aux heads ran
    result = api.predict([str(synth_root / "images" / "val")], out, tmp_path / "pred", device="cpu", show_pruning=True)
    assert any(p.name.endswith("_exit1.png") for p in result.written)
    keyed = cv2.imread(str(next(p for p in result.written if p.name.endswith("_exit1.png"))))
    image = cv2.imread(str(next((synth_root / "images" / "val").iterdir())))
    assert keyed.shape[1] > image.shape[1]  # the map with its key beside it ("exited at stage 2", ...)
    # pruning again replaces the options; default output name
    again = prune_checkpoint(out, p0=0.9)
    assert again.name == "pruned_dtop.pt"
    assert api.load_checkpoint(again).recipe.model.options.p0 == 0.9


def test_fcn_model_prunes(synth_root, tmp_path):
    base = tmp_path / "setr.pt"
    write_base_checkpoint(base, FCN_MODEL, synth_root)
    out = prune_checkpoint(base, p0=0.3, k=1)
    metrics = api.evaluate(out, device="cpu", limit=2)
    # the reported shares are those of the pruned forwards of the images evaluated (64 px: no padding)
    loaded = api.load_checkpoint(out)
    data = loaded.recipe.data
    val = build_dataset(data, "val")
    with torch.no_grad():
        stage = torch.cat([loaded.model.eval().run(eval_view(val[i]["image"][None], (64, 64), data.mean, data.std)).exit_stage
                           for i in range(2)])  # [2, N]
    exits = [float((stage == m).float().mean()) for m in range(2)]
    assert 0 < sum(exits) < 1  # some tokens exit and some stay: the comparison has something to compare
    assert metrics["exit_fraction"] == pytest.approx(exits, rel=1e-6)
    assert metrics["kept_fraction"] == pytest.approx(float((stage < 0).float().mean()), rel=1e-6)


def test_prune_rejects_wrong_inputs(synth_root, tmp_path):
    no_aux = tmp_path / "no_aux.pt"
    write_base_checkpoint(no_aux, {**ATM_MODEL, "aux_heads": []}, synth_root)
    with pytest.raises(SegcliError, match="no auxiliary heads"):
        prune_checkpoint(no_aux)
    base = tmp_path / "base.pt"
    write_base_checkpoint(base, ATM_MODEL, synth_root)
    with pytest.raises(SegcliError, match="block 1 has no auxiliary head") as err:
        prune_checkpoint(base, exit_layers=(1,))
    assert err.value.where == "exit_layers" and "2, 3" in err.value.message  # the option, by name
    with pytest.raises(SegcliError, match="must be increasing"):
        prune_checkpoint(base, exit_layers=(3, 2))
    with pytest.raises(SegcliError) as err:
        prune_checkpoint(base, p0=1.5)
    assert err.value.where == "p0"
    with pytest.raises(SegcliError, match="list of block numbers"):
        parse_layers("5;7")
    cascaded = {**ATM_MODEL, "decode_head": {**ATM, "in_index": [2, 1]}}
    with pytest.raises(SegcliError, match="decode head must read one backbone layer"):
        build(cascaded, p0=0.9)


def test_a_base_model_assembled_at_full_resolution_prunes(synth_root, tmp_path):
    """Full-size SegViT recipes assemble masks at full resolution; DToP needs the low order, which
    changes no weight: pruning switches it instead of refusing (and the full-size DToP recipes build)."""
    full = copy.deepcopy(ATM_MODEL)
    full["decode_head"]["mask_resolution"] = "full"
    base = tmp_path / "full.pt"
    write_base_checkpoint(base, full, synth_root)
    loaded = api.load_checkpoint(prune_checkpoint(base, p0=0.9, k=1))
    assert loaded.recipe.model.decode_head.cfg.mask_resolution == "low"
    recipe = load_recipe(REPO / "recipes" / "dtop_vit_b_ade20k_finetune.yaml",
                         ["model.backbone.pretrained=null", "model.backbone.img_size=64"])
    assert isinstance(api.build_model(recipe, num_classes=NUM_CLASSES), DToPSegmentor)
