"""``_base_`` inheritance is explicit: nothing inherited disappears because a neighbouring key changed."""
import textwrap

from segcli.recipe import load_recipe

MODEL = """
model:
  backbone: {type: vit, name: vit_tiny_patch16_224, img_size: 64, out_indices: [3, 5]}
  decode_head: {type: setr, in_index: -1}
"""


def _write(path, text):
    path.write_text(textwrap.dedent(text))
    return path


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
