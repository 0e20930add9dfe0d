"""`segcli convert` against the official code's own outputs (tests/fixtures/official/, made by
tools/make_parity_fixtures.py from zbwxp/SegVit and MMSegmentation 0.24 on reduced models)."""
from __future__ import annotations

import json
import pickle

import pytest
import torch

from conftest import REPO

from segcli import api
from segcli.convert.reader import read_foreign_checkpoint, state_dict_of
from segcli.engine.inference import infer
from segcli.errors import SegcliError

FIXTURES = REPO / "tests" / "fixtures" / "official"
RECIPES = REPO / "tests" / "fixtures" / "recipes"
RTOL = 1e-4


def rel_diff(ours: torch.Tensor, theirs: torch.Tensor) -> float:
    return float((ours - theirs).abs().max() / theirs.abs().max())


def test_segvit_v1_converts_and_matches_the_official_outputs(tmp_path):
    out = api.convert(FIXTURES / "segvit-v1.pth", recipe=RECIPES / "segvit_v1_small.yaml", out=tmp_path / "m.pt")
    assert out.format == "segvit-v1" and out.tensors_in == 266  # detected from the keys
    loaded = api.load_checkpoint(out.path)
    io = torch.load(FIXTURES / "segvit-v1_io.pt", weights_only=True)
    with torch.no_grad():
        features = loaded.model.backbone(io["input"])
        for block, feature in zip((1, 2, 3), features):
            assert rel_diff(feature, io[f"feat.{block}"]) < RTOL
        # whole mode at 96x96: the 4x4 position table resized as MMSegmentation does
        assert rel_diff(loaded.model(io["input"]), io["seg_logits"]) < RTOL
        # slide mode, the released test pipeline (crop 64, stride 32) on a 96x128 image
        scores = infer(loaded.model, io["slide.input"], loaded.recipe.test, loaded.recipe.data.crop_size)
    assert rel_diff(scores, io["slide.seg_logits"]) < RTOL
    assert torch.equal(scores.argmax(1), io["slide.seg_logits"].argmax(1))
    assert loaded.meta["num_classes"] == 6 and loaded.meta["converted_from"]["format"] == "segvit-v1"


def test_the_converted_checkpoint_predicts_like_any_other(tmp_path, synth_root):
    out = api.convert(FIXTURES / "segvit-v1.pth", recipe=RECIPES / "segvit_v1_small.yaml", out=tmp_path / "m.pt")
    assert api.load_checkpoint(out.path).recipe.model.decode_head.cfg.self_attn  # the released head, embedded
    image = next((synth_root / "images" / "val").iterdir())
    result = api.predict([str(image)], out.path, out_dir=tmp_path / "pred", device="cpu")
    assert not result.failed and (tmp_path / "pred" / f"{image.stem}.png").is_file()


def test_mmseg_vit_backbone_file_loads_as_pretrained(tmp_path):
    """The vit2mmseg.py format: directly as model.backbone.pretrained, and through convert."""
    io = torch.load(FIXTURES / "mmseg-vit_io.pt", weights_only=True)
    overrides = [f"model.backbone.pretrained={FIXTURES / 'mmseg-vit.pth'}", "model.backbone.out_indices=[1, 3]",
                 "model.decode_head.in_index=[1, 0]"]
    model = api.build_model(api.load_recipe(RECIPES / "segvit_v1_small.yaml", overrides), num_classes=6).eval()
    with torch.no_grad():
        features = model.backbone(io["input"])  # 96x128: a 6x8 grid from the 4x4 table
    assert rel_diff(features[0], io["segvit.feat.1"]) < RTOL and rel_diff(features[1], io["segvit.feat.3"]) < RTOL
    timm_file = api.convert(FIXTURES / "mmseg-vit.pth", out=tmp_path / "vit.pth")
    assert timm_file.format == "mmseg-vit"
    state = torch.load(timm_file.path, weights_only=True)
    assert "blocks.0.attn.qkv.weight" in state and "norm.weight" in state and "cls_token" not in state


@pytest.mark.parametrize("name, recipe", [("mmseg-setr", "mmseg_setr_small.yaml"),
                                          ("mmseg-deeplabv3plus", "mmseg_deeplabv3plus_small.yaml")])
def test_mmseg_zoo_models_convert_and_match(name, recipe, tmp_path):
    """SETR (cls token through the blocks, bilinear position resize, 3 auxiliary heads) and
    DeepLabV3+ (ResNetV1c at output stride 8, ASPP moved into segcli's encoder, FCN aux head)."""
    out = api.convert(FIXTURES / f"{name}.pth", from_format="mmseg", recipe=RECIPES / recipe, out=tmp_path / "m.pt")
    assert out.format == name
    model = api.load_checkpoint(out.path).model
    io = torch.load(FIXTURES / f"{name}_io.pt", weights_only=True)
    with torch.no_grad():
        features = model.backbone(io["input"])
        assert rel_diff(model.decode_head(features)["logits"], io["decode_head.logits"]) < RTOL
        for i, head in enumerate(model.aux_heads):
            reference = io["auxiliary_head.logits"] if name.endswith("deeplabv3plus") else io[f"auxiliary_head.{i}.logits"]
            assert rel_diff(head(features)["logits"], reference) < RTOL
        assert rel_diff(model(io["input"]), io["seg_logits"]) < RTOL


def test_segvit_v1_shrunk_converts_and_matches(tmp_path):
    """vit_shrink (QD in block 2) + the TPN head: whole mode at 96x96 (the learnt 4x4 query grid is
    not resized) and the released slide test."""
    out = api.convert(FIXTURES / "segvit-v1-shrunk.pth", recipe=RECIPES / "segvit_v1_shrunk_small.yaml",
                      out=tmp_path / "m.pt")
    assert out.format == "segvit-v1-shrunk"
    loaded = api.load_checkpoint(out.path)
    io = torch.load(FIXTURES / "segvit-v1-shrunk_io.pt", weights_only=True)
    with torch.no_grad():
        features, _ = loaded.model.encode(io["input"])
        assert rel_diff(features[1], io["tpn.q_map"]) < RTOL
        assert rel_diff(loaded.model(io["input"]), io["seg_logits"]) < RTOL
        scores = infer(loaded.model, io["slide.input"], loaded.recipe.test, loaded.recipe.data.crop_size)
    assert rel_diff(scores, io["slide.seg_logits"]) < RTOL


def test_dtop_converts_with_its_binary_heads_and_prunes_the_same_tokens(tmp_path):
    """An MMEngine checkpoint of zbwxp/Dynamic-Token-Pruning: exits after blocks 1 and 2 with the
    released rule (> 0.9, 5 per class kept), the released combination of masks and class scores."""
    out = api.convert(FIXTURES / "dtop.pth", recipe=RECIPES / "dtop_small.yaml", out=tmp_path / "m.pt")
    assert out.format == "dtop" and out.tensors_in == 274
    model = api.load_checkpoint(out.path).model
    io = torch.load(FIXTURES / "dtop_io.pt", weights_only=True)
    with torch.no_grad():
        trace = model.run(io["input"])
        scores = model(io["input"])
    for stage in (0, 1):
        exited = io[f"stage{stage}.newly_exited"].bool()
        assert exited.any() and torch.equal(trace.exit_stage == stage, exited)
    assert rel_diff(scores, io["seg_logits"]) < RTOL
    assert torch.equal(scores.argmax(1), io["seg_pred"].view_as(scores.argmax(1)))


def test_binary_class_heads_train():
    """The binary head's loss: CE over present / absent per query, plus the mask terms."""
    recipe = api.load_recipe(RECIPES / "dtop_small.yaml", ["model.options.p0=1.0"])
    model = api.build_model(recipe, num_classes=5).train()
    labels = torch.randint(0, 5, (2, 64, 64))
    labels[:, :8] = 255
    losses = model(torch.randn(2, 3, 64, 64), labels)
    total = sum(losses.values())
    assert torch.isfinite(total) and any(k.endswith("loss_ce") for k in losses)
    total.backward()
    assert model.decode_head.class_head.weight.grad is not None


def test_wrong_architecture_names_the_keys(tmp_path):
    with pytest.raises(SegcliError, match="not a segvit-v1 checkpoint of this architecture") as err:
        api.convert(FIXTURES / "segvit-v1.pth", recipe=RECIPES / "segvit_v1_small.yaml", out=tmp_path / "m.pt",
                    overrides=["model.backbone.depth=5"])
    assert "backbone.vit.blocks.4" in str(err.value)


def test_the_output_never_replaces_a_file(tmp_path):
    target = tmp_path / "m.pt"
    target.write_bytes(b"mine")
    with pytest.raises(SegcliError, match="exists"):
        api.convert(FIXTURES / "segvit-v1.pth", recipe=RECIPES / "segvit_v1_small.yaml", out=target)
    assert target.read_bytes() == b"mine"


def test_mmengine_checkpoints_are_read_without_running_code(tmp_path):
    """The DToP fixture is an MMEngine checkpoint (message_hub holds HistoryBuffer objects, numpy values)."""
    payload = read_foreign_checkpoint(FIXTURES / "dtop.pth")
    assert len(state_dict_of(payload, "dtop")) == 274
    assert "HistoryBuffer" in repr(payload["message_hub"])

    class Evil:
        def __reduce__(self):
            return (print, ("this would run",))

    evil = tmp_path / "evil.pth"
    torch.save({"state_dict": {"w": torch.ones(1)}, "x": Evil()}, evil)
    with pytest.raises(SegcliError, match="would run code"):
        read_foreign_checkpoint(evil)
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes((FIXTURES / "segvit-v1.pth").read_bytes()[:2000])
    with pytest.raises(SegcliError, match="truncated"):
        read_foreign_checkpoint(truncated)
    plain = tmp_path / "plain.pkl"
    plain.write_bytes(pickle.dumps({"a": 1}))
    with pytest.raises(SegcliError):
        state_dict_of(read_foreign_checkpoint(plain), str(plain))


def test_convert_cli_renders_and_refuses(cli, tmp_path):
    res = cli("convert", FIXTURES / "segvit-v1.pth", "--recipe", RECIPES / "segvit_v1_small.yaml",
              "--out", tmp_path / "m.pt", "--json")
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["format"] == "segvit-v1"
    res = cli("convert", FIXTURES / "segvit-v1.pth", "--recipe", RECIPES / "segvit_v1_small.yaml",
              "--out", tmp_path / "m.pt")
    assert res.exit_code == 2 and "--overwrite" in res.output and "Traceback" not in res.output
    res = cli("convert", FIXTURES / "segvit-v1.pth", "--from", "segvit-v9")
    assert res.exit_code == 2 and "segvit-v1" in res.output
    res = cli("convert", FIXTURES / "mmseg-setr.pth", "--out", tmp_path / "setr.pt")  # no --recipe
    assert res.exit_code == 2 and "--recipe" in res.output


def test_the_released_vit_b_recipe_counts_the_released_gflops():
    """Thesis table 4.1 / the release: SegViT ViT-B/16 at 512x512, 120.9 GFLOPs."""
    result = api.flops(REPO / "recipes" / "released" / "segvit_vit_b_ade20k.yaml")
    assert result["gflops"] == pytest.approx(120.9, rel=0.01) and result["shape"] == [512, 512]


def test_released_fine_tuning_groups_match_the_official_paramwise_cfg(tmp_path):
    """zbwxp/SegVit configs: AdamW, custom_keys norm/ln -> no weight decay, head -> lr x10 (so the
    class queries get x10 *and* weight decay); `wd_embeddings: true` is that rule in segcli."""
    from segcli.convert.keymap import apply_rules
    from segcli.convert.segvit import segvit_v1_rules, zero_based_stages
    from segcli.engine.optim import param_groups

    recipe = api.load_recipe(RECIPES / "segvit_v1_small.yaml", ["train.optimizer.wd_embeddings=true"])
    model = api.build_model(recipe, num_classes=6)
    ours = {}
    for group in param_groups(model, recipe.train.optimizer):
        ours.update({name: (group["lr_scale"], group["weight_decay"]) for name in group["names"]})
    official = state_dict_of(read_foreign_checkpoint(FIXTURES / "segvit-v1.pth"), "segvit-v1")
    checked = 0
    for key in official:
        if key.endswith("empty_weight") or key.endswith("cls_token"):
            continue  # buffers / dropped
        mapped, _ = apply_rules({key: official[key]}, segvit_v1_rules())
        released = (10.0 if "head" in key else 1.0, 0.0 if ("norm" in key or "ln" in key) else 0.01)
        for name in mapped:
            assert ours[zero_based_stages(name)] == released, (key, name)
            checked += 1
    assert checked == len(ours)  # every trainable parameter of ours was compared


def test_mmseg_beit_file_loads_as_pretrained(tmp_path):
    """A BEiT in MMSegmentation's names (what its beit2mmseg.py writes: blocks -> layers, norm -> ln,
    mlp.fc1/fc2 -> ffn.layers.0.0/1, patch_embed.proj -> projection) loads as pretrained weights
    and gives the features of the same weights loaded in timm's names."""
    import re

    from segcli.models.backbones.vit import ViTBackbone, ViTConfig

    cfg = dict(name="beit_base_patch16_224", img_size=64, depth=2, embed_dim=64, num_heads=4, out_indices=(1,),
               drop_path_rate=0.0)
    torch.manual_seed(0)
    reference = ViTBackbone(ViTConfig(**cfg)).eval()
    with torch.no_grad():
        for param in reference.parameters():
            param.add_(torch.randn_like(param) * 0.1)
    timm_state = dict(reference.vit.state_dict())
    mmseg_state = {}
    for key, value in timm_state.items():
        key = key.replace("patch_embed.proj", "patch_embed.projection")
        key = re.sub(r"^blocks\.", "layers.", key).replace(".norm1.", ".ln1.").replace(".norm2.", ".ln2.")
        key = key.replace(".mlp.fc1.", ".ffn.layers.0.0.").replace(".mlp.fc2.", ".ffn.layers.1.")
        mmseg_state[key] = value
    assert "layers.0.attn.q_bias" in mmseg_state and "layers.0.gamma_1" in mmseg_state
    torch.save(mmseg_state, tmp_path / "beit_mmseg.pth")
    loaded = ViTBackbone(ViTConfig(**cfg, pretrained=str(tmp_path / "beit_mmseg.pth"))).eval()
    images = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(loaded(images)[0], reference(images)[0], rtol=1e-5, atol=1e-6)
