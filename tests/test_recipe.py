"""Recipes: _base_ merging, --set overrides with type checks, did-you-mean errors."""
import re
import textwrap
from pathlib import Path

import pytest

from segcli.errors import SegcliError
from segcli.recipe import dump_recipe, load_recipe, recipe_from_dict

MODEL = """
model:
  backbone: {type: vit, name: vit_tiny_patch16_224, img_size: 64, out_indices: [3, 5]}
  decode_head: {type: setr, in_index: -1}
"""


def _write(path, text):
    path.write_text(textwrap.dedent(text))
    return path


def test_base_inheritance_and_overrides(tmp_path):
    (tmp_path / "base").mkdir()
    _write(tmp_path / "base" / "data.yaml", "data: {type: synthetic, batch_size: 4, crop_size: [64, 64]}\n"
                                            "train: {max_iters: 10, optimizer: {lr: 0.1}}\n")
    child = _write(tmp_path / "child.yaml", "_base_: base/data.yaml\n" + MODEL + "train: {max_iters: 20}\n")
    recipe = load_recipe(child, ["train.optimizer.lr=0.5", "data.crop_size=[32, 48]"])
    assert recipe.name == "child"
    assert recipe.train.max_iters == 20  # child wins
    assert recipe.train.optimizer.lr == 0.5  # override wins, base key kept merged
    assert recipe.data.batch_size == 4
    assert recipe.data.crop_size == (32, 48)
    assert recipe.model.backbone.cfg.out_indices == (3, 5)
    # round trip through the embedded form
    again = recipe_from_dict(recipe.to_dict())
    assert again == recipe
    assert "vit_tiny_patch16_224" in dump_recipe(recipe)


# _base_ inheritance is explicit: nothing inherited disappears because a neighbouring key changed


def test_swapping_the_dataset_type_keeps_the_inherited_data_settings(tmp_path):
    """The bug: ``data.type`` changed in a child dropped root, crop and batch of its base."""
    base = _write(tmp_path / "base.yaml", MODEL + "data: {type: pascal_context, root: data/voc, "
                                                  "crop_size: [48, 48], batch_size: 16}\n"
                                                  "train: {optimizer: {type: sgd, lr: 0.01, momentum: 0.8}}\n")
    child = _write(tmp_path / "child.yaml", f"_base_: {base.name}\ndata: {{type: pascal_context_59}}\n"
                                            "train: {optimizer: {type: adamw}}\n")
    recipe = load_recipe(child)
    assert recipe.data.type == "pascal_context_59"
    assert recipe.data.root == "data/voc"
    assert recipe.data.crop_size == (48, 48)
    assert recipe.data.batch_size == 16
    assert recipe.train.optimizer.type == "adamw"
    assert recipe.train.optimizer.lr == 0.01  # an optimizer swap keeps the base's lr


def test_delete_replaces_the_base_mapping(tmp_path):
    base = _write(tmp_path / "base.yaml", MODEL + "data: {type: synthetic, root: data/a, batch_size: 16}\n")
    child = _write(tmp_path / "child.yaml", f"_base_: {base.name}\ndata: {{_delete_: true, type: synthetic}}\n")
    recipe = load_recipe(child)
    assert recipe.data.root is None
    assert recipe.data.batch_size == 8  # the dataclass default, not the base's 16


def test_a_component_type_swap_replaces_its_options(tmp_path):
    """A head of another type has other options: the base head's keys would be rejected as unknown."""
    base = _write(tmp_path / "base.yaml", MODEL)
    child = _write(tmp_path / "child.yaml", f"_base_: {base.name}\nmodel:\n  decode_head: {{type: fcn, in_index: 1}}\n")
    recipe = load_recipe(child)
    assert recipe.model.decode_head.type == "fcn"
    assert recipe.model.backbone.cfg.out_indices == (3, 5)  # the neighbouring component is kept


def test_off_in_a_recipe_or_a_set_is_the_word_not_a_boolean(tmp_path):
    """YAML 1.1 reads ``off`` as False: ``--set train.amp=off`` was refused as "invalid value False"."""
    path = _write(tmp_path / "r.yaml", MODEL + "train: {amp: off}\n")
    assert load_recipe(path).train.amp == "off"
    assert load_recipe(path, ["train.amp=bf16", "train.amp=off"]).train.amp == "off"


@pytest.mark.parametrize("override, message", [
    ("train.max_iter=5", "did you mean 'max_iters'"),
    ("train.max_iters=abc", "expected an integer"),
    ("model.backbone.nmae=x", "did you mean 'name'"),
    ("model.decode_head.type=setrr", "did you mean 'setr'"),
    ("data.type=ade2k", "did you mean 'ade20k'"),
    ("test.mode=sliding", "choose one of"),
    ("train.max_iters", "not KEY=VALUE"),
])
def test_bad_keys_and_values(tmp_path, override, message):
    path = _write(tmp_path / "r.yaml", MODEL)
    with pytest.raises(SegcliError, match=message):
        load_recipe(path, [override])


def test_file_errors(tmp_path):
    with pytest.raises(SegcliError, match="not found"):
        load_recipe(tmp_path / "nope.yaml")
    bad = _write(tmp_path / "bad.yaml", "model: [unclosed\n")
    with pytest.raises(SegcliError, match="invalid YAML"):
        load_recipe(bad)
    missing_base = _write(tmp_path / "mb.yaml", "_base_: nothere.yaml\n" + MODEL)
    with pytest.raises(SegcliError, match="nothere.yaml"):
        load_recipe(missing_base)
    no_model = _write(tmp_path / "nm.yaml", "data: {type: synthetic}\n")
    with pytest.raises(SegcliError, match="model"):
        load_recipe(no_model)


RECIPES = Path(__file__).resolve().parents[1] / "recipes"
SHIPPED = sorted(p for p in RECIPES.rglob("*.yaml") if "_base_" not in p.parts)


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: str(p.relative_to(RECIPES)))
def test_every_shipped_recipe_loads(path):
    """Every recipe validates; the tiny ones also build and run a forward pass."""
    import torch

    from segcli import build_model

    recipe = load_recipe(path)
    assert recipe.name == path.stem
    if path.parent.name == "tiny":
        model = build_model(load_recipe(path, ["model.backbone.pretrained=null"]), num_classes=8).eval()
        with torch.no_grad():
            assert model(torch.randn(1, 3, 128, 128)).shape == (1, 8, 128, 128)


def _complete(recipe, where: str) -> None:
    """What a full run needs, present and sane, in a resolved recipe."""
    data, train, test = recipe.data, recipe.train, recipe.test
    assert data.root, f"{where}: data.root is not set"
    assert len(data.crop_size) == 2 and min(data.crop_size) >= 32, f"{where}: crop {data.crop_size}"
    assert data.batch_size >= 1 and data.num_workers >= 0, f"{where}: batch {data.batch_size}"
    if data.type != "synthetic":
        assert data.scale is not None and min(data.scale) >= min(data.crop_size) // 2, f"{where}: scale {data.scale}"
        assert data.batch_size >= 8, f"{where}: batch {data.batch_size} (full-size recipes train a published batch)"
        assert train.max_iters >= 1000, f"{where}: max_iters {train.max_iters}"
    assert 0 < train.optimizer.lr < 1 and 0 <= train.optimizer.weight_decay < 1, f"{where}: optimizer {train.optimizer}"
    assert 0 <= train.warmup_iters < train.max_iters and train.poly_power > 0, f"{where}: schedule"
    if test.mode == "slide":
        assert test.stride is not None and all(s > 0 for s in test.stride), f"{where}: slide stride"
        crop = test.crop_size or data.crop_size
        assert all(s <= c for s, c in zip(test.stride, crop)), f"{where}: stride {test.stride} > window {crop}"


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: str(p.relative_to(RECIPES)))
def test_every_shipped_recipe_is_complete(path):
    """Resolved, every shipped recipe has its data root, crop, batch, schedule and optimizer."""
    _complete(load_recipe(path), str(path.relative_to(RECIPES)))


@pytest.mark.parametrize("name", ["segvit_vit_l_pascal_context.yaml", "released/segvit_vit_l_pascal_context.yaml",
                                  "released/segvit_shrunk_vit_l_pascal_context.yaml"])
def test_pascal_context_59_recipes_keep_the_base_data(name):
    """Issue 22 bug 1: _base_/datasets/pascal_context_59.yaml swaps data.type, and the old merge rule
    dropped every other key of the data section with it: these three resolved with data.root null
    (and the model recipe's crop, scale and batch came back only because they restate them)."""
    recipe = load_recipe(RECIPES / name)
    assert recipe.data.type == "pascal_context_59"
    assert recipe.data.root == "data/VOCdevkit/VOC2010"
    assert recipe.data.num_workers == 4  # set only by _base_/datasets/pascal_context.yaml
    base = load_recipe(RECIPES / "segvit_vit_l_pascal_context_60.yaml")
    assert (recipe.data.crop_size, recipe.data.scale, recipe.data.batch_size) == (
        base.data.crop_size, base.data.scale, base.data.batch_size)


# Published facts of each dataset (MMSegmentation 0.24 configs/_base_/datasets/*.py: data_root; the
# class lists of the released models' heads). A recipe that resolves to another root or class count
# has lost or changed something on its way through _base_ merging.
DATASETS = {"ade20k": ("data/ade/ADEChallengeData2016", 150), "coco_stuff10k": ("data/coco_stuff10k", 171),
            "pascal_context": ("data/VOCdevkit/VOC2010", 60), "pascal_context_59": ("data/VOCdevkit/VOC2010", 59),
            "cityscapes": ("data/cityscapes", 19), "synthetic": (None, 8)}


def header_claims(path: Path) -> dict:
    """What the first two lines of a recipe's header say of it: ``HxW`` (first line: the crop),
    ``N classes`` (first line) and ``Nk iterations`` (lines 1-2; later lines discuss other runs)."""
    lines = path.read_text().splitlines()[:2]
    first = lines[0] if lines and lines[0].startswith("#") else ""
    both = " ".join(line.lstrip("# ") for line in lines if line.startswith("#"))
    claims = {}
    if crop := re.search(r"\b(\d{3,4})x(\d{3,4})\b", first):
        claims["crop_size"] = (int(crop[1]), int(crop[2]))
    if classes := re.search(r"\b(\d+) classes\b", first):
        claims["num_classes"] = int(classes[1])
    if iters := re.search(r"\b(\d+)k iterations\b", both):
        claims["max_iters"] = int(iters[1]) * 1000
    return claims


def _what_it_says(path: Path) -> None:
    from segcli.build import num_classes_of

    recipe = load_recipe(path)
    root, classes = DATASETS[recipe.data.type]
    if root is None:  # the synthetic data: generated under data/synthetic*
        assert (recipe.data.root or "").startswith("data/synthetic"), f"data.root {recipe.data.root}"
    else:
        assert recipe.data.root == root, f"data.root {recipe.data.root}"
    assert num_classes_of(recipe.data) == classes
    claims = header_claims(path)
    resolved = {"crop_size": tuple(recipe.data.crop_size), "num_classes": classes, "max_iters": recipe.train.max_iters}
    assert {key: resolved[key] for key in claims} == claims
    published = recipe.published
    if published is not None:
        assert published.gpus * published.batch_per_gpu == recipe.data.batch_size
        # MMSegmentation's config names: <model>_<H>x<W>_<N>k_<dataset>.py
        named = re.search(r"_(\d{3,4})x(\d{3,4})_(\d+)k_", published.official_config or "")
        if named:
            assert tuple(recipe.data.crop_size) == (int(named[1]), int(named[2]))
            assert recipe.train.max_iters == int(named[3]) * 1000


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: str(p.relative_to(RECIPES)))
def test_every_shipped_recipe_is_what_it_says(path):
    """Resolved key fields against the dataset's published facts and the recipe's own header; the
    published global batch (``gpus x batch_per_gpu``) is the recipe's batch."""
    _what_it_says(path)


def test_a_lost_data_root_is_caught(tmp_path):
    """The bug this file once passed over: a recipe that resolved with data.root null (issue 22)."""
    path = _write(tmp_path / "lost.yaml", "# ADE20K 512x512, 160k iterations\n" + MODEL
                  + "data: {type: ade20k, root: null, crop_size: [512, 512]}\ntrain: {max_iters: 160000}\n")
    with pytest.raises(AssertionError, match="data.root"):
        _complete(load_recipe(path), "lost.yaml")
    with pytest.raises(AssertionError, match="data.root None"):
        _what_it_says(path)
    path.write_text(path.read_text().replace("root: null", "root: data/ade/ADEChallengeData2016"))
    _what_it_says(path)  # the same recipe with its root passes
    path.write_text(path.read_text().replace("max_iters: 160000", "max_iters: 80000"))
    with pytest.raises(AssertionError):
        _what_it_says(path)  # the header says 160k
