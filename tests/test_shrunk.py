"""Shrunk SegViT (thesis 4.2.2): QD, QU, EQD, edge targets and loss, on tiny from-scratch ViTs."""
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from segcli.configurable import Component, from_dict
from segcli.engine.flops import count_flops
from segcli.errors import SegcliError
from segcli.models import build_segmentor
from segcli.models.backbones.vit import ViTBackbone, ViTConfig, block_forward
from segcli.models.heads.atm import ATMConfig
from segcli.models.heads.edge import EdgeHead, edge_loss, edge_targets
from segcli.models.shrunk import ShrunkOptions, ShrunkSegmentor, shrunk_grid, subsample_mask
from segcli.ops.scores import token_fractions
from segcli.recipe import ModelConfig, load_recipe

REPO = Path(__file__).resolve().parents[1]
NUM_CLASSES = 5


def _model(out_indices=(3,), head=None, **options) -> ShrunkSegmentor:
    torch.manual_seed(0)
    backbone = ViTConfig(name="vit_tiny_patch16_224", img_size=64, out_indices=out_indices, drop_path_rate=0.0,
                         patch_size=8, depth=4)
    head = head or ATMConfig(in_index=(0,), num_layers=2, dropout=0.0)
    options.setdefault("qu_dropout", 0.0)
    cfg = ModelConfig(backbone=Component("vit", backbone), decode_head=Component("atm", head), type="shrunk",
                      options=ShrunkOptions(**options))  # typed, as a recipe's are at load
    return build_segmentor(cfg, NUM_CLASSES)


class FixedEdges(nn.Module):
    """Stands in for the edge head: logits that mark exactly ``edges`` [B, N] as edge tokens."""

    def __init__(self, edges: torch.Tensor):
        super().__init__()
        self.register_buffer("edges", edges)

    def forward(self, tokens):
        edge = self.edges[: tokens.shape[0]].float()[..., None]  # [B, N, 1]
        return torch.cat([(1 - edge) * 5.0, edge * 5.0], dim=-1)  # [B, N, 2]


# --------------------------------------------------------------------------- QD


@pytest.mark.parametrize("name", ["vit_tiny_patch16_224", "beitv2_base_patch16_224"])
def test_qd_block_equals_full_block_at_subsampled_positions(name):
    torch.manual_seed(0)
    backbone = ViTBackbone(ViTConfig(name=name, img_size=48, out_indices=(0,), drop_path_rate=0.0, depth=1)).eval()
    if name.startswith("beit"):
        with torch.no_grad():
            backbone.blocks[0].attn.relative_position_bias_table.normal_()
    grid = (3, 3)
    tokens = torch.randn(2, 9, backbone.embed_dim)
    index = subsample_mask(grid).nonzero()[:, 0].expand(2, -1)  # [2, 4]: tokens 0, 2, 6, 8
    assert index[0].tolist() == [0, 2, 6, 8]
    full = block_forward(backbone.blocks[0], tokens, grid)
    queried = block_forward(backbone.blocks[0], tokens, grid, query_index=index)
    assert queried.shape == (2, 4, backbone.embed_dim)
    assert torch.allclose(queried, full[:, [0, 2, 6, 8]], atol=1e-5)


def test_shrunk_encoder_qd_output_is_the_plain_block_output_subsampled():
    model = _model(out_indices=(1, 3), qd_index=1, qu="none").eval()
    images = torch.randn(2, 3, 72, 56)  # a 9 x 7 grid
    features, _ = model.encode(images)
    backbone = model.backbone
    tokens, grid = backbone.embed(images)
    for i in range(2):  # the same pretrained-style blocks, run in full
        tokens = backbone.run_block(i, tokens, grid)
    plain = backbone.tokens_to_map(tokens, grid)  # [2, C, 9, 7]
    assert torch.allclose(features[0], plain[:, :, ::2, ::2], atol=1e-5)


@pytest.mark.parametrize("size,grid", [((64, 64), (8, 8)), ((72, 56), (9, 7)), ((40, 88), (5, 11))])
def test_grid_after_qd_is_ceil_half(size, grid):
    assert shrunk_grid(grid) == ((grid[0] + 1) // 2, (grid[1] + 1) // 2)
    assert int(subsample_mask(grid).sum()) == shrunk_grid(grid)[0] * shrunk_grid(grid)[1]
    model = _model(out_indices=(1, 3), qd_index=1, qu="none").eval()
    features, extras = model.encode(torch.randn(2, 3, *size))
    assert tuple(features[0].shape) == (2, 192, *shrunk_grid(grid))  # block 1 is the QD block
    assert tuple(features[1].shape) == (2, 192, *shrunk_grid(grid))
    counts = model.token_counts(extras)
    assert int(counts["kept"]) == int(extras["keep"].sum()) and int(counts["tokens"]) == 2 * grid[0] * grid[1]
    assert model(torch.randn(1, 3, *size)).shape == (1, NUM_CLASSES, *size)


def test_outputs_before_qd_stay_at_full_token_resolution():
    model = _model(out_indices=(0, 3), qd_index=2).eval()
    features, _ = model.encode(torch.randn(1, 3, 72, 56))
    assert [tuple(f.shape[-2:]) for f in features] == [(9, 7), (9, 7)]


# --------------------------------------------------------------------------- QU


@pytest.mark.parametrize("qu", ["inherit", "learned"])
@pytest.mark.parametrize("qd_index", [0, 2])
def test_qu_restores_the_token_grid(qu, qd_index):
    model = _model(qd_index=qd_index, qu=qu).eval()
    for size in ((64, 64), (72, 56)):  # the learnt 8x8 query grid is resized for 9x7
        features, _ = model.encode(torch.randn(2, 3, *size))
        assert tuple(features[0].shape) == (2, 192, size[0] // 8, size[1] // 8)
    scores = model(torch.randn(2, 3, 72, 56))
    assert scores.shape == (2, NUM_CLASSES, 72, 56) and torch.isfinite(scores).all()


def test_qu_reads_the_pre_qd_tokens_and_the_final_tokens():
    grid = (4, 4)
    pre_qd, final = torch.randn(2, 16, 192), torch.randn(2, 4, 192)
    other_pre, other_final = torch.randn(2, 16, 192), torch.randn(2, 4, 192)
    for qu in ("inherit", "learned"):
        upsampler = _model(qd_index=2, qu=qu).eval().qu
        assert len(upsampler.readers) == (2 if qu == "learned" else 1)
        base = upsampler(pre_qd, final, grid)
        assert base.shape == (2, 16, 192)
        assert not torch.allclose(upsampler(other_pre, final, grid), base)  # the 1/16 tokens from before QD
        assert not torch.allclose(upsampler(pre_qd, other_final, grid), base)  # the shrunk final tokens
    assert _model(qd_index=2, qu="learned").qu.grid_queries.num_embeddings == 64  # (64/8)^2 learnt queries


# --------------------------------------------------------------------------- EQD


def _eqd_model(edges: torch.Tensor, **options) -> ShrunkSegmentor:
    model = _model(qd_index=options.pop("qd_index", 0), edge=True, **options).eval()
    model.edge_head = FixedEdges(edges)
    return model


def test_eqd_keeps_subsample_and_every_edge_token_per_image():
    grid = (9, 7)
    edges = torch.zeros(2, 63, dtype=torch.bool)
    edges[0, [1, 8, 9, 31]] = True  # image 0: four edge tokens (none on the subsample)
    edges[1, torch.arange(0, 63, 3)] = True  # image 1: 21, some on the subsample
    model = _eqd_model(edges)
    _, extras = model.encode(torch.randn(2, 3, 72, 56))
    expected = subsample_mask(grid)[None] | edges
    assert torch.equal(extras["keep"], expected)
    counts = extras["keep"].sum(1).tolist()
    assert counts[0] == 20 + 4 and counts[0] != counts[1]  # variable per image
    with torch.no_grad():
        fractions = token_fractions(model.forward_scores(torch.randn(2, 3, 72, 56)).counts)
    assert fractions["kept_fraction"] == pytest.approx(expected.float().mean().item())
    assert fractions["edge_fraction"] == pytest.approx(edges.float().mean().item())


@pytest.mark.parametrize("qu", ["inherit", "learned"])
def test_eqd_batched_equals_per_image(qu):
    edges = torch.zeros(3, 63, dtype=torch.bool)
    edges[0, [1, 8, 9, 31]] = True
    edges[1, torch.arange(0, 63, 3)] = True  # image 2: no edges at all
    images = torch.randn(3, 3, 72, 56)
    model = _eqd_model(edges, qu=qu, qd_index=1)
    batched = model(images)
    for i in range(3):
        model.edge_head = FixedEdges(edges[i:i + 1])
        alone = model(images[i:i + 1])
        assert torch.allclose(batched[i:i + 1], alone, atol=1e-5), i


def test_eqd_flops_follow_the_kept_tokens():
    model = _eqd_model(torch.zeros(1, 64, dtype=torch.bool))
    images = torch.zeros(1, 3, 64, 64)
    few = count_flops(model, images)
    model.edge_head = FixedEdges(torch.ones(1, 64, dtype=torch.bool))
    many = count_flops(model, images)
    model.options = ShrunkOptions(qd_index=0)  # the same weights as plain QD: no edge branch
    model.edge_head = None
    assert count_flops(model, images) == pytest.approx(few)  # the stub edge head costs nothing
    assert many > 1.5 * few


# --------------------------------------------------------------------------- edge targets, loss, gradients


def test_edge_targets_from_a_hand_made_label_map():
    ignore = 255
    labels = torch.tensor([
        [0, 0, 0, 0, 0, 0, 1, 1],
        [0, 0, 0, 0, 0, 0, 1, 1],
        [0, 0, 0, 0, 0, 0, 0, 0],
        [0, 0, 0, 0, 0, 0, 0, 0],
        [ignore, ignore, ignore, ignore, 2, 2, ignore, ignore],
        [ignore, ignore, ignore, ignore, 2, 2, ignore, ignore],
        [ignore, ignore, ignore, ignore, 2, 3, 2, 2],
        [ignore, ignore, ignore, ignore, 2, 2, 2, 2],
    ])[None]
    targets = edge_targets(labels, 4, (2, 2), ignore)
    # top-left one class; top-right 0 and 1; bottom-left all ignore; bottom-right 2, 3 and ignore
    assert targets.tolist() == [[[0, 1], [ignore, 1]]]
    labels[0, 6, 5] = 2  # now class 2 next to ignore only: not an edge
    assert edge_targets(labels, 4, (2, 2), ignore).tolist() == [[[0, 1], [ignore, 0]]]
    # labels smaller than the token grid are padded with ignore, larger ones cropped
    assert edge_targets(labels[:, :6, :8], 4, (2, 2), ignore).tolist() == [[[0, 1], [ignore, 0]]]
    assert edge_targets(labels, 4, (1, 1), ignore).tolist() == [[[0]]]


def test_edge_loss_ignores_and_is_zero_without_targets():
    logits = torch.tensor([[[2.0, -2.0], [0.0, 0.0], [5.0, 5.0]]], requires_grad=True)
    targets = torch.tensor([[0, 1, 255]])
    expected = (torch.log1p(torch.exp(torch.tensor(-4.0))) + torch.log(torch.tensor(2.0))) / 2
    assert edge_loss(logits, targets, weight=2.0).item() == pytest.approx(2 * expected.item(), rel=1e-5)
    zero = edge_loss(logits, torch.full((1, 3), 255))
    zero.backward()
    assert zero.item() == 0.0 and logits.grad is not None


def test_edge_head_widths_and_gradient_reaches_it():
    head = EdgeHead(192)
    assert [m.out_features for m in head.mlp if isinstance(m, nn.Linear)] == [192, 96, 2]
    assert [m.out_features for m in EdgeHead(192, (96,)).mlp if isinstance(m, nn.Linear)] == [96, 2]
    model = _model(qd_index=0, edge=True).train()
    images, labels = torch.randn(2, 3, 64, 64), torch.randint(0, NUM_CLASSES, (2, 64, 64))
    losses = model(images, labels)
    assert "edge.loss_edge" in losses and torch.isfinite(losses["edge.loss_edge"])
    sum(losses.values()).backward()
    for name, param in model.edge_head.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, name
    assert model.qu.out_proj.weight.grad.abs().sum() > 0
    assert model.backbone.vit.patch_embed.proj.weight.grad.abs().sum() > 0


def test_eqd_training_with_target_edges_keeps_the_true_edge_tokens():
    model = _model(qd_index=0, edge=True, edge_keep_train="target").train()
    labels = torch.zeros(1, 64, 64, dtype=torch.long)
    labels[:, :, 20:] = 1  # a vertical boundary inside token column 2 (pixels 16..23)
    features, extras = model.encode(torch.randn(1, 3, 64, 64), labels)
    edges = extras["edge_targets"].flatten(1) == 1
    assert edges.sum() == 8 and torch.equal(extras["keep"], subsample_mask((8, 8))[None] | edges)


# --------------------------------------------------------------------------- released head, validation, recipes


def test_released_head_mode_supervises_every_layer_with_its_own_mask():
    head = ATMConfig(in_index=(0,), num_layers=3, self_attn=True, dropout=0.0)
    model = _model(head=head, qd_index=0, qu="learned", head_mode="released").train()
    features, _ = model.encode(torch.randn(2, 3, 64, 64))
    outputs = model.decode(features)
    assert len(outputs["aux_outputs"]) == 2
    first = outputs["aux_outputs"][0]["pred_masks"]
    second = outputs["aux_outputs"][1]["pred_masks"]
    assert not torch.allclose(first + second, outputs["pred_masks"])  # not cumulative
    losses = model(torch.randn(2, 3, 64, 64), torch.randint(0, NUM_CLASSES, (2, 64, 64)))
    assert {"decode.s0.loss_ce", "decode.s1.loss_dice", "decode.loss_focal"} <= set(losses)
    model.eval()
    assert model(torch.randn(1, 3, 64, 64)).shape == (1, NUM_CLASSES, 64, 64)


def test_invalid_configurations_are_user_errors():
    with pytest.raises(SegcliError, match="ragged"):
        _model(out_indices=(1, 3), qd_index=0, edge=True)
    with pytest.raises(SegcliError, match="one-stage"):
        _model(out_indices=(1, 3), head=ATMConfig(in_index=(1, 0)), qd_index=0, head_mode="released")
    with pytest.raises(SegcliError, match="qd_index"):
        _model(out_indices=(2,), qd_index=3)
    with pytest.raises(ValueError, match="EQD needs QU"):
        ShrunkOptions(edge=True, qu="none")


def test_exit_maps_mark_the_kept_queries():
    edges = torch.zeros(1, 64, dtype=torch.bool)
    edges[0, 9] = True  # token (1, 1)
    maps = _eqd_model(edges).exit_maps(torch.randn(1, 3, 64, 64))
    assert len(maps) == 1 and maps[0].dtype == np.uint8 and maps[0].shape == (64, 64)
    assert maps[0][0, 0] == 255 and maps[0][8, 8] == 255 and maps[0][0, 8] == 0


@pytest.mark.parametrize("recipe", ["segvit_shrunk_qd6_vit_b_ade20k", "segvit_shrunk_qd0_vit_b_ade20k",
                                    "segvit_shrunk_eqd0_vit_b_ade20k", "segvit_shrunk_beitv2_l_ade20k"])
def test_full_recipes_validate(recipe):
    loaded = load_recipe(REPO / "recipes" / f"{recipe}.yaml")
    assert loaded.model.type == "shrunk"
    options = loaded.model.options  # typed at load
    assert isinstance(options, ShrunkOptions)
    assert options.qd_index in (0, 6, 8)
    assert loaded.model.backbone.cfg.out_indices in ((11,), (23,))


@pytest.mark.parametrize("recipe", ["segvit_shrunk", "segvit_shrunk_qd0"])
def test_tiny_recipes_build_and_run(recipe):
    loaded = load_recipe(REPO / "recipes" / "tiny" / f"{recipe}.yaml",
                         ["model.backbone.img_size=64", "data.crop_size=[64, 64]"])
    model = build_segmentor(loaded.model, NUM_CLASSES)
    assert isinstance(model, ShrunkSegmentor) and (model.edge_head is not None) == (recipe == "segvit_shrunk")
    model.eval()
    assert model(torch.randn(1, 3, 64, 64)).shape == (1, NUM_CLASSES, 64, 64)


def test_eqd_through_the_cli(cli, synth_root, tmp_path):
    """train -> eval --flops (dataset-average GFLOPs, kept/edge fractions) -> predict --show-pruning."""
    import json

    from conftest import tiny_overrides

    work = tmp_path / "eqd"
    recipe = REPO / "recipes" / "tiny" / "segvit_shrunk.yaml"
    res = cli("train", recipe, "--work-dir", work, *tiny_overrides(synth_root, **{"train.max_iters": 2}))
    assert res.exit_code == 0, res.output
    res = cli("eval", work / "last.pt", "--json", "--flops")
    assert res.exit_code == 0, res.output
    metrics = json.loads(res.stdout)
    assert 0.25 <= metrics["kept_fraction"] <= 1 and 0 <= metrics["edge_fraction"] <= 1
    assert metrics["gflops_avg"] > 0
    res = cli("predict", synth_root / "images" / "val", "--checkpoint", work / "last.pt", "--out", tmp_path / "pred",
              "--show-pruning")
    assert res.exit_code == 0, res.output
    assert len(list((tmp_path / "pred").glob("*_exit0.png"))) == len(list((synth_root / "images" / "val").iterdir()))


def test_full_size_cost_structure_of_table_4_7():
    """ViT-B 512²: QD@6 + QU and QD@0 against the plain one-stage ATM model (table 4.7: 0.84 and 0.40)."""
    from segcli import api

    def gflops(name, model_type=None):
        overrides = ["model.backbone.pretrained=null"]
        if model_type:  # the plain model of the table: the same head, no QD
            overrides += [f"model.type={model_type}", "model.options={}"]
        return api.flops(REPO / "recipes" / f"{name}.yaml", (512, 512), overrides)["gflops"]

    plain = gflops("segvit_shrunk_qd6_vit_b_ade20k", "encoder_decoder")
    assert plain == pytest.approx(115.8, rel=0.01)
    assert gflops("segvit_shrunk_qd6_vit_b_ade20k") / plain == pytest.approx(97.1 / 115.8, rel=0.02)
    assert gflops("segvit_shrunk_qd0_vit_b_ade20k") / plain == pytest.approx(46.1 / 115.8, rel=0.06)


def test_qu_skip_puts_shrunk_tokens_back_nearest():
    from segcli.models.shrunk import nearest_grid

    grid = (4, 4)
    keep = subsample_mask(grid).expand(2, -1).clone()  # positions 0, 2, 8, 10
    keep[1, 5] = True  # an edge token in image 1
    tokens = torch.arange(16, dtype=torch.float32).view(1, 16, 1).expand(2, -1, -1)  # token value = position
    packed = [tokens[b][keep[b]] for b in range(2)]
    index = torch.tensor([keep[0].nonzero()[:, 0].tolist() + [0], keep[1].nonzero()[:, 0].tolist()])  # 0 padded
    values = torch.stack([torch.cat([packed[0], torch.zeros(1, 1)]), packed[1]])
    pad = torch.tensor([[False] * 4 + [True], [False] * 5])
    out = nearest_grid(values, index, pad, keep, grid)[..., 0].view(2, 4, 4)
    expected = torch.tensor([[0, 0, 2, 2], [0, 0, 2, 2], [8, 8, 10, 10], [8, 8, 10, 10]], dtype=torch.float32)
    assert torch.equal(out[0], expected)
    expected[1, 1] = 5  # the edge token keeps its own value
    assert torch.equal(out[1], expected)
    model = _model(qd_index=0, qu="inherit", qu_skip=True).eval()
    assert model(torch.randn(2, 3, 64, 64)).shape == (2, NUM_CLASSES, 64, 64)
