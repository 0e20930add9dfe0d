"""`segcli convert` against the official code's own outputs (tests/fixtures/official/, made by
tools/make_parity_fixtures.py from zbwxp/SegVit and MMSegmentation 0.24 on reduced models)."""
from __future__ import annotations

import json
import pickle
import warnings

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
    with pytest.raises(SegcliError, match="does not fit") as err:
        api.convert(FIXTURES / "segvit-v1.pth", recipe=RECIPES / "segvit_v1_small.yaml", out=tmp_path / "m.pt",
                    overrides=["model.backbone.depth=5"])
    assert "backbone.vit.blocks.*): 4 in the file, 5 in the recipe" in str(err.value)


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
    plain.write_bytes(pickle.dumps({"a": 1}, protocol=4))
    with pytest.raises(SegcliError), warnings.catch_warnings():
        warnings.simplefilter("error")  # the one-line error only: no torch note about the protocol first
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


# --- recipe-less conversion: the architecture read from the tensors (issue 22, bug 3) ---------

RELEASED = REPO / "recipes" / "released"


def official_segvit_v1(embed_dim: int, depth: int, grid: int, head_dim: int, num_classes: int, stages: int = 3,
                       layers: int = 3, shrunk: bool = False) -> dict[str, torch.Tensor]:
    """The keys and shapes of an official SegViT v1 / Shrunk checkpoint at any size, as ``meta``
    tensors (shapes only): what tests/fixtures/official/segvit-v1*_keys.txt list at the fixture's
    size (checked below), so that full-size ViT-L files cost nothing."""
    def t(*shape):
        return torch.empty(shape, device="meta")

    width, dim = embed_dim, head_dim
    state = {"backbone.cls_token": t(1, 1, width), "backbone.pos_embed": t(1, 1 + grid * grid, width),
             "backbone.patch_embed.projection.weight": t(width, 3, 16, 16),
             "backbone.patch_embed.projection.bias": t(width)}
    for i in range(depth):
        p = f"backbone.layers.{i}."
        state.update({p + "ln1.weight": t(width), p + "ln1.bias": t(width),
                      p + "attn.attn.in_proj_weight": t(3 * width, width), p + "attn.attn.in_proj_bias": t(3 * width),
                      p + "attn.attn.out_proj.weight": t(width, width), p + "attn.attn.out_proj.bias": t(width),
                      p + "ln2.weight": t(width), p + "ln2.bias": t(width),
                      p + "ffn.layers.0.0.weight": t(4 * width, width), p + "ffn.layers.0.0.bias": t(4 * width),
                      p + "ffn.layers.1.weight": t(width, 4 * width), p + "ffn.layers.1.bias": t(width)})

    def decoder(prefix: str, fused_cross: bool) -> None:
        for layer in range(layers):
            p = f"{prefix}.layers.{layer}."
            state.update({p + "self_attn.in_proj_weight": t(3 * dim, dim), p + "self_attn.in_proj_bias": t(3 * dim),
                          p + "self_attn.out_proj.weight": t(dim, dim), p + "self_attn.out_proj.bias": t(dim),
                          p + "linear1.weight": t(4 * dim, dim), p + "linear1.bias": t(4 * dim),
                          p + "linear2.weight": t(dim, 4 * dim), p + "linear2.bias": t(dim)})
            state.update({p + f"norm{n}.{w}": t(dim) for n in (1, 2, 3) for w in ("weight", "bias")})
            if fused_cross:  # nn.TransformerDecoderLayer (the TPN)
                state.update({p + "multihead_attn.in_proj_weight": t(3 * dim, dim),
                              p + "multihead_attn.in_proj_bias": t(3 * dim),
                              p + "multihead_attn.out_proj.weight": t(dim, dim),
                              p + "multihead_attn.out_proj.bias": t(dim)})
            else:  # the ATM layer's separate q / k / v / proj
                state.update({p + f"multihead_attn.{x}.{w}": t(dim, dim) if w == "weight" else t(dim)
                              for x in ("q", "k", "v", "proj") for w in ("weight", "bias")})

    def readers(prefix: str, count: int, fused_cross: bool) -> None:
        for s in range(1, count + 1):
            state.update({f"{prefix}input_proj_{s}.weight": t(dim, width), f"{prefix}input_proj_{s}.bias": t(dim),
                          f"{prefix}proj_norm_{s}.weight": t(dim), f"{prefix}proj_norm_{s}.bias": t(dim)})
            decoder(f"{prefix}decoder_{s}", fused_cross)

    def atm(prefix: str) -> None:  # ATMHead: q = Embedding(K, D), class_embed = Linear(D, K + 1)
        state.update({f"{prefix}loss_decode.criterion.empty_weight": t(num_classes + 1),
                      f"{prefix}q.weight": t(num_classes, dim), f"{prefix}class_embed.weight": t(num_classes + 1, dim),
                      f"{prefix}class_embed.bias": t(num_classes + 1)})

    if shrunk:  # TPNATMHead: readers with fused cross-attention, a (img/16)^2 query grid, its ATMSingleHead
        state["decode_head.loss_decode.criterion.empty_weight"] = t(num_classes + 1)
        readers("decode_head.", stages, fused_cross=True)
        state["decode_head.q.weight"] = t(grid * grid, dim)
        decoder("decode_head.atm.decoder_1", fused_cross=False)
        atm("decode_head.atm.")
    else:
        readers("decode_head.", stages, fused_cross=False)
        atm("decode_head.")
    return state


def _fixture_shapes(name: str) -> dict[str, tuple[int, ...]]:
    rows = (line.split("\t") for line in (FIXTURES / f"{name}_keys.txt").read_text().splitlines() if line)
    return {key: tuple(json.loads(shape)) for key, _, shape in rows}


@pytest.mark.parametrize("name, shrunk, stages", [("segvit-v1", False, 3), ("segvit-v1-shrunk", True, 2)])
def test_the_shape_builder_is_the_official_format(name, shrunk, stages):
    """The test's full-size files are the official code's format: at the fixture's size (64 wide,
    4 blocks, 4x4 grid, D = 32, 6 classes) the builder gives exactly the fixture's keys and shapes."""
    built = official_segvit_v1(64, 4, 4, 32, 6, stages=stages, shrunk=shrunk)
    assert {k: tuple(v.shape) for k, v in built.items()} == _fixture_shapes(name)


# (file, width, depth, grid, D, classes, shrunk): the seven released files (zbwxp/SegVit README)
RELEASED_FILES = [
    ("segvit_vit_b_ade20k.yaml", 768, 12, 32, 384, 150, False),  # ade_51.3.pth
    ("segvit_vit_l_ade20k.yaml", 1024, 24, 40, 512, 150, False),  # ade_54.6.pth
    ("segvit_vit_l_coco_stuff10k.yaml", 1024, 24, 32, 512, 171, False),  # COCOstuff_49.9.pth
    ("segvit_vit_l_pascal_context.yaml", 1024, 24, 30, 512, 59, False),  # PC59cls_64.1.pth
    ("segvit_shrunk_vit_l_ade20k.yaml", 1024, 24, 40, 512, 150, True),  # ade_shrunk_53.9.pth
    ("segvit_shrunk_vit_l_coco_stuff10k.yaml", 1024, 24, 32, 512, 171, True),  # COCOstuff10k_shrunk_49.1.pth
    ("segvit_shrunk_vit_l_pascal_context.yaml", 1024, 24, 30, 512, 59, True),  # PC59cls_62.3.pth
]


def test_released_files_name_their_recipe():
    """ViT-B / ViT-L from width and depth, Shrunk from the TPN, the class count from the class
    queries, the training size from the position grid; each picks its own released recipe."""
    from segcli.workflows.convert import infer_architecture, pick_released_recipe

    for recipe, width, depth, grid, dim, classes, shrunk in RELEASED_FILES:
        state = official_segvit_v1(width, depth, grid, dim, classes, stages=2 if shrunk else 3, shrunk=shrunk)
        arch = infer_architecture(state)
        assert (arch.family, arch.embed_dim, arch.depth, arch.pos_grid, arch.num_classes) == (
            "segvit-v1-shrunk" if shrunk else "segvit-v1", width, depth, grid, classes), recipe
        assert arch.query_grid == (grid if shrunk else None)
        assert pick_released_recipe(state) == RELEASED / recipe


@pytest.mark.parametrize("shrunk", [False, True])
def test_a_60_class_pascal_context_head_is_never_converted_onto_59_labels(shrunk):
    """The official PC config trains num_classes=60 (the background-included pascal_context); the
    released recipes are PC59. 60 class queries: one line with the recipe and the --set that fits."""
    from segcli.workflows.convert import pick_released_recipe

    state = official_segvit_v1(1024, 24, 30, 512, 60, stages=2 if shrunk else 3, shrunk=shrunk)
    with pytest.raises(SegcliError) as err:
        pick_released_recipe(state)
    text = str(err.value)
    recipe = f"segvit_{'shrunk_' if shrunk else ''}vit_l_pascal_context.yaml"
    assert "\n" not in text and "60 classes" in text and "decode_head" in text and "(60, 512)" in text
    assert f"{recipe} --set data.type=pascal_context" in text and "(59, 512)" in text
    assert pick_released_recipe(state, overrides=["data.type=pascal_context"]) == RELEASED / recipe  # what it says works


def test_a_class_count_no_released_recipe_has_names_the_candidates():
    from segcli.workflows.convert import pick_released_recipe

    with pytest.raises(SegcliError) as err:
        pick_released_recipe(official_segvit_v1(1024, 24, 40, 512, 100))
    text = str(err.value)
    assert "\n" not in text and "100 classes" in text and "segvit_vit_l_ade20k.yaml" in text and "--recipe" in text
    with pytest.raises(SegcliError, match="no released recipe builds these shapes"):
        pick_released_recipe(official_segvit_v1(1024, 12, 40, 512, 150))  # a 12-block ViT-L


@pytest.fixture
def small_released(tmp_path, monkeypatch):
    """A released-recipe folder holding the reduced fixtures' recipes, so that the recipe-less
    path converts real (small) official files end to end."""
    from segcli.workflows import convert as workflow

    folder = tmp_path / "released"
    folder.mkdir()
    for name in ("segvit_v1_small.yaml", "segvit_v1_shrunk_small.yaml"):
        (folder / name).write_text((RECIPES / name).read_text())
    monkeypatch.setattr(workflow, "RELEASED_RECIPES", folder)
    return folder


@pytest.mark.parametrize("name, recipe, io_key", [("segvit-v1", "segvit_v1_small.yaml", "seg_logits"),
                                                  ("segvit-v1-shrunk", "segvit_v1_shrunk_small.yaml", "seg_logits")])
def test_a_released_file_converts_without_recipe(name, recipe, io_key, small_released, tmp_path):
    """Bug 3: no --recipe on a released SegViT v1 file stopped with "the architecture is needed"."""
    out = api.convert(FIXTURES / f"{name}.pth", out=tmp_path / "m.pt")
    assert out.format == name and out.recipe is not None and out.recipe.endswith(recipe)
    loaded = api.load_checkpoint(out.path)
    io = torch.load(FIXTURES / f"{name}_io.pt", weights_only=True)
    with torch.no_grad():
        assert rel_diff(loaded.model(io["input"]), io[io_key]) < RTOL


def test_convert_cli_without_recipe_and_with_a_wrong_one(cli, small_released, tmp_path):
    res = cli("convert", FIXTURES / "segvit-v1.pth", "--out", tmp_path / "m.pt")
    assert res.exit_code == 0, res.output
    assert "segvit_v1_small.yaml" in res.output and "6 classes" in res.output
    # a ViT-L recipe for a 64-wide file: the tensor, both shapes and the recipe that fits, one line
    res = cli("convert", FIXTURES / "segvit-v1.pth", "--recipe", RELEASED / "segvit_vit_l_coco_stuff10k.yaml",
              "--out", tmp_path / "b.pt")
    error = res.stderr.strip()
    assert res.exit_code == 2 and "\n" not in error and "Traceback" not in res.output
    assert "backbone.patch_embed.projection.weight (64, 3, 16, 16)" in error and "(1024, 3, 16, 16)" in error
    assert "segvit_v1_small.yaml fits" in error
    # the recipe's dataset has another class count: the class queries, both shapes
    res = cli("convert", FIXTURES / "segvit-v1.pth", "--recipe", RECIPES / "segvit_v1_small.yaml",
              "--set", "data.classes=[a, b, c, d, e]", "--out", tmp_path / "c.pt")
    error = res.stderr.strip()
    assert res.exit_code == 2 and "\n" not in error
    assert "decode_head.q.weight (6, 32) in the file" in error and "(5, 32) in the recipe" in error
    assert not (tmp_path / "b.pt").exists() and not (tmp_path / "c.pt").exists()


def test_a_shape_the_architecture_does_not_show_still_names_both_shapes():
    """The last check (every tensor, every shape) names the tensor as the file names it."""
    from segcli.convert.keymap import fill_target, map_state
    from segcli.convert.segvit import segvit_v1_rules, zero_based_stages

    official = state_dict_of(read_foreign_checkpoint(FIXTURES / "segvit-v1.pth"), "segvit-v1")
    mapped, unmatched, origins = map_state(official, segvit_v1_rules(), zero_based_stages)
    target = {k: v for k, v in mapped.items()}
    target["decode_head.stages.0.layers.0.ffn.0.weight"] = torch.empty(96, 32)
    with pytest.raises(SegcliError) as err:
        fill_target(mapped, unmatched, origins, target, "file.pth", "segvit-v1", hint="do this")
    assert "decode_head.decoder_1.layers.0.linear1.weight is (128, 32) in the file" in str(err.value)
    assert "(96, 32) in the model" in str(err.value) and str(err.value).endswith("(do this)")
