"""ViT backbone: block-level forward equals timm's, BEiT relative bias, pretrained loading."""
from pathlib import Path

import pytest
import timm
import torch

from segcli.errors import SegcliError
from segcli.models.backbones.vit import ViTBackbone, ViTConfig, block_forward, rel_pos_bias


def _cfg(name="vit_tiny_patch16_224", **kw):
    return ViTConfig(name=name, out_indices=kw.pop("out_indices", (1, 3)), img_size=kw.pop("img_size", 64),
                     drop_path_rate=0.0, **kw)


def test_block_forward_matches_timm_vit():
    torch.manual_seed(0)
    backbone = ViTBackbone(_cfg()).eval()
    tokens = torch.randn(2, 16, 192)
    block = backbone.blocks[0]
    assert torch.allclose(block_forward(block, tokens, (4, 4)), block(tokens), atol=1e-5)


def test_block_forward_matches_timm_beit_without_cls():
    torch.manual_seed(0)
    backbone = ViTBackbone(_cfg("beitv2_base_patch16_224", img_size=64, out_indices=(0,))).eval()
    attn = backbone.blocks[0].attn
    with torch.no_grad():
        attn.relative_position_bias_table.normal_()
    ours = rel_pos_bias(attn, (4, 4))
    theirs = attn._get_rel_pos_bias()[0, :, 1:, 1:]
    assert torch.allclose(ours, theirs)
    # a token subset gathers the same bias entries
    tokens = torch.randn(1, 16, 768)
    full = block_forward(backbone.blocks[0], tokens, (4, 4))
    assert full.shape == (1, 16, 768)


def test_query_index_and_padding():
    torch.manual_seed(0)
    backbone = ViTBackbone(_cfg()).eval()
    block = backbone.blocks[0]
    tokens = torch.randn(1, 16, 192)
    full = block_forward(block, tokens, (4, 4))
    index = torch.tensor([[0, 5, 10]])
    sub = block_forward(block, tokens, (4, 4), query_index=index)
    assert torch.allclose(sub, full[:, [0, 5, 10]], atol=1e-5)
    padded = torch.cat([tokens, torch.randn(1, 4, 192)], 1)
    mask = torch.zeros(1, 20, dtype=torch.bool)
    mask[:, 16:] = True
    out = block_forward(block, padded, (4, 4), key_padding_mask=mask)
    assert torch.allclose(out[:, :16], full, atol=1e-5)


def test_backbone_shapes_non_square_and_no_cls():
    backbone = ViTBackbone(_cfg(out_indices=(3, 1)))
    feats = backbone(torch.randn(2, 3, 48, 80))
    assert [tuple(f.shape) for f in feats] == [(2, 192, 3, 5), (2, 192, 3, 5)]
    assert backbone.vit.cls_token is None
    assert all(p.requires_grad for p in backbone.parameters())


def test_pretrained_timm_checkpoint_loads(tmp_path):
    torch.manual_seed(1)
    source = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32)  # cls token, 2x2 grid
    path = tmp_path / "vit.pth"
    torch.save(source.state_dict(), path)
    backbone = ViTBackbone(_cfg(img_size=64, pretrained=str(path)))
    assert torch.equal(backbone.vit.blocks[2].attn.qkv.weight, source.blocks[2].attn.qkv.weight)
    # position embeddings: cls slot kept aside, the 2x2 grid resized to 4x4
    assert backbone.vit.pos_embed.shape == (1, 17, 192)


def test_pretrained_position_table_resized_as_mmsegmentation_with_plain_bicubic(tmp_path):
    """``pos_embed_resize: bicubic`` resizes the pretrained table at load as MMSegmentation's
    VisionTransformer.init_weights does (plain bicubic, align_corners=False); it used to go
    through timm's antialiased resampling whatever the setting."""
    import torch.nn.functional as F

    torch.manual_seed(2)
    source = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=48)  # 3x3 grid
    path = tmp_path / "vit.pth"
    torch.save(source.state_dict(), path)
    table = source.pos_embed[:, 1:].reshape(1, 3, 3, 192).permute(0, 3, 1, 2)  # [1, C, 3, 3]
    plain = F.interpolate(table, size=(4, 4), mode="bicubic", align_corners=False).flatten(2).transpose(1, 2)
    loaded = ViTBackbone(_cfg(img_size=64, pretrained=str(path), pos_embed_resize="bicubic")).vit.pos_embed
    assert torch.allclose(loaded[:, -16:], plain, rtol=1e-5, atol=1e-6)
    timm_way = ViTBackbone(_cfg(img_size=64, pretrained=str(path))).vit.pos_embed  # antialiased: another table
    assert not torch.allclose(timm_way[:, -16:], plain, rtol=1e-3, atol=1e-4)


def test_pretrained_from_a_segcli_checkpoint(tmp_path):
    """A segcli checkpoint as ``pretrained``: its encoder is loaded, its heads are skipped."""
    from segcli import build_model
    from segcli.recipe import load_recipe

    torch.manual_seed(2)
    recipe = load_recipe(Path(__file__).resolve().parents[1] / "recipes" / "tiny" / "segvit.yaml",
                         ["model.backbone.img_size=64", "model.backbone.patch_size=16"])
    source = build_model(recipe, num_classes=5)
    path = tmp_path / "run.pt"
    torch.save({"model": source.state_dict(), "meta": {"num_classes": 5}}, path)
    backbone = ViTBackbone(_cfg(img_size=64, patch_size=16, pretrained=str(path)))
    assert torch.equal(backbone.vit.blocks[3].mlp.fc1.weight, source.backbone.vit.blocks[3].mlp.fc1.weight)
    assert torch.equal(backbone.vit.pos_embed, source.backbone.vit.pos_embed)


def test_pretrained_errors(tmp_path):
    with pytest.raises(SegcliError, match="not found"):
        ViTBackbone(_cfg(pretrained=str(tmp_path / "missing.pth")))
    other = timm.create_model("vit_small_patch16_224", pretrained=False, img_size=64)
    torch.save(other.state_dict(), tmp_path / "small.pth")
    with pytest.raises(SegcliError, match="shape mismatch"):
        ViTBackbone(_cfg(pretrained=str(tmp_path / "small.pth")))
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(SegcliError, match="cannot read"):
        ViTBackbone(_cfg(pretrained=str(tmp_path / "junk.pth")))


def test_layer_ids():
    backbone = ViTBackbone(_cfg())
    assert backbone.layer_id("vit.patch_embed.proj.weight") == 0
    assert backbone.layer_id("vit.blocks.3.attn.qkv.weight") == 4
    assert backbone.num_layers == 14


def test_select_and_scatter_tokens_round_trip():
    from segcli.models.tokens import scatter_tokens, select_tokens

    tokens = torch.arange(2 * 5 * 3, dtype=torch.float32).reshape(2, 5, 3)
    keep = torch.tensor([[True, False, True, False, False], [True, True, True, True, False]])
    packed, index, pad = select_tokens(tokens, keep)
    assert packed.shape == (2, 4, 3)
    assert index[0, :2].tolist() == [0, 2] and pad[0].tolist() == [False, False, True, True]
    assert torch.equal(packed[1], tokens[1, :4])
    back = scatter_tokens(torch.zeros_like(tokens), packed * 10, index, pad)
    assert torch.equal(back[0, [0, 2]], tokens[0, [0, 2]] * 10) and back[0, [1, 3, 4]].abs().sum() == 0
    assert back[1, 4].abs().sum() == 0


def test_padded_batch_equals_each_image_alone():
    """A block on a padded batch of token subsets equals the block on each subset alone."""
    from segcli.models.tokens import select_tokens

    torch.manual_seed(0)
    backbone = ViTBackbone(_cfg("beitv2_base_patch16_224", img_size=64, out_indices=(0,))).eval()
    with torch.no_grad():
        backbone.blocks[0].attn.relative_position_bias_table.normal_()
    tokens = torch.randn(2, 16, 768)
    keep = torch.rand(2, 16) > 0.4
    keep[:, 0] = True
    packed, index, pad = select_tokens(tokens, keep)
    out = backbone.run_block(0, packed, (4, 4), key_padding_mask=pad, positions=index)
    for b in range(2):
        pos = keep[b].nonzero()[:, 0]
        alone = backbone.run_block(0, tokens[b:b + 1, pos], (4, 4), positions=pos[None])
        assert torch.allclose(out[b, : len(pos)], alone[0], atol=1e-4)


def test_ragged_per_token_layers_equal_the_padded_block(monkeypatch):
    """Above the padding share the norms/projections/MLP run on the real tokens only: same result."""
    import segcli.models.backbones.vit as vit

    torch.manual_seed(0)
    backbone = ViTBackbone(_cfg()).eval()
    tokens = torch.randn(3, 16, 192)
    pad = torch.zeros(3, 16, dtype=torch.bool)
    pad[0, 12:], pad[1, 5:] = True, True  # 11 of 48 slots padded
    with torch.no_grad():
        monkeypatch.setattr(vit, "RAGGED_MIN_PADDING", 2.0)  # never ragged
        dense = block_forward(backbone.blocks[0], tokens, (4, 4), key_padding_mask=pad)
        monkeypatch.setattr(vit, "RAGGED_MIN_PADDING", 0.0)  # always
        ragged = block_forward(backbone.blocks[0], tokens, (4, 4), key_padding_mask=pad)
    assert ragged.shape == dense.shape
    torch.testing.assert_close(ragged[~pad], dense[~pad], rtol=1e-5, atol=1e-5)
    assert not ragged[pad].any()  # padding slots are zero, never read


def test_ragged_attention_falls_back_to_the_mask_for_padding_inside_a_row(monkeypatch):
    import segcli.models.backbones.vit as vit

    torch.manual_seed(0)
    backbone = ViTBackbone(_cfg()).eval()
    tokens = torch.randn(2, 16, 192)
    pad = torch.zeros(2, 16, dtype=torch.bool)
    pad[0, 3:7] = True  # not at the end of the row: no per-image split
    pad[1, 10:] = True
    assert vit._front_packed_lengths(pad) is None
    with torch.no_grad():
        monkeypatch.setattr(vit, "RAGGED_MIN_PADDING", 2.0)
        dense = block_forward(backbone.blocks[0], tokens, (4, 4), key_padding_mask=pad)
        monkeypatch.setattr(vit, "RAGGED_MIN_PADDING", 0.0)
        ragged = block_forward(backbone.blocks[0], tokens, (4, 4), key_padding_mask=pad)
    torch.testing.assert_close(ragged[~pad], dense[~pad], rtol=1e-5, atol=1e-5)
