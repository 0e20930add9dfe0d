"""NRD decoder (thesis 3.2): parameter count, batched g_θ vs a reference loop, shapes, gradients,
ablation options and decoder GFLOPs."""
from __future__ import annotations

import pytest
import torch

from segcli.configurable import from_dict
from segcli.errors import SegcliError
from segcli.models.base import HeadContext
from segcli.models.heads.nrd import (NRDConfig, NRDHead, coordinate_grid, layer_shapes, num_dynamic_params,
                                     patch_mlp_einsum, patch_mlp_grouped_conv, split_params)

IMPLS = {"einsum": patch_mlp_einsum, "grouped_conv": patch_mlp_grouped_conv}


def tiny_context(num_classes: int = 5, low: int = 8, high: int = 12) -> HeadContext:
    return HeadContext(in_channels=(low, high), in_strides=(4, 32), num_classes=num_classes)


def tiny_head(num_classes: int = 5, **options) -> NRDHead:
    options = {"guidance_channels": 4, "guidance_hidden": 6, "hidden_channels": 3, "controller_channels": 10,
               **options}
    return NRDHead(NRDConfig(**options), tiny_context(num_classes))


def features(batch: int, height: int, width: int, dtype=torch.float32) -> list[torch.Tensor]:
    """Backbone outputs of a ``height × width`` image: stride 4 (8 ch) and stride 32 (12 ch)."""
    def ceil(a, b):
        return -(-a // b)
    return [torch.randn(batch, 8, ceil(height, 4), ceil(width, 4), dtype=dtype),
            torch.randn(batch, 12, ceil(height, 32), ceil(width, 32), dtype=dtype)]


def reference_patch_mlp(inputs, params, shapes, s):
    """One g_θ at a time: a Python loop over batch and patch locations (the definition)."""
    batch, in_channels, height, width = inputs.shape
    out = torch.zeros(batch, shapes[-1][0], height, width, dtype=inputs.dtype)
    for b in range(batch):
        for i in range(height // s):
            for j in range(width // s):
                x = inputs[b, :, i * s:(i + 1) * s, j * s:(j + 1) * s].reshape(in_channels, s * s)
                theta, offset = params[b, :, i, j], 0
                for k, (o, c) in enumerate(shapes):
                    weight = theta[offset:offset + o * c].reshape(o, c)
                    bias = theta[offset + o * c:offset + o * c + o]
                    offset += o * c + o
                    x = weight @ x + bias[:, None]
                    if k < len(shapes) - 1:
                        x = torch.relu(x)
                out[b, :, i * s:(i + 1) * s, j * s:(j + 1) * s] = x.reshape(-1, s, s)
    return out


def test_parameter_count_is_899_for_cityscapes():
    assert num_dynamic_params(2 + 16, 16, 19) == 899  # thesis 3.2.2
    head = NRDHead(NRDConfig(), HeadContext((256, 512), (4, 32), 19))
    assert head.num_params == 899
    assert head.controller[-1].out_channels == 899


@pytest.mark.parametrize("impl", sorted(IMPLS))
def test_batched_patch_mlp_matches_reference_loop(impl):
    torch.manual_seed(0)
    shapes = layer_shapes(5, 3, 4)
    s, rows, cols, batch = 4, 2, 3, 2
    inputs = torch.randn(batch, 5, rows * s, cols * s, dtype=torch.float64)
    params = torch.randn(batch, num_dynamic_params(5, 3, 4), rows, cols, dtype=torch.float64)
    flat = params.permute(0, 2, 3, 1).reshape(batch * rows * cols, -1)  # [N, P]
    batched = IMPLS[impl](inputs, split_params(flat, shapes), (rows, cols, s))
    torch.testing.assert_close(batched, reference_patch_mlp(inputs, params, shapes, s))


def test_split_order_is_w0_b0_w1_b1_w2_b2():
    shapes = layer_shapes(2, 3, 4)  # sizes 6, 3, 9, 3, 12, 4
    params = torch.arange(37.0).unsqueeze(0)
    (w0, b0), (w1, b1), (w2, b2) = split_params(params, shapes)
    assert w0.shape == (1, 3, 2) and w0[0, 1, 0] == 2  # [out, in], out-major
    assert b0.tolist() == [[6, 7, 8]] and w1[0, 0, 0] == 9 and b1[0, 0] == 18
    assert w2[0, 0, 0] == 21 and b2.tolist() == [[33, 34, 35, 36]]


def test_coordinate_grid_is_arange_per_axis():
    grid = coordinate_grid(8)
    assert grid.shape == (2, 8, 8)
    assert torch.equal(grid[0, 3], torch.arange(0, 1, 1 / 8))  # x varies along a row
    assert torch.equal(grid[1, :, 5], torch.arange(0, 1, 1 / 8))  # y along a column


def test_both_impls_give_the_same_head_output():
    torch.manual_seed(0)
    head_a = tiny_head(impl="einsum").double().eval()
    head_b = tiny_head(impl="grouped_conv").double().eval()
    head_b.load_state_dict(head_a.state_dict())
    feats = features(2, 64, 96, torch.float64)
    torch.testing.assert_close(head_a(feats)["logits"], head_b(feats)["logits"])


@pytest.mark.parametrize("size", [(64, 96), (50, 130), (100, 33)])
def test_shapes_for_non_square_and_non_divisible_inputs(size):
    torch.manual_seed(0)
    head = tiny_head()
    outputs = head(features(2, *size))
    rows, cols = -(-size[0] // 32), -(-size[1] // 32)
    assert outputs["logits"].shape == (2, 5, rows * 8, cols * 8)  # the padded patch grid at stride 4
    assert head.seg_logits(outputs, size).shape == (2, 5, *size)
    labels = torch.randint(0, 5, (2, *size))
    loss = head.loss(outputs, labels)["loss_ce"]
    assert loss.ndim == 0 and torch.isfinite(loss)


def test_gradients_reach_controller_and_guidance():
    torch.manual_seed(0)
    head = tiny_head()
    outputs = head(features(2, 64, 64))
    head.loss(outputs, torch.randint(0, 5, (2, 64, 64)))["loss_ce"].backward()
    for name in ("controller.0.conv.weight", "controller.1.weight", "controller.1.bias",
                 "guidance.0.conv.weight", "guidance.1.weight", "input_norm.weight"):
        grad = dict(head.named_parameters())[name].grad
        assert grad is not None and grad.abs().sum() > 0, name


@pytest.mark.parametrize("options, in_channels, hidden, has_guidance", [
    ({}, 18, 16, True),
    ({"use_coords": False}, 16, 16, True),
    ({"use_guidance": False}, 2, 16, False),
    ({"hidden_channels": 8}, 18, 8, True),
    ({"guidance_channels": 32}, 34, 16, True),
])
def test_ablation_options_change_the_parameter_count(options, in_channels, hidden, has_guidance):
    head = NRDHead(NRDConfig(**options), HeadContext((256, 512), (4, 32), 19))
    expected = in_channels * hidden + hidden + hidden * hidden + hidden + hidden * 19 + 19
    assert head.num_params == expected
    assert head.controller[-1].weight.shape == (expected, 512, 1, 1)
    assert (head.guidance is not None) == has_guidance
    assert head.input_norm.num_features == in_channels
    outputs = head([torch.randn(1, 256, 16, 16), torch.randn(1, 512, 2, 2)])
    assert outputs["logits"].shape == (1, 19, 16, 16)


def test_grid_size_other_than_the_stride_ratio():
    head = tiny_head(grid_size=16)
    outputs = head(features(1, 64, 96))
    assert outputs["logits"].shape == (1, 5, 32, 48)  # stride 2
    assert head.seg_logits(outputs, (64, 96)).shape == (1, 5, 64, 96)


def test_config_needs_an_input_to_g_theta():
    with pytest.raises(SegcliError, match="use_coords"):
        from_dict(NRDConfig, {"use_coords": False, "use_guidance": False}, "model.decode_head")
    with pytest.raises(SegcliError, match="impl"):
        from_dict(NRDConfig, {"impl": "loop"}, "model.decode_head")


def test_in_index_out_of_range_is_a_user_error():
    with pytest.raises(SegcliError, match="in_index"):
        NRDHead(NRDConfig(in_index=(0, 5)), tiny_context())


@pytest.mark.parametrize("impl", sorted(IMPLS))
def test_fvcore_counts_the_dynamic_mlp_the_same_for_both_impls(impl):
    pytest.importorskip("fvcore")
    from segcli.engine.flops import count_flops

    class PatchMLP(torch.nn.Module):
        def forward(self, inputs, params):
            return IMPLS[impl](inputs, split_params(params, shapes), (2, 3, 8))

    shapes = layer_shapes(18, 16, 19)
    inputs, params = torch.randn(1, 18, 16, 24), torch.randn(6, 899)
    expected = 6 * 64 * (18 * 16 + 16 * 16 + 16 * 19)  # N · s² · multiply-adds per pixel
    # (fvcore's einsum count goes through numpy's einsum_path estimate: off by a few flops)
    assert count_flops(PatchMLP(), inputs, params) * 1e9 == pytest.approx(expected, rel=1e-3)


def test_decoder_gflops_match_the_thesis():
    """Decoder-only GFLOPs at 1024×2048 (thesis table 3.1: NRD 20.4, DeepLabV3+ 76.4), counted at
    1/16 of the pixels (every decoder op scales with the pixel count) and scaled up."""
    pytest.importorskip("fvcore")
    from segcli.engine.flops import count_flops
    from segcli.models.heads.deeplabv3plus import DeepLabV3PlusConfig, DeepLabV3PlusHead

    ctx = HeadContext((256, 512), (4, 32), 19)
    feats = [torch.zeros(1, 256, 64, 128), torch.zeros(1, 512, 8, 16)]  # R50 + ASPP at 256×512
    nrd = count_flops(NRDHead(NRDConfig(), ctx), feats) * 16
    deeplab = count_flops(DeepLabV3PlusHead(DeepLabV3PlusConfig(), ctx), feats) * 16
    assert nrd == pytest.approx(20.4, rel=0.05)
    assert deeplab == pytest.approx(76.4, rel=0.05)
