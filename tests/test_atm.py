"""ATM decode head and its criterion (thesis 4.2.1): shapes, mask accumulation, padding, loss."""
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from segcli.configurable import from_dict
from segcli.errors import SegcliError
from segcli.models.atm_criterion import ATMCriterion, class_targets, dice_loss, present_classes
from segcli.models.base import HeadContext
from segcli.models.heads.atm import ATMConfig, ATMHead, ATMStage, semantic_scores
from segcli.models.layers import MaskAttention

C, K = 32, 5  # channels of the fake backbone maps, classes
RECIPES = Path(__file__).resolve().parents[1] / "recipes"


def _head(num_outputs=3, **kw) -> ATMHead:
    torch.manual_seed(0)
    cfg = ATMConfig(**kw)
    return ATMHead(cfg, HeadContext((C,) * num_outputs, (16,) * num_outputs, K))


def _features(grid=(4, 6), batch=2, num=3, requires_grad=False):
    torch.manual_seed(1)
    return [torch.randn(batch, C, *grid, requires_grad=requires_grad) for _ in range(num)]


@pytest.mark.parametrize("grid", [(4, 4), (3, 5)])
def test_output_shapes_square_and_non_square(grid):
    head = _head().eval()
    out = head(_features(grid))
    assert out["pred_logits"].shape == (2, K, K + 1)
    assert out["pred_masks"].shape == (2, K, *grid)
    assert len(out["aux_outputs"]) == 2
    assert all(a["pred_masks"].shape == (2, K, *grid) for a in out["aux_outputs"])
    size = (16 * grid[0], 16 * grid[1])
    for resolution in ("low", "full"):
        head.mask_resolution = resolution
        assert head.seg_logits(out, size).shape == (2, K, *size)
    assert head.embed_dim == C // 2 and head.stages[0].layers[0].cross_attn.num_heads == 1  # D/32, at least 1


def test_masks_accumulate_over_stages_and_stages_read_deepest_first():
    head = _head(num_layers=2).eval()
    features = _features()
    seen = []
    hooks = [s.register_forward_hook(lambda mod, args, out: seen.append((args, out))) for s in head.stages]
    out = head(features)
    for h in hooks:
        h.remove()
    (args0, out0), (args1, out1), (args2, out2) = seen
    # in_index (2, 1, 0): stage 0 reads the last backbone output
    for (args, _), index in zip(seen, (2, 1, 0)):
        assert torch.equal(args[1], features[index].flatten(2).transpose(1, 2))
    # queries cascade: stage i+1 starts from stage i's output queries; stage 0 from the embedding
    assert torch.equal(args0[0][0], head.class_queries.weight)
    assert torch.equal(args1[0], out0[0]) and torch.equal(args2[0], out1[0])
    raw = [o[1].view(2, K, 4, 6) for o in (out0, out1, out2)]
    assert torch.allclose(out["aux_outputs"][0]["pred_masks"], raw[0])
    assert torch.allclose(out["aux_outputs"][1]["pred_masks"], raw[0] + raw[1])
    assert torch.allclose(out["pred_masks"], raw[0] + raw[1] + raw[2])
    # one shared class head classifies every stage's queries
    assert torch.allclose(out["aux_outputs"][0]["pred_logits"], head.class_head(out0[0]))
    assert torch.allclose(out["pred_logits"], head.class_head(out2[0]))


def test_use_stages_one_reads_only_the_deepest_output():
    head = _head(use_stages=1)
    assert len(head.stages) == 1 and head.in_index == (2,)
    out = head.eval()(_features())
    assert out["aux_outputs"] == []
    assert head.loss(out, torch.zeros(2, 64, 96, dtype=torch.long)).keys() == {"loss_ce", "loss_focal", "loss_dice"}


def test_mask_is_head_mean_of_scaled_logits_and_attention_matches_sdpa():
    torch.manual_seed(0)
    attn = MaskAttention(64, num_heads=4).eval()
    queries, tokens = torch.randn(2, 5, 64), torch.randn(2, 7, 64)
    out, similarity = attn(queries, tokens, return_similarity=True)
    out_sdpa, none = attn(queries, tokens)
    assert none is None and torch.allclose(out, out_sdpa, atol=1e-5)
    q = attn.q_proj(queries).view(2, 5, 4, 16).transpose(1, 2)  # [B, h, Q, d]
    k = attn.k_proj(tokens).view(2, 7, 4, 16).transpose(1, 2)  # [B, h, N, d]
    expected = (q @ k.transpose(-2, -1) / 16 ** 0.5).mean(1)  # [B, Q, N]
    assert torch.allclose(similarity, expected, atol=1e-5)


def test_key_padding_mask_leaves_real_tokens_unchanged():
    torch.manual_seed(0)
    stage = ATMStage(C, 16, num_heads=2, num_layers=2).eval()  # layer 0: SDPA path, layer 1: explicit path
    queries = torch.randn(1, K, 16).expand(2, -1, -1)
    lengths = (7, 4)
    tokens = [torch.randn(1, n, C) for n in lengths]
    padded = torch.randn(2, 9, C)  # padding slots hold garbage on purpose
    padding = torch.ones(2, 9, dtype=torch.bool)
    for i, (t, n) in enumerate(zip(tokens, lengths)):
        padded[i, :n] = t[0]
        padding[i, :n] = False
    out_q, out_sim = stage(queries, padded, key_padding_mask=padding)
    for i, (t, n) in enumerate(zip(tokens, lengths)):
        ref_q, ref_sim = stage(queries[i:i + 1], t)
        assert torch.allclose(out_q[i], ref_q[0], atol=1e-5)
        assert torch.allclose(out_sim[i, :, :n], ref_sim[0], atol=1e-5)


def test_self_attn_adds_the_expected_parameters():
    dim = C // 2
    without = sum(p.numel() for p in _head(self_attn=False).parameters())
    with_sa = sum(p.numel() for p in _head(self_attn=True).parameters())
    per_layer = 4 * (dim * dim + dim) + 2 * dim  # q/k/v/out projections + LayerNorm
    assert with_sa - without == 3 * 3 * per_layer


def test_semantic_scores_full_and_low():
    torch.manual_seed(0)
    cls, masks = torch.randn(2, K, K + 1), torch.randn(2, K, 3, 5)
    probs = cls.softmax(-1)[..., :K]
    full = semantic_scores(cls, masks, (24, 40), "full")
    up = F.interpolate(masks, (24, 40), mode="bilinear", align_corners=False)
    assert torch.allclose(full, torch.einsum("bqc,bqhw->bchw", probs, up.sigmoid()), atol=1e-6)
    # "low" = sigmoid at 1/16, upsample, multiply (thesis eq. 4.3 order), by linearity of resizing
    low = semantic_scores(cls, masks, (24, 40), "low")
    up_sig = F.interpolate(masks.sigmoid(), (24, 40), mode="bilinear", align_corners=False)
    assert torch.allclose(low, torch.einsum("bqc,bqhw->bchw", probs, up_sig), atol=1e-6)
    assert not torch.allclose(low, full)


def test_gradients_reach_queries_and_features():
    head = _head().train()
    features = _features(requires_grad=True)
    labels = torch.randint(0, K, (2, 64, 96))
    losses = head.loss(head(features), labels)
    sum(losses.values()).backward()
    assert head.class_queries.weight.grad.abs().sum() > 0
    assert all(f.grad is not None and f.grad.abs().sum() > 0 for f in features)
    assert all(torch.isfinite(v) for v in losses.values())


# --------------------------------------------------------------------------- criterion


def test_targets_only_class_zero_present():
    labels = torch.full((1, 8, 8), 255)
    labels[0, :4] = 0
    present = present_classes(labels, K)
    assert present.tolist() == [[True, False, False, False, False]]
    assert class_targets(present).tolist() == [[0, K, K, K, K]]


def test_ce_eos_weighting_matches_hand_computation():
    torch.manual_seed(0)
    logits = torch.randn(1, K, K + 1)
    labels = torch.full((1, 4, 4), 255)
    labels[0, 0, 0], labels[0, 1, 1] = 0, 3  # classes 0 and 3 present
    crit = ATMCriterion(K, eos_coef=0.1)
    losses = crit({"pred_logits": logits, "pred_masks": torch.zeros(1, K, 4, 4)}, labels)
    logp = logits.log_softmax(-1)[0]
    targets = [0, K, K, 3, K]
    weights = [1.0, 0.1, 0.1, 1.0, 0.1]
    expected = -sum(w * logp[q, t] for q, (t, w) in enumerate(zip(targets, weights))) / sum(weights)
    assert torch.allclose(losses["loss_ce"], expected)


def test_all_ignore_image_leaves_only_no_object_ce():
    head = _head().train()
    features = _features(batch=1, requires_grad=True)
    labels = torch.full((1, 64, 96), 255)
    out = head(features)
    losses = head.loss(out, labels)
    for prefix in ("", "s0.", "s1."):
        assert losses[prefix + "loss_focal"].item() == 0 and losses[prefix + "loss_dice"].item() == 0
    no_object = F.cross_entropy(out["pred_logits"][0], torch.full((K,), K))  # all weights equal -> plain mean
    assert torch.allclose(losses["loss_ce"], no_object)
    sum(losses.values()).backward()
    assert all(torch.isfinite(p.grad).all() for p in head.parameters() if p.grad is not None)


def test_mask_losses_exclude_ignore_pixels():
    torch.manual_seed(0)
    labels = torch.randint(0, 2, (2, 6, 8))
    labels[:, :, :3] = 255
    masks = torch.randn(2, K, 6, 8)  # same size as the labels: upsampling is the identity
    changed = masks.clone()
    changed[:, :, :, :3] += 5.0  # only ignored pixels change
    outputs = {"pred_logits": torch.zeros(2, K, K + 1)}
    exclude, negative = ATMCriterion(K, mask_loss_ignore="exclude"), ATMCriterion(K)  # default: released code
    a, b = exclude({**outputs, "pred_masks": masks}, labels), exclude({**outputs, "pred_masks": changed}, labels)
    assert torch.allclose(a["loss_focal"], b["loss_focal"]) and torch.allclose(a["loss_dice"], b["loss_dice"])
    c, d = negative({**outputs, "pred_masks": masks}, labels), negative({**outputs, "pred_masks": changed}, labels)
    assert not torch.allclose(c["loss_focal"], d["loss_focal"])


def test_mask_losses_average_over_present_pairs_and_weights():
    torch.manual_seed(0)
    labels = torch.zeros(2, 4, 4, dtype=torch.long)
    labels[1] = 2
    labels[1, 0] = 255
    masks = torch.randn(2, K, 4, 4)
    crit = ATMCriterion(K, focal_weight=1.0, dice_weight=1.0, mask_loss_ignore="exclude")
    losses = crit({"pred_logits": torch.zeros(2, K, K + 1), "pred_masks": masks}, labels)
    # pairs: (0, class 0) all 16 pixels valid; (1, class 2) 12 valid pixels
    d0 = dice_loss(masks[0, 0].flatten()[None], torch.ones(1, 16))
    valid = (labels[1] != 255).flatten()[None]
    d1 = dice_loss(masks[1, 2].flatten()[None], torch.ones(1, 16), valid)
    assert torch.allclose(losses["loss_dice"], (d0 + d1)[0] / 2)
    # a perfect mask has (nearly) zero focal and dice loss
    perfect = torch.where(labels[:, None] == torch.arange(K)[None, :, None, None], 20.0, -20.0).float()
    zero = crit({"pred_logits": torch.zeros(2, K, K + 1), "pred_masks": perfect}, labels)
    assert zero["loss_focal"] < 1e-6 and zero["loss_dice"] < 0.1  # dice keeps a smoothing remainder


def test_loss_names_weights_and_deep_supervision_switch():
    features, labels = _features(), torch.randint(0, K, (2, 64, 96))
    full = _head().eval()
    out = full(features)
    base = full.loss(out, labels)
    assert set(base) == {f"{p}loss_{n}" for p in ("", "s0.", "s1.") for n in ("ce", "focal", "dice")}
    doubled = _head(loss_weight=2.0).eval().loss(out, labels)
    assert all(torch.allclose(doubled[k], 2 * base[k]) for k in base)
    assert set(_head(deep_supervision=False).loss(out, labels)) == {"loss_ce", "loss_focal", "loss_dice"}


# --------------------------------------------------------------------------- config and integration


def test_config_errors():
    with pytest.raises(SegcliError, match="use_stages"):
        from_dict(ATMConfig, {"in_index": [1, 0], "use_stages": 3}, "model.decode_head")
    with pytest.raises(SegcliError, match="choose one of"):
        from_dict(ATMConfig, {"mask_resolution": "mid"}, "model.decode_head")
    with pytest.raises(SegcliError, match="in_index 2 does not exist"):
        _head(num_outputs=2)
    with pytest.raises(SegcliError, match="divisible"):
        _head(embed_dim=16, num_heads=3)


def test_segmentor_with_tiny_vit_trains_and_predicts():
    from segcli.configurable import Component
    from segcli.models.backbones.vit import ViTConfig
    from segcli.models.builder import build_segmentor
    from segcli.recipe import ModelConfig

    torch.manual_seed(0)
    backbone = Component("vit", ViTConfig(name="vit_tiny_patch16_224", out_indices=(1, 2, 3), img_size=64,
                                          drop_path_rate=0.0))
    model = build_segmentor(ModelConfig(backbone=backbone, decode_head=Component("atm", ATMConfig())), K)
    images, labels = torch.randn(2, 3, 48, 80), torch.randint(0, K, (2, 48, 80))
    losses = model(images, labels)
    sum(losses.values()).backward()
    assert model.backbone.vit.patch_embed.proj.weight.grad.abs().sum() > 0
    assert model.decode_head.class_queries.weight.grad.abs().sum() > 0
    assert model.eval()(images).shape == (2, K, 48, 80)


@pytest.mark.parametrize("path", sorted(RECIPES.glob("segvit_*.yaml")) + [RECIPES / "setr_vit_b_ade20k.yaml"],
                         ids=lambda p: p.stem)
def test_full_size_recipes_load(path):
    from segcli.recipe import load_recipe

    recipe = load_recipe(path)
    head = recipe.model.decode_head
    assert head.type in ("atm", "setr")
    if head.type == "atm":
        assert len(head.cfg.in_index) == len(recipe.model.backbone.cfg.out_indices)
