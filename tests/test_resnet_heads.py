"""ResNet backbone (+ ASPP), local timm weights, and the DeepLabV3+ / bilinear / FCN heads."""
from __future__ import annotations

import numpy as np
import pytest
import timm
import torch

from segcli.configurable import from_dict
from segcli.errors import SegcliError
from segcli.models.backbones.resnet import ResNetBackbone, ResNetConfig
from segcli.models.base import HeadContext, resize
from segcli.models.base import upsample_to_input
from segcli.models.heads.bilinear import BilinearConfig, BilinearHead
from segcli.models.heads.deeplabv3plus import DeepLabV3PlusConfig, DeepLabV3PlusHead
from segcli.models.heads.fcn import FCNConfig, FCNHead
from segcli.recipe import ModelConfig
from segcli.registry import BACKBONES, HEADS


def tiny_resnet(**options) -> ResNetBackbone:
    return ResNetBackbone(ResNetConfig(**{"name": "resnet18", **options}))


def test_components_are_registered():
    assert "resnet" in BACKBONES
    for name in ("nrd", "deeplabv3plus", "bilinear", "fcn"):
        assert name in HEADS


def test_resnet_with_aspp_shapes_for_non_divisible_input():
    torch.manual_seed(0)
    backbone = tiny_resnet(aspp=True, aspp_channels=32, out_indices=(1, 3, 4)).eval()
    assert backbone.out_channels == (64, 256, 32)
    assert backbone.out_strides == (4, 16, 32)
    with torch.no_grad():
        outs = backbone(torch.randn(1, 3, 70, 100))
    assert [tuple(o.shape) for o in outs] == [(1, 64, 18, 25), (1, 256, 5, 7), (1, 32, 3, 4)]  # ceil(H / s)


def test_aspp_structure():
    aspp = tiny_resnet(aspp=True, aspp_channels=32).aspp
    assert len(aspp.branches) == 4
    assert aspp.branches[0].conv.kernel_size == (1, 1)
    assert [b.depthwise.conv.dilation for b in aspp.branches[1:]] == [(12, 12), (24, 24), (36, 36)]
    assert aspp.branches[1].depthwise.conv.groups == 512  # depthwise on R18's 512 channels
    assert aspp.bottleneck.conv.in_channels == 5 * 32 and aspp.bottleneck.conv.kernel_size == (3, 3)


def test_deep_stem_and_output_stride():
    deep = tiny_resnet()
    assert isinstance(deep.body.conv1, torch.nn.Sequential)  # 3×3 32-32-64 ("V1c")
    assert deep.body.conv1[0].out_channels == 32
    plain = tiny_resnet(deep_stem=False)
    assert isinstance(plain.body.conv1, torch.nn.Conv2d)
    dilated = tiny_resnet(output_stride=8).eval()
    assert dilated.out_strides == (4, 8)
    with torch.no_grad():
        assert dilated(torch.randn(1, 3, 64, 64))[-1].shape == (1, 512, 8, 8)


@pytest.mark.parametrize("suffix", [".pth", ".safetensors", ".npz"])
def test_loads_local_timm_weights(tmp_path, suffix):
    torch.manual_seed(0)
    source = timm.create_model("resnet18", pretrained=False, stem_type="deep", stem_width=32)
    state = {k: v.clone() for k, v in source.state_dict().items()}
    path = tmp_path / f"resnet18{suffix}"
    if suffix == ".pth":
        torch.save({"state_dict": state}, path)
    elif suffix == ".safetensors":
        from safetensors.torch import save_file
        save_file(state, str(path))
    else:
        np.savez(path, **{k: v.numpy() for k, v in state.items()})
    backbone = tiny_resnet(pretrained=str(path))
    loaded = backbone.body.state_dict()
    fresh = tiny_resnet().body.state_dict()
    assert not torch.equal(fresh["layer4.1.conv2.weight"], state["layer4.1.conv2.weight"])
    for key, value in loaded.items():
        assert torch.equal(value, state[key]), key


def test_loads_mmcv_v1c_weights(tmp_path):
    """MMSegmentation's ResNetV1c checkpoints name the deep stem ``stem.{0,1,3,4,6,7}``."""
    torch.manual_seed(0)
    state = tiny_resnet().body.state_dict()
    to_mmcv = {"conv1.0.": "stem.0.", "conv1.1.": "stem.1.", "conv1.3.": "stem.3.", "conv1.4.": "stem.4.",
               "conv1.6.": "stem.6.", "bn1.": "stem.7."}
    mmcv = {}
    for key, value in state.items():
        prefix = next((p for p in to_mmcv if key.startswith(p)), None)
        mmcv[to_mmcv[prefix] + key[len(prefix):] if prefix else key] = value
    assert "stem.7.running_var" in mmcv and "bn1.weight" not in mmcv
    torch.save({"state_dict": {f"backbone.{k}": v for k, v in mmcv.items()}}, tmp_path / "v1c.pth")
    loaded = tiny_resnet(pretrained=str(tmp_path / "v1c.pth")).body.state_dict()
    for key, value in loaded.items():
        assert torch.equal(value, state[key]), key


def test_missing_pretrained_file_is_a_user_error(tmp_path):
    path = tmp_path / "nope.pth"
    with pytest.raises(SegcliError) as info:
        tiny_resnet(pretrained=str(path))
    assert info.value.where == "model.backbone.pretrained"
    assert str(path) in info.value.message


def test_weights_of_another_architecture_are_a_user_error(tmp_path):
    path = tmp_path / "plain_stem.pth"
    torch.save(timm.create_model("resnet18", pretrained=False).state_dict(), path)  # 7×7 stem
    with pytest.raises(SegcliError, match="do not fit resnet18"):
        tiny_resnet(pretrained=str(path))


def test_config_errors():
    with pytest.raises(SegcliError, match="did you mean .resnet18."):
        tiny_resnet(name="resnet81")
    with pytest.raises(SegcliError, match="not a timm ResNet"):
        tiny_resnet(name="vit_tiny_patch16_224")
    with pytest.raises(SegcliError, match="out_indices"):
        from_dict(ResNetConfig, {"out_indices": [4, 1]}, "model.backbone")
    with pytest.raises(SegcliError, match="invalid value"):
        from_dict(ResNetConfig, {"output_stride": 4}, "model.backbone")


CTX = HeadContext(in_channels=(16, 24, 32), in_strides=(4, 16, 32), num_classes=6)


def stride_features(batch: int, height: int, width: int) -> list[torch.Tensor]:
    levels = zip(CTX.in_channels, CTX.in_strides, strict=True)
    return [torch.randn(batch, c, -(-height // s), -(-width // s)) for c, s in levels]


@pytest.mark.parametrize("head", [
    DeepLabV3PlusHead(DeepLabV3PlusConfig(in_index=(0, 2), c1_channels=8, channels=16), CTX),
    BilinearHead(BilinearConfig(), CTX),
    FCNHead(FCNConfig(in_index=1, channels=8), CTX),
    FCNHead(FCNConfig(in_index=1, channels=8, num_convs=2, concat_input=True), CTX),
    FCNHead(FCNConfig(in_index=1, num_convs=0), CTX),
], ids=["deeplabv3plus", "bilinear", "fcn", "fcn-2convs-concat", "fcn-0convs"])
@pytest.mark.parametrize("size", [(64, 96), (70, 45)])
def test_head_shapes_and_loss(head, size):
    torch.manual_seed(0)
    outputs = head(stride_features(2, *size))
    assert head.seg_logits(outputs, size).shape == (2, 6, *size)
    labels = torch.randint(0, 6, (2, *size))
    labels[0, :10] = 255
    loss = head.loss(outputs, labels)["loss_ce"]
    assert loss.ndim == 0 and torch.isfinite(loss) and loss > 0
    loss.backward()
    assert head.classifier.weight.grad.abs().sum() > 0


def test_loss_weight_scales_the_loss():
    torch.manual_seed(0)
    full = FCNHead(FCNConfig(in_index=1, channels=8), CTX).eval()
    aux = FCNHead(FCNConfig(in_index=1, channels=8, loss_weight=0.4), CTX).eval()
    aux.load_state_dict(full.state_dict())
    feats, labels = stride_features(2, 64, 64), torch.randint(0, 6, (2, 64, 64))
    torch.testing.assert_close(aux.loss(aux(feats), labels)["loss_ce"], 0.4 * full.loss(full(feats), labels)["loss_ce"])


def test_fcn_on_vit_maps():
    ctx = HeadContext(in_channels=(48, 48, 48), in_strides=(16, 16, 16), num_classes=4)
    head = FCNHead(FCNConfig(in_index=1, channels=8, num_convs=2), ctx)
    outputs = head([torch.randn(1, 48, 8, 8) for _ in range(3)])
    assert head.seg_logits(outputs, (128, 128)).shape == (1, 4, 128, 128)


def test_upsample_to_input_crops_the_padded_extent():
    logits = torch.randn(1, 3, 4, 5)  # stride 8: covers 32 × 40 input pixels
    torch.testing.assert_close(upsample_to_input(logits, 8, (32, 40)), resize(logits, (32, 40)))
    torch.testing.assert_close(upsample_to_input(logits, 8, (27, 36)), resize(logits, (32, 40))[..., :27, :36])
    # a size the map does not cover as a padded input: plain resize
    torch.testing.assert_close(upsample_to_input(logits, 8, (64, 80)), resize(logits, (64, 80)))


@pytest.mark.parametrize("head", ["nrd", "deeplabv3plus", "bilinear"])
def test_segmentor_from_model_config(head):
    from segcli.models.builder import build_segmentor

    raw = {"backbone": {"type": "resnet", "name": "resnet18", "aspp": True, "aspp_channels": 16,
                        "out_indices": [1, 3, 4]},
           "decode_head": {"type": head},
           "aux_heads": [{"type": "fcn", "in_index": 1, "channels": 8, "loss_weight": 0.4}]}
    model = build_segmentor(from_dict(ModelConfig, raw, "model"), num_classes=5)
    images, labels = torch.randn(2, 3, 72, 100), torch.randint(0, 5, (2, 72, 100))
    losses = model(images, labels)
    assert set(losses) == {"decode.loss_ce", "aux0.loss_ce"}
    model.eval()
    with torch.no_grad():
        assert model(images).shape == (2, 5, 72, 100)


def _randomise_batchnorms(model: torch.nn.Module, seed: int = 0) -> None:
    """Non-trivial BatchNorm statistics and affine parameters (a fresh BN folds to the identity)."""
    gen = torch.Generator().manual_seed(seed)
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            n = module.num_features
            module.running_mean.copy_(torch.randn(n, generator=gen) * 0.1)
            module.running_var.copy_(torch.rand(n, generator=gen) + 0.5)
            module.weight.data.copy_(torch.rand(n, generator=gen) + 0.5)
            module.bias.data.copy_(torch.randn(n, generator=gen) * 0.1)


@pytest.mark.parametrize("head", [
    {"type": "nrd", "controller_channels": 32},
    {"type": "deeplabv3plus", "channels": 32, "c1_channels": 16},
])
def test_prepare_for_inference_folds_batchnorms_and_keeps_the_scores(head):
    from segcli.engine.inference import prepare_for_inference

    torch.manual_seed(0)
    cfg = from_dict(ModelConfig, {
        "backbone": {"type": "resnet", "name": "resnet18", "out_indices": [1, 4], "aspp": True,
                     "aspp_channels": 32, "aspp_dilations": [1, 2, 3]},
        "decode_head": head}, "model")
    from segcli.models.builder import build_segmentor

    model = build_segmentor(cfg, 5).eval()
    _randomise_batchnorms(model)
    images = torch.randn(2, 3, 96, 128)
    with torch.no_grad():
        before = model(images)
        prepared = prepare_for_inference(model)
        after = prepared(images)
    assert prepared is model
    assert not any(type(m) is torch.nn.BatchNorm2d for m in model.backbone.modules())  # every backbone BN folded
    assert after.shape == before.shape
    torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-4 * before.abs().max().item())


def test_fold_batchnorms_leaves_unpaired_and_batch_statistics_norms():
    from segcli.ops.batchnorm import fold_batchnorms

    seq = torch.nn.Sequential(torch.nn.BatchNorm2d(3), torch.nn.Conv2d(3, 4, 1),
                              torch.nn.BatchNorm2d(4, track_running_stats=False), torch.nn.ReLU())
    assert fold_batchnorms(seq.eval()) == 0
    assert [type(m).__name__ for m in seq] == ["BatchNorm2d", "Conv2d", "BatchNorm2d", "ReLU"]
